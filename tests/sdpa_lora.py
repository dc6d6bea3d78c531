"""The tiny PEFT LoRA models with sdpa attention and the step shared by the offload tests
(tests/test_attention_offload.py, tests/test_qkv_offload.py)."""
import pytest
import torch

from sloth_core import attention_offload as ao
from sloth_core import checkpointing as ck
from sloth_core.memory import host
from sloth_core.tiny import tiny_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def dtype_for(device):
    """bf16 on CUDA (a fused attention kernel: flash / cuDNN), fp32 on the CPU (its fused flash kernel)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def assert_same(a, b, name, device):
    """``a`` equals ``b`` bitwise on the CPU; within bf16 tolerance on CUDA."""
    if torch.device(device).type == "cpu":
        assert torch.equal(a, b), name
    else:  # the GPU attention backward need not be bitwise deterministic
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3, msg=name)


def sdpa_overrides(model_type):
    """Config overrides for a tiny preset on sdpa attention: sdpa has no attention-logit soft-capping (Gemma2's;
    transformers 5.17 ignored it there, 5.2x raises), so the sdpa variant of Gemma2 has none."""
    return {"attn_logit_softcapping": None} if model_type == "gemma2" else {}


def sdpa_lora_model(model_type, device, **overrides):
    """A tiny ``model_type`` model on sdpa attention with r=4 LoRA on every linear layer (non-zero B)."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model(model_type, dtype=dtype_for(device), device=device,
                       **{**sdpa_overrides(model_type), **overrides})
    model.config._attn_implementation = "sdpa"  # the tiny presets use eager attention
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    with torch.no_grad():  # B = 0 at init: give the adapters values so their gradients are not trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def run_step(model, ids, labels):
    """One forward and backward: ``(loss, {name: grad})`` of the parameters that require grad."""
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def offload_on_cpu(monkeypatch):
    """CPU tensors take the whole offload path (plain host buffers), and every tensor an attention node saves goes
    to the host stash (the tiny shapes are below ``MIN_BYTES``)."""
    monkeypatch.setattr(host, "OFFLOAD_CPU_INPUTS", True)
    monkeypatch.setattr(ao, "MIN_BYTES", 1)
