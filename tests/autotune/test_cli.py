"""``sloth-core tune``: --show / --clear on a temporary cache, the refusal without a GPU, model presets and
config.json files, and a full (faked) tuning run."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from sloth_core import cli_tune
from sloth_core.autotune import presets, runtime, tuner
from sloth_core.autotune.cache import Environment, TuningCache
from sloth_core.autotune.presets import launch_keys, loss_chunk_keys, model_shape
from sloth_core.cli_tune import add_tune_parser, run_tune

ENV = Environment("NVIDIA H200", "3.6.0", "0.1.0")


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="sloth-core")
    sub = parser.add_subparsers(dest="command", required=True)
    add_tune_parser(sub)
    args = parser.parse_args(["tune", *argv])
    return run_tune(args)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SLOTH_CORE_CACHE_DIR", str(tmp_path))
    return tmp_path


def seed(cache_dir) -> TuningCache:
    cache = TuningCache(cache_dir / "autotune.json")
    cache.store(ENV, "rms_norm", "n_cols=4096,n_rows=4096,dw=0,dtype=bf16",
                {"config": {"BLOCK_N": 4096, "BLOCK_M": 2, "ROWS_PER_PROGRAM": 2, "num_warps": 8}, "ms": 0.02,
                 "heuristic_ms": 0.025, "tuning_s": 3.5, "tuned_at": "2026-11-30T10:00:00+00:00"})
    cache.store(Environment("NVIDIA A10", "3.6.0", "0.1.0"), "rope", "n_tokens=4096,n_heads=32,half=64,dtype=bf16",
                {"config": {"BLOCK_T": 1, "BLOCK_H": 32, "BLOCK_HALF": 64, "num_warps": 4}, "ms": 0.05})
    return cache


def test_show(cache_dir, capsys):
    seed(cache_dir)
    assert cli("--show") == 0
    out = capsys.readouterr().out
    assert f"{cache_dir / 'autotune.json'} (2 entries)" in out
    assert ENV.key in out and "NVIDIA A10" in out
    assert "BLOCK_M=2 BLOCK_N=4096 ROWS_PER_PROGRAM=2 num_warps=8" in out
    assert "x1.25" in out  # speedup over the heuristic


def test_show_empty(cache_dir, capsys):
    assert cli("--show") == 0
    assert "(0 entries)" in capsys.readouterr().out


def test_clear(cache_dir, capsys):
    cache = seed(cache_dir)
    assert cli("--clear") == 0
    assert "cleared 2 tuned entries" in capsys.readouterr().out
    assert not cache.path.exists()


def test_cache_dir_option(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLOTH_CORE_CACHE_DIR", str(tmp_path / "elsewhere"))  # restored after the test
    seed(tmp_path)
    assert cli("--show", "--cache-dir", str(tmp_path)) == 0
    assert "(2 entries)" in capsys.readouterr().out


def test_without_cuda_exits_non_zero_with_a_message(cache_dir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli("--model", "llama-3-8b", "--seq", "2048") == 2  # as `sloth-core bench` without a GPU
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "Traceback" not in err


def test_under_the_interpreter_exits_non_zero(cache_dir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert cli("--model", "llama-3-8b") == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    ((), "give --model"),
    (("--model", "llama-9000"), "unknown model"),
    (("--model", "llama-3-8b", "--seq", "0"), "positive"),
])
def test_bad_arguments(cache_dir, capsys, argv, message):
    assert cli(*argv) == 2
    assert message in capsys.readouterr().err


def test_presets_and_config_json(tmp_path):
    assert set(presets.PRESETS) == {"llama-3-8b", "gemma-2-9b", "qwen3-8b", "mistral-7b"}
    llama = model_shape("Llama-3-8B")
    assert (llama.hidden, llama.intermediate, llama.vocab, llama.qk_norm) == (4096, 14336, 128256, False)
    assert model_shape("gemma-2-9b").activation == "gelu_tanh"
    config = {"model_type": "qwen3", "hidden_size": 2048, "intermediate_size": 6144, "num_attention_heads": 16,
              "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "hidden_act": "silu"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for spec in (str(tmp_path), str(tmp_path / "config.json")):
        shape = model_shape(spec)
        assert (shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.qk_norm) == (2048, 16, 8, 128, True)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"hidden_size": 1}')
    with pytest.raises(ValueError, match="lacks"):
        model_shape(str(tmp_path / "bad"))


def test_launch_keys():
    qwen = model_shape("qwen3-8b")
    keys = launch_keys(qwen, 4096, torch.bfloat16, num_sms=132)
    norms = [k["n_rows"] for name, k in keys if name == "rms_norm"]
    assert norms == [4096, 4096 * 32, 4096 * 8]  # decoder norms, q_norm, k_norm
    kernels = [name for name, _ in keys]
    assert kernels.count("gated_activation") == kernels.count("rope") == 1
    assert dict(keys)["gated_activation"]["n"] == 4096 * 12288
    llama_keys = launch_keys(model_shape("llama-3-8b"), 4096, torch.bfloat16, 132)
    assert [name for name, _ in llama_keys].count("rms_norm") == 1
    chunks = loss_chunk_keys(qwen, 4096, 1536, torch.bfloat16)
    assert [k["n_rows"] for _, k in chunks] == [1536, 1024]  # full chunks and the remainder


def test_full_run_with_a_fake_gpu(cache_dir, capsys, monkeypatch):
    """The plan (every kernel, two sequence lengths, the loss chunks), the progress bar, the storage and the
    summary table -- with the tuner faked (nothing is timed on the CPU)."""
    tuned = []

    def fake_tune(kernel, bucket, **_):
        spec = tuner.get_space(kernel)
        tuned.append((kernel, dict(bucket)))
        cfg = spec.heuristic(bucket)
        return tuner.TuneResult(kernel, dict(bucket), cfg, 1.0, cfg, 1.5, 0.25, [tuner.Trial(cfg, ms=1.0)])

    class Props:
        multi_processor_count = 132

    monkeypatch.setattr(cli_tune, "_no_gpu_reason", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    monkeypatch.setattr(runtime, "current_environment", lambda: ENV)
    monkeypatch.setattr(tuner, "tune", fake_tune)
    assert cli("--model", "llama-3-8b", "--seq", "1024", "2048", "--dtype", "bf16") == 0
    out = capsys.readouterr().out
    kernels = {k for k, _ in tuned}
    assert kernels == {"rms_norm", "gated_activation", "rope", "fused_linear_cross_entropy", "cross_entropy"}
    assert len(tuned) == len({(k, json.dumps(b, sort_keys=True)) for k, b in tuned})  # each bucket once
    entries = TuningCache(cache_dir / "autotune.json").entries()
    assert len(entries) == len(tuned) and all(e["environment"] == ENV.key for e in entries)
    assert "x1.50" in out and "tuned" in out
    # a second run finds everything in the cache
    tuned.clear()
    assert cli("--model", "llama-3-8b", "--seq", "1024", "2048", "--kernels", "rope", "rms_norm") == 0
    assert tuned == [] and "cached" in capsys.readouterr().out
    assert cli("--model", "llama-3-8b", "--seq", "1024", "--kernels", "rope", "--retune") == 0
    assert [k for k, _ in tuned] == ["rope"]
