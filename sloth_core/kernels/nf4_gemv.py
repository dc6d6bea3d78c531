"""Fused dequantize-GEMV for bitsandbytes 4-bit weights: ``y = x @ dequant(W)^T`` for a few rows of ``x`` (decoding).

``x`` [M, K] (M = 1 .. :data:`MAX_ROWS`: the tokens of one decoding step), ``W`` [N, K] stored as bitsandbytes'
``Params4bit`` (NF4 / FP4 codes, two a byte, float32 or double-quantized absmax; the storage is described in
:mod:`sloth_core.kernels.dequant`). A program reads the packed codes of a ``[BLOCK_N, BLOCK_K]`` tile of ``W`` at a
time, dequantizes them in registers and multiplies them with every row of ``x``: the dequantized weight is never
written to memory (a decoding step reads ~0.56 bytes a weight instead of dequantizing 2 bytes a weight into a
buffer and reading them back). Rows of ``W`` are split over programs (``BLOCK_N`` a program), and ``K`` over
``SPLIT_K`` programs when there are too few rows to fill the GPU; partial sums of a split go to a float32
``[SPLIT_K, M, N]`` buffer that torch adds up.

Numerics, per element::

    w    = round_to_compute_dtype(fp32(table[q] * absmax[block]))     (= dequantize_4bit(W, dtype=x.dtype))
    y    = round_to_compute_dtype(sum_k fp32(x[m, k]) * w[n, k])       (float32 accumulation)

``w`` is rounded to ``x``'s dtype (round to nearest even) as the dequantize-then-GEMM path rounds it, so the
result differs from ``x @ dequantize_4bit(W).T`` only in the order of the float32 sums. bf16 is rounded with
integer arithmetic on the float32 bits (Triton's interpreter truncates a float32 -> bf16 cast; the integer
rounding gives the same bits everywhere); the output is written in ``x``'s dtype by the kernel on a GPU and
rounded by torch under the interpreter (:func:`dequant._kernel_dtype`).

Reference: :func:`nf4_gemv_reference` (dequantize with :func:`dequant.dequantize_4bit_reference`, then matmul).
No backward: decoding runs without gradients (the LoRA autograd handles training).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sloth_core.autotune import config_for, register_heuristic
from sloth_core.kernels._runtime import (cdiv, interpreting, launch_kernel, new_empty, next_power_of_2,
                                         replay_launch, triton_ok)
from sloth_core.kernels.dequant import (_INT32_LIMIT, OUT_DTYPES, _block_scales, _kernel_dtype, _scale_operands,
                                        code_table, dequantize_4bit_reference)
from sloth_core.kernels.dequant_checks import _check_inputs
from sloth_core.kernels.dequant_plan import WeightPlan, _packed_codes, _Plans, _reads_the_state

MAX_ROWS = 8  # the most rows of x the GEMV takes (more: dequantize + GEMM, which a GEMM's reuse of W pays for)


# --------------------------------------------------------------------------------------------- reference


def nf4_gemv_reference(x: torch.Tensor, weight_data: torch.Tensor, quant_state,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequantize_4bit(W, dtype=x.dtype).T (+ bias)`` in plain torch (float32 accumulation, one rounding to
    ``x.dtype``; float64 ``x`` computes in float64)."""
    w = dequantize_4bit_reference(weight_data, quant_state, dtype=x.dtype)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(acc) @ w.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


# --------------------------------------------------------------------------------------------- kernel


@triton.jit
def _round_weight(w, ROUND: tl.constexpr):
    """float32 ``w`` rounded to the compute dtype (0: float32, 1: bf16, 2: fp16), kept in float32."""
    if ROUND == 1:  # bf16: round to nearest even on the bits (the interpreter's cast truncates)
        bits = w.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        w = bits.to(tl.float32, bitcast=True)
    elif ROUND == 2:
        w = w.to(tl.float16).to(tl.float32)
    return w


@triton.jit
def _nf4_gemv_kernel(x_ptr, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, table_ptr, out_ptr,
                     M, N, K, stride_xm, k_per_split,
                     M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                     NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr, ALIGNED: tl.constexpr, ROUND: tl.constexpr,
                     INT64: tl.constexpr, STEPS: tl.constexpr):
    """Program ``(n, s)``: rows ``n * BLOCK_N ..`` of ``out[s]`` = the ``x`` rows times those rows of ``W`` over
    columns ``s * k_per_split .. + k_per_split`` (``STEPS`` tiles of ``BLOCK_K``). ``ALIGNED`` (``K`` and
    ``BLOCK_K`` multiples of ``BLOCKSIZE``, ``BLOCK_K`` dividing ``k_per_split``): a tile's bytes are loaded
    contiguously and its scales once per quantization block; otherwise each element finds its byte, nibble and
    block from its flat index."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if INT64:
        rows = rows.to(tl.int64)
    row_mask = rows < N
    ms = tl.arange(0, M_PAD)
    m_mask = ms < M
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    for step in range(STEPS):  # a constexpr count: triton 3.6's interpreter takes no argument as a loop bound
        k0 = k_start + step * BLOCK_K
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < k_stop
        x = tl.load(x_ptr + ms[:, None] * stride_xm + ks[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0).to(tl.float32)
        mask = row_mask[:, None] & k_mask[None, :]
        if ALIGNED:
            HALF: tl.constexpr = BLOCK_K // 2
            NB: tl.constexpr = BLOCK_K // BLOCKSIZE
            start = rows * K + k0  # even, and the start of a quantization block
            byte = start[:, None] // 2 + tl.arange(0, HALF)[None, :]
            byte_mask = row_mask[:, None] & (k0 + 2 * tl.arange(0, HALF)[None, :] < k_stop)
            packed = tl.load(packed_ptr + byte, mask=byte_mask, other=0)
            shift = 4 - 4 * tl.arange(0, 2)  # element 2j: the high nibble of byte j
            codes = (packed.to(tl.int32)[:, :, None] >> shift[None, None, :]) & 0xF
            values = tl.reshape(tl.load(table_ptr + codes), (BLOCK_N, NB, BLOCKSIZE))
            blk = start[:, None] // BLOCKSIZE + tl.arange(0, NB)[None, :]
            blk_mask = row_mask[:, None] & (k0 + tl.arange(0, NB)[None, :] * BLOCKSIZE < k_stop)
            scale = _block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, blk_mask, NESTED,
                                  BLOCKSIZE2, False)
            w = tl.reshape(values * scale[:, :, None], (BLOCK_N, BLOCK_K))
        else:
            idx = rows[:, None] * K + ks[None, :]
            packed = tl.load(packed_ptr + idx // 2, mask=mask, other=0)
            codes = (packed.to(tl.int32) >> (4 - 4 * (idx % 2)).to(tl.int32)) & 0xF
            scale = _block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, idx // BLOCKSIZE, mask, NESTED,
                                  BLOCKSIZE2, False)
            w = tl.load(table_ptr + codes) * scale
        w = tl.where(mask, _round_weight(w, ROUND), 0.0)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    out = out_ptr + pid_k * M * N + ms[:, None] * N + rows[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & row_mask[None, :])


@register_heuristic("nf4_gemv")
def nf4_gemv_heuristic(m: int, n: int, k: int, blocksize: int) -> dict:
    """``BLOCK_N`` rows and ``BLOCK_K`` columns a tile, ``SPLIT_K``, ``num_warps``.

    GPU: 4,096 weights a tile for one or two rows of ``x`` (fewer for more rows: the ``[M, BLOCK_N, BLOCK_K]``
    products live in registers); ``K`` split only when the rows give fewer than 64 programs (an H100 has 132 SMs),
    since a split costs two more launches (the sum, the rounding), and decoding one token is bound by launches.
    Interpreter: one program for the small test weights (its cost is per program and loop step, ~50 ms)."""
    if interpreting():
        return {"BLOCK_N": min(next_power_of_2(n), 256), "BLOCK_K": min(next_power_of_2(k), 256), "SPLIT_K": 1,
                "num_warps": 1}
    m_pad = next_power_of_2(m)
    block_k = 256 if m_pad <= 2 else 128
    block_n = 16 if m_pad <= 4 else 8
    programs = cdiv(n, block_n)
    split = 1 if programs >= 64 else max(1, min(cdiv(132, programs), cdiv(k, 4 * block_k)))
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split, "num_warps": 4}


_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def gemv_reason(x: torch.Tensor, weight_data: torch.Tensor, quant_state) -> str | None:
    """Why :func:`nf4_gemv` cannot run its kernel on these inputs (``None``: it can)."""
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS:
        return f"x has shape {tuple(x.shape)}; the GEMV takes [1..{MAX_ROWS}, in_features]"
    if x.dtype not in OUT_DTYPES or not triton_ok(x):
        return f"x ({x.dtype} on {x.device.type}) is not a kernel input"
    if weight_data.device != x.device:
        return f"the weight is on {weight_data.device}, x on {x.device}"
    if len(getattr(quant_state, "shape", ())) != 2 or x.shape[1] != quant_state.shape[1]:
        return f"x has {x.shape[1]} features, the weight's shape is {tuple(quant_state.shape)}"
    return None


def _launch_setup(x: torch.Tensor, weight_data: torch.Tensor, quant_state, with_bias: bool):
    """``(grid, args, kwargs, split, out_dtype)`` of a launch on checked inputs; ``args[_X]`` and ``args[_OUT]``
    are ``None``, for the caller to fill."""
    m, k = x.shape
    n = int(quant_state.shape[0])
    bs = quant_state.blocksize
    cfg = dict(config_for("nf4_gemv", m=m, n=n, k=k, blocksize=bs))
    block_n, block_k, split = cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K"), cfg.pop("SPLIT_K")
    aligned = k % bs == 0 and bs <= 256  # (a larger blocksize would make a whole-block tile too large)
    if aligned:
        block_k = max(block_k, bs)  # whole quantization blocks a tile (BLOCK_K, bs: powers of two)
    k_per_split = cdiv(cdiv(k, split), block_k) * block_k
    split = cdiv(k, k_per_split)
    # partial sums and a bias are added up in float32 and rounded once, by torch
    out_dtype = _kernel_dtype(x.dtype) if split == 1 and not with_bias else torch.float32
    absmax, absmax2, code2, offset, nested, bs2 = _scale_operands(quant_state, x.device)
    args = [None, weight_data.reshape(-1), absmax, absmax2, code2, offset, code_table(quant_state.quant_type, x.device),
            None, m, n, k, x.stride(0), k_per_split]
    kwargs = dict(M_PAD=next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=block_k, BLOCKSIZE=bs, NESTED=nested,
                  BLOCKSIZE2=bs2, ALIGNED=aligned, ROUND=_ROUND[x.dtype],
                  INT64=n * k + block_n * k > _INT32_LIMIT, STEPS=k_per_split // block_k, enable_fp_fusion=False,
                  **cfg)
    return (cdiv(n, block_n), split), args, kwargs, split, out_dtype


_X, _PACKED, _OUT = 0, 1, 7  # positions of x, the packed codes and the output among the kernel's arguments


def _finish(out: torch.Tensor, split: int, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    y = out[0] if split == 1 else out.sum(0)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(dtype)


def nf4_gemv(x: torch.Tensor, weight_data: torch.Tensor, quant_state,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequantize_4bit(W, dtype=x.dtype).T (+ bias)`` without the dequantized ``W``; ``x`` [M, K] with
    M <= :data:`MAX_ROWS`, ``weight_data`` the packed uint8 codes, ``quant_state`` their ``QuantState`` (shape
    [N, K]). Returns [M, N] in ``x.dtype``. Inputs the kernel does not take (:func:`gemv_reason`: more rows,
    float64, CPU without the interpreter) run :func:`nf4_gemv_reference`."""
    _check_inputs(weight_data, quant_state)
    if gemv_reason(x, weight_data, quant_state) is not None:
        return nf4_gemv_reference(x, weight_data, quant_state, bias)
    if x.stride(1) != 1:
        x = x.contiguous()
    grid, args, kwargs, split, out_dtype = _launch_setup(x, weight_data, quant_state, bias is not None)
    out = new_empty((split, x.shape[0], int(quant_state.shape[0])), out_dtype, x.device)
    args[_X], args[_OUT] = x, out
    launch_kernel(_nf4_gemv_kernel, grid, *args, **kwargs)
    return _finish(out, split, bias, x.dtype)


# --------------------------------------------------------------------------------------------- planned launches


_PLANS_ATTR = "_sloth_core_gemv_plans"  # on a Params4bit: {(rows, dtype, x strides, bias?): _GemvPlan}


def nf4_gemv_weight(x: torch.Tensor, param, quant_state, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`nf4_gemv` of a ``Params4bit`` (a ``Linear4bit``'s weight) and its ``QuantState``, with the checks and
    launch setup of each (rows, dtype, layout) kept on the parameter as a plan (a decoding step launches ~220
    GEMVs of an 8B model: the checked path's host time would show). A plan serves while the weight and its state are
    the same objects at the same address (:class:`dequant_plan.WeightPlan`, as the dequantizer's plans); on a GPU it
    replays the compiled kernel's launcher (``_runtime.compiled_launcher``)."""
    plans = param.__dict__.get(_PLANS_ATTR)
    key = (x.shape, x.dtype, x.stride(), bias is None)
    plan = plans.get(key) if plans is not None else None
    if plan is None or not plan.serves(param, quant_state):
        plan = _GemvPlan.make(x, param, quant_state, bias is not None)
        if plan is None:
            return nf4_gemv(x, _packed_codes(param), quant_state, bias)
        if plans is None:
            plans = param.__dict__.setdefault(_PLANS_ATTR, _Plans())
        plans[key] = plan
    return plan.run(x, param, bias)


class _GemvPlan(WeightPlan):
    """One checked GEMV setting of a ``Params4bit``; see :func:`nf4_gemv_weight` (and :class:`dequant._LaunchPlan`,
    whose rules it follows: the packed codes are read through their address, which the caller's parameter keeps
    alive; only the state's own scale tensors are kept, never copies that could go stale)."""

    __slots__ = ("grid", "args", "kwargs", "split", "out_shape", "out_dtype", "launcher", "replay_tail")

    @classmethod
    def make(cls, x, param, state, with_bias: bool) -> "_GemvPlan | None":
        data = _packed_codes(param)
        _check_inputs(data, state)
        if gemv_reason(x, data, state) is not None or x.stride(1) != 1 or not data.is_contiguous():
            return None
        grid, args, kwargs, split, out_dtype = _launch_setup(x, data, state, with_bias)
        if not _reads_the_state(state, *args[2:6], nested=kwargs["NESTED"]):
            return None
        plan = cls()
        plan._bind(param, state)
        plan.grid, plan.args, plan.kwargs, plan.split = grid, args, kwargs, split
        plan.args[_PACKED] = None  # read from the parameter at each JIT launch: not kept alive here
        plan.out_shape, plan.out_dtype = (split, x.shape[0], int(state.shape[0])), out_dtype
        plan.launcher = plan.replay_tail = None
        return plan

    def run(self, x, param, bias) -> torch.Tensor:
        out = new_empty(self.out_shape, self.out_dtype, x.device)
        aligned = x.data_ptr() % 16 == 0 and out.data_ptr() % 16 == 0  # as the compiled launch's pointers
        if self.launcher is not None and aligned:
            self.launcher(x, self.ptr, *self.args[_PACKED + 1:_OUT], out, *self.replay_tail)
        else:
            args = list(self.args)
            args[_X], args[_PACKED], args[_OUT] = x, _packed_codes(param).reshape(-1), out
            compiled = launch_kernel(_nf4_gemv_kernel, self.grid, *args, **self.kwargs)
            if self.launcher is None and aligned:
                self._keep_launcher(compiled)
        return _finish(out, self.split, bias, x.dtype)

    def _keep_launcher(self, compiled) -> None:
        kept = replay_launch(_nf4_gemv_kernel, compiled, self.grid, self.args, self.kwargs, _ARG_NAMES, _OUT + 1)
        if kept is not None:
            self.launcher, self.replay_tail = kept


_ARG_NAMES = ("x_ptr", "packed_ptr", "absmax_ptr", "absmax2_ptr", "code2_ptr", "offset_ptr", "table_ptr", "out_ptr",
              "M", "N", "K", "stride_xm", "k_per_split")
