"""A kernel runs only on a verified setting (:mod:`sloth_core.guard`): a model cast after ``optimize`` (``.to``,
``.half``) or run under autocast verifies its new setting on first use, once per signature, and runs the kernels;
a setting that does not verify runs Hugging Face's forward, warns, and the report says ``fallback``."""
import warnings

import pytest
import torch

import sloth_core
from sloth_core import guard
from sloth_core.kernels import rms_norm as rms_kernel
from sloth_core.tiny import tiny_model
from sloth_core.tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the kernels run (else the interpreter)


class _Spy:
    """Stands for the RMSNorm kernel's autograd function: records the input dtypes, scales bf16 outputs by
    ``bf16_factor`` (a kernel wrong in bf16 only)."""

    def __init__(self, real, bf16_factor=1.0):
        self.real, self.factor, self.seen = real, bf16_factor, []

    def apply(self, x, *args):
        self.seen.append(x.dtype)
        out = self.real.apply(x, *args)
        return out * self.factor if x.dtype == torch.bfloat16 and self.factor != 1.0 else out


@pytest.fixture
def norm_inputs(monkeypatch):
    """The dtypes the RMSNorm kernel is called with."""
    spy = _Spy(rms_kernel._RMSNormFunction)
    monkeypatch.setattr(rms_kernel, "_RMSNormFunction", spy)
    return spy.seen


@pytest.fixture
def verifications(monkeypatch):
    calls = []
    real = guard._verify_now
    monkeypatch.setattr(guard, "_verify_now", lambda pattern, *a: calls.append(pattern.name) or real(pattern, *a))
    return calls


def _ids(vocab=128):
    return torch.randint(2, vocab, (2, 8), generator=torch.Generator().manual_seed(0)).to(DEVICE)


def _quiet_call(model, **kw):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = model(**kw)
    return out, [str(w.message) for w in seen if isinstance(w.message, sloth_core.SlothCoreWarning)]


def test_a_cast_after_optimize_is_verified_once_per_signature_and_runs_the_kernels(norm_inputs, verifications):
    model, plain = sloth_core.optimize(tiny_model("llama", device=DEVICE)), tiny_model("llama", device=DEVICE)
    model.to(torch.bfloat16)
    plain.to(torch.bfloat16)
    norm_inputs.clear()
    out, warned = _quiet_call(model, input_ids=_ids())
    assert not warned, warned
    assert norm_inputs and set(norm_inputs) == {torch.bfloat16}
    # one verification per pattern and signature (5 norms, 2 MLPs of one shape each, the head), not per module
    assert sorted(verifications) == ["causal_lm_loss", "gated_mlp", "rms_norm"]
    assert_close("bf16 logits", out.logits, plain(input_ids=_ids()).logits, dtype=torch.bfloat16, scale=4.0)
    assert {r.status for r in sloth_core.report(model)} == {"replaced"}
    model(input_ids=_ids())
    assert len(verifications) == 3


def test_autocast_after_optimize_is_verified_on_first_use(norm_inputs):
    model, plain = sloth_core.optimize(tiny_model("llama", device=DEVICE)), tiny_model("llama", device=DEVICE)
    ids = _ids()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        (out, warned), want = _quiet_call(model, input_ids=ids, labels=ids), plain(input_ids=ids, labels=ids)
    assert not warned, warned
    assert norm_inputs
    assert_close("autocast loss", out.loss, want.loss, dtype=torch.bfloat16)


def test_optimize_under_autocast_verifies_at_the_autocast_precision():
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        model = sloth_core.optimize(tiny_model("llama", device=DEVICE))
    assert {r.status for r in sloth_core.report(model)} == {"replaced"}, sloth_core.format_report(model)


def test_a_setting_that_does_not_verify_falls_back_and_says_so(monkeypatch):
    monkeypatch.setattr(rms_kernel, "_RMSNormFunction", _Spy(rms_kernel._RMSNormFunction, bf16_factor=1.1))
    model, plain = sloth_core.optimize(tiny_model("llama", device=DEVICE)), tiny_model("llama", device=DEVICE)
    model.to(torch.bfloat16)
    plain.to(torch.bfloat16)
    out, warned = _quiet_call(model, input_ids=_ids())
    assert any("rms_norm on a LlamaRMSNorm" in w and "does not verify" in w for w in warned), warned
    assert_close("fallback logits", out.logits, plain(input_ids=_ids()).logits, dtype=torch.bfloat16, scale=4.0)
    statuses = {(r.pattern, r.status) for r in sloth_core.report(model)}
    assert ("rms_norm", "fallback") in statuses and ("rms_norm", "replaced") not in statuses
    assert ("gated_mlp", "replaced") in statuses
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sloth_core.optimize(model)  # verifies the bf16 setting again: still wrong, so skipped
    assert {r.status for r in sloth_core.report(model) if r.pattern == "rms_norm"} == {"skipped"}


def test_a_setting_verified_inside_an_offloading_layer_leaves_its_stash_alone(monkeypatch):
    """The first call under a new setting (here autocast) comes inside a checkpointed, offloading layer: the probe's
    kernel calls must neither join the layer's saved tensors nor its stash's call order, or the recompute would
    not match the forward (torch's CheckpointError). Loss and gradients as the "on" path's."""
    from peft import LoraConfig, get_peft_model

    from sloth_core.memory import host

    monkeypatch.setattr(host, "OFFLOAD_CPU_INPUTS", True)  # CPU tensors take the whole offload path (the stash)

    def lora_model():
        model = get_peft_model(tiny_model("llama", device=DEVICE),
                               LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05, generator=torch.Generator(device=p.device).manual_seed(0))
        return model

    results = {}
    for mode in ("on", "offload"):
        model = sloth_core.optimize(lora_model(), gradient_checkpointing=mode)
        ids = _ids()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results[mode] = loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    (loss_off, grads_off), (loss_on, grads_on) = results["offload"], results["on"]
    assert_close("loss", loss_off, loss_on, dtype=torch.bfloat16)
    assert grads_off.keys() == grads_on.keys() and grads_on
    for n in grads_on:
        assert_close(n, grads_off[n], grads_on[n], dtype=torch.bfloat16)
