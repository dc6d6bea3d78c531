"""q/k/v projection outputs kept in host memory in offloading checkpointed layers (modes ``"offload"``,
``"offload-qkv"``):
the recompute takes the fused q/k/v projection's first-forward outputs back instead of running its GEMMs again,
with the recomputing path's losses and gradients (bitwise on the CPU)."""
import copy

import pytest
import torch

import sloth_core
from sloth_core import checkpointing as ck
from sloth_core.kernels import lora_qkv
from tests.batches import token_batch
from tests.sdpa_lora import assert_same, offload_on_cpu, run_step, sdpa_lora_model  # noqa: F401 (a fixture)


def test_the_default_offload_mode_keeps_them():
    assert ck.OFFLOAD_MODES["offload"] == (True, True) and ck.OFFLOAD_MODES["offload-qkv"] == (False, True)


@pytest.fixture
def projections_computed(monkeypatch):
    """How many projection outputs the fused q/k/v function computed (three a call that computes them)."""
    count, inside = {"n": 0}, [False]
    original, forward = lora_qkv._base_plus_lora, lora_qkv._LoRAQKVFunction.forward

    def within(ctx, *args):
        inside[0] = True
        try:
            return forward(ctx, *args)
        finally:
            inside[0] = False

    def counting(*args, **kwargs):
        count["n"] += inside[0]
        return original(*args, **kwargs)

    monkeypatch.setattr(lora_qkv._LoRAQKVFunction, "forward", staticmethod(within))
    monkeypatch.setattr(lora_qkv, "_base_plus_lora", counting)
    return count


def _step(model, ids, labels, early_stop=True):
    ck.reset_checkpointing_stats()
    with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):  # read by the forward's checkpoint
        loss, grads = run_step(model, ids, labels)
    return loss, grads, ck.checkpointing_stats()


@pytest.mark.parametrize("early_stop", [True, False], ids=["early_stop", "full_recompute"])
@pytest.mark.parametrize("attention", [False, True], ids=["attention_recomputed", "attention_kept"])
@pytest.mark.parametrize("model_type", ["llama", "qwen3", "mistral", "gemma2"])
def test_the_recompute_takes_the_kept_qkv_outputs_with_identical_gradients(model_type, attention, early_stop,
                                                                           device, offload_on_cpu, monkeypatch,
                                                                           projections_computed):
    """In a mode keeping them, each layer's first forward copies q, k, v to the host stash (three copies a layer)
    and its recompute computes none of them (the projection's GEMMs run once a step), whether the attention is
    recomputed (``"offload-qkv"``) or kept (``"offload"``); Qwen3 normalises q and k after the projection, Gemma2 saves
    its MLP output: both take the same path. Loss and gradients are the "on" path's (which recomputes them)."""
    ref = sdpa_lora_model(model_type, device)
    ids, labels = token_batch(device)
    layers = ref.config.num_hidden_layers
    on = sloth_core.optimize(copy.deepcopy(ref), gradient_checkpointing="on")
    model = sloth_core.optimize(copy.deepcopy(ref), gradient_checkpointing="offload" if attention else "offload-qkv")
    projections_computed["n"] = 0
    loss_on, grads_on, _ = _step(on, ids, labels)
    assert projections_computed["n"] == 2 * 3 * layers  # "on": the forward and the recompute
    projections_computed["n"] = 0
    loss, grads, stats = _step(model, ids, labels, early_stop)
    stashed = model_type != "gemma2"  # Gemma2's MLP output is saved: its layers have no stash
    assert projections_computed["n"] == (1 if stashed else 2) * 3 * layers
    assert stats.qkv_outputs == (3 * layers if stashed else 0)
    assert stats.qkv_reused == (layers if stashed else 0)
    assert stats.attention_reused == (layers if stashed and attention else 0)
    assert stats.recomputes == layers
    assert_same(loss, loss_on, "loss", device)
    assert grads.keys() == grads_on.keys()
    for n, g in grads_on.items():
        assert_same(grads[n], g, n, device)


def test_switching_the_mode_between_forward_and_backward_keeps_each_layer_on_its_path(device, offload_on_cpu,
                                                                                     projections_computed):
    """Each layer call reads its mode once: a mode keeping q/k/v set after the forward does not make the recompute
    look for copies that were never made, and one not keeping them does not make it compute what it kept."""
    ref = sdpa_lora_model("llama", device)
    ids, labels = token_batch(device)
    layers = ref.config.num_hidden_layers
    loss_on, grads_on = run_step(sloth_core.optimize(copy.deepcopy(ref), gradient_checkpointing="on"), ids, labels)
    for forward_flag in (True, False):
        keeping, not_keeping = "offload-qkv", "offload-inputs"
        model = sloth_core.optimize(copy.deepcopy(ref), gradient_checkpointing=keeping if forward_flag else not_keeping)
        ck.reset_checkpointing_stats()
        projections_computed["n"] = 0
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=labels).loss
        ck.enable_checkpointing(model, not_keeping if forward_flag else keeping)
        loss.backward()
        assert ck.checkpointing_stats().qkv_reused == (layers if forward_flag else 0)
        assert projections_computed["n"] == (1 if forward_flag else 2) * 3 * layers
        assert_same(loss.detach(), loss_on, "loss", device)
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert_same(p.grad, grads_on[n], n, device)


def test_unfused_projections_are_recomputed(device, offload_on_cpu, monkeypatch, projections_computed):
    """Without the fused q/k/v function (``exclude=("lora_qkv",)``) nothing is kept: PEFT's projections are
    recomputed as usual, gradients as the "on" path's."""
    ref = sdpa_lora_model("llama", device)
    ids, labels = token_batch(device)
    loss_on, grads_on, _ = _step(sloth_core.optimize(copy.deepcopy(ref), gradient_checkpointing="on",
                                                     exclude=("lora_qkv",)), ids, labels)
    model = sloth_core.optimize(copy.deepcopy(ref), gradient_checkpointing="offload", exclude=("lora_qkv",))
    projections_computed["n"] = 0
    loss, grads, stats = _step(model, ids, labels)
    assert projections_computed["n"] == 0 and stats.qkv_outputs == 0 and stats.qkv_reused == 0
    assert_same(loss, loss_on, "loss", device)
    for n, g in grads_on.items():
        assert_same(grads[n], g, n, device)
