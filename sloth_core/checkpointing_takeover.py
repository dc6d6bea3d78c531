"""Hugging Face's activation checkpointing, switched on for an optimized model, is served by sloth_core's.

Trainers switch HF's checkpointing on by default (TRL's ``SFTConfig``; ``TrainingArguments(gradient_checkpointing=
True)``) after the user's ``optimize`` line, and HF's checkpoint then wraps the layers instead of ours (no offload,
no recompute shortcuts). ``optimize`` therefore binds, on the transformers model instance, a wrapper around its
``_set_gradient_checkpointing`` -- the method transformers 5.17's ``gradient_checkpointing_enable`` and 5.2x's
``activation_checkpointing_enable`` / ``gradient_checkpointing_enable`` / ``..._disable`` all end in:

* HF's method runs as before (its flags, its checkpoint function, ``every_n_layers``);
* on ``enable=True`` sloth_core's checkpointing then takes every decoder layer, in the mode ``optimize`` was given
  (``"offload"`` when it was given none), which sets HF's layer flags back to a falsy marker: no double checkpoint;
* on ``enable=False`` ours is turned off again where it was on only on HF's behalf (``optimize`` was given no mode);
* ``optimize(..., gradient_checkpointing="off")`` leaves HF's checkpointing to HF.

When HF's checkpointing is switched on, what ``optimize`` would bind now that was not there when it ran -- the LoRA
layers TRL's ``SFTTrainer(peft_config=...)`` adds after the user's ``optimize`` line -- is bound too
(``bind_new``, which ``optimize`` hands over: :func:`sloth_core.api.bind_new`): trainers switch it on after wrapping
the model.

``optimize(model)`` on a model whose HF checkpointing is already on (``optimize(trainer.model)`` after the trainer
turned it on) takes it over at once. The binding is per instance and recorded (:mod:`sloth_core.binding`), so
``restore`` undoes it; the report's checkpointing rows say which checkpointing runs and on whose behalf.
"""
from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable

from torch import nn

from . import binding
from .checkpointing import checkpointed_layers, decoder_layers, disable_checkpointing, enable_checkpointing
from .checkpointing_wrapper import HF_FLAG

PATTERN = "checkpointing_takeover"
KERNEL = "torch.utils.checkpoint"
TARGET = "_set_gradient_checkpointing"  # where every HF enable / disable of checkpointing ends, 5.17 to 5.2x
STATE_ATTR = "_sloth_core_checkpointing_takeover"
DEFAULT_MODE = "offload"


@dataclasses.dataclass
class TakeoverState:
    mode: str | None            # the mode optimize was given: "on" / "offload", "off" (never take HF's), None: none
    mlp_output_unused: Callable | None = None       # the architecture's LayerFacts methods (declared ones)
    attention_output_unused: Callable | None = None
    serving_hf: bool = False    # ours runs because HF's checkpointing was switched on
    bind_new: Callable[[nn.Module], None] | None = None  # binds what optimize would bind now (optimize's options)

    def mode_for_hf(self) -> str | None:
        """The mode ours serves HF's checkpointing in; ``None``: it does not (``optimize(...="off")``)."""
        return None if self.mode == "off" else self.mode or DEFAULT_MODE


def install(model: nn.Module, mode: str | None, mlp_output_unused=None, attention_output_unused=None,
            bind_new: Callable[[nn.Module], None] | None = None) -> bool:
    """Bind the takeover on ``model`` (a transformers model), or update its state; whether HF's checkpointing was
    on already and ours took it over now. ``bind_new(model)`` runs each time HF's checkpointing is switched on."""
    if not callable(getattr(type(model), TARGET, None)):
        return False
    state = model.__dict__.get(STATE_ATTR)
    if not isinstance(state, TakeoverState):
        state = TakeoverState(mode)
        binding.install_attr(model, STATE_ATTR, state, PATTERN, KERNEL)
        binding.install_attr(model, TARGET, types.MethodType(_set_gradient_checkpointing, model), PATTERN, KERNEL)
    if mode is not None:
        state.mode = mode
    state.mlp_output_unused, state.attention_output_unused = mlp_output_unused, attention_output_unused
    state.bind_new = bind_new
    if state.mode is None and _hf_flags_on(model):
        _take(model, state)
        return True
    return False


def serving_hf(model: nn.Module) -> bool:
    """Whether sloth_core's checkpointing runs on ``model`` because HF's was switched on."""
    state = model.__dict__.get(STATE_ATTR)
    return isinstance(state, TakeoverState) and state.serving_hf


def _hf_flags_on(model: nn.Module) -> bool:
    return any(getattr(layer, HF_FLAG, False) is True for _, layer in decoder_layers(model))


def _take(model: nn.Module, state: TakeoverState) -> None:
    mode = state.mode_for_hf()
    if mode is not None:
        enable_checkpointing(model, mode, state.mlp_output_unused, state.attention_output_unused)
        state.serving_hf = True


def _hf_method(model: nn.Module) -> Callable:
    for rec in binding.records(model):
        if rec.pattern == PATTERN and rec.attr == TARGET and rec.previous is not binding.MISSING:
            return rec.previous
    return types.MethodType(getattr(type(model), TARGET), model)


def _set_gradient_checkpointing(self: nn.Module, enable: bool = True, *args: Any, **kwargs: Any) -> Any:
    out = _hf_method(self)(enable, *args, **kwargs)
    state = self.__dict__.get(STATE_ATTR)
    if not isinstance(state, TakeoverState):
        return out
    if enable:
        _take(self, state)
        if state.bind_new is not None:
            state.bind_new(self)  # trainers switch checkpointing on after adding their PEFT adapters
    elif state.serving_hf:
        state.serving_hf = False
        if state.mode is None and checkpointed_layers(self):
            disable_checkpointing(self)
    return out
