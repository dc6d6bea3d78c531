"""What ``report()`` and ``is_optimized()`` say follows what is installed through the model's round trips, and
``optimize()`` afterwards reinstalls what is missing: pickle and ``torch.save`` keep no kernel (the replacements
are closures), a deep copy keeps them all, a model built on the meta device gets them once it is materialized."""
import contextlib
import copy
import io
import pickle
import warnings

import pytest
import torch

import sloth_core
from sloth_core.registry.patterns import rope as rope_pattern
from sloth_core.tiny import tiny_config, tiny_model
from sloth_core.tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def rope_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(rope_pattern, "apply_rope", lambda *a: calls.append(1) or rope_pattern.rope_reference(*a))
    return calls


def _ids():
    return torch.randint(2, 100, (2, 8), generator=torch.Generator().manual_seed(0)).to(DEVICE)


def _statuses(model):
    return {r.status for r in sloth_core.report(model)}


def _torch_save(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _optimize_quietly(model):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        sloth_core.optimize(model)
    return [str(w.message) for w in seen if isinstance(w.message, sloth_core.SlothCoreWarning)]


@pytest.mark.parametrize("round_trip", ["loads", "torch_save"])
def test_a_pickled_model_says_it_runs_no_kernel_and_optimize_binds_them_again(round_trip, rope_calls):
    model = sloth_core.optimize(tiny_model("llama", device=DEVICE))
    want = model(input_ids=_ids()).logits
    back = pickle.loads(pickle.dumps(model)) if round_trip == "loads" else _torch_save(model)
    assert not sloth_core.is_optimized(back)
    assert _statuses(back) == {"undone"}
    rope_calls.clear()
    assert_close("unpickled logits", back(input_ids=_ids()).logits, want)
    assert not rope_calls  # HF's forwards run
    warned = _optimize_quietly(back)
    assert not [w for w in warned if "nothing changed" in w], warned
    assert sloth_core.is_optimized(back) and _statuses(back) == {"replaced"}
    assert_close("re-optimized logits", back(input_ids=_ids()).logits, want)
    assert rope_calls


def test_a_deep_copy_keeps_its_kernels(rope_calls):
    model = sloth_core.optimize(tiny_model("llama", device=DEVICE))
    twin = copy.deepcopy(model)
    assert sloth_core.is_optimized(twin) and _statuses(twin) == {"replaced"}
    rope_calls.clear()
    assert_close("copy logits", twin(input_ids=_ids()).logits, model(input_ids=_ids()).logits)
    assert len(rope_calls) == 2 * twin.config.num_hidden_layers
    assert any("nothing changed" in w for w in _optimize_quietly(twin))


def test_a_meta_model_gets_its_kernels_once_materialized(rope_calls):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    _optimize_quietly(model)
    assert "replaced" not in _statuses(model)  # nothing verifies on the meta device
    model.to_empty(device=DEVICE)
    ref = tiny_model("llama", device=DEVICE)
    model.load_state_dict(ref.state_dict())
    with torch.no_grad():  # the non-persistent buffers (RoPE's inv_freq) are not in a state dict
        for (name, buf), (_, ref_buf) in zip(model.named_buffers(), ref.named_buffers()):
            buf.copy_(ref_buf)
    warned = _optimize_quietly(model)
    assert not [w for w in warned if "nothing changed" in w], warned
    assert _statuses(model) == {"replaced"}
    rope_calls.clear()
    assert_close("materialized logits", model(input_ids=_ids()).logits, ref(input_ids=_ids()).logits)
    assert rope_calls


def test_optimize_train_restore_cycles_do_not_grow_the_process():
    """optimize / a training step / restore, again and again on one model: after a few cycles to warm the caches,
    no Python object and no resident memory accumulates."""
    import gc
    import resource

    model = tiny_model("llama", device=DEVICE)
    ids = _ids()

    def cycle():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sloth_core.optimize(model, gradient_checkpointing="offload")
        model(input_ids=ids, labels=ids).loss.backward()
        sloth_core.restore(model)
        model.zero_grad(set_to_none=True)

    for _ in range(4):
        cycle()
    gc.collect()
    objects, rss = len(gc.get_objects()), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(12):
        cycle()
    gc.collect()
    assert len(gc.get_objects()) - objects <= 50
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss <= 64 * 1024  # KiB: no growth past noise


@pytest.mark.parametrize("mode", ["on", "offload"])
def test_a_deleted_optimized_model_is_freed(mode, monkeypatch):
    """Nothing sloth_core keeps (bindings, guards, checkpointing state, host buffers, TRL-style re-created forwards)
    holds an optimized LoRA model after its last reference goes: it and every parameter are collected."""
    import gc
    import weakref

    from peft import LoraConfig, get_peft_model

    from sloth_core.memory import host

    monkeypatch.setattr(host, "OFFLOAD_CPU_INPUTS", True)
    model = get_peft_model(tiny_model("llama", device=DEVICE),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sloth_core.optimize(model, gradient_checkpointing=mode)
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    refs = [weakref.ref(model)] + [weakref.ref(p) for p in model.parameters()]
    del model
    gc.collect()
    assert [r for r in refs if r() is not None] == []


@pytest.mark.parametrize("hf_on", [True, False])
def test_an_unpickled_model_gets_hf_checkpointing_back_as_it_was(hf_on):
    """Ours served HF's checkpointing (or ran on its own): the unpickled model has lost our wrapper, and HF's flag
    comes back with HF's value -- it does not train silently without checkpointing."""
    model = tiny_model("llama", device=DEVICE)
    for layer in model.model.layers:  # what HF's gradient_checkpointing_enable sets (it also hooks the embeddings
        layer.gradient_checkpointing = hf_on  # with a closure, which no model pickles with)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sloth_core.optimize(model, gradient_checkpointing="offload" if not hf_on else None)
    assert not any(layer.gradient_checkpointing for layer in model.model.layers)  # suspended while ours runs
    back = _torch_save(model)
    assert {layer.gradient_checkpointing for layer in back.model.layers} == {hf_on}
    assert {type(layer.gradient_checkpointing) for layer in back.model.layers} == {bool}


def _lora_pair():
    """A tiny LoRA model and an unoptimized deep copy of it (the reference); B is made non-zero so an adapter that
    is skipped, or served with the wrong weights, changes the logits."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama", device=DEVICE),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator(p.device).manual_seed(len(name)))
    return model, copy.deepcopy(model)


def _second_adapter(model):
    from peft import LoraConfig

    model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".second" in name:  # A too: add_adapter draws it from the global generator
                p.normal_(0, 0.3, generator=torch.Generator(p.device).manual_seed(len(name) + 1))


@pytest.mark.parametrize("change", ["set_adapter", "disable_adapter", "two_active", "delete_adapter"])
def test_a_peft_adapter_change_after_optimize_computes_what_peft_does(change):
    """PEFT adapter changes after ``optimize``: the optimized model's logits follow the unoptimized copy given the
    same change (the LoRA replacements read the adapter state at every call, so a setting they do not serve runs
    PEFT's forward), and the report never lists as replaced a LoRA module whose replacement does not run."""
    model, ref = _lora_pair()
    _optimize_quietly(model)
    ids = _ids()
    for m in (model, ref):
        _second_adapter(m)
        if change == "set_adapter":
            m.set_adapter("second")
        elif change == "two_active":
            m.base_model.set_adapter(["default", "second"])
        elif change == "delete_adapter":
            m.set_adapter("second")
            m.delete_adapter("default")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.ExitStack() as stack:
            if change == "disable_adapter":
                stack.enter_context(model.disable_adapter())
                stack.enter_context(ref.disable_adapter())
            out, want = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert_close(f"logits after {change}", out, want, dtype=torch.float32)
    fallen = {r.module for r in sloth_core.report(model) if r.status == "fallback"}
    replaced_lora = {r.module for r in sloth_core.report(model)
                     if r.status == "replaced" and r.pattern == "lora_linear"}
    assert not (fallen & replaced_lora)
    if change in ("two_active", "disable_adapter"):  # settings the kernels do not serve: PEFT's forward ran, said
        assert fallen, "a LoRA setting sloth_core does not serve ran PEFT's forward without a fallback in the report"
    if change == "disable_adapter":  # the context is over: the kernels run again and the report says so
        assert_close("logits after the context", model(input_ids=ids).logits, ref(input_ids=ids).logits,
                     dtype=torch.float32)
        still = [(r.module, r.pattern, r.detail) for r in sloth_core.report(model) if r.status == "fallback"]
        assert not still
