"""Where the time and the memory of an optimized LoRA training step go (diagnosis, H200).

One model (random weights, real shapes), PEFT LoRA on all linear layers, ``sloth_core.optimize`` with our
checkpointing; then, in one process:

1. variants, each a few warm steps (median step time, peak GiB): checkpointing on/offload, the recompute's MLP
   down projection skipped or not, and every SDPA backend that runs these shapes;
2. ``torch.profiler`` of one step of the default variant: GPU time by kernel, grouped (GEMM, attention, Triton,
   copies, elementwise, other);
3. a CUDA memory snapshot of one step: what is alive at the peak, by allocation site.

    python benchmarks/profile_train_step.py [--quant nf4] [--layers 32] [--batch 4 --seq 2048] [--opt-in lora_qkv]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _step(model, ids, opt):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.detach()


def timed(model, ids, opt, steps: int, context=None):
    import contextlib

    times = []
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        t = time.perf_counter()
        with (context() if context else contextlib.nullcontext()):
            loss = _step(model, ids, opt)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    warm = sorted(times[2:])
    return {"step_s": warm[len(warm) // 2], "peak_GiB": torch.cuda.max_memory_allocated() / 2**30,
            "loss": loss.item()}


def variants(model, ids, opt, steps, backends=()):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import sloth_core
    from sloth_core import checkpointing

    rows = []
    tokens = ids.numel()
    states = [layer.__dict__[checkpointing.STATE_ATTR] for _, layer in checkpointing._decoder_layers(model)]
    declared = [s.mlp_output_unused for s in states]
    for mode in ("offload", "on"):
        sloth_core.optimize(model, gradient_checkpointing=mode)
        for skip in (True, False):
            for s, d in zip(states, declared):
                s.mlp_output_unused = d and skip
            r = timed(model, ids, opt, steps)
            rows.append({"mode": mode, "skip_mlp_output": skip, "sdpa": "default", **r,
                         "tokens_per_s": tokens / r["step_s"]})
            print(rows[-1], flush=True)
    for s, d in zip(states, declared):
        s.mlp_output_unused = d
    sloth_core.optimize(model, gradient_checkpointing="offload")
    for name in backends:
        backend = getattr(SDPBackend, name)
        try:
            r = timed(model, ids, opt, steps, context=lambda: sdpa_kernel([backend]))
        except Exception as exc:  # a backend that cannot run these shapes
            print(f"sdpa {name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            continue
        rows.append({"mode": "offload", "skip_mlp_output": True, "sdpa": name, **r,
                     "tokens_per_s": tokens / r["step_s"]})
        print(rows[-1], flush=True)
    return rows


_GROUPS = (("attention", ("flash", "fmha", "attention", "cudnn", "sdpa")),
           ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas")),
           ("copy", ("memcpy", "memset", "copy_")),
           ("triton", ("_kernel",)),
           ("elementwise", ("elementwise", "vectorized", "reduce")))


def _group(name: str) -> str:
    low = name.lower()
    for group, keys in _GROUPS:
        if any(k in low for k in keys):
            return group
    return "other"


def profile(model, ids, opt):
    from torch.profiler import ProfilerActivity, profile as prof_ctx

    with prof_ctx(activities=[ProfilerActivity.CUDA]) as prof:
        _step(model, ids, opt)
        torch.cuda.synchronize()
    kernels = collections.Counter()
    counts = collections.Counter()
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        us = e.device_time if hasattr(e, "device_time") else e.cuda_time
        kernels[e.name] += us
        counts[e.name] += 1
    total = sum(kernels.values())
    groups = collections.Counter()
    for name, us in kernels.items():
        groups[_group(name)] += us
    print(f"\nGPU time in one step: {total / 1e3:.1f} ms")
    for g, us in groups.most_common():
        print(f"  {g:12s} {us / 1e3:8.1f} ms  {100 * us / total:5.1f}%")
    print("top kernels:")
    for name, us in kernels.most_common(30):
        print(f"  {us / 1e3:8.2f} ms {counts[name]:5d}x  {name[:110]}")
    return {"total_ms": total / 1e3, "groups_ms": {g: us / 1e3 for g, us in groups.items()},
            "top": [(n[:200], us / 1e3, counts[n]) for n, us in kernels.most_common(40)]}


def _site(frames) -> str:
    keep = [f for f in frames if any(k in f["filename"] for k in ("sloth_core", "transformers", "peft", "checkpoint",
                                                                   "optim", "bitsandbytes"))]
    keep = keep or frames
    return " < ".join(f"{os.path.basename(f['filename'])}:{f['line']}:{f['name']}" for f in keep[:3])


def memory_peak(model, ids, opt):
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python", max_entries=2_000_000)
    try:  # without early stop: the recompute's stop exception and the recorder's Python stacks do not mix
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            _step(model, ids, opt)
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    trace = snap["device_traces"][torch.cuda.current_device()]
    live, cur, peak, peak_live, peak_at = {}, start, start, {}, 0
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], _site(ev.get("frames", [])))
            cur += ev["size"]
            if cur > peak:
                peak, peak_live, peak_at = cur, dict(live), i
        elif ev["action"] == "free_requested" and ev["addr"] in live:
            cur -= live.pop(ev["addr"])[0]
    by_site = collections.Counter()
    for size, site in peak_live.values():
        by_site[site] += size
    print(f"\nmemory: {start / 2**30:.2f} GiB allocated before the step; peak {peak / 2**30:.2f} GiB at event "
          f"{peak_at}/{len(trace)}; alive at the peak from this step: {sum(by_site.values()) / 2**30:.2f} GiB")
    for site, size in by_site.most_common(25):
        print(f"  {size / 2**20:9.1f} MiB  {site[:150]}")
    return {"start_GiB": start / 2**30, "peak_GiB": peak / 2**30,
            "alive_at_peak": [(s, b / 2**20) for s, b in by_site.most_common(40)]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--quant", choices=("none", "nf4"), default="none")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--skip-variants", action="store_true")
    ap.add_argument("--sdpa", nargs="*", default=[], help="also time these SDPBackend names (FLASH_ATTENTION, ...)")
    ap.add_argument("--opt-in", nargs="*", default=[], help="opt-in patterns to apply too (lora_qkv)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_train_step: needs a CUDA GPU", file=sys.stderr)
        return 2
    from peft import LoraConfig, get_peft_model

    import sloth_core
    from sloth_core.bench.train import TARGETS, build
    from sloth_core.bench.env import environment

    model = build(args.preset, args.layers, args.quant)
    model.train()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    sloth_core.optimize(model, gradient_checkpointing="offload", opt_in=args.opt_in)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    ids = ids.cuda()
    result = {"env": environment(), "args": vars(args)}
    phases = [("variants", lambda: [] if args.skip_variants else variants(model, ids, opt, args.steps, args.sdpa)),
              ("warm", lambda: timed(model, ids, opt, 3)),
              ("profile", lambda: profile(model, ids, opt)),
              ("memory", lambda: memory_peak(model, ids, opt))]
    for name, phase in phases:
        try:
            result[name] = phase()
        except Exception:  # keep the other phases' figures
            import traceback

            traceback.print_exc()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
