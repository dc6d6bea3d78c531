"""End-to-end LoRA training steps: HF + PEFT vs sloth_core (and Liger-Kernel) on the same random model, in one run.

A thin wrapper over :mod:`sloth_core.bench.train` (``sloth-core bench train``; see its docstring for what is
measured and how) that keeps this script's defaults: one preset (llama-3-8b), bf16 LoRA only (``--quant nf4`` for
QLoRA), 12 steps with 4 warm-up steps, providers hf_peft and sloth_core (add liger with ``--provider``), and
sloth_core under HF's checkpointing unless ``--sloth-checkpointing on|offload``. ``--out`` may name a ``.json``
file (the Markdown report and charts go beside it) or a folder.

    python benchmarks/bench_train_step.py --preset llama-3-8b --batch 4 --seq 2048 --steps 12
    python benchmarks/bench_train_step.py --quant nf4 --sloth-checkpointing offload --out /tmp/out/train_qlora.json

``build``, ``quantize_nf4``, ``TARGETS``, ``PRESETS`` and ``run_steps`` are re-exported for other scripts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sloth_core.bench import train  # noqa: E402
from sloth_core.bench.train import PRESETS, TARGETS, build, quantize_nf4, run_steps  # noqa: E402

__all__ = ["PRESETS", "TARGETS", "build", "quantize_nf4", "run_steps", "parse_args", "main"]

DEFAULTS = dict(preset=["llama-3-8b"], quant=["none"], steps=12, warmup=4, provider=["hf_peft", "sloth_core"],
                sloth_checkpointing="hf")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_arguments(parser)
    parser.set_defaults(**DEFAULTS)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix == ".json":  # the old form: --out FILE.json
        args.out, args.name = str(out.parent), args.name or out.stem
    return args


def main(argv=None) -> int:
    return train.main(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
