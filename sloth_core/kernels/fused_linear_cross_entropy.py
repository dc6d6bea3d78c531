"""The lm_head projection fused with the causal-LM cross-entropy, never materializing the full [T, V] logits.

Math (see :mod:`sloth_core.kernels.cross_entropy` for the loss itself)::

    X = hidden [T, H],  W = lm_head weight [V, H],  b = bias [V] (optional)
    logits = X W^T + b                                   # in the input dtype, as HF's lm_head
    loss   = CE(logits, y)                               # scale, soft-cap, fp32 upcast, mean/sum/none

Backward, with ``D`` = dloss/dlogits ([T, V], from the cross-entropy kernel, already multiplied by the
per-row weight ``w_t`` = 1/N for "mean" or 1 for "sum")::

    dX = D W            dW = D^T X            db = sum_t D_t

Algorithm: the tokens are processed in chunks of ``chunk_tokens`` rows (launch heuristic
``"fused_linear_cross_entropy"``: a chunk of logits stays within ~0.5 GiB). For each chunk::

    L_c = X_c W^T (+ b)                 # torch matmul in the input dtype (cuBLAS accumulates in fp32)
    CE kernel: loss rows, and D_c written over L_c in place (the gradient of the logits chunk)
    dX_c = D_c W                        # only if hidden requires grad
    dW  += D_c^T X_c                    # only if weight requires grad (skipped for a frozen lm_head, e.g. LoRA)
    db  += sum_t D_c                    # only if bias requires grad (fp32 accumulator)

For "mean"/"sum" the per-row weights are known up front (the divisor is the count of non-ignored labels, or
``num_items_in_batch``), so the gradients are complete after the forward (like Liger-Kernel) and the autograd
backward only multiplies them by ``grad_output`` (in place: a second backward through the same graph raises).
For "none" the per-row weights are ``grad_output`` itself, so the forward only computes the loss and the
backward recomputes each chunk of logits.

``dW`` accumulates in the weight dtype: the first chunk writes it with ``mm`` and the others ``addmm_`` into
it (cuBLAS accumulates each chunk's product in fp32; the running sum is rounded to the weight dtype once per
chunk, i.e. a handful of roundings). An fp32 accumulator would cost ``V*H*4`` bytes (2 GiB at 128256 x 4096),
twice the whole memory budget of this op.

Under autocast the inputs are cast to the autocast dtype first, as ``F.linear`` would, and the chunks run with
autocast off.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sloth_core.autotune import config_for, register_heuristic, register_space
from sloth_core.autotune.space import dtype_from_name, dtype_name, rows_bucket
from sloth_core.kernels._runtime import OP_TAGS, new_empty, triton_ok
from sloth_core.kernels.cross_entropy import (
    check_label_values,
    cross_entropy_reference,
    loss_divisor,
    op_floats,
    reduce_loss,
    row_weights,
    validate_loss_args,
)
from sloth_core.kernels.cross_entropy_kernels import LossOptions, ce_forward

CHUNK_BYTES_BUDGET = 512 * 1024 * 1024


def fused_linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                                         softcap: float | None = None, logit_scale=None,
                                         num_items_in_batch=None, reduction: str = "mean") -> torch.Tensor:
    """HF: ``logits = lm_head(hidden)`` then :func:`cross_entropy_reference`."""
    logits = F.linear(hidden, weight, bias)
    return cross_entropy_reference(logits, labels, ignore_index, softcap, logit_scale, num_items_in_batch,
                                   reduction)


@register_heuristic("fused_linear_cross_entropy")
def fused_linear_cross_entropy_heuristic(n_tokens: int, vocab: int, hidden: int, dtype: torch.dtype) -> dict:
    """chunk_tokens: rows of logits materialized at once (a multiple of 256 within CHUNK_BYTES_BUDGET)."""
    elem = torch.finfo(dtype).bits // 8
    chunk = max(256, CHUNK_BYTES_BUDGET // (vocab * elem) // 256 * 256)
    return dict(chunk_tokens=max(1, min(chunk, n_tokens)))


# ---------------------------------------------------------------------------------------------------------
# The chunked pass
# ---------------------------------------------------------------------------------------------------------
def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    if bias is None:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.addmm(bias, x, weight.t(), out=out)


def _rows(row_weight: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of the per-row weights (a broadcast [1] tensor stays as it is)."""
    return row_weight if row_weight.numel() == 1 else row_weight[start:end]


def chunked_pass(hidden, weight, bias, labels, opts: LossOptions, row_weight: torch.Tensor | None,
                  want: tuple[bool, bool, bool]):
    """Loss rows and, when ``row_weight`` is given, the gradients named by ``want`` = (hidden, weight, bias).

    ``row_weight``: fp32 dloss/dloss_t, shape [1] (broadcast) or [T]. Returns (loss_rows, dX, dW, db)."""
    n_tokens, n_hidden = hidden.shape
    vocab = weight.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    want_h, want_w, want_b = want if row_weight is not None else (False, False, False)
    chunk = config_for("fused_linear_cross_entropy", n_tokens=n_tokens, vocab=vocab, hidden=n_hidden,
                       dtype=dtype)["chunk_tokens"]
    loss_rows = new_empty((n_tokens,), torch.float32, dev)
    stats = new_empty((n_tokens, 2), torch.float32, dev)
    grad_h = new_empty((n_tokens, n_hidden), dtype, dev) if want_h else None
    grad_w = None
    if want_w:  # chunk 0 writes it with mm; zeros only when there is no chunk
        alloc = torch.zeros if n_tokens == 0 else new_empty
        grad_w = alloc((vocab, n_hidden), dtype=weight.dtype, device=dev)
    grad_b = torch.zeros((vocab,), dtype=torch.float32, device=dev) if want_b else None
    buf = new_empty((min(chunk, n_tokens), vocab), dtype, dev)
    computes_grad = want_h or want_w or want_b
    for start in range(0, n_tokens, chunk):
        end = min(start + chunk, n_tokens)
        x, logits = hidden[start:end], buf[: end - start]
        project(x, weight, bias, out=logits)
        # the cross-entropy kernel overwrites the logits chunk with its gradient
        ce_forward(logits, labels[start:end], opts, loss_rows[start:end], stats[start:end],
                   grad_out=logits if computes_grad else None,
                   row_weight=_rows(row_weight, start, end) if computes_grad else None)
        if want_h:
            torch.mm(logits, weight, out=grad_h[start:end])
        if want_w:
            if start == 0:
                torch.mm(logits.t(), x, out=grad_w)
            else:
                grad_w.addmm_(logits.t(), x)
        if want_b:
            grad_b += logits.sum(dim=0, dtype=torch.float32)
    if grad_b is not None:
        grad_b = grad_b.to(bias.dtype)
    return loss_rows, grad_h, grad_w, grad_b


# ---------------------------------------------------------------------------------------------------------
# Tuning space
# ---------------------------------------------------------------------------------------------------------
# Tuning key: tokens rounded up to a power of 2 (capped at 16384), the exact vocabulary and hidden size, the
# dtype. Candidates: token chunks of 256-8192 rows whose logits stay within CHUNK_BYTES_BUDGET (tuning trades
# speed within the memory budget, never beyond it). Timed: the pass of a LoRA step (frozen lm_head: loss and
# the gradient of the hidden states).


def _tuning_key(*, n_tokens: int, vocab: int, hidden: int, dtype: torch.dtype) -> dict:
    return dict(n_tokens=rows_bucket(n_tokens, 1, 1 << 14), vocab=vocab, hidden=hidden, dtype=dtype_name(dtype))


def _tuning_example(bucket: dict) -> dict:
    return dict(bucket, dtype=dtype_from_name(bucket["dtype"]))


def _tuning_candidates(bucket: dict):
    elem = torch.finfo(dtype_from_name(bucket["dtype"])).bits // 8
    for chunk in (256, 512, 1024, 2048, 4096, 8192):
        if chunk <= bucket["n_tokens"] and chunk * bucket["vocab"] * elem <= CHUNK_BYTES_BUDGET:
            yield dict(chunk_tokens=chunk)


def _tuning_inputs(bucket: dict, device: torch.device, gen: torch.Generator) -> dict:
    n_tokens, vocab, n_hidden = bucket["n_tokens"], bucket["vocab"], bucket["hidden"]
    dtype = dtype_from_name(bucket["dtype"])
    hidden = torch.randn(n_tokens, n_hidden, device=device, dtype=dtype, generator=gen)
    weight = torch.randn(vocab, n_hidden, device=device, dtype=dtype, generator=gen).div_(n_hidden ** 0.5)
    labels = torch.randint(0, vocab, (n_tokens,), device=device, generator=gen)
    labels[torch.rand(n_tokens, device=device, generator=gen) < 0.05] = -100
    valid = max(1, int((labels != -100).sum()))
    row_weight = torch.full((1,), 1.0 / valid, dtype=torch.float32, device=device)
    return dict(hidden=hidden, weight=weight, labels=labels, row_weight=row_weight)


def _tuning_workspace(bucket: dict) -> int:
    """Bytes a tuning of ``bucket`` allocates: hidden, weight, labels; per pass (the expected one, a candidate's,
    the one before it) the per-token loss and statistics and the hidden-state gradient; one logits chunk."""
    n_tokens, vocab, n_hidden = bucket["n_tokens"], bucket["vocab"], bucket["hidden"]
    elem = dtype_from_name(bucket["dtype"]).itemsize
    return elem * (4 * n_tokens * n_hidden + vocab * n_hidden) + 64 * n_tokens + CHUNK_BYTES_BUDGET


def _tuning_run(inputs: dict):
    loss_rows, grad_h, _, _ = chunked_pass(inputs["hidden"], inputs["weight"], None, inputs["labels"],
                                            LossOptions(), inputs["row_weight"], (True, False, False))
    return loss_rows, grad_h


register_space(
    "fused_linear_cross_entropy",
    params=dict(chunk_tokens=range(1, 1 << 24)),
    key=_tuning_key, example=_tuning_example, candidates=_tuning_candidates,
    make_inputs=_tuning_inputs, run=_tuning_run, workspace=_tuning_workspace,
    worth_tuning=lambda bucket: bucket["n_tokens"] >= 512 and bucket["n_tokens"] * bucket["vocab"] >= 1 << 22,
)


# ---------------------------------------------------------------------------------------------------------
# Autograd and public entry point
# ---------------------------------------------------------------------------------------------------------
class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts: LossOptions, num_items_in_batch, reduction: str):
        want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        divisor = loss_divisor(labels, opts.ignore_index, num_items_in_batch, reduction)
        ctx.opts, ctx.reduction, ctx.want = opts, reduction, want
        if reduction == "none":  # per-row weights arrive with grad_output: the backward recomputes the chunks
            ctx.save_for_backward(hidden, weight, bias, labels)
            return chunked_pass(hidden, weight, bias, labels, opts, None, want)[0]
        ones = torch.ones((), dtype=torch.float32, device=hidden.device)
        loss_rows, *grads = chunked_pass(hidden, weight, bias, labels, opts,
                                          row_weights(ones, divisor, reduction), want)
        ctx.grads = grads
        return reduce_loss(loss_rows, divisor, reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            hidden, weight, bias, labels = ctx.saved_tensors
            _, *grads = chunked_pass(hidden, weight, bias, labels, ctx.opts,
                                      row_weights(grad_output, None, "none"), ctx.want)
        else:
            grads = getattr(ctx, "grads", None)
            if grads is None:
                raise RuntimeError("fused_linear_cross_entropy computes its gradients in the forward and hands "
                                   "them out once: backward through the same graph twice is not supported")
            ctx.grads = None
            grads = [None if g is None else g.mul_(grad_output) for g in grads]
        return grads[0], grads[1], grads[2], None, None, None, None


# ---------------------------------------------------------------------------------------------------------
# torch.compile: the chunked pass as a custom op (one graph node instead of a trace into Triton), and the
# autograd function of the compiled path (Dynamo traces it: the gradients of the forward are saved tensors,
# scaled out of place in the backward)
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("sloth_core::fused_linear_cross_entropy_pass", mutates_args=(), tags=OP_TAGS)
def chunked_pass_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                    ignore_index: int, softcap: float | None, logit_scale: float | None,
                    row_weight: torch.Tensor | None, want_hidden: bool, want_weight: bool,
                    want_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`chunked_pass`, with the label check the traced entry point leaves to it; an empty tensor for each
    gradient not computed."""
    check_label_values(labels, weight.shape[0], ignore_index)
    loss_rows, *grads = chunked_pass(hidden, weight, bias, labels, LossOptions(ignore_index, softcap, logit_scale),
                                     row_weight, (want_hidden, want_weight, want_bias))
    return (loss_rows, *(hidden.new_empty(0) if g is None else g for g in grads))


@chunked_pass_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, softcap, logit_scale, row_weight, want_hidden, want_weight,
      want_bias):
    grads = row_weight is not None
    return (hidden.new_empty(hidden.shape[0], dtype=torch.float32),
            hidden.new_empty(hidden.shape if grads and want_hidden else (0,)),
            weight.new_empty(weight.shape if grads and want_weight else (0,)),
            (bias if grads and want_bias else hidden).new_empty(bias.shape if grads and want_bias else (0,)))


def _traced_pass(hidden, weight, bias, labels, opts: LossOptions, row_weight, want):
    loss_rows, *grads = chunked_pass_op(hidden, weight, bias, labels, opts.ignore_index,
                                        *op_floats(opts.softcap, opts.logit_scale), row_weight, *want)
    return loss_rows, *(g if w and row_weight is not None else None for g, w in zip(grads, want))


class _TracedFusedLinearCrossEntropyFunction(torch.autograd.Function):
    """:class:`FusedLinearCrossEntropyFunction` for a traced graph: the pass is :func:`chunked_pass_op`, the
    forward's gradients are saved tensors and the backward scales them out of place."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts: LossOptions, num_items_in_batch, reduction: str):
        want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        ctx.opts, ctx.reduction, ctx.want = opts, reduction, want
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, labels)
            return _traced_pass(hidden, weight, bias, labels, opts, None, want)[0]
        divisor = loss_divisor(labels, opts.ignore_index, num_items_in_batch, reduction)
        ones = torch.ones((), dtype=torch.float32, device=hidden.device)
        loss_rows, *grads = _traced_pass(hidden, weight, bias, labels, opts, row_weights(ones, divisor, reduction),
                                         want)
        ctx.save_for_backward(*grads)
        return reduce_loss(loss_rows, divisor, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            hidden, weight, bias, labels = ctx.saved_tensors
            _, *grads = _traced_pass(hidden, weight, bias, labels, ctx.opts, row_weights(grad_output, None, "none"),
                                     ctx.want)
        else:
            grads = [None if g is None else g * grad_output.to(g.dtype) for g in ctx.saved_tensors]
        return grads[0], grads[1], grads[2], None, None, None, None


def validate_inputs(hidden, weight, bias) -> None:
    for name, t, dims in (("hidden", hidden, 2), ("weight", weight, 2), ("bias", bias, 1)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a {dims}-D tensor, got {shape}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight: expected shape (vocab, {hidden.shape[1]}) to match hidden "
                         f"{tuple(hidden.shape)}, got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight: the vocabulary dimension is empty")
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def autocast_inputs(hidden, weight, bias):
    """The dtypes ``F.linear`` would compute in under autocast."""
    dev = hidden.device.type
    if not torch.is_autocast_enabled(dev):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(dev)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               bias: torch.Tensor | None = None, ignore_index: int = -100,
                               softcap: float | None = None, logit_scale: float | torch.Tensor | None = None,
                               num_items_in_batch: int | torch.Tensor | None = None,
                               reduction: str = "mean") -> torch.Tensor:
    """``cross_entropy(F.linear(hidden, weight, bias), labels, ...)`` without the [T, V] logits.

    hidden [T, H], weight [V, H] (lm_head), bias [V] or None, labels [T] (already shifted). Gradients are
    computed only for the inputs that require grad. Loss in fp32."""
    validate_inputs(hidden, weight, bias)
    labels = labels.to(hidden.device) if isinstance(labels, torch.Tensor) else labels
    validate_loss_args(labels, hidden.shape[0], weight.shape[0], ignore_index, softcap, logit_scale,
                       num_items_in_batch, reduction)
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    labels = labels.long()
    same_dtype = weight.dtype == hidden.dtype and (bias is None or bias.dtype == hidden.dtype)
    if not triton_ok(hidden, weight, bias) or not same_dtype or torch.is_tensor(logit_scale):
        return fused_linear_cross_entropy_reference(hidden, weight, labels, bias, ignore_index, softcap,
                                                    logit_scale, num_items_in_batch, reduction)
    opts = LossOptions(ignore_index, softcap, logit_scale)
    labels = labels.contiguous()
    with torch.autocast(hidden.device.type, enabled=False):
        if torch.compiler.is_compiling():
            return _TracedFusedLinearCrossEntropyFunction.apply(hidden, weight, bias, labels, opts,
                                                                num_items_in_batch, reduction)
        if _needs_grad(hidden, weight, bias):
            return FusedLinearCrossEntropyFunction.apply(hidden, weight, bias, labels, opts, num_items_in_batch,
                                                         reduction)
        loss_rows = chunked_pass(hidden, weight, bias, labels, opts, None, (False, False, False))[0]
        return reduce_loss(loss_rows, loss_divisor(labels, ignore_index, num_items_in_batch, reduction), reduction)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
