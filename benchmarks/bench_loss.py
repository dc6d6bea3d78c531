#!/usr/bin/env python
"""Benchmark the causal-LM loss: lm_head projection + cross-entropy, forward and backward, on one CUDA GPU.

Methods (bf16 inputs, random hidden states and weights, random labels):

* ``hf_eager``   -- what transformers does: ``logits = hidden @ W.T`` (Gemma: soft-cap in bf16), ``.float()``,
                    ``fixed_cross_entropy`` (``F.cross_entropy``), then autograd backward;
* ``sloth_fused`` -- :func:`sloth_core.kernels.fused_linear_cross_entropy.fused_linear_cross_entropy`;
* ``liger``      -- Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` when importable (skipped otherwise).

For each (model shape, tokens, lm_head frozen/trainable) it reports the median fwd+bwd time
(``triton.testing.do_bench``, ``return_mode="median"``), the peak extra memory (``max_memory_allocated`` after
``reset_peak_memory_stats`` minus the memory allocated before the step; the returned gradients are part of
it, their size is shown in ``grads_gib``), and the relative error of the loss and of every gradient against
``hf_eager``. Prints a table and writes JSON (results + environment) to ``--out``.

    python benchmarks/bench_loss.py                               # everything
    python benchmarks/bench_loss.py --models llama3 --tokens 8192 --weight frozen
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {
    "llama3": dict(hidden=4096, vocab=128256, softcap=None),
    "gemma2": dict(hidden=3584, vocab=256000, softcap=30.0),
}
GIB = 1024 ** 3
REL_ERR_WARN = 2e-2  # bf16-level agreement with the eager path


# --------------------------------------------------------------------------------------------- methods
def hf_eager(hidden, weight, labels, softcap):
    try:
        from transformers.loss.loss_utils import fixed_cross_entropy
    except ImportError:  # pragma: no cover
        fixed_cross_entropy = lambda z, y, ignore_index=-100: F.cross_entropy(z, y, ignore_index=ignore_index)
    logits = F.linear(hidden, weight)
    if softcap is not None:
        logits = logits / softcap
        logits = torch.tanh(logits)
        logits = logits * softcap
    return fixed_cross_entropy(logits.float(), labels, ignore_index=-100)


def sloth_fused(hidden, weight, labels, softcap):
    from sloth_core.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
    return fused_linear_cross_entropy(hidden, weight, labels, softcap=softcap)


def sloth_fused_chunked(chunk_tokens: int):
    """The fused op with a fixed token chunk (to chart the memory/time trade-off of the chunk size)."""
    from sloth_core.autotune import override

    def run(hidden, weight, labels, softcap):
        with override("fused_linear_cross_entropy", chunk_tokens=chunk_tokens):
            return sloth_fused(hidden, weight, labels, softcap)

    return run


def liger_method():
    """(fn, None) when Liger-Kernel is importable, else (None, reason)."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as exc:  # noqa: BLE001 - any import failure means "skip"
        return None, f"Liger-Kernel not importable ({type(exc).__name__}: {exc})"
    losses = {}

    def liger(hidden, weight, labels, softcap):
        if softcap not in losses:
            kwargs = {} if softcap is None else dict(softcap=softcap)
            losses[softcap] = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, **kwargs)
        out = losses[softcap](weight, hidden, labels)
        return out[0] if isinstance(out, tuple) else out

    return liger, None


# --------------------------------------------------------------------------------------------- measuring
def make_inputs(n_tokens, n_hidden, vocab, train_weight, ignore_frac, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n_tokens, n_hidden, device="cuda", generator=gen).to(torch.bfloat16)
    weight = (torch.randn(vocab, n_hidden, device="cuda", generator=gen) * (2.0 / n_hidden ** 0.5)).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (n_tokens,), device="cuda", generator=gen)
    if ignore_frac > 0:
        labels[torch.rand(n_tokens, device="cuda", generator=gen) < ignore_frac] = -100
    return hidden.requires_grad_(), weight.requires_grad_(train_weight), labels


def make_step(method, hidden, weight, labels, softcap):
    inputs = [t for t in (hidden, weight) if t.requires_grad]

    def step():
        loss = method(hidden, weight, labels, softcap)
        return loss, torch.autograd.grad(loss, inputs)

    return step


def free_memory():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def peak_extra_gib(step):
    """(peak extra GiB of one step, its outputs); run after a warm-up call."""
    free_memory()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / GIB, out


def rel_errors(out, ref):
    from sloth_core.tolerances import rel_err
    names = ["loss"] + ["grad_hidden", "grad_weight"][: len(out[1])]
    values = [out[0]] + list(out[1])
    refs = [ref[0]] + list(ref[1])
    return {name: rel_err(v, r) for name, v, r in zip(names, values, refs)}


def bench_method(name, method, hidden, weight, labels, softcap, args, ref):
    import triton.testing

    step = make_step(method, hidden, weight, labels, softcap)
    row = dict(method=name)
    try:
        step()  # warm-up: Triton compilation, cuBLAS workspaces
        row["peak_extra_gib"], out = peak_extra_gib(step)
        row["grads_gib"] = sum(g.numel() * g.element_size() for g in out[1]) / GIB
        row["loss"] = out[0].item()
        row["rel_err"] = rel_errors(out, ref) if ref is not None else {}
        row["time_ms"] = triton.testing.do_bench(step, warmup=args.warmup_ms, rep=args.rep_ms,
                                                 return_mode="median")
    except torch.cuda.OutOfMemoryError as exc:
        row["error"] = f"OOM: {str(exc).splitlines()[0]}"
        out = None
    free_memory()
    return row, out


# --------------------------------------------------------------------------------------------- driver
def run_case(model, n_tokens, train_weight, methods, args):
    shape = MODELS[model]
    hidden, weight, labels = make_inputs(n_tokens, shape["hidden"], shape["vocab"], train_weight,
                                         args.ignore_frac, args.seed)
    case = dict(model=model, tokens=n_tokens, hidden=shape["hidden"], vocab=shape["vocab"],
                softcap=shape["softcap"], lm_head="trainable" if train_weight else "frozen")
    rows, ref = [], None
    for name, method in methods:
        row, out = bench_method(name, method, hidden, weight, labels, shape["softcap"], args, ref)
        if name == "hf_eager":
            ref = None if out is None else (out[0].detach(), [g.detach() for g in out[1]])
        rows.append({**case, **row})
    eager_ms = rows[0].get("time_ms") if rows and rows[0]["method"] == "hf_eager" else None
    for row in rows:
        if eager_ms and row.get("time_ms"):
            row["time_vs_eager"] = row["time_ms"] / eager_ms
    del hidden, weight, labels, ref
    free_memory()
    return rows


def env_info():
    from sloth_core.bench.env import environment

    return environment()


def print_table(rows):
    try:
        from tabulate import tabulate
    except ImportError:  # pragma: no cover
        tabulate = None
    header = ["model", "tokens", "lm_head", "method", "time_ms", "x eager", "peak_extra_GiB", "grads_GiB",
              "max rel err", "note"]
    table = []
    for r in rows:
        errs = r.get("rel_err") or {}
        worst = max(errs.values()) if errs else None
        note = r.get("error", "")
        if worst is not None and worst > REL_ERR_WARN:
            note = f"CHECK: {', '.join(f'{k}={v:.1e}' for k, v in errs.items())}"
        table.append([r["model"], r["tokens"], r["lm_head"], r["method"], _fmt(r.get("time_ms"), ".2f"),
                      _fmt(r.get("time_vs_eager"), ".3f"), _fmt(r.get("peak_extra_gib"), ".3f"),
                      _fmt(r.get("grads_gib"), ".3f"), _fmt(worst, ".1e"), note])
    if tabulate is None:
        print("\t".join(header))
        for line in table:
            print("\t".join(str(c) for c in line))
    else:
        print(tabulate(table, headers=header, tablefmt="github", disable_numparse=True))


def goal_lines(rows):
    """The issue's targets for sloth_fused on llama3 shapes: fwd+bwd <= 0.9x eager at 8192 tokens, peak extra
    memory <= 1.0 GiB at 4096 tokens (the returned gradients included; see grads_gib)."""
    lines = []
    for r in rows:
        if r["method"] != "sloth_fused" or r["model"] != "llama3":
            continue
        if r["tokens"] == 8192 and r.get("time_vs_eager") is not None:
            ok = r["time_vs_eager"] <= 0.9
            lines.append(f"goal time   llama3 8192 lm_head={r['lm_head']}: {r['time_vs_eager']:.3f}x eager "
                         f"(target <= 0.9x) {'PASS' if ok else 'MISS'}")
        if r["tokens"] == 4096 and r.get("peak_extra_gib") is not None:
            ok = r["peak_extra_gib"] <= 1.0
            lines.append(f"goal memory llama3 4096 lm_head={r['lm_head']}: {r['peak_extra_gib']:.3f} GiB peak extra, "
                         f"{r['grads_gib']:.3f} GiB of it returned gradients (target <= 1.0 GiB) "
                         f"{'PASS' if ok else 'MISS'}")
    return lines


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["llama3", "gemma2"])
    p.add_argument("--tokens", nargs="+", type=int, default=[4096, 8192, 16384])
    p.add_argument("--weight", choices=["frozen", "trainable", "both"], default="both",
                   help="lm_head frozen (LoRA: no weight gradient) or trainable")
    p.add_argument("--methods", nargs="+", choices=["hf_eager", "sloth_fused", "liger"],
                   default=["hf_eager", "sloth_fused", "liger"])
    p.add_argument("--chunk-tokens", nargs="*", type=int, default=[],
                   help="also run the fused op with these fixed token chunks (method sloth_fused_c<N>)")
    p.add_argument("--ignore-frac", type=float, default=0.0, help="fraction of labels set to -100")
    p.add_argument("--warmup-ms", type=int, default=50)
    p.add_argument("--rep-ms", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (default benchmarks/results/loss_<date>.json)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_loss: no CUDA device available; this benchmark needs a GPU. Nothing was run.")
        return 0
    methods, notes = [], []
    for name in args.methods:
        if name == "liger":
            fn, why = liger_method()
            if fn is None:
                notes.append(f"liger skipped: {why}")
                continue
            methods.append((name, fn))
        else:
            methods.append((name, {"hf_eager": hf_eager, "sloth_fused": sloth_fused}[name]))
    methods += [(f"sloth_fused_c{n}", sloth_fused_chunked(n)) for n in args.chunk_tokens]
    weight_modes = {"frozen": [False], "trainable": [True], "both": [False, True]}[args.weight]
    rows = []
    out = args.out or Path(__file__).resolve().parent / "results" / \
        f"loss_{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = env_info()
    for model in args.models:
        for n_tokens in args.tokens:
            for train_weight in weight_modes:
                case_rows = run_case(model, n_tokens, train_weight, methods, args)
                rows.extend(case_rows)
                for r in case_rows:  # progress, and a partial record if the run is cut short
                    print(f"{model} tokens={n_tokens} lm_head={r['lm_head']} {r['method']}: "
                          f"{_fmt(r.get('time_ms'), '.2f')} ms, {_fmt(r.get('peak_extra_gib'), '.3f')} GiB",
                          file=sys.stderr, flush=True)
                out.write_text(json.dumps(dict(env=env, notes=notes, results=rows), indent=2))
    print_table(rows)
    goals = goal_lines(rows)
    for line in goals + notes:
        print(line)
    out.write_text(json.dumps(dict(env=env, notes=notes, goals=goals, results=rows), indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
