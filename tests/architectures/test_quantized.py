"""bitsandbytes 4-bit (NF4, double quant) models: optimize() swaps the same patterns and the loss and LoRA gradients
match the unoptimized QLoRA model. bitsandbytes' 4-bit layers run on the CPU, so this runs everywhere."""

import pytest
import torch

import sloth_core
from sloth_core.tolerances import assert_close
from tests.quantized import load_4bit, save_tiny_llama

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def test_qlora_model_parity(saved_llama, device):
    ref = _lora(load_4bit(saved_llama, device))
    model = sloth_core.optimize(_lora(load_4bit(saved_llama, device)))
    assert type(model.get_base_model().model.layers[0].mlp.gate_proj.base_layer).__name__ == "Linear4bit"
    skipped = [(r.module, r.pattern, r.detail) for r in sloth_core.report(model) if r.status == "skipped"]
    assert not skipped
    assert {r.pattern for r in sloth_core.report(model) if r.status == "replaced"} == {
        "rms_norm", "lora_mlp", "lora_linear", "rope", "lora_qkv", "causal_lm_loss"}
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0)).to(device)
    losses, grads = [], []
    for m in (ref, model):
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert_close("loss", losses[1], losses[0], torch.bfloat16)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert_close(f"grad {n}", grads[1][n], grads[0][n], torch.bfloat16, scale=4)
