"""``sloth_core.bench.train`` on the CPU: a tiny Llama end to end (fp32; kernels under Triton's interpreter), the
preset configs of the real models (configs and meta-device models only), argument errors, Liger's plumbing through a
stand-in module."""
import argparse
import contextlib
import importlib.machinery
import importlib.util
import io
import json
import re
import sys
import types

import pytest
import torch

import sloth_core
from sloth_core import binding
from sloth_core.autotune.presets import PRESETS as SHAPES
from sloth_core.bench import report, train, train_cli, train_models
from sloth_core.checkpointing import checkpointed_layers, checkpointing_stats, reset_checkpointing_stats

BIG = ("llama-3-8b", "gemma-2-9b", "qwen3-8b", "mistral-7b")
STEPS, BATCH, SEQ = 3, 1, 16
ROW_FIELDS = ("kind", "setup", "model", "tokens", "mode", "provider", "median_ms", "tokens_per_s", "peak_gib",
              "losses", "speedup_vs", "memory_vs_hf", "max_rel_loss_diff")


def _parse(argv):
    return train_cli.add_arguments(argparse.ArgumentParser()).parse_args(argv)


def _capture_models(monkeypatch):
    """Record every model ``run`` builds (it drops them itself)."""
    built, build = [], train.build

    def recording_build(*args, **kwargs):
        built.append(build(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(train, "build", recording_build)
    return built


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """``main`` once: tiny-llama, bf16-LoRA setup (fp32 on the CPU), hf_peft and sloth_core, 3 steps."""
    out = tmp_path_factory.mktemp("train")
    args = _parse(["--preset", "tiny-llama", "--quant", "none", "--batch", str(BATCH), "--seq", str(SEQ),
                   "--steps", str(STEPS), "--warmup", "1", "--provider", "hf_peft", "sloth_core",
                   "--device", "cpu", "--out", str(out), "--name", "tiny"])
    stdout = io.StringIO()
    reset_checkpointing_stats()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        built = _capture_models(mp)
        status = train_cli.main(args)
    return {"status": status, "stdout": stdout.getvalue(), "out": out, "models": built,
            "results": report.read_json(out / "tiny.json"), "checkpointed": checkpointing_stats().checkpointed_calls}


def _rows(results):
    return {r["provider"]: r for r in results["rows"]}


def test_main_writes_rows_with_every_field(cpu_run):
    assert cpu_run["status"] == 0, cpu_run["stdout"]
    rows = _rows(cpu_run["results"])
    assert list(rows) == ["hf_peft", "sloth_core"]
    for provider, row in rows.items():
        assert "error" not in row
        missing = [f for f in ROW_FIELDS if f not in row]
        assert not missing, f"{provider} row lacks {missing}"
        assert (row["kind"], row["setup"], row["model"], row["mode"]) == ("train", "lora_bf16", "tiny-llama", "fwd_bwd")
        assert row["tokens"] == BATCH * SEQ and len(row["losses"]) == STEPS and len(row["step_ms"]) == STEPS
        assert row["median_ms"] > 0 and row["tokens_per_s"] == pytest.approx(BATCH * SEQ / row["median_ms"] * 1e3)
        assert row["peak_gib"] is None and row["memory_vs_hf"] is None  # no CUDA memory stats on the CPU
        assert row["speedup_vs"]["hf_peft"] > 0
    assert rows["hf_peft"]["speedup_vs"]["hf_peft"] == 1.0 and rows["hf_peft"]["max_rel_loss_diff"] == 0.0
    assert rows["sloth_core"]["replaced"] > 0  # the kernels were in the model, so the loss comparison means something
    assert cpu_run["results"]["settings"]["dtype"] == "float32"
    assert cpu_run["results"]["env"]["sloth_core"] == sloth_core.__version__


def test_sloth_core_losses_match_hf_peft_every_step(cpu_run):
    rows = _rows(cpu_run["results"])
    hf, ours = rows["hf_peft"]["losses"], rows["sloth_core"]["losses"]
    assert ours == pytest.approx(hf, rel=1e-4)
    assert rows["sloth_core"]["max_rel_loss_diff"] < 1e-4
    assert hf[-1] < hf[0]  # the LoRA weights train (lr 1e-4 on a random model: slowly)


def test_sloth_core_ran_with_its_own_checkpointing(cpu_run):
    layers = train_models.PRESETS["tiny-llama"]["num_hidden_layers"]
    assert cpu_run["checkpointed"] == layers * STEPS  # optimize(gradient_checkpointing="offload"), every layer


def test_model_is_restored_after_the_run(cpu_run):
    (model,) = cpu_run["models"]
    assert not sloth_core.is_optimized(model)
    assert not checkpointed_layers(model)
    assert [name for name, m in model.named_modules() if binding.records(m)] == []
    assert not model.is_gradient_checkpointing


def test_main_prints_the_table_and_writes_the_reports(cpu_run):
    out, stdout = cpu_run["out"], cpu_run["stdout"]
    assert "tokens/s" in stdout and "sloth_core" in stdout and str(out / "tiny.json") in stdout
    assert (out / "tiny.md").read_text().count("tiny-llama") >= 2
    assert json.loads((out / "tiny.json").read_text())["settings"]["providers"] == ["hf_peft", "sloth_core"]


# ---------------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize("preset", BIG)
def test_preset_configs_have_the_real_shapes(preset):
    cfg = train_models.preset_config(preset)
    shape = SHAPES[preset]
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.vocab_size) == (shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.head_dim,
                                shape.vocab)
    assert cfg.use_cache is False


# Parameter counts of the released checkpoints (Llama-3-8B, Gemma-2-9B, Qwen3-8B, Mistral-7B-v0.3).
PARAMS = {"llama-3-8b": 8_030_261_248, "gemma-2-9b": 9_241_705_984, "qwen3-8b": 8_190_735_360,
          "mistral-7b": 7_248_023_552}


@pytest.mark.parametrize("preset", BIG)
def test_preset_models_on_the_meta_device_have_the_real_parameter_counts(preset):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # no memory: shapes only
        model = AutoModelForCausalLM.from_config(train_models.preset_config(preset))
    assert sum(p.numel() for p in model.parameters()) == PARAMS[preset]
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (preset == "gemma-2-9b")


def test_gemma2_preset_keeps_softcapping_and_uses_eager_attention():
    cfg = train_models.preset_config("gemma-2-9b")
    assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (50.0, 30.0)
    assert (cfg.query_pre_attn_scalar, cfg.sliding_window, cfg.num_hidden_layers) == (256, 4096, 42)
    assert cfg.hidden_activation == "gelu_pytorch_tanh" and cfg.tie_word_embeddings
    assert train_models.ATTN_IMPLEMENTATION["gemma-2-9b"] == "eager"
    assert train_models.preset_config("gemma-2-9b", layers=2).num_hidden_layers == 2


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, message", [
    (dict(presets=["llama-4-8b"]), "unknown preset 'llama-4-8b'; known: llama-3-8b, gemma-2-9b"),
    (dict(presets=["tiny-llama"], quants=["int8"]), "unknown quant 'int8'; known: none, nf4"),
    (dict(presets=["tiny-llama"], providers=["unsloth"]), "unknown provider 'unsloth'"),
    (dict(presets=["tiny-llama"], steps=0), "must be positive"),
    (dict(presets=["tiny-llama"], opt_in=["lora_qkv"]), "unknown opt-in pattern 'lora_qkv'; known: (none)"),
    (dict(presets=["tiny-llama"], exclude=["lora_qkvo"]), "unknown pattern 'lora_qkvo'; known: rms_norm, lora_mlp"),
])
def test_bad_arguments_raise_clear_errors_before_building_anything(kwargs, message, monkeypatch):
    built = _capture_models(monkeypatch)
    with pytest.raises(ValueError, match=re.escape(message)):
        train.run(device="cpu", **kwargs)
    assert not built


def test_excluded_patterns_reach_optimize_and_the_settings(monkeypatch):
    calls = []
    optimize = sloth_core.optimize

    def recording_optimize(model, **options):
        calls.append(options)
        return optimize(model, **options)

    monkeypatch.setattr(sloth_core, "optimize", recording_optimize)
    args = _parse(["--preset", "tiny-llama", "--quant", "none", "--batch", "1", "--seq", "8", "--steps", "1",
                   "--provider", "sloth_core", "--device", "cpu", "--exclude", "lora_qkv"])
    results = train.run(args.preset, args.quant, batch=args.batch, seq=args.seq, steps=args.steps,
                        providers=args.provider, device=args.device, opt_in=args.opt_in, exclude=args.exclude)
    assert calls == [{"gradient_checkpointing": "offload", "exclude": ("lora_qkv",)}]
    assert results["settings"]["exclude"] == ["lora_qkv"] and results["settings"]["opt_in"] == []
    assert "error" not in results["rows"][0]


@pytest.mark.parametrize("option", ["offload-attention", "offload-qkv", "offload-inputs", "on"])
def test_the_checkpointing_options_go_to_optimize(monkeypatch, option):
    """``--sloth-checkpointing offload-attention`` (and the other modes): ``optimize(gradient_checkpointing=...)``
    with that mode, which the model's layers keep (nothing process-wide is set); the settings record it."""
    from sloth_core import checkpointing

    seen = []
    optimize = sloth_core.optimize

    def recording_optimize(model, **options):
        out = optimize(model, **options)
        seen.append((options, sorted({mode for _, mode in checkpointing.checkpointed_modes(model)})))
        return out

    monkeypatch.setattr(sloth_core, "optimize", recording_optimize)
    args = _parse(["--preset", "tiny-llama", "--quant", "none", "--batch", "1", "--seq", "8", "--steps", "1",
                   "--provider", "hf_peft", "sloth_core", "--device", "cpu", "--sloth-checkpointing", option])
    results = train.run(args.preset, args.quant, batch=args.batch, seq=args.seq, steps=args.steps,
                        providers=args.provider, device=args.device, sloth_checkpointing=args.sloth_checkpointing)
    assert seen == [({"gradient_checkpointing": option}, [option])]
    assert results["settings"]["sloth_checkpointing"] == option
    rows = _rows(results)
    assert "error" not in rows["sloth_core"]
    assert rows["sloth_core"]["losses"] == pytest.approx(rows["hf_peft"]["losses"], rel=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger_kernel is installed")
def test_liger_requested_without_liger_kernel_is_an_error():
    assert "liger" not in train.available_providers()
    with pytest.raises(ValueError, match="liger"):
        train.run(["tiny-llama"], ["none"], providers=["liger"], device="cpu")


# ---------------------------------------------------------------------------------------------- liger plumbing


def test_liger_runs_last_on_the_instance_and_its_module_patches_are_undone(monkeypatch):
    """A stand-in for liger_kernel patches ``modeling_llama.apply_rotary_pos_emb`` (as Liger does); the steps must
    go through it, and the module must be back to normal afterwards."""
    from transformers.models.llama import modeling_llama

    original, calls, patched = modeling_llama.apply_rotary_pos_emb, [], []

    def counting_rope(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    def apply_to_instance(model):
        patched.append(model)
        modeling_llama.apply_rotary_pos_emb = counting_rope

    pkg = types.ModuleType("liger_kernel")
    pkg.__spec__ = importlib.machinery.ModuleSpec("liger_kernel", None, is_package=True)
    sub = types.ModuleType("liger_kernel.transformers")
    sub._apply_liger_kernel_to_instance = apply_to_instance
    monkeypatch.setitem(sys.modules, "liger_kernel", pkg)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", sub)
    assert train.available_providers() == ["hf_peft", "sloth_core", "liger"]

    results = train.run(["tiny-llama"], ["none"], batch=1, seq=8, steps=2, warmup=1, providers=["liger", "hf_peft"],
                        device="cpu", layers=1)
    rows = _rows(results)
    assert list(rows) == ["hf_peft", "liger"]  # always in PROVIDERS order
    assert "error" not in rows["liger"] and rows["liger"]["model"] == "tiny-llama-1l"
    assert calls and modeling_llama.apply_rotary_pos_emb is original
    assert type(patched[0]).__name__ == "LlamaForCausalLM"  # the transformers model, not the PEFT wrapper
    assert rows["liger"]["losses"] == pytest.approx(rows["hf_peft"]["losses"], rel=1e-6)


def test_a_failing_provider_gets_an_error_row_and_the_others_still_run(monkeypatch):
    def broken(model, checkpointing, sloth_checkpointing, sloth_options):
        raise RuntimeError("boom")

    monkeypatch.setitem(train._USE, "sloth_core", broken)
    results = train.run(["tiny-llama"], ["none"], batch=1, seq=8, steps=1, providers=["hf_peft", "sloth_core"],
                        device="cpu", layers=1)
    rows = _rows(results)
    assert rows["sloth_core"]["error"] == "setup: RuntimeError: boom" and "median_ms" not in rows["sloth_core"]
    assert "error" not in rows["hf_peft"] and len(rows["hf_peft"]["losses"]) == 1
    assert "FAILED lora_bf16 tiny-llama-1l sloth_core: setup: RuntimeError: boom" in train_cli.format_table(results)


def test_a_model_that_cannot_be_built_gets_error_rows(monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(train, "build", oom)
    rows = train.run(["tiny-llama"], ["none", "nf4"], providers=["hf_peft", "sloth_core"], device="cpu")["rows"]
    assert [(r["setup"], r["provider"]) for r in rows] == [("lora_bf16", "hf_peft"), ("lora_bf16", "sloth_core"),
                                                          ("qlora_nf4", "hf_peft"), ("qlora_nf4", "sloth_core")]
    assert {r["error"] for r in rows} == {"build: OutOfMemoryError: CUDA out of memory"}


def test_each_step_reports_progress_on_stderr(capsys):
    train.run(["tiny-llama"], ["none"], batch=1, seq=8, steps=2, warmup=0, providers=["hf_peft"], device="cpu",
              layers=1)
    err = capsys.readouterr().err
    assert "hf_peft: step 1/2" in err and "hf_peft: step 2/2" in err
