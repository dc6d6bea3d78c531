"""A gated MLP with LoRA projections as one autograd function, and its reference.

Gated MLP (:func:`lora_mlp`), ``h = down(act(gate(x)) * up(x))`` with every projection a LoRA linear::

    xa_g = x A_g^T,  g = x W_g^T + s_g xa_g B_g^T           [T, I]
    xa_u = x A_u^T,  u = x W_u^T + s_u xa_u B_u^T           [T, I]
    m    = act(g) * u                                     [T, I]   (gated_activation kernel; not saved)
    ma   = m A_d^T,  h = m W_d^T + s_d ma B_d^T             [T, H]

Backward, given ``dh`` [T, H] (``act'`` and the gated pieces as in :mod:`sloth_core.kernels.gated_activation`)::

    dyB_d = dh B_d;              dB_d = s_d dh^T ma;       dm = dh W_d + s_d dyB_d A_d
    m     = act(g) * u           (recomputed from the saved g, u)   dA_d = s_d dyB_d^T m
    dg    = dm * u * act'(g);    du = dm * act(g)           (one kernel; dg overwrites dm, du overwrites m)
    dyB_g = dg B_g;  dA_g = s_g dyB_g^T x;  dB_g = s_g dg^T xa_g
    dyB_u = du B_u;  dA_u = s_u dyB_u^T x;  dB_u = s_u du^T xa_u
    dx    = dg W_g + s_g dyB_g A_g + du W_u + s_u dyB_u A_u

Saved: ``x``, ``g``, ``u`` ([T, I] each; needed for the activation's gradient anyway) and the [T, r] LoRA
intermediates ``xa_g``, ``xa_u``, ``ma``; ``m`` is recomputed instead of stored. The backward holds at most two
[T, I] temporaries (``dm``/``dg`` and ``m``/``du``); in the recompute of a checkpointed layer, where the saved
``g``, ``u`` are this backward's own, ``dg``/``du`` overwrite them and ``m`` is freed before ``dm`` exists (one
[T, I] temporary).

Checkpointed layers whose MLP output feeds nothing saved (:mod:`sloth_core.recompute`; Llama, Qwen3, Mistral):
both the first forward and the recompute save ``x`` alone (the checkpoint pairs their saved tensors one to one);
in an offloading layer ``x`` goes to the layer's stash instead (host memory, :func:`recompute.mlp_input_stash`) and
nothing is saved, so that the backward runs before the layer's recompute (whose attention tensors are then not
alive at the same time as the backward's temporaries).
The first forward computes ``h`` with ``m`` written over ``g`` and ``g``, ``u`` freed before the down
projection; the recompute computes nothing (its ``h`` is a NaN placeholder nobody reads); the backward
(:mod:`sloth_core.kernels.lora_mlp_chunked`) recomputes ``g``, ``u`` itself in column chunks of the intermediate
dimension and gets ``m`` from the gated-activation backward kernel. Alive at once: three [T, I/2] tensors in the
backward (was: ``g``, ``u``, ``dm``, three [T, I]), ``g``, ``u`` in the forward; the gated forward runs once
per step instead of three times, and a 4-bit ``W_gate``/``W_up`` is dequantized by row ranges.

Each projection computes as :func:`lora_linear.lora_linear` does (precision, dtypes and dispatch as there).
"""
from __future__ import annotations

import torch

from sloth_core import recompute
from sloth_core.kernels import gated_activation as _ga
from sloth_core.kernels._runtime import new_empty
from sloth_core.kernels.lora_base import LoRASpec, _check_spec, _fused_dtypes, _layer_dims
from sloth_core.kernels.lora_gemm import (_base_plus_lora, _input_grad, _no_autocast, _project, _project_backward,
                                          _scaled_mm, _shared_input_xa, _unused_output)
from sloth_core.kernels.lora_linear import lora_linear, lora_linear_reference
from sloth_core.kernels.lora_mlp_chunked import _chunked_recompute_backward


def lora_mlp_reference(x: torch.Tensor, gate: LoRASpec, up: LoRASpec, down: LoRASpec,
                       activation: str) -> torch.Tensor:
    """HF's gated MLP ``down(act(gate(x)) * up(x))`` with PEFT LoRA projections."""
    g = lora_linear_reference(x, *gate)
    u = lora_linear_reference(x, *up)
    return lora_linear_reference(_ga.gated_activation_reference(g, u, activation), *down)


def _specs(layers, As, Bs, scales) -> tuple[LoRASpec, ...]:
    return tuple(LoRASpec(*parts) for parts in zip(layers, As, Bs, scales))


def _down_and_gated_backward(dh, g, u, ma, down: LoRASpec, activation: str, need_dA: bool, need_dB: bool,
                             overwrite: bool = False):
    """Through the down projection and the gated activation: ``(dA_d, dB_d, dg, du)``. ``overwrite``: ``dg``,
    ``du`` are written over ``g``, ``u`` (the caller's are then gone), which keeps three [T, I] tensors alive at
    most instead of four."""
    _, A_d, B_d, scale = down[:4]
    dyB = torch.mm(dh, B_d.to(dh.dtype))
    dB = _scaled_mm(dh.t(), ma, scale, B_d.dtype) if need_dB else None
    m = dA = None
    if need_dA:
        m = _ga._forward(g, u, activation)  # m = act(g) * u, recomputed
        dA = _scaled_mm(dyB.t(), m, scale, A_d.dtype)
    if overwrite:
        m = None  # freed before dm exists
    dm = _input_grad(dh, dyB, down)
    if overwrite:
        out = (g, u)
    else:  # dg over dm; du over m (or a new buffer)
        out = (dm, m if m is not None else new_empty(g.shape, g.dtype, g.device))
    dg, du = _ga._backward(dm, g, u, activation, out=out)
    return dA, dB, dg, du


class _LoRAMLPFunction(torch.autograd.Function):
    """``down(act(gate(x)) * up(x))`` on 2-D ``x``; ``layers`` = the three base layers, ``scales`` their s.

    In a checkpointed layer (:mod:`sloth_core.recompute`) the backward receives the recompute's ``g``, ``u``,
    fresh tensors it alone reads, so it writes ``dg``, ``du`` over them; and where the layer's MLP output feeds
    nothing saved, the recompute does not compute the down projection (only ``ma``, which the backward needs)."""

    @staticmethod
    def forward(ctx, x, A_g, B_g, A_u, B_u, A_d, B_d, layers, scales, activation):
        ctx.layers, ctx.scales, ctx.activation = layers, scales, activation
        ctx.chunked = recompute.mlp_recomputed_in_backward()
        ctx.stashed = None
        if ctx.chunked:  # the backward recomputes g, u chunk by chunk from x
            stash = recompute.mlp_input_stash()
            if stash is None:
                ctx.save_for_backward(x, A_g, B_g, A_u, B_u, A_d, B_d)
            else:  # nothing saved through the checkpoint: this backward runs before the layer's recompute
                ctx.stashed = (None if recompute.recomputing() else stash(x), (A_g, B_g, A_u, B_u, A_d, B_d))
            if recompute.mlp_output_unused():  # the recompute: nothing reads h
                recompute.STATS.mlp_outputs_skipped += 1
                return _unused_output(x, _layer_dims(layers[2])[0])
        gate, up, down = _specs(layers, (A_g, A_u, A_d), (B_g, B_u, B_d), scales)
        xa_g, xa_u = _shared_input_xa(x, (gate.A, up.A))
        g = _base_plus_lora(x, xa_g, gate.base_layer, gate.B, gate.scale)
        u = _base_plus_lora(x, xa_u, up.base_layer, up.B, up.scale)
        if ctx.chunked:  # g, u are not saved: m over g, u freed before the down projection
            m = _ga._forward(g, u, activation, out=g)
            del g, u
        else:
            m = _ga._forward(g, u, activation)
        h, ma = _project(m, down)
        del m
        if not ctx.chunked:
            ctx.save_for_backward(x, g, u, xa_g, xa_u, ma, A_g, B_g, A_u, B_u, A_d, B_d)
            ctx.overwrite_saved = recompute.in_checkpointed_layer()  # the backward gets the recompute's g, u
        return h

    @staticmethod
    def backward(ctx, dh):
        need = ctx.needs_input_grad[:7]
        if ctx.chunked:
            if ctx.stashed is None:
                x, A_g, B_g, A_u, B_u, A_d, B_d = ctx.saved_tensors
            else:
                x, (A_g, B_g, A_u, B_u, A_d, B_d) = ctx.stashed[0].restore(), ctx.stashed[1]
            specs = _specs(ctx.layers, (A_g, A_u, A_d), (B_g, B_u, B_d), ctx.scales)
            with _no_autocast(dh.device.type):
                grads = _chunked_recompute_backward(dh, x, *specs, ctx.activation, need)
            return (*grads, None, None, None)
        x, g, u, xa_g, xa_u, ma, A_g, B_g, A_u, B_u, A_d, B_d = ctx.saved_tensors
        gate, up, down = _specs(ctx.layers, (A_g, A_u, A_d), (B_g, B_u, B_d), ctx.scales)
        with _no_autocast(dh.device.type):
            dA_d, dB_d, dg, du = _down_and_gated_backward(dh, g, u, ma, down, ctx.activation, need[5], need[6],
                                                          overwrite=ctx.overwrite_saved)
            del g, u
            dx, dA_g, dB_g = _project_backward(dg, x, xa_g, gate, (need[0], need[1], need[2]))
            dx, dA_u, dB_u = _project_backward(du, x, xa_u, up, (need[0], need[3], need[4]), accumulate=dx)
        return dx, dA_g, dB_g, dA_u, dB_u, dA_d, dB_d, None, None, None


def _dropout_mlp(x: torch.Tensor, gate: LoRASpec, up: LoRASpec, down: LoRASpec, activation: str) -> torch.Tensor:
    """The MLP with LoRA dropout: each projection's mask is drawn as PEFT draws it, in the order gate, up, down, so
    the three run as :func:`lora_linear` (each with its own mask saved) around the gated-activation kernel, not as
    one function (whose backward recomputes ``g``, ``u`` and reads ``x`` once for both adapters)."""
    g, u = lora_linear(x, *gate), lora_linear(x, *up)
    return lora_linear(_ga.gated_activation(g, u, activation), *down)


def _mlp_dtypes(x: torch.Tensor, gate: LoRASpec, up: LoRASpec, down: LoRASpec):
    """``(compute, output)`` dtypes when the fused MLP can run: gate and up compute and return one dtype that the
    down projection computes in; ``None`` otherwise."""
    first = _fused_dtypes(x, gate)
    if first is None or _fused_dtypes(x, up) != first or first[0] != first[1]:
        return None
    last = _fused_dtypes(x, down, x_dtype=first[1])
    if last is None or last[0] != first[0]:
        return None
    return first[0], last[1]


def lora_mlp(x: torch.Tensor, gate: LoRASpec, up: LoRASpec, down: LoRASpec, activation: str) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` with PEFT LoRA projections, in one autograd function.

    ``x`` [..., H]; ``gate``/``up``: LoRA linears H -> I, ``down``: I -> H (:class:`LoRASpec` each);
    ``activation`` in ``gated_activation.ACTIVATIONS``. Falls back to :func:`lora_mlp_reference`."""
    _ga._check_activation(activation)
    gate, up, down = (LoRASpec(s.base_layer, s.A, s.B, float(s.scale), float(s.dropout)) for s in (gate, up, down))
    _check_spec("gate", gate, x.shape[-1])
    _check_spec("up", up, x.shape[-1])
    if _layer_dims(gate.base_layer)[0] != _layer_dims(up.base_layer)[0]:
        raise ValueError(f"up: out_features {_layer_dims(up.base_layer)[0]} differ from gate's "
                         f"{_layer_dims(gate.base_layer)[0]}")
    _check_spec("down", down, _layer_dims(gate.base_layer)[0])
    dtypes = _mlp_dtypes(x, gate, up, down)
    if dtypes is None or x.numel() == 0:
        return lora_mlp_reference(x, gate, up, down, activation)
    if gate.dropout or up.dropout or down.dropout:
        return _dropout_mlp(x, gate, up, down, activation)
    compute, out = dtypes
    x2 = x.reshape(-1, x.shape[-1]).to(compute)
    layers = (gate.base_layer, up.base_layer, down.base_layer)
    scales = (gate.scale, up.scale, down.scale)
    with _no_autocast(x.device.type):
        h = _LoRAMLPFunction.apply(x2, gate.A, gate.B, up.A, up.B, down.A, down.B, layers, scales, activation)
    return h.reshape(*x.shape[:-1], h.shape[-1]).to(out)
