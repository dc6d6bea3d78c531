"""bf16 accuracy at least Hugging Face's (issue 20, item 2): against a float64 copy of the same LoRA model, the
optimized bf16 model's loss, logits and LoRA gradients are no further off than the unoptimized bf16 model's,
within a stated slack, on each tiny architecture.

Slack: 1.5x HF's bf16 error, on a GPU and on the CPU alike. Triton's interpreter truncates fp32 -> bf16 casts
where the GPU rounds to nearest even, which alone made a bf16 RMSNorm output ~2.6x further from float64 than HF's
(benchmarks/results/rms_norm_bf16_cpu_20261206.txt); the tests make it round (tests/interpreter_rounding.py), and
only where they cannot is the CPU bound 4x.
"""
import copy

import pytest
import torch

import sloth_core
from sloth_core.tiny import TINY_MODEL_TYPES, tiny_model
from tests import interpreter_rounding
from tests.batches import token_batch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SLACK = {"cuda": 1.5, "cpu": 1.5 if interpreter_rounding.rounds() else 4.0}
FLOOR = 1e-3


def _lora_model(model_type, device):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(model_type, device=device)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    with torch.no_grad():  # B = 0 at init would leave A's gradients zero: nothing to compare
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return model


def _run(model, ids, labels):
    loss = model(input_ids=ids, labels=labels).loss  # the fused loss: no logits
    loss.backward()
    grads = torch.cat([p.grad.double().flatten() for _, p in sorted(model.named_parameters()) if p.grad is not None])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return {"loss": loss.detach().double().reshape(1), "logits": logits.double().flatten(), "lora grads": grads}


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_optimized_bf16_is_no_further_from_float64_than_hf_bf16(model_type, device):
    base = _lora_model(model_type, device)
    ids, labels = token_batch(device, s=16)
    truth = _run(copy.deepcopy(base).to(torch.float64), ids, labels)
    hf = _run(copy.deepcopy(base).to(torch.bfloat16), ids, labels)
    optimized = sloth_core.optimize(copy.deepcopy(base).to(torch.bfloat16))
    replaced = {r.pattern for r in sloth_core.report(optimized) if r.status == "replaced"}
    assert {"rms_norm", "lora_linear"} <= replaced, replaced  # kernels ran: the comparison can fail
    ours = _run(optimized, ids, labels)
    slack = SLACK[torch.device(device).type]
    lines, worse = [], []
    for name in truth:
        e_hf, e_ours = _rel(hf[name], truth[name]), _rel(ours[name], truth[name])
        lines.append(f"{name}: HF bf16 {e_hf:.2e}, sloth_core bf16 {e_ours:.2e} ({e_ours / max(e_hf, 1e-30):.2f}x)")
        if e_ours > max(slack * e_hf, FLOOR):
            worse.append(name)
    print(f"{model_type}: " + "; ".join(lines))
    assert not worse, f"{model_type}: further from float64 than HF's bf16 by more than {slack}x: " + "; ".join(lines)
