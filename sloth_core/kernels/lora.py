"""LoRA linear layers and LoRA gated MLPs as single autograd functions (PEFT ``lora.Linear`` / ``lora.Linear4bit``).

A PEFT LoRA layer with base ``W`` [out, in] (``nn.Linear``, or a bitsandbytes ``Linear4bit`` dequantized on use),
optional frozen bias ``b``, adapter ``A`` [r, in], ``B`` [out, r] and ``s = scaling[adapter]`` (``alpha / r``, or
``alpha / sqrt(r)`` for rsLoRA), with ``lora_dropout = 0``, computes (``x``: [T, in], rows = tokens)::

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

Gated MLP (:func:`lora_mlp`), ``h = down(act(gate(x)) * up(x))`` with every projection a LoRA linear::

    xa_g = x A_g^T,  g = x W_g^T + s_g xa_g B_g^T           [T, I]
    xa_u = x A_u^T,  u = x W_u^T + s_u xa_u B_u^T           [T, I]
    m    = act(g) * u                                     [T, I]   (gated_activation kernel; not saved)
    ma   = m A_d^T,  h = m W_d^T + s_d ma B_d^T             [T, H]

Backward, given ``dh`` [T, H] (``act'`` and the gated pieces as in :mod:`sloth_core.kernels.gated_activation`)::

    dyB_d = dh B_d;              dB_d = s_d dh^T ma;       dm = dh W_d + s_d dyB_d A_d
    m     = act(g) * u           (recomputed from the saved g, u)   dA_d = s_d dyB_d^T m
    dg    = dm * u * act'(g);    du = dm * act(g)           (one kernel; dg overwrites dm, du overwrites m)
    dyB_g = dg B_g;  dA_g = s_g dyB_g^T x;  dB_g = s_g dg^T xa_g
    dyB_u = du B_u;  dA_u = s_u dyB_u^T x;  dB_u = s_u du^T xa_u
    dx    = dg W_g + s_g dyB_g A_g + du W_u + s_u dyB_u A_u

Saved: ``x``, ``g``, ``u`` ([T, I] each; needed for the activation's gradient anyway) and the [T, r] LoRA
intermediates ``xa_g``, ``xa_u``, ``ma``; ``m`` is recomputed instead of stored. The backward holds at most two
[T, I] temporaries (``dm``/``dg`` and ``m``/``du``); in the recompute of a checkpointed layer, where the saved
``g``, ``u`` are this backward's own, ``dg``/``du`` overwrite them and ``m`` is freed before ``dm`` exists (one
[T, I] temporary).

Checkpointed layers whose MLP output feeds nothing saved (:mod:`sloth_core.recompute`; Llama, Qwen3, Mistral):
both the first forward and the recompute save ``x`` alone (the checkpoint pairs their saved tensors one to one);
in an offloading layer ``x`` goes to the layer's stash instead (host memory, :func:`recompute.mlp_input_stash`) and
nothing is saved, so that the backward runs before the layer's recompute (whose attention tensors are then not
alive at the same time as the backward's temporaries).
The first forward computes ``h`` with ``m`` written over ``g`` and ``g``, ``u`` freed before the down
projection; the recompute computes nothing (its ``h`` is a NaN placeholder nobody reads); the backward
(:func:`_chunked_recompute_backward`) recomputes ``g``, ``u`` itself in column chunks of the intermediate
dimension and gets ``m`` from the gated-activation backward kernel. Alive at once: three [T, I/2] tensors in the
backward (was: ``g``, ``u``, ``dm``, three [T, I]), ``g``, ``u`` in the forward; the gated forward runs once
per step instead of three times, and a 4-bit ``W_gate``/``W_up`` is dequantized by row ranges.

q, k, v on one input (:func:`lora_qkv`), adapters ``A_j`` [r_j, H], ``B_j`` [out_j, r_j], ``j`` in q, k, v::

    xa  = x [A_q; A_k; A_v]^T                              [T, r_q + r_k + r_v]   (x read once)
    y_j = x W_j^T + b_j + s_j xa_j B_j^T                    (xa_j: the columns of adapter j)
    G   = [dy_q B_q | dy_k B_k | dy_v B_v]                  [T, sum r]   (zero columns for an unused output)
    dx  = sum_j dy_j W_j + G [s_q A_q; s_k A_k; s_v A_v]     (one GEMM for the three LoRA terms)
    dA  = G^T x, split by rows: dA_j = s_j (G^T x)_j        (x read once)
    dB_j = s_j dy_j^T xa_j

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
exactly what PEFT does, run instead. :func:`lora_spec` reads a PEFT LoRA layer into a :class:`LoRASpec`, or says
why it is not supported.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sloth_core import recompute
from sloth_core.kernels import gated_activation as _ga
from sloth_core.kernels._runtime import KERNEL_DTYPES, new_empty, triton_ok


class LoRASpec(NamedTuple):
    """One LoRA linear: the frozen base layer, ``A`` [r, in], ``B`` [out, r] and the scale ``s``."""

    base_layer: nn.Module
    A: torch.Tensor
    B: torch.Tensor
    scale: float


# --------------------------------------------------------------------------------------------- base layers


@functools.lru_cache(maxsize=None)
def _bnb_classes() -> tuple[type, ...]:
    """``(Linear4bit, Linear8bitLt)`` of bitsandbytes, or ``()`` when it is not installed."""
    try:
        import bitsandbytes as bnb
    except Exception:  # bitsandbytes missing or unusable on this machine
        return ()
    return bnb.nn.Linear4bit, bnb.nn.Linear8bitLt


def _is_4bit(layer: nn.Module) -> bool:
    classes = _bnb_classes()
    return bool(classes) and isinstance(layer, classes[0])


def _is_8bit(layer: nn.Module) -> bool:
    classes = _bnb_classes()
    return bool(classes) and isinstance(layer, classes[1])


@functools.lru_cache(maxsize=None)
def _triton_dequantizer():
    """``sloth_core.kernels.dequant.dequantize_weight`` when that module is importable, else ``None``."""
    try:
        from sloth_core.kernels.dequant import dequantize_weight
    except ImportError:
        return None
    return dequantize_weight


def _quant_state(layer: nn.Module):
    """The weight's bitsandbytes ``QuantState`` (the module keeps a copy when the parameter lost it, e.g. FSDP)."""
    state = getattr(layer.weight, "quant_state", None)
    return state if state is not None else getattr(layer, "quant_state", None)


def base_weight(base_layer: nn.Module, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The base weight [out, in] (``rows=(start, stop)``: rows ``start:stop`` only): ``layer.weight`` of an
    ``nn.Linear``; for a bitsandbytes ``Linear4bit`` the dequantized weight (Triton dequantizer when available,
    else ``bitsandbytes.functional.dequantize_4bit``).

    A dequantized weight is a temporary: use it at once and drop it, so the next dequantization (or anything
    else) reuses its memory (:func:`dequant.dequantize_weight`)."""
    if not _is_4bit(base_layer):
        return base_layer.weight if rows is None else base_layer.weight[rows[0]:rows[1]]
    dequantize = _triton_dequantizer()
    if dequantize is not None:
        return dequantize(base_layer) if rows is None else dequantize(base_layer, rows=rows)
    import bitsandbytes.functional as bnbf

    weight = bnbf.dequantize_4bit(base_layer.weight.data, _quant_state(base_layer))
    return weight if rows is None else weight[rows[0]:rows[1]]


def _layer_dims(layer: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of the base layer."""
    return int(layer.out_features), int(layer.in_features)


def _compute_dtype_4bit(layer: nn.Module, x_dtype: torch.dtype) -> torch.dtype:
    """The dtype ``Linear4bit.forward`` computes in for an input of ``x_dtype`` (without setting it as a side
    effect: bitsandbytes fixes ``compute_dtype`` to the first input's dtype when that is fp32 or bf16)."""
    if not getattr(layer, "compute_type_is_set", True) and x_dtype in (torch.float32, torch.bfloat16):
        return x_dtype
    return getattr(layer, "compute_dtype", None) or x_dtype


def _dtypes(layer: nn.Module, x_dtype: torch.dtype, device_type: str) -> tuple[torch.dtype, torch.dtype] | None:
    """``(compute dtype, output dtype)`` of the LoRA layer on an input of ``x_dtype``, or ``None`` when PEFT
    would not run it (``nn.Linear`` with mismatched dtypes: the reference raises PEFT's error)."""
    autocast = torch.is_autocast_enabled(device_type)
    if _is_4bit(layer):
        compute = _compute_dtype_4bit(layer, x_dtype)
        out = torch.promote_types(x_dtype, torch.get_autocast_dtype(device_type)) if autocast else x_dtype
        return compute, out
    if autocast:
        dtype = torch.get_autocast_dtype(device_type)
        return dtype, dtype
    return (x_dtype, x_dtype) if layer.weight.dtype == x_dtype else None


def _frozen_base_reason(layer: nn.Module) -> str | None:
    for name in ("weight", "bias"):
        p = getattr(layer, name, None)
        if isinstance(p, torch.Tensor) and p.requires_grad:
            return f"the base layer's {name} is trainable (only a frozen base is supported)"
    return None


def _base_reason(layer: nn.Module) -> str | None:
    """Why the fused path cannot use this base layer (``None``: it can)."""
    if _is_8bit(layer):
        return "8-bit bitsandbytes base layer (Linear8bitLt) is not supported"
    if _is_4bit(layer):
        qs = _quant_state(layer)
        if qs is None:
            return "the 4-bit base layer has no quantization state (not quantized yet)"
        if getattr(qs, "packing_format_for_cpu", False):
            return "the 4-bit weight is repacked for bitsandbytes' CPU inference kernel"
    elif type(layer) is not nn.Linear:
        return (f"base layer {type(layer).__name__} is not supported "
                "(torch.nn.Linear and bitsandbytes Linear4bit are)")
    if layer.weight.device.type == "meta":
        return "the base weight is on the meta device (offloaded)"
    return _frozen_base_reason(layer)


# --------------------------------------------------------------------------------------------- references


def lora_linear_reference(x: torch.Tensor, base_layer: nn.Module, A: torch.Tensor, B: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """PEFT's ``lora.Linear.forward`` / ``lora.Linear4bit.forward`` for one adapter, dropout 0, in their dtypes."""
    result = base_layer(x)
    if _is_4bit(base_layer):  # peft/tuners/lora/bnb.py: the LoRA term is cast to the result dtype, then added
        result = result.clone()
        convert = not torch.is_autocast_enabled()
        x_lora = x.to(A.dtype) if convert else x
        lora = F.linear(F.linear(x_lora, A), B) * scale
        return result + (lora.to(result.dtype) if convert else lora)
    result_dtype = result.dtype  # peft/tuners/lora/layer.py: added (type promotion), then cast back
    lora = F.linear(F.linear(x.to(A.dtype), A), B) * scale
    return (result + lora).to(result_dtype)


def lora_mlp_reference(x: torch.Tensor, gate: LoRASpec, up: LoRASpec, down: LoRASpec,
                       activation: str) -> torch.Tensor:
    """HF's gated MLP ``down(act(gate(x)) * up(x))`` with PEFT LoRA projections."""
    g = lora_linear_reference(x, *gate)
    u = lora_linear_reference(x, *up)
    return lora_linear_reference(_ga.gated_activation_reference(g, u, activation), *down)


# --------------------------------------------------------------------------------------------- GEMM pieces


_NO_OUT_DTYPE_MM: set[str] = set()  # device types where torch.mm(..., out_dtype=) turned out unavailable


def _mm_to(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` written in ``dtype`` (fp32 accumulation). Mixed dtypes: cuBLAS' fp32 output of fp16/bf16 GEMMs
    (``out_dtype``) on CUDA; elsewhere the operands are upcast (exact products)."""
    if a.dtype == dtype:
        return torch.mm(a, b)
    if a.device.type == "cuda" and "cuda" not in _NO_OUT_DTYPE_MM and dtype == torch.float32:
        try:
            return torch.mm(a, b, out_dtype=dtype)
        except (TypeError, NotImplementedError):  # this torch has no out_dtype: never again
            _NO_OUT_DTYPE_MM.add("cuda")
        except RuntimeError:  # these operands only (a layout cuBLAS' fp32 output does not take)
            pass
    return torch.mm(a.to(dtype), b.to(dtype))


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``scale * (a @ b)`` in ``dtype`` with a single rounding."""
    if a.dtype == dtype:  # beta=0: the (possibly NaN-poisoned) destination is ignored
        return new_empty((a.shape[0], b.shape[1]), dtype, a.device).addmm_(a, b, beta=0, alpha=scale)
    return _mm_to(a, b, dtype).mul_(scale)


def _base_bias(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    bias = getattr(layer, "bias", None)
    return None if bias is None else bias.to(dtype)


def _base_plus_lora(x: torch.Tensor, xa: torch.Tensor, layer: nn.Module, B: torch.Tensor, scale: float,
                    rows: tuple[int, int] | None = None, keep_weight: bool = False):
    """``x W^T + b + s * xa B^T`` given ``xa = x A^T``, in ``x``'s dtype; with ``rows = (c0, c1)`` only the output
    features ``c0:c1`` (rows of ``W``, ``b``, ``B``). ``keep_weight``: returns ``(y, W)``, the (dequantized) ``W``
    in ``x``'s dtype for a later use.

    The small LoRA term is written first (``s * xa B^T``, rounded once) and the base GEMM adds into it (``beta =
    1``: cuBLAS reads it in the epilogue of a compute-bound GEMM). Adding the LoRA term afterwards would read and
    write the whole ``[T, out]`` output once more in a memory-bound kernel of its own."""
    bias = _base_bias(layer, x.dtype)
    if rows is not None:
        bias = None if bias is None else bias[rows[0]:rows[1]]
        B = B[rows[0]:rows[1]]
    y = _scaled_mm(xa, B.to(x.dtype).t(), scale, x.dtype)
    if bias is not None:
        y += bias
    w = base_weight(layer, rows).to(x.dtype)
    y.addmm_(x, w.t())
    if keep_weight:
        return y, w
    del w  # a dequantized weight is used once unless the caller keeps it
    return y


def _input_xa(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``x A^T`` [T, r] in ``x``'s dtype (the forward, a recompute and a backward that recomputes it agree)."""
    return torch.mm(x, A.to(x.dtype).t())


def _shared_input_xa(x: torch.Tensor, As) -> list[torch.Tensor]:
    """``[x A_1^T, x A_2^T, ...]`` from one GEMM ``x [A_1; A_2; ...]^T`` (``x`` read once); column views of it."""
    xa = _input_xa(x, torch.cat(As))
    return [xa[:, cols] for cols in _rank_slices(As)]


def _project(x: torch.Tensor, spec: LoRASpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of one LoRA linear on 2-D ``x`` in the compute dtype: ``(y, xa)``."""
    layer, A, B, scale = spec
    xa = _input_xa(x, A)
    return _base_plus_lora(x, xa, layer, B, scale), xa


def _base_input_grad(dy: torch.Tensor, layer: nn.Module, accumulate: torch.Tensor | None = None,
                     rows: tuple[int, int] | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``dy W`` (``W``'s rows ``c0:c1`` with ``rows = (c0, c1)``), added to ``accumulate`` in place when given;
    ``weight``: that ``W`` (rows) in ``dy``'s dtype, already at hand."""
    w = base_weight(layer, rows).to(dy.dtype) if weight is None else weight
    dx = torch.mm(dy, w) if accumulate is None else accumulate.addmm_(dy, w)
    del w
    return dx


def _input_grad(dy: torch.Tensor, dyB: torch.Tensor, spec: LoRASpec,
                accumulate: torch.Tensor | None = None) -> torch.Tensor:
    """``dy W + s * dyB A`` (added to ``accumulate`` in place when given): the LoRA term first, the base GEMM
    adding into it (as :func:`_base_plus_lora`)."""
    layer, A, _, scale = spec
    if accumulate is None:
        lora = _scaled_mm(dyB, A.to(dy.dtype), scale, dy.dtype)
    else:
        lora = accumulate.addmm_(dyB, A.to(dy.dtype), alpha=scale)
    return _base_input_grad(dy, layer, lora)


def _project_backward(dy: torch.Tensor, x: torch.Tensor, xa: torch.Tensor, spec: LoRASpec,
                      needs: tuple[bool, bool, bool], accumulate: torch.Tensor | None = None):
    """``(dx, dA, dB)`` of one LoRA linear (``None`` where ``needs`` says the gradient is not wanted)."""
    need_dx, need_dA, need_dB = needs
    _, A, B, scale = spec
    dyB = torch.mm(dy, B.to(dy.dtype)) if need_dx or need_dA else None
    dA = _scaled_mm(dyB.t(), x, scale, A.dtype) if need_dA else None
    dB = _scaled_mm(dy.t(), xa, scale, B.dtype) if need_dB else None
    dx = _input_grad(dy, dyB, spec, accumulate) if need_dx else accumulate
    return dx, dA, dB


def _no_autocast(device_type: str):
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------- autograd


class _LoRALinearFunction(torch.autograd.Function):
    """One LoRA linear on 2-D ``x`` in the compute dtype; the base layer and scale ride along as constants."""

    @staticmethod
    def forward(ctx, x, A, B, base_layer, scale):
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
        ctx.base_layer, ctx.scale = base_layer, scale
        ctx.stashed = call.handle if call is not None else None
        if ctx.stashed is None:
            ctx.save_for_backward(x, xa, A, B)
        else:
            ctx.params = (A, B)
        return y

    @staticmethod
    def backward(ctx, dy):
        if ctx.stashed is None:
            x, xa, A, B = ctx.saved_tensors
        else:
            (A, B), x = ctx.params, ctx.stashed.restore()
            xa = _input_xa(x, A)  # as the forward computed it
        with _no_autocast(dy.device.type):
            dx, dA, dB = _project_backward(dy, x, xa, LoRASpec(ctx.base_layer, A, B, ctx.scale),
                                           tuple(ctx.needs_input_grad[:3]))
        return dx, dA, dB, None, None


class _LoRAMLPFunction(torch.autograd.Function):
    """``down(act(gate(x)) * up(x))`` on 2-D ``x``; ``layers`` = the three base layers, ``scales`` their s.

    In a checkpointed layer (:mod:`sloth_core.recompute`) the backward receives the recompute's ``g``, ``u``,
    fresh tensors it alone reads, so it writes ``dg``, ``du`` over them; and where the layer's MLP output feeds
    nothing saved, the recompute does not compute the down projection (only ``ma``, which the backward needs)."""

    @staticmethod
    def forward(ctx, x, A_g, B_g, A_u, B_u, A_d, B_d, layers, scales, activation):
        ctx.layers, ctx.scales, ctx.activation = layers, scales, activation
        ctx.chunked = recompute.mlp_recomputed_in_backward()
        ctx.stashed = None
        if ctx.chunked:  # the backward recomputes g, u chunk by chunk from x
            stash = recompute.mlp_input_stash()
            if stash is None:
                ctx.save_for_backward(x, A_g, B_g, A_u, B_u, A_d, B_d)
            else:  # nothing saved through the checkpoint: this backward runs before the layer's recompute
                ctx.stashed = (None if recompute.recomputing() else stash(x), (A_g, B_g, A_u, B_u, A_d, B_d))
            if recompute.mlp_output_unused():  # the recompute: nothing reads h
                recompute.STATS.mlp_outputs_skipped += 1
                return _unused_output(x, _layer_dims(layers[2])[0])
        gate, up, down = _specs(layers, (A_g, A_u, A_d), (B_g, B_u, B_d), scales)
        xa_g, xa_u = _shared_input_xa(x, (gate.A, up.A))
        g = _base_plus_lora(x, xa_g, gate.base_layer, gate.B, gate.scale)
        u = _base_plus_lora(x, xa_u, up.base_layer, up.B, up.scale)
        if ctx.chunked:  # g, u are not saved: m over g, u freed before the down projection
            m = _ga._forward(g, u, activation, out=g)
            del g, u
        else:
            m = _ga._forward(g, u, activation)
        h, ma = _project(m, down)
        del m
        if not ctx.chunked:
            ctx.save_for_backward(x, g, u, xa_g, xa_u, ma, A_g, B_g, A_u, B_u, A_d, B_d)
            ctx.overwrite_saved = recompute.in_checkpointed_layer()  # the backward gets the recompute's g, u
        return h

    @staticmethod
    def backward(ctx, dh):
        need = ctx.needs_input_grad[:7]
        if ctx.chunked:
            if ctx.stashed is None:
                x, A_g, B_g, A_u, B_u, A_d, B_d = ctx.saved_tensors
            else:
                x, (A_g, B_g, A_u, B_u, A_d, B_d) = ctx.stashed[0].restore(), ctx.stashed[1]
            specs = _specs(ctx.layers, (A_g, A_u, A_d), (B_g, B_u, B_d), ctx.scales)
            with _no_autocast(dh.device.type):
                grads = _chunked_recompute_backward(dh, x, *specs, ctx.activation, need)
            return (*grads, None, None, None)
        x, g, u, xa_g, xa_u, ma, A_g, B_g, A_u, B_u, A_d, B_d = ctx.saved_tensors
        gate, up, down = _specs(ctx.layers, (A_g, A_u, A_d), (B_g, B_u, B_d), ctx.scales)
        with _no_autocast(dh.device.type):
            dA_d, dB_d, dg, du = _down_and_gated_backward(dh, g, u, ma, down, ctx.activation, need[5], need[6],
                                                          overwrite=ctx.overwrite_saved)
            del g, u
            dx, dA_g, dB_g = _project_backward(dg, x, xa_g, gate, (need[0], need[1], need[2]))
            dx, dA_u, dB_u = _project_backward(du, x, xa_u, up, (need[0], need[3], need[4]), accumulate=dx)
        return dx, dA_g, dB_g, dA_u, dB_u, dA_d, dB_d, None, None, None


# The chunked recompute-backward: the intermediate dimension I is cut into RECOMPUTE_CHUNKS column ranges of a
# multiple of CHUNK_MULTIPLE columns (GEMM tiles; a 4-bit weight's row ranges then start at quantization blocks).
# Two chunks: three [T, I/2] temporaries stay below the forward's peak (g, u: two [T, I]); more chunks cost GEMM
# efficiency (H200, Llama-3-8B shapes: four chunks made the dx GEMMs 17% slower:
# benchmarks/results/lora_gemm_shapes_h200_20261129.txt).
RECOMPUTE_CHUNKS = 2
CHUNK_MULTIPLE = 128


def chunk_bounds(inter: int) -> list[tuple[int, int]]:
    """The column ranges ``[(c0, c1), ...]`` of ``[0, inter)`` the chunked MLP backward works in."""
    width = -(-inter // RECOMPUTE_CHUNKS)
    width = max(CHUNK_MULTIPLE, -(-width // CHUNK_MULTIPLE) * CHUNK_MULTIPLE)
    return [(c0, min(inter, c0 + width)) for c0 in range(0, inter, width)]


def _chunked_recompute_backward(dh, x, gate: LoRASpec, up: LoRASpec, down: LoRASpec, activation: str, need):
    """The MLP's gradients ``(dx, dA_g, dB_g, dA_u, dB_u, dA_d, dB_d)`` from ``x`` alone, the intermediate
    dimension in column chunks ``c`` (:func:`chunk_bounds`); ``None`` where ``need`` says no. Per chunk::

        g_c  = x W_g[c]^T + s_g xa_g B_g[c]^T,   u_c likewise       (recomputed; W rows dequantized per use,
                                                                  W_u[c]'s kept for dx)
        dm_c = dh W_d[:, c] + s_d dyB_d A_d[:, c]
        dg_c, du_c, m_c = one kernel over (dm_c, g_c, u_c), written over (g_c, u_c, dm_c)
        dA_d[:, c] = s_d dyB_d^T m_c;   ma += m_c A_d[:, c]^T;   dB_g[c] = s_g dg_c^T xa_g (u likewise)
        dyB_g += dg_c B_g[c] (u likewise);   dx += du_c W_u[c] + dg_c W_g[c]

    and at the end ``dB_d = s_d dh^T ma``, ``dA_g = s_g dyB_g^T x``, ``dx += s_g dyB_g A_g + s_u dyB_u A_u``
    (u likewise). ``ma`` and ``dyB`` ([T, r]) are summed over the chunks in fp32 and rounded once, as the
    unchunked path rounds them; the column slices of ``dA_d``, ``dB_g``, ``dB_u`` are exactly the unchunked ones;
    ``dx`` is accumulated in its dtype by the GEMMs (two roundings a chunk instead of two in all). Alive at once:
    three [T, |c|] tensors instead of four [T, I]. A 4-bit ``W_d`` is dequantized once a chunk and dropped once
    ``dm_c`` is computed: it is not alive next to ``g_c``, ``u_c``, ``dm_c`` and a weight's rows (the step's memory
    peak): one dequantization more a chunk for 112 MiB less at that peak (Llama-3-8B's ``W_d`` in bf16)."""
    need_dx, need_Ag, need_Bg, need_Au, need_Bu, need_Ad, need_Bd = need
    dtype, tokens = dh.dtype, x.shape[0]
    A_g, B_g, A_u, B_u, A_d, B_d = (t.to(dtype) for t in (gate.A, gate.B, up.A, up.B, down.A, down.B))
    xa_g, xa_u = _shared_input_xa(x, (A_g, A_u))
    dyB_d = torch.mm(dh, B_d)

    def fp32_sum(wanted: bool, rank: int):
        return torch.zeros((tokens, rank), dtype=torch.float32, device=dh.device) if wanted else None

    dyB_g, dyB_u = fp32_sum(need_dx or need_Ag, A_g.shape[0]), fp32_sum(need_dx or need_Au, A_u.shape[0])
    ma = fp32_sum(need_Bd, A_d.shape[0])
    dA_d = new_empty(down.A.shape, down.A.dtype, dh.device) if need_Ad else None
    dB_g = new_empty(gate.B.shape, gate.B.dtype, dh.device) if need_Bg else None
    dB_u = new_empty(up.B.shape, up.B.dtype, dh.device) if need_Bu else None
    dx = None
    for c0, c1 in chunk_bounds(A_d.shape[1]):
        w_d = base_weight(down.base_layer).to(dtype)  # a 4-bit one: dequantized, dropped before g_c (see above)
        dm = _scaled_mm(dyB_d, A_d[:, c0:c1], down.scale, dtype).addmm_(dh, w_d[:, c0:c1])
        del w_d
        g = _base_plus_lora(x, xa_g, gate.base_layer, B_g, gate.scale, (c0, c1))
        u, w_u = _base_plus_lora(x, xa_u, up.base_layer, B_u, up.scale, (c0, c1), keep_weight=True)
        dg, du = _ga._backward(dm, g, u, activation, out=(g, u), h_out=dm)
        m = dm
        if need_Ad:
            dA_d[:, c0:c1] = _scaled_mm(dyB_d.t(), m, down.scale, dA_d.dtype)
        if need_Bd:
            ma += _mm_to(m, A_d[:, c0:c1].t(), torch.float32)
        del m, dm
        if need_Bg:
            dB_g[c0:c1] = _scaled_mm(dg.t(), xa_g, gate.scale, dB_g.dtype)
        if need_Bu:
            dB_u[c0:c1] = _scaled_mm(du.t(), xa_u, up.scale, dB_u.dtype)
        if dyB_g is not None:
            dyB_g += _mm_to(dg, B_g[c0:c1], torch.float32)
        if dyB_u is not None:
            dyB_u += _mm_to(du, B_u[c0:c1], torch.float32)
        if need_dx:  # u's weight rows first, while at hand (dropped before W_g's rows are dequantized again)
            dx = _base_input_grad(du, up.base_layer, dx, (c0, c1), weight=w_u)
            w_u = None
            dx = _base_input_grad(dg, gate.base_layer, dx, (c0, c1))
        del dg, du, g, u, w_u
    dB_d = _scaled_mm(dh.t(), ma.to(dtype), down.scale, down.B.dtype) if need_Bd else None
    dA_g = _scaled_mm(dyB_g.to(dtype).t(), x, gate.scale, gate.A.dtype) if need_Ag else None
    dA_u = _scaled_mm(dyB_u.to(dtype).t(), x, up.scale, up.A.dtype) if need_Au else None
    if need_dx:
        dx.addmm_(dyB_g.to(dtype), A_g, alpha=gate.scale).addmm_(dyB_u.to(dtype), A_u, alpha=up.scale)
    return dx, dA_g, dB_g, dA_u, dB_u, dA_d, dB_d


class _LoRAQKVFunction(torch.autograd.Function):
    """The LoRA linears of q, k, v on one 2-D input ``x`` (:func:`lora_qkv`): three outputs, one node."""

    @staticmethod
    def forward(ctx, x, A_q, B_q, A_k, B_k, A_v, B_v, layers, scales):
        As, Bs = (A_q, A_k, A_v), (B_q, B_k, B_v)
        # [T, r] each from one GEMM (x read once), made contiguous (cuBLAS-friendly, tiny)
        xas = [xa.contiguous() for xa in _shared_input_xa(x, As)]
        # In an offloading layer keeping q/k/v outputs (its checkpointing mode): the first forward's outputs
        # go to host memory, and the recompute (whose x is bitwise the first forward's) takes them back instead of
        # running the three projections again; it saves the same tensors.
        stash = recompute.layer_stash()
        slot = stash.qkv_slot() if stash is not None else None
        outs = stash.kept_qkv(slot) if slot is not None else None
        if outs is None:
            outs = tuple(_base_plus_lora(x, xa_j, layer, B, scale)
                         for layer, B, scale, xa_j in zip(layers, Bs, scales, xas))
            if slot is not None:
                stash.keep_qkv(slot, outs)
        ctx.save_for_backward(x, *xas, *As, *Bs)
        ctx.layers, ctx.scales = layers, scales
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None (no zero [T, out] tensor)
        return outs

    @staticmethod
    def backward(ctx, *dys):
        x, *rest = ctx.saved_tensors
        xas, As, Bs = rest[:3], rest[3:6], rest[6:]
        need_dx, need = ctx.needs_input_grad[0], ctx.needs_input_grad[1:7]
        with _no_autocast(x.device.type):
            grads = _qkv_backward(dys, x, xas, As, Bs, ctx.layers, ctx.scales, need_dx, need)
        return (*grads, None, None)


def _rank_slices(As) -> list[slice]:
    """The columns of each adapter's ``x A^T`` in the concatenated ``xa``."""
    ends = list(itertools.accumulate(A.shape[0] for A in As))
    return [slice(end - A.shape[0], end) for A, end in zip(As, ends)]


def _qkv_backward(dys, x, xas, As, Bs, layers, scales, need_dx: bool, need):
    """``(dx, dA_q, dB_q, dA_k, dB_k, dA_v, dB_v)``: ``G = [dy_q B_q | dy_k B_k | dy_v B_v]`` ([T, sum r], zero
    where an output got no gradient), ``dx = sum dy_j W_j + G [s_q A_q; s_k A_k; s_v A_v]`` (one LoRA GEMM),
    ``dA = G^T x`` once, split and scaled per adapter, ``dB_j = s_j dy_j^T xa_j``."""
    dtype = x.dtype
    G = torch.cat([torch.mm(dy, B.to(dtype)) if dy is not None else x.new_zeros((x.shape[0], B.shape[1]))
                   for dy, B in zip(dys, Bs)], dim=1)
    dx = None
    if need_dx:  # the LoRA terms first, the base GEMMs adding into them (as _base_plus_lora)
        dx = torch.mm(G, torch.cat([(A.float() * s).to(dtype) for A, s in zip(As, scales)]))
        for dy, layer in zip(dys, layers):
            if dy is not None:
                dx = _base_input_grad(dy, layer, dx)
    dA_all = _mm_to(G.t(), x, torch.float32) if any(need[0::2]) else None  # [sum r, H], x read once
    grads = []
    for j, (dy, xa, A, B, scale, cols) in enumerate(zip(dys, xas, As, Bs, scales, _rank_slices(As))):
        used = dy is not None  # an unused output gives its adapter no gradient, as in PEFT
        grads.append((dA_all[cols] * scale).to(A.dtype) if need[2 * j] and used else None)
        grads.append(_scaled_mm(dy.t(), xa, scale, B.dtype) if need[2 * j + 1] and used else None)
    return (dx, *grads)


def _specs(layers, As, Bs, scales) -> tuple[LoRASpec, ...]:
    return tuple(LoRASpec(*parts) for parts in zip(layers, As, Bs, scales))


def _unused_output(like: torch.Tensor, features: int) -> torch.Tensor:
    """A NaN [T, features] tensor that takes no memory (an expanded scalar): the output of a computation skipped
    because nothing reads it. Should anything read it after all, the NaNs make that loud."""
    return torch.full((1, 1), float("nan"), dtype=like.dtype, device=like.device).expand(like.shape[0], features)


def _down_and_gated_backward(dh, g, u, ma, down: LoRASpec, activation: str, need_dA: bool, need_dB: bool,
                             overwrite: bool = False):
    """Through the down projection and the gated activation: ``(dA_d, dB_d, dg, du)``. ``overwrite``: ``dg``,
    ``du`` are written over ``g``, ``u`` (the caller's are then gone), which keeps three [T, I] tensors alive at
    most instead of four."""
    _, A_d, B_d, scale = down
    dyB = torch.mm(dh, B_d.to(dh.dtype))
    dB = _scaled_mm(dh.t(), ma, scale, B_d.dtype) if need_dB else None
    m = dA = None
    if need_dA:
        m = _ga._forward(g, u, activation)  # m = act(g) * u, recomputed
        dA = _scaled_mm(dyB.t(), m, scale, A_d.dtype)
    if overwrite:
        m = None  # freed before dm exists
    dm = _input_grad(dh, dyB, down)
    if overwrite:
        out = (g, u)
    else:  # dg over dm; du over m (or a new buffer)
        out = (dm, m if m is not None else new_empty(g.shape, g.dtype, g.device))
    dg, du = _ga._backward(dm, g, u, activation, out=out)
    return dA, dB, dg, du


# --------------------------------------------------------------------------------------------- public API


def _check_spec(name: str, spec: LoRASpec, in_features: int | None = None) -> None:
    layer, A, B, _ = spec
    out_f, in_f = _layer_dims(layer)
    if A.dim() != 2 or A.shape[1] != in_f:
        raise ValueError(f"{name}.A: expected shape (r, {in_f}), got {tuple(A.shape)}")
    if B.dim() != 2 or B.shape != (out_f, A.shape[0]):
        raise ValueError(f"{name}.B: expected shape ({out_f}, {A.shape[0]}), got {tuple(B.shape)}")
    if in_features is not None and in_features != in_f:
        raise ValueError(f"{name}: the input has {in_features} features but the base layer takes {in_f}")


def _fused_dtypes(x: torch.Tensor, spec: LoRASpec, x_dtype: torch.dtype | None = None):
    """``(compute, output)`` dtypes when the fused path can run this LoRA linear, else ``None``."""
    layer, A, B, _ = spec
    if not triton_ok(x, A, B) or _base_reason(layer) is not None:
        return None
    if not (A.device == B.device == layer.weight.device == x.device):
        return None
    dtypes = _dtypes(layer, x_dtype or x.dtype, x.device.type)
    if dtypes is None or dtypes[0] not in KERNEL_DTYPES:
        return None
    return dtypes


def lora_linear(x: torch.Tensor, base_layer: nn.Module, A: torch.Tensor, B: torch.Tensor,
                scale: float) -> torch.Tensor:
    """``base_layer(x) + scale * (x A^T) B^T`` as PEFT's LoRA layer computes it, in one autograd function.

    ``x`` [..., in]; ``base_layer`` ``nn.Linear`` or bitsandbytes ``Linear4bit`` (frozen); ``A`` [r, in];
    ``B`` [out, r]. Falls back to :func:`lora_linear_reference` when the fused path cannot run."""
    spec = LoRASpec(base_layer, A, B, float(scale))
    _check_spec("lora", spec, x.shape[-1])
    dtypes = _fused_dtypes(x, spec)
    if dtypes is None or x.numel() == 0:
        return lora_linear_reference(x, *spec)
    compute, out = dtypes
    x2 = x.reshape(-1, x.shape[-1]).to(compute)
    with _no_autocast(x.device.type):
        y = _LoRALinearFunction.apply(x2, A, B, base_layer, spec.scale)
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(out)


def _mlp_dtypes(x: torch.Tensor, gate: LoRASpec, up: LoRASpec, down: LoRASpec):
    """``(compute, output)`` dtypes when the fused MLP can run: gate and up compute and return one dtype that the
    down projection computes in; ``None`` otherwise."""
    first = _fused_dtypes(x, gate)
    if first is None or _fused_dtypes(x, up) != first or first[0] != first[1]:
        return None
    last = _fused_dtypes(x, down, x_dtype=first[1])
    if last is None or last[0] != first[0]:
        return None
    return first[0], last[1]


def lora_mlp(x: torch.Tensor, gate: LoRASpec, up: LoRASpec, down: LoRASpec, activation: str) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` with PEFT LoRA projections, in one autograd function.

    ``x`` [..., H]; ``gate``/``up``: LoRA linears H -> I, ``down``: I -> H (:class:`LoRASpec` each);
    ``activation`` in ``gated_activation.ACTIVATIONS``. Falls back to :func:`lora_mlp_reference`."""
    _ga._check_activation(activation)
    gate, up, down = (LoRASpec(s.base_layer, s.A, s.B, float(s.scale)) for s in (gate, up, down))
    _check_spec("gate", gate, x.shape[-1])
    _check_spec("up", up, x.shape[-1])
    if _layer_dims(gate.base_layer)[0] != _layer_dims(up.base_layer)[0]:
        raise ValueError(f"up: out_features {_layer_dims(up.base_layer)[0]} differ from gate's "
                         f"{_layer_dims(gate.base_layer)[0]}")
    _check_spec("down", down, _layer_dims(gate.base_layer)[0])
    dtypes = _mlp_dtypes(x, gate, up, down)
    if dtypes is None or x.numel() == 0:
        return lora_mlp_reference(x, gate, up, down, activation)
    compute, out = dtypes
    x2 = x.reshape(-1, x.shape[-1]).to(compute)
    layers = (gate.base_layer, up.base_layer, down.base_layer)
    scales = (gate.scale, up.scale, down.scale)
    with _no_autocast(x.device.type):
        h = _LoRAMLPFunction.apply(x2, gate.A, gate.B, up.A, up.B, down.A, down.B, layers, scales, activation)
    return h.reshape(*x.shape[:-1], h.shape[-1]).to(out)


def lora_qkv_reference(x: torch.Tensor, q: LoRASpec, k: LoRASpec, v: LoRASpec) -> tuple[torch.Tensor, ...]:
    """PEFT's three LoRA layers on the same input."""
    return tuple(lora_linear_reference(x, *spec) for spec in (q, k, v))


def lora_qkv(x: torch.Tensor, q: LoRASpec, k: LoRASpec, v: LoRASpec) -> tuple[torch.Tensor, ...]:
    """The q, k, v LoRA linears of an attention on the same ``x`` [..., H], in one autograd function: ``x`` is
    read once for the three ``x A^T`` (concatenated adapters), and the backward reads it once for the three
    ``dA`` and adds the three LoRA input-gradient terms with one GEMM. Each output equals :func:`lora_linear` of
    its projection (same roundings, up to the rounding of ``s A`` in the input gradient). When the three cannot
    run fused together (a reference-path projection, different compute/output dtypes) each runs
    :func:`lora_linear` on its own."""
    specs = tuple(LoRASpec(sp.base_layer, sp.A, sp.B, float(sp.scale)) for sp in (q, k, v))
    for name, spec in zip(("q", "k", "v"), specs):
        _check_spec(name, spec, x.shape[-1])
    dtypes = [_fused_dtypes(x, spec) for spec in specs]
    if dtypes[0] is None or any(d != dtypes[0] for d in dtypes) or x.numel() == 0:
        return tuple(lora_linear(x, *spec) for spec in specs)
    compute, out = dtypes[0]
    x2 = x.reshape(-1, x.shape[-1]).to(compute)
    params = [t for spec in specs for t in (spec.A, spec.B)]
    with _no_autocast(x.device.type):
        ys = _LoRAQKVFunction.apply(x2, *params, tuple(sp.base_layer for sp in specs),
                                    tuple(sp.scale for sp in specs))
    return tuple(y.reshape(*x.shape[:-1], y.shape[-1]).to(out) for y in ys)


# --------------------------------------------------------------------------------------------- PEFT layers


@functools.lru_cache(maxsize=None)
def _peft_classes() -> tuple[type, tuple[type, ...]]:
    """``(LoraLayer, the LoRA linear classes the fused path computes)``."""
    from peft.tuners.lora.layer import Linear, LoraLayer

    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # peft without bitsandbytes support
        return LoraLayer, (Linear,)
    return LoraLayer, (Linear, Linear4bit)


def _hooks_reason(name: str, module: nn.Module) -> str | None:
    if module._forward_hooks or module._forward_pre_hooks:
        return f"{name} has forward hooks (the fused path would skip them)"
    return None


def _adapter_reason(layer: nn.Module, adapter: str) -> str | None:
    """Why the one active adapter is not plain LoRA (``None``: it is)."""
    if adapter in getattr(layer, "lora_variant", {}):
        return (f"adapter {adapter!r} uses the {type(layer.lora_variant[adapter]).__name__} variant "
                "(DoRA, ...); only plain LoRA is supported")
    dropout = layer.lora_dropout[adapter]
    if not isinstance(dropout, nn.Identity):
        return f"lora_dropout={getattr(dropout, 'p', '?')} (only 0 is supported)"
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        return "lora_bias=True is not supported"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out=True is not supported"
    lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_B.bias is not None:
        return "the adapter's lora_A/lora_B are not bias-free nn.Linear layers"
    return _hooks_reason("lora_A", lora_A) or _hooks_reason("lora_B", lora_B)


def lora_spec(peft_lora_layer: nn.Module) -> LoRASpec | str:
    """The :class:`LoRASpec` of a PEFT LoRA linear layer, or the reason the fused functions cannot compute it.

    Cheap (attribute reads): call it at each forward, since adapters can be switched, merged or disabled."""
    layer = peft_lora_layer
    try:
        lora_layer, linear_classes = _peft_classes()
    except ImportError:
        return "peft is not installed"
    if not isinstance(layer, lora_layer):
        return f"{type(layer).__name__} is not a PEFT LoRA layer"
    base = layer.get_base_layer()
    why = _base_reason(base)
    if why is not None:
        return why
    if not isinstance(layer, linear_classes):
        return f"PEFT LoRA layer {type(layer).__name__} is not supported (LoRA Linear and Linear4bit are)"
    if layer.disable_adapters:
        return "the adapters are disabled"
    if layer.merged:
        return "the adapters are merged into the base weight"
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return f"{len(active)} active LoRA adapters ({', '.join(active) or 'none'}); exactly one is supported"
    adapter = active[0]
    why = _adapter_reason(layer, adapter) or _hooks_reason("the base layer", base)
    if why is not None:
        return why
    return LoRASpec(base, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, float(layer.scaling[adapter]))
