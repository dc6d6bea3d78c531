"""``sloth_core.save_merged``: a LoRA model on a 16-bit, NF4, FP4 or 8-bit base written as a merged bf16 checkpoint
that plain ``from_pretrained`` loads with the adapter model's logits; shards, tokenizer files, no overwrite, nothing
left behind by a failed write."""
import json
import warnings

import pytest
import torch
from torch import nn

import sloth_core
from sloth_core import export
from sloth_core.tiny import tiny_model
from sloth_core.tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BASES = ["bf16", "nf4", "fp4", "int8"]


def _quantize(model: nn.Module, base: str) -> nn.Module:
    """The decoder's projections as bitsandbytes layers of ``base`` (the rest in bf16), as ``from_pretrained`` with a
    ``BitsAndBytesConfig`` gives them."""
    model = model.to(torch.bfloat16)
    if base == "bf16":
        return model.to(DEVICE)
    bnb = pytest.importorskip("bitsandbytes")
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, nn.Linear):
                    continue
                if base == "int8":
                    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                            has_fp16_weights=False)
                    q.weight = bnb.nn.Int8Params(lin.weight.data.to(torch.float16), requires_grad=False,
                                                 has_fp16_weights=False)
                else:
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                          compute_dtype=torch.bfloat16, quant_type=base, compress_statistics=True)
                    q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type=base,
                                                 compress_statistics=True)
                setattr(parent, name, q)
    try:
        model = model.to(DEVICE)
    except Exception as e:  # pragma: no cover - depends on the bitsandbytes build
        pytest.skip(f"{base} layers cannot be built on {DEVICE} here: {e}")
    model.is_loaded_in_8bit, model.is_loaded_in_4bit = base == "int8", base in ("nf4", "fp4")
    return model


def _adapter_model(base: str):
    from peft import LoraConfig, get_peft_model

    # 4-bit blocks of 64 along the input features: every in_features a multiple of 64 (bitsandbytes' CPU kernels)
    model = get_peft_model(_quantize(tiny_model("llama", intermediate_size=128), base),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def _ids(vocab):
    return torch.randint(2, vocab, (2, 12), generator=torch.Generator().manual_seed(1)).to(DEVICE)


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(DEVICE).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("base", BASES)
def test_the_merged_checkpoint_loads_with_the_adapter_models_logits(base, tmp_path):
    model = _adapter_model(base)
    try:
        ids = _ids(model.config.vocab_size)
        want = _logits(model, ids)
    except Exception as e:  # pragma: no cover - LLM.int8 matmuls on this build
        if base != "int8":
            raise
        pytest.skip(f"the 8-bit adapter model cannot run here: {e}")
    out = sloth_core.save_merged(model, tmp_path / "merged", progress=False)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    loaded = _load(out)
    assert all(type(m).__name__ == "Linear" for m in loaded.modules() if "proj" in type(m).__name__.lower()
               or isinstance(m, nn.Linear))
    assert_close(f"{base} logits", _logits(loaded, ids), want, dtype=torch.bfloat16, scale=4.0)


def test_an_optimized_model_exports_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    plain, optimized = _adapter_model("bf16"), _adapter_model("bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sloth_core.optimize(optimized, gradient_checkpointing="offload")
    a = load_file(str(sloth_core.save_merged(plain, tmp_path / "a", progress=False) / "model.safetensors"))
    b = load_file(str(sloth_core.save_merged(optimized, tmp_path / "b", progress=False) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("lora" in k or "base_layer" in k for k in a)


def test_shards_and_tokenizer_files(tmp_path):
    from tests.test_trainers import _tokenizer

    model = _adapter_model("bf16")
    out = sloth_core.save_merged(model, tmp_path / "sharded", tokenizer=_tokenizer(128), max_shard_bytes=20_000,
                                 progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert all((out / f).is_file() for f in files) and not list(out.glob("part-*"))
    assert (out / "tokenizer.json").is_file()
    ids = _ids(model.config.vocab_size)
    assert_close("sharded logits", _logits(_load(out), ids), _logits(model, ids), dtype=torch.bfloat16, scale=4.0)


def test_an_existing_path_is_kept_unless_overwrite(tmp_path):
    model = _adapter_model("bf16")
    target = tmp_path / "merged"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        sloth_core.save_merged(model, target, progress=False)
    assert (target / "keep.txt").read_text() == "mine"
    sloth_core.save_merged(model, target, overwrite=True, progress=False)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    model = _adapter_model("bf16")
    calls = []
    real = export._Shards.flush

    def failing_flush(self):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(self)

    monkeypatch.setattr(export._Shards, "flush", failing_flush)
    with pytest.raises(OSError, match="disk full"):
        sloth_core.save_merged(model, tmp_path / "merged", max_shard_bytes=20_000, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_adapters_are_named(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama").to(torch.bfloat16),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True,
                                      task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj: DoRA adapter 'default' is not supported"):
        sloth_core.save_merged(model, tmp_path / "merged", progress=False)
    assert list(tmp_path.iterdir()) == []


_KILLED_WRITER = """
import sys, time, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {root!r})
import sloth_core
from sloth_core import export
from tests.test_export import _adapter_model

real = export._Shards.flush
def slow_flush(self):
    real(self)
    open({marker!r}, "w").close()  # a shard is on disk: the parent kills us now
    time.sleep(60)
export._Shards.flush = slow_flush
sloth_core.save_merged(_adapter_model("bf16"), {target!r}, max_shard_bytes=20_000, progress=False)
"""


def test_a_killed_write_leaves_nothing_under_the_name(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    marker, target = tmp_path / "marker", tmp_path / "out" / "merged"
    script = _KILLED_WRITER.format(root=root, marker=str(marker), target=str(target))
    child = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": root})
    try:
        deadline = time.time() + 120
        while not marker.exists() and child.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "the child never wrote a shard"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir() if not p.name.startswith(".merged.partial-")] == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_concurrent_writers_leave_one_whole_checkpoint(tmp_path, monkeypatch, overwrite):
    """Two writers of one path, both past the existence check before either renames its folder into place: one
    checkpoint ends up under the name, complete; the other writer raises FileExistsError naming the race (or, with
    ``overwrite``, may replace the first); no partial folder is left."""
    import threading

    target = tmp_path / "merged"
    if overwrite:
        target.mkdir()
        (target / "stale").write_text("an older checkpoint")
    both_written = threading.Barrier(2, timeout=60)
    real = export._put_in_place

    def put_in_place_together(work, path, overwrite_):
        both_written.wait()
        return real(work, path, overwrite_)

    monkeypatch.setattr(export, "_put_in_place", put_in_place_together)
    models = [_adapter_model("bf16") for _ in range(2)]
    outcomes = [None, None]

    def write(i):
        try:
            sloth_core.save_merged(models[i], target, overwrite=overwrite, progress=False)
            outcomes[i] = "written"
        except FileExistsError as exc:
            outcomes[i] = str(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "written" in outcomes, outcomes
    for outcome in outcomes:
        assert outcome == "written" or (str(target) in outcome and "save_merged" in outcome), outcome
    if not overwrite:
        assert sorted(outcomes)[0].startswith("save_merged:"), outcomes  # exactly one writer won
    assert not (target / "stale").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no partial or old folder left
    ids = _ids(models[0].config.vocab_size)
    assert_close("merged logits", _logits(_load(target), ids), _logits(models[0], ids).float(), dtype=torch.bfloat16)
