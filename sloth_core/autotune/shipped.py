"""Tuned configs shipped with sloth_core: ``sloth_core/autotune/shipped/*.json``, made by ``sloth-core tune`` on the
GPUs named in them at the benchmark shapes (the files are tuning caches, :mod:`sloth_core.autotune.cache`'s
format, read through it: validated, never executed).

:func:`lookup` serves an entry tuned on a GPU of the same name, preferring one tuned with the running Triton
version. A shipped config is used as a cached one is: only when it lies in its kernel's declared space and is one
of the bucket's candidates, and the user's own cache wins over it. So on those GPUs the first training step runs
tuned configs without tuning.
"""
from __future__ import annotations

import functools
from pathlib import Path

from .cache import TuningCache

SHIPPED_DIR = Path(__file__).with_name("shipped")


@functools.lru_cache(maxsize=None)
def _tables(directory: Path) -> tuple[dict, ...]:
    return tuple(TuningCache(path).read() for path in sorted(directory.glob("*.json")))


def lookup(gpu: str, triton: str, kernel: str, key: str, directory: Path | None = None) -> dict | None:
    """The shipped entry for ``kernel`` at ``key`` tuned on ``gpu``: the one tuned with Triton ``triton`` if any,
    else any version's; None when no shipped table (in ``directory``, default :data:`SHIPPED_DIR`) has it."""
    found = None
    for doc in _tables(directory or SHIPPED_DIR):
        for env in doc["environments"].values():
            if env["gpu"] != gpu:
                continue
            entry = env["kernels"].get(kernel, {}).get(key)
            if entry is not None and (found is None or env["triton"] == triton):
                found = entry
                if env["triton"] == triton:
                    return found
    return found
