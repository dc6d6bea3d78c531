"""The heuristics kernels register, the overrides in force and the configs resolved so far: the process's launch
configuration state, in one leaf module (the tuner, the tuning spaces and :func:`sloth_core.autotune.config_for`
read it; it imports none of them)."""
from __future__ import annotations

import contextlib
from typing import Any, Callable

_HEURISTICS: dict[str, Callable[..., dict[str, Any]]] = {}
#: Overrides in force (``override``); consulted before anything else.
_OVERRIDES: dict[str, Callable[..., dict[str, Any]]] = {}
#: (kernel, *key items) -> resolved config: the hot path after a key's first call.
_RESOLVED: dict[tuple, dict[str, Any]] = {}


def register_heuristic(kernel: str):
    """Decorator: ``fn(**key) -> dict`` of launch parameters for ``kernel``."""

    def deco(fn):
        _HEURISTICS[kernel] = fn
        _RESOLVED.clear()
        return fn

    return deco


def heuristic_config(kernel: str, **key: Any) -> dict[str, Any]:
    """The registered heuristic's answer for ``key`` (ignoring overrides and tuned configs)."""
    try:
        fn = _HEURISTICS[kernel]
    except KeyError:
        raise KeyError(f"sloth_core.autotune: no heuristic registered for kernel {kernel!r}") from None
    return dict(fn(**key))


def registered_kernels() -> list[str]:
    return sorted(_HEURISTICS)


@contextlib.contextmanager
def override(kernel: str, heuristic: Callable[..., dict[str, Any]] | None = None, **params: Any):
    """Within the block, ``config_for(kernel, ...)`` answers ``heuristic(**key)`` (default: the override
    already in force, else the registered heuristic) updated with ``params``; e.g. a tiny block size so tests
    exercise the multi-block path cheaply. Tuned configs are not consulted inside the block."""
    if kernel not in _HEURISTICS:
        raise KeyError(f"sloth_core.autotune: no heuristic registered for kernel {kernel!r}")
    previous = _OVERRIDES.get(kernel)
    base = heuristic or previous or _HEURISTICS[kernel]
    _OVERRIDES[kernel] = lambda **key: {**base(**key), **params}
    try:
        yield
    finally:
        if previous is None:
            _OVERRIDES.pop(kernel, None)
        else:
            _OVERRIDES[kernel] = previous
