"""Fused lm_head + cross-entropy vs the float64 HF reference (loss and gradients of hidden, weight, bias)."""
import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sloth_core.autotune import override
from sloth_core.kernels.cross_entropy import transform_logits_reference
from sloth_core.kernels.fused_linear_cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from sloth_core.tolerances import assert_close
from tests.kernels.test_cross_entropy import grad_seed, loss_cases, make_labels, num_items_arg, well_conditioned

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# The loaded profile, plus: the ``device`` fixture is a constant, safe to share between examples.
profile = settings(suppress_health_check=[*settings.default.suppress_health_check,
                                          HealthCheck.function_scoped_fixture])


@contextlib.contextmanager
def forced_launch(chunk_tokens=None, **ce_overrides):
    """Force the token chunk of the fused op and launch parameters of the cross-entropy kernel."""
    chunk = {} if chunk_tokens is None else {"chunk_tokens": chunk_tokens}
    with override("fused_linear_cross_entropy", **chunk), override("cross_entropy", **ce_overrides):
        yield


def make_inputs(n_tokens, n_hidden, vocab, dtype, with_bias, ignore, gen, device, softcap=None, logit_scale=None):
    """Logits ~ N(0, 2^2): the rounding of the logits to ``dtype`` (as HF's lm_head does) stays small.
    Labels are well conditioned (see ``well_conditioned``) for the transform ``softcap``/``logit_scale``."""
    hidden = torch.randn(n_tokens, n_hidden, generator=gen)
    weight = torch.randn(vocab, n_hidden, generator=gen) * (2.0 / n_hidden ** 0.5)
    bias = torch.randn(vocab, generator=gen) * 0.5 if with_bias else None
    labels = make_labels(n_tokens, vocab, ignore, gen, "cpu")
    hidden, weight, bias = (None if t is None else t.to(dtype).to(device) for t in (hidden, weight, bias))
    logits64 = torch.nn.functional.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    labels = well_conditioned(labels, transform_logits_reference(logits64, softcap, logit_scale))
    return hidden, weight, bias, labels.to(device)


def check_against_reference(hidden, weight, bias, labels, loss_kwargs, gen, requires=(True, True, True),
                            n_chunks=1):
    """Loss and the gradients of the inputs flagged in ``requires`` (hidden, weight, bias) vs float64.

    Gradients pass two roundings to the input dtype before their matmuls (the logits, as HF's lm_head output,
    and their gradient, as HF's backward does): tolerance x2 (an fp16 emulation of HF itself reaches ~1.3x
    the plain fp16 tolerance on these inputs). dW also accumulates in the weight dtype, rounded once per token
    chunk: x sqrt(n_chunks) more."""
    inputs = [t if t is None else t.clone().requires_grad_(r) for t, r in zip((hidden, weight, bias), requires)]
    loss = fused_linear_cross_entropy(inputs[0], inputs[1], labels, inputs[2], **loss_kwargs)
    inputs64 = [t if t is None else t.detach().double().requires_grad_(r) for t, r in zip(inputs, requires)]
    loss64 = fused_linear_cross_entropy_reference(inputs64[0], inputs64[1], labels, inputs64[2], **loss_kwargs)
    assert loss.dtype == torch.float32
    assert_close("loss", loss, loss64, dtype=hidden.dtype)

    differentiable = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    if not differentiable:
        return loss, []
    seed = grad_seed(loss, gen)
    grads = torch.autograd.grad(loss, [inputs[i] for i in differentiable], seed)
    grads64 = torch.autograd.grad(loss64, [inputs64[i] for i in differentiable], seed.double())
    for i, grad, grad64 in zip(differentiable, grads, grads64):
        name = ("grad hidden", "grad weight", "grad bias")[i]
        assert grad.dtype == inputs[i].dtype, name
        assert_close(name, grad, grad64, dtype=hidden.dtype, scale=2.0 * (n_chunks ** 0.5 if i == 1 else 1.0))
    return loss, grads


@st.composite
def flce_cases(draw):
    return dict(
        draw(loss_cases()),
        n_hidden=draw(st.sampled_from([8, 24, 40])),
        chunk_tokens=draw(st.sampled_from([1, 3, 7, 256])),
        with_bias=draw(st.booleans()),
        requires=(draw(st.booleans()), draw(st.booleans()), draw(st.booleans())),
    )


@profile
@given(case=flce_cases())
def test_fused_linear_cross_entropy_matches_reference(case, device):
    gen = torch.Generator().manual_seed(case["seed"])
    hidden, weight, bias, labels = make_inputs(case["n_tokens"], case["n_hidden"], case["vocab"], case["dtype"],
                                               case["with_bias"], case["ignore"], gen, device, case["softcap"],
                                               case["logit_scale"])
    kwargs = dict(softcap=case["softcap"], logit_scale=case["logit_scale"], reduction=case["reduction"],
                  num_items_in_batch=num_items_arg(case["num_items"], labels, device))
    with forced_launch(chunk_tokens=case["chunk_tokens"], BLOCK_V=case["block_v"]):
        check_against_reference(hidden, weight, bias, labels, kwargs, gen, case["requires"],
                                n_chunks=-(-case["n_tokens"] // case["chunk_tokens"]))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_several_chunks_all_gradients(dtype, reduction, device):
    """Deterministic: 11 tokens in chunks of 4 (ragged tail), V=203 over BLOCK_V=64, bias, soft-cap, scale."""
    gen = torch.Generator().manual_seed(0)
    hidden, weight, bias, labels = make_inputs(11, 24, 203, dtype, True, "some", gen, device, 4.0, 0.8)
    with forced_launch(chunk_tokens=4, BLOCK_V=64):
        check_against_reference(hidden, weight, bias, labels,
                                dict(softcap=4.0, logit_scale=0.8, reduction=reduction), gen, n_chunks=3)


def test_frozen_weight_has_no_grad(device):
    """LoRA: lm_head frozen -> weight.grad stays None; hidden gets the gradient of 3 * loss."""
    gen = torch.Generator().manual_seed(1)
    hidden, weight, _, labels = make_inputs(9, 16, 150, torch.bfloat16, False, "some", gen, device)
    hidden.requires_grad_()
    with forced_launch(chunk_tokens=4, BLOCK_V=64):
        (fused_linear_cross_entropy(hidden, weight, labels) * 3).backward()
    hidden64 = hidden.detach().double().requires_grad_()
    (fused_linear_cross_entropy_reference(hidden64, weight.double(), labels) * 3).backward()
    assert weight.grad is None
    assert_close("grad hidden", hidden.grad, hidden64.grad, dtype=torch.bfloat16)


def test_backward_twice_raises(device):
    gen = torch.Generator().manual_seed(2)
    hidden, weight, _, labels = make_inputs(4, 8, 40, torch.float32, False, "none", gen, device)
    hidden.requires_grad_()
    loss = fused_linear_cross_entropy(hidden, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_no_grad_forward(device):
    gen = torch.Generator().manual_seed(3)
    hidden, weight, bias, labels = make_inputs(6, 8, 70, torch.float32, True, "some", gen, device, 5.0)
    hidden.requires_grad_()
    with torch.no_grad(), forced_launch(chunk_tokens=4):
        loss = fused_linear_cross_entropy(hidden, weight, labels, bias, softcap=5.0)
    assert loss.grad_fn is None
    expected = fused_linear_cross_entropy_reference(hidden.double(), weight.double(), labels, bias.double(),
                                                    softcap=5.0)
    assert_close("loss", loss, expected, dtype=torch.float32)


def test_all_ignored_matches_torch(device):
    """mean: NaN loss and zero gradients (F.cross_entropy's 0/0); num_items_in_batch: loss 0, zero grads."""
    gen = torch.Generator().manual_seed(4)
    hidden, weight, bias, labels = make_inputs(5, 8, 50, torch.float32, True, "all", gen, device)
    with forced_launch(chunk_tokens=2):
        loss, grads = check_against_reference(hidden, weight, bias, labels, {}, gen)
        assert torch.isnan(loss) and all(torch.count_nonzero(g) == 0 for g in grads)
        loss, grads = check_against_reference(hidden, weight, bias, labels, dict(num_items_in_batch=7), gen)
        assert loss.item() == 0.0 and all(torch.count_nonzero(g) == 0 for g in grads)


def test_large_vocab(device):
    """V = 128256 with the default heuristics (many BLOCK_V chunks per row)."""
    gen = torch.Generator().manual_seed(5)
    hidden, weight, _, labels = make_inputs(2, 8, 128256, torch.bfloat16, False, "none", gen, device, 30.0)
    labels[1] = 128255
    check_against_reference(hidden, weight, None, labels, dict(softcap=30.0), gen, (True, True, False))


def test_autocast_matches_reference(device):
    """fp32 parameters under autocast: the matmuls run in the autocast dtype, gradients come back in fp32."""
    gen = torch.Generator().manual_seed(6)
    hidden, weight, _, labels = make_inputs(7, 16, 90, torch.float32, False, "some", gen, device)
    hidden.requires_grad_(), weight.requires_grad_()
    with torch.autocast(device.type, dtype=torch.bfloat16), forced_launch(chunk_tokens=3):
        loss = fused_linear_cross_entropy(hidden, weight, labels)
        expected = fused_linear_cross_entropy_reference(hidden, weight, labels)
    grads = torch.autograd.grad(loss, (hidden, weight))
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    assert_close("loss", loss, expected, dtype=torch.bfloat16)
    for name, grad, grad_ref in zip(("grad hidden", "grad weight"), grads, expected_grads):
        assert grad.dtype == torch.float32
        assert_close(name, grad, grad_ref, dtype=torch.bfloat16)


def test_float64_takes_reference_path(device):
    gen = torch.Generator().manual_seed(7)
    hidden, weight, bias, labels = make_inputs(4, 8, 30, torch.float64, True, "none", gen, device)
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias, logit_scale=0.5)
    assert torch.equal(loss, fused_linear_cross_entropy_reference(hidden, weight, labels, bias, logit_scale=0.5))


@pytest.mark.parametrize("hidden_shape, weight_shape, bias_shape, n_labels, match", [
    ((4, 8), (10, 8), None, 3, "labels"),
    ((4, 8), (10, 6), None, 4, "weight"),
    ((4, 8), (10, 8), (9,), 4, "bias"),
    ((2, 4, 8), (10, 8), None, 4, "hidden"),
    ((4, 8), (10,), None, 4, "weight"),
])
def test_bad_shapes_raise(hidden_shape, weight_shape, bias_shape, n_labels, match, device):
    hidden, weight = torch.randn(hidden_shape, device=device), torch.randn(weight_shape, device=device)
    bias = None if bias_shape is None else torch.randn(bias_shape, device=device)
    with pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy(hidden, weight, torch.zeros(n_labels, dtype=torch.long, device=device), bias)


def test_bad_labels_raise(device):
    hidden, weight = torch.randn(3, 8, device=device), torch.randn(10, 8, device=device)
    with pytest.raises(ValueError, match="labels"):
        fused_linear_cross_entropy(hidden, weight, torch.tensor([0, 10, -100], device=device))
    with pytest.raises(ValueError, match="hidden"):
        fused_linear_cross_entropy(hidden.long(), weight, torch.tensor([0, 1, 2], device=device))
