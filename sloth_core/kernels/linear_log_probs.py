"""Per-token log-probabilities of the lm_head projection -- with the entropy and the top-1 flag -- never
materializing the full [T, V] logits. What TRL's fused LM head asks of a model (``SFTTrainer``: ``log_probs``,
``entropy``, ``is_top1``).

Math, per token t (``x`` = the lm_head output row in the input dtype, ``y`` = its label, never ignored)::

    z   = c * tanh((x * s) / c)          # optional logit scale s, soft-cap c -- in fp32, from the loaded logits
    lse = log sum_v exp(z_v)
    log_prob = z_y - lse
    entropy  = lse - sum_v p_v z_v       # p = softmax(z)
    is_top1  = z_y >= max_v z_v  and  z_y > max_{v < y} z_v      # the label is argmax's (first) maximum

Backward (``g`` = dL/dlog_prob, ``h`` = dL/dentropy)::

    dL/dz_v = g (1[v = y] - p_v)  -  h p_v (log p_v + entropy)
    dL/dx   = dL/dz * dz/dx,     dX = dL/dx W,     dW = dL/dx^T X,     db = sum_t dL/dx

Algorithm: the tokens go in chunks (the ``fused_linear_cross_entropy`` heuristic: a chunk of logits stays within
~0.5 GiB); each chunk is projected with a torch matmul in the input dtype, then one Triton program per row makes an
online pass over the vocabulary (row max ``m``, ``s = sum exp(z - m)``, ``a = sum exp(z - m) (z - m)`` rescaled as
``m`` grows, the largest ``z`` left of the label) and writes the row's log-prob, entropy and top-1 flag.

The gradient is per row linear in ``g``: when only the hidden states need it (a frozen lm_head: every LoRA /
QLoRA run), the same program writes ``D = (1[v = y] - p) dz/dx`` over the logits chunk and ``D W`` is stored in
the forward; the backward multiplies row t by ``g_t`` (two matmuls a chunk instead of three: no recompute). A
trainable weight or bias, or a gradient arriving for the entropy, takes the exact recompute path in the backward:
``chunked_pass`` of :mod:`.fused_linear_cross_entropy` with row weights ``-g`` (log_prob = -loss row) when only
``g`` arrives, else the reference on each chunk under autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sloth_core.autotune import config_for
from sloth_core.kernels._runtime import launch_kernel, new_empty, triton_ok
from sloth_core.kernels.cross_entropy import transform_logits_reference
from sloth_core.kernels.cross_entropy_kernels import LossOptions, launch_params, logit_transform, write_row_grad
from sloth_core.kernels.fused_linear_cross_entropy import autocast_inputs, chunked_pass, project, validate_inputs


# ---------------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------------
def linear_log_probs_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               bias: torch.Tensor | None = None, softcap: float | None = None,
                               logit_scale: float | None = None):
    """``(log_probs, entropy, is_top1)`` per row from the full logits ``F.linear(hidden, weight, bias)`` (in the
    input dtype), transformed and upcast as :func:`transform_logits_reference` does (fp32, or float64 inputs)."""
    logits = F.linear(hidden, weight, bias)
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    z = transform_logits_reference(z, softcap, logit_scale)
    log_p = torch.log_softmax(z, dim=-1)
    labels = labels.long().unsqueeze(-1)
    log_probs = log_p.gather(-1, labels).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    is_top1 = z.argmax(-1) == labels.squeeze(-1)
    return log_probs, entropy, is_top1


# ---------------------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _log_probs_kernel(logits_ptr, stride_logits, labels_ptr, logp_ptr, entropy_ptr, top1_ptr, n_rows, n_cols,
                      ignore_index, scale, cap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                      COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, NUM_CHUNKS: tl.constexpr,
                      ROWS_PER_PROGRAM: tl.constexpr):
    """Rows ``pid * ROWS_PER_PROGRAM ...``: log-prob, entropy, top-1 flag (fp32; the flag as 0/1). ``COMPUTE_GRAD``:
    the row of logits is overwritten with ``(1[v = y] - p) dz/dx`` (``ignore_index`` is never a label here: every row
    is valid)."""
    row_start = tl.program_id(0) * ROWS_PER_PROGRAM
    offs = tl.arange(0, BLOCK_V)
    for i in range(ROWS_PER_PROGRAM):
        row = row_start + i
        if row < n_rows:
            row64 = row.to(tl.int64)
            x_row = logits_ptr + row64 * stride_logits
            label = tl.load(labels_ptr + row)
            m = tl.full((), float("-inf"), tl.float32)
            s = tl.zeros((), tl.float32)
            a = tl.zeros((), tl.float32)  # sum exp(z - m) (z - m)
            before = tl.full((), float("-inf"), tl.float32)  # the largest z left of the label
            for chunk in range(NUM_CHUNKS):
                cols = chunk * BLOCK_V + offs
                mask = cols < n_cols
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                z, _ = logit_transform(x, scale, cap, HAS_SCALE, HAS_SOFTCAP)
                z = tl.where(mask, z, float("-inf"))
                before = tl.maximum(before, tl.max(tl.where(cols < label, z, float("-inf")), axis=0))
                m_new = tl.maximum(m, tl.max(z, axis=0))
                alpha = tl.exp(m - m_new)
                # shifting the old terms from (z - m) to (z - m_new); the first chunk has none (s = 0, m = -inf)
                a_old = a + s * tl.where(s > 0.0, m - m_new, 0.0)
                d = tl.where(mask, z - m_new, 0.0)
                e = tl.where(mask, tl.exp(d), 0.0)
                a = a_old * alpha + tl.sum(e * d, axis=0)
                s = s * alpha + tl.sum(e, axis=0)
                m = m_new
            log_s = tl.log(s)
            z_label, _ = logit_transform(tl.load(x_row + label).to(tl.float32), scale, cap, HAS_SCALE, HAS_SOFTCAP)
            tl.store(logp_ptr + row, (z_label - m) - log_s)
            tl.store(entropy_ptr + row, log_s - a / s)
            tl.store(top1_ptr + row, tl.where((z_label >= m) & (z_label > before), 1.0, 0.0))
            if COMPUTE_GRAD:
                # w = -1: the gradient of -loss_t = log_prob_t
                write_row_grad(x_row, x_row, n_cols, m, log_s, label, label != ignore_index, -1.0, scale, cap,
                                HAS_SCALE, HAS_SOFTCAP, BLOCK_V, NUM_CHUNKS)


def _rows_pass(logits: torch.Tensor, labels: torch.Tensor, opts: LossOptions, out: torch.Tensor,
               compute_grad: bool) -> None:
    """``out`` [3, T] fp32 (log-prob, entropy, top-1) of the ``logits`` chunk [T, V]; with ``compute_grad`` the
    chunk is overwritten with the unweighted gradient of the log-probs."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    grid, params = launch_params(logits)
    launch_kernel(_log_probs_kernel, grid, logits, logits.stride(0), labels, out[0], out[1], out[2], n_rows, n_cols,
                  COMPUTE_GRAD=compute_grad, **opts.kernel_args(), **params)


def _forward_pass(hidden, weight, bias, labels, opts: LossOptions, eager_grad: bool):
    """(out [3, T] fp32, D W [T, H] in the hidden dtype or ``None``)."""
    n_tokens, n_hidden = hidden.shape
    vocab = weight.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    chunk = config_for("fused_linear_cross_entropy", n_tokens=n_tokens, vocab=vocab, hidden=n_hidden,
                       dtype=dtype)["chunk_tokens"]
    out = new_empty((3, n_tokens), torch.float32, dev)
    unit_grad = new_empty((n_tokens, n_hidden), dtype, dev) if eager_grad else None
    buf = new_empty((min(chunk, n_tokens), vocab), dtype, dev)
    for start in range(0, n_tokens, chunk):
        end = min(start + chunk, n_tokens)
        logits = buf[: end - start]
        project(hidden[start:end], weight, bias, out=logits)
        _rows_pass(logits, labels[start:end], opts, out[:, start:end], eager_grad)
        if eager_grad:
            torch.mm(logits, weight, out=unit_grad[start:end])
    return out, unit_grad


def _reference_grads(hidden, weight, bias, labels, opts: LossOptions, grad_logp, grad_entropy, want):
    """The exact gradients through :func:`linear_log_probs_reference`, a chunk of tokens at a time."""
    n_tokens = hidden.shape[0]
    chunk = config_for("fused_linear_cross_entropy", n_tokens=n_tokens, vocab=weight.shape[0],
                       hidden=hidden.shape[1], dtype=hidden.dtype)["chunk_tokens"]
    grads = [torch.zeros_like(t, dtype=torch.float32) if t is not None and w else None
             for t, w in zip((hidden, weight, bias), want)]
    w_in = weight.detach().requires_grad_(want[1])
    b_in = None if bias is None else bias.detach().requires_grad_(want[2])
    for start in range(0, n_tokens, chunk):
        end = min(start + chunk, n_tokens)
        h_in = hidden[start:end].detach().requires_grad_(want[0])
        with torch.enable_grad():
            logp, ent, _ = linear_log_probs_reference(h_in, w_in, labels[start:end], b_in, opts.softcap,
                                                      opts.logit_scale)
            total = sum((o * g[start:end]).sum() for o, g in ((logp, grad_logp), (ent, grad_entropy))
                        if g is not None)
        wrt = [t for t, w in zip((h_in, w_in, b_in), want) if t is not None and w]
        got = iter(torch.autograd.grad(total, wrt, allow_unused=True))
        for i, (t, w) in enumerate(zip((h_in, w_in, b_in), want)):
            if t is None or not w:
                continue
            g = next(got)
            if g is None:
                continue
            if i == 0:
                grads[0][start:end] = g
            else:
                grads[i] += g
    return [None if g is None else g.to(t.dtype) for g, t in zip(grads, (hidden, weight, bias))]


class LinearLogProbsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts: LossOptions):
        ctx.set_materialize_grads(False)  # an entropy used for logging only sends no gradient
        want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        eager = want == (True, False, False)
        out, unit_grad = _forward_pass(hidden, weight, bias, labels, opts, eager)
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.opts, ctx.want, ctx.unit_grad = opts, want, unit_grad
        log_probs, entropy, top1 = out[0], out[1], out[2] > 0.5
        ctx.mark_non_differentiable(top1)
        return log_probs, entropy, top1

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy, _grad_top1):
        hidden, weight, bias, labels = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None
        unit_grad = ctx.unit_grad
        if grad_entropy is None and unit_grad is not None:
            ctx.unit_grad = None
            grad_h = (unit_grad.float() * grad_logp.float().unsqueeze(-1)).to(hidden.dtype)
            return grad_h, None, None, None, None
        if grad_entropy is None:
            row_weight = (-grad_logp.float()).contiguous()
            _, gh, gw, gb = chunked_pass(hidden, weight, bias, labels, ctx.opts, row_weight, ctx.want)
            return gh, gw, gb, None, None
        gh, gw, gb = _reference_grads(hidden, weight, bias, labels, ctx.opts, grad_logp, grad_entropy, ctx.want)
        return gh, gw, gb, None, None


def linear_log_probs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                     bias: torch.Tensor | None = None, softcap: float | None = None,
                     logit_scale: float | None = None):
    """``(log_probs [T] fp32, entropy [T] fp32, is_top1 [T] bool)`` of ``F.linear(hidden, weight, bias)`` against
    ``labels`` [T] (already shifted, every one in ``[0, V)``), without the [T, V] logits. Gradients flow to the
    inputs that require them from ``log_probs`` and ``entropy``. Triton on CUDA (or under the interpreter), the
    reference otherwise (float64, CPU, mixed dtypes, a tensor-valued ``logit_scale``)."""
    validate_inputs(hidden, weight, bias)
    if not isinstance(labels, torch.Tensor) or labels.shape != (hidden.shape[0],) or labels.is_floating_point():
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels: expected an integer tensor of shape ({hidden.shape[0]},), got {shape}")
    labels = labels.to(hidden.device).long()
    if labels.numel() and bool(((labels < 0) | (labels >= weight.shape[0])).any()):
        raise ValueError(f"labels: every value must lie in [0, {weight.shape[0]})")
    if softcap is not None and not float(softcap) > 0.0:
        raise ValueError(f"softcap: expected a positive number or None, got {softcap!r}")
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    same_dtype = weight.dtype == hidden.dtype and (bias is None or bias.dtype == hidden.dtype)
    if not triton_ok(hidden, weight, bias) or not same_dtype or torch.is_tensor(logit_scale):
        return linear_log_probs_reference(hidden, weight, labels, bias, softcap, logit_scale)
    opts = LossOptions(-1, softcap, logit_scale)  # no label equals -1: every row counts
    with torch.autocast(hidden.device.type, enabled=False):
        return LinearLogProbsFunction.apply(hidden, weight, bias, labels.contiguous(), opts)
