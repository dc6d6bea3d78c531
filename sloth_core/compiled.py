"""Models handed to ``optimize`` under ``torch.compile``: left as they are, with the reason.

``torch.compile(model)`` (an ``OptimizedModule`` around the model) and ``model.forward = torch.compile(model.forward)``
(or any module's) trace the forwards below them into graphs of their own when first called. ``optimize`` verifies
each module eagerly, on the forward it has; a model already under ``torch.compile`` would be verified through
Dynamo's wrappers, which is not established, so ``optimize`` binds nothing in such a model and says why. The
supported order is ``sloth_core.optimize(model)`` first, then ``torch.compile(model)``: Dynamo then traces the bound
forwards, in which the kernels are custom ops (``torch.ops.sloth_core.*``, see
:mod:`sloth_core.kernels.rms_norm_launch` and its siblings) and the LoRA patterns step aside for PEFT's forwards
(:mod:`sloth_core.registry.patterns.lora`).
"""
from __future__ import annotations

from torch import nn

_DYNAMO_WRAPPED = "_torchdynamo_orig_callable"  # set by torch.compile on the function it returns


def _is_optimized_module(module: nn.Module) -> bool:
    return type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module)


def compiled_reason(model: nn.Module) -> str | None:
    """Why ``model`` is under ``torch.compile`` (the first compiled module or forward found, by path), or
    ``None``."""
    for path, module in model.named_modules():
        where = path or "the model"
        if _is_optimized_module(module):
            return f"{where} is a torch.compile OptimizedModule around {type(module._orig_mod).__name__}"
        for attr in ("forward", "_old_forward"):
            fn = module.__dict__.get(attr)
            if fn is not None and hasattr(fn, _DYNAMO_WRAPPED):
                return f"{where}.{attr} was replaced by torch.compile's wrapper"
    return None
