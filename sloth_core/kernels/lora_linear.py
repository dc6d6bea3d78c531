"""A LoRA linear layer as one autograd function (PEFT ``lora.Linear`` / ``lora.Linear4bit`` /
``lora.Linear8bitLt``), and its reference.

A PEFT LoRA layer with base ``W`` [out, in] (``nn.Linear``, or a bitsandbytes ``Linear4bit`` / LLM.int8
``Linear8bitLt`` dequantized on use), optional frozen bias ``b``, adapter ``A`` [r, in], ``B`` [out, r] and
``s = scaling[adapter]`` (``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA), with ``lora_dropout = 0`` (the
dropout path is in :class:`_LoRALinearFunction`'s docstring), computes (``x``: [T, in], rows = tokens)::

    y = x W^T + b + s * (x A^T) B^T

Forward (:func:`lora_linear`)::

    xa = x A^T                                   [T, r]    saved for dB
    y  = s * xa B^T (+ b);  y += x W^T           (the LoRA term rounded once, then the base GEMM adds into it
                                                  with beta = 1: no extra memory pass over y)

Backward, given ``dy`` [T, out]::

    dyB = dy B                                   [T, r]
    dx  = s * dyB A;  dx += dy W                 (W dequantized again; the LoRA term first, as in the forward)
    dA  = s * dyB^T x                            [r, in]
    dB  = s * dy^T xa                            [out, r]

The frozen base gets no gradient. Saved for backward: ``x``, ``xa`` (and the parameters ``A``, ``B``, and a
reference to the base layer). The dequantized ``W`` of a 4-bit base is never kept from forward to backward: it is
dequantized once in the forward and once in the backward (each use), into a temporary dropped right after its GEMM.
Gradients are computed only for the inputs that require them (``dx`` if ``x`` does, ``dA``/``dB`` if the
adapter does).

Precision: the LoRA branch runs in the base (compute) dtype, not in fp32 as PEFT does. PEFT keeps the adapter in
fp32 when the base is bf16/fp16 (``autocast_adapter_dtype=True``) and computes ``x.float() A^T`` and
``(.) B^T`` in fp32 and adds that to the rounded base output before rounding once more. Here ``A`` and ``B`` are
rounded to the compute dtype (``r * (in + out)`` elements, negligible), ``xa`` is rounded once, and the LoRA term
is accumulated into the base output in fp32 by the GEMM epilogue (one final rounding). With ``u`` the unit roundoff
of the dtype (bf16: 2^-8, fp16: 2^-11) the output differs from PEFT's by at most ~3u relative *of the LoRA
delta* ``s x A^T B^T`` (rounding of A, B and xa), plus one rounding of ``y`` that PEFT does too — i.e. within the
tolerance of the base dtype, which the result is returned in anyway. ``dA``/``dB`` come out in the adapter dtype
(fp32): on CUDA the GEMMs take bf16/fp16 operands and write fp32 (``torch.mm(..., out_dtype=float32)``, fp32
accumulation), so they differ from PEFT's fp32 gradients only by the roundings of ``B`` and ``dyB`` (~2u
relative); ``dx = dy W`` gets ``s dyB A`` added in place by addmm (two roundings of dx, as PEFT's sum of the
base and LoRA gradients has), plus the roundings of ``B``, ``dyB`` and ``A`` on the LoRA term. Doing the
branch in fp32 instead would cost fp32 copies of ``x`` [T, in] (forward and backward) and ``dy`` [T, out], an fp32
[T, out] LoRA output and fp32 (non-tensor-core) GEMMs: about three times the memory traffic of the bf16 branch,
for accuracy the bf16 output cannot show. The one place PEFT's fp32 branch is visibly more accurate: all these
errors are relative to the magnitudes of the terms summed, so a gradient whose terms cancel (e.g. dA of a single
token with r = 1, one dot product times x) has a large error relative to itself (PEFT's has too, smaller); the
tests measure such errors against the terms' magnitude. (With fp16 a LoRA intermediate beyond 65504 would
overflow where PEFT's fp32 would not.) When the base is fp32 everything is fp32, as in PEFT.

Dtypes follow the modules: ``nn.Linear`` computes in its weight dtype (the autocast dtype under autocast);
``Linear4bit`` casts ``x`` to its ``compute_dtype`` (as bitsandbytes picks it) and returns ``x``'s dtype. The
functions run with autocast off inside.

Dispatch: the fused functions run when the tensors are on a device Triton can run on (``triton_ok``: the 4-bit
dequantizer and the gated-activation kernel are Triton) in a kernel dtype, the base is frozen, and the dtypes are
consistent; otherwise (float64, CPU without the interpreter, a trainable base, ...) the references, which compute
exactly what PEFT does, run instead. :func:`lora_peft.lora_spec` reads a PEFT LoRA layer into a
:class:`LoRASpec`, or says why it is not supported.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sloth_core import recompute
from sloth_core.kernels.lora_base import LoRASpec, _check_spec, _fused_dtypes, _is_4bit, _is_8bit, _layer_dims
from sloth_core.kernels.lora_gemm import (_base_input_grad, _base_plus_lora, _input_xa, _no_autocast, _project,
                                          _project_backward, _scaled_mm, _unused_output)


def lora_linear_reference(x: torch.Tensor, base_layer: nn.Module, A: torch.Tensor, B: torch.Tensor,
                          scale: float, dropout: float = 0.0) -> torch.Tensor:
    """PEFT's ``lora.Linear.forward`` / ``lora.Linear4bit.forward`` / ``lora.Linear8bitLt.forward`` for one adapter
    (``dropout``: its ``lora_dropout`` in training mode, applied as ``nn.Dropout`` does), in their dtypes."""
    result = base_layer(x)
    if _is_4bit(base_layer) or _is_8bit(base_layer):  # peft/tuners/lora/bnb.py: the LoRA term is cast to the
        result = result.clone()                         # result dtype, then added
        convert = not torch.is_autocast_enabled()
        x_lora = x.to(A.dtype) if convert else x
        lora = F.linear(F.linear(_dropped(x_lora, dropout), A), B) * scale
        return result + (lora.to(result.dtype) if convert else lora)
    result_dtype = result.dtype  # peft/tuners/lora/layer.py: added (type promotion), then cast back
    lora = F.linear(F.linear(_dropped(x.to(A.dtype), dropout), A), B) * scale
    return (result + lora).to(result_dtype)


def _dropped(x: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(x, p, training=True) if p > 0 else x


def _mask_dtype(x: torch.Tensor, base_layer: nn.Module, A: torch.Tensor) -> torch.dtype:
    """The dtype of the tensor PEFT's ``lora_dropout`` sees: ``x`` cast to the adapter's dtype, except on a
    bitsandbytes base under autocast (no cast there)."""
    quantized = _is_4bit(base_layer) or _is_8bit(base_layer)
    return x.dtype if quantized and torch.is_autocast_enabled(x.device.type) else A.dtype


def dropout_mask(x: torch.Tensor, p: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, factor)``: the elements of ``x`` PEFT's ``nn.Dropout(p)`` keeps (bool, ``x``'s shape) and the
    factor it multiplies them by (``1 / (1 - p)`` in ``dtype``, a 0-dim tensor), drawn from torch's generator
    exactly as ``nn.Dropout`` draws them on a ``dtype`` tensor of ``x``'s shape and device: the same call on ones,
    whose result is ``keep * factor``. The generator advances as PEFT's would, so the same seed gives the same
    masks here and in PEFT, and every later draw (the next layer's mask) agrees too."""
    drawn = F.dropout(torch.ones(x.shape, dtype=dtype, device=x.device), p, training=True)
    keep = drawn != 0
    factor = torch.ones((), dtype=dtype, device=x.device).div_(1 - p)  # as dropout scales what it keeps
    return keep, factor


class _LoRALinearFunction(torch.autograd.Function):
    """One LoRA linear on 2-D ``x`` in the compute dtype; the base layer and scale ride along as constants.

    With dropout (``keep``/``factor`` from :func:`dropout_mask`, ``keep`` [T, in] bool): the LoRA branch reads
    ``xd = x * keep * factor``; saved are ``xd`` (instead of ``x``: the backward needs ``x`` only through it) and
    ``keep`` (one byte an element)::

        xa = xd A^T;  y = s xa B^T + x W^T
        dA = s dyB^T xd;  dB = s dy^T xa;  dx = (s dyB A) * keep * factor + dy W
    """

    @staticmethod
    def forward(ctx, x, A, B, base_layer, scale, keep, factor):
        ctx.base_layer, ctx.scale, ctx.factor = base_layer, scale, factor
        ctx.stashed = None
        if keep is not None:  # dropout: no stash path (the recompute draws and saves the same tensors)
            xd = _through_dropout(x, keep, factor)
            xa = _input_xa(xd, A)
            y = _base_plus_lora(x, xa, base_layer, B, scale)
            ctx.save_for_backward(xd, xa, A, B, keep)
            return y
        stash = recompute.layer_stash()
        # In an offloading layer (memory.stash.LayerStash.projection): the output projection of a kept attention
        # output takes x back from that host copy and saves nothing through the checkpoint; in the recompute, the
        # output projection whose output no saved tensor depends on computes only what it saves (xa).
        call = stash.projection(x) if stash is not None else None
        if call is not None and call.output_unused:
            recompute.STATS.projection_outputs_skipped += 1
            xa = _input_xa(x, A)
            y = _unused_output(x, _layer_dims(base_layer)[0])
        else:
            y, xa = _project(x, LoRASpec(base_layer, A, B, scale))
            if call is not None:
                stash.projected(call, y)
        ctx.stashed = call.handle if call is not None else None
        if ctx.stashed is None:
            ctx.save_for_backward(x, xa, A, B)
        else:
            ctx.params = (A, B)
        return y

    @staticmethod
    def backward(ctx, dy):
        keep = None
        if ctx.stashed is not None:
            (A, B), x = ctx.params, ctx.stashed.restore()
            xa = _input_xa(x, A)  # as the forward computed it
        elif ctx.factor is not None:
            x, xa, A, B, keep = ctx.saved_tensors  # x: the dropped input xd
        else:
            x, xa, A, B = ctx.saved_tensors
        spec = LoRASpec(ctx.base_layer, A, B, ctx.scale)
        need_dx, need_dA, need_dB = ctx.needs_input_grad[:3]
        with _no_autocast(dy.device.type):
            if keep is None:
                dx, dA, dB = _project_backward(dy, x, xa, spec, (need_dx, need_dA, need_dB))
            else:
                _, dA, dB = _project_backward(dy, x, xa, spec, (False, need_dA, need_dB))
                dx = _dropped_input_grad(dy, keep, ctx.factor, spec) if need_dx else None
        return dx, dA, dB, None, None, None, None


def _dropped_input_grad(dy: torch.Tensor, keep: torch.Tensor, factor: torch.Tensor, spec: LoRASpec) -> torch.Tensor:
    """``(s dy B A) * keep * factor + dy W``: the LoRA term through the dropout, the base GEMM adding into it."""
    dyB = torch.mm(dy, spec.B.to(dy.dtype))
    lora = _scaled_mm(dyB, spec.A.to(dy.dtype), spec.scale, dy.dtype)
    return _base_input_grad(dy, spec.base_layer, _through_dropout(lora, keep, factor))


def _through_dropout(t: torch.Tensor, keep: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``t * keep * factor`` in ``t``'s dtype, the product taken in ``factor``'s dtype (PEFT's dropout runs on the
    input cast to the adapter dtype, fp32 under a bf16 base) and rounded once."""
    return torch.where(keep, t.to(factor.dtype) * factor, 0).to(t.dtype)


def lora_linear(x: torch.Tensor, base_layer: nn.Module, A: torch.Tensor, B: torch.Tensor,
                scale: float, dropout: float = 0.0) -> torch.Tensor:
    """``base_layer(x) + scale * (x A^T) B^T`` as PEFT's LoRA layer computes it, in one autograd function;
    ``dropout`` > 0: PEFT's ``lora_dropout`` in training mode, the mask drawn as it draws it (:func:`dropout_mask`).

    ``x`` [..., in]; ``base_layer`` ``nn.Linear``, bitsandbytes ``Linear4bit`` or ``Linear8bitLt`` (frozen); ``A``
    [r, in]; ``B`` [out, r]. Falls back to :func:`lora_linear_reference` when the fused path cannot run."""
    spec = LoRASpec(base_layer, A, B, float(scale), float(dropout))
    _check_spec("lora", spec, x.shape[-1])
    dtypes = _fused_dtypes(x, spec)
    if dtypes is None or x.numel() == 0 or not 0 <= spec.dropout < 1:
        return lora_linear_reference(x, *spec)
    compute, out = dtypes
    keep = factor = None
    if spec.dropout > 0:
        keep, factor = dropout_mask(x, spec.dropout, _mask_dtype(x, base_layer, A))
        keep = keep.reshape(-1, x.shape[-1])
    x2 = x.reshape(-1, x.shape[-1]).to(compute)
    with _no_autocast(x.device.type):
        y = _LoRALinearFunction.apply(x2, A, B, base_layer, spec.scale, keep, factor)
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(out)
