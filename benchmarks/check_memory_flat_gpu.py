#!/usr/bin/env python
"""Issue 20, item 6 (GPU part): is allocated memory flat over a long run of the 8B QLoRA setup?

Llama-3-8B-shaped random model (sloth_core.bench.train.build), NF4 double-quant, LoRA r=16 on all seven
projections, ``optimize(gradient_checkpointing="offload")``, AdamW, batch 4 x 2048. After every step (optimizer
stepped, grads set to None, synchronized) it records ``torch.cuda.memory_allocated()`` and the step's peak. Prints
the allocated memory at steps 1, 10, 50, ... and the growth from the end of step 10 (the optimizer state exists by
then; step 1 in a run of 20 steps or fewer) to the last step; writes every figure as JSON with ``--out``, as it goes.

    python benchmarks/check_memory_flat_gpu.py --steps 200 --out benchmarks/results/memory_flat_h100.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _left_behind() -> str:
    """What offloading left alive after a step (none expected: each layer run's stash and host copies go with
    it) and the host buffers the pool has allocated so far (flat once the first step has filled it)."""
    import gc
    import warnings

    from sloth_core.memory.host import HostCopy
    from sloth_core.memory.stash import LayerStash
    from sloth_core.memory.stats import STATS

    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch's deprecated module proxies among gc's objects warns
        warnings.simplefilter("ignore")
        alive = sum(isinstance(o, (HostCopy, LayerStash)) for o in gc.get_objects())
    return f"stashes + host copies alive {alive}, host buffers allocated {STATS.host_allocations}"


def _reference_step(n: int) -> int:
    """The step whose allocated memory the growth is measured from: the 10th in a long run (the optimizer state
    exists by then), the 1st in a short one."""
    return 9 if n > 20 else 0


def summary(allocated, peaks) -> None:
    """The growth line (the JSON is written by the loop at its last step)."""
    ref = _reference_step(len(allocated))
    growth = allocated[-1] - allocated[ref]
    spread = max(allocated[ref:]) - min(allocated[ref:])
    print(f"{torch.cuda.get_device_name()}: allocated after step {ref + 1} {allocated[ref] / 2**30:.4f} GiB, after "
          f"step {len(allocated)} {allocated[-1] / 2**30:.4f} GiB: growth {growth / 2**20:.2f} MiB, spread "
          f"{spread / 2**20:.2f} MiB; step peak {min(peaks[ref:]) / 2**30:.3f}-{max(peaks[ref:]) / 2**30:.3f} GiB")


def write(args, allocated, peaks, times, losses) -> None:
    versions = {m: __import__(m).__version__ for m in ("torch", "triton", "transformers", "peft", "bitsandbytes")}
    ref = _reference_step(len(allocated))
    args.out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "versions": versions,
                                    "settings": vars(args) | {"out": str(args.out)},
                                    "allocated_bytes": allocated, "step_peak_bytes": peaks,
                                    "step_s": times, "losses": losses, "reference_step": ref + 1,
                                    "growth_bytes_after_reference_step": allocated[-1] - allocated[ref]}, indent=1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-3-8b")
    p.add_argument("--quant", default="nf4", choices=("nf4", "none"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    import sloth_core
    from sloth_core.bench.train_models import add_lora, build

    model = add_lora(build(args.preset, quant=args.quant))
    sloth_core.optimize(model, gradient_checkpointing="offload")
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    allocated, peaks, times, losses = [], [], [], []
    for step in range(args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen).cuda()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
        del loss, ids
        allocated.append(torch.cuda.memory_allocated())
        peaks.append(torch.cuda.max_memory_allocated())
        if step + 1 in (1, 2, 10, 50, 100, 150) or step + 1 == args.steps:
            print(f"step {step + 1:4d}: allocated {allocated[-1] / 2**30:.4f} GiB, step peak "
                  f"{peaks[-1] / 2**30:.3f} GiB, {times[-1] * 1e3:.0f} ms, loss {losses[-1]:.4f}; {_left_behind()}",
                  flush=True)
            if args.out is not None:  # as it goes: a run cut short by a timeout leaves its figures
                write(args, allocated, peaks, times, losses)
    summary(allocated, peaks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
