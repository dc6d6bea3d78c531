"""The Triton forward and backward kernels of RMSNorm (the math and the roundings: :mod:`sloth_core.kernels.rms_norm`;
their launch: :mod:`sloth_core.kernels.rms_norm_launch`)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row_starts(rows, d1, d2, s0, s1, s2):
    """Offsets (int64) of the first element of each row; row ``r`` is ``(i0, i1, i2)`` in C order over
    leading sizes ``(*, d1, d2)`` with strides ``(s0, s1, s2)``. The index arithmetic is int32 (row counts
    fit), only the offsets are int64."""
    i2 = rows % d2
    r = rows // d2
    i1 = r % d1
    i0 = r // d1
    return i0.to(tl.int64) * s0 + i1.to(tl.int64) * s1 + i2.to(tl.int64) * s2


@triton.jit
def _load_tile(ptr, row_starts, row_mask, cols, n_cols):
    """A [BLOCK_M, BLOCK_N] tile of rows (columns ``cols``), upcast to float32, zero outside."""
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    return tl.load(ptr + row_starts[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, row_starts, row_mask, cols, n_cols, value):
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    tl.store(ptr + row_starts[:, None] + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _effective_weight(w_ptr, cols, n_cols, offset, GEMMA: tl.constexpr):
    """``offset + w`` in float32; for llama rounded to ``w.dtype`` first, as HF adds in the weight's dtype."""
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    w_eff = w + offset
    if not GEMMA:
        w_eff = w_eff.to(w_ptr.dtype.element_ty).to(tl.float32)
    return w_eff


@triton.jit
def _normalized(x, rstd, w_eff, X_DTYPE: tl.constexpr, GEMMA: tl.constexpr):
    """The forward output (float32, before the final rounding on store) of a tile."""
    xhat = x * rstd[:, None]
    if not GEMMA:
        xhat = xhat.to(X_DTYPE).to(tl.float32)
    return xhat * w_eff[None, :]


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, out_ptr, rstd_ptr,
    n_rows, n_cols,
    x_d1, x_d2, x_s0, x_s1, x_s2,
    eps, offset,
    GEMMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TILES_PER_PROGRAM: tl.constexpr, COL_BLOCKS: tl.constexpr,
):
    pid = tl.program_id(0)
    x_dtype = x_ptr.dtype.element_ty
    block_rows = tl.arange(0, BLOCK_M)
    block_cols = tl.arange(0, BLOCK_N)
    for t in range(0, TILES_PER_PROGRAM):
        rows = (pid * TILES_PER_PROGRAM + t) * BLOCK_M + block_rows
        row_mask = rows < n_rows
        x_starts = _row_starts(rows, x_d1, x_d2, x_s0, x_s1, x_s2)
        out_starts = rows.to(tl.int64) * n_cols
        if COL_BLOCKS == 1:
            x = _load_tile(x_ptr, x_starts, row_mask, block_cols, n_cols)
            sum_sq = tl.sum(x * x, axis=1)
        else:
            sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
            for c0 in range(0, COL_BLOCKS * BLOCK_N, BLOCK_N):
                xc = _load_tile(x_ptr, x_starts, row_mask, c0 + block_cols, n_cols)
                sum_sq += tl.sum(xc * xc, axis=1)
        rstd = tl.rsqrt(sum_sq / n_cols + eps)
        tl.store(rstd_ptr + rows, rstd, mask=row_mask)
        if COL_BLOCKS == 1:
            w_eff = _effective_weight(w_ptr, block_cols, n_cols, offset, GEMMA)
            _store_tile(out_ptr, out_starts, row_mask, block_cols, n_cols,
                        _normalized(x, rstd, w_eff, x_dtype, GEMMA))
        else:
            for c0 in range(0, COL_BLOCKS * BLOCK_N, BLOCK_N):
                cols = c0 + block_cols
                xc = _load_tile(x_ptr, x_starts, row_mask, cols, n_cols)
                w_eff = _effective_weight(w_ptr, cols, n_cols, offset, GEMMA)
                _store_tile(out_ptr, out_starts, row_mask, cols, n_cols,
                            _normalized(xc, rstd, w_eff, x_dtype, GEMMA))


@triton.jit
def _grad_terms(dy_ptr, dy_starts, x_ptr, x_starts, row_mask, rstd, w_ptr, cols, n_cols, offset,
                GEMMA: tl.constexpr):
    """``(dy, xhat, g = dy * w_eff)`` for a tile, in float32."""
    dy = _load_tile(dy_ptr, dy_starts, row_mask, cols, n_cols)
    xhat = _load_tile(x_ptr, x_starts, row_mask, cols, n_cols) * rstd[:, None]
    w_eff = _effective_weight(w_ptr, cols, n_cols, offset, GEMMA)
    return dy, xhat, dy * w_eff[None, :]


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
    n_rows, n_cols,
    x_d1, x_d2, x_s0, x_s1, x_s2,
    dy_d1, dy_d2, dy_s0, dy_s1, dy_s2,
    offset,
    GEMMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TILES_PER_PROGRAM: tl.constexpr, COL_BLOCKS: tl.constexpr,
    COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr,
):
    """dx = r * (g - xhat * mean(g * xhat)); this program's partial sum of dy * xhat over its rows goes to
    row ``pid`` of ``dw_partial`` (float32, [programs, n_cols])."""
    pid = tl.program_id(0)
    block_rows = tl.arange(0, BLOCK_M)
    block_cols = tl.arange(0, BLOCK_N)
    dw_starts = tl.zeros([1], dtype=tl.int64) + pid.to(tl.int64) * n_cols
    dw_mask = tl.full([1], 1, tl.int1)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for t in range(0, TILES_PER_PROGRAM):
        rows = (pid * TILES_PER_PROGRAM + t) * BLOCK_M + block_rows
        row_mask = rows < n_rows
        x_starts = _row_starts(rows, x_d1, x_d2, x_s0, x_s1, x_s2)
        dy_starts = _row_starts(rows, dy_d1, dy_d2, dy_s0, dy_s1, dy_s2)
        dx_starts = rows.to(tl.int64) * n_cols
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        if COL_BLOCKS == 1:
            dy, xhat, g = _grad_terms(dy_ptr, dy_starts, x_ptr, x_starts, row_mask, rstd, w_ptr,
                                      block_cols, n_cols, offset, GEMMA)
            if COMPUTE_DX:
                mean_gx = tl.sum(g * xhat, axis=1) / n_cols
                _store_tile(dx_ptr, dx_starts, row_mask, block_cols, n_cols,
                            rstd[:, None] * (g - xhat * mean_gx[:, None]))
            if COMPUTE_DW:
                dw_acc += tl.sum(dy * xhat, axis=0)
        else:
            mean_gx = tl.zeros([BLOCK_M], dtype=tl.float32)
            if COMPUTE_DX:
                for c0 in range(0, COL_BLOCKS * BLOCK_N, BLOCK_N):
                    dy, xhat, g = _grad_terms(dy_ptr, dy_starts, x_ptr, x_starts, row_mask, rstd, w_ptr,
                                              c0 + block_cols, n_cols, offset, GEMMA)
                    mean_gx += tl.sum(g * xhat, axis=1)
                mean_gx = mean_gx / n_cols
            for c0 in range(0, COL_BLOCKS * BLOCK_N, BLOCK_N):
                cols = c0 + block_cols
                dy, xhat, g = _grad_terms(dy_ptr, dy_starts, x_ptr, x_starts, row_mask, rstd, w_ptr,
                                          cols, n_cols, offset, GEMMA)
                if COMPUTE_DX:
                    _store_tile(dx_ptr, dx_starts, row_mask, cols, n_cols,
                                rstd[:, None] * (g - xhat * mean_gx[:, None]))
                if COMPUTE_DW:
                    # This program owns its partial row: the first tile writes it, later tiles add to it.
                    previous = _load_tile(dw_partial_ptr, dw_starts, dw_mask & (t > 0), cols, n_cols)
                    _store_tile(dw_partial_ptr, dw_starts, dw_mask, cols, n_cols,
                                previous + tl.sum(dy * xhat, axis=0)[None, :])
    if COL_BLOCKS == 1 and COMPUTE_DW:
        _store_tile(dw_partial_ptr, dw_starts, dw_mask, block_cols, n_cols, dw_acc[None, :])
