"""Causal-LM cross-entropy loss over a ``[T, V]`` logits matrix, as Hugging Face transformers computes it.

Reference semantics (``transformers/loss/loss_utils.py``: ``ForCausalLMLoss`` + ``fixed_cross_entropy``, with
the Gemma2 final-logit soft-capping and the Cohere/Granite-style logit scale applied to the ``lm_head`` output
first, in its dtype)::

    x   = logits                       # [T, V], lm_head output dtype
    x   = x * s                        # optional logit scale s            (logit_scale)
    x   = c * tanh(x / c)              # optional final-logit soft-capping (softcap = c)
    z   = float32(x)                   # HF upcasts before the loss
    lse_t  = log sum_v exp(z_tv)
    loss_t = lse_t - z_t,y_t           # 0 where y_t == ignore_index
    loss   = sum_t loss_t / N          # "mean": N = #{t : y_t != ignore_index}, or N = num_items_in_batch
           | sum_t loss_t              # "sum"
           | loss_t                    # "none"

Backward, with ``w_t`` = dloss/dloss_t (``g / N`` for "mean", ``g`` for "sum", ``g_t`` for "none")::

    p_tv          = exp((z_tv - m_t) - log s_t)           # softmax, recomputed from the saved row stats
    dloss/dz_tv   = w_t * (p_tv - [v == y_t])             # 0 on ignored rows
    dz/dx         = s * (1 - tanh(s x / c)^2)  (softcap) | s (scale only) | 1
    dloss/dx_tv   = dloss/dz_tv * dz/dx                   # written in the logits dtype

All labels ignored: like ``torch.nn.functional.cross_entropy``, "mean" gives a NaN loss (0 / 0) and zero
gradients; with ``num_items_in_batch`` the loss is 0 (0 / N) and the gradients are zero.

The Triton forward makes one pass per row with an online log-sum-exp over column chunks of ``BLOCK_V``
(``m`` = running max, ``s`` = running sum of ``exp(z - m)``, rescaled by ``exp(m_old - m_new)``), and stores the
per-row loss and the row statistics ``(m, log s)`` in fp32 (``lse = m + log s``; kept as two numbers, like
torch's ``(z - max) - log(sum)``, so that neither ``lse - z_label`` nor ``z - lse`` loses digits to a large
``m``). Optionally (``ce_forward`` with a gradient buffer, used by the fused linear + cross-entropy of
:mod:`sloth_core.kernels.fused_linear_cross_entropy`) the same program then writes the gradient of the row,
which may alias the logits (each element is read before it is overwritten by the same program). The
stand-alone :func:`cross_entropy` keeps the logits intact: its backward recomputes the softmax from the saved
row statistics and writes a fresh gradient tensor.

fp32 limits (as in torch's fp32 path): for a confident row (p_label -> 1) the loss ``log(1 + delta)`` and the
label gradient ``p - 1`` are accurate to a few fp32 ulps *absolutely* (~NUM_CHUNKS * 6e-8), not relatively.

The Triton kernels compute the soft-cap in fp32 from the loaded logits (more accurate than HF's bf16
``/ c``, ``tanh``, ``* c``); the reference mirrors HF's order and dtypes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sloth_core.autotune import config_for, register_heuristic, register_space
from sloth_core.autotune.space import dtype_from_name, dtype_name, rows_bucket, warps_for
from sloth_core.kernels._runtime import cdiv, interpreting, new_empty, next_power_of_2, triton_ok

REDUCTIONS = ("mean", "sum", "none")


# ---------------------------------------------------------------------------------------------------------
# Reference (HF order and dtypes)
# ---------------------------------------------------------------------------------------------------------
def transform_logits_reference(logits: torch.Tensor, softcap: float | None = None,
                               logit_scale: float | torch.Tensor | None = None) -> torch.Tensor:
    """Logit scale then soft-capping, in the lm_head output dtype, then HF's upcast to (at least) fp32."""
    z = logits
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = z / softcap
        z = torch.tanh(z)
        z = z * softcap
    return z.to(torch.promote_types(z.dtype, torch.float32))


def cross_entropy_reference(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                            softcap: float | None = None, logit_scale: float | torch.Tensor | None = None,
                            num_items_in_batch: int | torch.Tensor | None = None,
                            reduction: str = "mean") -> torch.Tensor:
    """HF ``ForCausalLMLoss`` on already-shifted, flattened ``labels`` (``fixed_cross_entropy``)."""
    z = transform_logits_reference(logits, softcap, logit_scale)
    labels = labels.to(z.device)
    if num_items_in_batch is None:
        return F.cross_entropy(z, labels, ignore_index=ignore_index, reduction=reduction)
    loss = F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


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
    _ce_kernel[grid](logits, logits.stride(0), labels, loss_out, stats_out, grad_out, grad_out.stride(0),
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
    _ce_kernel[grid](logits, logits.stride(0), labels, stats, stats, grad, grad.stride(0), row_weight,
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
    logits = (2.0 * torch.randn(n_rows, n_cols, device=device, generator=gen)).to(dtype_from_name(bucket["dtype"]))
    labels = torch.randint(0, n_cols, (n_rows,), device=device, generator=gen)
    labels[torch.rand(n_rows, device=device, generator=gen) < 0.1] = -100
    row_weight = torch.full((1,), 1.0 / n_rows, dtype=torch.float32, device=device)
    return dict(logits=logits, labels=labels, row_weight=row_weight)


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
    make_inputs=_tuning_inputs, run=_tuning_run,
    worth_tuning=lambda bucket: bucket["n_rows"] * bucket["n_cols"] >= 1 << 22,
)


# ---------------------------------------------------------------------------------------------------------
# Reduction helpers (shared with the fused linear + cross-entropy)
# ---------------------------------------------------------------------------------------------------------
def loss_divisor(labels: torch.Tensor, ignore_index: int, num_items_in_batch, reduction: str):
    """The divisor of the summed loss: None ("sum"/"none"), num_items_in_batch, or the non-ignored count."""
    if reduction != "mean":
        return None
    if num_items_in_batch is None:
        return (labels != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        return num_items_in_batch.to(labels.device)
    return num_items_in_batch


def reduce_loss(loss_rows: torch.Tensor, divisor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total if divisor is None else total / divisor


def row_weights(grad_output: torch.Tensor, divisor, reduction: str) -> torch.Tensor:
    """dloss/dloss_t as an fp32 tensor: shape [1] (broadcast over rows) or [T] ("none")."""
    w = grad_output.to(torch.float32)
    if reduction == "none":
        return w.contiguous()
    if divisor is not None:
        w = w / divisor
    return w.to(torch.float32).reshape(1)


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------
def validate_loss_args(labels: torch.Tensor, n_tokens: int, vocab: int, ignore_index: int,
                       softcap, logit_scale, num_items_in_batch, reduction: str) -> None:
    """Shared checks of the loss arguments (the caller checks its own logits/hidden/weight)."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != n_tokens:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels: expected shape ({n_tokens},), got {shape}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels: expected an integer tensor, got {labels.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError("num_items_in_batch replaces the divisor of reduction='mean'; "
                         f"it cannot be combined with reduction={reduction!r}")
    if softcap is not None and not (float(softcap) > 0.0):
        raise ValueError(f"softcap: expected a positive number or None, got {softcap!r}")
    if logit_scale is not None and not torch.is_tensor(logit_scale) and not isinstance(logit_scale, (int, float)):
        raise ValueError(f"logit_scale: expected a number, a tensor or None, got {type(logit_scale).__name__}")
    if labels.numel() and bool(((labels != ignore_index) & ((labels < 0) | (labels >= vocab))).any()):
        raise ValueError(f"labels: values must lie in [0, {vocab}) or equal ignore_index={ignore_index}")


def _validate_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits: expected a 2-D [tokens, vocab] tensor, got {shape}")
    if not logits.is_floating_point():
        raise ValueError(f"logits: expected a floating-point tensor, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError("logits: the vocabulary dimension is empty")


# ---------------------------------------------------------------------------------------------------------
# Autograd and public entry point
# ---------------------------------------------------------------------------------------------------------
class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, opts: LossOptions, num_items_in_batch, reduction: str):
        n_rows = logits.shape[0]
        loss_rows = new_empty((n_rows,), torch.float32, logits.device)
        stats = new_empty((n_rows, 2), torch.float32, logits.device)
        ce_forward(logits, labels, opts, loss_rows, stats)
        divisor = loss_divisor(labels, opts.ignore_index, num_items_in_batch, reduction)
        ctx.save_for_backward(logits, labels, stats)
        ctx.opts, ctx.divisor, ctx.reduction = opts, divisor, reduction
        return reduce_loss(loss_rows, divisor, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        logits, labels, stats = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            w = row_weights(grad_output, ctx.divisor, ctx.reduction)
            grad = ce_backward(logits, labels, stats, w, ctx.opts)
        return grad, None, None, None, None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                  softcap: float | None = None, logit_scale: float | torch.Tensor | None = None,
                  num_items_in_batch: int | torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """HF causal-LM cross-entropy of ``logits`` [T, V] against ``labels`` [T] (already shifted), in fp32.

    ``num_items_in_batch`` (int or tensor) replaces the divisor of ``reduction="mean"`` (HF's gradient
    accumulation path). Triton on CUDA (or under the interpreter); the reference otherwise (float64, CPU, a
    tensor-valued ``logit_scale``)."""
    _validate_logits(logits)
    labels = labels.to(logits.device) if isinstance(labels, torch.Tensor) else labels
    validate_loss_args(labels, logits.shape[0], logits.shape[1], ignore_index, softcap, logit_scale,
                       num_items_in_batch, reduction)
    labels = labels.long()
    if not triton_ok(logits) or torch.is_tensor(logit_scale):
        return cross_entropy_reference(logits, labels, ignore_index, softcap, logit_scale, num_items_in_batch,
                                       reduction)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    opts = LossOptions(ignore_index, softcap, logit_scale)
    return CrossEntropyFunction.apply(logits, labels.contiguous(), opts, num_items_in_batch, reduction)
