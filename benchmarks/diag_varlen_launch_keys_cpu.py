#!/usr/bin/env python
"""CPU diagnostic (no kernel runs): how many distinct compiled variants of the RMSNorm kernels a variable-length
run asks Triton for on an H100, from the launcher's own GPU launch parameters with tuning off, as the sft bench
ran (``rms_norm_launch._launch_config``, the heuristic, 132 SMs), and Triton's specialization of the row count
(divisible by 16 or not). Each new variant is one JIT
compile inside a training step. Workload: ``bench train --flow sft --workload varlen``'s lengths
(``sft_data.varlen_lengths``), 4 sequences a step, padded (4 x the longest) or padding-free (their sum);
Llama-3-8B's hidden size 4096, bf16; 200 steps.

    python benchmarks/diag_varlen_launch_keys_cpu.py > benchmarks/results/varlen_launch_keys_cpu_20261206.txt
"""
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sloth_core.bench.sft_data import varlen_lengths  # noqa: E402
from sloth_core.kernels import rms_norm_launch  # noqa: E402

HIDDEN, SMS, STEPS = 4096, 132, 200


def main() -> None:
    x = torch.empty(0, dtype=torch.bfloat16)
    all_lengths = varlen_lengths(4 * STEPS)
    print(f"torch {torch.__version__}; rms_norm launch keys on {SMS} SMs, hidden {HIDDEN}, {STEPS} steps")
    with mock.patch.object(rms_norm_launch, "interpreting", return_value=False), \
            mock.patch.object(rms_norm_launch, "_num_sms", return_value=SMS):
        for workload in ("padded", "padding-free"):
            seen, first = set(), []
            for step in range(STEPS):
                lengths = all_lengths[4 * step:4 * step + 4]
                rows = 4 * max(lengths) if workload == "padded" else sum(lengths)
                for backward in (False, True):  # the backward computes dw: its grid is capped near 2 x SMs
                    _, cfg = rms_norm_launch._launch_config(x, rows, HIDDEN, dw_reduction=backward)
                    key = (backward, tuple(sorted(cfg.items())), rows % 16 == 0)
                    if key not in seen:
                        seen.add(key)
                        first.append((step, "bwd" if backward else "fwd", cfg["TILES_PER_PROGRAM"],
                                      "rows%16==0" if rows % 16 == 0 else "rows%16!=0"))
            print(f"\n{workload}: {len(seen)} variants; first seen at (step, pass, TILES_PER_PROGRAM, rows):")
            for entry in first:
                print("  ", entry)


if __name__ == "__main__":
    main()
