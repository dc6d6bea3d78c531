"""The Triton cross-entropy kernels and their launches, shared by :mod:`sloth_core.kernels.cross_entropy`,
:mod:`sloth_core.kernels.fused_linear_cross_entropy` and :mod:`sloth_core.kernels.linear_log_probs` (the math, the
roundings and the reference: :mod:`sloth_core.kernels.cross_entropy`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sloth_core.autotune import config_for, register_heuristic, register_space
from sloth_core.autotune.space import dtype_from_name, dtype_name, rows_bucket, warps_for
from sloth_core.kernels._runtime import cdiv, interpreting, launch_kernel, new_empty, next_power_of_2


# ---------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    # libdevice tanh is unavailable under the interpreter; tanh(x) = 2 sigmoid(2x) - 1 (absolute error ~1e-7).
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def logit_transform(x, scale, cap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """z = c * tanh((x * s) / c) and dz/dx, in fp32."""
    dz = tl.full(x.shape, 1.0, tl.float32)
    if HAS_SCALE:
        x = x * scale
        dz = dz * scale
    if HAS_SOFTCAP:
        t = _tanh(x / cap)
        x = cap * t
        dz = dz * (1.0 - t * t)
    return x, dz


@triton.jit
def _row_logsumexp(x_row, n_cols, scale, cap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   BLOCK_V: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    """Online log-sum-exp of the transformed row, in NUM_CHUNKS column chunks of BLOCK_V: returns the row max m
    and log(sum exp(z - m))."""
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for chunk in range(NUM_CHUNKS):
        cols = chunk * BLOCK_V + offs
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        z, _ = logit_transform(x, scale, cap, HAS_SCALE, HAS_SOFTCAP)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    return m, tl.log(s)


@triton.jit
def write_row_grad(x_row, g_row, n_cols, m, log_s, label, valid, w, scale, cap, HAS_SCALE: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    """g_row[v] = w * (exp(z[v] - m - log_s) - [v == label]) * dz/dx[v]; zeros when the row is ignored.

    ``g_row`` may alias ``x_row``: every element is loaded before this program stores over it."""
    offs = tl.arange(0, BLOCK_V)
    # An ignored row loads no column. A bound, not `mask & valid`: triton 3.9's interpreter rejects the non-bool
    # mask that broadcasting the scalar `valid` gives.
    n_load = tl.where(valid, n_cols, 0)
    for chunk in range(NUM_CHUNKS):
        cols = chunk * BLOCK_V + offs
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=cols < n_load, other=0.0).to(tl.float32)
        z, dz = logit_transform(x, scale, cap, HAS_SCALE, HAS_SOFTCAP)
        p = tl.exp((z - m) - log_s)
        g = (p - tl.where(cols == label, 1.0, 0.0)) * dz * w
        g = tl.where(valid, g, 0.0)  # where, not a multiply: w may be inf/NaN on ignored rows
        tl.store(g_row + cols, g.to(g_row.dtype.element_ty), mask=mask)


@triton.jit
def _ce_kernel(logits_ptr, stride_logits, labels_ptr, loss_ptr, stats_ptr, grad_ptr, stride_grad,
               w_ptr, stride_w, n_rows, n_cols, ignore_index, scale, cap,
               HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FORWARD: tl.constexpr,
               COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, NUM_CHUNKS: tl.constexpr,
               ROWS_PER_PROGRAM: tl.constexpr):
    """Rows ``pid * ROWS_PER_PROGRAM ...`` of the loss. ``FORWARD``: the row's loss ``m + log s - z[label]`` (0 on
    ignored rows) and its stats ``(m, log s)`` into ``loss_ptr`` / ``stats_ptr``; otherwise the stats are read
    back from ``stats_ptr`` (the backward). ``COMPUTE_GRAD``: the gradient row (:func:`write_row_grad`)."""
    row_start = tl.program_id(0) * ROWS_PER_PROGRAM
    for i in range(ROWS_PER_PROGRAM):
        row = row_start + i
        if row < n_rows:
            row64 = row.to(tl.int64)
            x_row = logits_ptr + row64 * stride_logits
            label = tl.load(labels_ptr + row)
            valid = label != ignore_index
            if FORWARD:
                m = tl.zeros((), tl.float32)
                log_s = tl.zeros((), tl.float32)
                loss = tl.zeros((), tl.float32)
                if valid:  # ignored rows skip the log-sum-exp
                    m, log_s = _row_logsumexp(x_row, n_cols, scale, cap, HAS_SCALE, HAS_SOFTCAP, BLOCK_V,
                                              NUM_CHUNKS)
                    z_label, _ = logit_transform(tl.load(x_row + label).to(tl.float32), scale, cap, HAS_SCALE,
                                            HAS_SOFTCAP)
                    loss = (m - z_label) + log_s
                tl.store(loss_ptr + row, loss)
                tl.store(stats_ptr + 2 * row64, m)
                tl.store(stats_ptr + 2 * row64 + 1, log_s)
            else:
                m = tl.load(stats_ptr + 2 * row64)
                log_s = tl.load(stats_ptr + 2 * row64 + 1)
            if COMPUTE_GRAD:
                w = tl.load(w_ptr + row64 * stride_w)
                write_row_grad(x_row, grad_ptr + row64 * stride_grad, n_cols, m, log_s, label, valid, w, scale,
                                cap, HAS_SCALE, HAS_SOFTCAP, BLOCK_V, NUM_CHUNKS)


@register_heuristic("cross_entropy")
def cross_entropy_heuristic(n_rows: int, n_cols: int, dtype: torch.dtype) -> dict:
    """BLOCK_V: column chunk of the online log-sum-exp; ROWS_PER_PROGRAM: rows one program walks through."""
    block_v = min(next_power_of_2(n_cols), 8192)
    if interpreting():  # few, large programs
        return dict(BLOCK_V=block_v, ROWS_PER_PROGRAM=max(1, min(n_rows, 256)), num_warps=4)
    num_warps = 16 if block_v >= 8192 else 8 if block_v >= 2048 else 4
    return dict(BLOCK_V=block_v, ROWS_PER_PROGRAM=1, num_warps=num_warps)


# ---------------------------------------------------------------------------------------------------------
# Launchers (shared with the fused linear + cross-entropy)
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossOptions:
    ignore_index: int = -100
    softcap: float | None = None
    logit_scale: float | None = None

    def kernel_args(self) -> dict:
        return dict(ignore_index=self.ignore_index,
                    scale=1.0 if self.logit_scale is None else float(self.logit_scale),
                    cap=1.0 if self.softcap is None else float(self.softcap),
                    HAS_SCALE=self.logit_scale is not None, HAS_SOFTCAP=self.softcap is not None)


def launch_params(logits: torch.Tensor) -> tuple[tuple, dict]:
    n_rows, n_cols = logits.shape
    cfg = config_for("cross_entropy", n_rows=n_rows, n_cols=n_cols, dtype=logits.dtype)
    rows = cfg["ROWS_PER_PROGRAM"]
    return (cdiv(n_rows, rows),), dict(cfg, NUM_CHUNKS=cdiv(n_cols, cfg["BLOCK_V"]))


def ce_forward(logits: torch.Tensor, labels: torch.Tensor, opts: LossOptions, loss_out: torch.Tensor,
               stats_out: torch.Tensor, grad_out: torch.Tensor | None = None,
               row_weight: torch.Tensor | None = None) -> None:
    """Per-row loss ([T] fp32) and row stats ([T, 2] fp32: m, log s) of ``logits`` [T, V] (unit column stride).

    With ``grad_out`` ([T, V], unit column stride, may be ``logits`` itself), also writes the gradient of the
    loss wrt the logits, row t scaled by ``row_weight[t]`` (``row_weight`` fp32, shape [1] broadcast or [T])."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    grid, params = launch_params(logits)
    compute_grad = grad_out is not None
    if not compute_grad:
        grad_out, row_weight = logits, loss_out  # unused pointers
    launch_kernel(_ce_kernel, grid, logits, logits.stride(0), labels, loss_out, stats_out, grad_out, grad_out.stride(0),
                  row_weight, _broadcast_stride(row_weight), n_rows, n_cols,
                  FORWARD=True, COMPUTE_GRAD=compute_grad, **opts.kernel_args(), **params)


def ce_backward(logits: torch.Tensor, labels: torch.Tensor, stats: torch.Tensor, row_weight: torch.Tensor,
                opts: LossOptions) -> torch.Tensor:
    """Gradient wrt ``logits`` (new tensor, logits dtype) from the saved row stats; row t scaled by row_weight[t]."""
    n_rows, n_cols = logits.shape
    grad = new_empty(logits.shape, logits.dtype, logits.device)
    if n_rows == 0:
        return grad
    grid, params = launch_params(logits)
    launch_kernel(_ce_kernel, grid, logits, logits.stride(0), labels, stats, stats, grad, grad.stride(0), row_weight,
                  _broadcast_stride(row_weight), n_rows, n_cols,  # the loss pointer (stats) is not written
                  FORWARD=False, COMPUTE_GRAD=True, **opts.kernel_args(), **params)
    return grad


def _broadcast_stride(row_weight: torch.Tensor) -> int:
    return 0 if row_weight.numel() == 1 else row_weight.stride(0)


# ---------------------------------------------------------------------------------------------------------
# Tuning space
# ---------------------------------------------------------------------------------------------------------
# Tuning key: the exact vocabulary, the rows rounded up to a power of 2 (capped at 2^27 logits), the dtype.
# Candidates: column chunks of 1K-16K, 2-32 columns a thread, one row a program. Timed: the three kernels a
# step may run -- the forward, the backward from the row stats, and the forward writing the gradient (the
# fused linear cross-entropy's) -- with about 10% of the labels ignored.


def _tuning_key(*, n_rows: int, n_cols: int, dtype: torch.dtype) -> dict:
    return dict(n_cols=n_cols, n_rows=rows_bucket(n_rows, n_cols), dtype=dtype_name(dtype))


def _tuning_example(bucket: dict) -> dict:
    return dict(bucket, dtype=dtype_from_name(bucket["dtype"]))


def _tuning_candidates(bucket: dict):
    for block_v in (1024, 2048, 4096, 8192, 16384):
        if block_v > max(1024, next_power_of_2(bucket["n_cols"])):
            break
        for num_warps in warps_for(block_v, (4, 8, 16, 32), min_per_thread=2, max_per_thread=32):
            yield dict(BLOCK_V=block_v, ROWS_PER_PROGRAM=1, num_warps=num_warps)


def _tuning_inputs(bucket: dict, device: torch.device, gen: torch.Generator) -> dict:
    n_rows, n_cols = bucket["n_rows"], bucket["n_cols"]
    dtype = dtype_from_name(bucket["dtype"])
    logits = torch.randn(n_rows, n_cols, device=device, dtype=dtype, generator=gen).mul_(2.0)
    labels = torch.randint(0, n_cols, (n_rows,), device=device, generator=gen)
    labels[torch.rand(n_rows, device=device, generator=gen) < 0.1] = -100
    row_weight = torch.full((1,), 1.0 / n_rows, dtype=torch.float32, device=device)
    return dict(logits=logits, labels=labels, row_weight=row_weight)


def _tuning_workspace(bucket: dict) -> int:
    """Bytes a tuning of ``bucket`` allocates: the logits and labels; 3 sets of outputs (the expected ones, a
    candidate's, the one before it) of both passes: per-row loss and statistics, the logits' gradient; one more
    logits-sized temporary (H100: 5.8 logits' worth measured by tests/autotune/test_budget.py, 6 declared)."""
    n_rows, n_cols = bucket["n_rows"], bucket["n_cols"]
    return 6 * n_rows * n_cols * dtype_from_name(bucket["dtype"]).itemsize + 100 * n_rows


def _tuning_run(inputs: dict):
    logits, labels, w = inputs["logits"], inputs["labels"], inputs["row_weight"]
    n_rows, opts = logits.shape[0], LossOptions()
    outs = []
    for fused in (False, True):
        loss = new_empty((n_rows,), torch.float32, logits.device)
        stats = new_empty((n_rows, 2), torch.float32, logits.device)
        grad = new_empty(logits.shape, logits.dtype, logits.device) if fused else None
        ce_forward(logits, labels, opts, loss, stats, grad_out=grad, row_weight=w if fused else None)
        outs += [loss, stats, grad if fused else ce_backward(logits, labels, stats, w, opts)]
    return outs


register_space(
    "cross_entropy",
    params=dict(BLOCK_V=tuple(1 << i for i in range(17)), ROWS_PER_PROGRAM=range(1, 1 << 20),
                num_warps=(1, 2, 4, 8, 16, 32)),
    key=_tuning_key, example=_tuning_example, candidates=_tuning_candidates,
    make_inputs=_tuning_inputs, run=_tuning_run, workspace=_tuning_workspace,
    worth_tuning=lambda bucket: bucket["n_rows"] * bucket["n_cols"] >= 1 << 22,
)
