"""The examples are tests: each script runs as written, with its sloth_core line and without it, and the two runs
give the same losses (and, for the Trainer, the same evaluation) within the tolerance of their dtypes."""
import importlib.util
import pathlib
import warnings

import pytest
import torch
from packaging.version import Version

import sloth_core  # noqa: F401  (the examples import it; the interpreter is set up by the conftest)

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
trl = pytest.importorskip("trl")
pytest.importorskip("datasets")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _both(main, steps):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(["--steps", str(steps)]), main(["--steps", str(steps), "--no-sloth-core"])


@pytest.mark.skipif(Version(trl.__version__) < Version("1.16") and torch.cuda.device_count() == 0,
                    reason="TRL < 1.16 runs its own chunked log-prob Triton kernel on CPU tensors, which fails under "
                           "Triton's interpreter on triton 3.6 (TRL's kernel)")
def test_sft_trainer_example_matches_the_script_without_sloth_core():
    ours, theirs = _both(_load("sft_trainer").main, steps=3)
    assert len(ours) == len(theirs) == 3
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=3e-2, atol=0)  # 4-bit, bf16


def test_hf_trainer_example_matches_the_script_without_sloth_core():
    (ours, eval_ours), (theirs, eval_theirs) = _both(_load("hf_trainer").main, steps=3)
    assert len(ours) == len(theirs) == 3
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=2e-2, atol=0)  # bf16
    torch.testing.assert_close(eval_ours["eval_loss"], eval_theirs["eval_loss"], rtol=2e-2, atol=0)
    assert abs(eval_ours["eval_accuracy"] - eval_theirs["eval_accuracy"]) < 0.05
