"""LoRA / QLoRA training with the fast path: 20 optimizer steps follow PEFT's loss curve, and unsupported LoRA
settings fall back to PEFT's forward and are reported."""
import copy

import pytest
import torch

import sloth_core
from sloth_core import binding
from sloth_core.api import unwrap
from sloth_core.tiny import TINY_MODEL_TYPES, tiny_model
from tests.batches import token_batch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora(model, **kw):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(**{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": TARGETS,
                                               "task_type": "CAUSAL_LM", **kw}))


def _curve(model, device, steps=20, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    ids, labels = token_batch(device)  # one batch, memorized: the loss must fall
    for step in range(steps):
        torch.manual_seed(step)  # the same dropout masks for both models
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


def _assert_same_curve(ref, model, device, rtol):
    a, b = _curve(ref, device), _curve(model, device)
    assert a[-1] < a[0] - 0.1, "the curve must move for the comparison to mean something"
    rel = ((a - b).abs() / a.abs()).max().item()
    assert rel <= rtol, f"loss curves differ: max relative difference {rel:.2e} (bound {rtol:.0e})\n{a}\n{b}"


def test_lora_fast_path_follows_peft_for_20_steps(device):
    ref = _lora(tiny_model("llama", device=device))
    model = sloth_core.optimize(copy.deepcopy(ref), gradient_checkpointing="offload")
    replaced = {r.pattern for r in sloth_core.report(model) if r.status == "replaced"}
    assert {"lora_linear", "lora_mlp", "checkpointing"} <= replaced
    _assert_same_curve(ref, model, device, rtol=1e-4)


def test_qlora_fast_path_follows_peft_for_20_steps(tmp_path, device):
    pytest.importorskip("bitsandbytes")
    from tests.quantized import load_4bit, save_tiny_llama

    save_tiny_llama(tmp_path)

    def load():
        return _lora(load_4bit(tmp_path, device))

    ref, model = load(), sloth_core.optimize(load(), gradient_checkpointing="on")
    assert {"lora_linear", "lora_mlp"} <= {r.pattern for r in sloth_core.report(model) if r.status == "replaced"}
    _assert_same_curve(ref, model, device, rtol=3e-2)


@pytest.mark.parametrize("setting, reason", [({"use_dora": True}, "DoRA"),
                                             ({"lora_bias": True}, "lora_bias")])
def test_unsupported_lora_settings_keep_peft_path_and_are_reported(setting, reason, device):
    ref = _lora(tiny_model("llama", device=device), **setting)
    model = sloth_core.optimize(copy.deepcopy(ref))
    rows = [r for r in sloth_core.report(model) if r.pattern in ("lora_linear", "lora_mlp")]
    assert rows and all(r.status == "skipped" and reason in r.detail for r in rows)
    assert "gated_mlp" in {r.pattern for r in sloth_core.report(model) if r.status == "replaced"}
    _assert_same_curve(ref, model, device, rtol=1e-4)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_checkpointed_recompute_skips_the_mlp_output_only_where_nothing_reads_it(model_type, device, monkeypatch):
    """In the recompute of a checkpointed layer the fused LoRA MLP skips its down projection exactly in the layers
    declared to feed the MLP output straight into the residual add (not Gemma2/3, whose post-feed-forward norm
    saves it), and its backward recomputes g, u in column chunks (several here); the loss and every LoRA
    gradient still equal PEFT's."""
    from sloth_core import recompute
    from sloth_core.kernels import lora_mlp_chunked
    from sloth_core.tolerances import assert_close

    monkeypatch.setattr(lora_mlp_chunked, "CHUNK_MULTIPLE", 8)

    ref = _lora(tiny_model(model_type, device=device))
    model = sloth_core.optimize(copy.deepcopy(ref), gradient_checkpointing="on")
    assert "lora_mlp" in {r.pattern for r in sloth_core.report(model) if r.status == "replaced"}
    ids, labels = token_batch(device)
    before = recompute.STATS.mlp_outputs_skipped
    losses = []
    for m in (ref, model):
        loss = m(input_ids=ids, labels=labels).loss
        loss.backward()
        losses.append(loss)
    skipped = recompute.STATS.mlp_outputs_skipped - before
    layers = ref.config.num_hidden_layers
    assert skipped == (0 if model_type in ("gemma2", "gemma3_text") else layers)
    assert_close("loss", losses[1].detach(), losses[0].detach(), torch.float32)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for n, p in ref.named_parameters():
        if p.requires_grad:
            assert grads[n] is not None and torch.isfinite(grads[n]).all(), n
            assert_close(n, grads[n], p.grad, torch.float32)



@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_offloading_layers_run_the_mlp_backward_before_the_recompute(model_type, device, monkeypatch):
    """With "offload", the fused LoRA MLP of a layer whose MLP output nothing reads keeps its input in host memory
    (one per layer) instead of saving it through the checkpoint, so its backward runs before the layer's
    recompute (the recomputed attention tensors are not alive during it); gradients still equal PEFT's. With
    "on" the MLP's saved input triggers the recompute first."""
    from sloth_core import checkpointing as ck
    from sloth_core.memory import host
    from sloth_core.kernels import lora_mlp, lora_mlp_chunked
    from sloth_core.tolerances import assert_close

    monkeypatch.setattr(host, "OFFLOAD_CPU_INPUTS", True)  # CPU tensors take the offload path too
    monkeypatch.setattr(lora_mlp_chunked, "CHUNK_MULTIPLE", 8)
    seen = []
    chunked = lora_mlp._chunked_recompute_backward

    def recording(*args, **kwargs):
        seen.append(ck.STATS.recomputes)
        return chunked(*args, **kwargs)

    monkeypatch.setattr(lora_mlp, "_chunked_recompute_backward", recording)
    ref = _lora(tiny_model(model_type, device=device))
    ids, labels = token_batch(device)
    ref_loss = ref(input_ids=ids, labels=labels).loss
    ref_loss.backward()
    layers = ref.config.num_hidden_layers
    for mode, first_recompute in (("offload", 0), ("on", 1)):
        model = sloth_core.optimize(copy.deepcopy(ref), gradient_checkpointing=mode)
        model.zero_grad(set_to_none=True)
        ck.reset_checkpointing_stats()
        seen.clear()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        stats = ck.checkpointing_stats()
        assert stats.mlp_inputs == (layers if mode == "offload" else 0)
        assert stats.recomputes == layers
        # layer i's MLP backward sees the recomputes of the layers after it (+ its own with "on")
        assert seen == list(range(first_recompute, first_recompute + layers)), (mode, seen)
        assert_close("loss", loss.detach(), ref_loss.detach(), torch.float32)
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        for n, p in ref.named_parameters():
            if p.requires_grad:
                assert grads[n] is not None, n
                assert_close(n, grads[n], p.grad, torch.float32)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_attention_computes_q_k_v_in_one_function(model_type, device, monkeypatch):
    """``lora_qkv`` (a default pattern; ``exclude`` leaves it out): every attention call computes its three LoRA
    projections with one fused function (the o projection alone with lora_linear) and keeps the other patterns'
    kernels (rope); the loss and every LoRA gradient equal PEFT's."""
    assert "lora_qkv" not in {r.pattern for r in sloth_core.report(
        sloth_core.optimize(_lora(tiny_model(model_type, device=device)), exclude="lora_qkv"))}
    from sloth_core.kernels import lora_linear, lora_qkv
    from sloth_core.tolerances import assert_close

    from sloth_core.kernels import rope

    calls = {"qkv": 0, "linear": 0, "rope": 0}
    for module, name, key in ((lora_qkv, "_LoRAQKVFunction", "qkv"), (lora_linear, "_LoRALinearFunction", "linear"),
                              (rope, "_RopeFunction", "rope")):
        cls = getattr(module, name)
        original = cls.apply

        def counting(*args, _original=original, _key=key):
            calls[_key] += 1
            return _original(*args)

        monkeypatch.setattr(cls, "apply", counting)
    ref = _lora(tiny_model(model_type, device=device))
    model = sloth_core.optimize(copy.deepcopy(ref))
    rows = [r for r in sloth_core.report(model) if r.pattern == "lora_qkv"]
    layers = ref.config.num_hidden_layers
    assert len(rows) == layers and all(r.status == "replaced" for r in rows), rows
    ids, labels = token_batch(device)
    calls.update(qkv=0, linear=0, rope=0)  # the verification probes of optimize() called them too
    losses = []
    for m in (ref, model):
        loss = m(input_ids=ids, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
    # ... and the attention still runs the rope kernel (lora_qkv wraps the forward rope rebound, not the class's)
    assert calls == {"qkv": layers, "linear": layers, "rope": layers}, calls
    assert_close("loss", losses[1], losses[0], torch.float32)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for n, p in ref.named_parameters():
        if p.requires_grad:
            assert grads[n] is not None, n
            assert_close(n, grads[n], p.grad, torch.float32)


def test_rope_after_a_wrapping_pattern_is_reported_skipped_not_replaced(device):
    """Without a hub-kernel slot (transformers 5.17), rope re-creates the bound forward with its kernel among the
    globals; after lora_qkv wrapped that forward the re-creation would touch only the wrapper, which does not call
    the rope function: rope says so and skips. With a slot (transformers 5.2x) the forward is not rope's to
    re-create: the slot takes the kernel whatever wraps the forward."""
    model = _lora(tiny_model("llama", device=device))
    sloth_core.optimize(model, patterns=["lora_linear", "lora_qkv"])  # lora_qkv answers through lora_linear
    sloth_core.optimize(model)
    rows = [r for r in sloth_core.report(model) if r.pattern == "rope"]
    modules = dict(unwrap(model).named_modules())
    assert rows
    for r in rows:
        if binding.hub_slot(modules[r.module], "apply_rotary_pos_emb") is not None:
            assert r.status == "replaced", r
        else:
            assert r.status == "skipped" and "does not call apply_rotary_pos_emb" in r.detail, r
    ids, labels = token_batch(device)
    ref = _lora(tiny_model("llama", device=device))
    from sloth_core.tolerances import assert_close

    assert_close("loss", model(input_ids=ids, labels=labels).loss.detach(),
                 ref(input_ids=ids, labels=labels).loss.detach(), torch.float32)


def test_qkv_group_answers_only_for_the_same_unchanged_input(device):
    """Inside an attention call the group hands k and v the outputs computed with q only when they are called with
    the same tensor, unmodified since; otherwise they compute on what they are given."""
    from sloth_core.kernels.lora_linear import lora_linear
    from sloth_core.kernels.lora_peft import lora_spec
    from sloth_core.registry.patterns.lora import _grouping

    model = sloth_core.optimize(_lora(tiny_model("llama", device=device)))
    attn = model.base_model.model.model.layers[0].self_attn
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randn(2, 3, q.in_features, generator=gen).to(device) for _ in range(2))

    def alone(module, t):
        return lora_linear(t, *lora_spec(module))

    with torch.no_grad(), _grouping(attn):
        q(x)
        assert torch.equal(k(y), alone(k, y))  # another tensor
        q(x)
        x.mul_(2.0)  # changed in place after q saw it
        assert torch.equal(v(x), alone(v, x))
        q(x)
        assert torch.equal(k(x), alone(k, x)) and torch.equal(v(x), alone(v, x))
        assert attn.o_proj(x[..., : attn.o_proj.in_features]).shape[-1] == attn.o_proj.out_features
