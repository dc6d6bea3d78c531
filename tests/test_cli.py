"""The command line: the demo runs end to end and reports parity."""
from sloth_core.__main__ import main


def test_demo_runs_and_reports_parity(capsys):
    assert main(["demo", "--model", "qwen3"]) == 0
    out = capsys.readouterr().out
    assert "PARITY OK" in out and "causal_lm_loss" in out and "replaced" in out


def test_an_unknown_demo_model_is_one_line_and_exit_2(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--model", "phi3"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "invalid choice: 'phi3'" in err and "Traceback" not in err
