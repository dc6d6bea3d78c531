"""Greedy ``generate`` of optimized models (KV cache: prefill, then one token a step with offset positions through
the bound RoPE) gives the unoptimized model's tokens, with and without ``for_inference``; the inference mode's
switches. Tiny random models on the CPU (bitsandbytes runs 4-bit layers there).

The default run covers Llama with an NF4 double-quant QLoRA base (and tests/test_bench_generate.py a bf16 LoRA Llama
with for_inference); ``SLOTH_CORE_SLOW_TESTS=1`` adds Llama, Qwen3 and Gemma2 in fp32, bf16 and NF4 (marked
``slow``: ~10-30 s each on a shared 2-core machine)."""
import os
import warnings

import pytest
import torch

import sloth_core
from sloth_core.inference_mode import MODE_ATTR
from sloth_core.tiny import tiny_model
from sloth_core.warning import SlothCoreWarning

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NEW_TOKENS = 12

slow = pytest.mark.skipif(os.environ.get("SLOTH_CORE_SLOW_TESTS") != "1",
                          reason="slow: set SLOTH_CORE_SLOW_TESTS=1")


def build(model_type, dtype, quant, device):
    """A tiny one-layer ``model_type`` model with r=4 LoRA (non-zero B) on every projection; ``quant="nf4"``: NF4
    double-quant ``Linear4bit`` bases with bf16 compute (intermediate 128: whole 64-element blocks a row)."""
    from peft import LoraConfig, get_peft_model

    from sloth_core.bench.train_models import quantize_nf4

    model = tiny_model(model_type, dtype=dtype, device=device, intermediate_size=128, num_hidden_layers=1)
    if quant == "nf4":
        quantize_nf4(model, device)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def greedy(model, device):
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0)).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlothCoreWarning)  # a binding falling back during decoding fails the test
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 5 + NEW_TOKENS)
    return out


def check_generate(model_type, dtype, quant, device):
    expected = greedy(build(model_type, dtype, quant, device).eval(), device)
    model = sloth_core.optimize(build(model_type, dtype, quant, device))
    assert {"rope", "lora_mlp", "lora_linear"} <= {r.pattern for r in sloth_core.report(model)
                                                   if r.status == "replaced"}
    model.eval()
    assert torch.equal(greedy(model, device), expected), "optimized"
    sloth_core.for_inference(model)
    assert torch.equal(greedy(model, device), expected), "for_inference"
    verified = sloth_core.api.unwrap(model).__dict__[MODE_ATTR].verified
    assert verified and all(why is None for why in verified.values())  # every setting verified, none refused
    decode_keys = [k for k in verified if k[3] == 2]  # (pattern, dtype, device, rows: 2 a decoding step, ...)
    assert {k[0] for k in decode_keys} == {"lora_linear", "lora_mlp"}  # decoding steps took the inference path


def test_llama_nf4_generate_matches_unoptimized(device):
    check_generate("llama", torch.bfloat16, "nf4", device)


@slow
@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma2"])
@pytest.mark.parametrize("dtype,quant", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "nf4")],
                         ids=["fp32", "bf16", "nf4"])
def test_generate_matches_unoptimized(model_type, dtype, quant, device):
    check_generate(model_type, dtype, quant, device)


def test_for_inference_needs_an_optimized_model(device):
    with pytest.raises(ValueError, match="optimize"):
        sloth_core.for_inference(build("llama", torch.float32, None, device))


def test_modes_switch_and_gradients_take_the_training_path(device):
    """for_inference: eval(), the mode on the LoRA modules; with gradients on the training path runs (same output,
    a graph) and one warning says so; for_training takes the mode off and restores the train() flag."""
    model = sloth_core.optimize(build("llama", torch.float32, None, device))
    ids = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(1)).to(device)
    model.train()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    sloth_core.for_inference(model)
    assert not model.training and sloth_core.in_inference_mode(model)
    base = sloth_core.api.unwrap(model)
    assert base.model.layers[0].mlp.__dict__[MODE_ATTR] is base.__dict__[MODE_ATTR]
    with torch.no_grad():
        inferred = model(input_ids=ids).logits
    torch.testing.assert_close(inferred, trained, rtol=1e-5, atol=1e-5)
    with pytest.warns(SlothCoreWarning, match="gradients are enabled"):
        out = model(input_ids=ids).logits
    assert out.grad_fn is not None
    torch.testing.assert_close(out.detach(), trained, rtol=1e-5, atol=1e-5)
    sloth_core.for_training(model)
    assert model.training and not sloth_core.in_inference_mode(model)
    assert not any(MODE_ATTR in m.__dict__ for m in model.modules())
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_restore_takes_the_inference_mode_off(device):
    model = sloth_core.optimize(build("llama", torch.float32, "none", device))
    sloth_core.for_inference(model)
    sloth_core.restore(model)
    assert not sloth_core.in_inference_mode(model)
