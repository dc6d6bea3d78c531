"""RMSNorm: ``LlamaRMSNorm`` / ``Qwen3RMSNorm`` / ``MistralRMSNorm`` and ``GemmaRMSNorm`` / ``Gemma2RMSNorm`` /
``Gemma3RMSNorm`` (including Gemma3's and Qwen3's per-head ``q_norm`` / ``k_norm``).

Each row ``x`` (the last dimension, ``N`` wide) is normalized by its root mean square::

    r    = rsqrt(mean(x^2) + eps)          (per row, float32)
    xhat = x * r
    w_eff = offset + w                     (offset = 0 for Llama-style norms, 1 for Gemma's)

The two HF flavours differ only in where they round (``cast``)::

    cast="llama":  out = w_eff * xhat.to(x.dtype)              out dtype = promote_types(w.dtype, x.dtype)
                   (w_eff computed in w.dtype; the product in the promoted dtype)
    cast="gemma":  out = (xhat * (offset + w.float())).to(x.dtype)            out dtype = x.dtype

The kernels compute in float32 and reproduce those roundings (``xhat`` is rounded to ``x.dtype`` before the
weight multiply for ``llama``), so low-precision outputs match HF's to about one ulp.

Backward, given ``dy = dL/dout`` (the intermediate roundings are treated as identities)::

    g  = dy * w_eff
    dx = r * (g - xhat * mean(g * xhat))          (mean over the row)
    dw = sum over rows of dy * xhat

``dw`` is computed only when the weight requires a gradient (LoRA freezes norms; then the reduction is skipped
and ``None`` returned). It is a two-stage reduction: every backward program sums its rows into its own float32
row of a ``[programs, N]`` buffer (no atomics), which is then summed and cast to ``w.dtype``. The forward saves
only ``x`` and the per-row ``r`` (float32), never the normalized output.

Rows may be strided (Gemma3 normalizes a transposed ``[B, H, S, D]`` view): a row's start is computed from up
to three leading (size, stride) levels, so such views are read in place; other layouts are copied. Rows wider
than the heuristic's ``BLOCK_N`` are processed in a loop over column blocks (two passes over the row).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from sloth_core.autotune import config_for, register_heuristic, register_space
from sloth_core.autotune.space import dtype_from_name, dtype_name, rows_bucket, warps_for
from sloth_core import recompute
from sloth_core.kernels._runtime import cdiv, interpreting, new_empty, next_power_of_2, triton_ok

CASTS = ("llama", "gemma")

#: Widest column block on a GPU; wider rows loop over column blocks.
MAX_BLOCK_N = 8192
#: Widest column block under Triton's interpreter (no registers to run out of there).
MAX_BLOCK_N_INTERPRETED = 65536
#: Elements of one [BLOCK_M, BLOCK_N] tile under the interpreter (few, large programs are fast there).
_INTERPRETED_TILE = 1 << 16
#: Elements of one tile on a GPU (a few per thread).
_GPU_TILE = 4096


# --------------------------------------------------------------------------------------------- reference


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, cast: str) -> None:
    if cast not in CASTS:
        raise ValueError(f"rms_norm: unknown cast {cast!r}; expected one of {CASTS}")
    if x.dim() < 1:
        raise ValueError("rms_norm: x must have at least one dimension (the normalized one)")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)} but x has shape {tuple(x.shape)}; "
                         f"weight must be 1-D with x.shape[-1] = {x.shape[-1]} elements")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: weight is on {weight.device} but x is on {x.device}")


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                       cast: str = "llama") -> torch.Tensor:
    """RMSNorm exactly as HF computes it, in the input dtype (see the module docstring).

    The statistics are computed in float32 (float64 when ``x`` is float64, so this doubles as the precise
    reference)."""
    _check_inputs(x, weight, cast)
    compute = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute)
    xhat = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    if cast == "llama":
        w_eff = weight if offset == 0 else offset + weight
        return w_eff * xhat.to(x.dtype)
    return (xhat * (offset + weight.to(compute))).type_as(x)


def _output_dtype(x: torch.Tensor, weight: torch.Tensor, gemma: bool) -> torch.dtype:
    return x.dtype if gemma else torch.promote_types(weight.dtype, x.dtype)


# --------------------------------------------------------------------------------------------- kernels


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


# --------------------------------------------------------------------------------------------- launch


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@register_heuristic("rms_norm")
def rms_norm_heuristic(*, n_rows: int, n_cols: int, dtype: torch.dtype, dw_reduction: bool = False,
                       interpret: bool = False, num_sms: int = 132) -> dict:
    """Launch parameters: ``BLOCK_N`` columns (a power of 2; rows wider than it loop over column blocks),
    ``BLOCK_M`` rows a tile, ``ROWS_PER_PROGRAM`` (a multiple of ``BLOCK_M``) and ``num_warps``.

    GPU: one tile of about ``_GPU_TILE`` elements a program, except that a backward computing dw
    (``dw_reduction``) caps the grid near ``2 * num_sms`` programs so the float32 ``[programs, N]`` partial
    buffer stays small. Interpreter: two large programs."""
    block_n = min(next_power_of_2(n_cols), MAX_BLOCK_N_INTERPRETED if interpret else MAX_BLOCK_N)
    tile = _INTERPRETED_TILE if interpret else _GPU_TILE
    block_m = max(1, min(next_power_of_2(n_rows), tile // block_n, 64))
    n_tiles = cdiv(max(n_rows, 1), block_m)
    if interpret:
        tiles_per_program = cdiv(n_tiles, 2)
    elif dw_reduction:
        tiles_per_program = cdiv(n_tiles, min(n_tiles, 2 * num_sms))
    else:
        tiles_per_program = 1
    num_warps = 1 if interpret else min(16, max(4, block_m * block_n // 512))
    return dict(BLOCK_N=block_n, BLOCK_M=block_m, ROWS_PER_PROGRAM=tiles_per_program * block_m,
                num_warps=num_warps)


def _launch_config(x: torch.Tensor, n_rows: int, n_cols: int, dw_reduction: bool) -> tuple[int, dict]:
    """``(programs, kernel launch kwargs)`` from the ``rms_norm`` heuristic.

    Loop trip counts are compile-time constants (Triton 3.6's interpreter cannot loop to a runtime bound
    under numpy >= 2.4); tiles per program is rounded up to a power of 2 to bound the number of compiled
    variants."""
    interpret = interpreting()
    num_sms = 1 if interpret else _num_sms(x.device.index if x.device.index is not None else 0)
    cfg = config_for("rms_norm", n_rows=n_rows, n_cols=n_cols, dtype=x.dtype, dw_reduction=dw_reduction,
                     interpret=interpret, num_sms=num_sms)
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    if block_n != next_power_of_2(block_n) or block_m != next_power_of_2(block_m):
        raise ValueError(f"rms_norm: heuristic gave BLOCK_M={block_m}, BLOCK_N={block_n}; both must be powers of 2")
    tiles_per_program = next_power_of_2(max(1, cdiv(cfg["ROWS_PER_PROGRAM"], block_m)))
    n_tiles = cdiv(n_rows, block_m)
    tiles_per_program = min(tiles_per_program, next_power_of_2(n_tiles))
    programs = cdiv(n_tiles, tiles_per_program)
    return programs, dict(BLOCK_M=block_m, BLOCK_N=block_n, TILES_PER_PROGRAM=tiles_per_program,
                          COL_BLOCKS=cdiv(n_cols, block_n), num_warps=cfg["num_warps"])


def _row_layout(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int, int]]:
    """``(t', (d1, d2, s0, s1, s2))``: the rows of ``t'`` (all dims but the last, in C order) start at
    ``i0*s0 + i1*s1 + i2*s2`` over leading sizes ``(*, d1, d2)``. ``t'`` is ``t`` itself when its columns are
    unit-strided and its leading dims merge into at most three strided levels, else a contiguous copy."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    levels: list[list[int]] = []
    for size, stride in zip(t.shape[:-1], t.stride()[:-1]):
        if size == 1:
            continue
        if levels and levels[-1][1] == stride * size:
            levels[-1] = [levels[-1][0] * size, stride]
        else:
            levels.append([size, stride])
    if len(levels) > 3:
        t = t.contiguous()
        levels = [[t.numel() // t.shape[-1], t.shape[-1]]]
    while len(levels) < 3:
        levels.insert(0, [1, 0])
    (_, s0), (d1, s1), (d2, s2) = levels
    return t, (d1, d2, s0, s1, s2)


def _forward(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, gemma: bool):
    """``(out, x_read, rstd)``: ``x_read`` is ``x`` or the contiguous copy the kernel read."""
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols
    x, x_layout = _row_layout(x)
    weight = weight.contiguous()
    out = new_empty(x.shape, _output_dtype(x, weight, gemma), x.device)
    rstd = new_empty((n_rows,), torch.float32, x.device)
    programs, launch = _launch_config(x, n_rows, n_cols, dw_reduction=False)
    _rms_norm_fwd_kernel[(programs,)](
        x, weight, out, rstd, n_rows, n_cols, *x_layout, eps, offset, GEMMA=gemma, **launch,
    )
    return out, x, rstd


def _backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float,
              gemma: bool, need_dx: bool, need_dw: bool):
    """``(dx or None, dw or None)``."""
    n_cols = x.shape[-1]
    n_rows = rstd.numel()
    x, x_layout = _row_layout(x)
    dy, dy_layout = _row_layout(dy)
    weight = weight.contiguous()
    programs, launch = _launch_config(x, n_rows, n_cols, dw_reduction=need_dw)
    dx = new_empty(x.shape, x.dtype, x.device) if need_dx else None
    dw_partial = new_empty((programs, n_cols), torch.float32, x.device) if need_dw else None
    _rms_norm_bwd_kernel[(programs,)](
        dy, x, weight, rstd, dx if need_dx else x, dw_partial if need_dw else rstd,
        n_rows, n_cols, *x_layout, *dy_layout, offset,
        GEMMA=gemma, COMPUTE_DX=need_dx, COMPUTE_DW=need_dw, **launch,
    )
    dw = dw_partial.sum(0).to(weight.dtype) if need_dw else None
    return dx, dw


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset, gemma):
        out, x_read, rstd = _forward(x, weight, eps, offset, gemma)
        ctx.offset, ctx.gemma = offset, gemma
        stash = recompute.layer_stash()
        # the norm after the attention (before the MLP) of an offloading layer that keeps it there
        # (memory.stash.LayerStash): its input goes to the layer's host stash and nothing is saved through the
        # checkpoint; the MLP input is this norm recomputed from that copy
        ctx.stashed = stash.after_attention("rms_norm", x_read) if stash is not None else None
        if ctx.stashed is None:
            ctx.save_for_backward(x_read, weight, rstd)
        else:
            ctx.params = (weight, rstd)
            if hasattr(ctx.stashed, "restore"):
                kept = ctx.stashed
                stash.norm_output(out, lambda: _forward(kept.restore(keep=True), weight, eps, offset, gemma)[0])
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        if ctx.stashed is None:
            x, weight, rstd = ctx.saved_tensors
        else:
            (weight, rstd), x = ctx.params, ctx.stashed.restore()
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx, dw = _backward(dy, x, weight, rstd, ctx.offset, ctx.gemma, need_dx, need_dw)
        return dx, dw, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
             cast: str = "llama") -> torch.Tensor:
    """RMSNorm of ``x`` over its last dimension (autograd-aware), computing what :func:`rms_norm_reference`
    computes: Triton kernels where :func:`triton_ok`, the reference otherwise (float64, CPU without the
    interpreter, empty tensors). ``cast`` is ``"llama"`` or ``"gemma"`` (see the module docstring)."""
    _check_inputs(x, weight, cast)
    if x.numel() == 0 or not triton_ok(x, weight):
        return rms_norm_reference(x, weight, eps, offset, cast)
    return _RMSNormFunction.apply(x, weight, float(eps), float(offset), cast == "gemma")


# --------------------------------------------------------------------------------------------- tuning space
# Tuning key: the exact width, the rows rounded up to a power of 2, whether the backward reduces dw, the dtype.
# Candidates: one column block as wide as the row (two halves as well at the widest block), tiles of 1K-16K
# elements, 2-64 elements a thread; a dw backward also tries grids of 1, 2 and 4 programs an SM.


def _current_num_sms() -> int:
    return _num_sms(torch.cuda.current_device()) if torch.cuda.is_available() else 132


def _tuning_key(*, n_rows: int, n_cols: int, dtype: torch.dtype, dw_reduction: bool = False, **_) -> dict:
    return dict(n_cols=n_cols, n_rows=rows_bucket(n_rows, n_cols), dw=int(dw_reduction), dtype=dtype_name(dtype))


def _tuning_example(bucket: dict) -> dict:
    return dict(n_rows=bucket["n_rows"], n_cols=bucket["n_cols"], dtype=dtype_from_name(bucket["dtype"]),
                dw_reduction=bool(bucket["dw"]), interpret=False, num_sms=_current_num_sms())


def _tuning_candidates(bucket: dict):
    n_rows, n_cols, num_sms = bucket["n_rows"], bucket["n_cols"], _current_num_sms()
    widest = min(next_power_of_2(n_cols), MAX_BLOCK_N)
    for block_n in (widest, widest // 2) if widest == MAX_BLOCK_N else (widest,):
        for block_m in (1, 2, 4, 8, 16, 32, 64):
            tile = block_m * block_n
            if not 1024 <= tile <= 16384 or block_m > next_power_of_2(n_rows):
                continue
            n_tiles = cdiv(n_rows, block_m)
            grids = (num_sms, 2 * num_sms, 4 * num_sms) if bucket["dw"] else (n_tiles,)
            for programs in grids:
                rows = block_m * next_power_of_2(cdiv(n_tiles, min(n_tiles, programs)))
                for num_warps in warps_for(tile, (1, 2, 4, 8, 16), min_per_thread=2, max_per_thread=64):
                    yield dict(BLOCK_N=block_n, BLOCK_M=block_m, ROWS_PER_PROGRAM=rows, num_warps=num_warps)


def _tuning_inputs(bucket: dict, device: torch.device, gen: torch.Generator) -> dict:
    n_rows, n_cols, dtype = bucket["n_rows"], bucket["n_cols"], dtype_from_name(bucket["dtype"])
    x = torch.randn(n_rows, n_cols, device=device, generator=gen).to(dtype)
    weight = (1.0 + 0.1 * torch.randn(n_cols, device=device, generator=gen)).to(dtype)
    dy = torch.randn(n_rows, n_cols, device=device, generator=gen).to(dtype)
    rstd = torch.rsqrt(x.float().pow(2).mean(-1) + 1e-6)
    return dict(x=x, weight=weight, dy=dy, rstd=rstd, dw=bool(bucket["dw"]))


def _tuning_run(inputs: dict):
    """dw bucket: the backward computing dx and dw. Otherwise what a LoRA step runs: forward, then the backward
    computing dx only (both use the same launch key)."""
    x, weight, dy = inputs["x"], inputs["weight"], inputs["dy"]
    if inputs["dw"]:
        return _backward(dy, x, weight, inputs["rstd"], 0.0, False, need_dx=True, need_dw=True)
    out, _, rstd = _forward(x, weight, 1e-6, 0.0, False)
    dx, _ = _backward(dy, x, weight, rstd, 0.0, False, need_dx=True, need_dw=False)
    return out, rstd, dx


register_space(
    "rms_norm",
    params=dict(BLOCK_N=tuple(1 << i for i in range(17)), BLOCK_M=(1, 2, 4, 8, 16, 32, 64),
                ROWS_PER_PROGRAM=range(1, 1 << 31), num_warps=(1, 2, 4, 8, 16, 32)),
    key=_tuning_key, example=_tuning_example, candidates=_tuning_candidates,
    make_inputs=_tuning_inputs, run=_tuning_run,
    worth_tuning=lambda bucket: bucket["n_rows"] * bucket["n_cols"] >= 1 << 20,
)
