#!/usr/bin/env python
"""What used to fall back to PEFT, now on the fused LoRA path: ``lora_dropout > 0`` on a bf16 base, and an LLM.int8
base (bitsandbytes ``Linear8bitLt``, ``threshold=6`` as ``load_in_8bit`` sets it), one CUDA GPU.

Llama-3-8B shapes with a few decoder layers (random weights), LoRA r=16 on the seven projections, batch x sequence
tokens, AdamW on the adapters. Per setup: HF + PEFT (HF's non-reentrant checkpointing) against the same model after
``sloth_core.optimize(model, gradient_checkpointing="offload")``; tokens/s from the median of the warm steps (the
first two are warm-up), peak memory (``max_memory_allocated``) over the run, the report's LoRA rows by status, and
the loss of the first step on both (same seed: the same dropout masks).

    python benchmarks/bench_lora_fallbacks.py --layers 4 --out benchmarks/results/lora_fallbacks_h100.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 1024 ** 3
SETUPS = ("lora_dropout_bf16", "lora_int8")


def build(setup: str, layers: int, rank: int, dropout: float):
    from peft import LoraConfig, get_peft_model
    from sloth_core.bench.train_models import TARGETS, build as build_model, quantize_int8

    model = build_model("llama-3-8b", layers)
    if setup == "lora_int8":  # bf16 elsewhere, as load_in_8bit with dtype=bfloat16
        quantize_int8(model)
    torch.manual_seed(0)
    cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=dropout if setup == "lora_dropout_bf16" else 0.0,
                     target_modules=TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg).train()


def run(model, ids, steps: int) -> dict:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(steps):
        torch.manual_seed(step)  # the same dropout masks for both providers
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    warm = statistics.median(times[2:])
    return {"step_ms": warm * 1e3, "tokens_per_s": ids.numel() / warm,
            "peak_gib": torch.cuda.max_memory_allocated() / GIB, "losses": losses,
            "step_ms_all": [t * 1e3 for t in times]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setup", nargs="+", default=list(SETUPS), choices=SETUPS)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_lora_fallbacks: needs a CUDA GPU", file=sys.stderr)
        return 2
    import sloth_core

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128256, (args.batch, args.seq), generator=gen).cuda()
    rows = []
    for setup in args.setup:
        for provider in ("hf_peft", "sloth_core"):
            model = build(setup, args.layers, args.rank, args.dropout)
            statuses = {}
            if provider == "hf_peft":
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    sloth_core.optimize(model, gradient_checkpointing="offload")
            result = run(model, ids, args.steps)
            if provider == "sloth_core":
                for r in sloth_core.report(model):
                    if r.pattern.startswith("lora"):
                        statuses[f"{r.pattern}:{r.status}"] = statuses.get(f"{r.pattern}:{r.status}", 0) + 1
            rows.append({"setup": setup, "provider": provider, **result, "lora_rows": statuses})
            del model
            torch.cuda.empty_cache()
    print(f"{'setup':<20}{'provider':<12}{'tokens/s':>10}{'step ms':>10}{'peak GiB':>10}{'speed':>8}{'memory':>8}"
          f"  first loss")
    base = {}
    for r in rows:
        if r["provider"] == "hf_peft":
            base[r["setup"]] = r
        b = base.get(r["setup"], r)
        print(f"{r['setup']:<20}{r['provider']:<12}{r['tokens_per_s']:>10,.0f}{r['step_ms']:>10.1f}"
              f"{r['peak_gib']:>10.2f}{r['tokens_per_s'] / b['tokens_per_s']:>7.2f}x"
              f"{r['peak_gib'] / b['peak_gib']:>7.2f}x  {r['losses'][0]:.5f} {r['lora_rows'] or ''}")
    if args.out:
        env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "args": {**vars(args), "out": str(args.out)}}
        for name in ("transformers", "peft", "bitsandbytes", "triton"):
            try:
                env[name] = __import__(name).__version__
            except Exception:  # not installed
                env[name] = None
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
