"""sloth_core next to other kernel patches (issue 18, item 5): Liger-Kernel's process-wide and per-instance patches
of a Llama, and ``torch.compile``.

* Liger first (``apply_liger_kernel_to_llama()``, what TRL's ``use_liger_kernel=True`` does for an earlier model):
  the model built afterwards has Liger's MLP class, RoPE function and ``lce_forward``; ``optimize`` verifies each
  against Liger's own forward and serves it with sloth_core's kernels, the report naming whose function it serves;
  the loss and gradients match the unoptimized Liger model and the plain HF model.
* Liger on the instance (``apply_liger_kernel_to_llama(model=...)``): its MLP forwards are served the same way, its
  fused loss on the instance is left to it, by name.
* Deleting an optimized model frees it (weakrefs dead after ``gc.collect()``), with Liger first and without.
* ``torch.compile``: the model is left as it is, with the reason.

Liger patches transformers' ``modeling_llama`` module and ``LlamaForCausalLM.forward`` for the whole process: the
:func:`tests.liger_patches.liger_patches` context puts back every attribute it changed, and checks that it did, so
later tests see transformers as it was (checked here too). On the CPU Liger's Triton kernels run under the
interpreter with one shim (:func:`_float_scalars`); its RMSNorm kernel does not run there at all (a store of
``None``), nor its cross-entropy under triton 3.6, so CPU runs patch what runs (:func:`liger_kwargs`), and check
that ``optimize`` leaves a Liger norm it cannot probe to Liger, by name. Skipped where ``liger_kernel`` is not
importable (CI installs it with the ``dev`` extra).
"""
import contextlib
import copy
import gc
import os
import warnings
import weakref
from unittest import mock

import pytest
import torch

import sloth_core
from sloth_core.warning import SlothCoreWarning
from tests.batches import token_batch
from tests.liger_patches import liger_patches
from tests.sdpa_lora import TARGETS, offload_on_cpu  # noqa: F401 (a fixture)

pytest.importorskip("liger_kernel.transformers", reason="liger_kernel is not installed (the dev extra has it)")

_INTERPRETED = bool(os.environ.get("TRITON_INTERPRET"))


@contextlib.contextmanager
def _float_scalars():
    """Under Triton's interpreter, Python float kernel arguments as fp32 scalars -- what compiled Triton makes of
    them (Liger's kernels call ``.to()`` on theirs; the interpreter passes a bare ``float``). A no-op on a GPU."""
    if not _INTERPRETED:
        yield
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    convert = interpreter._implicit_cvt

    def implicit_cvt(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return convert(arg)

    with mock.patch.object(interpreter, "_implicit_cvt", implicit_cvt):
        yield


@pytest.fixture
def interpreter_float_scalars():
    with _float_scalars():
        yield


def _runs(fn) -> bool:
    try:
        with _float_scalars():
            fn()
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def liger_kwargs():
    """Liger's defaults (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy) but those whose Triton kernel does not
    run here: under the interpreter its RMSNorm kernel stores ``None``, and triton 3.6's interpreter cannot run its
    cross-entropy kernel (``range`` over a kernel argument). On a GPU: all of them."""
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerRMSNorm
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    from transformers import LlamaConfig

    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the tests' device (module scope: no device fixture)
    # Liger discovers its RoPE backends on first use and logs each import that fails with the exception object as a
    # log argument; pytest's log capture keeps that record, whose traceback reaches the frames (and the model) of
    # whatever called first. Discover here, before any model exists (outside pytest no handler keeps the record).
    q = torch.randn(1, 2, 3, 4, device=dev)
    _runs(lambda: liger_rotary_pos_emb(q, q, torch.ones(1, 3, 4, device=dev), torch.zeros(1, 3, 4, device=dev)))
    x = torch.randn(2, 8, device=dev, requires_grad=True)
    mlp = LigerSwiGLUMLP(LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                     num_key_value_heads=2)).to(dev)
    return {"rms_norm": _runs(lambda: LigerRMSNorm(8).to(dev)(x).sum().backward()),
            "swiglu": _runs(lambda: mlp(x).sum().backward()),
            "fused_linear_cross_entropy": _runs(
                lambda: LigerCrossEntropyLoss()(x, torch.tensor([1, -100], device=dev)).backward())}


def _lora_model(device, state=None):
    """A tiny one-layer Llama on sdpa with r=4 LoRA on every projection (B != 0), of whatever classes
    ``modeling_llama`` has now; ``state``: the base weights to load (the same model under other classes)."""
    from peft import LoraConfig, get_peft_model

    from sloth_core.tiny import tiny_model

    base = tiny_model("llama", device=device, num_hidden_layers=1)
    base.config._attn_implementation = "sdpa"
    if state is not None:
        base.load_state_dict(state)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator(p.device).manual_seed(len(n)))
    return model


def _step(model, device):
    ids, labels = token_batch(device)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_close(a, b, what):
    loss_a, grads_a = a
    loss_b, grads_b = b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-4, atol=1e-5, msg=f"loss vs {what}")
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=1e-3, atol=1e-5, msg=f"{n} vs {what}")


def _rows(model):
    return {(r.module, r.pattern): r for r in sloth_core.report(model)}


def test_liger_patches_context_restores_transformers(device):
    from transformers.models.llama import modeling_llama

    originals = (modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP, modeling_llama.apply_rotary_pos_emb,
                 modeling_llama.LlamaForCausalLM.forward)
    with liger_patches():
        assert modeling_llama.LlamaMLP.__name__ == "LigerSwiGLUMLP"
        assert modeling_llama.LlamaRMSNorm.__name__ == "LigerRMSNorm"
        assert modeling_llama.LlamaForCausalLM.forward is not originals[3]
    assert (modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP, modeling_llama.apply_rotary_pos_emb,
            modeling_llama.LlamaForCausalLM.forward) == originals


def test_liger_first_process_is_served_and_matches(device, offload_on_cpu, interpreter_float_scalars, liger_kwargs):
    if not liger_kwargs["swiglu"]:
        pytest.skip("Liger's SwiGLU kernel does not run here")
    plain = _lora_model(device)
    state = plain.get_base_model().state_dict()
    state = {k: v for k, v in state.items() if "lora_" not in k}
    state = {k.replace(".base_layer", ""): v for k, v in state.items()}
    expected_plain = _step(plain, device)
    with liger_patches(**liger_kwargs):
        model = _lora_model(device, state)
        assert type(model.get_base_model().model.layers[0].mlp).__name__ == "LigerSwiGLUMLP"
        unoptimized = copy.deepcopy(model)
        expected_liger = _step(unoptimized, device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SlothCoreWarning)  # the KV-cache note of checkpointed calls
            sloth_core.optimize(model, gradient_checkpointing="offload")
        got = _step(model, device)
    rows = _rows(model)
    assert rows[("model.layers.0.mlp", "lora_mlp")].status == "replaced"
    assert "serves Liger-Kernel's LigerSwiGLUMLP.forward" in rows[("model.layers.0.mlp",
                                                                   "lora_mlp")].detail
    rope = rows[("model.layers.0.self_attn", "rope")]
    assert rope.status == "replaced" and "serves Liger-Kernel's liger_rotary_pos_emb" in rope.detail
    loss = rows[("", "causal_lm_loss")]
    assert loss.status == "replaced"
    assert ("serves Liger-Kernel's lce_forward" in loss.detail) == liger_kwargs["fused_linear_cross_entropy"]
    for r in rows.values():
        if r.pattern == "rms_norm":
            assert r.status == "replaced"
            assert ("serves Liger-Kernel's LigerRMSNorm.forward" in r.detail) == liger_kwargs["rms_norm"]
    _assert_close(got, expected_liger, "the unoptimized Liger model")
    _assert_close(got, expected_plain, "the plain HF model")


def test_liger_norm_is_served_or_left_by_name(device, interpreter_float_scalars, liger_kwargs):
    """With Liger's RMSNorm: served where its kernel runs (a GPU), else left to it with the reason and its name."""
    with liger_patches(rope=False, swiglu=False, fused_linear_cross_entropy=False):
        model = _lora_model(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SlothCoreWarning)
            sloth_core.optimize(model)
    rows = [r for r in sloth_core.report(model) if r.pattern == "rms_norm"]
    assert len(rows) == 3
    for r in rows:
        if not liger_kwargs["rms_norm"]:
            assert r.status == "skipped" and "probe failed on the original module" in r.detail
            assert "the module runs Liger-Kernel's LigerRMSNorm.forward: left to it" in r.detail, r.detail
        else:
            assert r.status == "replaced" and "serves Liger-Kernel's LigerRMSNorm.forward" in r.detail, r.detail


def test_liger_instance_patches_are_served_or_left_by_name(device, interpreter_float_scalars, liger_kwargs):
    if not liger_kwargs["swiglu"]:
        pytest.skip("Liger's SwiGLU kernel does not run here")
    plain = _lora_model(device)
    expected = _step(plain, device)
    model = _lora_model(device)
    with liger_patches(**liger_kwargs, model=model.get_base_model()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SlothCoreWarning)
            sloth_core.optimize(model)
        got = _step(model, device)
    rows = _rows(model)
    mlp = rows[("model.layers.0.mlp", "lora_mlp")]
    assert mlp.status == "replaced" and "serves Liger-Kernel's LigerSwiGLUMLP.forward" in mlp.detail
    loss = rows[("", "causal_lm_loss")]
    if liger_kwargs["fused_linear_cross_entropy"]:
        assert loss.status == "skipped" and "by Liger-Kernel's lce_forward" in loss.detail
        assert "left to it" in loss.detail
    _assert_close(got, expected, "the plain HF model")


@pytest.mark.parametrize("with_liger", [False, True], ids=["plain", "liger-first"])
def test_deleting_an_optimized_model_frees_it(device, offload_on_cpu, interpreter_float_scalars, liger_kwargs,
                                              with_liger):
    patches = liger_patches(**liger_kwargs) if with_liger else contextlib.nullcontext()
    with patches:
        model = _lora_model(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SlothCoreWarning)
            sloth_core.optimize(model, gradient_checkpointing="offload")
        _step(model, device)
        refs = [weakref.ref(model), weakref.ref(model.get_base_model().model.layers[0].mlp.gate_proj.base_layer.weight),
                weakref.ref(model.get_base_model().lm_head.weight)]
        del model
        gc.collect()
        alive = [r() for r in refs if r() is not None]
        assert not alive, "still referenced by: " + "; ".join(
            f"{type(x).__name__} in {module_of}" for x in alive[:1] for module_of in
            [f"{type(h).__module__}.{type(h).__qualname__}: {str(h)[:120]}" for h in gc.get_referrers(x)[:6]])


@pytest.mark.parametrize("how", ["module", "forward"])
def test_torch_compiled_model_is_left_with_the_reason(device, how):
    from sloth_core.tiny import tiny_model

    model = tiny_model("llama", device=device, num_hidden_layers=1)
    if how == "module":
        given = torch.compile(model)
        reason = "OptimizedModule around LlamaForCausalLM"
    else:
        model.forward = torch.compile(model.forward)
        given = model
        reason = "the model.forward was replaced by torch.compile's wrapper"
    with pytest.warns(SlothCoreWarning, match="torch.compile") as caught:
        assert sloth_core.optimize(given) is given
    assert any(reason in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert not sloth_core.is_optimized(model) and not sloth_core.report(model)
    assert not any(sloth_core.binding.records(m) for m in model.modules())
