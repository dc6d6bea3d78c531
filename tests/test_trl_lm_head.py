"""TRL's fused LM head (``add_fused_lm_head``, what ``SFTTrainer`` gives the model) served by our kernel: the same
loss, per-token outputs and gradients as TRL's own chunked function; settings the kernel does not serve, or that
were not verified, run TRL's function and say so; a setting changed after ``optimize`` is verified on first use."""
import warnings

import pytest
import torch
from packaging.version import Version

import sloth_core
from sloth_core.registry.patterns import trl_lm_head
from sloth_core.tiny import tiny_model
from sloth_core.tolerances import assert_close

trl = pytest.importorskip("trl")
if Version(trl.__version__) < Version("1.16") and not torch.cuda.is_available():
    pytest.skip("TRL < 1.16 runs its own chunked log-prob Triton kernel on CPU tensors, which fails under Triton's "
                "interpreter (TRL's kernel, not sloth_core's)", allow_module_level=True)
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

OUTPUTS = ("log_probs", "entropy", "is_top1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the kernels run (else the interpreter)


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    real = trl_lm_head.linear_log_probs
    monkeypatch.setattr(trl_lm_head, "linear_log_probs", lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
    return calls


def _with_head(arch, outputs, temperature):
    """A tiny model (seeded) with TRL's fused head, then LoRA with non-zero B."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model(arch, device=DEVICE)
    add_fused_lm_head(model, outputs=outputs, temperature=temperature)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _pair(arch="llama", outputs=OUTPUTS, temperature=1.0):
    """Two equal models with TRL's fused head (built twice: a deep copy's forward would still call the first one's
    backbone through TRL's closure); the second optimized."""
    optimized = _with_head(arch, outputs, temperature)
    sloth_core.optimize(optimized)
    return _with_head(arch, outputs, temperature), optimized


def _batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (2, 10), generator=g).to(DEVICE)
    labels = ids.clone()
    labels[0, :3] = -100
    return ids, labels


def _fused_call(model, ids, labels, **kw):
    out = model(input_ids=ids, labels=labels, fused_lm_head=True, **kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_serves_the_fused_head_with_trls_results(arch, kernel_calls):
    model, optimized = _pair(arch)
    rows = {r.pattern: r for r in sloth_core.report(optimized) if r.module == ""}
    assert rows["trl_fused_lm_head"].status == "replaced", rows
    ids, labels = _batch(model.config.vocab_size)
    kernel_calls.clear()
    want, want_g = _fused_call(model, ids, labels)
    got, got_g = _fused_call(optimized, ids, labels)
    assert kernel_calls == [torch.float32] * 2  # the first call's verification of its setting, then the call
    _fused_call(optimized, ids, labels)
    assert len(kernel_calls) == 3  # verified once per setting
    assert_close("loss", got.loss, want.loss)
    for name in ("log_probs", "entropy"):
        assert_close(name, getattr(got, name), getattr(want, name))
    assert torch.equal(got.is_top1, want.is_top1) and torch.equal(got.label_mask, want.label_mask)
    assert got_g.keys() == want_g.keys() and got_g
    for n in want_g:
        assert_close(f"grad {n}", got_g[n], want_g[n], scale=5.0)


def test_plain_calls_still_take_the_models_own_path(kernel_calls):
    """Without ``fused_lm_head``, TRL's forward calls the original one (here the fused causal-LM loss)."""
    model, optimized = _pair()
    ids, labels = _batch(model.config.vocab_size)
    kernel_calls.clear()
    out = optimized(input_ids=ids, labels=labels)
    assert kernel_calls == [] and out.loss is not None
    assert_close("loss", out.loss, model(input_ids=ids, labels=labels).loss)


@pytest.mark.parametrize("outputs, temperature, why", [
    (OUTPUTS + ("mean_logits",), 1.0, r"outputs \['mean_logits'\] are TRL's alone"),
    (OUTPUTS, 0.7, r"temperature 0.7 \(the kernel serves 1.0\)"),
])
def test_what_the_kernel_does_not_serve_runs_trls_function(outputs, temperature, why, kernel_calls):
    model, optimized = _pair(outputs=outputs, temperature=temperature)
    ids, labels = _batch(model.config.vocab_size)
    kernel_calls.clear()
    with pytest.warns(sloth_core.SlothCoreWarning, match=f"trl_fused_lm_head: TRL's chunked LM head runs on this "
                                                         f"call: {why}"):
        got, _ = _fused_call(optimized, ids, labels)
    want, _ = _fused_call(model, ids, labels)
    assert kernel_calls == []
    for name in outputs:
        assert_close(name, getattr(got, name).float(), getattr(want, name).float())


def test_a_dtype_changed_after_optimize_is_verified_on_first_use(kernel_calls):
    """The trainer casts the model to bf16 after optimize: the first call verifies bf16, then the kernel runs."""
    model, optimized = _pair()
    optimized.to(torch.bfloat16)
    model.to(torch.bfloat16)
    ids, labels = _batch(model.config.vocab_size)
    kernel_calls.clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got, _ = _fused_call(optimized, ids, labels)
    assert not [w for w in seen if "trl_fused_lm_head" in str(w.message)]  # (the LoRA layers fall back: their own)
    assert torch.bfloat16 in kernel_calls
    want, _ = _fused_call(model, ids, labels)
    assert_close("bf16 loss", got.loss, want.loss, dtype=torch.bfloat16)


def test_a_setting_that_does_not_verify_runs_trls_function(monkeypatch, kernel_calls):
    """A kernel that is wrong in bf16 only: optimize (fp32) binds it; after the cast, the first call's
    verification rejects it, TRL's function runs and a warning says why."""
    model, optimized = _pair()
    real = trl_lm_head.linear_log_probs

    def wrong_in_bf16(hidden, *a, **k):
        lp, ent, top1 = real(hidden, *a, **k)
        return (lp * 1.1, ent, top1) if hidden.dtype == torch.bfloat16 else (lp, ent, top1)

    monkeypatch.setattr(trl_lm_head, "linear_log_probs", wrong_in_bf16)
    optimized.to(torch.bfloat16)
    model.to(torch.bfloat16)
    ids, labels = _batch(model.config.vocab_size)
    with pytest.warns(sloth_core.SlothCoreWarning, match=r"runs on this call: not verified for torch.bfloat16: "
                                                         r"kernel disagrees"):
        got, _ = _fused_call(optimized, ids, labels)
    want, _ = _fused_call(model, ids, labels)
    assert_close("log_probs", got.log_probs, want.log_probs, dtype=torch.bfloat16)


def test_a_kernel_that_disagrees_at_optimize_is_not_bound(monkeypatch):
    monkeypatch.setattr(trl_lm_head, "linear_log_probs",
                        lambda *a, **k: tuple(t * 1.1 if t.is_floating_point() else t
                                              for t in trl_lm_head.linear_log_probs_reference(*a, **k)))
    _, optimized = _pair()
    [row] = [r for r in sloth_core.report(optimized) if r.pattern == "trl_fused_lm_head"]
    assert row.status == "skipped" and "kernel disagrees" in row.detail, row


def test_restore_gives_trls_forward_back():
    _, optimized = _pair()
    base = optimized.get_base_model()
    served = base.forward
    sloth_core.restore(optimized)
    assert base.forward.__func__ is not served.__func__
    assert base.forward.__func__.__globals__["_ChunkedLogProbFunction"] is trl_lm_head.binding.global_callable(
        base, "_ChunkedLogProbFunction")
    assert not hasattr(base.forward.__func__.__globals__["_ChunkedLogProbFunction"], "original")
