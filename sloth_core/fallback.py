"""A bound replacement that finds its module changed since it was verified (a trainer cast the adapters, ``.to()``
moved them) runs the module's own forward instead, and says so: a warning naming the pattern and the change, a
note on the module that ``report()`` shows (status ``fallback``), and the next ``optimize(model)`` verifies the
new setting and binds again (:mod:`sloth_core.rewriter`).

A passing state the replacement does not serve (PEFT adapters disabled for a reference forward, two adapters
active) is noted the same way but not ``lasting``: the replacement :func:`resume` s when the state is gone, and its
note goes with it, so the report says what runs now."""
from __future__ import annotations

import warnings

from torch import nn

from .warning import SlothCoreWarning

FALLBACK_ATTR = "_sloth_core_fallbacks"


def fall_back(module: nn.Module, pattern: str, reason: str, lasting: bool = True) -> None:
    """Note that ``pattern``'s replacement on ``module`` runs the original because of ``reason`` (once per module
    and pattern; the warning shows once per pattern and reason). ``lasting``: until ``optimize`` verifies again;
    else while the state lasts (:func:`resume` ends it)."""
    notes = module.__dict__.setdefault(FALLBACK_ATTR, {})
    if pattern in notes:
        return
    notes[pattern] = reason
    until = ("until sloth_core.optimize(model) is called again to verify the new setting" if lasting else
             "while that lasts")
    warnings.warn(f"sloth_core: {pattern} on a {type(module).__name__}: {reason}; its original forward runs {until}",
                  SlothCoreWarning, stacklevel=3)


def resume(module: nn.Module, pattern: str) -> None:
    """``pattern``'s replacement on ``module`` runs again: drop its note (one dict lookup when there is none)."""
    if FALLBACK_ATTR in module.__dict__:
        clear(module, pattern)


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
