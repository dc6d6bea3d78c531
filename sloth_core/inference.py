"""``for_inference(model)`` / ``for_training(model)``: switch an optimized model's LoRA layers between the training
path (autograd functions, checkpointing) and the inference path (no autograd, a fused 4-bit dequantize-GEMV for
decoding steps).

    sloth_core.optimize(model)
    sloth_core.for_inference(model)        # model.eval(); generate / forward under no_grad take the inference path
    model.generate(...)
    sloth_core.for_training(model)         # back to the training path and the model's previous train() flag

The mode lives on the model and on its bound LoRA modules (:mod:`sloth_core.inference_mode`: what it does per
call, why gradients-on calls take the training path, how each setting is verified on first use). Nothing else
changes: the norms, RoPE and the loss keep their bindings (under ``no_grad`` their autograd functions save nothing),
and checkpointing never runs without gradients.
"""
from __future__ import annotations

from torch import nn

from . import api, binding
from .inference_mode import MODE_ATTR, InferenceMode

_PATTERNS = ("lora_linear", "lora_mlp")  # the bindings that have an inference path


def _modules(base: nn.Module):
    return [m for m in base.modules() if any(binding.is_bound(m, p) for p in _PATTERNS)]


def for_inference(model: nn.Module) -> nn.Module:
    """Put the optimized ``model`` (in place; returned) in inference mode and ``eval()``. A second call keeps the
    mode (and what it verified). Raises ``ValueError`` when ``optimize`` did not run on it."""
    if not api.is_optimized(model):
        raise ValueError("for_inference: the model is not optimized; call sloth_core.optimize(model) first")
    base = api.unwrap(model)
    mode = base.__dict__.get(MODE_ATTR)
    if mode is None:
        mode = InferenceMode(was_training=model.training)
        base.__dict__[MODE_ATTR] = mode
    for module in _modules(base):
        module.__dict__[MODE_ATTR] = mode
    model.eval()
    return model


def for_training(model: nn.Module) -> nn.Module:
    """Take ``model`` (in place; returned) out of inference mode: its LoRA layers run the training path again and
    its ``train()`` flag is what it was before :func:`for_inference`. A model not in inference mode is unchanged."""
    base = api.unwrap(model)
    mode = base.__dict__.pop(MODE_ATTR, None)
    for module in base.modules():
        module.__dict__.pop(MODE_ATTR, None)
    if mode is not None:
        model.train(mode.was_training)
    return model


def in_inference_mode(model: nn.Module) -> bool:
    return MODE_ATTR in api.unwrap(model).__dict__
