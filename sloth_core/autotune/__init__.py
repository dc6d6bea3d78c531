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

import os
from typing import Any

from .heuristics import (_HEURISTICS, _OVERRIDES, _RESOLVED, heuristic_config, override,  # noqa: F401
                         register_heuristic, registered_kernels)
from .space import TuningSpec, get_space, register_space, registered_spaces

__all__ = ["register_heuristic", "config_for", "heuristic_config", "registered_kernels", "override",
           "register_space", "registered_spaces", "get_space", "TuningSpec", "set_tuning", "tuning_mode",
           "reset"]


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
