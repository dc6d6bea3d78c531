"""Hub-kernel interop (:mod:`sloth_core.hub`): sloth_core's kernels as the local repository of the names
transformers gives its hub-kernel layers, through the ``kernels`` library's own ``kernelize``.

* the mapping names what transformers declares, and ``kernels`` loads our layer classes from the local repository;
* a tiny Llama / Qwen3 kernelized with it computes what the plain model does (logits, loss, gradients; float32 and
  bfloat16), and the kernels really run;
* a class under a mapped name whose code is not the verified one runs its own forward, with a warning;
* ``optimize`` on a kernelized model verifies the hub kernels it finds: ours serve, a different one is refused with
  its name, and the output stays the hub kernel's.

Skipped where the ``kernels`` package is absent (transformers 5.17's pins do not carry it).
"""
import json
import warnings

import pytest
import torch

kernels = pytest.importorskip("kernels", reason="the `kernels` package is not installed (transformers < 5.2x pins)")

import sloth_core  # noqa: E402
from sloth_core import hub  # noqa: E402
from sloth_core.hub_layers import layers  # noqa: E402
from sloth_core.tiny import tiny_model  # noqa: E402
from sloth_core.tolerances import assert_close  # noqa: E402
from sloth_core.warning import SlothCoreWarning  # noqa: E402
from tests.batches import token_batch  # noqa: E402

Mode = kernels.Mode


def _norms(model):
    return [m for n, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")]


def _slots(model):
    return [f for m in model.modules() for f in m.__dict__.get("_kernel_funcs", {}).values()]


def _bound(module):
    fwd = module.__dict__.get("forward")
    return getattr(fwd, "__func__", None)


@pytest.fixture
def counted(monkeypatch):
    """Calls of the two kernels the hub layers reach."""
    calls = {"rms_norm": 0, "apply_rope": 0}
    for name in calls:
        real = getattr(layers, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(layers, name, spy)
    return calls


def test_mapping_names_what_transformers_declares():
    from transformers.models.llama import modeling_llama

    assert modeling_llama.LlamaRMSNorm.kernel_layer_name == "RMSNorm"
    assert modeling_llama.apply_rotary_pos_emb.kernel_layer_name == "rotary_pos_emb"
    mapping = hub.kernel_mapping("cpu")
    assert set(mapping) == set(hub.LAYERS) == {"RMSNorm", "rotary_pos_emb"}
    for name, by_device in mapping.items():
        assert set(by_device) == {"cpu"} and set(by_device["cpu"]) == {Mode.TRAINING, Mode.INFERENCE}
        for repo in by_device["cpu"].values():
            assert isinstance(repo, kernels.LocalLayerRepository) and repo.layer_name == hub.LAYERS[name]
            assert repo.load() is getattr(layers, hub.LAYERS[name])  # the package's own classes, not a copy
    assert json.loads((hub.REPO_PATH / "metadata.json").read_text())["id"] == "sloth_core_hub_layers"


@pytest.mark.parametrize("model_type,dtype", [("llama", torch.float32), ("qwen3", torch.float32),
                                              ("llama", torch.bfloat16)])
def test_kernelized_model_computes_what_the_plain_one_does(model_type, dtype, counted, device):
    plain, model = tiny_model(model_type, dtype, device=device), tiny_model(model_type, dtype, device=device)
    hub.kernelize(model, mode=Mode.TRAINING, device=device.type)
    assert all(_bound(m) is layers.RMSNorm.forward for m in _norms(model))
    assert all(_bound(s) is layers.RotaryPosEmb.forward for s in _slots(model))
    ids, labels = token_batch(device)
    outs = [m(input_ids=ids, labels=labels) for m in (plain, model)]
    for out in outs:
        out.loss.backward()
    assert counted["rms_norm"] == len(_norms(model)) and counted["apply_rope"] == len(_slots(model))
    scale = 4 if dtype == torch.float32 else 2
    assert_close("logits", outs[1].logits, outs[0].logits, dtype, scale=scale)
    assert_close("loss", outs[1].loss, outs[0].loss, dtype, scale=scale)
    grads = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        assert_close(f"grad {name}", p.grad, grads[name].grad, dtype, scale=4 * scale)


@pytest.mark.parametrize("mode,ours", [(Mode.INFERENCE, True), (Mode.TRAINING | Mode.TORCH_COMPILE, False),
                                       (Mode.INFERENCE | Mode.TORCH_COMPILE, False)])
def test_modes(mode, ours, device):
    """Inference gets the layers too; a ``torch.compile`` mode keeps the modules' own forwards (the layers do not
    claim ``can_torch_compile``)."""
    model = tiny_model("llama", device=device).eval()
    hub.kernelize(model, mode=mode, device=device.type)
    assert all((_bound(m) is not None) == ours for m in _norms(model) + _slots(model))
    if ours:
        with torch.no_grad():
            ids, _ = token_batch(device)
            assert_close("logits", model(input_ids=ids).logits, tiny_model("llama", device=device)(input_ids=ids).logits,
                         torch.float32, scale=4)


def test_a_class_under_the_name_with_other_code_runs_its_own_forward(counted, device):
    """Gemma's ``(1 + w)`` norm wearing the ``RMSNorm`` name: the layer refuses it by name, computes it right."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    @kernels.use_kernel_forward_from_hub("RMSNorm")
    class OtherRMSNorm(GemmaRMSNorm):
        pass

    norm = OtherRMSNorm(8).to(device)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 3, 8, device=device)
    hub.kernelize(norm, device=device.type)
    assert _bound(norm) is layers.RMSNorm.forward
    with pytest.warns(SlothCoreWarning, match="OtherRMSNorm.forward is not the code"):
        y = norm(x)
    assert torch.equal(y, GemmaRMSNorm.forward(norm, x)) and counted["rms_norm"] == 0


def test_a_rotary_slot_with_other_code_runs_its_own_function(counted, device):
    def rotate_half(x):  # interleaved pairs: not Llama's halves
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

    @kernels.use_kernel_forward_from_hub("rotary_pos_emb")
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    @kernels.use_kernelized_func(apply_rotary_pos_emb)
    class Attention(torch.nn.Module):
        def forward(self, q, k, cos, sin):
            return apply_rotary_pos_emb(q, k, cos, sin)

    attn = Attention()
    hub.kernelize(attn, device=device.type)
    q, k, cos, sin = (torch.randn(*shape, device=device) for shape in ((1, 2, 3, 4), (1, 1, 3, 4), (1, 3, 4), (1, 3, 4)))
    with pytest.warns(SlothCoreWarning, match="is not the code"):
        got = attn(q, k, cos, sin)
    want = layers.slot_function(type(apply_rotary_pos_emb))(q, k, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and counted["apply_rope"] == 0


def test_optimize_serves_over_sloth_cores_hub_layers_and_restore_gives_them_back(device):
    plain, model = tiny_model("llama", device=device), tiny_model("llama", device=device)
    hub.kernelize(model, mode=Mode.TRAINING, device=device.type)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlothCoreWarning)  # nothing missing
        sloth_core.optimize(model)
    rows = [r for r in sloth_core.report(model) if r.pattern == "rms_norm"]
    assert rows and all(r.status == "replaced" and "hub kernel" in r.detail for r in rows)
    rows = [r for r in sloth_core.report(model) if r.pattern == "rope"]
    assert rows and all(r.status == "replaced" and "hub kernel" in r.detail for r in rows)
    assert not sloth_core.missing_patterns(model)
    ids, labels = token_batch(device)
    assert_close("loss", model(input_ids=ids, labels=labels).loss, plain(input_ids=ids, labels=labels).loss,
                 torch.float32, scale=4)
    sloth_core.restore(model)
    assert all(_bound(m) is layers.RMSNorm.forward for m in _norms(model))
    assert all(_bound(s) is layers.RotaryPosEmb.forward for s in _slots(model))


_DUMMY_LAYERS = '''
import torch
from torch import nn


class RMSNorm(nn.Module):  # no normalization at all
    def forward(self, hidden_states):
        return self.weight * hidden_states


class RotaryPosEmb(nn.Module):  # no rotation
    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        return q * 1.0, k * 1.0
'''


def _dummy_repo(path):
    path.mkdir()
    (path / "metadata.json").write_text(json.dumps({
        "id": f"sloth_core_test_dummy_{abs(hash(str(path)))}", "name": "dummy-norm", "version": 1,
        "license": "Apache-2.0", "backend": {"type": "universal"}, "python-depends": []}))
    (path / "__init__.py").write_text("from . import layers\n")
    (path / "layers.py").write_text(_DUMMY_LAYERS)
    return path


def test_optimize_refuses_a_hub_kernel_that_computes_something_else(tmp_path, device):
    repo = _dummy_repo(tmp_path / "dummy")
    mapping = {name: {device.type: kernels.LocalLayerRepository(repo_path=repo, layer_name=layer)}
               for name, layer in hub.LAYERS.items()}
    model = tiny_model("llama", device=device)
    with kernels.use_kernel_mapping(mapping, inherit_mapping=False):
        kernels.kernelize(model, mode=Mode.TRAINING, device=device.type)
    ids, _ = token_batch(device)
    before = model(input_ids=ids).logits
    with pytest.warns(SlothCoreWarning, match="rms_norm"):
        sloth_core.optimize(model, exclude="causal_lm_loss")
    rows = {r.pattern: r for r in sloth_core.report(model) if r.module.endswith(("model.norm", "layers.0.self_attn"))}
    assert rows["rms_norm"].status == "skipped"
    assert "hub kernel" in rows["rms_norm"].detail and str(repo) in rows["rms_norm"].detail
    assert rows["rope"].status == "skipped" and f"hub kernel `{repo}`" in rows["rope"].detail
    assert {m.pattern for m in sloth_core.missing_patterns(model)} >= {"rms_norm", "rope"}
    assert torch.equal(model(input_ids=ids).logits, before)  # the hub kernels still compute, unreplaced


@pytest.mark.cuda
@pytest.mark.parametrize("through", ["sloth_core.hub", "transformers"])
def test_kernelize_on_cuda(through, counted, monkeypatch):
    """The real path on a GPU, bf16: ``hub.kernelize``, and transformers' own ``set_use_kernels`` with a local
    ``KernelConfig`` naming the repository; then ``optimize`` serves over it."""
    plain = tiny_model("llama", torch.bfloat16, device="cuda")
    model = tiny_model("llama", torch.bfloat16, device="cuda")
    if through == "transformers":
        from transformers import KernelConfig

        monkeypatch.setenv("USE_HUB_KERNELS", "YES")  # conftest turns transformers' hub kernels off
        config = KernelConfig({name: f"{hub.REPO_PATH}:{layer}" for name, layer in hub.LAYERS.items()},
                              use_local_kernel=True)
        model.set_use_kernels(True, config)
    else:
        hub.kernelize(model)
    assert all(_bound(m) is layers.RMSNorm.forward for m in _norms(model))
    assert all(_bound(s) is layers.RotaryPosEmb.forward for s in _slots(model))
    ids, labels = token_batch("cuda")
    outs = [m(input_ids=ids, labels=labels) for m in (plain, model)]
    assert counted["rms_norm"] and counted["apply_rope"]
    assert_close("logits", outs[1].logits, outs[0].logits, torch.bfloat16, scale=2)
    sloth_core.optimize(model)
    assert not sloth_core.missing_patterns(model)
    assert_close("loss", model(input_ids=ids, labels=labels).loss, outs[0].loss, torch.bfloat16, scale=2)
