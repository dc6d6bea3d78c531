"""Is a training step bound by the GPU or by the host (Python, launches)? (H200 diagnosis)

    python benchmarks/diag_cpu_bound.py none|nf4

Times steps of the optimized model (``gradient_checkpointing="offload"``) as they are, then with a GPU sleep of
about 100 ms queued at the start of each step. A GPU-bound step gets longer by the whole sleep; a step whose host
side is the slower one absorbs part of it (the host queues work while the GPU sleeps): the step time minus the
sleep, compared with the plain step time, bounds what the host side costs.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _diag_setup import optimized_model, timed_steps  # noqa: E402

quant = sys.argv[1]
model, opt, ids = optimized_model(quant)

start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
torch.cuda._sleep(200_000_000)
end.record()
torch.cuda.synchronize()
cycles_per_ms = 200_000_000 / start.elapsed_time(end)
sleep_cycles = int(100 * cycles_per_ms)


def steps(n, sleep):
    return timed_steps(model, opt, ids, n, (lambda: torch.cuda._sleep(sleep_cycles)) if sleep else None)


steps(3, False)  # warm-up
for sleep in (False, True, False, True):
    ts = steps(6, sleep)
    med = sorted(ts)[len(ts) // 2]
    print(f"{quant:4s} gpu sleep {100 if sleep else 0:3d} ms before the step: " + " ".join(f"{t:.0f}" for t in ts)
          + f"  median {med:.0f} ms" + (f"  (median - 100 = {med - 100:.0f})" if sleep else ""), flush=True)
