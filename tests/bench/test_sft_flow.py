"""``sloth-core bench train --flow sft`` on the CPU: TRL's ``SFTTrainer`` on a tiny Llama (fp32; sloth_core's kernels
under Triton's interpreter), both workloads, both providers: the rows, the step losses (sloth_core's against the
plain script's, padded against padding-free), the real-token counts, whose checkpointing ran; the data, the token
counting and the argument checks on their own (these also where TRL < 1.16 cannot train on the CPU)."""
import argparse
import contextlib
import gc
import io
import math
import weakref

import pytest
import torch
from packaging.version import Version

from sloth_core.bench import cli, report, sft, sft_cli, sft_data, train_cli, train_models

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

STEPS, WARMUP, BATCH, SEQ = 3, 1, 2, 64
VARLEN_MEDIAN, VARLEN_MAX = 32, 96  # short rows: the kernels run in the interpreter
LAYERS = train_models.PRESETS["tiny-llama"]["num_hidden_layers"]
MODES = ("fixed", "varlen_padded", "varlen_padding_free")
ROW_FIELDS = ("kind", "flow", "setup", "model", "mode", "workload", "padding", "provider", "batch", "seq", "median_ms",
              "tokens_per_s", "peak_gib", "losses", "step_ms", "real_tokens", "padded_tokens", "speedup_vs",
              "memory_vs_hf", "max_rel_loss_diff", "checkpointing", "hf_checkpoint_calls", "sloth_checkpoint_calls")
# fp32 on the CPU: sloth_core's kernels and the padding-free attention agree with HF's padded run to ~1e-7 here
LOSS_RTOL = 1e-4

needs_trl_116_on_cpu = pytest.mark.skipif(
    Version(trl.__version__) < Version("1.16") and torch.cuda.device_count() == 0,
    reason="TRL < 1.16 runs its own chunked log-prob Triton kernel on CPU tensors, which fails under Triton's "
           "interpreter on triton 3.6 (TRL's kernel, not sloth_core's)")


def _parse(argv):
    """``sloth-core bench train ...`` as the CLI parses it (the loop's options and the sft flow's)."""
    args = sft_cli.add_arguments(train_cli.add_arguments(argparse.ArgumentParser())).parse_args(argv)
    args.bench_command = "train"
    return args


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    # on a GPU machine the kernels run on the GPU (Triton's interpreter, for CPU tensors, is a CPU machine's)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = _parse(["--flow", "sft", "--preset", "tiny-llama", "--quant", "none", "--workload", "fixed", "varlen",
                   "--device", device, "--steps", str(STEPS), "--warmup", str(WARMUP), "--seq", str(SEQ),
                   "--batch", str(BATCH), "--varlen-median", str(VARLEN_MEDIAN), "--varlen-max", str(VARLEN_MAX),
                   "--out", str(out), "--name", "tiny"])
    with contextlib.suppress(ImportError):  # see test_every_run_built_a_fresh_model_and_let_it_go
        import bitsandbytes  # noqa: F401
    stdout, threads, models = io.StringIO(), torch.get_num_threads(), []
    build = sft.build

    def recording_build(*a, **kw):
        model = build(*a, **kw)
        models.append(weakref.ref(model))
        return model

    torch.set_num_threads(1)  # tiny matrices: one thread, and no spinning OpenMP workers on a busy machine
    try:
        with contextlib.redirect_stdout(stdout), pytest.MonkeyPatch.context() as mp:
            mp.setattr(sft, "build", recording_build)
            status = cli.run_bench(args)
    finally:
        torch.set_num_threads(threads)
    gc.collect()
    results = report.read_json(out / "tiny.json")
    return {"status": status, "stdout": stdout.getvalue(), "out": out, "results": results, "models": models,
            "rows": {(r["mode"], r["provider"]): r for r in results["rows"]}}


@needs_trl_116_on_cpu
def test_every_workload_and_provider_has_a_row_with_its_figures(cpu_run):
    assert cpu_run["status"] == 0, cpu_run["stdout"]
    assert list(cpu_run["rows"]) == [(m, p) for m in MODES for p in sft.PROVIDERS]
    for (mode, provider), row in cpu_run["rows"].items():
        assert "error" not in row, row["error"]
        missing = [f for f in ROW_FIELDS if f not in row]
        assert not missing, f"{mode} {provider} lacks {missing}"
        assert (row["kind"], row["flow"], row["setup"], row["model"]) == ("train_sft", "sft", "lora_bf16", "tiny-llama")
        assert len(row["losses"]) == len(row["step_ms"]) == len(row["real_tokens"]) == STEPS
        assert all(math.isfinite(x) for x in row["losses"])
        warm_s = sum(row["step_ms"][WARMUP:]) / 1e3
        assert row["tokens_per_s"] == pytest.approx(sum(row["real_tokens"][WARMUP:]) / warm_s)
        assert row["median_ms"] > 0
        if torch.cuda.is_available():
            hf = cpu_run["rows"][(mode, "hf_peft")]  # (a GPU machine's Trainer puts the tiny model on the GPU)
            assert row["peak_gib"] > 0 and row["memory_vs_hf"] == pytest.approx(row["peak_gib"] / hf["peak_gib"])
        else:  # no CUDA memory statistics
            assert row["peak_gib"] is None and row["memory_vs_hf"] is None
        assert row["speedup_vs"]["hf_peft"] > 0
    settings = cpu_run["results"]["settings"]
    assert (settings["flow"], settings["dtype"], settings["trl"]) == ("sft", "float32", trl.__version__)


@needs_trl_116_on_cpu
@pytest.mark.parametrize("mode", MODES)
def test_sloth_core_losses_match_the_plain_script(cpu_run, mode):
    hf, ours = (cpu_run["rows"][mode, p] for p in sft.PROVIDERS)
    assert ours["losses"] == pytest.approx(hf["losses"], rel=LOSS_RTOL)
    assert ours["max_rel_loss_diff"] < LOSS_RTOL and hf["max_rel_loss_diff"] == 0.0


@needs_trl_116_on_cpu
@pytest.mark.parametrize("provider", sft.PROVIDERS)
def test_padding_free_trains_on_the_same_sequences_as_padded(cpu_run, provider):
    """The same rows in the same batches: the same real tokens, and -- the sequences kept apart in the flattened
    row under SDPA -- the same losses."""
    padded, free = (cpu_run["rows"][mode, provider] for mode in MODES[1:])
    lengths = sft_data.varlen_lengths(BATCH * STEPS, median=VARLEN_MEDIAN, high=VARLEN_MAX, seed=0)
    assert padded["real_tokens"] == free["real_tokens"]
    assert sum(padded["real_tokens"]) == sum(lengths)  # one epoch: every row once
    assert free["padded_tokens"] == free["real_tokens"]  # nothing padded
    assert all(p >= r and p % BATCH == 0 for p, r in zip(padded["padded_tokens"], padded["real_tokens"]))
    assert padded["padded_tokens"] != padded["real_tokens"]  # the varlen batches did need padding
    assert free["losses"] == pytest.approx(padded["losses"], rel=LOSS_RTOL)


@needs_trl_116_on_cpu
def test_fixed_rows_count_batch_times_seq_tokens(cpu_run):
    for provider in sft.PROVIDERS:
        row = cpu_run["rows"]["fixed", provider]
        assert row["real_tokens"] == row["padded_tokens"] == [BATCH * SEQ] * STEPS
        assert row["tokens"] == BATCH * SEQ and row["seq"] == SEQ


@needs_trl_116_on_cpu
def test_whose_checkpointing_ran(cpu_run):
    """TRL switches HF's checkpointing on; for sloth_core, its own (offload) serves it on every layer."""
    for mode in MODES:
        hf, ours = (cpu_run["rows"][mode, p] for p in sft.PROVIDERS)
        assert (hf["hf_checkpoint_calls"], hf["sloth_checkpoint_calls"]) == (LAYERS * STEPS, 0)
        assert (ours["hf_checkpoint_calls"], ours["sloth_checkpoint_calls"]) == (0, LAYERS * STEPS)
        assert hf["checkpointing"] == ["hf"]
        assert ours["checkpointed_layers"] == LAYERS
        assert [d.startswith("mode=offload, serving Hugging Face's") for d in ours["checkpointing"]] == [True]
        assert ours["report"]["replaced"] > LAYERS and "report" not in hf


@needs_trl_116_on_cpu
def test_every_run_built_a_fresh_model_and_let_it_go(cpu_run):
    """On a GPU the next 8B model needs the memory: nothing (trainer, accelerate, TRL's patched forward, sloth_core's
    bindings) keeps a model alive after its run. (The fixture imports bitsandbytes first: on a CPU its first import
    -- inside the first trainer, through PEFT -- tries the Hub for a kernel and logs the failure with the exception,
    whose traceback reaches the run's frames; pytest's log capture would keep that first model alive.)"""
    assert len(cpu_run["models"]) == len(MODES) * len(sft.PROVIDERS)
    assert [ref() for ref in cpu_run["models"]] == [None] * len(cpu_run["models"])


@needs_trl_116_on_cpu
def test_main_prints_the_markdown_table_and_writes_the_reports(cpu_run):
    stdout, out = cpu_run["stdout"], cpu_run["out"]
    assert "| setup     | workload            | provider   | tokens/s   | peak GiB   | vs HF   |" in stdout
    assert "| lora_bf16 | varlen_padding_free | sloth_core |" in stdout
    assert str(out / "tiny.json") in stdout and (out / "tiny.md").read_text().count("varlen_padded") == 2


# ---------------------------------------------------------------------------------------------- pieces


def test_varlen_lengths_are_seeded_log_normal_and_clipped():
    lengths = sft_data.varlen_lengths(4000, seed=5)
    assert lengths == sft_data.varlen_lengths(4000, seed=5) and lengths != sft_data.varlen_lengths(4000, seed=6)
    assert min(lengths) == 16 and max(lengths) == 4096  # both ends clipped at this many draws
    assert 280 <= sorted(lengths)[2000] <= 320  # median 300
    assert sft_data.variants(["fixed", "varlen"]) == [("fixed", "padded"), ("varlen", "padded"),
                                                      ("varlen", "padding_free")]


@pytest.mark.parametrize("padding_free", [False, True])
def test_counting_collator_counts_the_real_tokens(padding_free):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    counter = sft.CountingCollator(DataCollatorForLanguageModeling(pad_token_id=sft_data.PAD_ID,
                                                                   padding_free=padding_free))
    data = sft_data.make_dataset(100, [5, 3, 7])
    batch = counter(list(data))
    assert counter.real == [15]
    assert counter.padded == [15 if padding_free else 21] and batch["input_ids"].numel() == counter.padded[0]
    if not padding_free:
        assert int(batch["attention_mask"].sum()) == 15
    assert all(2 <= t < 100 for row in data["input_ids"] for t in row)


@pytest.mark.parametrize("flags, named", [(["--provider", "liger"], "--provider liger"),
                                          (["--sloth-checkpointing", "on"], "--sloth-checkpointing"),
                                          (["--no-checkpointing"], "--no-checkpointing")])
def test_options_the_sft_flow_does_not_take_exit_2(flags, named, capsys):
    assert cli.run_bench(_parse(["--flow", "sft", "--device", "cpu", *flags])) == 2
    assert named in capsys.readouterr().err


def test_the_default_flow_is_the_loop():
    args = _parse([])
    assert (args.flow, args.workload, args.varlen_steps, args.varlen_max) == ("loop", ["fixed", "varlen"], None, 4096)


def test_sloth_core_warnings_are_collected_once_and_others_still_shown():
    import warnings

    from sloth_core import SlothCoreWarning

    out = {}
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with sft._sloth_warnings(out):
            warnings.warn("plain", UserWarning)
            for _ in range(2):
                warnings.warn("ours", SlothCoreWarning)
    assert out["sloth_warnings"] == ["ours"]
    assert [str(w.message) for w in shown] == ["plain"]
