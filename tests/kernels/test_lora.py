"""Fused LoRA linear / LoRA gated MLP against real PEFT layers (nn.Linear and bitsandbytes 4-bit bases) and a
float64 reference: outputs and the gradients of x, A, B; lora_spec's reasons; what is saved for backward."""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.utils.checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from sloth_core.autotune import override
from sloth_core.kernels import lora_base as LB
from sloth_core.kernels import lora_gemm as LG
from sloth_core.kernels import lora_linear as LL
from sloth_core.kernels import lora_mlp as LM
from sloth_core.kernels import lora_mlp_chunked as LC
from sloth_core.kernels import lora_peft as LP
from sloth_core.kernels import lora_qkv as LQ
from sloth_core.tiny import tiny_config
from sloth_core.tolerances import assert_close, tolerance

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

BASE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
QUANT_DTYPES = (torch.bfloat16, torch.float16)
HF_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}
DIMS = st.sampled_from([1, 7, 16, 33, 70, 96])

# The loaded profile, plus: the ``device`` fixture is a constant, safe to share between examples.
profile = settings(suppress_health_check=[*settings.default.suppress_health_check,
                                          HealthCheck.function_scoped_fixture])


# --------------------------------------------------------------------------------------------- building layers


def _randn(shape, gen, std=1.0):
    return torch.randn(shape, generator=gen, dtype=torch.float64) * std


def _linear(in_f, out_f, bias, gen):
    """An fp64 nn.Linear with unit-scale outputs for unit inputs."""
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(_randn((out_f, in_f), gen, in_f ** -0.5))
        if bias:
            lin.bias.copy_(_randn((out_f,), gen, 0.5))
    return lin


def _quantized(lin: nn.Linear, dtype, device, quant_type="nf4", double_quant=True):
    """A bitsandbytes Linear4bit holding ``lin``'s weight (quantized when moved to ``device``)."""
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=dtype,
                          quant_type=quant_type, compress_statistics=double_quant)
    q.weight = bnb.nn.Params4bit(lin.weight.data.to(dtype), requires_grad=False, quant_type=quant_type,
                                 compress_statistics=double_quant)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.data.to(dtype), requires_grad=False)
    return q.to(device)


class _Net(nn.Module):
    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)


def _peftify(net, targets, gen, quantized=False, **lora_kwargs):
    """PEFT LoRA on ``targets`` (fp32 adapters on a half base, as PEFT's default). The adapters are randomized
    (PEFT initializes B to 0) so that x A^T is unit-scale and the LoRA delta s (x A^T) B^T about half the base
    output: both matter, and the delta does not dwarf the base weight (which would make the tests measure the
    cancellation between a large delta and the base rather than the kernels)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    if quantized:
        net.is_loaded_in_4bit = True
    cfg = LoraConfig(**{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": targets, **lora_kwargs})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(net, cfg)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoraLayer) and "default" in layer.lora_A:
                A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                A.copy_(_randn(A.shape, gen, A.shape[1] ** -0.5))
                B.copy_(_randn(B.shape, gen, 0.5 / (layer.scaling["default"] * B.shape[1] ** 0.5)))
    return model


def peft_linear(in_f, out_f, dtype, device, gen, bias=False, quant=None, double_quant=True, **lora_kwargs):
    """A PEFT LoRA layer over an nn.Linear (``quant=None``) or a Linear4bit (``quant`` = "nf4"/"fp4")."""
    lin = _linear(in_f, out_f, bias, gen)
    if quant is None:
        proj = lin.to(dtype).to(device).requires_grad_(False)
    else:
        proj = _quantized(lin, dtype, device, quant, double_quant)
    net = _Net(proj=proj)
    _peftify(net, ["proj"], gen, quantized=quant is not None, **lora_kwargs)
    return net.proj


def peft_mlp(hidden, inter, activation, dtype, device, gen, quant=None, **lora_kwargs):
    """HF LlamaMLP with PEFT LoRA on gate/up/down (bases nn.Linear or Linear4bit)."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = tiny_config("llama", hidden_size=hidden, intermediate_size=inter, hidden_act=HF_ACTIVATIONS[activation])
    mlp = LlamaMLP(cfg)
    shapes = {"gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    for name, (i, o) in shapes.items():
        lin = _linear(i, o, False, gen)
        proj = lin.to(dtype).to(device) if quant is None else _quantized(lin, dtype, device, quant)
        setattr(mlp, name, proj.requires_grad_(False))
    net = _Net(mlp=mlp)
    _peftify(net, ["gate_proj", "up_proj", "down_proj"], gen, quantized=quant is not None, **lora_kwargs)
    return net.mlp


def spec_of(layer) -> LB.LoRASpec:
    spec = LP.lora_spec(layer)
    assert isinstance(spec, LB.LoRASpec), spec
    return spec


def float64_spec(spec: LB.LoRASpec) -> LB.LoRASpec:
    """The same LoRA linear in float64 (the base weight dequantized when 4-bit)."""
    layer = spec.base_layer
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=torch.float64,
                    device=spec.A.device)
    with torch.no_grad():
        lin.weight.copy_(LB.base_weight(layer))
        if layer.bias is not None:
            lin.bias.copy_(layer.bias)
    return LB.LoRASpec(lin.requires_grad_(False), spec.A.detach().double().requires_grad_(),
                      spec.B.detach().double().requires_grad_(), spec.scale)


# --------------------------------------------------------------------------------------------- checking


def forward_and_grads(fn, x, params, dy):
    """``fn(x)`` and the gradients of ``x`` (when it requires grad) and of ``params`` for the seed ``dy``."""
    y = fn(x)
    wrt = ([x] if x.requires_grad else []) + list(params)
    return y, torch.autograd.grad(y, wrt, dy.to(y.dtype))


def check(name, actual, expected, dtype, scale=1.0, magnitude=None):
    """``actual`` vs ``expected`` within the tolerance of ``dtype`` x ``scale``, with errors measured against
    ``max(|expected|, magnitude)``: the absolute part of the tolerance is relative to the tensor's RMS (a gradient
    summed over tokens keeps an absolute error on its near-zero elements), and ``magnitude`` (optional, the
    root-sum-square of the terms each element sums) widens the bound where the terms cancel (with r = 1 and one
    token, dA is one cancelling dot product times x: any implementation in ``dtype``, PEFT's too, is then off by
    many ulps of the result, but not of the terms)."""
    a, e = (t.detach().double().cpu() for t in (actual, expected))
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    size = e.abs() if magnitude is None else torch.maximum(e.abs(), magnitude.detach().double().cpu())
    tol = tolerance(dtype, scale)
    err = (a - e).abs()
    rms = size.pow(2).mean().sqrt().item() or 1.0
    rel = torch.linalg.vector_norm(err).item() / (torch.linalg.vector_norm(size).item() or 1.0)
    bad = ~(err <= tol.atol * rms + tol.rtol * size)  # NaN is bad
    assert rel <= tol.rel_norm and not bad.any(), (
        f"{name}: relative error {rel:.3e} (bound {tol.rel_norm:.1e}); {int(bad.sum())} of {bad.numel()} "
        f"elements outside atol={tol.atol:.1e} x rms, rtol={tol.rtol:.1e}; worst: "
        f"{a.flatten()[int(torch.argmax(err))].item():.6g} vs {e.flatten()[int(torch.argmax(err))].item():.6g}")


def check_against_peft(ours, theirs, expected, dtype, names, scale=1.0, magnitudes=None):
    """Outputs and gradients, each ``(output, [gradients])``, of the fused function (``ours``) and of PEFT
    (``theirs``) vs float64 (``expected``): both within the tolerance x ``scale``; ours vs PEFT x 2 (both err)."""
    magnitudes = magnitudes or (None, [None] * len(names))
    labels = ["output", *(f"d{n}" for n in names)]
    for label, a, p, e, m in zip(labels, [ours[0], *ours[1]], [theirs[0], *theirs[1]],
                                 [expected[0], *expected[1]], [magnitudes[0], *magnitudes[1]]):
        check(f"PEFT vs float64 {label}", p, e, dtype, scale, m)
        check(f"fused vs float64 {label}", a, e, dtype, scale, m)
        check(f"fused vs PEFT {label}", a, p, dtype, 2 * scale, m)


def term_magnitudes(spec64: LB.LoRASpec, x64, dy64):
    """Root-sum-square of the terms summed into each element of the output and of the gradients of x, A, B: the
    bilinear reference evaluated on the squared inputs (s^2, W^2, b^2, A^2, B^2, x^2, dy^2), square-rooted."""
    layer = spec64.base_layer
    sq = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=torch.float64,
                   device=x64.device).requires_grad_(False)
    with torch.no_grad():
        sq.weight.copy_(layer.weight.square())
        if layer.bias is not None:
            sq.bias.copy_(layer.bias.square())
    A2, B2 = (t.detach().square().requires_grad_() for t in (spec64.A, spec64.B))
    x2 = x64.detach().square().requires_grad_(x64.requires_grad)
    y2, grads2 = forward_and_grads(lambda t: LL.lora_linear_reference(t, sq, A2, B2, spec64.scale ** 2), x2,
                                   (A2, B2), dy64.square())
    return y2.sqrt(), [g.sqrt() for g in grads2]


def mlp_term_magnitudes(s64, x64, dh64, activation: str):
    """Term magnitudes (as :func:`term_magnitudes`) of the output and the gradients of the gated LoRA MLP
    ``h = down(act(g) * u)``, ``g = gate(x)``, ``u = up(x)``: each projection's are the bilinear ones, with its
    input (or output gradient) replaced by the magnitude of that tensor's terms, propagated to first order
    through the gated product::

        |m|~  = |act(g)| |u|~ + |act'(g) u| |g|~
        |dg|~ = |dm|~ |act'(g) u| + |dm act'(g)| |u|~ + |dm u act''(g)| |g|~
        |du|~ = |dm|~ |act(g)| + |dm act'(g)| |g|~

    (``|t|~``: the magnitude of ``t``'s terms; ``g``, ``u``, ``m``, ``dm`` the float64 values). Each is at least
    the value's own magnitude, so the bound widens only where terms cancel."""
    from sloth_core.kernels import gated_activation as ga

    gate, up, down = s64
    x = x64.detach()
    g = LL.lora_linear_reference(x, *gate).detach()
    u = LL.lora_linear_reference(x, *up).detach()
    zeros = torch.zeros_like(g)
    g_mag = term_magnitudes(gate, x, zeros)[0].detach()
    u_mag = term_magnitudes(up, x, zeros)[0].detach()
    g_ = g.clone().requires_grad_()
    act = ga.gated_activation_reference(g_, torch.ones_like(g), activation)
    (d1,) = torch.autograd.grad(act.sum(), g_, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), g_)
    act, d1 = act.detach(), d1.detach()
    m_mag = (act.abs() * u_mag + (d1 * u).abs() * g_mag).requires_grad_()
    h_mag, (dm_mag, dA_d, dB_d) = term_magnitudes(down, m_mag, dh64)
    m = (act * u).requires_grad_()
    (dm,) = torch.autograd.grad(LL.lora_linear_reference(m, *down), m, dh64)
    dg_mag = dm_mag * (d1 * u).abs() + (dm * d1).abs() * u_mag + (dm * u * d2).abs() * g_mag
    du_mag = dm_mag * act.abs() + (dm * d1).abs() * g_mag
    grads_g = term_magnitudes(gate, x64, dg_mag.detach())[1]
    grads_u = term_magnitudes(up, x64, du_mag.detach())[1]
    grads = []
    if x64.requires_grad:
        grads.append((grads_g[0].square() + grads_u[0].square()).sqrt())
        grads_g, grads_u = grads_g[1:], grads_u[1:]
    return h_mag.detach(), [*grads, *grads_g, *grads_u, dA_d, dB_d]


def inputs(shape, dtype, device, gen, requires_grad=True):
    return _randn(shape, gen).to(dtype).to(device).requires_grad_(requires_grad)


def fused_path_taken(y, name):
    seen, stack = set(), [y.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == name:
            return True
        stack.extend(f for f, _ in fn.next_functions)
    return False


def check_lora_linear(layer, x, dtype, gen, scale=1.0):
    """lora_linear vs the PEFT layer and vs float64: output, dx, dA, dB."""
    spec = spec_of(layer)
    n_tokens = max(1, x.numel() // x.shape[-1])
    dy = _randn((*x.shape[:-1], layer.out_features), gen, n_tokens ** -0.5).to(x.device)
    names = (["x"] if x.requires_grad else []) + ["A", "B"]
    ours = forward_and_grads(lambda t: LL.lora_linear(t, *spec), x, (spec.A, spec.B), dy)
    assert fused_path_taken(ours[0], "_LoRALinearFunctionBackward"), "the fused path was not taken"
    theirs = forward_and_grads(layer, x, (spec.A, spec.B), dy)
    assert ours[0].dtype == theirs[0].dtype and ours[0].shape == theirs[0].shape
    assert all(a.dtype == b.dtype for a, b in zip(ours[1], theirs[1]))
    s64 = float64_spec(spec)
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    expected = forward_and_grads(lambda t: LL.lora_linear_reference(t, *s64), x64, (s64.A, s64.B), dy.double())
    check_against_peft(ours, theirs, expected, dtype, names, scale, term_magnitudes(s64, x64, dy.double()))


# --------------------------------------------------------------------------------------------- lora_linear


@profile
@given(lead=st.lists(st.integers(1, 9), min_size=1, max_size=2), in_f=DIMS, out_f=DIMS, r=st.integers(1, 8),
       alpha=st.sampled_from([1, 8, 16]), rslora=st.booleans(), bias=st.booleans(),
       dtype=st.sampled_from(BASE_DTYPES), x_grad=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_lora_linear_matches_peft(lead, in_f, out_f, r, alpha, rslora, bias, dtype, x_grad, seed, device):
    gen = torch.Generator().manual_seed(seed)
    layer = peft_linear(in_f, out_f, dtype, device, gen, bias=bias, r=r, lora_alpha=alpha, use_rslora=rslora)
    x = inputs((*lead, in_f), dtype, device, gen, x_grad)
    check_lora_linear(layer, x, dtype, gen)


# bitsandbytes 0.50's CPU dequantization (used by its CPU forward) misplaces blocks when in_features is even but not
# a multiple of the blocksize (64); its CUDA kernels and sloth_core's dequantizer do not. On the CPU we compare
# against PEFT with in_features a multiple of 64 (odd ones take a torch.compile path, minutes on a CPU).
QUANT_DIMS = [(64, 96), (128, 45), (64, 33)]


@profile
@given(n_tokens=st.integers(1, 20), dims=st.sampled_from(QUANT_DIMS),
       quant=st.sampled_from(["nf4", "fp4"]), double_quant=st.booleans(), dtype=st.sampled_from(QUANT_DTYPES),
       bias=st.booleans(), rslora=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_lora_linear_4bit_matches_peft(n_tokens, dims, quant, double_quant, dtype, bias, rslora, seed, device):
    gen = torch.Generator().manual_seed(seed)
    layer = peft_linear(*dims, dtype, device, gen, bias=bias, quant=quant, double_quant=double_quant, r=8,
                        lora_alpha=16, use_rslora=rslora)
    assert type(layer.base_layer).__name__ == "Linear4bit"
    x = inputs((n_tokens, dims[0]), dtype, device, gen)
    check_lora_linear(layer, x, dtype, gen)


@pytest.mark.parametrize("triton_dequantizer", [True, False])
def test_base_weight(triton_dequantizer, device, monkeypatch):
    """nn.Linear: the weight itself; Linear4bit: bitsandbytes' dequantization (through sloth_core's dequantizer
    when it is importable, else bitsandbytes.functional.dequantize_4bit)."""
    gen = torch.Generator().manual_seed(14)
    lin = _linear(64, 24, False, gen).float().to(device)
    assert LB.base_weight(lin) is lin.weight
    if not triton_dequantizer:
        monkeypatch.setattr(LB, "_triton_dequantizer", lambda: None)
    q = _quantized(_linear(64, 24, False, gen), torch.bfloat16, device)
    expected = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state)
    assert torch.equal(LB.base_weight(q), expected)


def test_rslora_scaling_is_used(device):
    gen = torch.Generator().manual_seed(0)
    plain = spec_of(peft_linear(12, 10, torch.float32, device, gen, r=4, lora_alpha=8))
    rs = spec_of(peft_linear(12, 10, torch.float32, device, gen, r=4, lora_alpha=8, use_rslora=True))
    assert plain.scale == pytest.approx(2.0) and rs.scale == pytest.approx(4.0)
    x = _randn((5, 12), gen).float().to(device)
    y_rs = LL.lora_linear(x, *rs)
    assert_close("rsLoRA output", y_rs, LL.lora_linear_reference(x, *rs))
    delta = y_rs - rs.base_layer(x)
    assert_close("LoRA delta", delta, 4.0 * (x @ rs.A.t() @ rs.B.t()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_linear_under_autocast(dtype, device):
    """A float32 model under bf16 autocast (the Trainer's bf16=True): PEFT runs everything in bf16."""
    gen = torch.Generator().manual_seed(1)
    layer = peft_linear(40, 24, dtype, device, gen, bias=True)
    x = inputs((2, 6, 40), dtype, device, gen)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        check_lora_linear(layer, x, torch.bfloat16, gen)


def test_only_requested_gradients(device):
    """A frozen A: only dB (and dx) come out; x without grad: no dx computed; the base never gets a gradient."""
    gen = torch.Generator().manual_seed(2)
    spec = spec_of(peft_linear(20, 12, torch.float32, device, gen, bias=True))
    spec.A.requires_grad_(False)
    x = _randn((3, 20), gen).float().to(device)
    y = LL.lora_linear(x, *spec)
    (dB,) = torch.autograd.grad(y.sum(), (spec.B,))
    x64, s64 = x.double(), float64_spec(spec)
    (dB64,) = torch.autograd.grad(LL.lora_linear_reference(x64, *s64).sum(), (s64.B,))
    check("dB", dB, dB64, torch.float32)
    assert spec.base_layer.weight.grad is None and spec.base_layer.bias.grad is None


def test_trainable_base_takes_the_reference_path(device):
    gen = torch.Generator().manual_seed(3)
    layer = peft_linear(20, 12, torch.float32, device, gen)
    layer.base_layer.weight.requires_grad_(True)
    assert "trainable" in LP.lora_spec(layer)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = _randn((3, 20), gen).float().to(device)
    y = LL.lora_linear(x, layer.base_layer, A, B, 2.0)
    assert not fused_path_taken(y, "_LoRALinearFunctionBackward")
    y.sum().backward()
    assert layer.base_layer.weight.grad is not None


def test_float64_takes_the_reference_path(device):
    gen = torch.Generator().manual_seed(4)
    spec = float64_spec(spec_of(peft_linear(20, 12, torch.float32, device, gen, bias=True)))
    x = _randn((4, 20), gen).to(device)
    y = LL.lora_linear(x, *spec)
    assert not fused_path_taken(y, "_LoRALinearFunctionBackward")
    assert torch.equal(y, LL.lora_linear_reference(x, *spec))
    mlp_specs = [spec, spec, float64_spec(spec_of(peft_linear(12, 20, torch.float32, device, gen)))]
    h = LM.lora_mlp(x, *mlp_specs, "silu")
    assert not fused_path_taken(h, "_LoRAMLPFunctionBackward")
    assert torch.equal(h, LM.lora_mlp_reference(x, *mlp_specs, "silu"))


def test_wrong_shapes_raise(device):
    gen = torch.Generator().manual_seed(5)
    spec = spec_of(peft_linear(20, 12, torch.float32, device, gen))
    x = torch.randn(3, 20, device=device)
    with pytest.raises(ValueError, match="input has 19 features"):
        LL.lora_linear(x[:, :19], *spec)
    with pytest.raises(ValueError, match=r"lora\.A"):
        LL.lora_linear(x, spec.base_layer, spec.A[:, :5], spec.B, 1.0)
    with pytest.raises(ValueError, match=r"lora\.B"):
        LL.lora_linear(x, spec.base_layer, spec.A, spec.B[:5], 1.0)
    with pytest.raises(ValueError, match=r"lora\.B"):
        LL.lora_linear(x, spec.base_layer, spec.A, spec.B[:, :2], 1.0)
    down = spec_of(peft_linear(12, 20, torch.float32, device, gen))
    with pytest.raises(ValueError, match="down"):
        LM.lora_mlp(x, spec, spec, spec, "silu")
    with pytest.raises(ValueError, match="up: out_features"):
        LM.lora_mlp(x, spec, spec_of(peft_linear(20, 11, torch.float32, device, gen)), down, "silu")
    with pytest.raises(ValueError, match="activation"):
        LM.lora_mlp(x, spec, spec, down, "relu")


# --------------------------------------------------------------------------------------------- lora_qkv


def _qkv_run(fn, x, specs, dys):
    """Outputs of ``fn(x)`` (three) and the gradients of x (when it requires grad) and of every A, B for the seeds
    ``dys`` (``None``: that output unused); an adapter that gets no gradient gives ``None``."""
    ys = fn(x)
    wrt = ([x] if x.requires_grad else []) + [t for sp in specs for t in (sp.A, sp.B)]
    total = sum((y * dy.to(y.dtype)).sum() for y, dy in zip(ys, dys) if dy is not None)
    return ys, torch.autograd.grad(total, wrt, allow_unused=True)


@profile
@given(tokens=st.integers(1, 12), in_f=st.sampled_from([16, 40]), outs=st.sampled_from([(40, 8, 8), (24, 24, 16)]),
       ranks=st.tuples(st.integers(2, 6), st.integers(2, 6), st.integers(2, 6)),
       used=st.sampled_from([(1, 1, 1), (1, 0, 1), (0, 1, 0)]), dtype=st.sampled_from(BASE_DTYPES),
       quant=st.sampled_from([None, "nf4"]), x_grad=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_lora_qkv_matches_peft(tokens, in_f, outs, ranks, used, dtype, quant, x_grad, seed, device):
    """Three LoRA linears on one input as one function (ranks may differ; some outputs may be unused): outputs and
    gradients match PEFT's three layers and float64 (errors against the terms' magnitudes); adapters of unused
    outputs get no gradient, as in PEFT."""
    if quant is not None:  # bitsandbytes' CPU 4-bit kernel indexes blocks per row: in_features a multiple of 64
        dtype, in_f = (torch.bfloat16 if dtype == torch.float32 else dtype), 64
    gen = torch.Generator().manual_seed(seed)
    layers = [peft_linear(in_f, o, dtype, device, gen, quant=quant, r=r, lora_alpha=8) for o, r in zip(outs, ranks)]
    specs = [spec_of(layer) for layer in layers]
    x = inputs((tokens, in_f), dtype, device, gen, x_grad)
    dys = [_randn((tokens, o), gen, tokens ** -0.5).to(device) if u else None for o, u in zip(outs, used)]
    ours = _qkv_run(lambda t: LQ.lora_qkv(t, *specs), x, specs, dys)
    assert fused_path_taken(next(y for y, dy in zip(ours[0], dys) if dy is not None), "_LoRAQKVFunctionBackward")
    theirs = _qkv_run(lambda t: tuple(layer(t) for layer in layers), x, specs, dys)
    s64 = [float64_spec(sp) for sp in specs]
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    expected = _qkv_run(lambda t: LQ.lora_qkv_reference(t, *s64), x64, s64, [None if d is None else d.double()
                                                                           for d in dys])
    mags = [term_magnitudes(sp, x64, (d if d is not None else torch.zeros(tokens, o)).double().to(device))
            for sp, d, o in zip(s64, dys, outs)]
    for j in range(3):
        check(f"y{j}", ours[0][j], theirs[0][j], dtype, 2.0, mags[j][0])
        check(f"y{j} vs float64", ours[0][j], expected[0][j], dtype, 1.0, mags[j][0])
    grads_mag = []
    if x.requires_grad:
        grads_mag.append(sum(m[1][0].square() for m in mags).sqrt())
    for m in mags:
        grads_mag += m[1][-2:]
    names = (["x"] if x.requires_grad else []) + [f"{p}{j}" for j in range(3) for p in "AB"]
    for name, a, p, e, mag in zip(names, ours[1], theirs[1], expected[1], grads_mag):
        assert (a is None) == (p is None) == (e is None), name
        if a is not None:
            check(f"d{name} vs PEFT", a, p, dtype, 2.0, mag)
            check(f"d{name} vs float64", a, e, dtype, 1.0, mag)


def test_lora_qkv_mixed_paths_fall_back_per_projection(device):
    """A projection the fused path cannot run (a trainable base here) makes the three run lora_linear one by
    one, with the same results; a wrong shape names the projection."""
    gen = torch.Generator().manual_seed(11)
    layers = [peft_linear(16, n, torch.float32, device, gen) for n in (8, 4, 4)]
    specs = [spec_of(layer) for layer in layers]
    x = inputs((3, 16), torch.float32, device, gen)
    assert fused_path_taken(LQ.lora_qkv(x, *specs)[0], "_LoRAQKVFunctionBackward")
    layers[2].base_layer.weight.requires_grad_(True)
    mixed = LQ.lora_qkv(x, *specs)
    assert not any(fused_path_taken(y, "_LoRAQKVFunctionBackward") for y in mixed)
    assert fused_path_taken(mixed[0], "_LoRALinearFunctionBackward")
    for y, spec in zip(mixed, specs):
        assert torch.equal(y, LL.lora_linear(x, *spec))
    with pytest.raises(ValueError, match=r"^k"):
        LQ.lora_qkv(x, specs[0], spec_of(peft_linear(12, 8, torch.float32, device, gen)), specs[1])


# --------------------------------------------------------------------------------------------- lora_mlp


def as_chunked_recompute(fn, x, first_forward=False):
    """``fn(x)`` as the recompute (or, ``first_forward``, the first forward) of a checkpointed layer whose MLP
    output nothing reads: the fused MLP computes no output in the recompute, and its backward recomputes g, u
    chunk by chunk."""
    from sloth_core import recompute

    with recompute.checkpointed_layer_scope(recompute=not first_forward, mlp_output_unused=True):
        return fn(x)


def check_lora_mlp(mlp, activation, x, dtype, gen, chunked=None):
    """lora_mlp vs PEFT's LlamaMLP and vs float64. Intermediates (g, u, act(g)*u and their gradients) are
    rounded to the dtype in all implementations: tolerance x2, errors against the terms' magnitudes
    (:func:`mlp_term_magnitudes`: with few tokens and r = 1 a gradient element can be a cancelling sum that any
    implementation in the dtype, PEFT's too, gets many ulps of the result wrong).
    ``chunked``: the fused MLP runs in a checkpointed layer whose MLP output nothing reads
    (:func:`as_chunked_recompute`), as the ``"recompute"`` (its output must be the NaN placeholder) or as the
    ``"first forward"`` (the output is computed); the backward recomputes g, u in chunks either way."""
    specs = [spec_of(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj")]
    params = [t for s in specs for t in (s.A, s.B)]
    names = (["x"] if x.requires_grad else []) + [f"{m}_{p}" for m in ("gate", "up", "down") for p in ("A", "B")]
    n_tokens = max(1, x.numel() // x.shape[-1])
    dy = _randn(x.shape, gen, n_tokens ** -0.5).to(x.device)
    fused = lambda t: LM.lora_mlp(t, *specs, activation)  # noqa: E731
    first = chunked == "first forward"
    ours = forward_and_grads((lambda t: as_chunked_recompute(fused, t, first)) if chunked else fused, x, params, dy)
    assert fused_path_taken(ours[0], "_LoRAMLPFunctionBackward"), "the fused path was not taken"
    theirs = forward_and_grads(mlp, x, params, dy)
    assert ours[0].dtype == theirs[0].dtype
    if chunked == "recompute":
        assert ours[0].isnan().all(), "the recompute computed an output nothing reads"
        ours = (theirs[0], ours[1])  # the output check below then covers PEFT's alone
    s64 = [float64_spec(s) for s in specs]
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    expected = forward_and_grads(lambda t: LM.lora_mlp_reference(t, *s64, activation), x64,
                                 [t for s in s64 for t in (s.A, s.B)], dy.double())
    check_against_peft(ours, theirs, expected, dtype, names, 2.0,
                       mlp_term_magnitudes(s64, x64, dy.double(), activation))


@profile
@given(lead=st.one_of(st.tuples(st.integers(4, 20)), st.tuples(st.integers(2, 3), st.integers(2, 7))),
       hidden=st.sampled_from([8, 24, 40]), inter=st.sampled_from([17, 96]), r=st.integers(1, 6),
       rslora=st.booleans(),
       activation=st.sampled_from(["silu", "gelu_tanh"]), dtype=st.sampled_from(BASE_DTYPES),
       x_grad=st.booleans(), small_block=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_lora_mlp_matches_peft_llama_mlp(lead, hidden, inter, r, rslora, activation, dtype, x_grad, small_block,
                                         seed, device):
    """``small_block``: the gated-activation kernels (dg written over dm in place) in blocks of 16 elements."""
    gen = torch.Generator().manual_seed(seed)
    mlp = peft_mlp(hidden, inter, activation, dtype, device, gen, r=r, lora_alpha=8, use_rslora=rslora)
    x = inputs((*lead, hidden), dtype, device, gen, x_grad)
    with override("gated_activation", BLOCK=16) if small_block else contextlib.nullcontext():
        check_lora_mlp(mlp, activation, x, dtype, gen)


@pytest.mark.parametrize("dtype", BASE_DTYPES)
def test_lora_mlp_single_token(dtype, device):
    gen = torch.Generator().manual_seed(13)
    mlp = peft_mlp(40, 96, "silu", dtype, device, gen, r=8, lora_alpha=16)
    x = inputs((1, 40), dtype, device, gen)
    check_lora_mlp(mlp, "silu", x, dtype, gen)


@pytest.mark.parametrize("dtype", QUANT_DTYPES)
def test_lora_mlp_4bit_matches_peft(dtype, device):
    gen = torch.Generator().manual_seed(6)
    mlp = peft_mlp(64, 128, "silu", dtype, device, gen, quant="nf4", r=8, lora_alpha=16)
    assert type(mlp.gate_proj.base_layer).__name__ == "Linear4bit"
    x = inputs((2, 5, 64), dtype, device, gen)
    check_lora_mlp(mlp, "silu", x, dtype, gen)


@contextlib.contextmanager
def chunk_multiple(multiple: int, chunks: int = 4):
    """Up to ``chunks`` chunks of a multiple of ``multiple`` columns in the chunked MLP backward, small enough
    that the test shapes take several chunks and a ragged last one."""
    saved = LC.CHUNK_MULTIPLE, LC.RECOMPUTE_CHUNKS
    LC.CHUNK_MULTIPLE, LC.RECOMPUTE_CHUNKS = multiple, chunks
    try:
        yield
    finally:
        LC.CHUNK_MULTIPLE, LC.RECOMPUTE_CHUNKS = saved


def test_chunk_bounds():
    """At most RECOMPUTE_CHUNKS ranges of a multiple of CHUNK_MULTIPLE columns covering [0, I) in order."""
    assert LC.chunk_bounds(14336) == [(0, 7168), (7168, 14336)]  # the default: two chunks
    assert LC.chunk_bounds(11008) == [(0, 5504), (5504, 11008)]
    assert LC.chunk_bounds(200) == [(0, 128), (128, 200)]
    assert LC.chunk_bounds(96) == [(0, 96)]
    with chunk_multiple(128, chunks=4):
        assert LC.chunk_bounds(14336) == [(0, 3584), (3584, 7168), (7168, 10752), (10752, 14336)]
    with chunk_multiple(4):
        assert LC.chunk_bounds(17) == [(0, 8), (8, 16), (16, 17)]


@profile
@given(tokens=st.integers(6, 20), hidden=st.sampled_from([24, 40]), inter=st.sampled_from([17, 96, 200]),
       r=st.integers(2, 6), activation=st.sampled_from(["silu", "gelu_tanh"]),
       dtype=st.sampled_from(BASE_DTYPES), multiple=st.sampled_from([4, 8, 16, 128]), x_grad=st.booleans(),
       phase=st.sampled_from(["recompute", "first forward"]), seed=st.integers(0, 2**31 - 1))
def test_lora_mlp_chunked_recompute_matches_peft(tokens, hidden, inter, r, activation, dtype, multiple, x_grad,
                                                 phase, seed, device):
    """A checkpointed layer whose MLP output nothing reads: no output in the recompute, PEFT's in the first
    forward, and the backward (g, u recomputed in column chunks, ragged last chunk included) gives PEFT's
    gradients."""
    gen = torch.Generator().manual_seed(seed)
    mlp = peft_mlp(hidden, inter, activation, dtype, device, gen, r=r, lora_alpha=8)
    x = inputs((tokens, hidden), dtype, device, gen, x_grad)
    with chunk_multiple(multiple):
        check_lora_mlp(mlp, activation, x, dtype, gen, chunked=phase)


@pytest.mark.parametrize("hidden", [64, 40])
@pytest.mark.parametrize("dtype", QUANT_DTYPES)
def test_lora_mlp_4bit_chunked_recompute_matches_peft(hidden, dtype, device):
    gen = torch.Generator().manual_seed(16)
    mlp = peft_mlp(hidden, 200, "silu", dtype, device, gen, quant="nf4", r=8, lora_alpha=16)
    x = inputs((2, 5, hidden), dtype, device, gen)
    with chunk_multiple(4):  # chunks of 52, 52, 52, 44 rows: with hidden 40, rows 52 and 156 start mid-block
        assert LC.chunk_bounds(200) == [(0, 52), (52, 104), (104, 156), (156, 200)]
        check_lora_mlp(mlp, "silu", x, dtype, gen, chunked="recompute")


def test_lora_mlp_frozen_adapter_parts(device):
    """Only some adapter matrices train (e.g. A_down frozen): the others still match; no dA_down is computed."""
    gen = torch.Generator().manual_seed(7)
    mlp = peft_mlp(24, 40, "silu", torch.float32, device, gen)
    specs = [spec_of(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj")]
    specs[2].A.requires_grad_(False)
    specs[0].B.requires_grad_(False)
    params = [specs[0].A, specs[1].A, specs[1].B, specs[2].B]
    x = _randn((6, 24), gen).float().to(device).requires_grad_()
    grads = torch.autograd.grad(LM.lora_mlp(x, *specs, "silu").sum(), [x, *params])
    expected = torch.autograd.grad(mlp(x).sum(), [x, *params])
    for name, g, e in zip(["x", "A_gate", "A_up", "B_up", "B_down"], grads, expected):
        check(name, g, e, torch.float32)


def test_lora_mlp_under_activation_checkpointing(device):
    """Non-reentrant checkpointing recomputes the forward (dequantizing again) and gives the same gradients."""
    gen = torch.Generator().manual_seed(15)
    mlp = peft_mlp(64, 128, "silu", torch.bfloat16, device, gen, quant="nf4")
    specs = [spec_of(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj")]
    params = [t for s in specs for t in (s.A, s.B)]
    x = inputs((7, 64), torch.bfloat16, device, gen)
    fn = lambda t: LM.lora_mlp(t, *specs, "silu")  # noqa: E731
    plain = torch.autograd.grad(fn(x).float().square().sum(), [x, *params])
    out = torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False)
    checkpointed = torch.autograd.grad(out.float().square().sum(), [x, *params])
    for a, b in zip(checkpointed, plain):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------- saved tensors


@contextlib.contextmanager
def recording_saved_tensors():
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


@pytest.fixture
def counted_dequantizations(monkeypatch):
    calls = []
    original = LB.base_weight

    def counting(layer, rows=None, dtype=None):
        calls.append(layer if rows is None else (layer, rows))
        return original(layer, rows, dtype)

    for module in (LG, LC):  # the modules that dequantize a base weight
        monkeypatch.setattr(module, "base_weight", counting)
    return calls


def test_dequantized_weight_is_not_saved(device, counted_dequantizations):
    """lora_linear on a 4-bit base saves x, xa, A, B only, and dequantizes once per use (forward, backward)."""
    gen = torch.Generator().manual_seed(8)
    layer = peft_linear(64, 45, torch.bfloat16, device, gen, quant="nf4", r=4)
    spec = spec_of(layer)
    x = inputs((5, 64), torch.bfloat16, device, gen)
    with recording_saved_tensors() as saved:
        y = LL.lora_linear(x, *spec)
    assert len(counted_dequantizations) == 1
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(5, 64), (5, 4), (4, 64), (45, 4)]), shapes
    y.sum().backward()
    assert len(counted_dequantizations) == 2


def test_lora_mlp_saves_no_weight_and_no_product(device, counted_dequantizations):
    """The MLP saves x, g, u and the [T, r] intermediates (plus the adapter matrices): no dequantized weight and
    no act(g)*u. Three dequantizations in the forward, three in the backward."""
    gen = torch.Generator().manual_seed(9)
    mlp = peft_mlp(64, 128, "silu", torch.bfloat16, device, gen, quant="nf4", r=4)
    specs = [spec_of(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj")]
    x = inputs((5, 64), torch.bfloat16, device, gen)
    with recording_saved_tensors() as saved:
        h = LM.lora_mlp(x, *specs, "silu")
    assert len(counted_dequantizations) == 3
    activations = sorted(tuple(t.shape) for t in saved if t.shape[0] == 5)
    assert activations == sorted([(5, 64), (5, 128), (5, 128), (5, 4), (5, 4), (5, 4)]), activations
    assert len(saved) == 12  # + A, B of the three adapters
    h.sum().backward()
    assert len(counted_dequantizations) == 6


def test_lora_mlp_chunked_recompute_saves_only_x(device, counted_dequantizations):
    """As a recompute whose output nothing reads, the MLP saves x (and the adapter matrices) and dequantizes
    nothing; its backward dequantizes, per chunk, W_down for dm (dropped before g, u: the memory peak), the gate/up
    rows for g, u and the gate rows again for dx (the up rows are kept from u to dx)."""
    gen = torch.Generator().manual_seed(10)
    mlp = peft_mlp(64, 128, "silu", torch.bfloat16, device, gen, quant="nf4", r=4)
    specs = [spec_of(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj")]
    x = inputs((5, 64), torch.bfloat16, device, gen)
    with recording_saved_tensors() as saved, chunk_multiple(32):
        h = as_chunked_recompute(lambda t: LM.lora_mlp(t, *specs, "silu"), x)
        assert not counted_dequantizations
        assert [tuple(t.shape) for t in saved if t.shape[0] == 5] == [(5, 64)] and len(saved) == 7
        h.backward(torch.ones_like(h))
    bounds = [(0, 32), (32, 64), (64, 96), (96, 128)]
    gate, up, down = (s.base_layer for s in specs)
    assert counted_dequantizations == [w for b in bounds for w in (down, (gate, b), (up, b), (gate, b))]


# --------------------------------------------------------------------------------------------- lora_spec


def test_lora_spec_reads_the_layer(device):
    gen = torch.Generator().manual_seed(10)
    layer = peft_linear(12, 10, torch.bfloat16, device, gen, bias=True, r=3, lora_alpha=6)
    spec = LP.lora_spec(layer)
    assert spec.base_layer is layer.base_layer and spec.scale == pytest.approx(2.0)
    assert spec.A is layer.lora_A["default"].weight and spec.B is layer.lora_B["default"].weight
    assert spec.A.dtype == torch.float32  # PEFT's fp32 adapter on a bf16 base


def _reason(layer) -> str:
    why = LP.lora_spec(layer)
    assert isinstance(why, str), f"expected a reason, got a spec for {type(layer).__name__}"
    return why


def test_lora_spec_reasons(device):
    gen = torch.Generator().manual_seed(11)
    new = lambda **kw: peft_linear(12, 10, torch.float32, device, gen, **kw)  # noqa: E731
    dropped = new(lora_dropout=0.1)
    assert LP.lora_spec(dropped.train()).dropout == 0.1 and LP.lora_spec(dropped.eval()).dropout == 0.0
    dropped.lora_dropout["default"] = nn.AlphaDropout(0.1)
    assert "AlphaDropout" in _reason(dropped)
    assert "Dora" in _reason(new(use_dora=True))
    assert "lora_bias" in _reason(new(lora_bias=True))
    assert "not a PEFT LoRA layer" in _reason(nn.Linear(3, 4))

    merged = new()
    merged.merge()
    assert "merged" in _reason(merged)
    disabled = new()
    disabled.enable_adapters(False)
    assert "disabled" in _reason(disabled)

    net = _Net(proj=nn.Linear(12, 10))
    model = _peftify(net, ["proj"], gen)
    model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["proj"]))
    model.base_model.set_adapter(["default", "second"])
    assert "2 active LoRA adapters" in _reason(net.proj)
    model.base_model.set_adapter("second")
    assert isinstance(LP.lora_spec(net.proj), LB.LoRASpec)

    emb = _Net(emb=nn.Embedding(10, 8))
    _peftify(emb, ["emb"], gen)
    assert "Embedding is not supported" in _reason(emb.emb)

    hooked = new()
    hooked.base_layer.register_forward_hook(lambda *args: None)
    assert "hooks" in _reason(hooked)


def test_lora_spec_reads_an_8bit_base_and_rejects_an_unquantized_one():
    try:
        l8 = bnb.nn.Linear8bitLt(32, 16, bias=False, has_fp16_weights=False)
        l8.weight = bnb.nn.Int8Params(torch.randn(16, 32, dtype=torch.float16), requires_grad=False,
                                      has_fp16_weights=False)
        l8 = l8.to("cuda" if torch.cuda.is_available() else "cpu")
    except Exception as e:  # pragma: no cover - depends on the bitsandbytes build
        pytest.skip(f"Linear8bitLt cannot be built here: {e}")
    net = _Net(proj=l8)
    net.is_loaded_in_8bit = True
    _peftify(net, ["proj"], torch.Generator().manual_seed(12))
    assert LP.lora_spec(net.proj).base_layer is l8
    l8.state.has_fp16_weights = True
    assert "has_fp16_weights" in _reason(net.proj)
    l8.state.has_fp16_weights = False
    l8.weight.SCB, l8.state.SCB = None, None
    assert "not quantized" in _reason(net.proj)
