"""Why a QLoRA forward's host time varies from step to step (H200 diagnosis): each forward under ``torch.profiler``
(CUDA activity only: kernel times plus the CUDA runtime calls, no per-op records).

    python benchmarks/diag_forward_gaps.py nf4|none [steps]

Per step, from a synchronized device: the forward's host time (until the call returns) and wall time, then from
the profile: the compute stream's busy time (union of its kernels) and idle time, the GPU time by kernel group,
and the CUDA runtime calls that took the most host time (a host blocked in ``cudaLaunchKernel`` waits on a full
launch queue: the GPU is the bound; a host whose runtime calls are short while the stream idles is the bound
itself). The backward and the optimizer step run unprofiled.
"""
import collections
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _diag_setup import optimized_model  # noqa: E402
from profile_train_step import _group  # noqa: E402


def summarize(prof, host_ms: float, wall_ms: float) -> None:
    streams = collections.defaultdict(list)
    runtime = collections.defaultdict(lambda: [0, 0.0])
    groups = collections.Counter()
    for e in prof.profiler.kineto_results.events():
        dur = e.duration_ns() / 1e3
        if e.device_type().name == "CUDA":
            start = e.start_ns() / 1e3
            streams[e.device_resource_id()].append((start, start + dur))
            groups[_group(e.name())] += dur
        elif e.name().startswith("cu"):
            runtime[e.name()][0] += 1
            runtime[e.name()][1] += dur
    compute = max(streams.values(), key=lambda evs: len(evs))
    compute.sort()
    busy, end = 0.0, compute[0][0]
    for a, b in compute:
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    span = end - compute[0][0]
    print(f"  host {host_ms:6.1f}  wall {wall_ms:6.1f}  | compute stream: span {span / 1e3:6.1f} busy "
          f"{busy / 1e3:6.1f} idle {(span - busy) / 1e3:5.1f} ms | "
          + " ".join(f"{g} {us / 1e3:.1f}" for g, us in groups.most_common()))
    top = sorted(runtime.items(), key=lambda kv: -kv[1][1])[:5]
    print("      runtime: " + ", ".join(f"{n} {c}x {us / 1e3:.1f} ms" for n, (c, us) in top), flush=True)


def main() -> None:
    quant = sys.argv[1] if len(sys.argv) > 1 else "nf4"
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    model, opt, ids = optimized_model(quant)
    for _ in range(2):  # warm: compile, pools
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    print(f"{quant}: profiled forwards (ms)")
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = model(input_ids=ids, labels=ids)
            host = (time.perf_counter() - t) * 1e3
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t) * 1e3
        summarize(prof, host, wall)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out = None
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
