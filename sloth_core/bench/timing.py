"""Timing one kernel call: CUDA events, rotating input sets, median of the timed repetitions; peak extra memory;
the device's ceilings.

A call is timed on several *input sets* (:class:`InputSet`: the arguments, and for ``fwd_bwd`` the random
``grad_output`` of each output), enough of them that together they exceed twice the L2 cache
(:func:`sets_needed`: at least :data:`ROTATE_BYTES` = 128 MiB, and at least 2 sets); repetition ``i`` uses set
``i % n``, so no repetition finds its inputs in L2 from the one before. Inputs are random, never zeros.

* ``fwd``: ``fn(*args)`` under ``torch.no_grad()``.
* ``fwd_bwd``: ``out = fn(*args)``, then ``torch.autograd.backward(out, grads)`` with the set's fixed random
  ``grad_output``. The gradients accumulate into the leaves (inputs that require grad, trainable parameters);
  before every repetition, untimed, they are set to ``None``, so every repetition writes fresh gradients.

:func:`time_call` runs ``warmup`` untimed repetitions, estimates one call from them, then times
``min(reps, max(min_reps, budget_ms / estimate))`` repetitions (big cases get fewer) and reports their median.

The clock is a :class:`Timer`: :class:`CudaTimer` records a CUDA event pair around every repetition
(device time; the events are read after one synchronization at the end) and measures memory;
:class:`PerfCounterTimer` (CPU, tests) uses ``time.perf_counter`` and measures no memory.

Peak extra memory (:meth:`CudaTimer.peak_extra_gib`): ``reset_peak_memory_stats``, baseline
``memory_allocated``, one call, ``max_memory_allocated - baseline``, in GiB. It counts what the call allocates
(outputs, gradients, temporaries), not the inputs.

Ceilings (:func:`measure_ceilings`), measured at the start of a run:

* ``hbm_gbps``: a device-to-device ``copy_`` of a 1 GiB tensor; GB/s counts the bytes read plus the bytes
  written (2 GiB a copy);
* ``bf16_tflops``: an 8192 x 8192 x 8192 bf16 matmul, ``2 * 8192^3`` FLOP a call.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch

GIB = 1024 ** 3
#: Bytes the input sets of one case add up to at least (> 2x the 50 MiB L2 of an H100/H200).
ROTATE_BYTES = 128 * 1024 * 1024
MIN_SETS = 2
MAX_SETS = 16
#: Timed work per measurement the repetition count aims at; big cases get fewer repetitions (>= min_reps).
BUDGET_MS = 250.0
MIN_REPS = 5

Step = Callable[[int], Any]


# ---------------------------------------------------------------------------------------------- clocks


class Timer(Protocol):
    """A clock for :func:`time_call`."""

    def time_ms(self, step: Step, reps: int, before: Step | None = None) -> list[float]:
        """Milliseconds of each ``step(i)``, ``i`` in ``range(reps)``; ``before(i)`` runs first, untimed."""

    def peak_extra_gib(self, call: Callable[[], Any]) -> float | None:
        """GiB allocated at the peak of ``call()`` beyond what was allocated before it (None: not measured)."""


class PerfCounterTimer:
    """Wall-clock time with ``time.perf_counter`` (CPU); no memory statistics."""

    def time_ms(self, step: Step, reps: int, before: Step | None = None) -> list[float]:
        times = []
        for i in range(reps):
            if before is not None:
                before(i)
            start = time.perf_counter()
            step(i)
            times.append((time.perf_counter() - start) * 1e3)
        return times

    def peak_extra_gib(self, call: Callable[[], Any]) -> float | None:
        call()
        return None


class CudaTimer:
    """Device time between CUDA events recorded around every repetition; CUDA memory statistics."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device if device is not None else "cuda")

    def time_ms(self, step: Step, reps: int, before: Step | None = None) -> list[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        torch.cuda.synchronize(self.device)
        for i in range(reps):
            if before is not None:
                before(i)
            starts[i].record()
            step(i)
            ends[i].record()
        torch.cuda.synchronize(self.device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]

    def peak_extra_gib(self, call: Callable[[], Any]) -> float | None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        out = call()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del out
        return peak / GIB


def default_timer(device: torch.device | str) -> Timer:
    """:class:`CudaTimer` on a CUDA device, :class:`PerfCounterTimer` elsewhere."""
    device = torch.device(device)
    return CudaTimer(device) if device.type == "cuda" else PerfCounterTimer()


def free_memory(device: torch.device | str | None = None) -> None:
    """Collect garbage and return cached CUDA blocks (a no-op for the CPU)."""
    gc.collect()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- input sets


@dataclass
class InputSet:
    """One set of arguments of the timed call; ``grads``: the ``grad_output`` of each output (``fwd_bwd``)."""

    args: tuple
    grads: tuple | None = None

    def leaves(self) -> list[torch.Tensor]:
        """The arguments that require grad (their ``.grad`` is reset before each repetition)."""
        return [a for a in self.args if isinstance(a, torch.Tensor) and a.requires_grad]

    def nbytes(self) -> int:
        tensors = [a for a in (*self.args, *(self.grads or ())) if isinstance(a, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)


def sets_needed(set_bytes: int, rotate_bytes: int = ROTATE_BYTES, min_sets: int = MIN_SETS,
                max_sets: int = MAX_SETS) -> int:
    """How many input sets of ``set_bytes`` each make at least ``rotate_bytes`` (within ``[min_sets,
    max_sets]``)."""
    return max(min_sets, min(max_sets, math.ceil(rotate_bytes / max(1, set_bytes))))


def as_tuple(out: Any) -> tuple:
    """A call's outputs as a tuple of tensors."""
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def reset_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def run_once(fn: Callable, inputs: InputSet, mode: str) -> tuple:
    """One call as timed: ``fwd`` under ``no_grad``; ``fwd_bwd`` forward then backward with ``inputs.grads``.
    Returns the (forward) outputs."""
    if mode == "fwd":
        with torch.no_grad():
            return as_tuple(fn(*inputs.args))
    out = as_tuple(fn(*inputs.args))
    torch.autograd.backward(out, inputs.grads)
    return out


@dataclass
class Timing:
    median_ms: float
    reps: int
    times_ms: list[float] = field(default_factory=list)


def reps_for(estimate_ms: float, max_reps: int, min_reps: int = MIN_REPS, budget_ms: float = BUDGET_MS) -> int:
    """Repetitions to time: about ``budget_ms`` of work, at least ``min_reps`` and at most ``max_reps``."""
    if estimate_ms <= 0:
        return max_reps
    return max(min(min_reps, max_reps), min(max_reps, int(budget_ms / estimate_ms)))


def time_call(fn: Callable, sets: Sequence[InputSet], mode: str, timer: Timer, *, warmup: int = 2,
              reps: int = 20, params: Sequence[torch.Tensor] = (), budget_ms: float = BUDGET_MS) -> Timing:
    """The median time of ``fn`` over rotating input ``sets`` (see the module docstring). ``params``: trainable
    parameters whose ``.grad`` is reset before each repetition, like the inputs'."""
    n = len(sets)

    def step(i: int) -> None:
        run_once(fn, sets[i % n], mode)

    def before(i: int) -> None:
        reset_grads([*sets[i % n].leaves(), *params])

    warm = timer.time_ms(step, max(1, warmup), before)
    count = reps_for(min(warm), reps, budget_ms=budget_ms)
    times = timer.time_ms(step, count, before)
    reset_grads([*(leaf for s in sets for leaf in s.leaves()), *params])
    return Timing(statistics.median(times), count, times)


def peak_extra_gib(fn: Callable, inputs: InputSet, mode: str, timer: Timer,
                   params: Sequence[torch.Tensor] = ()) -> float | None:
    """Peak extra memory of one call on ``inputs`` (gradients reset before and after)."""
    reset_grads([*inputs.leaves(), *params])
    try:
        return timer.peak_extra_gib(lambda: run_once(fn, inputs, mode))
    finally:
        reset_grads([*inputs.leaves(), *params])


# ---------------------------------------------------------------------------------------------- ceilings


def measure_ceilings(device: torch.device | str, timer: Timer | None = None, *, copy_bytes: int = GIB,
                     matmul_n: int = 8192, reps: int = 20) -> dict[str, Any]:
    """``{"hbm_gbps", "bf16_tflops"}`` of ``device``: a ``copy_bytes`` device-to-device copy (read + write bytes)
    and a bf16 ``matmul_n``-cubed matmul (see the module docstring)."""
    device = torch.device(device)
    timer = timer or default_timer(device)
    gbps = 2 * copy_bytes / _copy_ms(device, timer, copy_bytes, reps) / 1e6
    free_memory(device)
    tflops = 2 * matmul_n ** 3 / _matmul_ms(device, timer, matmul_n, reps) / 1e9
    free_memory(device)
    return {"hbm_gbps": float(f"{gbps:.4g}"), "bf16_tflops": float(f"{tflops:.4g}"),
            "method": f"device-to-device copy of {copy_bytes / GIB:g} GiB (read + write bytes); "
                      f"bf16 matmul {matmul_n}^3"}


def _copy_ms(device: torch.device, timer: Timer, nbytes: int, reps: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return _median_of(timer, lambda i: dst.copy_(src), reps)


def _matmul_ms(device: torch.device, timer: Timer, n: int, reps: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return _median_of(timer, lambda i: torch.mm(a, b), reps)


def _median_of(timer: Timer, step: Step, reps: int) -> float:
    timer.time_ms(step, 3)
    return statistics.median(timer.time_ms(step, reps))
