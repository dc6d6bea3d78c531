#!/usr/bin/env python
"""TRL's fused LM head: its chunked ``ChunkedLogProbFunction`` against ours (``linear_log_probs``), one CUDA GPU.

What ``SFTTrainer`` asks per step: ``log_probs``, ``entropy``, ``is_top1`` of the valid tokens, the loss
``-log_probs.sum() / n``, its backward (the entropy is only logged). bf16 hidden states and lm_head weight (random,
the real shapes), random labels. Cases: lm_head frozen (LoRA / QLoRA: the hidden-state gradient only) and
trainable (the weight's gradient too). Per case and method: median ms of forward + backward over warm repeats
(CUDA events around each, after 3 warm-up calls), the peak extra memory, and the agreement with the other method
(max |diff| of log-probs and entropy, the fraction of equal top-1 flags, the relative error of the gradients).

    python benchmarks/bench_trl_head.py --out benchmarks/results/trl_head_h100.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"llama-3-8b": (4096, 128256), "qwen3-8b": (4096, 151936), "gemma-2-9b": (3584, 256000)}
SOFTCAP = {"gemma-2-9b": 30.0}
OUTPUTS = ("log_probs", "entropy", "is_top1")
GIB = 1024 ** 3


def trl_head(hidden, weight, labels, softcap):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    out = ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, softcap, 1.0,
                                       OUTPUTS)
    return out[0], out[1], out[4]


def sloth_head(hidden, weight, labels, softcap):
    from sloth_core.kernels.linear_log_probs import linear_log_probs

    return linear_log_probs(hidden, weight, labels, softcap=softcap)


METHODS = {"trl_chunked": trl_head, "sloth_core": sloth_head}


def _step(fn, hidden, weight, labels, softcap):
    h = hidden.detach().requires_grad_()
    lp, ent, top1 = fn(h, weight, labels, softcap)
    loss = -lp.sum() / lp.numel()
    loss.backward()
    return lp.detach(), ent.detach(), top1, h.grad, weight.grad


def _time(fn, hidden, weight, labels, softcap, repeats):
    times = []
    for i in range(3 + repeats):
        weight.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _step(fn, hidden, weight, labels, softcap)
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    weight.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _step(fn, hidden, weight, labels, softcap)
    torch.cuda.synchronize()
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / GIB


def _rel(a, b):
    if a is None or b is None:
        return None
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def run(shapes, tokens, repeats):
    rows = []
    for name in shapes:
        n_hidden, vocab = SHAPES[name]
        softcap = SOFTCAP.get(name)
        gen = torch.Generator(device="cuda").manual_seed(0)
        hidden = torch.randn(tokens, n_hidden, device="cuda", generator=gen, dtype=torch.bfloat16)
        labels = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
        for trainable in (False, True):
            weight = (torch.randn(vocab, n_hidden, device="cuda", generator=gen) / n_hidden ** 0.5 * 2).to(
                torch.bfloat16).requires_grad_(trainable)
            results = {}
            for m, fn in METHODS.items():
                weight.grad = None
                results[m] = _step(fn, hidden, weight, labels, softcap)
            weight.grad = None
            a, b = results["sloth_core"], results["trl_chunked"]
            agree = dict(max_logp_diff=(a[0] - b[0]).abs().max().item(),
                         max_entropy_diff=(a[1] - b[1]).abs().max().item(),
                         top1_equal=(a[2] == b[2]).float().mean().item(), grad_hidden_rel=_rel(a[3], b[3]),
                         grad_weight_rel=_rel(a[4], b[4]))
            del results, a, b
            for method, fn in METHODS.items():
                ms, peak = _time(fn, hidden, weight, labels, softcap, repeats)
                rows.append(dict(shape=name, tokens=tokens, lm_head="trainable" if trainable else "frozen",
                                 method=method, median_ms=ms, peak_extra_gib=peak, **agree))
            del weight
            torch.cuda.empty_cache()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_trl_head: needs a CUDA GPU", file=sys.stderr)
        return 2
    import transformers
    import triton
    import trl

    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               transformers=transformers.__version__, trl=trl.__version__)
    rows = run(args.shapes, args.tokens, args.repeats)
    print(f"{env}\n| shape | lm_head | method | fwd+bwd ms | peak extra GiB | vs TRL | logp diff | entropy diff | "
          f"top1 equal | grad_h rel | grad_w rel |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    trl_ms = {(r["shape"], r["lm_head"]): r["median_ms"] for r in rows if r["method"] == "trl_chunked"}
    for r in rows:
        speed = trl_ms[(r["shape"], r["lm_head"])] / r["median_ms"]
        gw = "" if r["grad_weight_rel"] is None else f"{r['grad_weight_rel']:.2e}"
        print(f"| {r['shape']} | {r['lm_head']} | {r['method']} | {r['median_ms']:.2f} | {r['peak_extra_gib']:.2f} | "
              f"{speed:.2f}x | {r['max_logp_diff']:.2e} | {r['max_entropy_diff']:.2e} | {r['top1_equal']:.4f} | "
              f"{r['grad_hidden_rel']:.2e} | {gw} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(env=env, settings=vars(args), rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
