"""Kernel launch configurations.

Each kernel family registers a heuristic next to its kernel with :func:`register_heuristic`; kernels ask
:func:`config_for` for their launch parameters. The heuristic is the only source for now (and stays the one
used under ``TRITON_INTERPRET``, where nothing is benchmarked); a persistent per-GPU tuner plugs in here later
without touching the kernels.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

_HEURISTICS: dict[str, Callable[..., dict[str, Any]]] = {}


def register_heuristic(kernel: str):
    """Decorator: ``fn(**key) -> dict`` of launch parameters for ``kernel``."""

    def deco(fn):
        _HEURISTICS[kernel] = fn
        return fn

    return deco


def config_for(kernel: str, **key: Any) -> dict[str, Any]:
    """Launch parameters for ``kernel`` at ``key`` (shape bucket, dtype, ...)."""
    try:
        fn = _HEURISTICS[kernel]
    except KeyError:
        raise KeyError(f"sloth_core.autotune: no heuristic registered for kernel {kernel!r}") from None
    return dict(fn(**key))


def registered_kernels() -> list[str]:
    return sorted(_HEURISTICS)


@contextlib.contextmanager
def override(kernel: str, heuristic: Callable[..., dict[str, Any]] | None = None, **params: Any):
    """Within the block, ``config_for(kernel, ...)`` answers ``heuristic(**key)`` (default: the registered one)
    updated with ``params``; e.g. a tiny block size so tests exercise the multi-block path cheaply."""
    registered = _HEURISTICS[kernel]
    base = heuristic or registered
    _HEURISTICS[kernel] = lambda **key: {**base(**key), **params}
    try:
        yield
    finally:
        _HEURISTICS[kernel] = registered
