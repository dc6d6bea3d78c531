"""Gated activation whose inputs carry a low-rank (LoRA) term: the middle of the fused LoRA MLP.

A LoRA gate/up projection is ``g = x W_g^T + s_g (x A_g^T) B_g^T``. Materializing ``g`` costs a write of the
low-rank product over the whole ``[T, I]`` output and a GEMM that reads it back (H200, Llama-3-8B MLP shapes:
``benchmarks/results/lora_gemm_shapes_h200_20261129.txt``). Here the base GEMMs write ``g0 = x W_g^T`` alone,
and the elementwise kernel adds the low-rank term itself, tile by tile (``[BM, r] @ [r, BN]``, a small
``tl.dot`` per tile), where it reads ``g0`` anyway.

With ``L(a, b, s) = s * a @ b^T`` (``a`` [M, r], ``b`` [N, r]), forward::

    g = g0 + L_g,   u = u0 + L_u                       (float32, not rounded: PEFT rounds them once more)
    h = act(g) * u

backward, given ``dh0`` and an optional low-rank term ``L_h`` of the gradient (the down projection's LoRA
part of ``dm = dh W_d + s_d (dh B_d) A_d``: ``a = dh B_d``, ``b = A_d^T``)::

    dh = dh0 + L_h
    dg = dh * u * act'(g),   du = dh * act(g),   and optionally h = act(g) * u

``act`` and ``act'`` are those of :mod:`sloth_core.kernels.gated_activation`. Every term is optional (a term
of ``None`` adds nothing). The low-rank products accumulate in float32 from operands rounded to the dtype (as
cuBLAS multiplies ``a`` and ``b.to(dtype)``), either as ``r`` outer products added in the tile's layout (the
default) or as one ``tl.dot`` per tile (under Triton's interpreter, and for float32, on float32 operands in IEEE
precision: no TF32). :func:`low_rank_add_` adds a term to a tensor in place.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from sloth_core.autotune import config_for, register_heuristic
from sloth_core.kernels._runtime import cdiv, interpreting, new_empty, next_power_of_2
from sloth_core.kernels.gated_activation import _ACTIVATION_IDS, _activation_and_derivative, _check_activation


class LowRank(NamedTuple):
    """The term ``scale * a @ b^T`` of an ``[M, N]`` tensor: ``a`` ``[M, r]``, ``b`` ``[N, r]`` (any strides:
    a LoRA ``B`` [out, r] as it is, a LoRA ``A`` [r, in] as the view ``A.t()``)."""
    a: torch.Tensor
    b: torch.Tensor
    scale: float

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The term as a tensor (float32 accumulation of ``a`` and ``b`` rounded to ``dtype``), for references."""
        a, b = self.a.to(dtype), self.b.to(dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        return (a.to(acc) @ b.to(acc).t()) * self.scale


# --------------------------------------------------------------------------------------------- reference


def _with_term(base: torch.Tensor, term: LowRank | None) -> torch.Tensor:
    if term is None:
        return base
    return (base.to(torch.float32 if base.dtype != torch.float64 else base.dtype) + term.dense(base.dtype)).to(base.dtype)


def gated_lora_reference(gate: torch.Tensor, up: torch.Tensor, activation: str, gate_term: LowRank | None = None,
                         up_term: LowRank | None = None) -> torch.Tensor:
    """``act(gate + L_g) * (up + L_u)`` with the terms materialized in the inputs' dtype, as PEFT materializes
    them (autograd flows into ``gate``, ``up`` and the terms' tensors)."""
    from sloth_core.kernels.gated_activation import gated_activation_reference

    return gated_activation_reference(_with_term(gate, gate_term), _with_term(up, up_term), activation)


# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _load_with_term(ptr, offs, mask, a_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, scale,
                    stride_am, stride_ak, stride_bn, stride_bk, R: tl.constexpr, USE_DOT: tl.constexpr,
                    FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """The tile of ``x + scale * a @ b^T`` in float32 (``x`` alone when the rank ``R`` is 0), the products of
    ``a``, ``b`` rounded to ``x``'s dtype accumulated in float32: with ``USE_DOT`` one ``tl.dot`` over the rank
    (``BLOCK_R >= R``, the padding masked to zero), else ``R`` outer products ``a[:, k] b[:, k]^T`` added
    elementwise in the tile's own layout (no layout conversion; exactly the same sum in order ``k = 0..R-1``)."""
    x = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if R > 0:
        rows_a = a_ptr + offs_m.to(tl.int64) * stride_am
        cols_b = b_ptr + offs_n.to(tl.int64) * stride_bn
        if USE_DOT:
            ks = tl.arange(0, BLOCK_R)
            mask_k = ks < R
            a = tl.load(rows_a[:, None] + ks[None, :] * stride_ak, mask=mask_m[:, None] & mask_k[None, :],
                        other=0.0).to(ptr.dtype.element_ty)
            b = tl.load(cols_b[None, :] + ks[:, None] * stride_bk, mask=mask_k[:, None] & mask_n[None, :],
                        other=0.0).to(ptr.dtype.element_ty)
            if FP32_DOT:
                ab = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            else:
                ab = tl.dot(a, b)
        else:
            ab = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in tl.static_range(R):
                a_k = tl.load(rows_a + k * stride_ak, mask=mask_m, other=0.0).to(ptr.dtype.element_ty)
                b_k = tl.load(cols_b + k * stride_bk, mask=mask_n, other=0.0).to(ptr.dtype.element_ty)
                ab += a_k.to(tl.float32)[:, None] * b_k.to(tl.float32)[None, :]
        x += scale * ab
    return x


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    return offs_m, offs_n, mask_m, mask_n, offs, mask_m[:, None] & mask_n[None, :]


@triton.jit
def _gated_lora_fwd_kernel(g_ptr, u_ptr, h_ptr, ga_ptr, gb_ptr, ua_ptr, ub_ptr, M, N, s_g, s_u,
                           sga_m, sga_k, sgb_n, sgb_k, sua_m, sua_k, sub_n, sub_k,
                           ACT: tl.constexpr, R_G: tl.constexpr, R_U: tl.constexpr, USE_DOT: tl.constexpr,
                           FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_R: tl.constexpr):
    offs_m, offs_n, mask_m, mask_n, offs, mask = _tile(M, N, BLOCK_M, BLOCK_N)
    g = _load_with_term(g_ptr, offs, mask, ga_ptr, gb_ptr, offs_m, offs_n, mask_m, mask_n, s_g,
                        sga_m, sga_k, sgb_n, sgb_k, R_G, USE_DOT, FP32_DOT, BLOCK_M, BLOCK_N, BLOCK_R)
    u = _load_with_term(u_ptr, offs, mask, ua_ptr, ub_ptr, offs_m, offs_n, mask_m, mask_n, s_u,
                        sua_m, sua_k, sub_n, sub_k, R_U, USE_DOT, FP32_DOT, BLOCK_M, BLOCK_N, BLOCK_R)
    a, _ = _activation_and_derivative(g, ACT)
    tl.store(h_ptr + offs, (a * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_lora_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, h_ptr,
                           ga_ptr, gb_ptr, ua_ptr, ub_ptr, ha_ptr, hb_ptr, M, N, s_g, s_u, s_h,
                           sga_m, sga_k, sgb_n, sgb_k, sua_m, sua_k, sub_n, sub_k, sha_m, sha_k, shb_n, shb_k,
                           ACT: tl.constexpr, R_G: tl.constexpr, R_U: tl.constexpr, R_H: tl.constexpr,
                           WRITE_H: tl.constexpr, USE_DOT: tl.constexpr, FP32_DOT: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    offs_m, offs_n, mask_m, mask_n, offs, mask = _tile(M, N, BLOCK_M, BLOCK_N)
    dh = _load_with_term(dh_ptr, offs, mask, ha_ptr, hb_ptr, offs_m, offs_n, mask_m, mask_n, s_h,
                         sha_m, sha_k, shb_n, shb_k, R_H, USE_DOT, FP32_DOT, BLOCK_M, BLOCK_N, BLOCK_R)
    g = _load_with_term(g_ptr, offs, mask, ga_ptr, gb_ptr, offs_m, offs_n, mask_m, mask_n, s_g,
                        sga_m, sga_k, sgb_n, sgb_k, R_G, USE_DOT, FP32_DOT, BLOCK_M, BLOCK_N, BLOCK_R)
    u = _load_with_term(u_ptr, offs, mask, ua_ptr, ub_ptr, offs_m, offs_n, mask_m, mask_n, s_u,
                        sua_m, sua_k, sub_n, sub_k, R_U, USE_DOT, FP32_DOT, BLOCK_M, BLOCK_N, BLOCK_R)
    a, da = _activation_and_derivative(g, ACT)
    tl.store(dg_ptr + offs, (dh * u * da).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, (dh * a).to(du_ptr.dtype.element_ty), mask=mask)
    if WRITE_H:
        tl.store(h_ptr + offs, (a * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _low_rank_add_kernel(y_ptr, a_ptr, b_ptr, M, N, scale, sa_m, sa_k, sb_n, sb_k, R: tl.constexpr,
                         USE_DOT: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    offs_m, offs_n, mask_m, mask_n, offs, mask = _tile(M, N, BLOCK_M, BLOCK_N)
    y = _load_with_term(y_ptr, offs, mask, a_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, scale,
                        sa_m, sa_k, sb_n, sb_k, R, USE_DOT, FP32_DOT, BLOCK_M, BLOCK_N, BLOCK_R)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------- launchers


@register_heuristic("gated_lora")
def gated_lora_heuristic(M: int, N: int, r: int, dtype: torch.dtype | None = None) -> dict:
    """2-D tiles of a memory-bound kernel; ``USE_DOT``: the low-rank product by ``tl.dot`` (which needs 16 rows
    and columns at least) or by outer products. Under the interpreter, few large programs."""
    if interpreting():
        return {"BLOCK_M": max(16, min(next_power_of_2(M), 64)), "BLOCK_N": max(16, min(next_power_of_2(N), 128)),
                "USE_DOT": 0, "num_warps": 1}
    return {"BLOCK_M": 32, "BLOCK_N": 128, "USE_DOT": 0, "num_warps": 4}


def _term_args(term: LowRank | None, ref: torch.Tensor, M: int, N: int, name: str):
    """``(a, b, r, scale, a strides, b strides)`` of a term (placeholders and rank 0 without one), checked
    against the ``[M, N]`` tensor it adds to."""
    if term is None:
        return (ref, ref, 0, 0.0, 0, 0, 0, 0)
    a, b, scale = term
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != M or b.shape[0] != N or a.shape[1] != b.shape[1]:
        raise ValueError(f"gated_lora: {name} term a {tuple(a.shape)}, b {tuple(b.shape)} does not fit "
                         f"[{M}, {N}] (expected a [{M}, r], b [{N}, r])")
    if a.device != ref.device or b.device != ref.device:
        raise ValueError(f"gated_lora: {name} term lives on {a.device}/{b.device}, the tensors on {ref.device}")
    return (a, b, a.shape[1], float(scale), *a.stride(), *b.stride())


def _launch(ref: torch.Tensor, terms):
    M, N = ref.shape
    rank = max((t.a.shape[1] for t in terms if t is not None), default=0)
    cfg = config_for("gated_lora", M=M, N=N, r=rank, dtype=ref.dtype)
    grid = (cdiv(M, cfg["BLOCK_M"]), cdiv(N, cfg["BLOCK_N"]))
    cfg["BLOCK_R"] = max(16, next_power_of_2(rank))  # the whole rank in one tl.dot (16: its smallest K)
    cfg["USE_DOT"] = bool(cfg["USE_DOT"])
    fp32_dot = interpreting() or ref.dtype == torch.float32
    return grid, cfg, fp32_dot


def _check(tensors, names):
    ref = tensors[0]
    if ref.dim() != 2:
        raise ValueError(f"gated_lora: {names[0]} must be 2-D [M, N], got shape {tuple(ref.shape)}")
    for t, name in zip(tensors, names):
        if t.shape != ref.shape or t.dtype != ref.dtype or not t.is_contiguous():
            raise ValueError(f"gated_lora: {name} must be a contiguous {ref.dtype} tensor of shape "
                             f"{tuple(ref.shape)}, got {t.dtype} {tuple(t.shape)} (contiguous: {t.is_contiguous()})")


def gated_lora_forward(gate: torch.Tensor, up: torch.Tensor, activation: str, gate_term: LowRank | None = None,
                       up_term: LowRank | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``act(gate + L_g) * (up + L_u)`` of contiguous 2-D ``[M, N]`` tensors, into a new tensor or
    into ``out`` (which may be ``gate`` or ``up``: each element is read by the program that writes it first)."""
    _check_activation(activation)
    h = new_empty(gate.shape, gate.dtype, gate.device) if out is None else out
    _check((gate, up, h), ("gate", "up", "out"))
    M, N = gate.shape
    if gate.numel() == 0:
        return h
    grid, cfg, fp32_dot = _launch(gate, (gate_term, up_term))
    ga_, gb_, r_g, s_g, *g_strides = _term_args(gate_term, gate, M, N, "gate")
    ua_, ub_, r_u, s_u, *u_strides = _term_args(up_term, gate, M, N, "up")
    _gated_lora_fwd_kernel[grid](gate, up, h, ga_, gb_, ua_, ub_, M, N, s_g, s_u, *g_strides, *u_strides,
                                 ACT=_ACTIVATION_IDS[activation], R_G=r_g, R_U=r_u, FP32_DOT=fp32_dot, **cfg)
    return h


def gated_lora_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str,
                        gate_term: LowRank | None = None, up_term: LowRank | None = None,
                        dh_term: LowRank | None = None, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                        h_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dg, du)`` of :func:`gated_lora_forward` given ``dh + L_h`` (module docstring), into new tensors
    or ``out``; with ``h_out`` the forward's ``h`` too. ``out`` and ``h_out`` may alias ``dh``, ``gate``, ``up``
    (each element is read by the program that writes it first)."""
    _check_activation(activation)
    if out is None:
        out = new_empty(gate.shape, gate.dtype, gate.device), new_empty(gate.shape, gate.dtype, gate.device)
    dg, du = out
    tensors = (dh, gate, up, dg, du) + (() if h_out is None else (h_out,))
    _check(tensors, ("dh", "gate", "up", "dg", "du", "h_out"))
    M, N = gate.shape
    if gate.numel() == 0:
        return dg, du
    grid, cfg, fp32_dot = _launch(gate, (gate_term, up_term, dh_term))
    ga_, gb_, r_g, s_g, *g_strides = _term_args(gate_term, gate, M, N, "gate")
    ua_, ub_, r_u, s_u, *u_strides = _term_args(up_term, gate, M, N, "up")
    ha_, hb_, r_h, s_h, *h_strides = _term_args(dh_term, gate, M, N, "dh")
    _gated_lora_bwd_kernel[grid](dh, gate, up, dg, du, dg if h_out is None else h_out, ga_, gb_, ua_, ub_, ha_, hb_,
                                 M, N, s_g, s_u, s_h, *g_strides, *u_strides, *h_strides,
                                 ACT=_ACTIVATION_IDS[activation], R_G=r_g, R_U=r_u, R_H=r_h,
                                 WRITE_H=h_out is not None, FP32_DOT=fp32_dot, **cfg)
    return dg, du


def low_rank_add_(y: torch.Tensor, term: LowRank) -> torch.Tensor:
    """``y += scale * a @ b^T`` in place (float32 sum, one rounding) for a contiguous 2-D ``y``: one read and one
    write of ``y``."""
    _check((y,), ("y",))
    M, N = y.shape
    if y.numel() == 0:
        return y
    grid, cfg, fp32_dot = _launch(y, (term,))
    a, b, r, scale, *strides = _term_args(term, y, M, N, "y")
    _low_rank_add_kernel[grid](y, a, b, M, N, scale, *strides, R=r, FP32_DOT=fp32_dot, **cfg)
    return y
