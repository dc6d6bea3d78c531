"""How :func:`sloth_core.autotune.config_for` reaches tuned configs.

Imported on the first resolution of a launch key outside Triton's interpreter; each key is resolved once per
process (``config_for`` memoizes the answer), so nothing here is on the hot path.
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Any

from .budget import DEFAULT_BUDGET_S, DEFER, SKIP, TuningBudget, budget_seconds, device_headroom
from . import shipped
from .cache import Environment, TuningCache, TuningCacheWarning, cache_path
from .space import describe_key, format_key, get_space

MODE_ENV_VAR = "SLOTH_CORE_AUTOTUNE"
MODES = ("on", "cache", "off")
# How long a process waits for another process of the host (another rank) that is tuning the same key, before it
# uses the heuristic for that key (tuning one key takes seconds).
TUNE_WAIT_S = 120.0

_mode: str | None = None  # set_mode(); None: from the environment variable
_cache: TuningCache | None = None
_timer = None  # a timer for tuning on first use (tests inject a fake one); None: CudaTimer
_budget: TuningBudget | None = None  # what tuning on first use has spent in this process
_warned: set[str] = set()


# ---------------------------------------------------------------------------------------------- mode


def _parse_mode(value: Any) -> str:
    if value is True:
        return "on"
    if value is False:
        return "off"
    text = str(value).strip().lower()
    if text in ("", "1", "on", "true", "yes"):
        return "on"
    if text in ("0", "off", "false", "no"):
        return "off"
    if text in ("cache", "cached", "cache-only"):
        return "cache"
    raise ValueError(f"sloth_core: tuning mode {value!r} is not one of on / cache / off (or 1 / 0)")


def set_mode(value: bool | str | None) -> None:
    """``None``: back to ``$SLOTH_CORE_AUTOTUNE``."""
    global _mode
    _mode = None if value is None else _parse_mode(value)


def mode() -> str:
    if _mode is not None:
        return _mode
    try:
        return _parse_mode(os.environ.get(MODE_ENV_VAR, "on"))
    except ValueError as exc:
        _warn_once(str(exc) + "; tuning stays on")
        return "on"


# ---------------------------------------------------------------------------------------------- plumbing


def default_cache() -> TuningCache:
    """The cache at :func:`~sloth_core.autotune.cache.cache_path` (follows ``$SLOTH_CORE_CACHE_DIR``)."""
    global _cache
    path = cache_path()
    if _cache is None or _cache.path != path:
        _cache = TuningCache(path)
    return _cache


def forget_cache() -> None:
    """Forget the in-memory cache and the tuning budget spent so far."""
    global _cache, _budget
    _cache = None
    _budget = None


def budget() -> TuningBudget:
    """This process's tuning budget (``$SLOTH_CORE_TUNE_BUDGET_S`` read on first use)."""
    global _budget
    if _budget is None:
        try:
            seconds = budget_seconds()
        except ValueError as exc:
            _warn_once(f"{exc}; using {DEFAULT_BUDGET_S:g} s")
            seconds = DEFAULT_BUDGET_S
        _budget = TuningBudget(seconds)
    return _budget


def set_timer(timer) -> None:
    """The timer used when tuning on first use (``None``: :class:`~sloth_core.autotune.tuner.CudaTimer`)."""
    global _timer
    _timer = timer


def cuda_ready() -> bool:
    import torch

    return torch.cuda.is_available()


def tuning_device():
    import torch

    return torch.device("cuda", torch.cuda.current_device())


def headroom() -> int:
    """Bytes tuning may allocate on the tuning device without raising the process's peak."""
    return device_headroom(tuning_device())


def current_environment() -> Environment:
    """GPU name (current device), Triton version, sloth_core version."""
    import torch
    import triton

    from ..version import __version__

    return Environment(torch.cuda.get_device_name(torch.cuda.current_device()), str(triton.__version__),
                       str(__version__))


def _busy() -> bool:
    """True inside a CUDA graph capture or a torch.compile trace: no timing there."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, TuningCacheWarning, stacklevel=4)


# ---------------------------------------------------------------------------------------------- resolving


def resolve(kernel: str, key: dict, heuristic: dict) -> tuple[dict, bool]:
    """``(config, final)``: the config for a launch outside the interpreter, and whether it may be memoized
    (not while another tuning runs, nor inside a capture / trace, nor while the key's tuning is deferred for
    memory: a later call may still tune)."""
    from .tuner import scratch_bytes, tuning_active

    current = mode()
    spec = get_space(kernel)
    if current == "off" or spec is None or not cuda_ready():
        return heuristic, True
    bucket = spec.bucket(key)
    key_str = format_key(bucket)
    env = current_environment()
    cache = default_cache()
    for entry, source in ((cache.lookup(env.key, kernel, key_str), cache.path),
                          (shipped.lookup(env.gpu, env.triton, kernel, key_str), shipped.SHIPPED_DIR)):
        if entry is None:
            continue
        why = spec.accepts(entry["config"], bucket)
        if why is None:
            return {**heuristic, **entry["config"]}, True
        _warn_once(f"sloth_core: ignoring the cached {kernel} config for ({describe_key(bucket)}) in "
                   f"{source}: {why}")
    if tuning_active() or _busy():
        return heuristic, False
    if current != "on" or not spec.should_tune(bucket):
        return heuristic, True
    need = None if spec.workspace is None else int(spec.workspace(bucket)) + scratch_bytes(tuning_device())
    decision = budget().decide(f"{kernel} ({describe_key(bucket)})", need, headroom())
    if decision == DEFER:
        return heuristic, False
    if decision == SKIP:
        return heuristic, True
    tuned = _tune_now(kernel, bucket, env, cache)
    return ({**heuristic, **tuned} if tuned is not None else heuristic), True


def _tune_now(kernel: str, bucket: dict, env: Environment, cache: TuningCache) -> dict | None:
    """Tune one bucket now, unless another process of the host is tuning it: then wait for its winner (up to
    ``TUNE_WAIT_S``). None when tuning failed or the wait timed out (the heuristic serves)."""
    key_str = format_key(bucket)
    with cache.tuning_slot(env.key, kernel, key_str, TUNE_WAIT_S) as held:
        if not held:
            _warn_once(f"sloth_core: another process has been tuning {kernel} for ({describe_key(bucket)}) for "
                       f"over {TUNE_WAIT_S:.0f} s; this process uses the heuristic for it")
            return None
        cache.read()  # the winner of a process that tuned this key while we waited
        entry = cache.lookup(env.key, kernel, key_str)
        if entry is not None and get_space(kernel).accepts(entry["config"], bucket) is None:
            return entry["config"]
        return _tune_and_store(kernel, bucket, env, cache)


def _tune_and_store(kernel: str, bucket: dict, env: Environment, cache: TuningCache) -> dict | None:
    """Tune one bucket now within the budget (one line on stderr); store the winner unless the budget cut the
    tuning short; None when tuning failed."""
    from .tuner import tune

    spent, started = budget(), time.perf_counter()
    print(f"sloth_core: tuning {kernel} for ({describe_key(bucket)}) ...", end="", file=sys.stderr, flush=True)
    try:
        result = tune(kernel, bucket, device=tuning_device(), timer=_timer, deadline=spent.deadline())
    except Exception as exc:  # noqa: BLE001 - a failed tuning falls back to the heuristic, never breaks a run
        print(f" failed ({type(exc).__name__}: {exc}); using the heuristic", file=sys.stderr, flush=True)
        return None
    finally:
        spent.charge(time.perf_counter() - started)
    gain = f", x{result.speedup:.2f} vs heuristic" if result.speedup is not None else ""
    cut = f"; {result.untried} candidates untried (budget spent), not cached" if result.untried else ""
    print(f" {result.ms:.4g} ms{gain} ({result.tuning_s:.1f} s{cut})", file=sys.stderr, flush=True)
    if result.untried:
        return result.config
    try:
        cache.store(env, kernel, format_key(bucket), result.entry())
    except OSError as exc:
        _warn_once(f"sloth_core: cannot write the tuning cache {cache.path} ({exc}); tuned configs are kept "
                   f"for this process only")
    return result.config
