"""Launching the RMSNorm kernels (:mod:`sloth_core.kernels.rms_norm_kernels`): the heuristic and tuning space of
their launch parameters, the row layout of strided inputs, and the forward and backward launches."""
from __future__ import annotations

import functools

import torch

from sloth_core.autotune import config_for, register_heuristic, register_space
from sloth_core.autotune.space import dtype_from_name, dtype_name, rows_bucket, warps_for
from sloth_core.kernels._runtime import OP_TAGS, cdiv, interpreting, launch_kernel, new_empty, next_power_of_2
from sloth_core.kernels.rms_norm_kernels import _rms_norm_bwd_kernel, _rms_norm_fwd_kernel

#: Widest column block on a GPU; wider rows loop over column blocks.
MAX_BLOCK_N = 8192
#: Widest column block under Triton's interpreter (no registers to run out of there).
MAX_BLOCK_N_INTERPRETED = 65536
#: Elements of one [BLOCK_M, BLOCK_N] tile under the interpreter (few, large programs are fast there).
_INTERPRETED_TILE = 1 << 16
#: Elements of one tile on a GPU (a few per thread).
_GPU_TILE = 4096


def _output_dtype(x: torch.Tensor, weight: torch.Tensor, gemma: bool) -> torch.dtype:
    return x.dtype if gemma else torch.promote_types(weight.dtype, x.dtype)


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
    launch_kernel(_rms_norm_fwd_kernel, (programs,),
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
    launch_kernel(_rms_norm_bwd_kernel, (programs,),
        dy, x, weight, rstd, dx if need_dx else x, dw_partial if need_dw else rstd,
        n_rows, n_cols, *x_layout, *dy_layout, offset,
        GEMMA=gemma, COMPUTE_DX=need_dx, COMPUTE_DW=need_dw, **launch,
    )
    dw = dw_partial.sum(0).to(weight.dtype) if need_dw else None
    return dx, dw


# --------------------------------------------------------------------------------------------- torch.compile
# The launches as custom ops (``torch.ops.sloth_core.*``), which Dynamo records as single graph nodes instead of
# tracing into Triton; :func:`sloth_core.kernels.rms_norm.rms_norm` calls the forward op (differentiable through
# the backward op) only while compiling, and the autograd function of the eager path otherwise.
# Ops may not return their inputs: the forward returns ``(out, rstd)`` (the backward reads ``x`` again) and the
# backward an empty tensor for a gradient it was not asked for.


@torch.library.custom_op("sloth_core::rms_norm_fwd", mutates_args=(), tags=OP_TAGS)
def rms_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                    gemma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out, _, rstd = _forward(x, weight, eps, offset, gemma)
    return out, rstd


@rms_norm_fwd_op.register_fake
def _(x, weight, eps, offset, gemma):
    return (x.new_empty(x.shape, dtype=_output_dtype(x, weight, gemma)),
            x.new_empty((x.numel() // x.shape[-1],), dtype=torch.float32))


@torch.library.custom_op("sloth_core::rms_norm_bwd", mutates_args=(), tags=OP_TAGS)
def rms_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float,
                    gemma: bool, need_dx: bool, need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dw = _backward(dy, x, weight, rstd, offset, gemma, need_dx, need_dw)
    return (x.new_empty(0) if dx is None else dx), (weight.new_empty(0) if dw is None else dw)


@rms_norm_bwd_op.register_fake
def _(dy, x, weight, rstd, offset, gemma, need_dx, need_dw):
    return x.new_empty(x.shape if need_dx else (0,)), weight.new_empty(weight.shape if need_dw else (0,))


def _fwd_op_setup(ctx, inputs, output):
    x, weight, _, offset, gemma = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.offset, ctx.gemma = offset, gemma


def _fwd_op_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = rms_norm_bwd_op(dy, x, weight, rstd, ctx.offset, ctx.gemma, need_dx, need_dw)
    return (dx if need_dx else None), (dw if need_dw else None), None, None, None


rms_norm_fwd_op.register_autograd(_fwd_op_backward, setup_context=_fwd_op_setup)


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
    x = torch.randn(n_rows, n_cols, device=device, dtype=dtype, generator=gen)
    weight = (1.0 + 0.1 * torch.randn(n_cols, device=device, generator=gen)).to(dtype)
    dy = torch.randn(n_rows, n_cols, device=device, dtype=dtype, generator=gen)
    # mean of squares in float32 without a float32 copy of x (the reduction upcasts as it reads)
    rstd = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).square() / n_cols + 1e-6)
    return dict(x=x, weight=weight, dy=dy, rstd=rstd, dw=bool(bucket["dw"]))


def _tuning_workspace(bucket: dict) -> int:
    """Bytes a tuning of ``bucket`` allocates: x, dy, the weight and rstd; 3 sets of outputs (the expected ones, a
    candidate's, the one before it: out, rstd and dx; dx and the float32 dw partial sums for a dw bucket)."""
    n_rows, n_cols = bucket["n_rows"], bucket["n_cols"]
    elem = dtype_from_name(bucket["dtype"]).itemsize
    return n_rows * n_cols * (8 * elem + (12 if bucket["dw"] else 0)) + 24 * n_rows + 16 * n_cols


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
    make_inputs=_tuning_inputs, run=_tuning_run, workspace=_tuning_workspace,
    worth_tuning=lambda bucket: bucket["n_rows"] * bucket["n_cols"] >= 1 << 20,
)
