"""``python -m sloth_core`` / ``sloth-core``: command-line entry points.

    sloth-core demo [--model llama] [--dtype bf16]   optimize a tiny random model, print the report and a parity
                                                    check; on a GPU also a quick speed comparison
    sloth-core tune --model llama-3-8b --seq 2048 4096   pre-tune the kernels a model uses (GPU); --show, --clear
    sloth-core bench compare A.json B.json               the change between two benchmark runs
    sloth-core bench kernels | train                     kernel / training benchmark reports (GPU)
"""
from __future__ import annotations

import argparse
import os
import sys


def _prepare_runtime() -> str:
    """Kernels run on CUDA when present, else on the CPU under Triton's interpreter (set before Triton loads)."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return "cpu"


def main(argv: list[str] | None = None) -> int:
    from .tiny import TINY_MODEL_TYPES  # torch only: Triton's interpreter is still settable after it

    parser = argparse.ArgumentParser(prog="sloth-core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="optimize a tiny model, print the report, check parity (and speed on GPU)")
    demo.add_argument("--model", default="llama", choices=TINY_MODEL_TYPES, metavar="MODEL",
                      help=f"tiny preset: {', '.join(TINY_MODEL_TYPES)} (default: llama)")
    demo.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                      help="default: bf16 on a GPU, fp32 on the CPU")
    from .bench.cli import add_bench_parser, run_bench
    from .cli_tune import add_tune_parser, run_tune

    add_tune_parser(sub)
    add_bench_parser(sub)
    args = parser.parse_args(argv)
    device = _prepare_runtime()
    if args.command == "tune":
        return run_tune(args)
    if args.command == "bench":
        return run_bench(args)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args.model, args.dtype, device)
    return 2


if __name__ == "__main__":
    sys.exit(main())
