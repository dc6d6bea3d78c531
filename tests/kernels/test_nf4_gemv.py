"""Fused 4-bit dequantize-GEMV (decoding) against a float64 reference: ``x @ W^T`` with ``W`` the weight as
bitsandbytes dequantizes it into ``x``'s dtype (:func:`dequantize_4bit_reference`, itself bit-identical to
bitsandbytes: tests/kernels/test_dequant.py), every product and sum in float64. Outputs are NaN-poisoned
(conftest), so a row or split the kernel forgets fails."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sloth_core.autotune import override
from sloth_core.kernels.dequant import dequantize_4bit, dequantize_4bit_reference
from sloth_core.kernels.nf4_gemv import MAX_ROWS, gemv_reason, nf4_gemv, nf4_gemv_reference, nf4_gemv_weight
from sloth_core.tolerances import assert_close

F = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
profile = settings(suppress_health_check=[*settings.default.suppress_health_check,
                                          HealthCheck.function_scoped_fixture])


def _weight(n, k, quant_type, blocksize, nested, device, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn((n, k), generator=gen) * 0.05
    return F.quantize_4bit(w.to(device), blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)


def _x(m, k, dtype, device, seed):
    return torch.randn((m, k), generator=torch.Generator().manual_seed(seed + 1)).to(dtype).to(device)


def _float64(x, q, state, bias=None):
    y = x.double() @ dequantize_4bit_reference(q, state, dtype=x.dtype).double().t()
    return y if bias is None else y + bias.double()


def _tiles(block_n, block_k, split):
    return override("nf4_gemv", BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split)


@profile
@given(m=st.integers(1, MAX_ROWS), n=st.integers(1, 70), k=st.integers(2, 300), nested=st.booleans(),
       quant_type=st.sampled_from(["nf4", "fp4"]), dtype=st.sampled_from(DTYPES),
       tiles=st.sampled_from([None, (8, 32, 1), (16, 64, 3)]), seed=st.integers(0, 2 ** 16))
def test_matches_float64(m, n, k, nested, quant_type, dtype, tiles, seed, device):
    """Odd shapes (in/out features not multiples of the tile or the 64-element block: the unaligned path;
    multiples of 64: the aligned one), 1..8 rows, double quant on/off, one or several programs and K splits."""
    q, state = _weight(n, k, quant_type, 64, nested, device, seed)
    x = _x(m, k, dtype, device, seed)
    if tiles is None:
        y = nf4_gemv(x, q, state)
    else:
        with _tiles(*tiles):
            y = nf4_gemv(x, q, state)
    assert y.shape == (m, n) and y.dtype == dtype
    assert_close(f"gemv m={m} n={n} k={k}", y, _float64(x, q, state), dtype)


@pytest.mark.parametrize("k", [128, 192, 100])
@pytest.mark.parametrize("dtype", DTYPES)
def test_aligned_and_unaligned_paths_with_splits(k, dtype, device):
    """K a multiple of the block (aligned path; 192 = 3 blocks: the last 128-wide tile half empty) or not, split
    into K ranges whose partial sums torch adds; bias added once before the rounding."""
    q, state = _weight(37, k, "nf4", 64, True, device, seed=k)
    x = _x(5, k, dtype, device, seed=k)
    bias = torch.randn(37).to(dtype).to(device)
    for tiles in [(8, 128, 1), (8, 64, 2), (32, 128, 4)]:
        with _tiles(*tiles):
            y = nf4_gemv(x, q, state, bias=bias)
        assert_close(f"tiles {tiles}", y, _float64(x, q, state, bias), dtype)


@pytest.mark.parametrize("blocksize", [64, 512])
def test_close_to_the_dequantize_then_gemm_path(blocksize, device):
    """The decoding path and the prefill path (dequantize, then matmul) differ by the order of float32 sums (a
    blocksize of 512: the per-element path though K is a multiple of it)."""
    q, state = _weight(48, 1024, "nf4", blocksize, True, device, seed=5)
    x = _x(2, 1024, torch.bfloat16, device, seed=5)
    w = dequantize_4bit(q, state, dtype=torch.bfloat16)
    assert_close("gemv vs gemm", nf4_gemv(x, q, state), (x.float() @ w.float().t()).to(torch.bfloat16),
                 torch.bfloat16)


def test_reference_path_for_inputs_the_kernel_does_not_take(device):
    q, state = _weight(16, 64, "nf4", 64, False, device, seed=1)
    many = _x(MAX_ROWS + 1, 64, torch.bfloat16, device, seed=1)
    assert gemv_reason(many, q, state) is not None
    assert torch.equal(nf4_gemv(many, q, state), nf4_gemv_reference(many, q, state))
    x64 = _x(2, 64, torch.float64, device, seed=2)
    assert gemv_reason(x64, q, state) is not None
    y = nf4_gemv(x64, q, state)
    assert y.dtype == torch.float64
    assert torch.allclose(y, _float64(x64, q, state))
    with pytest.raises(ValueError, match="quant_state is missing"):
        nf4_gemv(x64, q, None)


def test_planned_launches_follow_the_weight(device):
    """nf4_gemv_weight keeps a plan per setting on the Params4bit; it serves the same weight, and a new quantization
    state (re-quantized weight) makes a new plan instead of reading the old scales."""
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(128, 24, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(24, 128) * 0.05, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)._quantize(device)
    x = _x(3, 128, torch.bfloat16, device, seed=3)
    for _ in range(2):
        y = nf4_gemv_weight(x, layer.weight, layer.weight.quant_state)
        assert_close("planned", y, _float64(x, layer.weight.data, layer.weight.quant_state), torch.bfloat16)
    assert len(layer.weight.__dict__["_sloth_core_gemv_plans"]) == 1
    fresh = bnb.nn.Params4bit(torch.randn(24, 128) * 0.05, requires_grad=False, quant_type="nf4",
                              compress_statistics=True)._quantize(device)
    layer.weight.data, layer.weight.quant_state = fresh.data, fresh.quant_state
    y = nf4_gemv_weight(x, layer.weight, layer.weight.quant_state)
    assert_close("re-quantized", y, _float64(x, fresh.data, fresh.quant_state), torch.bfloat16)
