"""``sloth-core bench``: kernel and training benchmarks (CUDA GPU), and the change between two result files.

    sloth-core bench kernels [--kernel rms_norm rope] [--model llama-3-8b] [--mode fwd_bwd] [--tokens 4096 8192]
    sloth-core bench train [--preset llama-3-8b] [--quant nf4] [--batch 4] [--seq 2048] [--rank 16]
    sloth-core bench compare A.json B.json      new/old median time of every row both runs have (any machine)

`kernels` and `train` need a CUDA GPU. They are not wired to the GPU runners yet: for now run the scripts in
benchmarks/ (bench_loss.py, bench_dequant.py, bench_autotune.py for kernels; bench_train_step.py for training),
which print a table and write JSON with the environment. `compare` works anywhere.
"""
from __future__ import annotations

import argparse
import sys

MODELS = ("llama-3-8b", "gemma-2-9b", "qwen3-8b", "mistral-7b")
TRAIN_PRESETS = (*MODELS, "tiny-llama")
MODES = ("fwd", "fwd_bwd")
KERNELS = ("rms_norm", "gated_activation", "rope", "cross_entropy", "fused_linear_cross_entropy", "dequant", "lora")
GPU_RUNNERS = {
    "kernels": "benchmarks/bench_loss.py, benchmarks/bench_dequant.py, benchmarks/bench_autotune.py",
    "train": "benchmarks/bench_train_step.py",
}


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


def _not_wired_note(command: str) -> str:
    return (f"needs a CUDA GPU. Not yet wired to the GPU runners: for now run {GPU_RUNNERS[command]} "
            f"(exit status 2 until then).")


def _add_kernels(sub) -> None:
    k = sub.add_parser("kernels", help="per-kernel times, throughput and memory vs other providers (CUDA GPU)",
                       description=f"Per-kernel benchmark reports; {_not_wired_note('kernels')}")
    k.add_argument("--kernel", nargs="+", choices=KERNELS, default=None, metavar="KERNEL",
                   help=f"only these ({', '.join(KERNELS)}; default: all)")
    k.add_argument("--model", nargs="+", choices=MODELS, default=None, metavar="MODEL",
                   help=f"model shapes ({', '.join(MODELS)}; default: all)")
    k.add_argument("--mode", nargs="+", choices=MODES, default=None, metavar="MODE",
                   help="fwd and/or fwd_bwd (default: both)")
    k.add_argument("--tokens", nargs="+", type=_positive_int, default=None, metavar="N",
                   help="tokens (batch x sequence) per call (default: the runner's set)")


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="end-to-end LoRA/QLoRA training steps, HF+PEFT vs sloth_core (CUDA GPU)",
                       description=f"End-to-end training benchmark; {_not_wired_note('train')}")
    t.add_argument("--preset", choices=TRAIN_PRESETS, default="llama-3-8b",
                   help=f"model ({', '.join(TRAIN_PRESETS)}; default: llama-3-8b)")
    t.add_argument("--quant", choices=("none", "nf4"), default="none",
                   help="none: bf16 LoRA; nf4: QLoRA on a bitsandbytes NF4 base (default: none)")
    t.add_argument("--batch", type=_positive_int, default=4, help="sequences a step (default: 4)")
    t.add_argument("--seq", type=_positive_int, default=2048, help="sequence length (default: 2048)")
    t.add_argument("--rank", type=_positive_int, default=16, help="LoRA rank (default: 16)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value


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
    why = _no_cuda_reason()
    if why is not None:
        return _fail(why)
    return _fail(f"{args.bench_command}: the GPU runners are not wired into the CLI yet; "
                 f"run {GPU_RUNNERS[args.bench_command]}")


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
