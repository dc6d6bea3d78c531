"""LoRA with ``lora_dropout > 0`` on the fused path: the masks are PEFT's own (drawn from torch's generator as its
``nn.Dropout`` draws them), so under one seed the optimized model's loss and LoRA gradients equal PEFT's (float32:
to rounding), the generator ends where PEFT's does, a checkpointed layer's recompute uses the first forward's masks,
eval mode is the identity; a kernel that ignored the mask is refused by verification."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import sloth_core
from sloth_core.kernels import lora_linear as LL
from sloth_core.tiny import tiny_model
from sloth_core.tolerances import assert_close
from tests.batches import token_batch
from tests.kernels.test_lora import fused_path_taken, inputs, peft_linear, spec_of

P = 0.3


def _model(device, dropout=P):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama", device=device), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():  # LoRA B starts at zero: give the adapters (and so the masks) an effect
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


def _step(model, ids, labels, train: bool):
    model.train(train)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    after = torch.rand(4)  # where the generator ended
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, after


def _lora_rows(model):
    return [r for r in sloth_core.report(model) if r.pattern.startswith("lora")]


@pytest.mark.parametrize("checkpointing", [None, "offload"])
def test_dropout_trains_as_peft_under_the_same_seed(checkpointing, device):
    ref = _model(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sloth_core.optimize(copy.deepcopy(ref).eval(), gradient_checkpointing=checkpointing)
    rows = _lora_rows(model)
    assert {r.pattern for r in rows} == {"lora_linear", "lora_mlp", "lora_qkv"}
    ids, labels = token_batch(device)
    for train in (True, False):  # eval at optimize: training's dropout is verified on its first call
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss, grads, after = _step(model, ids, labels, train)
        assert not [w for w in caught if "lora" in str(w.message)], "no LoRA fallback"
        want_loss, want_grads, want_after = _step(ref, ids, labels, train)
        assert_close(f"loss (train={train})", loss, want_loss, torch.float32)
        assert grads.keys() == want_grads.keys() and any("lora_A" in n for n in grads)
        for name in want_grads:
            assert_close(f"{name} (train={train})", grads[name], want_grads[name], torch.float32, scale=4)
        assert torch.equal(after, want_after), "the generator must advance as PEFT's does"
    assert all(r.status == "replaced" for r in _lora_rows(model)), [(r.module, r.status) for r in _lora_rows(model)]
    # the comparison means something: PEFT's dropout changes the loss
    assert (_step(ref, ids, labels, True)[0] - _step(ref, ids, labels, False)[0]).abs() > 1e-3


def test_a_kernel_ignoring_the_mask_is_refused_by_verification(device, monkeypatch):
    monkeypatch.setattr(LL, "dropout_mask", lambda x, p, dtype: (torch.ones(x.shape, dtype=torch.bool,
                                                                            device=x.device),
                                                                 torch.ones((), dtype=dtype)))
    model = sloth_core.optimize(copy.deepcopy(_model(device)).eval())
    ids, labels = token_batch(device)
    with pytest.warns(sloth_core.SlothCoreWarning, match="does not verify"):
        _step(model, ids, labels, True)
    # every projection runs PEFT's forward (lora_qkv answers through them)
    rows = [r for r in _lora_rows(model) if r.pattern != "lora_qkv"]
    assert rows and [(r.module, r.status) for r in rows if r.status != "fallback"] == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_linear_dropout_draws_peft_masks(dtype, device):
    """One layer: output, input and adapter gradients equal PEFT's layer under one seed; the mask is PEFT's
    (float32: to rounding), and without it the output is far off."""
    gen = torch.Generator().manual_seed(3)
    layer = peft_linear(48, 40, dtype, device, gen, lora_dropout=0.5).train()
    with torch.no_grad():
        B = layer.lora_B["default"].weight
        B.copy_(torch.randn(B.shape, generator=gen) * 0.5)  # (drawn on the CPU generator, for every device)
    spec = spec_of(layer)
    assert spec.dropout == 0.5
    x = inputs((3, 5, 48), dtype, device, gen)
    dy = torch.randn((3, 5, 40), generator=gen).to(device, dtype)

    def run(fn, *args):
        xi = x.detach().clone().requires_grad_()
        torch.manual_seed(11)
        y = fn(xi, *args)
        grads = torch.autograd.grad(y, (xi, spec.A, spec.B), dy)
        return y, grads

    y, grads = run(LL.lora_linear, *spec)
    assert fused_path_taken(y, "_LoRALinearFunctionBackward")
    want, want_grads = run(layer.forward)
    scale = 1 if dtype == torch.float32 else 4
    assert_close("y", y, want, dtype, scale=scale)
    for name, g, w in zip(("dx", "dA", "dB"), grads, want_grads):
        assert_close(name, g, w, dtype, scale=scale)
    without, _ = run(LL.lora_linear, *spec[:4])
    assert (without - want).float().norm() > 0.1 * (want.float() - layer.base_layer(x).float()).norm()
    keep, factor = LL.dropout_mask(x, 0.5, spec.A.dtype)
    torch.manual_seed(11)
    assert torch.equal(keep, F.dropout(torch.ones_like(x, dtype=spec.A.dtype), 0.5) != 0)
    assert factor.item() == 2.0
