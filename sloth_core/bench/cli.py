"""``sloth-core bench``: kernel and training benchmarks (CUDA GPU), and the change between two result files.

    sloth-core bench kernels [--kernel rms_norm rope] [--model llama-3-8b] [--mode fwd_bwd] [--tokens 4096 8192]
    sloth-core bench train [--preset llama-3-8b] [--quant nf4] [--batch 4] [--seq 2048] [--rank 16]
    sloth-core bench compare A.json B.json      new/old median time of every row both runs have (any machine)

`kernels` and `train` need a CUDA GPU (without one: a one-line message, exit status 2). Each run prints a table and
writes a JSON file (environment and every figure), a Markdown report and PNG charts (with matplotlib) under --out.
`compare` works anywhere.
"""
from __future__ import annotations

import argparse
import sys


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` sub-command (with ``kernels``, ``train``, ``compare``) to an ``argparse`` sub-parsers
    object."""
    p = subparsers.add_parser("bench", help="kernel / training benchmarks (GPU); compare two result files",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench_command", required=True, metavar="{kernels,train,compare}")
    _add_kernels(sub)
    _add_train(sub)
    c = sub.add_parser("compare", help="the change between two result files (old ms, new ms, new/old)",
                       description="Match rows by (kind, kernel/setup, model, tokens, mode, provider); print the "
                                   "old and new median ms and new/old (below 1: B is faster). Works on any machine.")
    c.add_argument("a", metavar="A.json", help="the older (baseline) results file")
    c.add_argument("b", metavar="B.json", help="the newer results file")
    return p


def _add_kernels(sub) -> None:
    from . import kernels_cli

    k = sub.add_parser("kernels", help="per-kernel times, throughput and memory vs other providers (CUDA GPU)",
                       description="Every kernel at the shapes of Llama-3-8B, Gemma-2-9B, Qwen3-8B and Mistral-7B, "
                                   "forward and forward+backward, bf16: median ms, GB/s or TFLOP/s and their share of "
                                   "the ceilings measured in the same run, peak extra memory, speedups; providers "
                                   "sloth_core, HF eager, torch.compile and Liger-Kernel (when installed).")
    kernels_cli.add_arguments(k)


def _add_train(sub) -> None:
    from . import sft_cli, train_cli

    t = sub.add_parser("train", help="end-to-end LoRA/QLoRA training steps, HF+PEFT vs sloth_core (CUDA GPU)",
                       description="End-to-end LoRA / QLoRA training steps on random-init models of real shapes: "
                                   "tokens/s, peak GiB and the loss of every step, HF + PEFT, sloth_core and "
                                   "Liger-Kernel (when installed) in the same run, from the same LoRA init.")
    train_cli.add_arguments(t)
    sft_cli.add_arguments(t)


def _fail(message: str) -> int:
    print(f"sloth-core bench: {message}", file=sys.stderr)
    return 2


def _no_cuda_reason() -> str | None:
    """``None`` when a CUDA GPU is usable, else the line to print."""
    try:
        import torch
    except ImportError:
        return "needs a CUDA GPU; none found (torch not importable)"
    if torch.cuda.is_available():
        return None
    return f"needs a CUDA GPU; none found (torch {torch.__version__}, CUDA unavailable)"


def run_bench(args: argparse.Namespace) -> int:
    """Run ``sloth-core bench``; returns the exit status."""
    if args.bench_command == "compare":
        return _run_compare(args.a, args.b)
    if getattr(args, "device", "cuda") == "cuda":
        why = _no_cuda_reason()
        if why is not None:
            return _fail(why)
    if args.bench_command == "train" and getattr(args, "flow", "loop") == "sft":
        from . import sft_cli

        return sft_cli.main(args)
    if args.bench_command == "train":
        from . import train_cli

        return train_cli.main(args)
    from . import kernels_cli

    return kernels_cli.main(args)


def _run_compare(a: str, b: str) -> int:
    from .report import compare, read_json

    try:
        old, new = read_json(a), read_json(b)
    except OSError as exc:
        return _fail(f"compare: cannot read {exc.filename}: {exc.strerror}")
    except ValueError as exc:
        return _fail(f"compare: {exc}")
    print(f"A: {a}\nB: {b}")
    print(compare(old, new))
    return 0
