"""The layers sloth_core offers under the names transformers gives its hub-kernel layers.

``kernels.kernelize`` binds a layer's ``forward`` onto every module whose class carries that name, whatever the
class computes; the names are shared by many model families. So each forward first checks that the module's own
code is the code sloth_core's kernel was verified against (the same bytecode, names and constants as
transformers' Llama function; where it is not -- a future class under the same name that computes something else
-- the module's own forward runs, with a :class:`~sloth_core.warning.SlothCoreWarning` naming it).

* ``RMSNorm``: ``LlamaRMSNorm.forward`` (Llama casting: float32 statistics, cast back before the weight) over
  ``weight`` and ``variance_epsilon`` -> :func:`sloth_core.kernels.rms_norm.rms_norm`.
* ``RotaryPosEmb`` for the ``rotary_pos_emb`` function slot: Llama's ``apply_rotary_pos_emb`` and ``rotate_half``
  -> :func:`sloth_core.kernels.rope.apply_rope` where it handles the inputs, the module's function otherwise.

The classes hold nothing but ``forward`` and the two flags ``kernels`` reads (``_validate_layer`` refuses any other
member): they have a backward; they are not claimed for ``torch.compile`` (a ``TORCH_COMPILE`` mode keeps the
module's own forward).
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from sloth_core.kernels.rms_norm import rms_norm
from sloth_core.kernels.rope import apply_rope, rope_supported
from sloth_core.warning import SlothCoreWarning


def _code_key(fn) -> tuple | None:
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    return code.co_code, code.co_names, code.co_consts, code.co_varnames, code.co_argcount


def _same_code(fn, reference) -> bool:
    key = _code_key(fn)
    return key is not None and key == _code_key(reference)


def slot_function(func_module: type) -> object:
    """The plain function a ``kernels`` function-module class stands for (the ``func`` its ``forward`` closes
    over), or ``None``."""
    fwd = getattr(func_module, "forward", None)
    code, cells = getattr(fwd, "__code__", None), getattr(fwd, "__closure__", None)
    if code is None or cells is None or "func" not in code.co_freevars:
        return None
    return cells[code.co_freevars.index("func")].cell_contents


def _plain(fn):
    """``fn``, or the function it stands for when the hub-kernel layer turned it into a function module."""
    return slot_function(type(fn)) if isinstance(fn, nn.Module) else fn


@functools.cache
def is_llama_rms_norm(cls: type) -> bool:
    """Whether ``cls.forward`` is transformers' ``LlamaRMSNorm.forward`` (the same code)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return _same_code(getattr(cls, "forward", None), LlamaRMSNorm.forward)


@functools.cache
def is_llama_rope(fn) -> bool:
    """Whether ``fn`` is transformers' Llama ``apply_rotary_pos_emb`` and the ``rotate_half`` it calls is
    Llama's (the same code)."""
    from transformers.models.llama import modeling_llama

    reference = _plain(modeling_llama.apply_rotary_pos_emb)
    if reference is None or not _same_code(fn, reference):
        return False
    return _same_code(fn.__globals__.get("rotate_half"), modeling_llama.rotate_half)


def _own_forward(what: str, layer: str) -> None:
    warnings.warn(f"sloth_core hub layer {layer}: {what} is not the code sloth_core's kernel was verified against "
                  f"(transformers' Llama {layer}); it runs its own forward", SlothCoreWarning, stacklevel=3)


class RMSNorm(nn.Module):
    has_backward = True
    can_torch_compile = False

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        cls = type(self)
        eps, weight = getattr(self, "variance_epsilon", None), getattr(self, "weight", None)
        if (is_llama_rms_norm(cls) and isinstance(eps, float) and isinstance(weight, torch.Tensor)
                and weight.dim() == 1):
            return rms_norm(hidden_states, weight, eps, 0.0, "llama")
        _own_forward(f"{cls.__qualname__}.forward", "RMSNorm")
        return cls.forward(self, hidden_states)


class RotaryPosEmb(nn.Module):
    has_backward = True
    can_torch_compile = False

    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        fn = slot_function(type(self))
        if fn is None or not is_llama_rope(fn):
            _own_forward(f"the function behind {type(self).__qualname__} ({getattr(fn, '__module__', '?')})",
                         "apply_rotary_pos_emb")
            return type(self).forward(self, q, k, cos, sin, unsqueeze_dim)
        if rope_supported(q, k, cos, sin, unsqueeze_dim) is not None:
            return fn(q, k, cos, sin, unsqueeze_dim)
        return apply_rope(q, k, cos, sin, unsqueeze_dim)
