"""The q, k, v LoRA linears of an attention on one input as one autograd function, and its reference.

q, k, v on one input (:func:`lora_qkv`), adapters ``A_j`` [r_j, H], ``B_j`` [out_j, r_j], ``j`` in q, k, v::

    xa  = x [A_q; A_k; A_v]^T                              [T, r_q + r_k + r_v]   (x read once)
    y_j = x W_j^T + b_j + s_j xa_j B_j^T                    (xa_j: the columns of adapter j)
    G   = [dy_q B_q | dy_k B_k | dy_v B_v]                  [T, sum r]   (zero columns for an unused output)
    dx  = sum_j dy_j W_j + G [s_q A_q; s_k A_k; s_v A_v]     (one GEMM for the three LoRA terms)
    dA  = G^T x, split by rows: dA_j = s_j (G^T x)_j        (x read once)
    dB_j = s_j dy_j^T xa_j

Each output equals :func:`lora_linear.lora_linear` of its projection (precision, dtypes and dispatch as there).
"""
from __future__ import annotations

import torch

from sloth_core import recompute
from sloth_core.kernels.lora_base import LoRASpec, _check_spec, _fused_dtypes
from sloth_core.kernels.lora_gemm import (_base_input_grad, _base_plus_lora, _mm_to, _no_autocast, _rank_slices,
                                          _scaled_mm, _shared_input_xa)
from sloth_core.kernels.lora_linear import lora_linear, lora_linear_reference


def lora_qkv_reference(x: torch.Tensor, q: LoRASpec, k: LoRASpec, v: LoRASpec) -> tuple[torch.Tensor, ...]:
    """PEFT's three LoRA layers on the same input."""
    return tuple(lora_linear_reference(x, *spec) for spec in (q, k, v))


class _LoRAQKVFunction(torch.autograd.Function):
    """The LoRA linears of q, k, v on one 2-D input ``x`` (:func:`lora_qkv`): three outputs, one node."""

    @staticmethod
    def forward(ctx, x, A_q, B_q, A_k, B_k, A_v, B_v, layers, scales):
        As, Bs = (A_q, A_k, A_v), (B_q, B_k, B_v)
        # [T, r] each from one GEMM (x read once), made contiguous (cuBLAS-friendly, tiny)
        xas = [xa.contiguous() for xa in _shared_input_xa(x, As)]
        # In an offloading layer keeping q/k/v outputs (its checkpointing mode): the first forward's outputs
        # go to host memory, and the recompute (whose x is bitwise the first forward's) takes them back instead of
        # running the three projections again; it saves the same tensors.
        stash = recompute.layer_stash()
        slot = stash.qkv_slot() if stash is not None else None
        outs = stash.kept_qkv(slot) if slot is not None else None
        if outs is None:
            outs = tuple(_base_plus_lora(x, xa_j, layer, B, scale)
                         for layer, B, scale, xa_j in zip(layers, Bs, scales, xas))
            if slot is not None:
                stash.keep_qkv(slot, outs)
        ctx.save_for_backward(x, *xas, *As, *Bs)
        ctx.layers, ctx.scales = layers, scales
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None (no zero [T, out] tensor)
        return outs

    @staticmethod
    def backward(ctx, *dys):
        x, *rest = ctx.saved_tensors
        xas, As, Bs = rest[:3], rest[3:6], rest[6:]
        need_dx, need = ctx.needs_input_grad[0], ctx.needs_input_grad[1:7]
        with _no_autocast(x.device.type):
            grads = _qkv_backward(dys, x, xas, As, Bs, ctx.layers, ctx.scales, need_dx, need)
        return (*grads, None, None)


def _qkv_backward(dys, x, xas, As, Bs, layers, scales, need_dx: bool, need):
    """``(dx, dA_q, dB_q, dA_k, dB_k, dA_v, dB_v)``: ``G = [dy_q B_q | dy_k B_k | dy_v B_v]`` ([T, sum r], zero
    where an output got no gradient), ``dx = sum dy_j W_j + G [s_q A_q; s_k A_k; s_v A_v]`` (one LoRA GEMM),
    ``dA = G^T x`` once, split and scaled per adapter, ``dB_j = s_j dy_j^T xa_j``."""
    dtype = x.dtype
    G = torch.cat([torch.mm(dy, B.to(dtype)) if dy is not None else x.new_zeros((x.shape[0], B.shape[1]))
                   for dy, B in zip(dys, Bs)], dim=1)
    dx = None
    if need_dx:  # the LoRA terms first, the base GEMMs adding into them (as _base_plus_lora)
        dx = torch.mm(G, torch.cat([(A.float() * s).to(dtype) for A, s in zip(As, scales)]))
        for dy, layer in zip(dys, layers):
            if dy is not None:
                dx = _base_input_grad(dy, layer, dx)
    dA_all = _mm_to(G.t(), x, torch.float32) if any(need[0::2]) else None  # [sum r, H], x read once
    grads = []
    for j, (dy, xa, A, B, scale, cols) in enumerate(zip(dys, xas, As, Bs, scales, _rank_slices(As))):
        used = dy is not None  # an unused output gives its adapter no gradient, as in PEFT
        grads.append((dA_all[cols] * scale).to(A.dtype) if need[2 * j] and used else None)
        grads.append(_scaled_mm(dy.t(), xa, scale, B.dtype) if need[2 * j + 1] and used else None)
    return (dx, *grads)


def lora_qkv(x: torch.Tensor, q: LoRASpec, k: LoRASpec, v: LoRASpec) -> tuple[torch.Tensor, ...]:
    """The q, k, v LoRA linears of an attention on the same ``x`` [..., H], in one autograd function: ``x`` is
    read once for the three ``x A^T`` (concatenated adapters), and the backward reads it once for the three
    ``dA`` and adds the three LoRA input-gradient terms with one GEMM. Each output equals :func:`lora_linear` of
    its projection (same roundings, up to the rounding of ``s A`` in the input gradient). When the three cannot
    run fused together (a reference-path projection, different compute/output dtypes, or LoRA dropout: PEFT draws
    one mask per projection, so the three ``x A^T`` no longer share their input) each runs :func:`lora_linear` on
    its own, in the order q, k, v (the order PEFT draws the masks in)."""
    specs = tuple(LoRASpec(sp.base_layer, sp.A, sp.B, float(sp.scale), float(sp.dropout)) for sp in (q, k, v))
    for name, spec in zip(("q", "k", "v"), specs):
        _check_spec(name, spec, x.shape[-1])
    dtypes = [_fused_dtypes(x, spec) for spec in specs]
    if dtypes[0] is None or any(d != dtypes[0] for d in dtypes) or x.numel() == 0 or any(sp.dropout for sp in specs):
        return tuple(lora_linear(x, *spec) for spec in specs)
    compute, out = dtypes[0]
    x2 = x.reshape(-1, x.shape[-1]).to(compute)
    params = [t for spec in specs for t in (spec.A, spec.B)]
    with _no_autocast(x.device.type):
        ys = _LoRAQKVFunction.apply(x2, *params, tuple(sp.base_layer for sp in specs),
                                    tuple(sp.scale for sp in specs))
    return tuple(y.reshape(*x.shape[:-1], y.shape[-1]).to(out) for y in ys)
