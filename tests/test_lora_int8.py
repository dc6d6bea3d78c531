"""LoRA on LLM.int8 bases (bitsandbytes ``Linear8bitLt``, as ``load_in_8bit`` builds them, ``threshold=6``) on the
fused path: the weight dequantized bitwise as bitsandbytes dequantizes it; in training mode (bitsandbytes' CPU path
multiplies with that weight) loss and LoRA gradients equal PEFT's to float32 rounding and all seven projections
are reported replaced; in eval mode bitsandbytes quantizes the input to int8 too: that setting is verified against
it on first use (float32's tolerance refuses it: PEFT's forward runs, reported ``fallback``)."""
import copy
import warnings

import pytest
import torch
from torch import nn

import sloth_core
from sloth_core.kernels.dequant_int8 import dequantize_int8
from sloth_core.tiny import tiny_model
from sloth_core.tolerances import assert_close, rel_err
from tests.batches import token_batch

bnb = pytest.importorskip("bitsandbytes")


def _int8(lin: nn.Linear, device) -> nn.Module:
    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None, has_fp16_weights=False,
                            threshold=6.0)
    # from the CPU: bitsandbytes quantizes an Int8Params when it moves from the CPU to the device (on the CPU too)
    q.weight = bnb.nn.Int8Params(lin.weight.data.to("cpu", torch.float16), requires_grad=False,
                                 has_fp16_weights=False)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to(device)


def _model(device, dropout=0.0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = tiny_model("llama", device=device)  # float32: bitsandbytes' training path is exact there
    try:
        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, lin in list(parent.named_children()):
                    if isinstance(lin, nn.Linear):
                        setattr(parent, name, _int8(lin, device))
    except Exception as e:  # pragma: no cover - depends on the bitsandbytes build
        pytest.skip(f"Linear8bitLt cannot be built on {device} here: {e}")
    model.is_loaded_in_8bit = True
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


def _step(model, ids, labels, train):
    model.train(train)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad for n, p in model.named_parameters()
                                                     if p.grad is not None}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_int8_base_trains_as_peft(dropout, device):
    ref = _model(device, dropout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sloth_core.optimize(copy.deepcopy(ref).train(), gradient_checkpointing="offload",
                                    return_logits=True)
    rows = [r for r in sloth_core.report(model) if r.pattern in ("lora_linear", "lora_mlp", "lora_qkv")]
    assert len(rows) == 2 * (7 + 2) and all(r.status == "replaced" for r in rows), \
        [(r.module, r.status, r.detail) for r in rows if r.status != "replaced"]
    ids, labels = token_batch(device)
    logits, loss, grads = _step(model, ids, labels, True)
    want_logits, want_loss, want_grads = _step(ref, ids, labels, True)
    if device == "cpu":  # bitsandbytes' CPU training path: x @ dequantized W in float32
        assert_close("logits", logits, want_logits, torch.float32, scale=4)
        assert_close("loss", loss, want_loss, torch.float32)
        assert grads.keys() == want_grads.keys() and len(grads) == 2 * 2 * 7
        for name in grads:
            assert_close(name, grads[name], want_grads[name], torch.float32, scale=8)
    assert all(r.status == "replaced" for r in sloth_core.report(model) if r.pattern.startswith("lora"))
    # eval mode: bitsandbytes quantizes the input to int8 too; the new setting is verified against that forward,
    # which float32's tolerance refuses (on the GPU bitsandbytes runs that forward in both modes, in bf16 / fp16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logits, loss, _ = _step(model, ids, labels, False)
        want_logits, want_loss, _ = _step(ref, ids, labels, False)
    assert rel_err(logits, want_logits) < 2e-2 and abs(loss - want_loss) / want_loss < 2e-2
    for r in sloth_core.report(model):
        if r.pattern.startswith("lora") and r.status != "replaced":
            assert r.status == "fallback" and "does not verify" in r.detail, (r.module, r.status, r.detail)


def test_dequantized_int8_weight_is_bitsandbytes(device):
    lin = nn.Linear(40, 24)
    layer = _int8(lin, device)
    cb, scb = layer.weight.data, layer.weight.SCB
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        want = cb.to(dtype, copy=True).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))  # bitsandbytes' own expression
        assert torch.equal(dequantize_int8(layer, dtype), want)
        assert torch.equal(dequantize_int8(layer, dtype, rows=(5, 17)), want[5:17])
    want = dequantize_int8(layer)
    layer(torch.randn(3, 40, device=device))  # the first forward moves CB, SCB to layer.state
    assert layer.weight.SCB is None and torch.equal(dequantize_int8(layer), want)
    assert (dequantize_int8(layer) - lin.weight.to(device)).abs().max() <= scb.max() / 127
