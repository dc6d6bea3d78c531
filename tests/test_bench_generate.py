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
    assert all(r["tokens_per_s"] > 0 and len(r["runs_s"]) == 1 for r in rows.values())
    assert "| none | 2 |" in capsys.readouterr().out
