"""The inference mode of one optimized model, as its bound LoRA modules read it (``sloth_core.for_inference``).

:func:`sloth_core.for_inference` gives the model one :class:`InferenceMode` and puts it on every module bound by
``lora_linear`` or ``lora_mlp`` (attribute :data:`MODE_ATTR`); :func:`sloth_core.for_training` takes it off. A
bound forward asks :func:`decoding_mode` at each call:

* not in inference mode: ``None``, the training path (autograd functions) runs;
* in inference mode with gradients off (``torch.no_grad()``, ``torch.inference_mode()``, ``generate``): the mode;
  the forward then runs the inference functions (:mod:`sloth_core.kernels.lora_infer`) through :meth:`run`;
* in inference mode with gradients on: ``None`` -- the training path runs (same function, verified, with autograd),
  and a :class:`SlothCoreWarning` says once per model that the inference path was skipped. Raising would break a
  training step someone runs without calling ``for_training`` first; computing without autograd would silently
  drop gradients.

Verification on first use: the first call of each setting (pattern, layer shapes and dtypes, input dtype, the
number of rows of a decoding step -- 1 to 8, one GEMV variant each -- or prefill) computes both the inference
function and the training path's function (itself verified against the original module by ``optimize``) on the
call's own input and compares them within the dtype's tolerance. A setting that agrees runs the inference function
from then on; one that does not runs the training path for good, with a warning naming the pattern and the
difference. ``sloth_core.restore`` takes the mode off with the bindings.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from .tolerances import compare
from .verify import probing
from .warning import SlothCoreWarning

MODE_ATTR = "_sloth_core_inference"  # on the model (unwrapped) and on each bound LoRA module: its InferenceMode


class InferenceMode:
    """One model's inference mode: the settings verified so far (``key -> None`` or the reason it failed)."""

    def __init__(self, was_training: bool):
        self.was_training = was_training  # the model's train() flag before for_inference, for for_training
        self.verified: dict[tuple, str | None] = {}
        self.warned_grad = False
        self.casts: dict[tuple[int, torch.dtype], tuple[torch.Tensor, int, torch.Tensor]] = {}

    def cast(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``t.to(dtype)``, kept while ``t`` is unchanged (same object, same in-place version): the adapters' copies
        in the compute dtype, made once instead of at every decoding step."""
        if t.dtype == dtype:
            return t
        entry = self.casts.get((id(t), dtype))
        if entry is not None and entry[0] is t and entry[1] == t._version:
            return entry[2]
        copy = t.to(dtype)
        self.casts[(id(t), dtype)] = (t, t._version, copy)
        return copy

    def run(self, module: nn.Module, pattern: str, key: tuple, infer: Callable[[], torch.Tensor],
            train: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``infer()`` once the setting ``key`` has verified against ``train()`` (checked on its first call)."""
        if key in self.verified:
            return infer() if self.verified[key] is None else train()
        actual, expected = infer(), train()
        why = compare(actual, expected, expected.dtype)
        self.verified[key] = why
        if why is None:
            return actual
        warnings.warn(f"sloth_core: the inference path of {pattern} on a {type(module).__name__} does not match its "
                      f"training path ({why}); that setting keeps the training path", SlothCoreWarning, stacklevel=4)
        return expected


def decoding_mode(module: nn.Module) -> InferenceMode | None:
    """The module's inference mode when its inference path applies to this call (see the module docstring)."""
    mode = module.__dict__.get(MODE_ATTR)
    if mode is None:
        return None
    if torch.is_grad_enabled():
        if not mode.warned_grad and not probing():  # a first-use verification's probe runs with gradients on
            mode.warned_grad = True
            warnings.warn("sloth_core: the model is in inference mode (for_inference) but gradients are enabled; "
                          "its LoRA layers run the training path. Run it under torch.no_grad() / "
                          "torch.inference_mode(), or call sloth_core.for_training(model) to train",
                          SlothCoreWarning, stacklevel=4)
        return None
    return mode
