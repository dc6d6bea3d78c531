"""Model-level parity: for every declared architecture, the optimized tiny model's logits, loss and every gradient
match the unoptimized model, bare and LoRA-wrapped; restore() is bit-identical; a second optimize() is a no-op."""
import copy
import warnings

import pytest
import torch

import sloth_core
from sloth_core.tiny import TINY_MODEL_TYPES, tiny_model
from sloth_core.tolerances import assert_close
from tests.batches import token_batch

EXPECTED = {"rms_norm", "gated_mlp", "rope", "causal_lm_loss"}
LORA_EXPECTED = {"rms_norm", "lora_mlp", "lora_linear", "rope", "lora_qkv", "causal_lm_loss"}


def _batch(device, **kw):
    return token_batch(device, **{"s": 7, **kw})


def _step(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # without labels the logits come back as before
    return logits, out.loss.detach(), grads


def _assert_parity(ref_model, opt_model, dtype):
    ids, labels = _batch(ref_model.device)
    logits0, loss0, grads0 = _step(ref_model, ids, labels)
    logits1, loss1, grads1 = _step(opt_model, ids, labels)
    assert_close("logits", logits1, logits0, dtype, scale=4)
    assert_close("loss", loss1, loss0, dtype, scale=4)
    assert grads0.keys() == grads1.keys() and grads0
    for name in grads0:
        assert_close(f"grad {name}", grads1[name], grads0[name], dtype, scale=8)


def _replaced(model):
    return {r.pattern for r in sloth_core.report(model) if r.status == "replaced"}


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_bare_model_parity_restore_and_idempotence(model_type, device):
    ref = tiny_model(model_type, device=device)
    model = copy.deepcopy(ref)
    assert sloth_core.optimize(model) is model
    assert _replaced(model) == EXPECTED
    assert not [r for r in sloth_core.report(model) if r.status == "skipped"]
    _assert_parity(ref, model, torch.float32)

    with pytest.warns(sloth_core.SlothCoreWarning, match="already optimized"):
        sloth_core.optimize(model)
    assert len(sloth_core.report(model)) > 0

    sloth_core.restore(model)
    assert sloth_core.report(model) == []
    ids, _ = _batch(device)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
@pytest.mark.parametrize("when", ["before_peft", "after_peft"])
def test_lora_model_parity(model_type, when, device):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    base = tiny_model(model_type, device=device)
    ref = get_peft_model(copy.deepcopy(base), cfg)
    # LoRA B starts at zero; give it values so the adapters change the function and receive real gradients.
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    if when == "before_peft":
        model = get_peft_model(sloth_core.optimize(copy.deepcopy(base)), cfg)
        model.load_state_dict(ref.state_dict())
        assert _replaced(model) == EXPECTED
        _assert_parity(ref, model, torch.float32)  # LoRA layers added after optimize: PEFT's path, still exact
        sloth_core.optimize(model)  # binds what PEFT added: fused LoRA layers, the LoRA MLP instead of gated_mlp
        mlp_rows = [r for r in sloth_core.report(model) if r.pattern == "gated_mlp"]
        assert mlp_rows and all(r.status == "superseded" and r.detail == "by lora_mlp" for r in mlp_rows)
    else:
        model = sloth_core.optimize(copy.deepcopy(ref))
    assert _replaced(model) == LORA_EXPECTED
    assert not [r for r in sloth_core.report(model) if r.status == "skipped"]
    _assert_parity(ref, model, torch.float32)
    lora_grads = [n for n, p in model.named_parameters() if p.grad is not None]
    assert lora_grads and all("lora_" in n for n in lora_grads)


def test_bf16_llama_parity(device):
    ref = tiny_model("llama", dtype=torch.bfloat16, device=device)
    model = sloth_core.optimize(copy.deepcopy(ref))
    assert _replaced(model) == EXPECTED
    _assert_parity(ref, model, torch.bfloat16)


def test_optimize_inside_no_grad_and_eval(device):
    ref = tiny_model("qwen3", device=device).eval()
    model = copy.deepcopy(ref)
    with torch.no_grad():
        sloth_core.optimize(model)
    assert _replaced(model) == EXPECTED
    _assert_parity(ref.train(), model.train(), torch.float32)


def test_optimize_leaves_rng_state_alone(device):
    model = tiny_model("llama", device=device)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sloth_core.optimize(model)
    assert torch.equal(torch.rand(3), expected)


def test_verbose_prints_table(capsys, device):
    model = tiny_model("gemma2", device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sloth_core.optimize(model, verbose=True)
    out = capsys.readouterr().out
    assert "model.layers.0.mlp" in out and "gated_mlp" in out and "replaced" in out
    assert "model.layers.1.pre_feedforward_layernorm" in out


def test_modules_where_no_kernel_runs_are_skipped(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = tiny_model("llama")
    with pytest.warns(sloth_core.SlothCoreWarning, match="nothing was replaced"):
        sloth_core.optimize(model)
    rows = sloth_core.report(model)
    assert rows and all(r.status == "skipped" and "need a CUDA device" in r.detail for r in rows)


def test_float64_model_is_skipped_with_reason(device):
    model = tiny_model("llama", dtype=torch.float64, device=device)
    with pytest.warns(sloth_core.SlothCoreWarning):
        sloth_core.optimize(model)
    assert all("float64 has no kernel" in r.detail for r in sloth_core.report(model))


@pytest.mark.parametrize("mode", ["on", "offload"])
def test_gradient_checkpointing_option(mode, device):
    ref = tiny_model("gemma3_text", device=device)
    model = sloth_core.optimize(copy.deepcopy(ref).eval(), gradient_checkpointing=mode)  # eval mode: still ours
    rows = [r for r in sloth_core.report(model) if r.pattern == "checkpointing"]
    assert {r.module for r in rows} == {"model.layers.0", "model.layers.1"}
    _assert_parity(ref.eval(), model, torch.float32)
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        sloth_core.optimize(model, gradient_checkpointing="sometimes")
    sloth_core.restore(model)
    ids, _ = _batch(device)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
