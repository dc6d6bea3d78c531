"""benchmarks/bench_generate.py's CPU smoke mode (``--tiny``) runs, writes its JSON, and the optimized model in
inference mode generates the tokens of Hugging Face + PEFT (a bf16 LoRA Llama; tests/test_inference.py covers NF4)."""
import importlib.util
import json
from pathlib import Path

import pytest

from tests.marks import interpreter_only

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generate.py"


@pytest.fixture
def bench():
    spec = importlib.util.spec_from_file_location("bench_generate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@interpreter_only
def test_tiny_mode(bench, tmp_path, capsys):
    out = tmp_path / "generate.json"
    assert bench.main(["--tiny", "--quant", "none", "--batch", "2", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    rows = {(r["provider"], r["batch"]): r for r in results["rows"]}
    assert set(rows) == {("hf_peft", 2), ("sloth_core", 2)}
    assert rows[("sloth_core", 2)]["tokens_equal"] is True
    assert rows[("sloth_core", 2)]["prefill_max_abs_diff"] < 0.05 * rows[("sloth_core", 2)]["prefill_std"]
    assert all(r["tokens_per_s"] > 0 and len(r["runs_s"]) == 1 for r in rows.values())
    assert "| none | 2 |" in capsys.readouterr().out


def test_pick_margin_scores_the_models_pick_over_the_references_at_the_first_difference(bench):
    import torch

    class Scores:  # logits at the last position: token t scores 0.1 * t, plus the prefix length at token 0
        def __call__(self, input_ids, attention_mask):
            logits = 0.1 * torch.arange(6.0).expand(*input_ids.shape, 6).clone()
            logits[..., 0] += input_ids.shape[1]
            return type("Out", (), {"logits": logits})

    ids = torch.zeros(2, 3, dtype=torch.long)
    new = torch.tensor([[5, 4, 1], [5, 2, 3]])
    ref = torch.tensor([[5, 4, 1], [5, 3, 3]])
    assert bench.first_difference(new, ref) == 1
    # at step 1 (prefix of 4 tokens) only row 1 differs: its pick 2 scores 0.2, the reference's 3 scores 0.3
    assert bench.pick_margin(Scores(), ids, new, ref, 1) == pytest.approx(-0.1)
    ref[0, 1] = 0  # now row 0 differs too: token 0 scores 4 there, so row 0's margin is 0.4 - 4.0
    assert bench.pick_margin(Scores(), ids, new, ref, 1) == pytest.approx(0.4 - 4.0)
