"""The command line of ``sloth-core bench train``: its options, the printed table, the run and the written
outputs (the measurement: :mod:`sloth_core.bench.train`)."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .args import positive_int
from .train import PROVIDERS, SLOTH_CHECKPOINTING, WARMUP, run
from .train_models import PRESETS, SETUPS, TARGETS

DEFAULT_OUT = "benchmarks/results"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``sloth-core bench train`` (``--flow sft``'s own: :func:`sloth_core.bench.sft_cli.add_arguments`,
    which :mod:`sloth_core.bench.cli` adds too)."""
    parser.add_argument("--flow", choices=("loop", "sft"), default="loop",
                        help="loop: this module's training loop; sft: TRL's SFTTrainer with its default config "
                             "(sloth_core.bench.sft; needs trl and datasets); default: %(default)s")
    parser.add_argument("--preset", nargs="+", choices=list(PRESETS), default=["llama-3-8b"], metavar="PRESET",
                        help=f"models ({', '.join(PRESETS)}; default: %(default)s)")
    parser.add_argument("--quant", nargs="+", choices=list(SETUPS), default=list(SETUPS), metavar="QUANT",
                        help="none: bf16 LoRA (lora_bf16); nf4: QLoRA on a bitsandbytes NF4 base (qlora_nf4); "
                             "default: %(default)s")
    parser.add_argument("--batch", type=positive_int, default=4, help="sequences a step (default: %(default)s)")
    parser.add_argument("--seq", type=positive_int, default=2048, help="sequence length (default: %(default)s)")
    parser.add_argument("--rank", type=positive_int, default=16, help="LoRA rank, alpha = rank (default: %(default)s)")
    parser.add_argument("--steps", type=positive_int, default=10, help="steps per provider (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=WARMUP,
                        help="first steps left out of the median (default: %(default)s)")
    parser.add_argument("--provider", nargs="+", choices=list(PROVIDERS), default=None, metavar="PROVIDER",
                        help=f"{', '.join(PROVIDERS)} (default: %(default)s; None: all available, liger needs "
                             f"liger_kernel)")
    parser.add_argument("--layers", type=positive_int, default=None, help="override the number of decoder layers")
    parser.add_argument("--no-checkpointing", action="store_true",
                        help="no HF gradient checkpointing for hf_peft / liger")
    parser.add_argument("--sloth-checkpointing", choices=SLOTH_CHECKPOINTING, default="offload",
                        help="sloth_core's checkpointing (optimize's gradient_checkpointing): offload (inputs, "
                             "attention and q/k/v outputs to host memory), offload-attention, offload-qkv, "
                             "offload-inputs, on; or hf (HF's, as hf_peft); default: %(default)s")
    parser.add_argument("--opt-in", nargs="+", default=[], metavar="PATTERN",
                        help="sloth_core patterns in no default list to apply too (optimize(opt_in=...))")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="PATTERN",
                        help="sloth_core patterns to leave out (optimize(exclude=...)), e.g. lora_qkv")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda, or cpu for a quick check with tiny-llama (fp32); default: %(default)s")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help="folder for the JSON, Markdown and charts (default: %(default)s)")
    parser.add_argument("--name", default=None, metavar="STEM",
                        help="file name stem (default: train_<presets>_<date>_<time>)")
    return parser


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def format_table(results: dict) -> str:
    """The training rows as a compact plain-text table (errors listed below it)."""
    from tabulate import tabulate

    rows = [r for r in results.get("rows") or [] if r.get("kind") == "train"]
    body = [(r["setup"], r["model"], r["provider"], _fmt(r.get("tokens_per_s"), ".0f"),
             _fmt((r.get("speedup_vs") or {}).get("hf_peft"), ".2f"), _fmt(r.get("peak_gib"), ".2f"),
             _fmt(r.get("memory_vs_hf"), ".2f"), _fmt(r.get("max_rel_loss_diff"), ".1e"),
             " ".join(f"{x:.4f}" for x in (r.get("losses") or [])[:3]))
            for r in rows if "error" not in r]
    headers = ("setup", "model", "provider", "tokens/s", "speedup", "peak GiB", "memory", "max rel dloss",
               "first losses")
    lines = [tabulate(body, headers=headers, tablefmt="simple", disable_numparse=True) if body else "(no results)"]
    lines += [f"FAILED {r['setup']} {r['model']} {r['provider']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed :func:`add_arguments` options, print the table, write the outputs. The CLI
    (:func:`sloth_core.bench.cli.run_bench`) has checked that a CUDA GPU is there when ``--device cuda``."""
    from .report import write_and_list

    try:
        results = run(args.preset, args.quant, batch=args.batch, seq=args.seq, rank=args.rank, steps=args.steps,
                      providers=args.provider, device=args.device, warmup=args.warmup, layers=args.layers,
                      checkpointing=not args.no_checkpointing, sloth_checkpointing=args.sloth_checkpointing,
                      opt_in=args.opt_in, exclude=args.exclude)
    except ValueError as exc:
        print(f"sloth-core bench train: {exc}", file=sys.stderr)
        return 2
    s = results["settings"]
    print(f"\nbatch {s['batch']} x {s['seq']}, LoRA r={s['rank']} on {','.join(TARGETS)}, {s['steps']} steps "
          f"(median of the last {s['steps'] - min(s['warmup'], s['steps'] - 1)}), HF checkpointing "
          f"{'on' if s['checkpointing'] else 'off'}, sloth_core checkpointing {s['sloth_checkpointing']}"
          f"{''.join(' +' + n for n in s['opt_in'])}{''.join(' -' + n for n in s['exclude'])}; "
          f"{results['env'].get('gpu')}")
    print(format_table(results))
    stem = args.name or f"train_{'_'.join(args.preset)}_{time.strftime('%Y%m%d_%H%M%S')}"
    write_and_list(results, args.out, stem)
    return 0 if not any("error" in r for r in results["rows"]) else 1
