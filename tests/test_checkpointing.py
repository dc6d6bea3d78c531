"""Gradient checkpointing of decoder layers (sloth_core.checkpointing).

Loss and every gradient match the un-checkpointed model (bitwise on the CPU) in modes "on" and "offload", in train()
(with dropout) and eval() mode, bare, LoRA-wrapped (layer inputs that do not require grad) and after
sloth_core.optimize; a checkpointed layer keeps only its input (on the device, or in host memory); disabling is
bit-identical; nothing is wrapped or checkpointed twice, Hugging Face's checkpointing included.

On the CPU, ``memory.host.OFFLOAD_CPU_INPUTS`` sends CPU layer inputs through the offload path (plain host buffers),
so that path is exercised here; the CUDA test checks pinned memory, the side-stream copies and the prefetch on the
GPU.
"""
import copy
import weakref

import pytest
import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

import sloth_core
from sloth_core import binding
from sloth_core import checkpointing as ck
from sloth_core import checkpointing_wrapper
from sloth_core.memory import host
from sloth_core.tiny import tiny_model
from sloth_core.tolerances import assert_close
from tests.batches import token_batch
from tests.hf_checkpointing import count_hf_checkpoints

MODES = ["on", "offload"]
pytestmark = pytest.mark.filterwarnings("ignore:sloth_core checkpointing.*KV cache")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(host, "OFFLOAD_CPU_INPUTS", True)
    monkeypatch.setattr(checkpointing_wrapper, "_warned", set())
    ck.reset_checkpointing_stats()
    yield
    ck.clear_host_pool()


def _batch(device, **kw):
    return token_batch(device, **{"s": 9, **kw})


def _step(model, ids, labels, seed=5):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same dropout masks for both models
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(name, actual, expected):
    if actual.device.type == "cpu":
        assert torch.equal(actual, expected), f"{name} differs: max |diff| {(actual - expected).abs().max().item()}"
    else:
        assert_close(name, actual, expected, torch.float32, scale=4)


def _assert_parity(ref, model):
    """Same loss and gradients; returns the counters of the checkpointed step."""
    ids, labels = _batch(next(ref.parameters()).device)
    loss0, grads0 = _step(ref, ids, labels)
    ck.reset_checkpointing_stats()
    loss1, grads1 = _step(model, ids, labels)
    _assert_same("loss", loss1, loss0)
    assert grads0 and grads0.keys() == grads1.keys()
    for name in grads0:
        _assert_same(f"grad {name}", grads1[name], grads0[name])
    return ck.checkpointing_stats()


def _assert_checkpointed(stats, n, mode):
    assert stats.checkpointed_calls == n
    if mode == "offload":
        assert stats.offloaded == n and stats.restored == n and stats.prefetched == n - 1
    else:
        assert stats.offloaded == 0


def _decoder_layers(model):
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _lora(model, dropout=0.0):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "v_proj", "up_proj"])
    model = get_peft_model(model, cfg)
    torch.manual_seed(3)
    with torch.no_grad():  # LoRA B starts at zero: give the adapters an effect
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_bare_model_parity(model_type, mode, training, device):
    ref = tiny_model(model_type, device=device, attention_dropout=0.2).train(training)
    model = copy.deepcopy(ref)
    paths = ck.enable_checkpointing(model, mode)
    assert paths == [f"model.layers.{i}" for i in range(2)] == ck.checkpointed_layers(model)
    _assert_checkpointed(_assert_parity(ref, model), 2, mode)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", MODES)
def test_lora_model_parity_with_inputs_not_requiring_grad(mode, training, device):
    ref = _lora(tiny_model("llama", device=device), dropout=0.1).train(training)
    model = copy.deepcopy(ref)
    assert len(ck.enable_checkpointing(model, mode)) == 2
    first = _decoder_layers(model)[0]
    seen = []
    handle = first.register_forward_pre_hook(lambda m, args: seen.append(args[0].requires_grad))
    stats = _assert_parity(ref, model)
    handle.remove()
    assert seen == [False]  # only the adapters' parameters require grad
    _assert_checkpointed(stats, 2, mode)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("mode", MODES)
def test_parity_after_optimize(mode, device):
    ref = sloth_core.optimize(tiny_model("qwen3", device=device, attention_dropout=0.1)).train()
    assert any(r.status == "replaced" and ".layers." in r.module for r in sloth_core.report(ref))
    model = copy.deepcopy(ref)
    before = _own_attributes(model)
    ck.enable_checkpointing(model, mode)
    _assert_checkpointed(_assert_parity(ref, model), 2, mode)
    sloth_core.restore(model)  # undoes the kernels and the checkpointing
    assert not ck.checkpointed_layers(model) and _own_attributes(model) == before


def _own_attributes(model):
    """Each decoder layer's instance attributes (where forward, the bindings and HF's flag live)."""
    return [dict(layer.__dict__) for layer in _decoder_layers(model)]


@pytest.mark.parametrize("mode", ["off", "on", "offload"])
def test_a_checkpointed_layer_keeps_only_its_input(mode, device):
    """Saved-tensor hooks around the forward see every tensor autograd keeps: checkpointed, a layer keeps its input
    and nothing else ("on"), or nothing on the device ("offload": the input went to host memory)."""
    model = tiny_model("llama", device=device).train()
    if mode != "off":
        ck.enable_checkpointing(model, mode)
    layers = _decoder_layers(model)
    current, inputs, saved = [None], {}, {i: [] for i in range(len(layers))}
    for i, layer in enumerate(layers):
        def pre(m, args, i=i):
            current[0] = i
            inputs[i] = args[0]

        layer.register_forward_pre_hook(pre)
        layer.register_forward_hook(lambda m, args, out: current.__setitem__(0, None))

    def pack(x):
        if current[0] is not None and x.numel() > 0:  # (on CUDA, checkpoint also saves an empty placeholder)
            saved[current[0]].append(x)
        return x

    ids, labels = _batch(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = model(input_ids=ids, labels=labels).loss
    input_bytes = inputs[0].numel() * inputs[0].element_size()
    for i in saved:
        if mode == "off":
            assert sum(t.numel() * t.element_size() for t in saved[i]) > 4 * input_bytes
        elif mode == "on":
            assert len(saved[i]) == 1 and saved[i][0] is inputs[i]
        else:
            assert saved[i] == []
    if mode == "offload":
        assert ck.checkpointing_stats().offloaded_bytes == len(layers) * input_bytes
    loss.backward()


def test_offload_frees_the_device_input_and_reuses_host_buffers(device):
    model = _lora(tiny_model("llama", device=device))
    layers = _decoder_layers(model)
    ids, labels = _batch(device)
    for mode in ["on", "offload"]:
        ck.enable_checkpointing(model, mode)
        refs = []
        hooks = [layer.register_forward_pre_hook(lambda m, args: refs.append(weakref.ref(args[0])))
                 for layer in layers]
        loss = model(input_ids=ids, labels=labels).loss
        for h in hooks:
            h.remove()
        alive = [r() is not None for r in refs]
        assert alive == ([True] * len(layers) if mode == "on" else [False] * len(layers)), mode
        loss.backward()
    allocations = ck.checkpointing_stats().host_allocations
    assert allocations == len(layers)
    for _ in range(2):
        _step(model, ids, labels)
    assert ck.checkpointing_stats().host_allocations == allocations  # the pool serves later steps


def test_batches_of_varying_length_reuse_the_host_buffers_of_longer_ones(device):
    """Variable-length training (SFT without packing): after the longest batch, shorter ones allocate no host
    buffer (pinning memory costs more than a step); a longer one allocates once, then is served too."""
    model = _lora(tiny_model("llama", device=device))
    ck.enable_checkpointing(model, "offload")
    _step(model, *_batch(device, s=24))
    allocations = ck.checkpointing_stats().host_allocations
    assert allocations > 0
    for s in (7, 16, 24, 11, 3):
        _step(model, *_batch(device, s=s))
    assert ck.checkpointing_stats().host_allocations == allocations
    _step(model, *_batch(device, s=40))
    longer = ck.checkpointing_stats().host_allocations
    for s in (40, 5, 33):
        _step(model, *_batch(device, s=s))
    assert ck.checkpointing_stats().host_allocations == longer


def test_disable_restores_the_exact_original(device):
    ref = tiny_model("llama", device=device)
    model = copy.deepcopy(ref)
    layers = _decoder_layers(model)
    before = _own_attributes(model)
    ck.enable_checkpointing(model, "offload")
    assert all("forward" in layer.__dict__ and binding.is_bound(layer, ck.PATTERN) for layer in layers)
    _step(model, *_batch(device))
    ck.disable_checkpointing(model)
    assert _own_attributes(model) == before
    assert ck.checkpointed_layers(model) == []
    ck.reset_checkpointing_stats()
    ids, labels = _batch(device)
    out0, out1 = _step(ref, ids, labels), _step(model, ids, labels)
    assert ck.checkpointing_stats().checkpointed_calls == 0
    assert torch.equal(out0[0], out1[0]) and all(torch.equal(out0[1][k], out1[1][k]) for k in out0[1])


def test_other_bindings_stay_and_a_later_replacement_is_refused(device):
    model = sloth_core.optimize(tiny_model("llama", device=device))
    before = _own_attributes(model)
    def bound():  # what each binding set (the forward, or a hub-kernel slot's dict)
        return {(m, r.attr): m.__dict__[r.attr] for m in model.modules() for r in binding.records(m)}

    kernels = bound()
    assert kernels
    ck.enable_checkpointing(model)
    ck.disable_checkpointing(model)
    assert bound() == kernels

    ck.enable_checkpointing(model)
    layer = _decoder_layers(model)[1]
    binding.install_forward(layer, lambda self, *a, **k: None, "someone_else", "k")
    with pytest.raises(RuntimeError, match="replaced again.*someone_else"):
        ck.disable_checkpointing(model)
    assert len(ck.checkpointed_layers(model)) == 2  # nothing was half-undone
    sloth_core.restore(model)
    assert not ck.checkpointed_layers(model) and _own_attributes(model) == before


def test_enabling_twice_does_not_double_wrap(device):
    model = tiny_model("llama", device=device)
    layers = _decoder_layers(model)
    before = _own_attributes(model)
    assert ck.enable_checkpointing(model, "on") == ck.enable_checkpointing(model, "on")
    ck.enable_checkpointing(model, "offload")  # switches the mode in place
    assert all(sum(r.pattern == ck.PATTERN for r in binding.records(layer)) == 3 for layer in layers)
    ck.reset_checkpointing_stats()
    _step(model, *_batch(device))
    _assert_checkpointed(ck.checkpointing_stats(), len(layers), "offload")
    assert ck.enable_checkpointing(model, "off") == []
    assert _own_attributes(model) == before


def test_hf_checkpointing_enabled_before_is_suspended_then_restored(device):
    ref = tiny_model("llama", device=device, attention_dropout=0.2).train()
    model = copy.deepcopy(ref)
    model.gradient_checkpointing_enable()
    layers = _decoder_layers(model)
    hf_calls = count_hf_checkpoints(layers)
    ck.enable_checkpointing(model, "on")
    assert not any(layer.gradient_checkpointing for layer in layers)
    _assert_checkpointed(_assert_parity(ref, model), len(layers), "on")
    assert hf_calls[0] == 0
    ck.disable_checkpointing(model)
    assert all(layer.gradient_checkpointing is True for layer in layers)
    _step(model, *_batch(device))
    assert hf_calls[0] == len(layers)


def test_hf_checkpointing_enabled_after_is_not_doubled(device):
    ref = tiny_model("llama", device=device, attention_dropout=0.2).train()
    model = copy.deepcopy(ref)
    ck.enable_checkpointing(model, "offload")
    model.gradient_checkpointing_enable()
    layers = _decoder_layers(model)
    hf_calls = count_hf_checkpoints(layers)
    assert ck.checkpointing_stats().checkpointed_calls == 0
    stats = _assert_parity(ref, model)  # training: Hugging Face checkpoints, the wrapper steps aside
    assert stats.checkpointed_calls == 0 and hf_calls[0] == len(layers)
    ref.eval(), model.eval()
    stats = _assert_parity(ref, model)  # eval: Hugging Face does not checkpoint, the wrapper does
    assert stats.checkpointed_calls == len(layers) and hf_calls[0] == len(layers)
    ck.disable_checkpointing(model)
    assert all(layer.gradient_checkpointing is True for layer in layers)  # the user's later choice stays


def test_no_checkpoint_when_no_graph_is_built(device):
    model = tiny_model("llama", device=device)
    ck.enable_checkpointing(model, "offload")
    ids, _ = _batch(device)
    with torch.no_grad():
        model(input_ids=ids)
    model.requires_grad_(False)
    out = model(input_ids=ids).logits
    assert not out.requires_grad
    assert ck.checkpointing_stats().checkpointed_calls == 0


class _Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.drop = nn.Dropout(0.3)

    def forward(self, hidden_states, scale=None):
        return hidden_states + self.drop(torch.tanh(self.fc(hidden_states))) * scale


class _Plain(nn.Module):
    """No GradientCheckpointingLayer: the layers are found as the children of the ModuleList ``h``."""

    def __init__(self, width=16, n=3):
        super().__init__()
        self.h = nn.ModuleList(_Block(width) for _ in range(n))

    def forward(self, x):
        scale = torch.full((1,), 0.5, device=x.device)
        for block in self.h:
            x = block(hidden_states=x, scale=scale) if block is self.h[1] else block(x, scale=scale)
        return x


@pytest.mark.parametrize("mode", MODES)
def test_fallback_module_list_layers(mode, device):
    torch.manual_seed(0)
    ref = _Plain().to(device)
    model = copy.deepcopy(ref)
    assert ck.enable_checkpointing(model, mode) == ["h.0", "h.1", "h.2"]
    x0 = torch.randn(4, 5, 16, device=device)
    grads = []
    for m in (ref, model):
        x = x0.clone().requires_grad_()  # a leaf that requires grad as the first layer's input
        torch.manual_seed(7)
        out = m(x)
        out.square().sum().backward()
        grads.append((out.detach(), [x.grad, *(p.grad for p in m.parameters())]))
    _assert_same("out", grads[1][0], grads[0][0])
    for a, b in zip(grads[1][1], grads[0][1]):
        _assert_same("grad", a, b)
    _assert_checkpointed(ck.checkpointing_stats(), 3, mode)


def test_deepcopy_of_a_checkpointed_model_uses_its_own_layers(device):
    model = tiny_model("llama", device=device)
    before = _own_attributes(model)
    ck.enable_checkpointing(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    ids, labels = _batch(device)
    l0, l1 = _step(model, ids, labels)[0], _step(twin, ids, labels)[0]
    assert not torch.equal(l0, l1)
    ck.disable_checkpointing(twin)
    assert [sorted(d) for d in _own_attributes(twin)] == [sorted(d) for d in before]
    assert all("forward" not in layer.__dict__ for layer in _decoder_layers(twin))
    assert len(ck.checkpointed_layers(model)) == 2


def test_bad_arguments():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="mode"):
        ck.enable_checkpointing(model, "full")
    with pytest.raises(TypeError):
        ck.enable_checkpointing("model")
    with pytest.warns(sloth_core.SlothCoreWarning, match="no decoder layers"):
        assert ck.enable_checkpointing(nn.Linear(2, 2)) == []


@pytest.mark.cuda
def test_offload_moves_inputs_to_pinned_memory_on_gpu(device, monkeypatch):
    monkeypatch.setattr(host, "OFFLOAD_CPU_INPUTS", False)
    ref = _lora(tiny_model("llama", device=device, attention_dropout=0.1), dropout=0.1).train()
    model = copy.deepcopy(ref)
    layers = _decoder_layers(model)
    n = len(layers)
    ids, labels = _batch(device, b=4, s=64)
    _step(model, ids, labels)  # warm-up: workspaces allocated once are in both measurements

    def forward_memory(mode):
        ck.enable_checkpointing(model, mode)
        torch.cuda.synchronize()
        loss = model(input_ids=ids, labels=labels).loss
        torch.cuda.synchronize()
        torch.empty(1, device=device)  # lets the allocator process frees deferred by record_stream
        used = torch.cuda.memory_allocated(device)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return used

    on = forward_memory("on")
    ck.reset_checkpointing_stats()
    offload = forward_memory("offload")
    stats = ck.checkpointing_stats()
    input_bytes = ids.numel() * model.config.hidden_size * 4
    assert stats.offloaded == stats.pinned == n and stats.offloaded_bytes == n * input_bytes
    assert stats.restored == n and stats.prefetched == n - 1
    assert on - offload >= n * input_bytes
    buffers = [b for free in host.POOL._free.values() for b in free]
    assert len(buffers) == n and all(b.is_pinned() for b in buffers)

    for mode in MODES:
        ck.enable_checkpointing(model, mode)
        ck.reset_checkpointing_stats()
        ref_loss, ref_grads = _step(ref, ids, labels)
        loss, grads = _step(model, ids, labels)
        assert_close("loss", loss, ref_loss, torch.float32, scale=4)
        assert ref_grads.keys() == grads.keys() and grads
        for k in grads:
            assert_close(f"grad {k}", grads[k], ref_grads[k], torch.float32, scale=8)
        assert ck.checkpointing_stats().offloaded == (n if mode == "offload" else 0)


ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_on(model, targets):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=targets))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def _skipped_projections(ref, device, early_stop=True, **optimize):
    """``(skipped, mlp inputs kept, offloaded)`` of one ``"offload-inputs"`` step of ``ref`` (the attention and the
    q/k/v projections recomputed), whose loss and gradients are asserted equal (bitwise on the CPU) to the "on"
    path's."""
    from sloth_core import recompute

    ids, labels = _batch(device)
    on = sloth_core.optimize(copy.deepcopy(ref), gradient_checkpointing="on", **optimize)
    loss_on, grads_on = _step(on, ids, labels)
    model = sloth_core.optimize(copy.deepcopy(ref), gradient_checkpointing="offload-inputs", **optimize)
    before = recompute.STATS.projection_outputs_skipped
    ck.reset_checkpointing_stats()
    with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):  # read by the forward's checkpoint
        loss, grads = _step(model, ids, labels)
    stats = ck.checkpointing_stats()
    _assert_same("loss", loss, loss_on)
    assert grads.keys() == grads_on.keys()
    for name in grads_on:
        _assert_same(f"grad {name}", grads[name], grads_on[name])
    return recompute.STATS.projection_outputs_skipped - before, stats.mlp_inputs, stats.offloaded


@pytest.mark.parametrize("early_stop", [True, False], ids=["early_stop", "full_recompute"])
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen3", "gemma", "gemma2"])
def test_offloading_layers_skip_the_attention_output_projection_in_the_recompute(model_type, early_stop, device):
    """With the attention recomputed (``"offload-inputs"``), in layers declared to feed the attention output into the
    residual add before the MLP's norm (every declared layout but Gemma2/3, whose MLP output is saved anyway) and
    running the fused LoRA MLP: the norm keeps its input in host memory instead of the MLP input (one copy a layer, as
    before), the MLP input is that norm recomputed, and the recompute leaves the attention's output projection
    uncomputed -- it ends once that projection saved its input. Without the checkpoint's early stop the recompute runs
    on past the skipped projection and saves nothing. Loss and gradients are bitwise the "on" path's."""
    ref = _lora_on(tiny_model(model_type, device=device), ALL_TARGETS)
    skipped, mlp_inputs, offloaded = _skipped_projections(ref, device, early_stop)
    layers = ref.config.num_hidden_layers
    declared = model_type != "gemma2"
    assert skipped == (layers if declared else 0)
    # the MLP input derived from the norm's copy: one more host copy a layer (gemma2: the MLP saves its input
    # through the checkpoint, only the layer input goes)
    assert mlp_inputs == (layers if declared else 0)
    assert offloaded == (2 if declared else 1) * layers


@pytest.mark.parametrize("case", ["o_proj_not_adapted", "norm_not_fused", "mlp_not_fused"])
def test_the_output_projection_is_computed_where_its_output_may_be_read(case, device):
    """The recompute skips a projection only when it is the attention module's own output (not the last LoRA
    linear of a module whose o_proj has no adapter: v_proj here, whose output the attention reads) and the MLP's
    input is the norm that kept its input (not an unfused norm or MLP, which save their inputs through the
    checkpoint). Gradients stay bitwise the "on" path's."""
    targets = {"o_proj_not_adapted": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
               "norm_not_fused": ALL_TARGETS, "mlp_not_fused": ["q_proj", "k_proj", "v_proj", "o_proj"]}[case]
    exclude = {"o_proj_not_adapted": ("lora_qkv",), "norm_not_fused": ("rms_norm",), "mlp_not_fused": ()}[case]
    ref = _lora_on(tiny_model("llama", device=device), targets)
    skipped, _, offloaded = _skipped_projections(ref, device, exclude=exclude)
    layers = ref.config.num_hidden_layers
    assert skipped == 0
    # the norm keeps its input only before a fused LoRA MLP; an unfused norm has no host copy to give
    assert offloaded == {"o_proj_not_adapted": 2 * layers, "norm_not_fused": 2 * layers,
                         "mlp_not_fused": layers}[case]


@pytest.mark.cuda
def test_host_copies_follow_the_current_stream(device):
    """Host copies started inside a user's stream wait for that stream's queued work, leave it current, and come
    back intact -- one at a time, several at once (``HostCopy.many``), and permuted (dense in another order)."""
    user = torch.cuda.Stream()
    with torch.cuda.stream(user):
        torch.cuda._sleep(50_000_000)  # the values below are written long after the copies are queued
        xs = [torch.arange(4096 * k, device=device, dtype=torch.float32).reshape(64, -1) for k in (1, 2, 3)]
        xs.append(torch.arange(2 * 3 * 4 * 5, device=device, dtype=torch.bfloat16).reshape(2, 4, 3, 5)
                  .transpose(1, 2))
        one = host.HostCopy(xs[0], pinned=True, kind="qkv")
        many = host.HostCopy.many(xs[1:], pinned=True, kind="qkv")
        assert torch.cuda.current_stream() == user
        back = [c.restore() for c in (one, *many)]
        assert torch.cuda.current_stream() == user
    torch.cuda.synchronize()
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    for x, y in zip(xs, back):
        assert y.shape == x.shape and y.stride() == x.stride() and torch.equal(y, x)
