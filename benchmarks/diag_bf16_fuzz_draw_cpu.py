#!/usr/bin/env python
"""CPU diagnostic: how far an optimized bf16 LoRA model's gradients are from float64, against HF's bf16 gradients,
over twelve seeds of one tiny config (the Gemma3 config of tests/test_config_fuzz.py's thorough-profile finding),
with Triton's interpreter rounding float32 -> bfloat16 as a GPU does (tests/interpreter_rounding.py). Per seed:
the median and max over the LoRA gradient tensors of (our error / HF's error), and the worst absolute pair.

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

SPEC = ("gemma3_text", {"vocab_size": 97, "hidden_size": 24, "intermediate_size": 20, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8,
                        "max_position_embeddings": 64, "tie_word_embeddings": True, "sliding_window": 5,
                        "query_pre_attn_scalar": 8, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0})


def main() -> None:
    import transformers, triton  # noqa: E401

    print(f"torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}; "
          f"interpreter rounds: {interpreter_rounding.rounds()}; batch 2 x 3 tokens")
    medians = []
    for seed in range(11024, 11036):
        cfg = fuzz._build(*SPEC)
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        with torch.no_grad():
            for name, p in base.named_parameters():
                if p.dim() == 1 and "norm" in name:
                    p.copy_(torch.randn_like(p).mul_(0.3))
        ref = fuzz._with_lora(base, seed)
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, cfg.vocab_size, (2, 3), generator=gen)
        labels = ids.clone()
        labels[torch.rand(ids.shape, generator=gen) < 0.3] = -100
        exact = fuzz._step(copy.deepcopy(ref).to(torch.float64), ids, labels)
        ref = ref.to(torch.bfloat16)
        model = copy.deepcopy(ref)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sloth_core.optimize(model)
        want, got = fuzz._step(ref, ids, labels, seed), fuzz._step(model, ids, labels, seed)
        pairs = [(rel_err(got[n], exact[n]), rel_err(want[n], exact[n])) for n in want
                 if n.startswith("grad") and exact[n].any()]
        ratios = [o / h for o, h in pairs]
        worst = max(pairs)
        medians.append(statistics.median(ratios))
        print(f"seed {seed}: ours/HF median {medians[-1]:.2f}, max {max(ratios):.2f}; worst ours {worst[0]:.3g} "
              f"(HF {worst[1]:.3g})", flush=True)
    print(f"median over seeds of the per-seed median ratio: {statistics.median(medians):.2f}")


if __name__ == "__main__":
    main()
