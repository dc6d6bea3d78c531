"""An optimized model trained by PyTorch's own distributed engines -- DDP and FSDP2 ``fully_shard`` -- on 2 and 3
CPU processes (gloo), kernels under Triton's interpreter: after 2 AdamW steps, each rank on its share of every
global batch, the losses and every trainable parameter equal the single-process run on the whole batch within
the rounding of the dtype, and every rank made the same verification decisions (the same ``report``).

Each run has a deadline; a rank still running at it fails the test with every rank's Python stacks."""
import os
import sys

import pytest
import torch

import sloth_core
from tests import distributed_train
from tests.distributed_launch import rank_env, run

pytest.importorskip("peft")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
if torch.cuda.is_available():  # the single-process reference runs here, where Triton's interpreter is off
    pytest.skip("CPU ranks under Triton's interpreter: a CPU machine's test (CI); several GPUs are issue 23's",
                allow_module_level=True)

TIMEOUT = 180  # per launch, which runs several cases one after the other
TOLERANCE = {  # Adam's update divides by the gradient's magnitude: small gradient differences move parameters
    "lora_fp32": dict(rtol=1e-4, atol=1e-5), "lora_bf16": dict(rtol=2e-2, atol=2e-3),
    "qlora_nf4": dict(rtol=2e-2, atol=2e-3)}
# world size -> the runs of one launch (CASE:ENGINE); 3 ranks split each batch of 6 rows unlike 2
# (3 ranks shard the 64-wide parameters unevenly; DDP on 3 ranks only with SLOTH_CORE_SLOW_TESTS=1: CI time)
SLOW = os.environ.get("SLOTH_CORE_SLOW_TESTS") == "1"
LAUNCHES = {2: ("lora_fp32:ddp", "lora_fp32:fsdp2", "lora_bf16:fsdp2", "qlora_nf4:ddp", "lora_fp32:fsdp2_head",
                "lora_fp32:fsdp2_late", "qlora_nf4:fsdp2"),
            3: ("lora_fp32:fsdp2",) + (("lora_fp32:ddp",) if SLOW else ())}


@pytest.fixture(scope="module")
def single_process():
    """The single-process run of each case on the whole global batch (computed once per case)."""
    runs = {}

    def get(case):
        if case not in runs:
            model = distributed_train.build(case)
            losses = distributed_train.train(model)
            runs[case] = {"losses": [float(x) for x in losses], "params": distributed_train.trainable(model),
                          "report": [(r.module, r.pattern, r.status) for r in sloth_core.report(model)]}
        return runs[case]

    return get


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """World size -> the folder holding every rank's result of that launch (launched on first use)."""
    done = {}

    def get(world):
        if world not in done:
            out = tmp_path_factory.mktemp(f"world{world}")
            # ``-m``: the tree's root leads sys.path (as a script, tests/ would, and its kernels/ shadow the package)
            run([[sys.executable, "-m", "tests.distributed_train", str(out), *LAUNCHES[world]]] * world,
                [rank_env(RANK=str(r), WORLD_SIZE=str(world), SLOTH_CORE_TEST_STORE=str(out / "store"))
                 for r in range(world)], out / "logs", TIMEOUT)
            done[world] = out
        return done[world]

    return get


EQUAL_RUNS = [(w, n) for w, names in LAUNCHES.items() for n in names if n.split(":")[1] in ("ddp", "fsdp2")
              and n != "qlora_nf4:fsdp2"]


def _results(launched, world: int, name: str) -> list[dict]:
    out = launched(world)
    return [torch.load(out / f"{name.replace(':', '_')}_{r}.pt") for r in range(world)]


@pytest.mark.parametrize("world, name", EQUAL_RUNS)
def test_ranks_train_as_one_process_with_the_global_batch(world, name, launched, single_process):
    case = name.split(":")[0]
    ranks = _results(launched, world, name)
    for rank, got in enumerate(ranks):
        assert "error" not in got, f"rank {rank}: {got['error']}"
    assert not ranks[0]["warnings"]
    one = single_process(case)
    tol = TOLERANCE[case]
    for rank, got in enumerate(ranks):
        assert got["report"] == ranks[0]["report"], f"rank {rank} decided differently from rank 0"
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(one["losses"]), **tol)
        assert got["params"].keys() == one["params"].keys()
        for pname, p in one["params"].items():
            torch.testing.assert_close(got["params"][pname], p, **tol, msg=lambda m, n=pname: f"{n}: {m}")
    # the ranks run the kernels the single process runs: the same rows, every pattern replaced
    assert ranks[0]["report"] == one["report"]
    assert {s for _, _, s in one["report"]} == {"replaced"}


def test_an_lm_head_sharded_on_its_own_falls_back_to_the_plain_loss_and_says_so(launched, single_process):
    """FSDP2 gathers a separately sharded head's weight only when the head is called, after the fused loss would
    read it: Hugging Face's loss runs, with one warning naming the reason, and training equals the single process."""
    ranks = _results(launched, 2, "lora_fp32:fsdp2_head")
    one = single_process("lora_fp32")
    for got in ranks:
        assert "error" not in got, got["error"]
        assert len(got["warnings"]) == 1 and "lm_head is sharded on its own" in got["warnings"][0]
        assert ("", "causal_lm_loss", "fallback") in got["report"]
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(one["losses"]), **TOLERANCE["lora_fp32"])


def test_optimize_after_fully_shard_binds_nothing_and_says_call_it_before(launched):
    for got in _results(launched, 2, "lora_fp32:fsdp2_late"):
        assert "error" not in got, got["error"]
        assert got["report"] == []
        assert len(got["warnings"]) == 1 and "before fully_shard" in got["warnings"][0]


def test_fsdp2_on_a_4bit_base_is_a_clear_error_not_a_crash_inside_bitsandbytes(launched):
    for got in _results(launched, 2, "qlora_nf4:fsdp2"):
        assert got.get("error", "").startswith("NotImplementedError: sloth_core: Linear4bit's 4-bit weight"), got
        assert "DDP" in got["error"]


def test_a_hung_rank_fails_with_its_stack(tmp_path):
    """The deadline: a process still running at it fails the test, and its Python stack is in the message."""
    code = ("import faulthandler, signal, time; faulthandler.register(signal.SIGUSR1, all_threads=True); "
            "print('ready', flush=True)\ndef waiting_for_a_collective(): time.sleep(60)\nwaiting_for_a_collective()")
    with pytest.raises(pytest.fail.Exception, match=r"(?s)still running after 3 s.*waiting_for_a_collective"):
        run([[sys.executable, "-c", code]], [rank_env()], tmp_path, timeout=3)
