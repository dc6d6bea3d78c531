"""Rotary position embedding applied to queries and keys in one launch.

Replaces HF's ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``::

    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    q_embed = q * cos + rotate_half(q) * sin          # rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])
    k_embed = k * cos + rotate_half(k) * sin

Layouts: ``unsqueeze_dim=1``: ``q [B, Hq, S, D]``, ``k [B, Hk, S, D]``; ``unsqueeze_dim=2``: ``q [B, S, Hq, D]``,
``k [B, S, Hk, D]``; ``cos``, ``sin``: ``[B or 1, S, D]``. ``Hq != Hk`` (grouped-query attention) is fine.

Forward, per token and head, for each pair ``i < D/2`` with ``x1 = x[i]``, ``x2 = x[i + D/2]``, ``c1 = cos[i]``,
``c2 = cos[i + D/2]``, ``s1 = sin[i]``, ``s2 = sin[i + D/2]``::

    y[i]       = x1 * c1 - x2 * s1
    y[i + D/2] = x2 * c2 + x1 * s2

Backward (the transpose of that linear map), given ``dy``::

    dx[i]       = dy1 * c1 + dy2 * s2
    dx[i + D/2] = dy2 * c2 - dy1 * s1

Both are ``y1 = x1 * c1 - x2 * a``, ``y2 = x2 * c2 + x1 * b`` with ``(a, b) = (s1, s2)`` forward and
``(-s2, -s1)`` backward, so one kernel does both. Nothing assumes ``c1 == c2`` (HF duplicates the halves, but
other rotary variants need not). No gradient is produced for ``cos`` / ``sin``: when they require grad, the
reference path runs so that autograd stays right.

One program handles a block of tokens and a block of head indices, for q's heads and k's heads alike, so q and
k are rotated in one launch (``cos`` / ``sin`` are loaded once per token). ``q`` / ``k`` are read through their
strides (HF passes transposed, non-contiguous views); ``cos`` / ``sin`` through theirs (stride 0 for a batch of
1 or an expanded batch). Outputs have the logical shape of ``q`` / ``k`` and, as HF's elementwise expression
gives, their memory layout (a transposed view of a [B, S, H, D] buffer in, the same out: attention then reads and
returns that layout, and the gradients flow back to the projections without copies), in the dtype HF's
expression would give (``q.dtype`` promoted with ``cos.dtype`` and ``sin.dtype``). Kernels compute in float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sloth_core.autotune import config_for, register_heuristic, register_space
from sloth_core.autotune.space import dtype_from_name, dtype_name, rows_bucket, warps_for
from sloth_core.kernels._runtime import (OP_TAGS, cdiv, interpreting, launch_kernel, new_empty_like, next_power_of_2,
                                         triton_ok)

# --------------------------------------------------------------------------------------------- reference


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's ``apply_rotary_pos_emb``, operation for operation."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (_rotate_half(q) * sin)
    k_embed = (k * cos) + (_rotate_half(k) * sin)
    return q_embed, k_embed


# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _load_halves(ptr, half_offs, half, stride_d, mask):
    """Elements ``[i]`` and ``[i + half]`` of the rows at ``ptr``, as float32."""
    lo = tl.load(ptr + half_offs * stride_d, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(ptr + (half_offs + half) * stride_d, mask=mask, other=0.0).to(tl.float32)
    return lo, hi


@triton.jit
def _rotate_heads(x_ptr, out_ptr, xs_b, xs_s, xs_h, xs_d, os_b, os_s, os_h, os_d,
                  b, s, heads, n_heads, half_offs, half, row_mask, c1, c2, sa, sb):
    """Rotate heads ``heads`` (< ``n_heads``) of tokens ``(b, s)``: ``y1 = x1 c1 - x2 sa``, ``y2 = x2 c2 + x1 sb``."""
    mask = row_mask & (heads < n_heads)
    x1, x2 = _load_halves(x_ptr + b * xs_b + s * xs_s + heads * xs_h, half_offs, half, xs_d, mask)
    out = out_ptr + b * os_b + s * os_s + heads * os_h
    ty = out_ptr.dtype.element_ty
    tl.store(out + half_offs * os_d, (x1 * c1 - x2 * sa).to(ty), mask=mask)
    tl.store(out + (half_offs + half) * os_d, (x2 * c2 + x1 * sb).to(ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
                 n_tokens, seq_len, n_q_heads, n_k_heads, half,
                 qs_b, qs_s, qs_h, qs_d, ks_b, ks_s, ks_h, ks_d,
                 qos_b, qos_s, qos_h, qos_d, kos_b, kos_s, kos_h, kos_d,
                 cs_b, cs_s, cs_d, ss_b, ss_s, ss_d,
                 BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_HALF: tl.constexpr):
    # Block [BLOCK_T tokens, BLOCK_H heads, BLOCK_HALF pairs]; tokens are flattened (batch, seq) indices.
    tok = (tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T))[:, None, None]
    heads = (tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H))[None, :, None]
    half_offs = tl.arange(0, BLOCK_HALF)[None, None, :]
    b = tok // seq_len
    s = tok % seq_len
    row_mask = (tok < n_tokens) & (half_offs < half)

    c1, c2 = _load_halves(cos_ptr + b * cs_b + s * cs_s, half_offs, half, cs_d, row_mask)
    s1, s2 = _load_halves(sin_ptr + b * ss_b + s * ss_s, half_offs, half, ss_d, row_mask)
    if BACKWARD:  # transpose: dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1
        sa = -s2
        sb = -s1
    else:
        sa = s1
        sb = s2
    _rotate_heads(q_ptr, qo_ptr, qs_b, qs_s, qs_h, qs_d, qos_b, qos_s, qos_h, qos_d,
                  b, s, heads, n_q_heads, half_offs, half, row_mask, c1, c2, sa, sb)
    _rotate_heads(k_ptr, ko_ptr, ks_b, ks_s, ks_h, ks_d, kos_b, kos_s, kos_h, kos_d,
                  b, s, heads, n_k_heads, half_offs, half, row_mask, c1, c2, sa, sb)


@register_heuristic("rope")
def rope_heuristic(n_tokens: int, n_heads: int, half: int, dtype: torch.dtype | None = None) -> dict:
    """``BLOCK_HALF`` covers the half head dim; on GPU a program rotates up to 1024 pairs (heads x half) of each
    of up to 4 tokens (the H200's tuned winner for Llama-3-8B's 8192 tokens x 32 heads x 64 pairs, 1.24x faster
    than one token's 2048 pairs a program: benchmarks/results/autotune_h200_20261129.txt);
    under the interpreter, as many tokens as fit in 2^16 pairs."""
    block_half = next_power_of_2(half)
    heads = next_power_of_2(n_heads)
    if interpreting():
        block_t = min(next_power_of_2(n_tokens), max(1, (1 << 16) // (heads * block_half)))
        return {"BLOCK_T": block_t, "BLOCK_H": heads, "BLOCK_HALF": block_half, "num_warps": 1}
    block_h = min(heads, max(1, 1024 // block_half))
    block_t = min(4, next_power_of_2(n_tokens))
    return {"BLOCK_T": block_t, "BLOCK_H": block_h, "BLOCK_HALF": block_half, "num_warps": 4}


def _bshd_shape(x: torch.Tensor, unsqueeze_dim: int) -> tuple[int, int, int, int]:
    """(batch, seq, heads, head_dim) of a 4-D ``q`` / ``k`` in the layout ``unsqueeze_dim`` implies."""
    b, d1, d2, d = x.shape
    return (b, d2, d1, d) if unsqueeze_dim == 1 else (b, d1, d2, d)


def _bshd_strides(x: torch.Tensor, unsqueeze_dim: int) -> tuple[int, int, int, int]:
    sb, s1, s2, sd = x.stride()
    return (sb, s2, s1, sd) if unsqueeze_dim == 1 else (sb, s1, s2, sd)


def _table_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Strides of ``cos`` / ``sin`` ``[B or 1, S, D]``; a batch of 1 broadcasts (stride 0)."""
    sb, ss, sd = t.stride()
    return (0 if t.shape[0] == 1 else sb), ss, sd


def _result_dtype(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.dtype:
    """The dtype HF's ``x * cos + rotate_half(x) * sin`` has."""
    return torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)


def _rope_launch(xq: torch.Tensor, xk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int,
                 out_dtypes: tuple[torch.dtype, torch.dtype], backward: bool):
    """Rotate ``xq`` and ``xk`` (forward) or their gradients (``backward``) in one launch."""
    batch, seq, n_q_heads, head_dim = _bshd_shape(xq, unsqueeze_dim)
    n_k_heads = _bshd_shape(xk, unsqueeze_dim)[2]
    half = head_dim // 2
    out_q = new_empty_like(xq, out_dtypes[0])  # HF's layout: a transposed view in, a transposed output out
    out_k = new_empty_like(xk, out_dtypes[1])
    n_tokens, n_heads = batch * seq, max(n_q_heads, n_k_heads)
    cfg = config_for("rope", n_tokens=n_tokens, n_heads=n_heads, half=half, dtype=xq.dtype)
    if cfg["BLOCK_HALF"] < half:
        raise RuntimeError(f"rope: BLOCK_HALF={cfg['BLOCK_HALF']} must cover half the head dim ({half})")
    grid = (cdiv(n_tokens, cfg["BLOCK_T"]), cdiv(n_heads, cfg["BLOCK_H"]))
    launch_kernel(_rope_kernel, grid,
        xq, xk, out_q, out_k, cos, sin, n_tokens, seq, n_q_heads, n_k_heads, half,
        *_bshd_strides(xq, unsqueeze_dim), *_bshd_strides(xk, unsqueeze_dim),
        *_bshd_strides(out_q, unsqueeze_dim), *_bshd_strides(out_k, unsqueeze_dim),
        *_table_strides(cos), *_table_strides(sin),
        BACKWARD=backward, **cfg)
    return out_q, out_k


class _RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim: int):
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim = unsqueeze_dim
        ctx.input_dtypes = (q.dtype, k.dtype)
        out_dtypes = (_result_dtype(q, cos, sin), _result_dtype(k, cos, sin))
        return _rope_launch(q, k, cos, sin, unsqueeze_dim, out_dtypes, backward=False)

    @staticmethod
    def backward(ctx, dq_embed, dk_embed):
        cos, sin = ctx.saved_tensors
        dq, dk = _rope_launch(dq_embed, dk_embed, cos, sin, ctx.unsqueeze_dim, ctx.input_dtypes, backward=True)
        return dq, dk, None, None, None


# --------------------------------------------------------------------------------------------- torch.compile
# The launch as a custom op, which Dynamo records as one graph node instead of tracing into Triton;
# :func:`apply_rope` calls it only while compiling. The rotation's transpose is the rotation by -angle, so the
# op's gradient is the op itself with ``backward`` flipped (the eager backward's launch).


@torch.library.custom_op("sloth_core::rope", mutates_args=(), tags=OP_TAGS)
def rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int,
            q_dtype: torch.dtype, k_dtype: torch.dtype, backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _rope_launch(q, k, cos, sin, unsqueeze_dim, (q_dtype, k_dtype), backward)


@rope_op.register_fake
def _(q, k, cos, sin, unsqueeze_dim, q_dtype, k_dtype, backward):
    return torch.empty_like(q, dtype=q_dtype), torch.empty_like(k, dtype=k_dtype)  # new_empty_like's layout


def _rope_op_setup(ctx, inputs, output):
    q, k, cos, sin, unsqueeze_dim, _, _, backward = inputs
    ctx.save_for_backward(cos, sin)
    ctx.unsqueeze_dim, ctx.input_dtypes, ctx.backward = unsqueeze_dim, (q.dtype, k.dtype), backward


def _rope_op_backward(ctx, dq_embed, dk_embed):
    cos, sin = ctx.saved_tensors
    dq, dk = rope_op(dq_embed, dk_embed, cos, sin, ctx.unsqueeze_dim, *ctx.input_dtypes, not ctx.backward)
    return dq, dk, None, None, None, None, None, None


rope_op.register_autograd(_rope_op_backward, setup_context=_rope_op_setup)


# --------------------------------------------------------------------------------------------- tuning space
# Tuning key: tokens rounded up to a power of 2, the exact head count and half head dim, the dtype.
# Candidates: 1, 2 or 4 tokens by all heads or half of them (BLOCK_HALF always covers the half head dim),
# blocks of 512-16K pairs, 4-32 pairs a thread. Timed: forward and backward on HF's transposed [B, H, S, D]
# views, with grouped-query attention (a quarter as many k heads) when the head count allows.


def _tuning_key(*, n_tokens: int, n_heads: int, half: int, dtype: torch.dtype | None = None) -> dict:
    return dict(n_tokens=rows_bucket(n_tokens, 4 * n_heads * half), n_heads=n_heads, half=half,
                dtype=dtype_name(dtype))


def _tuning_example(bucket: dict) -> dict:
    return dict(bucket, dtype=dtype_from_name(bucket["dtype"]))


def _tuning_candidates(bucket: dict):
    block_half, heads = next_power_of_2(bucket["half"]), next_power_of_2(bucket["n_heads"])
    for block_h in dict.fromkeys((heads, max(1, heads // 2))):
        for block_t in (1, 2, 4):
            pairs = block_t * block_h * block_half
            if block_t > next_power_of_2(bucket["n_tokens"]) or not 512 <= pairs <= 16384:
                continue
            for num_warps in warps_for(pairs, (2, 4, 8, 16), min_per_thread=4, max_per_thread=32):
                yield dict(BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=num_warps)


def _tuning_inputs(bucket: dict, device: torch.device, gen: torch.Generator) -> dict:
    seq, n_q, half = bucket["n_tokens"], bucket["n_heads"], bucket["half"]
    n_k = n_q // 4 if n_q % 4 == 0 else n_q
    dtype = dtype_from_name(bucket["dtype"])

    def heads(n):  # HF: proj(x).view(B, S, H, D).transpose(1, 2)
        return torch.randn(1, seq, n, 2 * half, device=device, dtype=dtype, generator=gen).transpose(1, 2)

    inv_freq = 1.0 / (10000.0 ** (torch.arange(half, device=device, dtype=torch.float32) / half))
    angles = torch.arange(seq, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)[None]
    return dict(q=heads(n_q), k=heads(n_k), cos=angles.cos().to(dtype), sin=angles.sin().to(dtype),
                dq=heads(n_q).contiguous(), dk=heads(n_k).contiguous())


def _tuning_workspace(bucket: dict) -> int:
    """Bytes a tuning of ``bucket`` allocates: q, k, dq, dk (dq's contiguous copy made beside its source), the
    fp32 angles and their cos / sin, and 4 outputs for the expected ones, a candidate's and the one before it."""
    seq, n_q, half = bucket["n_tokens"], bucket["n_heads"], bucket["half"]
    n_k = n_q // 4 if n_q % 4 == 0 else n_q
    q_bytes, k_bytes = (seq * n * 2 * half * dtype_from_name(bucket["dtype"]).itemsize for n in (n_q, n_k))
    return 8 * (q_bytes + k_bytes) + q_bytes + 48 * seq * half


def _tuning_run(inputs: dict):
    q, k, cos, sin = inputs["q"], inputs["k"], inputs["cos"], inputs["sin"]
    dtypes = (q.dtype, k.dtype)
    q_embed, k_embed = _rope_launch(q, k, cos, sin, 1, dtypes, backward=False)
    dq, dk = _rope_launch(inputs["dq"], inputs["dk"], cos, sin, 1, dtypes, backward=True)
    return q_embed, k_embed, dq, dk


register_space(
    "rope",
    params=dict(BLOCK_T=tuple(1 << i for i in range(17)), BLOCK_H=tuple(1 << i for i in range(11)),
                BLOCK_HALF=tuple(1 << i for i in range(13)), num_warps=(1, 2, 4, 8, 16, 32)),
    key=_tuning_key, example=_tuning_example, candidates=_tuning_candidates,
    make_inputs=_tuning_inputs, run=_tuning_run, workspace=_tuning_workspace,
    worth_tuning=lambda bucket: bucket["n_tokens"] * bucket["n_heads"] * bucket["half"] >= 1 << 18,
)


# --------------------------------------------------------------------------------------------- dispatch


def _unsqueezed_shape(t: torch.Tensor, name: str, unsqueeze_dim: int) -> list[int]:
    if not -(t.dim() + 1) <= unsqueeze_dim <= t.dim():
        raise ValueError(f"rope: unsqueeze_dim={unsqueeze_dim} is out of range for {t.dim()}-D {name}")
    shape = list(t.shape)
    shape.insert(unsqueeze_dim if unsqueeze_dim >= 0 else unsqueeze_dim + t.dim() + 1, 1)
    return shape


def _check_broadcastable(q, k, cos, sin, unsqueeze_dim: int) -> None:
    """ValueError, naming the tensors, where HF's expression itself could not be evaluated."""
    tables = [_unsqueezed_shape(t, name, unsqueeze_dim) for name, t in (("cos", cos), ("sin", sin))]
    for name, x in (("q", q), ("k", k)):
        try:
            torch.broadcast_shapes(x.shape, *tables)
        except RuntimeError:
            raise ValueError(f"rope: {name} of shape {tuple(x.shape)} does not broadcast with cos "
                             f"{tuple(cos.shape)} / sin {tuple(sin.shape)} at unsqueeze_dim={unsqueeze_dim}") from None


def rope_supported(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   unsqueeze_dim: int) -> str | None:
    """None when the Triton path handles these inputs, else the reason it does not."""
    if unsqueeze_dim not in (1, 2):
        return f"unsqueeze_dim={unsqueeze_dim} (only 1 and 2 are handled)"
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.dim() != 3:
        return "q and k must be 4-D and cos, sin 3-D [batch or 1, seq, head_dim]"
    if cos.requires_grad or sin.requires_grad:
        return "cos or sin requires grad (the kernels give no gradient for them)"
    if not triton_ok(q, k, cos, sin) or len({t.device for t in (q, k, cos, sin)}) != 1:
        return "device or dtype not handled by the Triton kernels"
    batch, seq, _, head_dim = _bshd_shape(q, unsqueeze_dim)
    k_batch, k_seq, _, k_head_dim = _bshd_shape(k, unsqueeze_dim)
    if (k_batch, k_seq, k_head_dim) != (batch, seq, head_dim):
        return "q and k differ in batch, seq or head_dim"
    if head_dim % 2:
        return f"odd head_dim {head_dim}"
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape[0] not in (1, batch) or tuple(t.shape[1:]) != (seq, head_dim):
            return f"{name} has shape {tuple(t.shape)}, not [{batch} or 1, {seq}, {head_dim}]"
    if q.numel() == 0 or k.numel() == 0:
        return "empty q or k"
    return None


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for HF's ``apply_rotary_pos_emb`` (autograd-aware): ``(q_embed, k_embed)``. Runs the Triton
    kernel when :func:`rope_supported` allows, else :func:`rope_reference`."""
    _check_broadcastable(q, k, cos, sin, unsqueeze_dim)
    if rope_supported(q, k, cos, sin, unsqueeze_dim) is not None:
        return rope_reference(q, k, cos, sin, unsqueeze_dim)
    if torch.compiler.is_compiling():
        return rope_op(q, k, cos, sin, unsqueeze_dim, _result_dtype(q, cos, sin), _result_dtype(k, cos, sin), False)
    return _RopeFunction.apply(q, k, cos, sin, unsqueeze_dim)
