"""RMSNorm kernels against a float64 reference, HF's low-precision semantics and the transformers modules."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sloth_core.autotune import override
from sloth_core.kernels import rms_norm as rms_norm_module
from sloth_core.kernels._runtime import interpreting, next_power_of_2
from sloth_core.kernels.rms_norm import rms_norm, rms_norm_reference
from sloth_core.tolerances import assert_close, tolerance
from tests import interpreter_rounding

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OFFSETS = {"llama": 0.0, "gemma": 1.0}

# The loaded profile, plus: the ``device`` fixture is a constant, safe to share between examples.
profile = settings(suppress_health_check=[*settings.default.suppress_health_check,
                                          HealthCheck.function_scoped_fixture])


# --------------------------------------------------------------------------------------------- helpers


def forced_config(block_n: int | None, block_m: int, rows_per_program: int):
    """Launch every rms_norm kernel with this config (``block_n=None``: one block as wide as the row)."""

    def heuristic(*, n_cols, **_):
        bn = block_n or next_power_of_2(n_cols)
        return dict(BLOCK_N=bn, BLOCK_M=block_m, ROWS_PER_PROGRAM=rows_per_program, num_warps=1)

    return override("rms_norm", heuristic)


def least_precise(*dtypes: torch.dtype) -> torch.dtype:
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def make_x(layout: str, rows: int, n_cols: int, dtype, device, scale: float) -> torch.Tensor:
    """An input with ``rows`` rows (2 * rows for the transposed layout) in the given memory layout."""
    if layout == "2d":
        x = torch.randn(rows, n_cols, device=device)
    elif layout == "3d":
        x = torch.randn(1, rows, n_cols, device=device)
    elif layout == "transposed_4d":  # Gemma3 q_norm: [B, S, H, D] -> transpose(1, 2) -> [B, H, S, D]
        x = torch.randn(1, rows, 2, n_cols, device=device).transpose(1, 2)
    else:
        raise AssertionError(layout)
    return (x * scale).to(dtype)


def make_weight(cast: str, n_cols: int, dtype, device, requires_grad: bool) -> torch.Tensor:
    center = 0.0 if cast == "gemma" else 1.0
    w = (center + 0.5 * torch.randn(n_cols, device=device)).to(dtype)
    return w.requires_grad_(requires_grad)


def assert_close_to_magnitude(name, actual, expected, magnitude, dtype):
    """``actual`` vs ``expected`` where ``expected`` is a sum of terms of total size ``magnitude`` (elementwise,
    float64): the error is measured against the terms, not against their possibly cancelling sum."""
    tol = tolerance(dtype)
    diff = (actual.double().cpu() - expected.double().cpu()).abs()
    magnitude = magnitude.double().cpu()
    rms = magnitude.square().mean().sqrt().item() if magnitude.numel() else 0.0
    bound = tol.atol * rms + tol.rtol * magnitude
    assert not torch.isnan(actual).any(), f"{name}: NaN in result"
    worst = int(torch.argmax(diff - bound)) if diff.numel() else 0
    assert (diff <= bound).all(), (f"{name}: element {worst} off by {diff.flatten()[worst]:.3e} "
                                   f"(bound {bound.flatten()[worst]:.3e})")
    err = torch.linalg.vector_norm(diff).item() / max(torch.linalg.vector_norm(magnitude).item(), 1e-300)
    assert err <= tol.rel_norm, f"{name}: error {err:.3e} of the terms' norm (bound {tol.rel_norm:.1e})"


def gradient_magnitudes(x, weight, dy, eps, offset):
    """Elementwise sizes of the terms of dx = r * (g - xhat * mean(g * xhat)) and of dw = sum(dy * xhat)."""
    x, dy = x.double(), dy.double()
    r = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    xhat = x * r
    g = dy * (offset + weight.double())
    c = (g * xhat).mean(-1, keepdim=True)
    dx_terms = r * (g.abs() + (xhat * c).abs())
    dw_terms = (dy * xhat).abs().reshape(-1, x.shape[-1]).sum(0)
    return dx_terms, dw_terms


def check_against_float64(x, weight, eps, cast):
    """Forward, dx and dw of the kernel path against autograd through the float64 reference."""
    offset = OFFSETS[cast]
    x = x.detach().requires_grad_(True)
    out = rms_norm(x, weight, eps, offset, cast)
    assert out.shape == x.shape
    assert out.dtype == rms_norm_reference(x.detach(), weight.detach(), eps, offset, cast).dtype
    dy = torch.randn(out.shape, device=out.device).to(out.dtype)

    x64 = x.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    expected = rms_norm_reference(x64, w64, eps, offset, cast)
    dx64, dw64 = torch.autograd.grad(expected, (x64, w64), dy.double())

    assert_close("forward", out, expected, dtype=x.dtype)
    inputs = (x, weight) if weight.requires_grad else (x,)
    grads = torch.autograd.grad(out, inputs, dy, retain_graph=True)
    dx_terms, dw_terms = gradient_magnitudes(x.detach(), weight.detach(), dy, eps, offset)
    assert grads[0].dtype == x.dtype
    assert_close_to_magnitude("dx", grads[0], dx64, dx_terms, x.dtype)
    if weight.requires_grad:
        assert grads[1].dtype == weight.dtype
        assert_close_to_magnitude("dw", grads[1], dw64, dw_terms, least_precise(x.dtype, weight.dtype))
    else:
        dx_only = out.grad_fn.apply(dy)  # the backward itself: a frozen weight gets no reduction, no gradient
        assert dx_only[1] is None


def ulps(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|actual - expected| in units of the last place of ``dtype`` at ``expected``."""
    a, e = actual.double(), expected.double()
    fi = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(e.abs().clamp_min(fi.tiny)))
    return (a - e).abs() / (fi.eps * torch.exp2(exponent))


# --------------------------------------------------------------------------------------------- properties


shapes = st.tuples(st.sampled_from([1, 2, 5, 17, 40]), st.sampled_from([1, 3, 33, 100, 257, 1000, 2100]))


@profile
@given(shape=shapes, dtype=st.sampled_from(DTYPES), fp32_weight=st.booleans(),
       cast=st.sampled_from(["llama", "gemma"]), weight_grad=st.booleans(),
       eps=st.sampled_from([1e-6, 1e-5, 1e-2]), scale=st.sampled_from([1e-3, 1.0, 30.0]),
       layout=st.sampled_from(["2d", "3d", "transposed_4d"]), seed=st.integers(0, 2**16))
@example(shape=(17, 257), dtype=torch.bfloat16, fp32_weight=False, cast="gemma", weight_grad=True, eps=1e-6,
         scale=1.0, layout="transposed_4d", seed=0)
@example(shape=(1, 2100), dtype=torch.float16, fp32_weight=True, cast="llama", weight_grad=False, eps=1e-5,
         scale=30.0, layout="3d", seed=1)
def test_matches_float64_reference(device, shape, dtype, fp32_weight, cast, weight_grad, eps, scale, layout,
                                   seed):
    torch.manual_seed(seed)
    rows, n_cols = shape
    x = make_x(layout, rows, n_cols, dtype, device, scale)
    weight = make_weight(cast, n_cols, torch.float32 if fp32_weight else dtype, device, weight_grad)
    check_against_float64(x, weight, eps, cast)


@pytest.mark.parametrize("block_n", [16, None], ids=["column_loop", "one_block"])
@profile
@given(rows=st.integers(1, 13), n_cols=st.sampled_from([3, 17, 40, 100]), dtype=st.sampled_from(DTYPES),
       cast=st.sampled_from(["llama", "gemma"]), weight_grad=st.booleans(), seed=st.integers(0, 2**16))
@example(rows=13, n_cols=100, dtype=torch.bfloat16, cast="gemma", weight_grad=True, seed=0)
def test_small_blocks_many_programs(device, block_n, rows, n_cols, dtype, cast, weight_grad, seed):
    """Force 2-row tiles, several tiles a program, several programs and (column_loop) 16-column blocks, so
    the column loop, the per-program dw accumulation and the two-stage dw sum are all exercised."""
    torch.manual_seed(seed)
    x = make_x("2d", rows, n_cols, dtype, device, 1.0)
    weight = make_weight(cast, n_cols, dtype, device, weight_grad)
    with forced_config(block_n, block_m=2, rows_per_program=4):
        check_against_float64(x, weight, 1e-6, cast)


def rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` as the kernel's float32 -> ``dtype`` casts do it: round to nearest even, except that
    Triton's interpreter truncates float32 -> bfloat16 where the tests could not make it round
    (tests/interpreter_rounding.py)."""
    if dtype == torch.bfloat16 and interpreting() and not interpreter_rounding.rounds():
        return (t.float().view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    return t.to(dtype)


def hf_in_dtype(x, weight, eps, offset, cast, to_dtype=rounded):
    """HF's computation in the input dtype, with its two casts done by ``to_dtype``."""
    x32 = x.float()
    xhat = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if cast == "gemma":
        return to_dtype(xhat * (offset + weight.float()), x.dtype)
    w_eff = to_dtype(offset + weight.float(), weight.dtype)  # HF adds in the weight's dtype
    return to_dtype(w_eff.float() * to_dtype(xhat, x.dtype).float(), torch.promote_types(weight.dtype, x.dtype))


def assert_same_roundings(out, x, weight, eps, offset, cast):
    """The kernel reproduces HF's intermediate roundings, so it rarely differs from HF's result at all: only
    where float32 summation order or rsqrt moves a value across a rounding boundary, by one ulp of the
    rounded value (for llama that is xhat's, then scaled by |w_eff|, so up to 2 ulps of the output)."""
    expected = hf_in_dtype(x, weight, eps, offset, cast)
    assert out.dtype == expected.dtype
    distance = ulps(out, expected, x.dtype)
    assert distance.max() <= 2, f"max {distance.max().item()} ulps"
    assert (distance > 0).double().mean() <= 0.01, f"{(distance > 0).double().mean().item():.2%} differ"


@pytest.mark.parametrize("cast", ["llama", "gemma"])
@pytest.mark.parametrize("dtype, weight_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                                 (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)])
def test_low_precision_matches_hf_roundings(device, cast, dtype, weight_dtype):
    torch.manual_seed(0)
    x = torch.randn(64, 1000, device=device).to(dtype)
    weight = make_weight(cast, 1000, weight_dtype, device, False)
    offset = OFFSETS[cast] if cast == "gemma" else 0.25  # llama-style with an offset: w_eff rounded to w.dtype
    assert torch.equal(hf_in_dtype(x, weight, 1e-6, offset, cast, to_dtype=lambda t, d: t.to(d)),
                       rms_norm_reference(x, weight, 1e-6, offset, cast))
    assert_same_roundings(rms_norm(x, weight, 1e-6, offset, cast), x, weight, 1e-6, offset, cast)


@pytest.mark.parametrize("layout", ["sliced_rows", "strided_columns", "permuted_5d", "expanded_grad"])
def test_non_contiguous_layouts(device, layout):
    torch.manual_seed(1)
    n_cols = 48
    if layout == "sliced_rows":
        x = torch.randn(10, 2 * n_cols, device=device)[::3, :n_cols]
    elif layout == "strided_columns":
        x = torch.randn(n_cols, 6, device=device).t()
    elif layout == "permuted_5d":  # more than three leading levels: copied
        x = torch.randn(2, 3, 2, 2, n_cols, device=device).permute(3, 1, 0, 2, 4)
    else:
        x = torch.randn(3, 4, n_cols, device=device)
    x = x.to(torch.bfloat16).requires_grad_(True)
    weight = make_weight("llama", n_cols, torch.bfloat16, device, True)
    if layout != "expanded_grad":
        check_against_float64(x, weight, 1e-6, "llama")
        return
    out = rms_norm(x, weight, 1e-6)
    dy = torch.ones((), device=device, dtype=out.dtype).expand(out.shape)  # all-zero strides
    dx, dw = torch.autograd.grad(out, (x, weight), dy)
    x64, w64 = x.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    dx64, dw64 = torch.autograd.grad(rms_norm_reference(x64, w64, 1e-6), (x64, w64), dy.double())
    dx_terms, dw_terms = gradient_magnitudes(x.detach(), weight.detach(), dy, 1e-6, 0.0)
    assert_close_to_magnitude("dx", dx, dx64, dx_terms, torch.bfloat16)
    assert_close_to_magnitude("dw", dw, dw64, dw_terms, torch.bfloat16)


@pytest.mark.parametrize("cast", ["llama", "gemma"])
def test_weight_gradient_only(device, cast):
    """x without a gradient (dx is not computed), weight with one; fp32 weight on bf16 activations."""
    torch.manual_seed(5)
    x = torch.randn(9, 70, device=device).to(torch.bfloat16)
    weight = make_weight(cast, 70, torch.float32, device, True)
    out = rms_norm(x, weight, 1e-6, OFFSETS[cast], cast)
    dy = torch.randn(out.shape, device=device).to(out.dtype)
    (dw,) = torch.autograd.grad(out, (weight,), dy)
    w64 = weight.detach().double().requires_grad_(True)
    (dw64,) = torch.autograd.grad(rms_norm_reference(x.double(), w64, 1e-6, OFFSETS[cast], cast), (w64,), dy.double())
    _, dw_terms = gradient_magnitudes(x, weight.detach(), dy, 1e-6, OFFSETS[cast])
    assert dw.dtype == torch.float32
    assert_close_to_magnitude("dw", dw, dw64, dw_terms, torch.float32)


def _hf_module(name: str, n_cols: int, eps: float, dtype, device):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    cls = {"llama": LlamaRMSNorm, "gemma": GemmaRMSNorm, "gemma3": Gemma3RMSNorm}[name]
    module = cls(n_cols, eps=eps).to(device=device, dtype=dtype)
    with torch.no_grad():
        module.weight.copy_(make_weight("llama" if name == "llama" else "gemma", n_cols, dtype, device, False))
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["llama", "gemma", "gemma3"])
def test_matches_transformers_module(device, name, dtype):
    torch.manual_seed(2)
    eps, n_cols = 1e-6, 96
    module = _hf_module(name, n_cols, eps, dtype, device)
    cast = "llama" if name == "llama" else "gemma"
    if name == "gemma3":  # per-head q_norm on a transposed [B, H, S, D] view
        x = torch.randn(2, 5, 3, n_cols, device=device).to(dtype).transpose(1, 2)
    else:
        x = torch.randn(2, 7, n_cols, device=device).to(dtype)
    x_hf = x.detach().clone().requires_grad_(True)
    x_ours = x.detach().clone().requires_grad_(True)
    out_hf = module(x_hf)
    out = rms_norm(x_ours, module.weight, eps, OFFSETS[cast], cast)
    assert out.dtype == out_hf.dtype and out.shape == out_hf.shape
    assert torch.equal(out_hf, rms_norm_reference(x, module.weight, eps, OFFSETS[cast], cast))
    if dtype == torch.float32:
        assert_close("forward", out, out_hf, dtype=dtype)
    else:
        assert_same_roundings(out, x, module.weight, eps, OFFSETS[cast], cast)

    dy = torch.randn(out.shape, device=device).to(out.dtype)
    dx_hf, dw_hf = torch.autograd.grad(out_hf, (x_hf, module.weight), dy)
    dx, dw = torch.autograd.grad(out, (x_ours, module.weight), dy)
    # HF's own low-precision backward rounds in between; the kernel's is the more accurate of the two.
    assert_close("dx", dx, dx_hf, dtype=dtype, scale=2.0)
    assert_close("dw", dw, dw_hf, dtype=dtype, scale=2.0)


# --------------------------------------------------------------------------------------------- dispatch


def test_float64_takes_reference_path(device, monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("the Triton path ran for float64")

    monkeypatch.setattr(rms_norm_module, "_forward", no_kernel)
    torch.manual_seed(3)
    for cast in ("llama", "gemma"):
        x = torch.randn(4, 3, 37, device=device, dtype=torch.float64, requires_grad=True)
        weight = make_weight(cast, 37, torch.float64, device, True)
        out = rms_norm(x, weight, 1e-5, OFFSETS[cast], cast)
        expected = rms_norm_reference(x, weight, 1e-5, OFFSETS[cast], cast)
        assert torch.equal(out, expected)
        dy = torch.randn_like(out)
        for got, want in zip(torch.autograd.grad(out, (x, weight), dy),
                             torch.autograd.grad(expected, (x, weight), dy)):
            assert torch.equal(got, want)


def test_empty_input(device):
    x = torch.randn(0, 16, device=device, dtype=torch.bfloat16)
    out = rms_norm(x, torch.ones(16, device=device, dtype=torch.bfloat16), 1e-6)
    assert out.shape == (0, 16)


def test_reference_is_hf_formula_in_float32():
    """The reference itself, written out once more from the HF source (fp32, both casts)."""
    torch.manual_seed(4)
    x = torch.randn(3, 10)
    w = torch.randn(10)
    variance = x.pow(2).mean(-1, keepdim=True)
    xhat = x * torch.rsqrt(variance + 1e-6)
    assert torch.equal(rms_norm_reference(x, w, 1e-6), w * xhat)
    assert torch.equal(rms_norm_reference(x, w, 1e-6, 1.0, "gemma"), xhat * (1.0 + w))
    assert math.isclose(rms_norm_reference(x, w, 1e-6, 0.5, "llama")[0, 0].item(),
                        ((0.5 + w[0]) * xhat[0, 0]).item(), rel_tol=1e-6)


@pytest.mark.parametrize("x_shape, w_shape, cast, match", [
    ((4, 8), (7,), "llama", "weight"),
    ((4, 8), (8, 1), "llama", "weight"),
    ((4, 8), (2, 4), "gemma", "weight"),
    ((), (1,), "llama", "x must have"),
    ((4, 8), (8,), "t5", "cast"),
])
def test_bad_inputs_raise(device, x_shape, w_shape, cast, match):
    x = torch.randn(x_shape, device=device)
    weight = torch.ones(w_shape, device=device)
    with pytest.raises(ValueError, match=match):
        rms_norm(x, weight, 1e-6, cast=cast)
    with pytest.raises(ValueError, match=match):
        rms_norm_reference(x, weight, 1e-6, cast=cast)
