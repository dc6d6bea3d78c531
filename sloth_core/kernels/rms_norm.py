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

import torch

from sloth_core import recompute
from sloth_core.kernels._runtime import triton_ok
from sloth_core.kernels.rms_norm_launch import _backward, _forward, rms_norm_fwd_op

CASTS = ("llama", "gemma")


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
    if torch.compiler.is_compiling():  # one graph node; no offloading layer's stash under compile
        return rms_norm_fwd_op(x, weight, float(eps), float(offset), cast == "gemma")[0]
    return _RMSNormFunction.apply(x, weight, float(eps), float(offset), cast == "gemma")
