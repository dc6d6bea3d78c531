#!/usr/bin/env python
"""CPU diagnostic: how far an optimized bf16 LoRA model's gradients are from float64, against HF's bf16 gradients,
over seeds of two tiny Gemma3 configs that tests/test_config_fuzz.py drew and failed on (a thorough-profile run's,
and CI's of 2026-12-06 on stop 28), with Triton's interpreter rounding float32 -> bfloat16 as a GPU does
(tests/interpreter_rounding.py). Per seed: the median and max over the LoRA gradient tensors of (our error / HF's
error), the worst absolute pair, and the ratio for the whole gradient (all tensors as one vector).

    python benchmarks/diag_bf16_fuzz_draw_cpu.py > benchmarks/results/bf16_fuzz_draw_gemma3_cpu_20261206.txt
"""
import copy
import os
import statistics
import sys
import warnings
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
os.environ["SLOTH_CORE_AUTOTUNE"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import interpreter_rounding  # noqa: E402

interpreter_rounding.install()

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import sloth_core  # noqa: E402
import tests.test_config_fuzz as fuzz  # noqa: E402
from sloth_core.tolerances import rel_err  # noqa: E402

GEMMA3 = {"vocab_size": 97, "intermediate_size": 20, "max_position_embeddings": 64, "sliding_window": 5,
          "attn_logit_softcapping": 50.0}
# (what found it, config, batch, tokens, seeds)
DRAWS = [("thorough profile", {**GEMMA3, "hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
                                "num_key_value_heads": 2, "head_dim": 8, "tie_word_embeddings": True,
                                "query_pre_attn_scalar": 8, "final_logit_softcapping": 30.0}, 2, 3,
          range(11024, 11036)),
         ("CI stop 28, seed 1441", {**GEMMA3, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 4,
                                     "num_key_value_heads": 1, "head_dim": 16, "tie_word_embeddings": False,
                                     "query_pre_attn_scalar": 16, "final_logit_softcapping": 5.0}, 1, 6,
          range(1430, 1450))]


def _errors(kw, batch, tokens, seed):
    """{gradient name: (our error, HF's error)} against float64, the whole gradient under "all"."""
    cfg = fuzz._build("gemma3_text", dict(kw))
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(torch.randn_like(p).mul_(0.3))
    ref = fuzz._with_lora(base, seed)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, tokens), generator=gen)
    labels = ids.clone()
    labels[torch.rand(ids.shape, generator=gen) < 0.3] = -100
    exact = fuzz._step(copy.deepcopy(ref).to(torch.float64), ids, labels)
    ref = ref.to(torch.bfloat16)
    model = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sloth_core.optimize(model)
    want, got = fuzz._step(ref, ids, labels, seed), fuzz._step(model, ids, labels, seed)
    names = [n for n in want if n.startswith("grad") and exact[n].any()]
    errors = {n: (rel_err(got[n], exact[n]), rel_err(want[n], exact[n])) for n in names}
    whole = [torch.cat([d[n].double().flatten() for n in names]) for d in (got, want, exact)]
    errors["all"] = (rel_err(whole[0], whole[2]), rel_err(whole[1], whole[2]))
    return errors


def main() -> None:
    import transformers, triton  # noqa: E401

    print(f"torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}; "
          f"interpreter rounds: {interpreter_rounding.rounds()}")
    for found_by, kw, batch, tokens, seeds in DRAWS:
        print(f"\n{found_by}: batch {batch} x {tokens} tokens, {kw}")
        medians, wholes = [], []
        for seed in seeds:
            errors = _errors(kw, batch, tokens, seed)
            ours, hf = errors.pop("all")
            ratios = [o / h for o, h in errors.values()]
            worst = max(errors.values())
            medians.append(statistics.median(ratios))
            wholes.append(ours / hf)
            print(f"seed {seed}: ours/HF median {medians[-1]:.2f}, max {max(ratios):.2f}; worst ours {worst[0]:.3g} "
                  f"(HF {worst[1]:.3g}); whole gradient ours/HF {wholes[-1]:.2f}", flush=True)
        print(f"median over seeds of the per-seed median ratio: {statistics.median(medians):.2f}; "
              f"whole gradient ratio: median {statistics.median(wholes):.2f}, max {max(wholes):.2f}")


if __name__ == "__main__":
    main()
