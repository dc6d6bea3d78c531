"""Gated activation with low-rank terms (``gated_lora``): Triton kernels against a float64 reference."""
from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sloth_core.autotune import override
from sloth_core.kernels import gated_activation as ga
from sloth_core.kernels import gated_lora as gl
from sloth_core.kernels._runtime import interpreting
from sloth_core.tolerances import assert_close

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def small_tiles(small: bool, dot: bool | None = None):
    """Force 16 x 16 tiles (many programs, partial edge tiles) or 64 x 128 ones, the low-rank product by
    ``tl.dot`` or by outer products (``dot``; ``None`` with large tiles: the registered heuristic)."""
    if not small and dot is None:
        return contextlib.nullcontext()
    size = 16 if small else 64
    return override("gated_lora", BLOCK_M=size, BLOCK_N=2 * size if not small else size, USE_DOT=int(bool(dot)),
                    num_warps=1)


def make_term(M: int, N: int, r: int, dtype, gen, b_layout: str, scale: float) -> gl.LowRank:
    """A term of magnitude ~1 (comparable to the base tensors): ``a`` a column slice of a wider tensor (strided
    rows), ``b`` [N, r] as a LoRA ``B`` ("b", in ``dtype`` or float32) or as the view ``A.t()`` of a column slice
    of a LoRA-like ``A`` [r, >N] ("a_t")."""
    a = torch.randn(M, r + 3, generator=gen, dtype=torch.float64)[:, 2:2 + r].to(DEVICE, dtype)
    if b_layout == "a_t":
        b = (torch.randn(r, N + 5, generator=gen, dtype=torch.float64) / r ** 0.5)[:, 4:4 + N].to(DEVICE, dtype).t()
    else:
        b_dtype = torch.float32 if b_layout == "b_fp32" else dtype
        b = (torch.randn(N, r, generator=gen, dtype=torch.float64) / r ** 0.5).to(DEVICE, b_dtype)
    return gl.LowRank(a, b, scale)


def as_kernel_rounds(t: torch.Tensor, dtype) -> torch.Tensor:
    """``t.to(dtype)`` as the kernel rounds it: Triton's interpreter truncates float32 -> bfloat16 casts."""
    if interpreting() and t.dtype == torch.float32 and dtype == torch.bfloat16:
        return (t.contiguous().view(torch.int32) & -65536).view(torch.float32).to(dtype)  # low 16 bits cut
    return t.to(dtype)


def float64_term(term: gl.LowRank | None, dtype) -> gl.LowRank | None:
    """The same term in float64, ``b`` rounded to ``dtype`` first as the kernel rounds it (the rest is exact:
    float32 accumulation of products of ``dtype`` values, as the float64 reference up to its roundoff)."""
    if term is None:
        return None
    return gl.LowRank(term.a.double(), as_kernel_rounds(term.b, dtype).double(), term.scale)


def expected(g0, u0, dh0, activation, terms, dtype):
    """Float64 ``h``, ``dg``, ``du`` (``dg = dL/dg0``: ``g = g0 + L_g``) and the full ``dh``."""
    tg, tu, th = (float64_term(t, dtype) for t in terms)
    g64 = g0.double().requires_grad_()
    u64 = u0.double().requires_grad_()
    h = gl.gated_lora_reference(g64, u64, activation, tg, tu)
    dh = dh0.double() if th is None else dh0.double() + th.dense(torch.float64)
    dg, du = torch.autograd.grad(h, (g64, u64), dh)
    return h.detach(), dg, du


terms_present = st.tuples(st.booleans(), st.booleans(), st.booleans())


@given(M=st.integers(1, 40), N=st.integers(1, 90), ranks=st.tuples(*[st.integers(1, 40)] * 3),
       present=terms_present, layouts=st.tuples(*[st.sampled_from(["b", "b_fp32", "a_t"])] * 3),
       activation=st.sampled_from(ga.ACTIVATIONS), dtype=st.sampled_from(KERNEL_DTYPES), small=st.booleans(),
       dot=st.sampled_from([None, False, True]), write_h=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_kernels_match_float64_reference(M, N, ranks, present, layouts, activation, dtype, small, dot, write_h,
                                         seed):
    gen = torch.Generator().manual_seed(seed)
    g0, u0, dh0 = (torch.randn(M, N, generator=gen, dtype=torch.float64) * s for s in (2.0, 1.0, 1.0))
    g0, u0, dh0 = (t.to(DEVICE, dtype) for t in (g0, u0, dh0))
    terms = [make_term(M, N, r, dtype, gen, layout, scale) if on else None
             for on, r, layout, scale in zip(present, ranks, layouts, (0.5, 2.0, 1.5))]
    before = [t.clone() for t in (g0, u0, dh0)]
    with small_tiles(small, dot):
        h = gl.gated_lora_forward(g0, u0, activation, terms[0], terms[1])
        h_out = torch.full_like(g0, float("nan")) if write_h else None
        dg, du = gl.gated_lora_backward(dh0, g0, u0, activation, *terms, h_out=h_out)
    h64, dg64, du64 = expected(g0, u0, dh0, activation, terms, dtype)
    assert_close("h", h, h64, dtype=dtype)
    assert_close("dg", dg, dg64, dtype=dtype)
    assert_close("du", du, du64, dtype=dtype)
    if write_h:
        assert_close("h from the backward", h_out, h64, dtype=dtype)
    assert all(torch.equal(t, b) for t, b in zip((g0, u0, dh0), before)), "the kernels wrote over their inputs"


@pytest.mark.parametrize("dot", [False, True])
@pytest.mark.parametrize("activation", ga.ACTIVATIONS)
def test_outputs_may_overwrite_the_inputs(activation, dot):
    """``out=(gate, up)``, ``h_out=dh`` (the MLP backward's chunk buffers) give the fresh-output results, and
    ``out=gate`` in the forward."""
    gen = torch.Generator().manual_seed(3)
    M, N, r = 37, 75, 16
    g0, u0, dh0 = (torch.randn(M, N, generator=gen).to(DEVICE) for _ in range(3))
    terms = [make_term(M, N, r, torch.float32, gen, layout, s) for layout, s in (("b", 0.5), ("b", 2.0), ("a_t", 1.0))]
    with small_tiles(True, dot):
        h = gl.gated_lora_forward(g0, u0, activation, *terms[:2])
        dg, du = gl.gated_lora_backward(dh0, g0, u0, activation, *terms, h_out=torch.empty_like(g0))
        g, u, dh = g0.clone(), u0.clone(), dh0.clone()
        h_over = gl.gated_lora_forward(g, u, activation, *terms[:2], out=g)
        assert h_over.data_ptr() == g.data_ptr() and torch.equal(h_over, h)
        g, u = g0.clone(), u0.clone()
        dg_over, du_over = gl.gated_lora_backward(dh, g, u, activation, *terms, out=(g, u), h_out=dh)
    assert torch.equal(dg_over, dg) and torch.equal(du_over, du) and torch.equal(dh, h)


def test_without_terms_equals_the_gated_activation_kernels():
    gen = torch.Generator().manual_seed(5)
    g0, u0, dh0 = (torch.randn(9, 70, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(3))
    h = gl.gated_lora_forward(g0, u0, "silu")
    dg, du = gl.gated_lora_backward(dh0, g0, u0, "silu")
    assert torch.equal(h, ga._forward(g0, u0, "silu"))
    dg_ref, du_ref = ga._backward(dh0, g0, u0, "silu")
    assert torch.equal(dg, dg_ref) and torch.equal(du, du_ref)


def test_bad_inputs_raise_naming_them():
    g0 = torch.randn(4, 8, device=DEVICE)
    term = gl.LowRank(torch.randn(4, 2, device=DEVICE), torch.randn(8, 2, device=DEVICE), 1.0)
    with pytest.raises(ValueError, match="up must be a contiguous"):
        gl.gated_lora_forward(g0, torch.randn(4, 9, device=DEVICE), "silu")
    with pytest.raises(ValueError, match="gate must be 2-D"):
        gl.gated_lora_forward(g0.reshape(2, 2, 8), g0.reshape(2, 2, 8), "silu")
    with pytest.raises(ValueError, match="up must be a contiguous"):
        gl.gated_lora_forward(g0, torch.randn(8, 4, device=DEVICE).t(), "silu")
    with pytest.raises(ValueError, match="gate term"):
        gl.gated_lora_forward(g0, g0.clone(), "silu", gl.LowRank(term.a, term.b[:5], 1.0))
    with pytest.raises(ValueError, match="dh term"):
        gl.gated_lora_backward(g0.clone(), g0, g0.clone(), "silu", dh_term=gl.LowRank(term.a[:3], term.b, 1.0))
    with pytest.raises(ValueError, match="unknown activation"):
        gl.gated_lora_forward(g0, g0.clone(), "relu")


@given(M=st.integers(1, 40), N=st.integers(1, 90), r=st.integers(1, 40),
       layout=st.sampled_from(["b", "b_fp32", "a_t"]), dtype=st.sampled_from(KERNEL_DTYPES), small=st.booleans(),
       dot=st.sampled_from([None, False, True]), seed=st.integers(0, 2**31 - 1))
def test_low_rank_add_matches_float64_reference(M, N, r, layout, dtype, small, dot, seed):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(M, N, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    term = make_term(M, N, r, dtype, gen, layout, 1.5)
    expected_y = y.double() + float64_term(term, dtype).dense(torch.float64)
    with small_tiles(small, dot):
        out = gl.low_rank_add_(y, term)
    assert out is y
    assert_close("y + s a b^T", y, expected_y, dtype=dtype)
