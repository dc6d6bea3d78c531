"""Step-to-step variation of the offloading path, one process, one model (H200 diagnosis).

    python benchmarks/diag_offload_jitter.py nf4|none [steps]

Variants, one after the other on the same model: the checkpointing modes keeping the attention / q/k/v outputs or not,
Python's gc off, ``memory.host.PREFETCH_FROM_SIDE_POOL`` off. Per step: wall time (ms), the host's time to
enqueue the step (until ``zero_grad`` returns, before the closing synchronize), and what the step allocated:
``cudaMalloc`` / ``cudaFree`` calls of the caching allocator, pinned host buffers (pool misses), gc collections.
"""
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _diag_setup import optimized_model  # noqa: E402

from sloth_core import checkpointing as ck  # noqa: E402
from sloth_core.memory import host

quant = sys.argv[1] if len(sys.argv) > 1 else "nf4"
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 8
model, opt, ids = optimized_model(quant)


def counters() -> tuple:
    m = torch.cuda.memory_stats()
    return (m.get("num_device_alloc", 0), m.get("num_device_free", 0), ck.STATS.host_allocations,
            sum(s["collections"] for s in gc.get_stats()))


VARIANTS = [  # (name, attention output kept, q/k/v outputs kept, gc on, side pool)
    ("attention+qkv", True, True, True, True),
    ("attention+qkv gc_off", True, True, False, True),
    ("attention+qkv no_side_pool", True, True, True, False),
    ("attention", True, False, True, True),
    ("qkv", False, True, True, True),
    ("none", False, False, True, True),
    ("attention+qkv again", True, True, True, True),
]
for name, attention, qkv, gc_on, side_pool in VARIANTS:
    ck.enable_checkpointing(model, next(m for m, keeps in ck.OFFLOAD_MODES.items() if keeps == (attention, qkv)))
    host.PREFETCH_FROM_SIDE_POOL = side_pool
    (gc.enable if gc_on else gc.disable)()
    torch.cuda.reset_peak_memory_stats()
    rows = []
    for _ in range(steps):
        torch.cuda.synchronize()
        before = counters()
        t = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        host = time.perf_counter() - t
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
        del out
        rows.append((wall * 1e3, host * 1e3, *(a - b for a, b in zip(counters(), before))))
    gc.enable()
    walls = sorted(r[0] for r in rows[2:])
    print(f"{quant} {name}: median(after 2) {walls[len(walls) // 2]:.0f} ms, peak "
          f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)
    print("   wall   host  cudaMalloc cudaFree pinned_allocs gc")
    for r in rows:
        print(f"  {r[0]:5.0f}  {r[1]:5.0f}  {r[2]:10d} {r[3]:8d} {r[4]:13d} {r[5]:3d}")
