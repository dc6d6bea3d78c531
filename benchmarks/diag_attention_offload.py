"""Step times of the offloading path with its experimental switches, one process, one model (H200 diagnosis).

    python benchmarks/diag_attention_offload.py none|nf4

Variants: the mode (``"offload"``, or ``"offload-qkv"``: the attention recomputed),
``memory.host.PREFETCH_FROM_SIDE_POOL``, Python's gc on/off; 7 steps each (ms) and the peak memory. Output:
benchmarks/results/attention_offload_diag_h200_20261129.txt.
"""
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _diag_setup import optimized_model, timed_steps  # noqa: E402

from sloth_core import checkpointing as ck  # noqa: E402
from sloth_core.memory import host

quant = sys.argv[1]
model, opt, ids = optimized_model(quant)
for offload, side_pool, gcon in ((True, False, True), (True, False, False), (True, True, True), (True, True, False),
                                 (False, False, True), (False, True, True)):
    ck.enable_checkpointing(model, "offload" if offload else "offload-qkv")
    host.PREFETCH_FROM_SIDE_POOL = side_pool
    (gc.enable if gcon else gc.disable)()
    torch.cuda.reset_peak_memory_stats()
    ts = timed_steps(model, opt, ids, 7)
    peak = torch.cuda.max_memory_allocated() / 2**30
    gc.enable()
    print(f"{quant:4s} attn_offload={int(offload)} side_pool={int(side_pool)} gc={int(gcon)}: "
          + " ".join(f"{t:.0f}" for t in ts) + f"  median(last5) {sorted(ts[2:])[2]:.0f} ms  peak {peak:.2f} GiB",
          flush=True)
