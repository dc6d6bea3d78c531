"""Models handed to ``optimize`` under ``torch.compile``: left as they are, with the reason.

``torch.compile(model)`` (an ``OptimizedModule`` around the model) and ``model.forward = torch.compile(model.forward)``
(or any module's) trace the forwards below them into graphs of their own when first called. A kernel bound by
``optimize`` would then run as Dynamo traces it (Triton kernels inside autograd functions, our host copies and
stream switches, the guards' per-call checks), not as it was verified eagerly; none of that is established.
So ``optimize`` binds nothing in such a model and says why; ``sloth_core.optimize(model)`` on the model before it
is compiled, and no ``torch.compile`` after it, is the supported order (the kernels are Triton already).
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
