"""``examples/several_gpus.py`` as users launch it: ``torchrun`` and ``accelerate launch`` start 2 CPU ranks (gloo,
kernels under Triton's interpreter), the Trainer wraps the optimized model in DDP, and the losses equal the same
script's single-process run with the same global batch (the ``accelerate launch`` run with
``SLOTH_CORE_SLOW_TESTS=1``). Each launch has a deadline; a rank still running at it
fails the test with its Python stacks (:mod:`tests.distributed_launch`)."""
import importlib.util
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch


from tests.distributed_launch import ROOT, rank_env, run

pytest.importorskip("peft")
pytest.importorskip("datasets")
pytest.importorskip("accelerate")
EXAMPLE = ROOT / "examples" / "several_gpus.py"
TIMEOUT = 180


@pytest.fixture(scope="module")
def one_process():
    spec = importlib.util.spec_from_file_location("example_several_gpus", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module.main(["--steps", "2"])


def _losses(outputs: list[str], world: int) -> list[float]:
    found = re.findall(rf"world {world}, engine (\w+), losses: ([-\d. ]+)", "\n".join(outputs))
    assert len(found) == 1, f"expected one line of losses from rank 0, got {found}"
    assert found[0][0] == "DistributedDataParallel"
    return [float(x) for x in found[0][1].split()]


def _launcher(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("accelerate", marks=[pytest.mark.slow, pytest.mark.skipif(
    os.environ.get("SLOTH_CORE_SLOW_TESTS") != "1", reason="CI time: SLOTH_CORE_SLOW_TESTS=1 runs it (~30 s)")])])
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU ranks against the in-process run: a CPU machine's test (CI)")
def test_two_ranks_train_as_one_process(launcher, one_process, tmp_path):
    if launcher == "torchrun":
        cmd = _launcher("torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EXAMPLE), "--steps", "2")
    else:
        if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
            pytest.skip("no accelerate command beside this Python")
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "0", str(EXAMPLE), "--steps", "2"]
    outputs = run([cmd], [rank_env()], tmp_path, TIMEOUT)
    assert len(one_process) == 2
    torch.testing.assert_close(torch.tensor(_losses(outputs, 2)), torch.tensor(one_process), rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp2_through_the_trainer_on_two_gpus(tmp_path):
    """accelerate applies FSDP on GPUs only: the Trainer's FSDP2 path of the example (bf16) runs there."""
    cmd = _launcher("torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EXAMPLE), "--fsdp")
    outputs = run([cmd], [rank_env(TRITON_INTERPRET="0")], tmp_path, TIMEOUT)
    assert re.search(r"world 2, engine FSDP\w+, losses: ", "\n".join(outputs))


SFT_EXAMPLE = ROOT / "examples" / "sft_trainer.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU ranks: a CPU machine's test (CI)")
def test_sft_trainer_example_on_two_ranks(tmp_path):
    """TRL's ``SFTTrainer`` with its default config (QLoRA, 8-bit AdamW, gradient accumulation) wraps the optimized
    model in DDP on 2 gloo ranks: both ranks train and log finite losses (the global batch doubles, so the losses
    are not the single process's)."""
    trl = pytest.importorskip("trl")
    from packaging.version import Version

    if Version(trl.__version__) < Version("1.16"):
        pytest.skip("TRL < 1.16 runs its own Triton log-prob kernel on CPU tensors (fails under triton 3.6's "
                    "interpreter): see tests/bench/test_sft_flow.py")
    cmd = _launcher("torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SFT_EXAMPLE), "--steps", "2")
    out = "\n".join(run([cmd], [rank_env()], tmp_path, TIMEOUT))
    found = re.findall(r"losses: ([-\d. naninf]+)", out)
    assert len(found) == 2, f"expected a losses line from each rank:\n{out[-3000:]}"
    for line in found:
        values = [float(x) for x in line.split()]
        assert len(values) == 2 and all(torch.isfinite(torch.tensor(values))), line
