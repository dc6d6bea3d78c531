"""bitsandbytes 4-bit dequantization kernel vs bitsandbytes itself, compared BITWISE (no tolerance).

Ground truth ("bnb"):

* on CUDA: ``bitsandbytes.functional.dequantize_4bit`` (bnb's CUDA kernel); compared bit for bit
  (``.view(int)``), so FP4's ``-0.0`` must match too;
* on the CPU: bnb's backend-independent torch implementation (``backends.default.ops._dequantize_4bit_compute``,
  the nested absmax through ``F.dequantize_blockwise`` + offset exactly as ``F.dequantize_4bit`` does). bnb's
  CPU C++ kernel is only used directly where it is right (last dim a multiple of the blocksize: its AVX-512
  path indexes blocks per row) -- ``test_matches_bitsandbytes_cpu_kernel`` and the ``Linear4bit`` tests. On the
  CPU values are compared with ``torch.equal``: bnb's CPU paths disagree among themselves on the sign of FP4's
  zero (code ``0b1000``), the only difference ``torch.equal`` ignores.

bf16 outputs under the interpreter: the kernel writes float32 and torch rounds (the interpreter truncates
float32 -> bf16); the GPU rounds in the kernel, covered by the same tests on CUDA.
"""
import contextlib
import copy

import pytest
import torch

from sloth_core.tolerances import assert_close
from tests.kernels.sm90 import run_compile_script
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sloth_core.autotune import override
from sloth_core.kernels import dequant, dequant_plan
from sloth_core.kernels.dequant import (
    code_table,
    dequantize_4bit,
    dequantize_4bit_reference,
    dequantize_4bit_rows,
)
from sloth_core.kernels.dequant_plan import dequantize_weight

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
QUANT_TYPES = ["nf4", "fp4"]

# The loaded profile, plus: the ``device`` fixture is a constant, safe to share between examples.
profile = settings(suppress_health_check=[*settings.default.suppress_health_check,
                                          HealthCheck.function_scoped_fixture])


# --------------------------------------------------------------------------------------------- helpers


def _int_view(t):
    return t.view({torch.float32: torch.int32, torch.float64: torch.int64}.get(t.dtype, torch.int16))


def assert_bitwise(actual, expected, what=""):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if actual.is_cuda:
        same = torch.equal(_int_view(actual), _int_view(expected))
    else:
        same = torch.equal(actual, expected)
    if not same:
        diff = (actual != expected) | (actual.isnan() != expected.isnan())
        idx = diff.nonzero()[:5].tolist()
        raise AssertionError(f"{what}: {int(diff.sum())} of {actual.numel()} elements differ, first at {idx}: "
                             f"{actual[diff][:5].tolist()} vs {expected[diff][:5].tolist()}")


def _bnb_generic(q, state, dtype):
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # skip torch.compile
    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
        absmax = absmax.float()
    code = F.get_4bit_type(state.quant_type, device=q.device)
    return compute(q.reshape(-1), absmax, code, state.blocksize, state.shape, dtype)


def bnb_dequantize(q, state, dtype=None):
    """bitsandbytes' dequantization of ``q`` into ``dtype`` (default ``state.dtype``), shape ``state.shape``."""
    dtype = dtype or state.dtype
    if q.is_cuda:
        state = copy.copy(state)
        state.dtype = dtype
        out = F.dequantize_4bit(q, state)
    else:
        out = _bnb_generic(q, state, dtype)
    return out.reshape(state.shape)


def make_weight(shape, dtype, device, seed, zero_block=False):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.05
    if zero_block:
        w.view(-1)[: min(w.numel(), 300)] = 0.0  # whole blocks of zeros: absmax 0
    return w.to(dtype).to(device)


def quantize(w, quant_type, blocksize, nested):
    return F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)


def small_tiles(blocksize):
    """Launch override: two quantization blocks a program, so small weights take several programs."""
    return override("dequantize_4bit", TILE_BYTES=blocksize)


# --------------------------------------------------------------------------------------------- property tests


@st.composite
def cases(draw):
    return dict(
        shape=draw(st.one_of(st.tuples(st.integers(1, 24), st.integers(1, 200)),
                             st.tuples(st.integers(1, 700)))),
        quant_type=draw(st.sampled_from(QUANT_TYPES)),
        blocksize=draw(st.sampled_from([32, 64, 128, 256])),
        nested=draw(st.booleans()),
        in_dtype=draw(st.sampled_from(DTYPES)),
        out_dtype=draw(st.sampled_from(DTYPES)),
        zero_block=draw(st.booleans()),
        multi_program=draw(st.booleans()),
        seed=draw(st.integers(0, 2 ** 16)),
    )


@profile
@given(case=cases())
def test_matches_bitsandbytes(case, device):
    """Any shape (odd element counts and partial last blocks included), NF4/FP4, blocksizes, nested or not,
    any output dtype: the kernel and the reference are bit-identical to bitsandbytes."""
    w = make_weight(case["shape"], case["in_dtype"], device, case["seed"], case["zero_block"])
    q, state = quantize(w, case["quant_type"], case["blocksize"], case["nested"])
    expected = bnb_dequantize(q, state, case["out_dtype"])
    assert_bitwise(dequantize_4bit_reference(q, state, case["out_dtype"]), expected, "reference")
    if case["multi_program"]:
        with small_tiles(case["blocksize"]):
            actual = dequantize_4bit(q, state, dtype=case["out_dtype"])
    else:
        actual = dequantize_4bit(q, state, dtype=case["out_dtype"])
    assert_bitwise(actual, expected, f"kernel {case}")


@profile
@given(rows=st.integers(1, 40), cols=st.sampled_from([32, 48, 64, 96, 200]), blocksize=st.sampled_from([32, 64, 128]),
       quant_type=st.sampled_from(QUANT_TYPES), nested=st.booleans(), out_dtype=st.sampled_from(DTYPES),
       multi_program=st.booleans(), data=st.data())
def test_rows_match_the_whole_weight(rows, cols, blocksize, quant_type, nested, out_dtype, multi_program, data,
                                     device):
    """Any row range, whether its first row starts a quantization block (kernel from that block on) or not
    (whole weight, rows copied out): bit-identical to the same rows of bitsandbytes' dequantization, and no
    element of the NaN-poisoned output is left unwritten."""
    start = data.draw(st.integers(0, rows), "start")
    stop = data.draw(st.integers(start, rows), "stop")
    w = make_weight((rows, cols), torch.bfloat16, device, seed=rows * cols + start)
    q, state = quantize(w, quant_type, blocksize, nested)
    expected = bnb_dequantize(q, state, out_dtype)[start:stop]
    with small_tiles(blocksize) if multi_program else contextlib.nullcontext():
        actual = dequantize_4bit_rows(q, state, start, stop, dtype=out_dtype)
    assert_bitwise(actual, expected, f"rows {start}:{stop} of {rows}x{cols}")


def test_rows_of_a_large_nested_weight_use_the_global_block_index(device):
    """A row range deep into a weight with several second-level scales: blocks and absmax2 are indexed over the
    whole weight (a kernel indexing from the range's start would read the first rows' scales)."""
    w = make_weight((700, 32), torch.float32, device, seed=3)
    q, state = quantize(w, "nf4", 32, True)
    assert state.state2.absmax.numel() == 3
    with small_tiles(32):
        actual = dequantize_4bit_rows(q, state, 513, 690, dtype=torch.float32)
    assert_bitwise(actual, bnb_dequantize(q, state, torch.float32)[513:690])


def test_rows_bad_input_raises(device):
    w = make_weight((8, 64), torch.bfloat16, device, seed=9)
    q, state = quantize(w, "nf4", 64, False)
    with pytest.raises(ValueError, match="rows 5:9"):
        dequantize_4bit_rows(q, state, 5, 9)
    with pytest.raises(ValueError, match="out has shape"):
        dequantize_4bit_rows(q, state, 0, 2, out=torch.empty(3, 64, dtype=torch.bfloat16, device=device))
    flat = make_weight((128,), torch.bfloat16, device, seed=9)
    with pytest.raises(ValueError, match="2-D"):
        dequantize_4bit_rows(*quantize(flat, "nf4", 64, False), 0, 1)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("nested", [False, True])
def test_multi_program_even_and_ragged(quant_type, nested, device):
    """Several programs, both kernel variants: whole tiles (no masks) and a ragged tail (odd element count)."""
    for shape in [(6, 64), (5, 51)]:  # 384 elements: 6 blocks of 64, 3 tiles of 2 / 255: partial last block
        w = make_weight(shape, torch.bfloat16, device, seed=sum(shape))
        q, state = quantize(w, quant_type, 64, nested)
        with small_tiles(64):
            for dtype in DTYPES:
                assert_bitwise(dequantize_4bit(q, state, dtype=dtype), bnb_dequantize(q, state, dtype), str(shape))


@pytest.mark.parametrize("numel", [600 * 32, 601 * 32 - 5])
def test_many_blocks_nested(numel, device):
    """More than 256 blocks: the nested absmax uses several second-level scales (absmax2[block // 256])."""
    w = make_weight((numel,), torch.float32, device, seed=numel)
    q, state = quantize(w, "nf4", 32, True)
    assert state.state2.absmax.numel() == 3
    assert_bitwise(dequantize_4bit(q, state, dtype=torch.float32), bnb_dequantize(q, state, torch.float32))


def test_large_blocksize(device):
    w = make_weight((3, 4096 + 100), torch.float16, device, seed=1)
    q, state = quantize(w, "nf4", 4096, True)
    assert_bitwise(dequantize_4bit(q, state), bnb_dequantize(q, state))


def test_matches_bitsandbytes_cpu_kernel(device):
    """Against ``F.dequantize_4bit`` itself (bnb's native kernel for the device) where the last dim is a multiple
    of the blocksize, the layout of every real Linear4bit weight."""
    for quant_type in QUANT_TYPES:
        for nested in (False, True):
            w = make_weight((48, 256), torch.bfloat16, device, seed=3)
            q, state = quantize(w, quant_type, 64, nested)
            assert_bitwise(dequantize_4bit(q, state), F.dequantize_4bit(q, state), f"{quant_type} {nested}")


def test_code_tables_match_bitsandbytes():
    for quant_type in QUANT_TYPES:
        assert torch.equal(code_table(quant_type), F.get_4bit_type(quant_type, device="cpu"))
    assert torch.signbit(code_table("fp4")[8])  # bnb's CUDA kernel: lut[0] * -1.0f = -0.0
    assert not torch.signbit(code_table("fp4")[0])


# --------------------------------------------------------------------------------------------- out= / dtypes


def test_out_argument(device):
    w = make_weight((40, 96), torch.bfloat16, device, seed=5)
    q, state = quantize(w, "nf4", 64, True)
    expected = bnb_dequantize(q, state, torch.float16)
    out = torch.empty(40, 96, dtype=torch.float16, device=device)
    assert dequantize_4bit(q, state, out=out) is out
    assert_bitwise(out, expected)
    strided = torch.empty(96, 40, dtype=torch.float16, device=device).t()  # not contiguous
    assert dequantize_4bit(q, state, out=strided) is strided
    assert_bitwise(strided, expected)
    fresh = [dequantize_4bit(q, state) for _ in range(2)]
    assert fresh[0].data_ptr() != fresh[1].data_ptr()
    assert fresh[0].dtype == torch.bfloat16 and fresh[0].shape == (40, 96)


def test_float64_takes_the_reference_path(device):
    w = make_weight((7, 33), torch.float32, device, seed=6)
    q, state = quantize(w, "fp4", 32, True)
    out = dequantize_4bit(q, state, dtype=torch.float64)
    assert out.dtype == torch.float64
    assert torch.equal(out, bnb_dequantize(q, state, torch.float32).double())


def test_cpu_without_interpreter_takes_the_reference_path(monkeypatch):
    w = make_weight((9, 70), torch.bfloat16, "cpu", seed=7)
    q, state = quantize(w, "nf4", 64, True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert_bitwise(dequantize_4bit(q, state), bnb_dequantize(q, state))


# --------------------------------------------------------------------------------------------- workspace


def _linear4bit(out_features, in_features, device, quant_type="nf4", seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16,
                              compress_statistics=True, quant_type=quant_type, **kwargs)
    w = torch.randn(out_features, in_features) * 0.05
    layer.weight = bnb.nn.Params4bit(w.to(torch.bfloat16), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=True, blocksize=64,
                                     quant_storage=kwargs.get("quant_storage", torch.uint8))
    return layer.to(device)  # Params4bit quantizes on its first move to a device


def test_dequantize_weight_results_are_independent_tensors(device):
    """Every call gives a tensor of its own: an earlier result stays intact when weights of the same size, other
    dtypes or row ranges (of as many elements as a whole weight) are dequantized after it."""
    a, b = _linear4bit(32, 64, device, seed=1), _linear4bit(32, 64, device, seed=2)
    c = _linear4bit(16, 64, device, seed=3)
    whole_a = F.dequantize_4bit(a.weight.data, a.weight.quant_state)
    whole_b = F.dequantize_4bit(b.weight.data, b.weight.quant_state)
    wa = dequantize_weight(a)
    later = [dequantize_weight(b), dequantize_weight(c), dequantize_weight(a, dtype=torch.float32),
             dequantize_weight(b, rows=(0, 32)), dequantize_weight(b, rows=(8, 16))]
    assert_bitwise(wa, whole_a)
    assert len({t.data_ptr() for t in (wa, *later)}) == len(later) + 1
    assert_bitwise(later[0], whole_b)
    assert_bitwise(later[3], whole_b)
    assert_bitwise(later[4], whole_b[8:16])
    assert later[2].dtype == torch.float32 and later[1].shape == (16, 64)


def test_dequantize_weight_outputs_are_poisoned_in_tests(device, monkeypatch):
    """The output tensor comes from ``new_empty`` (NaN-filled under the suite's poisoning), so an element the
    kernel forgets cannot pass with whatever the memory held before."""
    layer = _linear4bit(32, 64, device)
    poisoned = {}
    real = dequant.new_empty

    def recording(shape, dtype, dev):
        out = real(shape, dtype, dev)
        poisoned[out.data_ptr()] = bool(out.isnan().all())
        return out

    for module in (dequant, dequant_plan):
        monkeypatch.setattr(module, "new_empty", recording)
    for result in (dequantize_weight(layer), dequantize_weight(layer, rows=(0, 16))):
        assert poisoned.get(result.data_ptr()) is True
        assert not result.isnan().any()


@pytest.mark.cuda
def test_dropped_results_give_their_memory_back(device):
    """The allocator's memory, not a persistent workspace: once dropped, nothing of a result stays allocated."""
    layer = _linear4bit(256, 512, device)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    w = dequantize_weight(layer)
    assert torch.cuda.memory_allocated(device) >= before + w.numel() * w.element_size()
    del w
    assert torch.cuda.memory_allocated(device) == before


# --------------------------------------------------------------------------------------------- modules


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_dequantize_weight_linear4bit(quant_type, device):
    layer = _linear4bit(48, 128, device, quant_type=quant_type)
    assert layer.weight.dtype == torch.uint8 and layer.weight.quant_state.nested
    expected = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert_bitwise(dequantize_weight(layer), expected, "module")
    assert_bitwise(dequantize_weight(layer.weight), expected, "Params4bit")
    x = torch.randn(3, 128, dtype=torch.bfloat16, device=device)
    # bitsandbytes' own forward may take another bf16 path (a 4-bit GEMV kernel for few rows on CUDA): bf16 tolerance
    assert_close("layer(x)", torch.nn.functional.linear(x, dequantize_weight(layer)), layer(x), torch.bfloat16)


def test_dequantize_weight_quant_storage(device):
    """A Params4bit stored as bf16 (bnb's ``quant_storage``, for FSDP) holds the same bytes."""
    layer = _linear4bit(32, 64, device, quant_storage=torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16
    expected = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert_bitwise(dequantize_weight(layer), expected)


# --------------------------------------------------------------------------------------------- launch plans


def _plans(layer):
    return layer.weight.__dict__.get(dequant_plan._PLANS_ATTR, {})


def test_dequantize_weight_plans_repeat_calls(device, monkeypatch):
    """The first call per (rows, dtype) makes a plan; later calls take it (no new check) and give the same bits."""
    layer = _linear4bit(32, 64, device)
    expected = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    calls = [dict(), dict(dtype=torch.float32), dict(rows=(8, 24))]
    firsts = [dequantize_weight(layer, **kw) for kw in calls]
    assert set(_plans(layer)) == {(None, torch.bfloat16), (None, torch.float32), ((8, 24), torch.bfloat16)}
    checks = []
    for module in (dequant, dequant_plan):
        monkeypatch.setattr(module, "_check_inputs", lambda *a: checks.append(a))
    for kw, first in zip(calls, firsts):
        again = dequantize_weight(layer, **kw)
        assert again.data_ptr() != first.data_ptr()
        assert_bitwise(again, first)
    assert checks == []
    assert_bitwise(firsts[0], expected)
    assert_bitwise(firsts[1], dequantize_4bit(layer.weight.data, layer.weight.quant_state, dtype=torch.float32))
    assert_bitwise(firsts[2], expected[8:24])
    assert_bitwise(dequantize_weight(layer, rows=[8, 24]), expected[8:24])  # a list names the same rows


def test_dequantize_weight_plans_never_compare_quant_states(device, monkeypatch):
    """A ``QuantState``'s ``==`` compares its tensors (a device synchronization per call): plans compare by
    identity."""
    layer = _linear4bit(32, 64, device)
    dequantize_weight(layer)

    def no_eq(self, other):
        raise AssertionError("QuantState == called")

    monkeypatch.setattr(type(layer.weight.quant_state), "__eq__", no_eq)
    dequantize_weight(layer)
    layer.weight.quant_state = copy.copy(layer.weight.quant_state)
    dequantize_weight(layer)


def test_dequantize_weight_replans_when_the_weight_changes(device):
    """New packed codes (``param.data = ...``), a new QuantState or new tensors in it: a new plan, the new values."""
    layer, other = _linear4bit(32, 64, device, seed=1), _linear4bit(32, 64, device, seed=2)
    dequantize_weight(layer)
    old = _plans(layer)[(None, torch.bfloat16)]
    layer.weight.data = other.weight.data.clone()
    layer.weight.quant_state = other.weight.quant_state
    assert_bitwise(dequantize_weight(layer), F.dequantize_4bit(other.weight.data, other.weight.quant_state))
    assert _plans(layer)[(None, torch.bfloat16)] is not old
    # the same QuantState object, its absmax codes replaced: the kernel must read the new ones
    state = layer.weight.quant_state
    state.absmax = torch.flip(state.absmax, (0,)).contiguous()
    assert_bitwise(dequantize_weight(layer), F.dequantize_4bit(layer.weight.data, state))
    # ... and its type flipped in place (codes read as FP4)
    state.quant_type = "fp4"
    assert_bitwise(dequantize_weight(layer), F.dequantize_4bit(layer.weight.data, state))


def test_copies_of_a_planned_weight_start_without_plans(device):
    """Plans hold a launcher and an address: pickling, copying or deep-copying the weight (or its module) drops
    them, and the copy dequantizes its own codes."""
    import pickle

    layer = _linear4bit(32, 64, device)
    expected = dequantize_weight(layer)
    assert _plans(layer)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert not _plans(clone)
        assert_bitwise(dequantize_weight(clone), expected)
        assert _plans(clone) and _plans(layer)


def test_dequantize_weight_unplanned_paths(device):
    """A row range that does not start a quantization block, or scales the kernel would read from copies, run the
    full path every time (no plan), correctly."""
    layer = _linear4bit(8, 40, device)  # 40 columns: row 1 starts inside the first 64-element block
    expected = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    for _ in range(2):
        assert_bitwise(dequantize_weight(layer, rows=(1, 5)), expected[1:5])
    assert ((1, 5), torch.bfloat16) not in _plans(layer)
    # scale operands the kernel would get as copies (here: absmax codes made contiguous), which a plan could not
    # keep: the same values, computed in full every time
    state = layer.weight.quant_state
    state.absmax = torch.stack([state.absmax, state.absmax], dim=1)[:, 0]
    assert not state.absmax.is_contiguous()
    for _ in range(2):
        assert_bitwise(dequantize_weight(layer), expected)
    assert (None, torch.bfloat16) not in _plans(layer)


@pytest.mark.cuda
def test_dequantize_weight_plans_replay_the_compiled_kernel(device):
    """On a GPU the plan's second launch goes through the compiled kernel's launcher, with the same bits."""
    layer = _linear4bit(256, 512, device)
    expected = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    first = dequantize_weight(layer, rows=(64, 192))
    plan = _plans(layer)[((64, 192), torch.bfloat16)]
    assert plan.launcher is not None
    for _ in range(2):
        assert_bitwise(dequantize_weight(layer, rows=(64, 192)), expected[64:192])
    assert_bitwise(first, expected[64:192])


# --------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_raise(device):
    w = make_weight((8, 64), torch.bfloat16, device, seed=9)
    q, state = quantize(w, "nf4", 64, True)
    with pytest.raises(ValueError, match="uint8"):
        dequantize_4bit(q.view(torch.int8), state)
    with pytest.raises(ValueError, match="uint8"):
        dequantize_4bit(q.float(), state)
    with pytest.raises(ValueError, match="quant_state is missing"):
        dequantize_4bit(q, None)
    with pytest.raises(ValueError, match="bytes"):
        dequantize_4bit(q[:-1], state)
    with pytest.raises(ValueError, match="weight_data must be a tensor"):
        dequantize_4bit(q.tolist(), state)
    with pytest.raises(ValueError, match="out has shape"):
        dequantize_4bit(q, state, out=torch.empty(64, 8, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match="out has dtype"):
        dequantize_4bit(q, state, out=torch.empty(8, 64, device=device), dtype=torch.bfloat16)
    bad = copy.copy(state)
    bad.quant_type = "int4"
    with pytest.raises(ValueError, match="quant_type"):
        dequantize_4bit(q, bad)
    bad = copy.copy(state)
    bad.blocksize = 48
    with pytest.raises(ValueError, match="blocksize"):
        dequantize_4bit(q, bad)
    bad = copy.copy(state)
    bad.packing_format_for_cpu = True
    with pytest.raises(ValueError, match="packing"):
        dequantize_4bit(q, bad)
    with pytest.raises(ValueError, match="not a bitsandbytes 4-bit weight"):
        dequantize_weight(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="not a bitsandbytes 4-bit weight"):
        dequantize_weight(torch.zeros(4, dtype=torch.uint8))


# --------------------------------------------------------------------------------------------- GPU


@pytest.mark.cuda
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
def test_cuda_bitwise_real_shapes(quant_type, blocksize):
    """Bit for bit against bnb's CUDA kernel on weight-sized tensors, heuristic launch config."""
    for shape, nested in [((1024, 4096), True), ((4096, 1024), False), ((333, 1000 + 3), True)]:
        w = make_weight(shape, torch.bfloat16, "cuda", seed=shape[0])
        q, state = quantize(w, quant_type, blocksize, nested)
        for dtype in DTYPES:
            whole = bnb_dequantize(q, state, dtype)
            assert_bitwise(dequantize_4bit(q, state, dtype=dtype), whole, f"{shape} {dtype} nested={nested}")
            for start, stop in [(shape[0] // 4, shape[0] // 2), (shape[0] - 7, shape[0])]:
                assert_bitwise(dequantize_4bit_rows(q, state, start, stop, dtype=dtype), whole[start:stop],
                               f"rows {start}:{stop} of {shape} {dtype} nested={nested}")


_COMPILE_SCRIPT = """
import itertools
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sloth_core.kernels import dequant

div16 = {(i,): [["tt.divisibility", 16]] for i in range(11)}
variants = [dict(out=o, nested=n, even=e, int64=False, half=32)
            for o, n, e in itertools.product(["*bf16", "*fp16", "*fp32"], [False, True], [False, True])]
variants += [dict(out="*bf16", nested=True, even=False, int64=True, half=32),
             dict(out="*bf16", nested=True, even=True, int64=False, half=16),
             dict(out="*bf16", nested=False, even=False, int64=False, half=2048)]
for v in variants:
    ints = "i64" if v["int64"] else "i32"
    sig = dict(packed_ptr="*u8", absmax_ptr="*u8" if v["nested"] else "*fp32", absmax2_ptr="*fp32",
               code2_ptr="*fp32", offset_ptr="*fp32", table_ptr="*fp32", out_ptr=v["out"], n_elements=ints,
               n_bytes=ints, n_blocks=ints, first_block=ints, HALF_BLOCK="constexpr", BLOCKS_PER_PROGRAM="constexpr",
               NESTED="constexpr", BLOCKSIZE2="constexpr", EVEN="constexpr", INT64="constexpr")
    consts = dict(HALF_BLOCK=v["half"], BLOCKS_PER_PROGRAM=max(1, 2048 // v["half"]), NESTED=v["nested"],
                  BLOCKSIZE2=256, EVEN=v["even"], INT64=v["int64"])
    res = triton.compile(ASTSource(fn=dequant._dequant_4bit_kernel, signature=sig, constexprs=consts, attrs=div16),
                         target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, enable_fp_fusion=False))
    ptx = res.asm["ptx"]
    assert "fma.rn.f32" not in ptx, ("nested absmax must round the product before adding the offset", v)
    assert "st.global.v4" in ptx, ("output stores must be 16-byte vectors", v)
print("compiled")
"""


def test_kernel_compiles_for_sm90():
    """Compile for an H100/H200 target (no GPU needed; a fresh process, without the interpreter): the kernel
    compiles in every variant, without FMA contraction, with vectorized stores."""
    run_compile_script(_COMPILE_SCRIPT, timeout=600)
