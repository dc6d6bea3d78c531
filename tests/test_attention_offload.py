"""Attention tensors kept in host memory in offloading checkpointed layers (:mod:`sloth_core.attention_offload`):
the recompute takes the first forward's attention output back instead of running the attention again, with the
recomputing path's losses and gradients."""
import copy
import types

import pytest
import torch
import torch.nn.functional as F

import sloth_core
from sloth_core import attention_offload as ao
from sloth_core import checkpointing as ck
from sloth_core.memory.stash import LayerStash
from sloth_core.memory import host
from tests.batches import token_batch
from tests.sdpa_lora import assert_same, offload_on_cpu, run_step, sdpa_lora_model  # noqa: F401 (a fixture)


def test_the_default_offload_mode_keeps_the_attention():
    assert ck.OFFLOAD_MODES["offload"] == (True, True) and ck.OFFLOAD_MODES["offload-attention"] == (True, False)


@pytest.fixture
def attention_runs(monkeypatch):
    """How often the offloaded attention function ran the attention (its calls go through ``ao.F``)."""
    count = {"n": 0}

    def counting(*args, **kwargs):
        count["n"] += 1
        return F.scaled_dot_product_attention(*args, **kwargs)

    monkeypatch.setattr(ao, "F", types.SimpleNamespace(scaled_dot_product_attention=counting))
    return count


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "mistral"])
def test_recompute_reuses_the_attention_output_with_identical_gradients(model_type, device, offload_on_cpu,
                                                                        attention_runs):
    ref = sdpa_lora_model(model_type, device)
    ids, labels = token_batch(device)
    on = sloth_core.optimize(copy.deepcopy(ref), gradient_checkpointing="on")
    off = sloth_core.optimize(copy.deepcopy(ref), gradient_checkpointing="offload")
    layers = ref.config.num_hidden_layers
    loss_on, grads_on = run_step(on, ids, labels)
    assert attention_runs["n"] == 0  # "on": the attention is not routed (it runs, and reruns, as is)
    ck.reset_checkpointing_stats()
    model_loss = off(input_ids=ids, labels=labels).loss
    assert attention_runs["n"] == layers  # the first forward ran it, through the offloaded function
    model_loss.backward()
    stats = ck.checkpointing_stats()
    assert attention_runs["n"] == layers  # ... and the recompute did not
    assert stats.recomputes == layers and stats.attention_reused == layers
    assert stats.attention_tensors >= 2 * layers  # at least the output and its row statistics
    # every copy back but the first one of the backward (the last layer's MLP input) was started ahead
    assert stats.restored - stats.prefetched == 1, stats
    assert stats.attention_composite == 0
    assert_same(model_loss.detach(), loss_on, "loss", device)
    grads = {n: p.grad for n, p in off.named_parameters() if p.requires_grad}
    assert grads.keys() == grads_on.keys()
    for n, g in grads_on.items():
        assert_same(grads[n], g, n, device)
    if torch.device(device).type == "cpu":  # and PEFT's own path agrees
        ref_loss, ref_grads = run_step(ref, ids, labels)
        torch.testing.assert_close(model_loss.detach(), ref_loss)
        for n, g in ref_grads.items():
            torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6)


def test_the_attention_node_keeps_no_input_alive(device, offload_on_cpu):
    """The kept attention node reaches q, k, v through ``_Attach`` nodes, which hold nothing: no ``AccumulateGrad``
    (which holds its tensor) keeps a layer's q, k, v in memory until the backward."""
    model = sloth_core.optimize(sdpa_lora_model("llama", device), gradient_checkpointing="offload")
    ids, labels = token_batch(device)
    seen = []
    forward = ao._OffloadedAttention.forward

    def recording(ctx, *args):
        out = forward(ctx, *args)
        seen.append(ctx)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ao._OffloadedAttention, "forward", staticmethod(recording))
        loss = model(input_ids=ids, labels=labels).loss
    assert len(seen) == model.config.num_hidden_layers
    for ctx in seen:
        edges = [fn for fn, _ in ctx.node.next_functions if fn is not None]
        assert edges and all(type(fn).__name__ == "_AttachBackward" for fn in edges), edges
        assert not any(hasattr(fn, "variable") for fn in edges)
    loss.backward()


def test_a_composite_attention_is_recomputed_in_the_backward(device, offload_on_cpu, attention_runs):
    """The math backend is several ops, not one node: its graph is dropped and the backward recomputes it, with
    the recomputing path's gradients."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ref = sdpa_lora_model("llama", device)
    ids, labels = token_batch(device)
    results = []
    with sdpa_kernel(SDPBackend.MATH):
        for mode in ("on", "offload"):
            model = sloth_core.optimize(copy.deepcopy(ref), gradient_checkpointing=mode)
            ck.reset_checkpointing_stats()
            results.append((*run_step(model, ids, labels), ck.checkpointing_stats()))
    (loss_on, grads_on, _), (loss_off, grads_off, stats) = results
    layers = ref.config.num_hidden_layers
    assert stats.attention_composite == layers and stats.attention_reused == 0
    assert attention_runs["n"] == 3 * layers  # forward, recompute, backward
    assert_same(loss_off, loss_on, "loss", device)
    for n, g in grads_on.items():
        assert_same(grads_off[n], g, n, device)


def test_attention_dropout_and_other_modes_are_not_routed(device, offload_on_cpu, attention_runs):
    ids, labels = token_batch(device)
    dropout = sloth_core.optimize(sdpa_lora_model("llama", device, attention_dropout=0.1).train(),
                                  gradient_checkpointing="offload")
    ck.reset_checkpointing_stats()
    loss, grads = run_step(dropout, ids, labels)
    stats = ck.checkpointing_stats()
    assert attention_runs["n"] == 0 and stats.attention_tensors == 0 and stats.attention_reused == 0
    assert stats.recomputes == dropout.config.num_hidden_layers and torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads.values())
    with torch.no_grad():  # no graph: no checkpoint, no stash
        sloth_core.optimize(sdpa_lora_model("llama", device), gradient_checkpointing="offload")(input_ids=ids)
    assert attention_runs["n"] == 0


def test_disable_checkpointing_unwraps_the_attention_modules(device):
    model = sloth_core.optimize(sdpa_lora_model("llama", device), gradient_checkpointing="offload")
    attn = model.base_model.model.model.layers[0].self_attn
    assert any(r.pattern == ck.PATTERN for r in sloth_core.binding.records(attn))
    ck.disable_checkpointing(model)
    assert not any(r.pattern == ck.PATTERN for r in sloth_core.binding.records(attn))


@pytest.mark.parametrize("make", [
    lambda: torch.randn(2, 5, 3, 4),
    lambda: torch.randn(2, 5, 3, 4).transpose(1, 2),  # an attention output [B, H, T, D] stored as [B, T, H, D]
    lambda: torch.randn(6, 4).t(),
    lambda: torch.randn(3).expand(1, 3)[0],
], ids=["contiguous", "bthd", "transposed", "1d"])
def test_host_copies_come_back_with_their_values_and_strides(make):
    x = make()
    copy_ = host.HostCopy(x, pinned=False)
    y = copy_.restore(keep=True)
    assert torch.equal(y, x) and y.stride() == x.stride() and y.data_ptr() != x.data_ptr()
    assert copy_.restore() is y  # kept: the next restore returns the same tensor, no second copy
    assert not torch.equal(copy_.restore(), torch.full_like(x, float("nan")))  # a fresh copy after that


def test_tensors_that_are_not_dense_stay_on_the_device(monkeypatch):
    monkeypatch.setattr(host, "OFFLOAD_CPU_INPUTS", True)
    x = torch.randn(4, 6)
    assert host.offload_target(x[:, ::2]) is None and host.offload_target(x[1:3]) == "host"
    stash = LayerStash("host", host.Group(x.device))
    assert stash.host_copy(x[:, ::2]) is None


def test_a_padding_mask_stays_where_it_is(device, offload_on_cpu, attention_runs):
    """With a padding mask the attention gets a mask tensor (shared by the layers): the node keeps a reference to
    it, only its own tensors go to the host stash; gradients as the recomputing path's."""
    ref = sdpa_lora_model("llama", device)
    ids, labels = token_batch(device)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in the first sequence
    results = []
    for mode in ("on", "offload"):
        model = sloth_core.optimize(copy.deepcopy(ref), gradient_checkpointing=mode)
        ck.reset_checkpointing_stats()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad},
                        ck.checkpointing_stats()))
    (loss_on, grads_on, _), (loss_off, grads_off, stats) = results
    layers = ref.config.num_hidden_layers
    assert attention_runs["n"] == layers and stats.attention_reused == layers
    assert_same(loss_off, loss_on, "loss", device)
    for n, g in grads_on.items():
        assert_same(grads_off[n], g, n, device)


@pytest.mark.parametrize("early_stop", [True, False], ids=["early_stop", "full_recompute"])
def test_the_recompute_ends_at_the_attention(device, offload_on_cpu, monkeypatch, early_stop):
    """After a kept attention output, the output projection and the norm before the MLP keep their inputs in the
    host stash (the projection shares the attention output's copy; the MLP input is the norm recomputed from its
    copy): nothing after the attention saves through the checkpoint, so the recompute stops there. Without the
    checkpoint's early stop the recompute runs on and saves nothing there either; gradients as the "on" path's."""
    from sloth_core.kernels import lora_linear, rms_norm

    ref = sdpa_lora_model("llama", device)
    ids, labels = token_batch(device)
    layers = ref.config.num_hidden_layers
    calls = {"lora": 0, "norm": 0}
    for module, cls, key in ((lora_linear, "_LoRALinearFunction", "lora"), (rms_norm, "_RMSNormFunction", "norm")):
        original = getattr(module, cls).apply

        def counting(*args, _original=original, _key=key):
            calls[_key] += 1
            return _original(*args)

        monkeypatch.setattr(getattr(module, cls), "apply", counting)
    results = []
    for mode in ("on", "offload"):
        model = sloth_core.optimize(copy.deepcopy(ref), gradient_checkpointing=mode)
        ck.reset_checkpointing_stats()
        model.zero_grad(set_to_none=True)
        with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):  # read by the forward's checkpoint
            loss = model(input_ids=ids, labels=labels).loss
        calls.update(lora=0, norm=0)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad},
                        dict(calls), ck.checkpointing_stats()))
    (loss_on, grads_on, _, _), (loss_off, grads_off, recomputed, stats) = results
    assert stats.recomputes == layers and stats.attention_reused == layers
    assert stats.mlp_inputs == layers  # the MLP inputs: the norm recomputed from its kept input
    if early_stop:  # recompute: the input norm only (q, k, v: lora_qkv); the MLP's input norm in its backward
        assert recomputed == {"lora": 0, "norm": layers}, recomputed
    else:  # ... the output projection and the second norm too, saving nothing
        assert recomputed == {"lora": layers, "norm": 2 * layers}, recomputed
    assert_same(loss_off, loss_on, "loss", device)
    for n, g in grads_on.items():
        assert_same(grads_off[n], g, n, device)


@pytest.mark.parametrize("forward_flag", [True, False], ids=["on_then_off", "off_then_on"])
def test_switching_the_mode_between_forward_and_backward_keeps_each_layer_on_its_path(
        device, offload_on_cpu, forward_flag):
    """Each layer call reads its mode once: its recompute takes the first forward's path even when the model's
    mode changed in between (otherwise the two passes would save different tensors)."""
    ref = sdpa_lora_model("llama", device)
    ids, labels = token_batch(device)
    loss_on, grads_on = run_step(sloth_core.optimize(copy.deepcopy(ref), gradient_checkpointing="on"), ids, labels)
    keeping, not_keeping = "offload", "offload-qkv"
    model = sloth_core.optimize(copy.deepcopy(ref), gradient_checkpointing=keeping if forward_flag else not_keeping)
    ck.reset_checkpointing_stats()
    loss = model(input_ids=ids, labels=labels).loss
    ck.enable_checkpointing(model, not_keeping if forward_flag else keeping)
    loss.backward()
    assert ck.checkpointing_stats().attention_reused == (ref.config.num_hidden_layers if forward_flag else 0)
    assert_same(loss.detach(), loss_on, "loss", device)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert_same(p.grad, grads_on[n], n, device)


def test_torch_keeps_its_own_function_between_calls(device, offload_on_cpu):
    """The routing is open only while an offloading layer's attention module runs: before, between and after the
    steps ``F.scaled_dot_product_attention`` is torch's own function, and the attention is still reused."""
    assert F.scaled_dot_product_attention is ao._SDPA
    model = sloth_core.optimize(sdpa_lora_model("llama", device), gradient_checkpointing="offload")
    ids, labels = token_batch(device)
    ck.reset_checkpointing_stats()
    loss = model(input_ids=ids, labels=labels).loss
    assert F.scaled_dot_product_attention is ao._SDPA
    loss.backward()
    assert F.scaled_dot_product_attention is ao._SDPA
    assert ck.checkpointing_stats().attention_reused == model.config.num_hidden_layers


def test_a_function_another_library_put_there_is_left_to_it(device, offload_on_cpu, monkeypatch):
    """Another library replaced ``F.scaled_dot_product_attention``: its function runs (the attention is
    recomputed as usual) and stays there."""
    calls = []

    def theirs(*args, **kwargs):
        calls.append(1)
        return ao._SDPA(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", theirs)
    model = sloth_core.optimize(sdpa_lora_model("llama", device), gradient_checkpointing="offload")
    ids, labels = token_batch(device)
    ck.reset_checkpointing_stats()
    model(input_ids=ids, labels=labels).loss.backward()
    assert calls and torch.nn.functional.scaled_dot_product_attention is theirs
    assert ck.checkpointing_stats().attention_reused == 0


def test_a_mode_not_keeping_the_attention_leaves_torch_alone(device, offload_on_cpu, monkeypatch):
    """``"offload-qkv"`` (the attention recomputed): an offloading step does not route --
    ``F.scaled_dot_product_attention`` stays torch's own function, even while the layers run."""
    seen = []
    monkeypatch.setattr(ao._WINDOW, "enter", lambda: seen.append(1) or False)
    model = sloth_core.optimize(sdpa_lora_model("llama", device), gradient_checkpointing="offload-qkv")
    ids, labels = token_batch(device)
    model(input_ids=ids, labels=labels).loss.backward()
    assert torch.nn.functional.scaled_dot_product_attention is ao._SDPA and not seen


def test_no_step_leaves_a_stash_or_host_copy_behind_on_a_4bit_model(tmp_path, device, monkeypatch):
    """Every layer run's stash (its host copies, kept attention outputs and q/k/v outputs) goes with its step. The
    saved-tensor hooks of a kept attention node once held their layer's stash: where such a node outlived its step
    (a QLoRA model on the CPU: every step left its layers' q/k/v host copies behind, and the pool allocated anew),
    each step's stash stayed, with the device tensors it kept. The node outlived its step because its hooks
    returned its own output as it was (held through its ``grad_fn``: a cycle no gc sees); they return it
    detached."""
    import gc
    import warnings

    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    from tests.quantized import load_4bit, save_tiny_llama

    monkeypatch.setattr(host, "OFFLOAD_CPU_INPUTS", True)  # (not offload_on_cpu: its MIN_BYTES=1 hides the leak)
    base = load_4bit(save_tiny_llama(tmp_path), device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        sloth_core.optimize(model, gradient_checkpointing="offload")
    ids, labels = token_batch(device)
    for _ in range(3):
        model(input_ids=ids, labels=labels).loss.backward()
        gc.collect()
        alive = [type(o).__name__ for o in gc.get_objects() if isinstance(o, (host.HostCopy, LayerStash, ao._NodeHooks))]
        assert alive == [], f"{len(alive)} left after a step: {sorted(set(alive))}"
