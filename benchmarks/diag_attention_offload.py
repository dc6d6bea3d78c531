"""Step times of the offloading path with its experimental switches, one process, one model (H200 diagnosis).

    python benchmarks/diag_attention_offload.py none|nf4

Variants: ``checkpointing.OFFLOAD_ATTENTION``, ``checkpointing._PREFETCH_FROM_SIDE_POOL``, Python's gc on/off;
7 steps each (ms) and the peak memory. Output: benchmarks/results/attention_offload_diag_h200_20261129.txt.
"""
import gc
import sys
import time
import torch
from peft import LoraConfig, get_peft_model
import sloth_core
from sloth_core import checkpointing as ck
from sloth_core.bench.train import TARGETS, build

quant = sys.argv[1]
model = build("llama-3-8b", None, quant)
model.train()
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"))
sloth_core.optimize(model, gradient_checkpointing="offload")
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(0, model.config.vocab_size, (4, 2048), generator=torch.Generator().manual_seed(1)).cuda()


def steps(n):
    ts = []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e3)
    return ts, torch.cuda.max_memory_allocated() / 2**30


for offload, side_pool, gcon in ((True, False, True), (True, False, False), (True, True, True), (True, True, False),
                                 (False, False, True), (False, True, True)):
    ck.OFFLOAD_ATTENTION = offload
    ck._PREFETCH_FROM_SIDE_POOL = side_pool
    (gc.enable if gcon else gc.disable)()
    ts, peak = steps(7)
    gc.enable()
    print(f"{quant:4s} attn_offload={int(offload)} side_pool={int(side_pool)} gc={int(gcon)}: "
          + " ".join(f"{t:.0f}" for t in ts) + f"  median(last5) {sorted(ts[2:])[2]:.0f} ms  peak {peak:.2f} GiB", flush=True)
