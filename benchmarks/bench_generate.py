#!/usr/bin/env python
"""Greedy ``generate``: Hugging Face + PEFT against the same model after ``sloth_core.optimize`` +
``sloth_core.for_inference``, in one run.

Model: the Llama-3-8B shape with random weights built from its config (``sloth_core.presets``; bf16, sdpa), PEFT
LoRA r=16 on q, k, v, o, gate, up, down (B drawn non-zero, so the adapters take part); bases bf16 or bitsandbytes
NF4 double-quant with bf16 compute (``sloth_core.bench.train.quantize_nf4``). Per base and batch size: a prompt of
``--prompt`` random tokens a row, ``--new`` new tokens (``min_new_tokens = max_new_tokens``: every run makes the
same number), greedy; one short warm-up generate, then the median wall time of ``--repeats`` runs (CUDA synchronized
around each). tokens/s = batch * new tokens / median. Each provider gets its own freshly built model (same seed:
same weights), the HF one freed first. The tokens of the two providers are compared: equal, or the first step
where a row differs. Random-weight models have near-ties in their logits, so a difference in bf16 can be rounding
rather than a bug; two figures tell which: the prompt's last-position logits of both models (``prefill_max_abs_diff``
against the spread of HF's, ``prefill_std``), and at the first difference the optimized model's own score of its
pick over HF's pick (``pick_margin``: a near-tie when it is within the logits' bf16 rounding). The tests check token
equality on tiny models.

    python benchmarks/bench_generate.py --out benchmarks/results/generate_llama-3-8b_h100.json   # one H100, < 5 min
    python benchmarks/bench_generate.py --tiny --out /tmp/generate_tiny.json                     # CPU smoke, seconds

``--tiny``: a one-layer tiny Llama on the CPU under Triton's interpreter (prompt 8, 4 new tokens, one run) --
it checks that the script runs and the tokens agree, its times mean nothing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROVIDERS = ("hf_peft", "sloth_core")


def _log(msg: str) -> None:
    print(msg, flush=True)


def build(args, quant: str, device):
    """The provider's model: random base (seeded), ``quant`` bases, PEFT LoRA with non-zero B, eval mode."""
    import torch
    from peft import LoraConfig, get_peft_model

    from sloth_core.bench.train_models import build as build_preset
    from sloth_core.bench.train_models import quantize_nf4
    from sloth_core.tiny import tiny_model

    if args.tiny:
        model = tiny_model("llama", dtype=torch.bfloat16, device=device, intermediate_size=128, num_hidden_layers=1)
        if quant == "nf4":
            quantize_nf4(model, device)
    else:
        model = build_preset(args.preset, args.layers, quant, device=device)
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model.eval()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate(model, ids, new: int):
    import torch

    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=0)


def measure(model, ids, args, device) -> tuple[float, list[float], object]:
    """``(median seconds, every run's seconds, the last run's tokens)`` after one warm-up."""
    _generate(model, ids, min(args.new, 8))
    times, out = [], None
    for _ in range(args.repeats):
        _sync(device)
        start = time.perf_counter()
        out = _generate(model, ids, args.new)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, out


def last_logits(model, ids):
    """The logits at every row's last position, float32 on the CPU."""
    import torch

    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].float().cpu()


def pick_margin(model, ids, new, ref, step: int) -> float:
    """At ``step``, the first where the generated rows ``new`` and the reference's ``ref`` differ: the smallest,
    over the rows that differ there, of ``model``'s logit of its own pick minus its logit of the reference's pick,
    the prefix being the prompt and the steps both agree on (>= 0: ``model`` preferred its pick by that much)."""
    import torch

    prefix = torch.cat([ids, new[:, :step].to(ids.device)], dim=1)
    logits = last_logits(model, prefix)
    rows = (new[:, step] != ref[:, step]).nonzero().flatten()
    return min(float(logits[r, new[r, step]] - logits[r, ref[r, step]]) for r in rows)


def first_difference(a, b) -> int | None:
    """The first generated step where some row differs (``None``: all equal)."""
    differs = (a != b).any(dim=0).nonzero()
    return None if differs.numel() == 0 else int(differs[0])


def run(args) -> dict:
    import torch

    import sloth_core

    device = torch.device("cpu" if args.tiny else "cuda")
    vocab = 128 if args.tiny else 128256
    results = {"args": vars(args), "rows": [], "device": torch.cuda.get_device_name(device)
               if device.type == "cuda" else "cpu (Triton interpreter)"}
    t0 = time.perf_counter()
    for quant in args.quant:
        tokens, prefill = {}, {}
        for provider in PROVIDERS:
            model = build(args, quant, device)
            if provider == "sloth_core":
                sloth_core.optimize(model)
                sloth_core.for_inference(model)
            for batch in args.batch:
                gen = torch.Generator().manual_seed(batch)
                ids = torch.randint(0, vocab, (batch, args.prompt), generator=gen).to(device)
                median, times, out = measure(model, ids, args, device)
                new = out[:, args.prompt:].cpu()
                tokens[(provider, batch)] = new
                prefill[(provider, batch)] = last_logits(model, ids)
                row = {"quant": quant, "batch": batch, "provider": provider, "median_s": median, "runs_s": times,
                       "tokens_per_s": batch * args.new / median}
                if provider == "sloth_core":
                    ref = tokens[("hf_peft", batch)]
                    row["first_difference"] = first_difference(new, ref)
                    row["tokens_equal"] = row["first_difference"] is None
                    hf_prefill = prefill[("hf_peft", batch)]
                    row["prefill_max_abs_diff"] = float((prefill[(provider, batch)] - hf_prefill).abs().max())
                    row["prefill_std"] = float(hf_prefill.std())
                    if not row["tokens_equal"]:
                        row["pick_margin"] = pick_margin(model, ids, new, ref, row["first_difference"])
                    row["speedup"] = results_row(results, quant, batch)["median_s"] / median
                results["rows"].append(row)
                _log(f"[{time.perf_counter() - t0:6.1f} s] {quant:4s} batch {batch}: {provider:10s} "
                     f"{row['tokens_per_s']:9.1f} tokens/s (median {median:.3f} s)"
                     + (f", speedup {row['speedup']:.2f}x, tokens equal: {row['tokens_equal']}"
                        + ("" if row["tokens_equal"] else f" (first difference at step {row['first_difference']}, "
                           f"pick margin {row['pick_margin']:.4f})")
                        + f"; prompt logits max |diff| {row['prefill_max_abs_diff']:.4f} (HF's std "
                          f"{row['prefill_std']:.3f})"
                        if provider == "sloth_core" else ""))
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    results["total_s"] = time.perf_counter() - t0
    return results


def results_row(results: dict, quant: str, batch: int, provider: str = "hf_peft") -> dict:
    return next(r for r in results["rows"] if (r["quant"], r["batch"], r["provider"]) == (quant, batch, provider))


def table(results: dict) -> str:
    lines = ["| base | batch | HF + PEFT tokens/s | sloth_core tokens/s | speed | tokens equal | prompt logits "
             "max abs diff (HF's std) |", "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if r["provider"] != "sloth_core":
            continue
        hf = results_row(results, r["quant"], r["batch"])
        equal = "yes" if r["tokens_equal"] else (f"to step {r['first_difference']} (pick margin "
                                                 f"{r['pick_margin']:.4f})")
        lines.append(f"| {r['quant']} | {r['batch']} | {hf['tokens_per_s']:,.1f} | {r['tokens_per_s']:,.1f} | "
                     f"{r['speedup']:.2f}x | {equal} | {r['prefill_max_abs_diff']:.4f} ({r['prefill_std']:.3f}) |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run (tiny Llama, Triton interpreter)")
    p.add_argument("--preset", default="llama-3-8b")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    p.add_argument("--quant", nargs="+", default=["nf4", "none"], choices=["nf4", "none"])
    p.add_argument("--batch", nargs="+", type=int, default=None, help="default 1 8 (tiny: 1 2)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens a row (default 128; tiny: 8)")
    p.add_argument("--new", type=int, default=None, help="new tokens (default 256; tiny: 4)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs, median reported (default 3; tiny: 1)")
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args(argv)
    defaults = dict(batch=[1, 2], prompt=8, new=4, repeats=1) if args.tiny else dict(batch=[1, 8], prompt=128,
                                                                                         new=256, repeats=3)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("SLOTH_CORE_AUTOTUNE", "0")  # heuristic launch configs: no tuning inside the timed runs
    from sloth_core.bench.report import publish

    results = run(args)
    return publish(results, table(results), args.out)


if __name__ == "__main__":
    sys.exit(main())
