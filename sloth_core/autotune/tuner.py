"""The tuner: time every candidate config of a kernel for one tuning key and keep the fastest correct one.

For a bucket (see :mod:`sloth_core.autotune.space`) the tuner

1. builds the spec's random inputs (a fixed-seed generator of its own: the caller's RNG is untouched);
2. computes the expected outputs: the spec's ``reference``, else ``run`` under the heuristic config;
3. for each candidate (the heuristic's config first): runs it once with NaN-poisoned outputs and compares
   every output with the expected one (``sloth_core.tolerances``, dtype-aware) -- a candidate that raises
   (fails to compile, runs out of resources, is refused by its launcher) or differs is discarded, with the
   reason kept in its :class:`Trial`; the others are timed by the timer;
4. picks the fastest; the heuristic's config is kept unless a candidate beats it by more than ``min_gain``
   (timing noise does not churn the choice).

The timer is injectable: ``timer(fn, config) -> milliseconds``. :class:`CudaTimer` (the default) uses CUDA
events: warm-up, an L2 flush before every repetition, the median over repetitions.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

import torch

from .heuristics import override
from .space import Config, TuningSpec, describe_key, format_key, get_space

Timer = Callable[[Callable[[], Any], Config], float]

_ACTIVE = 0  # tunings in progress (a launch inside a tuning run never starts another tuning)


class TuningError(RuntimeError):
    """No candidate could be run and checked (the heuristic's config included)."""


def tuning_active() -> bool:
    return _ACTIVE > 0


@dataclass
class Trial:
    config: Config
    ms: float | None = None  # None: discarded
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.ms is not None


@dataclass
class TuneResult:
    kernel: str
    bucket: dict
    config: Config
    ms: float
    heuristic_config: Config
    heuristic_ms: float | None
    tuning_s: float
    trials: list[Trial] = field(default_factory=list)
    untried: int = 0  # candidates not started: the deadline had passed

    @property
    def key(self) -> str:
        return format_key(self.bucket)

    @property
    def speedup(self) -> float | None:
        return None if self.heuristic_ms is None else self.heuristic_ms / self.ms

    @property
    def discarded(self) -> list[Trial]:
        return [t for t in self.trials if not t.ok]

    def entry(self) -> dict:
        """The cache entry (plain JSON values only)."""
        return {"config": dict(self.config), "ms": float(self.ms),
                "heuristic_ms": None if self.heuristic_ms is None else float(self.heuristic_ms),
                "tuning_s": round(float(self.tuning_s), 3), "candidates": len(self.trials),
                "discarded": len(self.discarded), "tuned_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


# ---------------------------------------------------------------------------------------------- timing


class CudaTimer:
    """Median time of ``fn`` in milliseconds, with CUDA events.

    A few calls estimate the time; then ``warmup_ms`` worth of warm-up calls and ``rep_ms`` worth of timed
    repetitions (between ``min_reps`` and ``max_reps``), each preceded by an L2 flush (a write of twice the
    L2 size) so that no candidate profits from inputs left in cache by the previous repetition."""

    def __init__(self, rep_ms: float = 40.0, warmup_ms: float = 10.0, min_reps: int = 5, max_reps: int = 100,
                 flush_l2: bool = True):
        self.rep_ms, self.warmup_ms = rep_ms, warmup_ms
        self.min_reps, self.max_reps = min_reps, max_reps
        self.flush_l2 = flush_l2
        self._flush: dict[int, torch.Tensor] = {}

    def _flush_buffer(self) -> torch.Tensor | None:
        if not self.flush_l2:
            return None
        dev = torch.cuda.current_device()
        if dev not in self._flush:
            l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or (64 << 20)
            self._flush[dev] = torch.empty(2 * l2, dtype=torch.int8, device=f"cuda:{dev}")  # see scratch_bytes
        return self._flush[dev]

    def __call__(self, fn: Callable[[], Any], config: Config | None = None) -> float:
        flush = self._flush_buffer()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fn()
        torch.cuda.synchronize()
        start.record()
        for _ in range(3):
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate = max(start.elapsed_time(end) / 3, 1e-3)
        for _ in range(min(100, int(self.warmup_ms / estimate))):
            fn()
        reps = max(self.min_reps, min(self.max_reps, int(self.rep_ms / estimate)))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for s, e in events:
            if flush is not None:
                flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)


# ---------------------------------------------------------------------------------------------- tuning


def _flatten(outputs: Any) -> list:
    if outputs is None or isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, (tuple, list)):
        return [o for out in outputs for o in _flatten(out)]
    raise TypeError(f"run returned {type(outputs).__name__}; expected tensors")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _poisoned():
    """Fresh kernel outputs NaN-filled: an element a config forgets to write fails the comparison."""
    from sloth_core.kernels import _runtime

    previous = _runtime.poisoning()
    _runtime.set_poison(True)
    try:
        yield
    finally:
        _runtime.set_poison(previous)


def _run(spec: TuningSpec, inputs: Any, config: Config, device: torch.device) -> list:
    with override(spec.kernel, **config), _poisoned():
        outputs = _flatten(spec.run(inputs))
    _synchronize(device)
    return [None if o is None else o.detach() for o in outputs]


#: Elements compared at once (bounds the temporaries of a comparison on the GPU).
_COMPARE_CHUNK = 1 << 22


def scratch_bytes(device: torch.device) -> int:
    """Device memory the tuner itself allocates beside a spec's workspace: the temporaries of a comparison
    (at most 8 float32 / bool chunks) and :class:`CudaTimer`'s L2-flush buffer."""
    flush = 0
    if device.type == "cuda":
        flush = 2 * (getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20))
    return 8 * 4 * _COMPARE_CHUNK + flush


def compare_on_device(actual: torch.Tensor, expected: torch.Tensor, scale: float = 1.0) -> str | None:
    """:func:`sloth_core.tolerances.compare` (same rules, tolerance of ``actual.dtype``), computed where the
    tensors live, in float32, chunk by chunk: the tuner compares outputs of up to 2^27 elements per candidate,
    which a float64 copy on the host would make slow. None when they match, else the reason."""
    from sloth_core.tolerances import tolerance

    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    tol = tolerance(actual.dtype, scale)
    a_all, e_all = actual.detach().reshape(-1), expected.detach().reshape(-1)
    num = den = 0.0
    bad = 0
    norm_applies = False  # some expected value beyond atol (tolerances.compare)
    for start in range(0, a_all.numel(), _COMPARE_CHUNK):
        a = a_all[start:start + _COMPARE_CHUNK].float()
        e = e_all[start:start + _COMPARE_CHUNK].float()
        finite = torch.isfinite(e)
        if not bool(finite.all()):
            a_nf, e_nf = a[~finite], e[~finite]
            if not bool(((a_nf == e_nf) | (torch.isnan(a_nf) & torch.isnan(e_nf))).all()):
                return "NaN / inf positions differ from the expected output"
            a, e = a[finite], e[finite]
        if not bool(torch.isfinite(a).all()):
            return "NaN / inf where the expected output is finite"
        d = a - e
        num += float((d * d).sum())
        den += float((e * e).sum())
        bad += int((d.abs() > tol.atol + tol.rtol * e.abs()).sum())
        norm_applies = norm_applies or bool((e.abs() > tol.atol).any())
    rel = math.sqrt(num) / math.sqrt(den) if den > 0 else math.sqrt(num)
    if (norm_applies and rel > tol.rel_norm) or bad:
        return (f"relative error {rel:.3e} (bound {tol.rel_norm:.1e}); {bad} of {a_all.numel()} elements outside "
                f"atol={tol.atol:.1e}, rtol={tol.rtol:.1e}")
    return None


def _mismatch(spec: TuningSpec, actual: list, expected: list) -> str | None:
    if len(actual) != len(expected):
        return f"{len(actual)} outputs, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        if (a is None) != (e is None):
            return f"output {i}: {'missing' if a is None else 'unexpected'}"
        if a is None:
            continue
        why = compare_on_device(a, e, spec.tolerance_scale)
        if why is not None:
            return f"output {i}: {why}"
    return None


def _describe_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"


def _trial(spec: TuningSpec, inputs: Any, config: Config, expected: list, timer: Timer,
           device: torch.device) -> Trial:
    try:
        why = _mismatch(spec, _run(spec, inputs, config, device), expected)
    except Exception as exc:  # noqa: BLE001 - any failure discards the candidate
        return Trial(config, error=_describe_error(exc))
    if why is not None:
        return Trial(config, error=f"wrong result: {why}")
    try:
        with override(spec.kernel, **config):
            ms = float(timer(lambda: spec.run(inputs), config))
    except Exception as exc:  # noqa: BLE001
        return Trial(config, error=f"timing failed: {_describe_error(exc)}")
    if not ms > 0:
        return Trial(config, error=f"timer gave {ms} ms")
    return Trial(config, ms=ms)


def tune(kernel: str | TuningSpec, bucket: dict, *, device: torch.device | str | None = None,
         timer: Timer | None = None, candidates: Iterable[Config] | None = None, seed: int = 0,
         min_gain: float = 0.01, deadline: float | None = None) -> TuneResult:
    """Tune ``kernel`` for ``bucket``; raises :class:`TuningError` when nothing could be checked.

    ``candidates`` replaces the spec's own list (the heuristic's config is always tried first). ``deadline``
    (a ``time.perf_counter()`` value): no candidate is started after it, the heuristic's config excepted; the
    ones left untried are counted in :attr:`TuneResult.untried`."""
    global _ACTIVE
    spec = kernel if isinstance(kernel, TuningSpec) else get_space(kernel)
    if spec is None:
        raise KeyError(f"sloth_core.autotune: no tuning space registered for kernel {kernel!r}")
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    timer = timer or CudaTimer()
    started = time.perf_counter()
    _ACTIVE += 1
    try:
        # no autograd, no autocast: tuning may start inside a training step's forward
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            heuristic = spec.heuristic(bucket)
            pool = spec.candidates_for(bucket) if candidates is None else _checked(spec, [heuristic, *candidates])
            gen = torch.Generator(device=device).manual_seed(seed)
            inputs = spec.make_inputs(bucket, device, gen)
            expected = _expected(spec, inputs, heuristic, device)
            trials = []
            for cfg in pool:
                if trials and deadline is not None and time.perf_counter() >= deadline:
                    break
                trials.append(_trial(spec, inputs, cfg, expected, timer, device))
            del inputs, expected
    finally:
        _ACTIVE -= 1
    passed = [t for t in trials if t.ok]
    if not passed:
        reasons = "; ".join(f"{t.config}: {t.error}" for t in trials[:3])
        raise TuningError(f"{spec.kernel} ({describe_key(bucket)}): every candidate failed ({reasons})")
    heuristic_trial = next((t for t in trials if t.config == heuristic and t.ok), None)
    best = min(passed, key=lambda t: t.ms)
    if heuristic_trial is not None and best.ms > heuristic_trial.ms * (1.0 - min_gain):
        best = heuristic_trial
    return TuneResult(kernel=spec.kernel, bucket=dict(bucket), config=dict(best.config), ms=best.ms,
                      heuristic_config=heuristic, heuristic_ms=heuristic_trial.ms if heuristic_trial else None,
                      tuning_s=time.perf_counter() - started, trials=trials, untried=len(pool) - len(trials))


def _expected(spec: TuningSpec, inputs: Any, heuristic: Config, device: torch.device) -> list:
    try:
        if spec.reference is not None:
            outputs = _flatten(spec.reference(inputs))
            _synchronize(device)
            return [None if o is None else o.detach() for o in outputs]
        return _run(spec, inputs, heuristic, device)
    except Exception as exc:  # noqa: BLE001
        raise TuningError(f"{spec.kernel}: the reference run failed ({_describe_error(exc)})") from exc


def _checked(spec: TuningSpec, configs: Iterable[Config]) -> list[Config]:
    """Deduplicated; each within the spec's declared parameters."""
    out: list[Config] = []
    for cfg in configs:
        why = spec.outside_params(dict(cfg))
        if why is not None:
            raise ValueError(f"{spec.kernel}: candidate {cfg}: {why}")
        if dict(cfg) not in out:
            out.append(dict(cfg))
    return out
