"""The rewriter on undeclared models: only what verifies is swapped; everything else is reported, never silent."""
import copy
import types
import warnings

import pytest
import torch
from torch import nn

import sloth_core
from sloth_core import binding
from sloth_core.tiny import tiny_model
from sloth_core.tolerances import assert_close


# --- a toy model of an undeclared model_type --------------------------------------------------------------------
class ToyRMSNorm(nn.Module):  # Llama semantics
    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n))
        self.variance_epsilon = eps

    def forward(self, x):
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dt)


class ToyGemmaRMSNorm(ToyRMSNorm):  # (1 + w), fp32 throughout
    def forward(self, x):
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (y * (1.0 + self.weight.float())).type_as(x)


class MeanAbsRMSNorm(ToyRMSNorm):  # named like an RMSNorm, but it is not one
    def forward(self, x):
        return self.weight * x / (x.abs().mean(-1, keepdim=True) + self.variance_epsilon)


class ToyMLP(nn.Module):
    def __init__(self, h, i, act):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(h, i), nn.Linear(h, i), nn.Linear(i, h)
        self.act_fn = act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class SwappedMLP(ToyMLP):  # declares SiLU, computes act(up) * gate
    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # interleaved pairs (GPT-J style): not HF's layout
    def rot(x):
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)

    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


class InterleavedAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.head_dim = 8
        self.proj = nn.Linear(8, 8)

    def forward(self, q, k, cos, sin):
        return apply_rotary_pos_emb(q, k, cos, sin)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.config = types.SimpleNamespace(model_type="toy-undeclared")
        self.norm = ToyRMSNorm(24)
        self.gnorm = ToyGemmaRMSNorm(24)
        self.fake_norm = MeanAbsRMSNorm(24)
        self.mlp = ToyMLP(24, 40, nn.SiLU())
        self.relu_mlp = ToyMLP(24, 40, nn.ReLU())
        self.swapped_mlp = SwappedMLP(24, 40, nn.SiLU())
        self.attn = InterleavedAttention()

    def forward(self, x):
        x = self.gnorm(self.norm(x)) + self.fake_norm(x)
        return self.mlp(x) + self.relu_mlp(x) + self.swapped_mlp(x)


def _rows(model):
    return {(r.module, r.pattern): r for r in sloth_core.report(model)}


def test_undeclared_model_swaps_only_what_verifies(device):
    ref = Toy().to(device)
    model = sloth_core.optimize(copy.deepcopy(ref))
    rows = _rows(model)
    assert rows[("norm", "rms_norm")].status == "replaced" and "cast=llama" in rows[("norm", "rms_norm")].detail
    assert rows[("gnorm", "rms_norm")].status == "replaced" and "cast=gemma" in rows[("gnorm", "rms_norm")].detail
    assert rows[("fake_norm", "rms_norm")].status == "skipped"
    assert "not verified" in rows[("fake_norm", "rms_norm")].detail
    assert rows[("mlp", "gated_mlp")].status == "replaced"
    assert rows[("relu_mlp", "gated_mlp")].status == "skipped"
    assert "ReLU" in rows[("relu_mlp", "gated_mlp")].detail
    assert rows[("swapped_mlp", "gated_mlp")].status == "skipped"
    assert rows[("attn", "rope")].status == "skipped"
    assert "fake_norm" not in _bound(model) and "swapped_mlp" not in _bound(model) and "attn" not in _bound(model)
    x = torch.randn(3, 5, 24, device=device, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    assert_close("output", model(x2), ref(x), torch.float32)


def _bound(model):
    return {n for n, m in model.named_modules() if "_sloth_core_bindings" in m.__dict__}


def test_undeclared_hf_model_type_is_verified_and_swapped(device):
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").to(device)
    model = sloth_core.optimize(copy.deepcopy(ref))
    state = {r.pattern: r.status for r in sloth_core.report(model)}
    assert state == {"rms_norm": "replaced", "gated_mlp": "replaced", "rope": "replaced", "causal_lm_loss": "replaced"}
    ids = torch.randint(0, 64, (2, 5), device=device)
    with torch.no_grad():
        assert_close("logits", model(ids).logits, ref(ids).logits, torch.float32, scale=4)


def test_nothing_matched_warns():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.warns(sloth_core.SlothCoreWarning, match="nothing was replaced"):
        sloth_core.optimize(model)
    assert sloth_core.report(model) == []


def test_bindings_are_per_instance_and_global_free(device, monkeypatch):
    from sloth_core.registry.patterns import rope as rope_pattern

    from transformers.models.llama import modeling_llama

    fn_before = modeling_llama.apply_rotary_pos_emb
    forward_before = modeling_llama.LlamaAttention.forward
    other = tiny_model("llama", device=device)
    model = sloth_core.optimize(tiny_model("llama", device=device))
    assert modeling_llama.apply_rotary_pos_emb is fn_before
    assert modeling_llama.LlamaAttention.forward is forward_before
    assert not _bound(other)
    assert "forward" not in other.model.layers[0].self_attn.__dict__
    attn = model.model.layers[0].self_attn
    if "_kernel_funcs" in attn.__dict__:  # transformers 5.2x: the hub-kernel slot takes the kernel, not the forward
        assert "forward" not in attn.__dict__
        assert binding.hub_slot(attn, "apply_rotary_pos_emb") is not None
    # the RoPE kernel runs in this model's attention (through its hub-kernel slot on transformers 5.2x, through a
    # re-created forward before), never in the other model's
    calls = []
    monkeypatch.setattr(rope_pattern, "apply_rope", lambda *a: calls.append(1) or rope_pattern.rope_reference(*a))
    ids = torch.randint(0, 128, (1, 5), device=device)
    with torch.no_grad():
        other(input_ids=ids)
        assert not calls
        model(input_ids=ids)
    assert len(calls) == model.config.num_hidden_layers


def test_deepcopy_of_bound_module_uses_its_own_weights(device):
    model = sloth_core.optimize(tiny_model("llama", device=device))
    norm = model.model.norm
    twin = copy.deepcopy(norm)
    with torch.no_grad():
        twin.weight.mul_(2.0)
    x = torch.randn(2, 64, device=device)
    with torch.no_grad():
        assert_close("copy", twin(x), 2.0 * norm(x), torch.float32)


def test_options_are_checked():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="unknown option"):
        sloth_core.optimize(model, fast=True)
    with pytest.raises(ValueError, match="verify"):
        sloth_core.optimize(model, verify="sometimes")
    with pytest.raises(ValueError, match=r"unknown opt-in pattern\(s\) \['rms_norm'\]; known: \[\]"):
        sloth_core.optimize(model, opt_in="rms_norm")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        sloth_core.optimize("llama")


def test_pattern_selection_and_verify_always(device):
    model = sloth_core.optimize(tiny_model("mistral", device=device), patterns=["rms_norm"], verify="always")
    assert {r.pattern for r in sloth_core.report(model)} == {"rms_norm"}
    model = sloth_core.optimize(tiny_model("mistral", device=device), exclude="rope")
    assert "rope" not in {r.pattern for r in sloth_core.report(model)}


def test_declared_activation_mismatch_is_skipped_not_swapped(device):
    model = tiny_model("llama", hidden_act="relu", device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sloth_core.optimize(model)
    rows = [r for r in sloth_core.report(model) if r.pattern == "gated_mlp"]
    assert rows and all(r.status == "skipped" for r in rows)


def test_a_wrong_kernel_is_caught_by_verification(monkeypatch, device):
    from sloth_core.kernels import gated_activation as ga

    kernel_forward = ga._forward
    monkeypatch.setattr(ga, "_forward", lambda gate, up, act: kernel_forward(gate, up, act) * 1.01)
    model = tiny_model("llama", device=device)
    sloth_core.optimize(model)
    rows = [r for r in sloth_core.report(model) if r.pattern == "gated_mlp"]
    assert rows and all(r.status == "skipped" and "kernel disagrees" in r.detail for r in rows)
    assert {r.status for r in sloth_core.report(model) if r.pattern != "gated_mlp"} == {"replaced"}


def test_restore_undoes_bindings_on_peft_copies(device):
    from peft import LoraConfig, get_peft_model

    ref = tiny_model("gemma", device=device)
    model = sloth_core.optimize(copy.deepcopy(ref))
    cfg = LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["norm"])
    model = get_peft_model(model, cfg)  # deep-copies model.model.norm (bound) into a ModulesToSaveWrapper
    sloth_core.restore(model)
    assert not _bound(model)


def test_restore_after_deepcopy_of_optimized_model(device):
    model = copy.deepcopy(sloth_core.optimize(tiny_model("llama", device=device)))
    sloth_core.restore(model)
    assert not _bound(model)
    ids = torch.randint(0, 128, (1, 4), device=device)
    with torch.no_grad():
        model(ids)  # forwards are the class's again (not a stale sentinel)


def test_a_replacement_overridden_after_optimize_is_reported_so(device):
    """Something that sets the forward of an optimized module afterwards (TRL's fused LM head does) wins; the
    report says "overridden", naming it, not "replaced"."""
    model = sloth_core.optimize(tiny_model("llama", device=device))
    norm = model.model.norm

    def someone_elses(self, x):
        return x

    norm.forward = types.MethodType(someone_elses, norm)
    rows = {r.module: r for r in sloth_core.report(model) if r.pattern == "rms_norm"}
    assert rows["model.norm"].status == "overridden"
    assert "someone_elses (" in rows["model.norm"].detail and "tests/test_rewriter.py)" in rows["model.norm"].detail
    assert rows["model.layers.0.input_layernorm"].status == "replaced"


def test_a_long_skip_reason_is_given_in_full_under_the_table():
    from sloth_core.reporting import ReportRow, format_table

    reason = "not verified: kernel disagrees: " + "x" * 150 + " END"
    table = format_table([ReportRow("model.layers.0.mlp", "gated_mlp", "triton:gated_activation", "skipped", reason),
                          ReportRow("model.norm", "rms_norm", "triton:rms_norm", "replaced", "cast=llama")])
    lines = table.splitlines()
    assert any(line.rstrip(" |").endswith("... [1]") for line in lines[:4]), table
    assert lines[-1] == f"[1] {reason}" and "cast=llama" in table


def test_labels_of_the_wrong_shape_are_named_with_their_shapes(device):
    model = sloth_core.optimize(tiny_model("llama", device=device))
    ids = torch.randint(2, 100, (2, 16), device=device)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM: labels of shape \(2, 10\) do not match the inputs' "
                                         r"\(batch, sequence\) shape \(2, 16\)"):
        model(input_ids=ids, labels=ids[:, :10])
