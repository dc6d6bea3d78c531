"""Per-token log-probs / entropy / top-1 of the lm_head projection vs the float64 reference (and TRL's own chunked
function where TRL is installed): values, the three gradient paths (frozen head: computed in the forward;
trainable weight / bias: recomputed; an entropy gradient: the reference per chunk), ties, odd shapes."""
import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packaging.version import Version

from sloth_core.autotune import override
from sloth_core.kernels.linear_log_probs import linear_log_probs, linear_log_probs_reference
from sloth_core.tolerances import assert_close
from tests.kernels.sm90 import run_compile_script

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
profile = settings(suppress_health_check=[*settings.default.suppress_health_check,
                                          HealthCheck.function_scoped_fixture])


@contextlib.contextmanager
def forced_launch(chunk_tokens, block_v, rows_per_program=4):
    with override("fused_linear_cross_entropy", chunk_tokens=chunk_tokens), \
            override("cross_entropy", BLOCK_V=block_v, ROWS_PER_PROGRAM=rows_per_program, num_warps=4):
        yield


def make_inputs(n_tokens, n_hidden, vocab, dtype, with_bias, gen, device):
    hidden = torch.randn(n_tokens, n_hidden, generator=gen)
    weight = torch.randn(vocab, n_hidden, generator=gen) * (2.0 / n_hidden ** 0.5)
    bias = torch.randn(vocab, generator=gen) * 0.5 if with_bias else None
    labels = torch.randint(0, vocab, (n_tokens,), generator=gen)
    return [None if t is None else t.to(dtype).to(device) for t in (hidden, weight, bias)] + [labels.to(device)]


def run(fn, hidden, weight, bias, labels, requires, grads, **kw):
    """Outputs and the gradients of the inputs flagged in ``requires`` for ``sum(g * log_probs + h * entropy)``
    (``grads`` = (g, h); ``h`` may be None: the entropy then takes no part in the loss)."""
    inputs = [None if t is None else t.detach().clone().requires_grad_(r)
              for t, r in zip((hidden, weight, bias), requires)]
    log_probs, entropy, top1 = fn(inputs[0], inputs[1], labels, inputs[2], **kw)
    g, h = grads
    loss = (log_probs * g.to(log_probs)).sum()
    if h is not None:
        loss = loss + (entropy * h.to(entropy)).sum()
    wrt = [t for t, r in zip(inputs, requires) if t is not None and r]
    got = torch.autograd.grad(loss, wrt) if wrt else ()
    return (log_probs, entropy, top1), list(got)


def check(hidden, weight, bias, labels, requires, with_entropy_grad, gen, **kw):
    n = hidden.shape[0]
    grads = (torch.randn(n, generator=gen), torch.randn(n, generator=gen) if with_entropy_grad else None)
    (lp, ent, top1), got = run(linear_log_probs, hidden, weight, bias, labels, requires, grads, **kw)
    as64 = [None if t is None else t.double() for t in (hidden, weight, bias)]
    (lp64, ent64, _), want = run(linear_log_probs_reference, *as64, labels, requires, grads, **kw)
    assert lp.dtype == ent.dtype == torch.float32 and top1.dtype == torch.bool
    dtype = hidden.dtype
    assert_close("log_probs", lp, lp64, dtype=dtype, scale=2.0)
    assert_close("entropy", ent, ent64, dtype=dtype, scale=2.0)
    # the flag: where the exact logits have a clear winner it is exact; on the CPU (one matmul kernel whatever the
    # chunk) against the same-dtype logits everywhere (low-precision rounding makes ties: argmax's first maximum)
    z64 = torch.nn.functional.linear(*[None if t is None else t.double() for t in (hidden, weight)],
                                     None if bias is None else bias.double())
    top2 = z64.topk(min(2, z64.shape[1]), dim=-1).values
    clear = (top2[:, 0] - top2[:, -1]) > 1e-2 * top2[:, 0].abs() + 1e-3
    assert torch.equal(top1[clear], (z64.argmax(-1) == labels)[clear])
    if hidden.device.type == "cpu":
        _, _, top1_same = linear_log_probs_reference(hidden, weight, labels, bias, **kw)
        assert torch.equal(top1, top1_same)
    # gradients pass two roundings to the input dtype (the logits, their gradient) before their matmuls
    for name, a, b in zip(("hidden", "weight", "bias"), got, want):
        assert a.dtype == dtype
        assert_close(f"grad {name}", a, b, dtype=dtype, scale=3.0)


@st.composite
def cases(draw):
    return dict(n_tokens=draw(st.integers(1, 24)), n_hidden=draw(st.sampled_from([16, 40])),
                vocab=draw(st.integers(2, 500)), dtype=draw(st.sampled_from(DTYPES)),
                with_bias=draw(st.booleans()), softcap=draw(st.sampled_from([None, 3.0, 30.0])),
                logit_scale=draw(st.sampled_from([None, 0.5])),
                requires=draw(st.sampled_from([(True, False, False), (True, True, True), (False, True, False)])),
                entropy_grad=draw(st.booleans()), chunk=draw(st.sampled_from([1, 7, 64])),
                block_v=draw(st.sampled_from([32, 128])), seed=draw(st.integers(0, 2 ** 16)))


@profile
@given(case=cases())
def test_matches_reference(case, device):
    gen = torch.Generator().manual_seed(case["seed"])
    hidden, weight, bias, labels = make_inputs(case["n_tokens"], case["n_hidden"], case["vocab"], case["dtype"],
                                               case["with_bias"], gen, device)
    with forced_launch(case["chunk"], case["block_v"]):
        check(hidden, weight, bias, labels, case["requires"], case["entropy_grad"], gen, softcap=case["softcap"],
              logit_scale=case["logit_scale"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("requires", [(True, False, False), (True, True, True)])
def test_many_chunks_both_gradient_paths(dtype, requires, device):
    gen = torch.Generator().manual_seed(1)
    hidden, weight, bias, labels = make_inputs(37, 24, 333, dtype, True, gen, device)
    with forced_launch(8, 32, rows_per_program=3):
        check(hidden, weight, bias, labels, requires, False, gen, softcap=30.0)


def test_ties_count_the_first_maximum_only(device):
    """Token 3 and token 7 share a weight row: their logits tie. The label 3 is argmax's pick, 7 is not."""
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(10, 8, generator=gen)
    weight[7] = weight[3]
    hidden = 5.0 * weight[3].expand(4, 8).clone()
    labels = torch.tensor([3, 7, 3, 0])
    _, _, top1 = linear_log_probs(hidden.to(device), weight.to(device), labels.to(device))
    assert top1.tolist() == [True, False, True, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_trls_chunked_function(dtype, device):
    """The function TRL's fused LM head calls, on the same inputs: values, flags and the hidden gradient."""
    trl = pytest.importorskip("trl")
    if Version(trl.__version__) < Version("1.16") and device.type == "cpu":
        pytest.skip("TRL < 1.16 runs its own Triton kernel on CPU tensors, which fails under the interpreter")
    from trl.kernels import chunked_logprob as chunked

    gen = torch.Generator().manual_seed(3)
    hidden, weight, _, labels = make_inputs(29, 32, 300, dtype, False, gen, device)
    g = torch.randn(29, generator=gen).to(device)
    ours_h = hidden.clone().requires_grad_()
    lp, ent, top1 = linear_log_probs(ours_h, weight, labels, softcap=30.0)
    (lp * g).sum().backward()
    trl_h = hidden.clone().requires_grad_()
    out = chunked.ChunkedLogProbFunction.apply(trl_h, weight, None, labels, 1.0, 128, 30.0, 1.0,
                                               ("log_probs", "entropy", "is_top1"))
    (out[0] * g).sum().backward()
    assert_close("log_probs", lp, out[0], dtype=dtype, scale=2.0)
    assert_close("entropy", ent, out[1], dtype=dtype, scale=2.0)
    assert torch.equal(top1, out[4])
    assert_close("grad hidden", ours_h.grad, trl_h.grad, dtype=dtype, scale=3.0)


def test_a_second_backward_through_the_graph_recomputes(device):
    gen = torch.Generator().manual_seed(4)
    hidden, weight, _, labels = make_inputs(9, 16, 50, torch.float32, False, gen, device)
    h = hidden.clone().requires_grad_()
    lp, _, _ = linear_log_probs(h, weight, labels)
    first, = torch.autograd.grad(lp.sum(), h, retain_graph=True)
    second, = torch.autograd.grad(lp.sum(), h)
    assert_close("second backward", second, first)


def test_no_grad_and_float64_paths(device):
    gen = torch.Generator().manual_seed(5)
    hidden, weight, _, labels = make_inputs(6, 16, 40, torch.float32, False, gen, device)
    with torch.no_grad():
        lp, ent, top1 = linear_log_probs(hidden, weight, labels)
    ref = linear_log_probs_reference(hidden.double(), weight.double(), labels)
    assert_close("no-grad log_probs", lp, ref[0], dtype=torch.float32)
    out64 = linear_log_probs(hidden.double(), weight.double(), labels)
    assert out64[0].dtype == torch.float64 and torch.equal(out64[2], ref[2])


@pytest.mark.parametrize("labels, match", [
    (torch.tensor([0, 40, 1]), r"labels: every value must lie in \[0, 40\)"),
    (torch.tensor([0, -100, 1]), r"labels: every value must lie in \[0, 40\)"),
    (torch.tensor([0, 1]), r"labels: expected an integer tensor of shape \(3,\), got \(2,\)"),
    (torch.tensor([0.0, 1.0, 2.0]), r"labels: expected an integer tensor of shape \(3,\)"),
])
def test_bad_labels_raise(labels, match, device):
    with pytest.raises(ValueError, match=match):
        linear_log_probs(torch.randn(3, 8, device=device), torch.randn(40, 8, device=device), labels.to(device))


_COMPILE_SCRIPT = """
import itertools
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sloth_core.kernels import linear_log_probs as llp

sig = dict(logits_ptr="*bf16", stride_logits="i32", labels_ptr="*i64", logp_ptr="*fp32", entropy_ptr="*fp32",
           top1_ptr="*fp32", n_rows="i32", n_cols="i32", ignore_index="i32", scale="fp32", cap="fp32",
           HAS_SCALE="constexpr", HAS_SOFTCAP="constexpr", COMPUTE_GRAD="constexpr", BLOCK_V="constexpr",
           NUM_CHUNKS="constexpr", ROWS_PER_PROGRAM="constexpr")
for flags, grad in itertools.product([False, True], [False, True]):
    consts = dict(HAS_SCALE=flags, HAS_SOFTCAP=flags, COMPUTE_GRAD=grad, BLOCK_V=8192, NUM_CHUNKS=16,
                  ROWS_PER_PROGRAM=1)
    out = triton.compile(ASTSource(fn=llp._log_probs_kernel, signature=sig, constexprs=consts),
                         target=GPUTarget("cuda", 90, 32), options=dict(num_warps=16))
    assert out.asm["ptx"], consts
print("compiled")
"""


def test_kernel_compiles_for_sm90():
    """An H100/H200 target without a GPU (see tests/kernels/sm90.py)."""
    run_compile_script(_COMPILE_SCRIPT, timeout=300)
