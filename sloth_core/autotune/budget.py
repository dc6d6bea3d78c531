"""What tuning on first use may spend: device memory under the process's peak, and seconds.

* **Memory.** Tuning a key allocates inputs and outputs of its own: ``spec.workspace(bucket)`` bytes, declared
  beside the kernel's ``make_inputs``. It starts only when they fit under the peak this process has already reached
  on the device (``max_memory_allocated - memory_allocated``), so tuning never raises the peak a training step
  reaches anyway. A key that does not fit is *deferred*: the heuristic's config serves that launch, and the key is
  asked again at its later launches (typically the next step's, when the last step's activations are gone). After
  :data:`MAX_DEFERRALS` it keeps the heuristic for the rest of the process, with one notice naming the key and the
  bytes (``sloth-core tune`` tunes it ahead, in a process of its own).
* **Time.** At most ``$SLOTH_CORE_TUNE_BUDGET_S`` seconds (default 60) of tuning per process; a key's tuning stops
  timing candidates when the budget runs out (the best one timed so far wins, the heuristic's config is timed
  first). One notice on stderr when tuning first starts, one when the budget is spent; later keys keep their
  heuristic config.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

BUDGET_ENV_VAR = "SLOTH_CORE_TUNE_BUDGET_S"
DEFAULT_BUDGET_S = 60.0
MAX_DEFERRALS = 200

TUNE, DEFER, SKIP = "tune", "defer", "skip"


def device_headroom(device) -> int:
    """Bytes that can be allocated on ``device`` without raising this process's peak of allocated memory."""
    import torch

    return max(0, torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device))


def budget_seconds() -> float:
    """``$SLOTH_CORE_TUNE_BUDGET_S`` (a non-negative number), else :data:`DEFAULT_BUDGET_S`."""
    text = os.environ.get(BUDGET_ENV_VAR, "").strip()
    if not text:
        return DEFAULT_BUDGET_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0.0:
        raise ValueError(f"sloth_core: {BUDGET_ENV_VAR}={text!r} is not a number of seconds >= 0")
    return value


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclass
class TuningBudget:
    """The tuning this process has spent, and the keys it deferred. One per process (held by
    :mod:`sloth_core.autotune.runtime`, forgotten with its cache)."""

    seconds: float
    spent: float = 0.0
    deferred: dict[str, int] = field(default_factory=dict)
    _noticed: set[str] = field(default_factory=set)

    def left(self) -> float:
        return max(0.0, self.seconds - self.spent)

    def decide(self, what: str, need: int | None, headroom: int) -> str:
        """:data:`TUNE` now, :data:`DEFER` (heuristic for this launch, ask again later) or :data:`SKIP` (heuristic
        for the process). ``what`` names the key; ``need`` is its workspace in bytes (None: unknown, never tuned
        on first use)."""
        if self.left() <= 0.0:
            self._notice("spent", f"sloth_core: the tuning budget ({self.seconds:g} s, ${BUDGET_ENV_VAR}) is "
                                  f"spent; launch shapes not tuned yet keep their heuristic configs (pre-tune them "
                                  f"with `sloth-core tune`)")
            return SKIP
        if need is None:
            self._notice(what, f"sloth_core: {what}: no declared tuning workspace; keeping the heuristic config")
            return SKIP
        if need > headroom:
            count = self.deferred.get(what, 0) + 1
            self.deferred[what] = count
            if count >= MAX_DEFERRALS:
                self._notice(what, f"sloth_core: not tuning {what}: it needs {_gib(need)} and at most "
                                   f"{_gib(headroom)} was free under this process's peak in {count} launches; "
                                   f"keeping the heuristic config (`sloth-core tune` tunes it ahead)")
                return SKIP
            return DEFER
        self._notice("start", f"sloth_core: tuning kernels for this GPU on first use (at most {self.seconds:g} s "
                              f"in this process, ${BUDGET_ENV_VAR}; SLOTH_CORE_AUTOTUNE=0 turns it off, "
                              f"`sloth-core tune` does it ahead)")
        return TUNE

    def deadline(self) -> float:
        """``time.perf_counter()`` value at which a tuning started now must stop timing candidates."""
        return time.perf_counter() + self.left()

    def charge(self, seconds: float) -> None:
        self.spent += max(0.0, seconds)

    def _notice(self, key: str, message: str) -> None:
        if key not in self._noticed:
            self._noticed.add(key)
            print(message, file=sys.stderr, flush=True)
