"""Cross-entropy kernel vs the float64 HF reference (forward and backward)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sloth_core.autotune import override
from sloth_core.kernels.cross_entropy import (
    cross_entropy,
    cross_entropy_reference,
    transform_logits_reference,
)
from sloth_core.tolerances import assert_close
from tests.kernels.sm90 import run_compile_script

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# The loaded profile, plus: the ``device`` fixture is a constant, safe to share between examples.
profile = settings(suppress_health_check=[*settings.default.suppress_health_check,
                                          HealthCheck.function_scoped_fixture])


def forced_launch(**overrides):
    """Override launch parameters of the "cross_entropy" heuristic (e.g. a tiny BLOCK_V) for a block."""
    return override("cross_entropy", **overrides)


def make_labels(n_tokens, vocab, ignore, gen, device, ignore_index=-100):
    labels = torch.randint(0, vocab, (n_tokens,), generator=gen)
    if ignore == "all":
        labels[:] = ignore_index
    elif ignore == "some":
        labels[torch.rand(n_tokens, generator=gen) < 0.4] = ignore_index
        labels[0] = ignore_index
    return labels.to(device)


def well_conditioned(labels, z64, p_max=0.9, ignore_index=-100):
    """Re-point labels whose probability exceeds ``p_max`` to the row's least likely class.

    For p_label -> 1 the loss log(1 + delta) and the gradient p - 1 are only *absolutely* accurate in fp32 (the
    same holds for torch's fp32 path); relative comparisons against float64 would measure the conditioning, not
    the kernel. ``test_confident_rows_absolute_accuracy`` covers those rows with an absolute bound."""
    p = torch.softmax(z64.cpu(), dim=-1)
    lab = labels.cpu()
    valid = lab != ignore_index
    p_label = p.gather(1, lab.clamp_min(0)[:, None])[:, 0]
    return torch.where(valid & (p_label > p_max), p.argmin(dim=1), lab).to(labels.device)


def num_items_arg(kind, labels, device):
    if kind is None:
        return None
    n = int((labels != -100).sum()) + 3
    return n if kind == "int" else torch.tensor(n, device=device)


def grad_seed(loss, gen):
    """dL/dloss: 3 for a scalar loss (grad_output != 1), random per-row weights for reduction='none'."""
    if loss.dim() == 0:
        return torch.tensor(3.0, dtype=loss.dtype, device=loss.device)
    return torch.randn(loss.shape, generator=gen).to(loss)


def check_against_reference(logits, labels, loss_kwargs, gen):
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, labels, **loss_kwargs)
    seed = grad_seed(loss, gen)
    (grad,) = torch.autograd.grad(loss, x, seed)

    x64 = logits.detach().double().requires_grad_()
    kwargs64 = dict(loss_kwargs)
    loss64 = cross_entropy_reference(x64, labels.long(), **kwargs64)
    (grad64,) = torch.autograd.grad(loss64, x64, seed.double())

    assert loss.dtype == torch.float32
    assert_close("loss", loss, loss64, dtype=torch.float32)  # computed in fp32 whatever the logits dtype
    assert grad.dtype == logits.dtype
    assert_close("grad logits", grad, grad64, dtype=logits.dtype)
    return loss, grad


@st.composite
def loss_cases(draw):
    """What every loss test draws: tokens, vocabulary, vocab block, dtype, ignored labels, soft-capping, logit
    scale, reduction (with ``num_items_in_batch`` for "mean") and a seed. The fused-loss tests add their own."""
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    return dict(
        n_tokens=draw(st.integers(1, 20)),
        vocab=draw(st.integers(2, 600)),
        block_v=draw(st.sampled_from([32, 64, 128])),
        dtype=draw(st.sampled_from(DTYPES)),
        ignore=draw(st.sampled_from(["none", "some", "all"])),
        softcap=draw(st.sampled_from([None, 3.0, 30.0])),
        logit_scale=draw(st.sampled_from([None, 0.5, 1.7])),
        num_items=draw(st.sampled_from([None, "int", "tensor"])) if reduction == "mean" else None,
        reduction=reduction,
        seed=draw(st.integers(0, 2**16)),
    )


@st.composite
def ce_cases(draw):
    return dict(draw(loss_cases()), rows_per_program=draw(st.sampled_from([1, 3, 256])))


@profile
@given(case=ce_cases())
def test_cross_entropy_matches_reference(case, device):
    gen = torch.Generator().manual_seed(case["seed"])
    logits = (torch.randn(case["n_tokens"], case["vocab"], generator=gen) * 4).to(case["dtype"]).to(device)
    labels = make_labels(case["n_tokens"], case["vocab"], case["ignore"], gen, device)
    labels = well_conditioned(labels, transform_logits_reference(logits.double(), case["softcap"],
                                                                 case["logit_scale"]))
    kwargs = dict(softcap=case["softcap"], logit_scale=case["logit_scale"], reduction=case["reduction"],
                  num_items_in_batch=num_items_arg(case["num_items"], labels, device))
    with forced_launch(BLOCK_V=case["block_v"], ROWS_PER_PROGRAM=case["rows_per_program"]):
        check_against_reference(logits, labels, kwargs, gen)


@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_chunk_rows_with_softcap_and_scale(dtype, device):
    """Deterministic multi-chunk case: V=301 over BLOCK_V=32 (10 chunks, ragged tail), soft-cap and scale."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(9, 301, generator=gen) * 6).to(dtype).to(device)
    labels = well_conditioned(make_labels(9, 301, "some", gen, device),
                              transform_logits_reference(logits.double(), 5.0, 1.3))
    with forced_launch(BLOCK_V=32, ROWS_PER_PROGRAM=4):
        check_against_reference(logits, labels, dict(softcap=5.0, logit_scale=1.3), gen)


def test_confident_rows_absolute_accuracy(device):
    """Rows with p_label -> 1 (tiny loss): fp32 loss and gradients within a few ulps absolutely of float64."""
    logits = torch.tensor([[9.0, 0.0], [0.0, 14.0], [20.0, 3.0], [-5.0, 10.0]], device=device)
    logits = torch.cat([logits, torch.full((4, 60), -4.0, device=device)], dim=1)
    labels = torch.tensor([0, 1, 0, 1], device=device)
    x = logits.clone().requires_grad_()
    x64 = logits.double().requires_grad_()
    with forced_launch(BLOCK_V=16):
        loss = cross_entropy(x, labels, reduction="none")
        loss.sum().backward()
    loss64 = cross_entropy_reference(x64, labels, reduction="none")
    loss64.sum().backward()
    assert (loss.double() - loss64).abs().max() < 1e-6
    assert (x.grad.double() - x64.grad).abs().max() < 1e-6


def test_all_ignored_matches_torch(device):
    """mean: NaN loss (0/0) and zero gradients, like F.cross_entropy; num_items_in_batch: loss 0."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 70, generator=gen).to(device)
    labels = torch.full((5,), -100, device=device)
    with forced_launch(BLOCK_V=16):
        loss, grad = check_against_reference(logits, labels, {}, gen)
        assert torch.isnan(loss) and torch.count_nonzero(grad) == 0
        loss, grad = check_against_reference(logits, labels, dict(num_items_in_batch=4), gen)
        assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("vocab", [128256, 256000])
def test_large_vocab_chunked(vocab, device):
    """Llama 3 / Gemma vocabularies with the default launch heuristic: rows span many BLOCK_V chunks."""
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, vocab, generator=gen) * 3).to(torch.bfloat16).to(device)
    labels = torch.tensor([5, vocab - 1], device=device)
    check_against_reference(logits, labels, dict(softcap=30.0), gen)


def test_strided_logits_and_int32_labels(device):
    """A row-strided view (stride(0) != V), a column-strided one, and int32 labels."""
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(6, 150, generator=gen).to(device)
    transposed = torch.randn(100, 6, generator=gen).to(device).t()
    labels = make_labels(6, 100, "some", gen, device).to(torch.int32)
    with forced_launch(BLOCK_V=32):
        check_against_reference(wide[:, :100], labels, {}, gen)
        check_against_reference(transposed, labels, {}, gen)


def test_float64_takes_reference_path(device):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 33, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    labels = make_labels(4, 33, "some", gen, device)
    loss = cross_entropy(logits, labels, softcap=2.0)
    assert torch.equal(loss, cross_entropy_reference(logits, labels, softcap=2.0))
    loss.backward()
    assert logits.grad is not None and logits.grad.dtype == torch.float64


@pytest.mark.parametrize("logits_shape, labels, match", [
    ((4, 10), [0, 1, 2], "labels"),                        # wrong length
    ((4, 10), [0, 1, 2, 10], "labels"),                    # label == V
    ((4, 10), [0, -1, 2, 3], "labels"),                    # negative, not ignore_index
    ((2, 4, 10), [0, 1], "logits"),                        # 3-D logits
])
def test_bad_inputs_raise(logits_shape, labels, match, device):
    with pytest.raises(ValueError, match=match):
        cross_entropy(torch.randn(logits_shape, device=device), torch.tensor(labels, device=device))


def test_bad_arguments_raise(device):
    logits, labels = torch.randn(3, 10, device=device), torch.tensor([1, 2, 3], device=device)
    with pytest.raises(ValueError, match="logits"):
        cross_entropy(torch.ones(3, 10, dtype=torch.int64, device=device), labels)
    with pytest.raises(ValueError, match="labels"):
        cross_entropy(logits, labels.float())
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, labels, reduction="avg")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        cross_entropy(logits, labels, reduction="sum", num_items_in_batch=3)
    with pytest.raises(ValueError, match="softcap"):
        cross_entropy(logits, labels, softcap=0.0)


_COMPILE_SCRIPT = """
import itertools
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sloth_core.kernels import cross_entropy_kernels as ce

sig = dict(logits_ptr="*bf16", stride_logits="i64", labels_ptr="*i64", loss_ptr="*fp32", stats_ptr="*fp32",
           grad_ptr="*bf16", stride_grad="i64", w_ptr="*fp32", stride_w="i32", n_rows="i32", n_cols="i32",
           ignore_index="i32", scale="fp32", cap="fp32", HAS_SCALE="constexpr", HAS_SOFTCAP="constexpr",
           FORWARD="constexpr", COMPUTE_GRAD="constexpr", BLOCK_V="constexpr", NUM_CHUNKS="constexpr",
           ROWS_PER_PROGRAM="constexpr")
# the forward with and without the gradient, and the backward (gradient from the saved stats)
for flags, (forward, grad) in itertools.product([False, True], [(True, False), (True, True), (False, True)]):
    consts = dict(HAS_SCALE=flags, HAS_SOFTCAP=flags, FORWARD=forward, COMPUTE_GRAD=grad, BLOCK_V=8192,
                  NUM_CHUNKS=16, ROWS_PER_PROGRAM=1)
    out = triton.compile(ASTSource(fn=ce._ce_kernel, signature=sig, constexprs=consts),
                         target=GPUTarget("cuda", 90, 32), options=dict(num_warps=16))
    assert out.asm["ptx"], consts
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """Compile for an H100/H200 target (no GPU needed; a fresh process, without the interpreter): catches what
    the interpreter accepts but Triton's compiler rejects (types across branches, loop-carried scalars...)."""
    run_compile_script(_COMPILE_SCRIPT, timeout=300)
