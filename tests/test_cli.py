"""The command line: the demo runs end to end and reports parity."""
from sloth_core.__main__ import main


def test_demo_runs_and_reports_parity(capsys):
    assert main(["demo", "--model", "qwen3"]) == 0
    out = capsys.readouterr().out
    assert "PARITY OK" in out and "causal_lm_loss" in out and "replaced" in out
