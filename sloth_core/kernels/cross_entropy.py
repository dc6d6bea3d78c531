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
row statistics and writes a fresh gradient tensor. The kernels and their launches:
:mod:`sloth_core.kernels.cross_entropy_kernels`.

fp32 limits (as in torch's fp32 path): for a confident row (p_label -> 1) the loss ``log(1 + delta)`` and the
label gradient ``p - 1`` are accurate to a few fp32 ulps *absolutely* (~NUM_CHUNKS * 6e-8), not relatively.

The Triton kernels compute the soft-cap in fp32 from the loaded logits (more accurate than HF's bf16
``/ c``, ``tanh``, ``* c``); the reference mirrors HF's order and dtypes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sloth_core.kernels._runtime import OP_TAGS, new_empty, triton_ok
from sloth_core.kernels.cross_entropy_kernels import LossOptions, ce_backward, ce_forward

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
    if not torch.compiler.is_compiling():  # a traced graph cannot branch on values: the custom op checks them
        check_label_values(labels, vocab, ignore_index)


def check_label_values(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
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


def op_floats(*values) -> tuple[float | None, ...]:
    """Numbers as the ``float | None`` arguments of a custom op (an int is refused by the op's schema)."""
    return tuple(None if v is None else float(v) for v in values)


# torch.compile: the kernels as custom ops, graph nodes instead of a trace into Triton. The forward op is
# differentiable (per-row loss -> logits, through the backward op with the incoming per-row gradients as the row
# weights), so the reduction stays plain torch; it checks the label values the traced entry point cannot.
@torch.library.custom_op("sloth_core::cross_entropy_fwd", mutates_args=(), tags=OP_TAGS)
def cross_entropy_fwd_op(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, softcap: float | None,
                         logit_scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss rows [T] fp32, row stats [T, 2] fp32)``."""
    check_label_values(labels, logits.shape[1], ignore_index)
    loss_rows = new_empty((logits.shape[0],), torch.float32, logits.device)
    stats = new_empty((logits.shape[0], 2), torch.float32, logits.device)
    ce_forward(logits, labels, LossOptions(ignore_index, softcap, logit_scale), loss_rows, stats)
    return loss_rows, stats


@cross_entropy_fwd_op.register_fake
def _(logits, labels, ignore_index, softcap, logit_scale):
    return (logits.new_empty(logits.shape[0], dtype=torch.float32),
            logits.new_empty((logits.shape[0], 2), dtype=torch.float32))


@torch.library.custom_op("sloth_core::cross_entropy_bwd", mutates_args=(), tags=OP_TAGS)
def cross_entropy_bwd_op(logits: torch.Tensor, labels: torch.Tensor, stats: torch.Tensor, row_weight: torch.Tensor,
                         ignore_index: int, softcap: float | None, logit_scale: float | None) -> torch.Tensor:
    """The logits' gradient, row t scaled by ``row_weight[t]`` ([T] or [1])."""
    return ce_backward(logits, labels, stats, row_weight.to(torch.float32).contiguous(),
                       LossOptions(ignore_index, softcap, logit_scale))


@cross_entropy_bwd_op.register_fake
def _(logits, labels, stats, row_weight, ignore_index, softcap, logit_scale):
    return logits.new_empty(logits.shape)


def _fwd_op_setup(ctx, inputs, output):
    logits, labels, *ctx.opts = inputs
    ctx.save_for_backward(logits, labels, output[1])


def _fwd_op_backward(ctx, dloss_rows, _dstats):
    logits, labels, stats = ctx.saved_tensors
    return cross_entropy_bwd_op(logits, labels, stats, dloss_rows, *ctx.opts), None, None, None, None


cross_entropy_fwd_op.register_autograd(_fwd_op_backward, setup_context=_fwd_op_setup)


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
    if torch.compiler.is_compiling():
        loss_rows, _ = cross_entropy_fwd_op(logits, labels.contiguous(), ignore_index,
                                            *op_floats(softcap, logit_scale))
        return reduce_loss(loss_rows, loss_divisor(labels, ignore_index, num_items_in_batch, reduction), reduction)
    opts = LossOptions(ignore_index, softcap, logit_scale)
    return CrossEntropyFunction.apply(logits, labels.contiguous(), opts, num_items_in_batch, reduction)
