"""What the host waits on in a training step: CUDA runtime calls that block (synchronizations, cudaMalloc /
cudaFree, pinned-memory allocations) and the host ops with the most own time (H200 diagnosis).

    python benchmarks/diag_host_syncs.py none|nf4

One optimized step of the model of ``benchmarks/_diag_setup.py`` under ``torch.profiler`` (CPU and CUDA
activities, Python stacks), after 3 warm steps. Prints per CUDA runtime call its count and host time, then for
the blocking ones the Python frames (sloth_core / transformers / peft / torch.utils.checkpoint) they came from.
"""
import collections
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _diag_setup import optimized_model, timed_steps  # noqa: E402

BLOCKING = ("Synchronize", "cudaMalloc", "cudaFree", "cudaHostAlloc", "cudaHostRegister", "cudaStreamWaitEvent")
FRAME_HINTS = ("sloth_core", "transformers", "peft", "checkpoint", "bitsandbytes")


def _frames(event) -> list[str]:
    """Python frames of the op that issued ``event`` (the runtime call itself carries none: walk up)."""
    e = event
    while e is not None and not getattr(e, "stack", None):
        e = e.cpu_parent
    if e is None:
        return []
    return [f for f in e.stack if any(h in f for h in FRAME_HINTS)][:4]


quant = sys.argv[1]
model, opt, ids = optimized_model(quant)
print(f"{quant}: warm steps (ms):", " ".join(f"{t:.0f}" for t in timed_steps(model, opt, ids, 3)))
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
    ts = timed_steps(model, opt, ids, 1)
print(f"{quant}: profiled step {ts[0]:.0f} ms")
runtime = collections.defaultdict(lambda: [0, 0.0])
blocking_sites = collections.defaultdict(lambda: [0, 0.0])
for e in prof.events():
    if e.device_type.name != "CPU" or not e.name.startswith("cuda"):
        continue
    runtime[e.name][0] += 1
    runtime[e.name][1] += e.cpu_time_total
    if any(b in e.name for b in BLOCKING) or e.name == "cudaMemcpy":  # cudaMemcpy: the synchronous copy
        site = " < ".join(_frames(e)) or "(no Python frame)"
        blocking_sites[(e.name, site)][0] += 1
        blocking_sites[(e.name, site)][1] += e.cpu_time_total
print("\nCUDA runtime calls (host time, ms):")
for name, (n, us) in sorted(runtime.items(), key=lambda kv: -kv[1][1])[:20]:
    print(f"  {us / 1e3:9.2f} ms {n:6d}x  {name}")
print("\nblocking / allocating runtime calls by Python site:")
for (name, site), (n, us) in sorted(blocking_sites.items(), key=lambda kv: -kv[1][1])[:25]:
    print(f"  {us / 1e3:9.2f} ms {n:5d}x  {name}  {site[:220]}")
print("\nhost ops by own time:")
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
