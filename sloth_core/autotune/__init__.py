"""Kernel launch configurations: a heuristic per kernel, and a persistent per-GPU tuner on top of it.

Each kernel family registers, next to its kernel,

* a heuristic with :func:`register_heuristic` (``fn(**key) -> dict`` of launch parameters), and
* optionally its tuning space with :func:`register_space` (the parameters and candidates worth timing, the
  shape bucket of a launch key, and how to build inputs and run the kernel for the tuner; see
  :mod:`sloth_core.autotune.space`).

Launchers ask :func:`config_for` for their parameters. Resolution, in order:

1. an :func:`override` in force (tests, benchmarks) answers;
2. under ``TRITON_INTERPRET`` the heuristic answers (nothing is read, timed or written);
3. otherwise, once per distinct key in a process (then a dict lookup): a tuned winner for the key's bucket
   on this GPU from the JSON cache (:mod:`sloth_core.autotune.cache`); failing that, when tuning on first use
   is on (the default on a CUDA machine), the bucket is tuned now (one line on stderr says so), stored and
   used; failing that, the heuristic.

``SLOTH_CORE_AUTOTUNE`` (or :func:`set_tuning`) picks the mode: ``1``/``on`` (default: cached winners, tune
on first use), ``cache`` (cached winners only, never tune in-process), ``0``/``off`` (heuristics only, for
bit-reproducible launches). ``sloth-core tune`` pre-tunes the kernels a model uses.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

from .space import TuningSpec, get_space, register_space, registered_spaces

_HEURISTICS: dict[str, Callable[..., dict[str, Any]]] = {}
#: Overrides in force (``override``); consulted before anything else.
_OVERRIDES: dict[str, Callable[..., dict[str, Any]]] = {}
#: (kernel, *key items) -> resolved config: the hot path after a key's first call.
_RESOLVED: dict[tuple, dict[str, Any]] = {}

__all__ = ["register_heuristic", "config_for", "heuristic_config", "registered_kernels", "override",
           "register_space", "registered_spaces", "get_space", "TuningSpec", "set_tuning", "tuning_mode",
           "reset"]


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


def config_for(kernel: str, **key: Any) -> dict[str, Any]:
    """Launch parameters for ``kernel`` at ``key`` (shape, dtype, ...); see the module docstring."""
    forced = _OVERRIDES.get(kernel)
    if forced is not None:
        return dict(forced(**key))
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return heuristic_config(kernel, **key)
    memo = (kernel, *key.items())
    cfg = _RESOLVED.get(memo)
    if cfg is None:
        from . import runtime

        cfg, final = runtime.resolve(kernel, key, heuristic_config(kernel, **key))
        if final:
            _RESOLVED[memo] = cfg
    return dict(cfg)


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


def set_tuning(mode: bool | str) -> None:
    """Tuning mode for this process: ``True``/``"on"`` (cached winners, tune on first use), ``"cache"``
    (cached winners only), ``False``/``"off"`` (heuristics only). Overrides ``SLOTH_CORE_AUTOTUNE``."""
    from . import runtime

    runtime.set_mode(mode)
    _RESOLVED.clear()


def tuning_mode() -> str:
    """``"on"``, ``"cache"`` or ``"off"`` (see :func:`set_tuning`)."""
    from . import runtime

    return runtime.mode()


def reset() -> None:
    """Forget the configs resolved so far and the in-memory copy of the cache (the file is untouched)."""
    _RESOLVED.clear()
    from . import runtime

    runtime.forget_cache()
