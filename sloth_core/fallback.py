"""A bound replacement that finds its module changed since it was verified (a trainer cast the adapters, ``.to()``
moved them) runs the module's own forward instead, and says so: a warning naming the pattern and the change, a
note on the module that ``report()`` shows (status ``fallback``), and the next ``optimize(model)`` verifies the
new setting and binds again (:mod:`sloth_core.rewriter`)."""
from __future__ import annotations

import warnings

from torch import nn

from .warning import SlothCoreWarning

FALLBACK_ATTR = "_sloth_core_fallbacks"


def fall_back(module: nn.Module, pattern: str, reason: str) -> None:
    """Note that ``pattern``'s replacement on ``module`` runs the original because of ``reason`` (once per module
    and pattern; the warning shows once per pattern and reason)."""
    notes = module.__dict__.setdefault(FALLBACK_ATTR, {})
    if pattern in notes:
        return
    notes[pattern] = reason
    warnings.warn(f"sloth_core: {pattern} on a {type(module).__name__}: {reason}; its original forward runs until "
                  f"sloth_core.optimize(model) is called again to verify the new setting", SlothCoreWarning,
                  stacklevel=3)


def fallback_reason(module: nn.Module, pattern: str) -> str | None:
    """Why ``pattern``'s replacement on ``module`` runs the original (``None``: it does not)."""
    return module.__dict__.get(FALLBACK_ATTR, {}).get(pattern)


def clear(module: nn.Module, pattern: str) -> None:
    notes = module.__dict__.get(FALLBACK_ATTR)
    if notes is not None:
        notes.pop(pattern, None)
        if not notes:
            del module.__dict__[FALLBACK_ATTR]


def clear_all(root: nn.Module) -> None:
    for module in root.modules():
        module.__dict__.pop(FALLBACK_ATTR, None)
