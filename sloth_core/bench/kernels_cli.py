"""The command line of ``sloth-core bench kernels``: its options, the output file names, the run and the written
outputs (the measurement: :mod:`sloth_core.bench.kernels`)."""
from __future__ import annotations

import argparse
import datetime
import re
from pathlib import Path

import torch

from . import timing
from .args import KERNELS, MODELS, MODES, positive_int
from .kernels import DEFAULT_REPS, DEFAULT_TOKENS, PROVIDERS, run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``sloth-core bench kernels``."""
    parser.add_argument("--kernel", nargs="+", choices=KERNELS, default=None, metavar="KERNEL",
                        help=f"only these ({', '.join(KERNELS)}; default: all; lora includes lora_nf4 when "
                             "bitsandbytes is installed)")
    parser.add_argument("--model", nargs="+", choices=MODELS, default=None, metavar="MODEL",
                        help=f"model shapes ({', '.join(MODELS)}; default: all)")
    parser.add_argument("--mode", nargs="+", choices=MODES, default=None, metavar="MODE",
                        help="fwd and/or fwd_bwd (default: both; dequant is fwd only)")
    parser.add_argument("--tokens", nargs="+", type=positive_int, default=None, metavar="N",
                        help=f"tokens (batch x sequence) per call (default: {' '.join(map(str, DEFAULT_TOKENS))})")
    parser.add_argument("--provider", nargs="+", choices=PROVIDERS, default=None, metavar="PROVIDER",
                        help=f"only these ({', '.join(PROVIDERS)}; default: all; hf_eager always runs once "
                             "as the correctness reference)")
    parser.add_argument("--reps", type=positive_int, default=DEFAULT_REPS,
                        help=f"at most this many timed repetitions a measurement (default: {DEFAULT_REPS}; "
                             f"slow calls get fewer, at least {timing.MIN_REPS})")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), metavar="DIR",
                        help="where the JSON, Markdown and charts go (default: benchmarks/results)")
    parser.add_argument("--name", default=None, metavar="STEM",
                        help="file name stem (default: kernels_<gpu>_<YYYYMMDD>)")


def gpu_slug(device: torch.device | str | None = None) -> str:
    """``nvidia-h200`` for an "NVIDIA H200"; ``cpu`` without CUDA."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def default_stem(device: torch.device | str | None = None) -> str:
    return f"kernels_{gpu_slug(device)}_{datetime.date.today():%Y%m%d}"


def main(args: argparse.Namespace) -> int:
    """``sloth-core bench kernels``: ceilings, the matrix, the terminal table, then JSON / Markdown / charts. The
    CLI (:func:`sloth_core.bench.cli.run_bench`) has checked that a CUDA GPU is there."""
    from .report import terminal_table, write_and_list

    device = torch.device("cuda")
    results = run(args.kernel, args.model, args.mode, args.tokens, args.provider, device=device,
                  timer=timing.CudaTimer(device), reps=args.reps)
    print(terminal_table(results))
    write_and_list(results, args.out, args.name or default_stem(device))
    return 0
