#!/usr/bin/env python
"""CPU diagnostic: how far an optimized bf16 LoRA model's gradients are from float64, against HF's bf16 gradients,
over seeds of three tiny configs that tests/test_config_fuzz.py drew and failed on (two Gemma3: a thorough-profile
run's, and CI's of 2026-12-06 on stop 28; one Gemma2 with attention soft-capping 2.0, from a thorough run under
triton 3.6), with Triton's interpreter rounding float32 -> bfloat16 as a GPU does (tests/interpreter_rounding.py).

    python benchmarks/diag_bf16_fuzz_draws_cpu.py > benchmarks/results/bf16_fuzz_draws_cpu_20261206.txt
"""
import copy
import os
import statistics
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
os.environ["SLOTH_CORE_AUTOTUNE"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import interpreter_rounding  # noqa: E402

interpreter_rounding.install()

import torch  # noqa: E402

import tests.test_config_fuzz as fuzz  # noqa: E402

GEMMA3 = {"vocab_size": 97, "intermediate_size": 20, "max_position_embeddings": 64, "sliding_window": 5,
          "attn_logit_softcapping": 50.0}
# (what found it, family, config, batch, tokens, seeds)
DRAWS = [("thorough profile", "gemma3_text",
          {**GEMMA3, "hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
           "head_dim": 8, "tie_word_embeddings": True, "query_pre_attn_scalar": 8, "final_logit_softcapping": 30.0},
          2, 3, range(11024, 11036)),
         ("CI stop 28, seed 1441", "gemma3_text",
          {**GEMMA3, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 1,
           "head_dim": 16, "tie_word_embeddings": False, "query_pre_attn_scalar": 16, "final_logit_softcapping": 5.0},
          1, 6, range(1430, 1450)),
         ("thorough profile, triton 3.6, seed 185", "gemma2",
          {"vocab_size": 7, "hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
           "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 6,
           "tie_word_embeddings": True, "rope_parameters": {"rope_type": "yarn", "rope_theta": 100.0, "factor": 2.0,
                                                            "original_max_position_embeddings": 4},
           "sliding_window": 2, "query_pre_attn_scalar": 16, "final_logit_softcapping": None,
           "attn_logit_softcapping": 2.0},
          1, 3, range(170, 230))]


def _errors(family, kw, batch, tokens, seed):
    """{gradient name: (our error, HF's error, size)} against float64 (norms), the whole gradient under "all", for
    the fuzz test's bf16 LoRA draw of this config; None when the draw has no gradient (no label left)."""
    want, got, exact = fuzz._numbers((family, copy.deepcopy(kw)), True, True, batch, tokens, seed, 0.0)
    names = [n for n in want if n.startswith("grad") and exact[n].any()]
    if not names:
        return None
    pairs = {n: (got[n].double(), want[n].double(), exact[n].double()) for n in names}
    pairs["all"] = tuple(torch.cat([d[n].double().flatten() for n in names]) for d in (got, want, exact))
    return {n: ((o - e).norm().item(), (h - e).norm().item(), e.norm().item()) for n, (o, h, e) in pairs.items()}


def main() -> None:
    import transformers, triton  # noqa: E401

    print(f"torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}; "
          f"interpreter rounds: {interpreter_rounding.rounds()}")
    print("per seed, over the LoRA gradient tensors: our error / HF's (median, max), the worst pair (relative to the "
          "tensor), the whole gradient's ratio, and the tensors past 3x HF's error: their largest error relative to "
          "the tensor and to the whole gradient")
    for found_by, family, kw, batch, tokens, seeds in DRAWS:
        print(f"\n{found_by}: {family}, batch {batch} x {tokens} tokens, {kw}")
        medians, wholes, past = [], [], []
        for seed in seeds:
            errors = _errors(family, kw, batch, tokens, seed)
            if errors is None:
                print(f"seed {seed}: no label left, no gradient")
                continue
            ours, hf, whole_size = errors.pop("all")
            rel = {n: (o / s, h / s) for n, (o, h, s) in errors.items()}
            ratios = [o / h if h else float("inf") for o, h in rel.values()]
            worst = max(rel.values())
            medians.append(statistics.median(ratios))
            wholes.append(ours / hf)
            beyond = [(o / s, o / whole_size) for o, h, s in errors.values() if o > 3 * h]
            past += [b[1] for b in beyond]
            tail = (f"; past 3x HF: {len(beyond)}, up to {max(b[0] for b in beyond):.3g} of the tensor, "
                    f"{max(b[1] for b in beyond):.2g} of the whole gradient" if beyond else "")
            print(f"seed {seed}: ours/HF median {medians[-1]:.2f}, max {max(ratios):.2f}; worst ours {worst[0]:.3g} "
                  f"(HF {worst[1]:.3g}); whole gradient ours/HF {wholes[-1]:.2f}{tail}", flush=True)
        print(f"median over seeds of the per-seed median ratio: {statistics.median(medians):.2f}; "
              f"whole gradient ratio: median {statistics.median(wholes):.2f}, max {max(wholes):.2f}; tensors past "
              f"3x HF: {len(past)}, the largest error {max(past, default=0):.2g} of the whole gradient")


if __name__ == "__main__":
    main()
