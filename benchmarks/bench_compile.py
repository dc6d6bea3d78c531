#!/usr/bin/env python
"""``torch.compile`` after ``sloth_core.optimize``: LoRA training steps of the optimized model, compiled and not, in
one run (optionally Hugging Face + PEFT, compiled and not, as well).

Model: a preset's shape with random weights built from its config (``sloth_core.presets``; bf16, sdpa;
``--layers`` keeps the first N decoder layers), PEFT LoRA r=16 on q, k, v, o, gate, up, down (``bench train``'s
``add_lora``). Each provider gets its own freshly built model (same seed: same weights) and the same batches of
random tokens (``labels = input_ids``), AdamW on the adapters. A step is forward, backward, optimizer step, zero
grad, CUDA synchronized. The first ``--warmup`` steps are not timed (the compiled providers trace and compile in
the first: its time is reported as ``first_step_s``); tokens/s = batch * seq / median of the remaining steps. Peak
memory: ``torch.cuda.max_memory_allocated`` over the provider's steps. The losses of every provider are compared
step by step with the first provider's (max relative difference).

Under ``torch.compile`` sloth_core's RMSNorm, RoPE, gated-activation and fused-loss kernels are custom ops in the
graph, the LoRA layers run PEFT's forwards (traced and compiled by inductor), and checkpointing runs as
``"on"`` (README: torch.compile).

    python benchmarks/bench_compile.py --preset llama-3-8b --layers 4 --out benchmarks/results/compile_h100.json
    python benchmarks/bench_compile.py --tiny --out /tmp/compile_tiny.json       # CPU smoke (interpreter, aot_eager)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROVIDERS = ("sloth_core", "sloth_core+compile", "hf_peft", "hf_peft+compile")
GIB = 1024 ** 3


def _log(msg: str) -> None:
    print(msg, flush=True)


def build(args, provider: str, device):
    import torch

    import sloth_core
    from sloth_core.bench.train_models import add_lora
    from sloth_core.bench.train_models import build as build_preset
    from sloth_core.tiny import tiny_model

    if args.tiny:
        model = tiny_model("llama", dtype=torch.bfloat16, device=device, num_hidden_layers=1).train()
    else:
        model = build_preset(args.preset, args.layers, args.quant, device=device)
    model = add_lora(model, args.rank)
    with torch.no_grad():  # B = 0 at init: non-zero adapters, so their products take part
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    if provider.startswith("sloth_core"):
        sloth_core.optimize(model, gradient_checkpointing=args.checkpointing)
    elif args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if provider.endswith("+compile"):
        return model, torch.compile(model, backend=args.backend)
    return model, model


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args, provider: str, batches, device) -> dict:
    import torch

    model, call = build(args, provider, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for ids in batches:
        _sync(device)
        start = time.perf_counter()
        loss = call(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    warm = times[args.warmup:]
    median = statistics.median(warm)
    row = {"provider": provider, "median_s": median, "steps_s": times, "first_step_s": times[0],
           "tokens_per_s": args.batch * args.seq / median, "losses": losses,
           "peak_gib": torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None}
    if provider.startswith("sloth_core"):
        import sloth_core

        row["replaced"] = sorted({r.pattern for r in sloth_core.report(model) if r.status == "replaced"})
    del model, call, opt, params
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run(args) -> dict:
    import torch

    from sloth_core.bench.train_models import make_batches, preset_config

    device = torch.device("cpu" if args.tiny else "cuda")
    vocab = 128 if args.tiny else preset_config(args.preset).vocab_size
    batches = make_batches(vocab, args.warmup + args.steps, args.batch, args.seq, device=device)
    results = {"args": vars(args), "rows": [], "device": torch.cuda.get_device_name(device)
               if device.type == "cuda" else "cpu (Triton interpreter)"}
    t0 = time.perf_counter()
    for provider in args.providers:
        row = measure(args, provider, batches, device)
        first = results["rows"][0] if results["rows"] else row
        row["max_loss_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(row["losses"], first["losses"]))
        row["speed_vs_first"] = first["median_s"] / row["median_s"]
        results["rows"].append(row)
        peak = f", peak {row['peak_gib']:.2f} GiB" if row["peak_gib"] is not None else ""
        _log(f"[{time.perf_counter() - t0:6.1f} s] {provider:20s} {row['tokens_per_s']:10,.1f} tokens/s (median "
             f"{row['median_s'] * 1e3:.1f} ms, first step {row['first_step_s']:.1f} s{peak}), "
             f"{row['speed_vs_first']:.2f}x of {first['provider']}, max loss rel. diff {row['max_loss_rel_diff']:.1e}")
    results["total_s"] = time.perf_counter() - t0
    return results


def table(results: dict) -> str:
    first = results["rows"][0]["provider"]
    lines = [f"| provider | tokens/s | median step ms | first step s | peak GiB | vs {first} | max loss rel. diff |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else ""
        lines.append(f"| {r['provider']} | {r['tokens_per_s']:,.1f} | {r['median_s'] * 1e3:.1f} | "
                     f"{r['first_step_s']:.1f} | {peak} | {r['speed_vs_first']:.2f}x | {r['max_loss_rel_diff']:.1e} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run (one-layer tiny Llama, Triton interpreter)")
    p.add_argument("--preset", default="llama-3-8b")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (0: the preset's; default 4)")
    p.add_argument("--quant", default="none", choices=["none", "nf4"])
    p.add_argument("--checkpointing", default=None, help="optimize()'s gradient_checkpointing (HF's for hf_peft)")
    p.add_argument("--providers", nargs="+", default=["sloth_core", "sloth_core+compile"], choices=PROVIDERS)
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor; tiny: aot_eager)")
    p.add_argument("--batch", type=int, default=None, help="rows a step (default 4; tiny: 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens a row (default 2048; tiny: 16)")
    p.add_argument("--steps", type=int, default=None, help="timed steps after the warm-up (default 10; tiny: 2)")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps (compilation happens in the first)")
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args(argv)
    defaults = dict(batch=2, seq=16, steps=2, backend="aot_eager") if args.tiny else \
        dict(batch=4, seq=2048, steps=10, backend="inductor")
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.layers = args.layers or None
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not __import__("torch").cuda.is_available():
        print("bench_compile: needs a CUDA GPU (or --tiny)", file=sys.stderr)
        return 2
    os.environ.setdefault("SLOTH_CORE_AUTOTUNE", "0")  # heuristic launch configs: no tuning inside the timed steps
    from sloth_core.bench.report import publish

    results = run(args)
    return publish(results, table(results), args.out)


if __name__ == "__main__":
    sys.exit(main())
