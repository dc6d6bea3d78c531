"""The command line of ``sloth-core bench train --flow sft``: its own options, the printed table, the run and the
written outputs (the measurement: :mod:`sloth_core.bench.sft`)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .args import positive_int
from .sft import KIND, run
from .sft_data import VARLEN, WORKLOADS


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options only ``--flow sft`` reads (the shared ones are :func:`sloth_core.bench.train_cli.add_arguments`)."""
    g = parser.add_argument_group("--flow sft")
    g.add_argument("--workload", nargs="+", choices=WORKLOADS, default=list(WORKLOADS), metavar="WORKLOAD",
                   help="fixed: every row --seq tokens; varlen: log-normal lengths, run padded and padding-free "
                        "(default: %(default)s)")
    g.add_argument("--varlen-steps", type=positive_int, default=None,
                   help="steps of the varlen runs (default: --steps)")
    g.add_argument("--varlen-median", type=positive_int, default=VARLEN["median"],
                   help="median varlen row length (default: %(default)s)")
    g.add_argument("--varlen-max", type=positive_int, default=VARLEN["max"],
                   help=f"varlen lengths are clipped to [{VARLEN['min']}, this] (default: %(default)s)")
    return parser


def format_table(results: dict) -> str:
    """The sft rows as a Markdown table: setup | workload | provider | tokens/s | peak GiB | vs HF (errors below)."""
    from tabulate import tabulate

    rows = [r for r in results.get("rows") or [] if r.get("kind") == KIND]

    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    body = [(r["setup"], r["mode"], r["provider"], fmt(r.get("tokens_per_s"), ".0f"), fmt(r.get("peak_gib"), ".2f"),
             fmt((r.get("speedup_vs") or {}).get("hf_peft"), ".2f"))
            for r in rows if "error" not in r]
    headers = ("setup", "workload", "provider", "tokens/s", "peak GiB", "vs HF")
    lines = [tabulate(body, headers=headers, tablefmt="github", disable_numparse=True) if body else "(no results)"]
    lines += [f"FAILED {r['setup']} {r['mode']} {r['provider']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """``sloth-core bench train --flow sft``: run, print the table, write the outputs (the JSON after every
    provider)."""
    from .report import write_and_list, write_json

    unsupported = [flag for flag, used in (("--provider liger", "liger" in (args.provider or ())),
                                           ("--no-checkpointing", args.no_checkpointing),
                                           ("--sloth-checkpointing", args.sloth_checkpointing != "offload"))
                   if used]
    if unsupported:
        print(f"sloth-core bench train: --flow sft runs TRL's default config with optimize(gradient_checkpointing="
              f"\"offload\"); not with {', '.join(unsupported)}", file=sys.stderr)
        return 2
    try:
        import datasets
        import trl  # noqa: F401
    except ImportError as exc:
        print(f"sloth-core bench train: --flow sft needs trl and datasets ({exc})", file=sys.stderr)
        return 2
    datasets.disable_progress_bars()  # TRL's dataset preparation, once per run
    stem = args.name or f"train_sft_{'_'.join(args.preset)}_{time.strftime('%Y%m%d_%H%M%S')}"
    out = Path(args.out)
    try:
        results = run(args.preset, args.quant, args.workload, batch=args.batch, seq=args.seq, rank=args.rank,
                      steps=args.steps, varlen_steps=args.varlen_steps, warmup=args.warmup,
                      providers=args.provider, device=args.device, layers=args.layers,
                      varlen_median=args.varlen_median, varlen_max=args.varlen_max, opt_in=args.opt_in,
                      exclude=args.exclude, checkpoint=lambda r: write_json(r, out / f"{stem}.json"))
    except ValueError as exc:
        print(f"sloth-core bench train: {exc}", file=sys.stderr)
        return 2
    s = results["settings"]
    print(f"\nTRL SFTTrainer (default config), batch {s['batch']}, fixed: {s['seq']} tokens a row, {s['steps']} "
          f"steps; varlen: log-normal median {s['varlen']['median']} clipped to [{s['varlen']['min']}, "
          f"{s['varlen']['max']}], {s['varlen_steps']} steps; median of the steps after {s['warmup']}; LoRA "
          f"r={s['rank']}; trl {s['trl']}; {results['env'].get('gpu')}")
    print(format_table(results))
    write_and_list(results, out, stem)
    return 0 if not any("error" in r for r in results["rows"]) else 1
