"""benchmarks/bench_compile.py's CPU smoke mode (``--tiny``) runs, writes its JSON, and the compiled optimized model's
losses follow the eager one's (a bf16 LoRA Llama of one layer, ``aot_eager``)."""
import importlib.util
import json
from pathlib import Path

from tests.marks import interpreter_only

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_compile.py"


@interpreter_only
def test_tiny_mode(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_compile", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "compile.json"
    assert bench.main(["--tiny", "--steps", "1", "--warmup", "1", "--out", str(out)]) == 0
    rows = {r["provider"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"sloth_core", "sloth_core+compile"}
    assert all(r["tokens_per_s"] > 0 and len(r["steps_s"]) == 2 for r in rows.values())
    assert {"rms_norm", "rope", "causal_lm_loss", "lora_mlp"} <= set(rows["sloth_core+compile"]["replaced"])
    assert rows["sloth_core+compile"]["max_loss_rel_diff"] < 1e-2  # bf16, two steps
    assert "| sloth_core+compile |" in capsys.readouterr().out
