"""Gated activation of gated MLPs: ``h = act(gate) * up``.

HF's ``LlamaMLP`` / ``GemmaMLP`` compute ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``; this family replaces
the middle, elementwise part.

Forward, with ``g = gate``, ``u = up``::

    h = act(g) * u

    silu(g)      = g * sigmoid(g)
    gelu_tanh(g) = 0.5 * g * (1 + tanh(k * (g + c * g^3))),   k = sqrt(2 / pi),  c = 0.044715
                   (torch ``gelu(approximate="tanh")``, HF ``ACT2FN["gelu_pytorch_tanh"]``)

Backward, given ``dh = dL/dh``::

    dg = dh * u * act'(g)
    du = dh * act(g)

    silu'(g)      = s * (1 + g * (1 - s)),   s = sigmoid(g)
    gelu_tanh'(g) = 0.5 * (1 + t) + 0.5 * g * (1 - t^2) * k * (1 + 3 * c * g^2),   t = tanh(k * (g + c * g^3))

The forward writes only ``h``; the backward recomputes ``act(g)`` from the saved ``gate`` and ``up`` (the
activation is never stored), and can write ``h`` as well (the fused LoRA MLP's chunked backward needs it). Kernels compute in float32 and round once on store; ``tanh(x)`` is written as
``2 * sigmoid(2x) - 1`` (libdevice is unavailable under Triton's interpreter). The reference mirrors HF in the
input dtype: the activation is rounded to the dtype, then multiplied by ``up``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sloth_core.autotune import config_for, register_heuristic, register_space
from sloth_core.autotune.space import dtype_from_name, dtype_name, rows_bucket, warps_for
from sloth_core.kernels._runtime import (OP_TAGS, cdiv, interpreting, launch_kernel, new_empty, next_power_of_2,
                                         triton_ok)

ACTIVATIONS = ("silu", "gelu_tanh")
_ACTIVATION_IDS = {name: i for i, name in enumerate(ACTIVATIONS)}


# --------------------------------------------------------------------------------------------- reference


def _check_activation(activation: str) -> None:
    if activation not in _ACTIVATION_IDS:
        raise ValueError(f"gated_activation: unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def _check_shapes(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"gated_activation: gate has shape {tuple(gate.shape)} but up has shape "
                         f"{tuple(up.shape)}; they must match")


def _torch_activation(gate: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(gate)
    return F.gelu(gate, approximate="tanh")


def gated_activation_reference(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up`` exactly as HF computes it: the activation is rounded to the dtype, then multiplied."""
    _check_activation(activation)
    _check_shapes(gate, up)
    return _torch_activation(gate, activation) * up


# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _activation_and_derivative(g, ACT: tl.constexpr):
    """``(act(g), act'(g))`` in float32; ``ACT`` indexes ``ACTIVATIONS``."""
    if ACT == 0:
        s = tl.sigmoid(g)
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    else:
        # Plain floats, not tl.constexpr globals: triton 3.9's interpreter turns `constexpr * tensor` into a
        # constexpr wrapping the tensor, which tl.sigmoid then rejects.
        k = 0.7978845608028654  # sqrt(2 / pi)
        c = 0.044715
        t = _tanh(k * (g + c * g * g * g))
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k * (1.0 + 3.0 * c * g * g)
    return a, da


@triton.jit
def _block_offsets(n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit
def _gated_activation_fwd_kernel(gate_ptr, up_ptr, h_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = _block_offsets(n, BLOCK)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a, _ = _activation_and_derivative(g, ACT)
    tl.store(h_ptr + offs, (a * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_activation_bwd_kernel(dh_ptr, gate_ptr, up_ptr, dg_ptr, du_ptr, h_ptr, n,
                                 ACT: tl.constexpr, WRITE_H: tl.constexpr, BLOCK: tl.constexpr):
    """``dg``, ``du`` and, when ``WRITE_H``, the forward's ``h = act(g) * u`` too (its inputs are loaded anyway)."""
    offs, mask = _block_offsets(n, BLOCK)
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a, da = _activation_and_derivative(g, ACT)
    tl.store(dg_ptr + offs, (dh * u * da).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, (dh * a).to(du_ptr.dtype.element_ty), mask=mask)
    if WRITE_H:
        tl.store(h_ptr + offs, (a * u).to(h_ptr.dtype.element_ty), mask=mask)


@register_heuristic("gated_activation")
def gated_activation_heuristic(n: int, dtype: torch.dtype | None = None) -> dict:
    """Elementwise: ``BLOCK`` elements a program. Under the interpreter, few large programs."""
    if interpreting():
        return {"BLOCK": min(next_power_of_2(n), 1 << 16), "num_warps": 1}
    block = min(next_power_of_2(n), 2048)
    return {"BLOCK": block, "num_warps": max(1, min(8, block // 256))}


def _launch_config(n: int, dtype: torch.dtype) -> tuple[tuple[int], dict]:
    cfg = config_for("gated_activation", n=n, dtype=dtype)
    return (cdiv(n, cfg["BLOCK"]),), cfg


def _forward(gate: torch.Tensor, up: torch.Tensor, activation: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """``act(gate) * up`` of contiguous same-shape tensors, into a new tensor or into ``out`` (which may alias
    ``gate`` or ``up``: each element is read by the program that writes it, before it writes it)."""
    h = new_empty(gate.shape, gate.dtype, gate.device) if out is None else out
    n = gate.numel()
    grid, cfg = _launch_config(n, gate.dtype)
    launch_kernel(_gated_activation_fwd_kernel, grid, gate, up, h, n, ACT=_ACTIVATION_IDS[activation], **cfg)
    return h


def _backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str,
              out: tuple[torch.Tensor, torch.Tensor] | None = None, h_out: torch.Tensor | None = None):
    """``(dg, du)`` of contiguous same-shape tensors, into new tensors or into ``out``; with ``h_out``, the
    forward's ``act(gate) * up`` is written there too. ``out`` and ``h_out`` may alias ``dh``, ``gate`` or ``up``
    (each element is read by the program that writes it, before it writes it)."""
    if out is None:
        out = new_empty(gate.shape, gate.dtype, gate.device), new_empty(up.shape, up.dtype, up.device)
    dg, du = out
    n = gate.numel()
    grid, cfg = _launch_config(n, gate.dtype)
    launch_kernel(_gated_activation_bwd_kernel, grid, dh, gate, up, dg, du, dg if h_out is None else h_out, n,
                  ACT=_ACTIVATION_IDS[activation], WRITE_H=h_out is not None, **cfg)
    return dg, du


class _GatedActivationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        ctx.activation = activation
        return _forward(gate, up, activation)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        gate, up = ctx.saved_tensors
        dg, du = _backward(dh.contiguous(), gate, up, ctx.activation)
        return dg, du, None


def _triton_handles(gate: torch.Tensor, up: torch.Tensor) -> bool:
    return triton_ok(gate, up) and gate.dtype == up.dtype and gate.device == up.device and gate.numel() > 0


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up`` (autograd-aware). ``gate`` and ``up``: same shape ``[..., N]``; ``activation`` in
    ``ACTIVATIONS``. Runs the Triton kernels when possible, else :func:`gated_activation_reference`."""
    _check_activation(activation)
    _check_shapes(gate, up)
    if not _triton_handles(gate, up):
        return gated_activation_reference(gate, up, activation)
    if torch.compiler.is_compiling():
        return gated_activation_fwd_op(gate, up, activation)
    return _GatedActivationFunction.apply(gate, up, activation)


# --------------------------------------------------------------------------------------------- torch.compile
# The launches as custom ops, which Dynamo records as graph nodes instead of tracing into Triton;
# :func:`gated_activation` calls the forward op (differentiable through the backward op) only while compiling.


@torch.library.custom_op("sloth_core::gated_activation_fwd", mutates_args=(), tags=OP_TAGS)
def gated_activation_fwd_op(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    return _forward(gate.contiguous(), up.contiguous(), activation)


@gated_activation_fwd_op.register_fake
def _(gate, up, activation):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("sloth_core::gated_activation_bwd", mutates_args=(), tags=OP_TAGS)
def gated_activation_bwd_op(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                            activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(dh.contiguous(), gate.contiguous(), up.contiguous(), activation)


@gated_activation_bwd_op.register_fake
def _(dh, gate, up, activation):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _fwd_op_setup(ctx, inputs, output):
    gate, up, activation = inputs
    ctx.save_for_backward(gate, up)
    ctx.activation = activation


def _fwd_op_backward(ctx, dh):
    gate, up = ctx.saved_tensors
    return (*gated_activation_bwd_op(dh, gate, up, ctx.activation), None)


gated_activation_fwd_op.register_autograd(_fwd_op_backward, setup_context=_fwd_op_setup)


# --------------------------------------------------------------------------------------------- tuning space
# Tuning key: the element count rounded up to a power of 2 (capped at 2^27), the dtype. Candidates: blocks of
# 512-8192 elements, 4-32 elements a thread. Timed: the forward and the backward (one launch key).


def _tuning_key(*, n: int, dtype: torch.dtype | None = None) -> dict:
    return dict(n=rows_bucket(n), dtype=dtype_name(dtype))


def _tuning_example(bucket: dict) -> dict:
    return dict(n=bucket["n"], dtype=dtype_from_name(bucket["dtype"]))


def _tuning_candidates(bucket: dict):
    for block in (512, 1024, 2048, 4096, 8192):
        if block > max(512, next_power_of_2(bucket["n"])):
            break
        for num_warps in warps_for(block, (1, 2, 4, 8, 16), min_per_thread=4, max_per_thread=32):
            yield dict(BLOCK=block, num_warps=num_warps)


def _tuning_inputs(bucket: dict, device: torch.device, gen: torch.Generator) -> dict:
    dtype = dtype_from_name(bucket["dtype"])
    gate, up, dh = (torch.randn(bucket["n"], device=device, dtype=dtype, generator=gen) for _ in range(3))
    return dict(gate=gate, up=up, dh=dh)


def _tuning_workspace(bucket: dict) -> int:
    """Bytes a tuning of ``bucket`` allocates: 3 inputs, and 3 outputs for the expected ones, a candidate's and the
    one before it in the timing loop."""
    return 12 * bucket["n"] * dtype_from_name(bucket["dtype"]).itemsize


def _tuning_run(inputs: dict):
    gate, up = inputs["gate"], inputs["up"]
    return (_forward(gate, up, "silu"), *_backward(inputs["dh"], gate, up, "silu"))


register_space(
    "gated_activation",
    params=dict(BLOCK=tuple(1 << i for i in range(17)), num_warps=(1, 2, 4, 8, 16, 32)),
    key=_tuning_key, example=_tuning_example, candidates=_tuning_candidates,
    make_inputs=_tuning_inputs, run=_tuning_run, workspace=_tuning_workspace,
    worth_tuning=lambda bucket: bucket["n"] >= 1 << 20,
)
