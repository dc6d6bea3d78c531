"""HF's checkpointing switched on for an optimized model (a trainer's default, or the user) is served by
sloth_core's (sloth_core.checkpointing_takeover): in the mode optimize was given, "offload" when none; HF's
checkpoint function never runs; loss and gradients equal the plain model's (bitwise on the CPU); the report says
which checkpointing runs; switching HF's off turns ours off where it ran on HF's behalf; restore undoes it all."""
import copy

import pytest
import torch

import sloth_core
from sloth_core import binding
from sloth_core import checkpointing as ck
from sloth_core.memory import host
from sloth_core.checkpointing_takeover import TARGET
from sloth_core.tiny import tiny_model
from tests.batches import token_batch
from tests.hf_checkpointing import count_hf_checkpoints

pytestmark = pytest.mark.filterwarnings("ignore:sloth_core checkpointing.*KV cache")


@pytest.fixture(autouse=True)
def _offload_on_cpu(monkeypatch):
    monkeypatch.setattr(host, "OFFLOAD_CPU_INPUTS", True)
    ck.reset_checkpointing_stats()
    yield
    ck.clear_host_pool()


def _layers(model):
    return [layer for _, layer in ck.decoder_layers(model)]


def _count_hf_checkpoints(model):
    return count_hf_checkpoints(_layers(model))


def _step(model, device):
    ids, labels = token_batch(device, s=9)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _optimized(model, **options):
    """The reference: the same model optimized without checkpointing (the kernels are deterministic: a
    checkpointed step is bitwise the same on the CPU)."""
    return sloth_core.optimize(copy.deepcopy(model), **options)


def _assert_same_step(ref, model, device, exact=True):
    """Same loss and gradients: bitwise on the CPU where ``exact`` (the fused LoRA MLP's offloaded backward
    recomputes in column chunks: not bitwise)."""
    loss0, grads0 = _step(ref, device)
    ck.reset_checkpointing_stats()
    loss1, grads1 = _step(model, device)
    close = torch.equal if exact and device.type == "cpu" else \
        (lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-6))
    assert close(loss1, loss0)
    assert grads0.keys() == grads1.keys() and all(close(grads1[n], grads0[n]) for n in grads0)
    return ck.checkpointing_stats()


def _modes(model):
    return {r.detail for r in sloth_core.report(model) if r.pattern == "checkpointing"}


@pytest.mark.parametrize("given, runs", [(None, "offload"), ("on", "on"), ("offload", "offload")])
def test_hf_switched_on_after_optimize_runs_ours(given, runs, device):
    plain = tiny_model("llama", device=device).train()
    ref, model = _optimized(plain), _optimized(plain, gradient_checkpointing=given)
    model.gradient_checkpointing_enable()  # what a trainer does with its default config
    hf_calls = _count_hf_checkpoints(model)
    stats = _assert_same_step(ref, model, device)
    n = len(_layers(model))
    assert stats.checkpointed_calls == n and hf_calls[0] == 0
    assert stats.offloaded == (n if runs == "offload" else 0)
    assert _modes(model) == {f"mode={runs}, serving Hugging Face's checkpointing (switched on for this model)"}


def test_hf_on_before_optimize_is_taken_over_at_once(device):
    plain = tiny_model("qwen3", device=device).train()
    ref, model = _optimized(plain), copy.deepcopy(plain)
    model.gradient_checkpointing_enable()  # optimize(trainer.model) after the trainer switched HF's on
    sloth_core.optimize(model)
    hf_calls = _count_hf_checkpoints(model)
    stats = _assert_same_step(ref, model, device)
    assert stats.checkpointed_calls == len(_layers(model)) and stats.offloaded == stats.checkpointed_calls
    assert hf_calls[0] == 0


def test_hf_switched_off_turns_ours_off_only_where_it_served_hf(device):
    model = sloth_core.optimize(tiny_model("llama", device=device).train())
    model.gradient_checkpointing_enable()
    assert ck.checkpointed_layers(model)
    model.gradient_checkpointing_disable()
    assert not ck.checkpointed_layers(model) and not _modes(model)
    assert all(not layer.gradient_checkpointing for layer in _layers(model))

    mine = sloth_core.optimize(tiny_model("llama", device=device).train(), gradient_checkpointing="on")
    mine.gradient_checkpointing_enable()
    mine.gradient_checkpointing_disable()
    assert _modes(mine) == {"mode=on"}  # the user's own choice stays


def test_lora_model_under_hf_enable_and_restore(device):
    from peft import LoraConfig, get_peft_model

    plain = get_peft_model(tiny_model("mistral", device=device),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")).train()
    with torch.no_grad():
        for n, p in plain.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ref, model = _optimized(plain), _optimized(plain)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf_calls = _count_hf_checkpoints(model)
    stats = _assert_same_step(ref, model, device, exact=False)
    assert stats.checkpointed_calls == len(_layers(model)) and hf_calls[0] == 0
    base = model.get_base_model()
    assert TARGET in base.__dict__
    sloth_core.restore(model)
    assert TARGET not in base.__dict__ and not ck.checkpointed_layers(model)


def test_off_leaves_hf_checkpointing_to_hf(device):
    model = sloth_core.optimize(tiny_model("llama", device=device).train(), gradient_checkpointing="off")
    model.gradient_checkpointing_enable()
    hf_calls = _count_hf_checkpoints(model)
    _step(model, device)
    assert not ck.checkpointed_layers(model) and hf_calls[0] == len(_layers(model))


def test_pickle_and_deepcopy_of_a_model_whose_checkpointing_serves_hf(device):
    import pickle

    model = sloth_core.optimize(tiny_model("llama", device=device).train())
    back = pickle.loads(pickle.dumps(model))  # (after HF's enable HF's own input hook does not pickle)
    back.gradient_checkpointing_enable()
    _step(back, device)  # runs: the bindings fall back to the classes' methods, as every binding does
    model.gradient_checkpointing_enable()
    twin = copy.deepcopy(model)
    assert twin.__dict__[TARGET].__self__ is twin
    ck.reset_checkpointing_stats()
    _step(twin, device)
    assert ck.checkpointing_stats().checkpointed_calls == len(_layers(twin))


def test_lora_added_after_optimize_is_bound_when_hf_checkpointing_is_switched_on(device):
    """The order TRL's SFTTrainer(peft_config=...) takes: the user's optimize line on the bare model, then the
    trainer adds the adapters, then switches HF's checkpointing on. The new LoRA layers get the kernels then, the
    MLPs go from gated_mlp to lora_mlp, and the report says so."""
    from peft import LoraConfig, get_peft_model

    base = sloth_core.optimize(tiny_model("llama", device=device).train())
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    statuses = {(r.pattern, r.status) for r in sloth_core.report(model)}
    assert ("gated_mlp", "replaced") in statuses and not {p for p, _ in statuses} & {"lora_linear", "lora_mlp"}
    model.gradient_checkpointing_enable()
    statuses = {(r.pattern, r.status) for r in sloth_core.report(model)}
    assert {("lora_linear", "replaced"), ("lora_mlp", "replaced"), ("lora_qkv", "replaced"),
            ("gated_mlp", "superseded")} <= statuses
    mlp = base.model.layers[0].mlp
    assert [r.pattern for r in binding.records(mlp)] == ["lora_mlp"]
    ck.reset_checkpointing_stats()
    _step(model, device)
    assert ck.checkpointing_stats().checkpointed_calls == len(_layers(model))
