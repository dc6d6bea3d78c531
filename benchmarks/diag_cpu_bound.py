"""Is a training step bound by the GPU or by the host (Python, launches)? (H200 diagnosis)

    python benchmarks/diag_cpu_bound.py none|nf4

Times steps of the optimized model (``gradient_checkpointing="offload"``) as they are, then with a GPU sleep of
about 100 ms queued at the start of each step. A GPU-bound step gets longer by the whole sleep; a step whose host
side is the slower one absorbs part of it (the host queues work while the GPU sleeps): the step time minus the
sleep, compared with the plain step time, bounds what the host side costs.
"""
import sys
import time

import torch
from peft import LoraConfig, get_peft_model

import sloth_core
from sloth_core.bench.train import TARGETS, build

quant = sys.argv[1]
model = build("llama-3-8b", None, quant)
model.train()
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                         task_type="CAUSAL_LM"))
sloth_core.optimize(model, gradient_checkpointing="offload")
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(0, model.config.vocab_size, (4, 2048), generator=torch.Generator().manual_seed(1)).cuda()

start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
torch.cuda._sleep(200_000_000)
end.record()
torch.cuda.synchronize()
cycles_per_ms = 200_000_000 / start.elapsed_time(end)
sleep_cycles = int(100 * cycles_per_ms)


def steps(n, sleep):
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        if sleep:
            torch.cuda._sleep(sleep_cycles)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return times


steps(3, False)  # warm-up
for sleep in (False, True, False, True):
    ts = steps(6, sleep)
    med = sorted(ts)[len(ts) // 2]
    print(f"{quant:4s} gpu sleep {100 if sleep else 0:3d} ms before the step: " + " ".join(f"{t:.0f}" for t in ts)
          + f"  median {med:.0f} ms" + (f"  (median - 100 = {med - 100:.0f})" if sleep else ""), flush=True)
