"""Gated activation ``act(gate) * up``: Triton kernels against a float64 reference and HF's activations."""
from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers.activations import ACT2FN

from sloth_core.autotune import override
from sloth_core.kernels import gated_activation as ga
from sloth_core.tolerances import assert_close

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HF_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}
SMALL_BLOCK = 16  # forced block size: shapes up to 3*3*70 elements span many blocks plus a partial one


def forced_block(block: int | None):
    """Override the launch heuristic's BLOCK (None: keep the registered heuristic)."""
    return contextlib.nullcontext() if block is None else override("gated_activation", BLOCK=block)


shapes = st.builds(lambda lead, n: (*lead, n),
                   st.lists(st.integers(1, 3), min_size=0, max_size=2),
                   st.integers(1, 70))


def _inputs(shape, dtype, seed, transposed=False):
    """gate, up (scaled to reach the activations' tails) and an upstream gradient, all in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    gate, up, dh = (torch.randn(shape, generator=gen, dtype=torch.float64) * s for s in (3.0, 1.0, 1.0))
    gate, up, dh = (t.to(DEVICE, dtype) for t in (gate, up, dh))
    if transposed and gate.dim() >= 2:  # non-contiguous views of the same logical shape
        gate, up = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (gate, up))
    return gate, up, dh


def _forward_and_grads(fn, gate, up, dh, activation):
    gate = gate.detach().requires_grad_()
    up = up.detach().requires_grad_()
    h = fn(gate, up, activation)
    dg, du = torch.autograd.grad(h, (gate, up), dh)
    return h, dg, du


def _float64_expected(gate, up, dh, activation):
    return _forward_and_grads(ga.gated_activation_reference, gate.double(), up.double(), dh.double(), activation)


@given(shape=shapes, activation=st.sampled_from(ga.ACTIVATIONS), dtype=st.sampled_from(KERNEL_DTYPES),
       block=st.sampled_from([None, SMALL_BLOCK]), transposed=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_kernel_matches_float64_reference(shape, activation, dtype, block, transposed, seed):
    gate, up, dh = _inputs(shape, dtype, seed, transposed)
    gate_before, up_before = gate.clone(), up.clone()
    with forced_block(block):
        h, dg, du = _forward_and_grads(ga.gated_activation, gate, up, dh, activation)
    assert h.dtype == dg.dtype == du.dtype == dtype and h.shape == dg.shape == du.shape == gate.shape
    h64, dg64, du64 = _float64_expected(gate, up, dh, activation)
    assert_close(f"{activation} h", h, h64, dtype=dtype)
    assert_close(f"{activation} d gate", dg, dg64, dtype=dtype)
    assert_close(f"{activation} d up", du, du64, dtype=dtype)
    assert torch.equal(gate, gate_before) and torch.equal(up, up_before), "backward overwrote its inputs"


@pytest.mark.parametrize("activation", ga.ACTIVATIONS)
def test_kernel_path_saves_only_gate_and_up(activation, device):
    gate = torch.randn(4, 33, device=device, requires_grad=True)
    up = torch.randn(4, 33, device=device, requires_grad=True)
    h = ga.gated_activation(gate, up, activation)
    assert type(h.grad_fn).__name__ == "_GatedActivationFunctionBackward", "Triton path was not taken"
    saved = h.grad_fn.saved_tensors
    assert len(saved) == 2 and all(t.shape == gate.shape for t in saved)


@given(shape=shapes, activation=st.sampled_from(ga.ACTIVATIONS), dtype=st.sampled_from(KERNEL_DTYPES),
       seed=st.integers(0, 2**31 - 1))
def test_kernel_matches_hf_activation_in_dtype(shape, activation, dtype, seed):
    hf_act = ACT2FN[HF_ACTIVATIONS[activation]]
    gate, up, dh = _inputs(shape, dtype, seed)
    h, dg, du = _forward_and_grads(ga.gated_activation, gate, up, dh, activation)
    h_hf, dg_hf, du_hf = _forward_and_grads(lambda g, u, _: hf_act(g) * u, gate, up, dh, activation)
    assert_close(f"{activation} h vs HF", h, h_hf, dtype=dtype)
    assert_close(f"{activation} d gate vs HF", dg, dg_hf, dtype=dtype)
    assert_close(f"{activation} d up vs HF", du, du_hf, dtype=dtype)


@pytest.mark.parametrize("activation", ga.ACTIVATIONS)
def test_reference_is_hf_in_float64(activation):
    gate, up, _ = _inputs((5, 7), torch.float64, seed=0)
    expected = ACT2FN[HF_ACTIVATIONS[activation]](gate) * up
    assert torch.equal(ga.gated_activation_reference(gate, up, activation), expected)


@pytest.mark.parametrize("activation", ga.ACTIVATIONS)
def test_float64_takes_reference_path(activation, monkeypatch):
    def no_kernel(*args):
        raise AssertionError("the Triton path was taken for float64")

    monkeypatch.setattr(ga._GatedActivationFunction, "apply", no_kernel)
    gate, up, dh = _inputs((3, 11), torch.float64, seed=1)
    got = _forward_and_grads(ga.gated_activation, gate, up, dh, activation)
    expected = _float64_expected(gate, up, dh, activation)
    for name, a, e in zip(("h", "d gate", "d up"), got, expected):
        assert torch.equal(a, e), name


def test_mismatched_shapes_raise(device):
    gate = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match="gate has shape"):
        ga.gated_activation(gate, torch.randn(2, 9, device=device), "silu")
    with pytest.raises(ValueError, match="gate has shape"):
        ga.gated_activation(gate, torch.randn(8, device=device), "silu")


def test_unknown_activation_raises(device):
    x = torch.randn(4, device=device)
    with pytest.raises(ValueError, match="unknown activation"):
        ga.gated_activation(x, x, "relu")


@given(n=st.integers(1, 300), activation=st.sampled_from(ga.ACTIVATIONS), dtype=st.sampled_from(KERNEL_DTYPES),
       block=st.sampled_from([None, SMALL_BLOCK]), seed=st.integers(0, 2**31 - 1))
def test_outputs_written_over_the_inputs(n, activation, dtype, block, seed):
    """The fused LoRA MLP writes the forward's ``h`` over ``gate``, and in its chunked backward ``dg`` over
    ``gate``, ``du`` over ``up`` and ``h = act(g) * u`` over ``dh`` in one launch; each equals the float64
    reference (and ``h`` the forward kernel's value)."""
    gate, up, dh = _inputs((n,), dtype, seed)
    h64, dg64, du64 = _float64_expected(gate, up, dh, activation)
    with forced_block(block):
        h_kernel = ga._forward(gate, up, activation)
        over_gate = gate.clone()
        assert ga._forward(over_gate, up, activation, out=over_gate).data_ptr() == over_gate.data_ptr()
        assert torch.equal(over_gate, h_kernel), "the forward written over its gate input differs"
        dg, du = ga._backward(dh, gate, up, activation, out=(gate, up), h_out=dh)
    assert dg.data_ptr() == gate.data_ptr() and du.data_ptr() == up.data_ptr()
    assert_close(f"{activation} h", dh, h64, dtype=dtype)
    assert torch.equal(dh, h_kernel)
    assert_close(f"{activation} d gate", dg, dg64, dtype=dtype)
    assert_close(f"{activation} d up", du, du64, dtype=dtype)
