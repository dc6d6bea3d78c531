"""One LoRA linear (:class:`LoRASpec`) and its frozen base layer (``nn.Linear``, bitsandbytes ``Linear4bit`` or
LLM.int8 ``Linear8bitLt``): the base weight (dequantized on use), the dtypes PEFT computes in, and whether the fused
LoRA functions can run on it."""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import nn

from sloth_core.kernels._runtime import KERNEL_DTYPES, triton_ok
from sloth_core.kernels.dequant_int8 import dequantize_int8, int8_reason


class LoRASpec(NamedTuple):
    """One LoRA linear: the frozen base layer, ``A`` [r, in], ``B`` [out, r], the scale ``s`` and the probability
    ``dropout`` with which PEFT's ``lora_dropout`` zeroes an input element of the LoRA branch on this call (its
    ``p`` in training mode, 0 in eval mode or without dropout)."""

    base_layer: nn.Module
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    dropout: float = 0.0


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
    """``sloth_core.kernels.dequant_plan.dequantize_weight`` when that module is importable, else ``None``."""
    try:
        from sloth_core.kernels.dequant_plan import dequantize_weight
    except ImportError:
        return None
    return dequantize_weight


def _quant_state(layer: nn.Module):
    """The weight's bitsandbytes ``QuantState`` (the module keeps a copy when the parameter lost it, e.g. FSDP)."""
    state = getattr(layer.weight, "quant_state", None)
    return state if state is not None else getattr(layer, "quant_state", None)


def base_weight(base_layer: nn.Module, rows: tuple[int, int] | None = None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """The base weight [out, in] (``rows=(start, stop)``: rows ``start:stop`` only): ``layer.weight`` of an
    ``nn.Linear``; for a bitsandbytes ``Linear4bit`` the dequantized weight (Triton dequantizer when available,
    else ``bitsandbytes.functional.dequantize_4bit``); for an LLM.int8 ``Linear8bitLt`` the dequantized weight in
    ``dtype`` (:func:`dequant_int8.dequantize_int8`; ``dtype`` is required then).

    A dequantized weight is a temporary: use it at once and drop it, so the next dequantization (or anything
    else) reuses its memory (:func:`dequant_plan.dequantize_weight`)."""
    if _is_8bit(base_layer):
        return dequantize_int8(base_layer, dtype, rows)
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
    if _is_8bit(layer):  # bitsandbytes returns x's dtype; under autocast the reference (PEFT's path) runs
        return None if autocast else (x_dtype, x_dtype)
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
        why = int8_reason(layer)
        if why is not None:
            return why
    elif _is_4bit(layer):
        qs = _quant_state(layer)
        if qs is None:
            return "the 4-bit base layer has no quantization state (not quantized yet)"
        if getattr(qs, "packing_format_for_cpu", False):
            return "the 4-bit weight is repacked for bitsandbytes' CPU inference kernel"
    elif type(layer) is not nn.Linear:
        return (f"base layer {type(layer).__name__} is not supported "
                "(torch.nn.Linear and bitsandbytes Linear4bit and Linear8bitLt are)")
    if layer.weight.device.type == "meta":
        return "the base weight is on the meta device (offloaded)"
    return _frozen_base_reason(layer)


def _check_spec(name: str, spec: LoRASpec, in_features: int | None = None) -> None:
    layer, A, B = spec.base_layer, spec.A, spec.B
    out_f, in_f = _layer_dims(layer)
    if A.dim() != 2 or A.shape[1] != in_f:
        raise ValueError(f"{name}.A: expected shape (r, {in_f}), got {tuple(A.shape)}")
    if B.dim() != 2 or B.shape != (out_f, A.shape[0]):
        raise ValueError(f"{name}.B: expected shape ({out_f}, {A.shape[0]}), got {tuple(B.shape)}")
    if in_features is not None and in_features != in_f:
        raise ValueError(f"{name}: the input has {in_features} features but the base layer takes {in_f}")


def _fused_dtypes(x: torch.Tensor, spec: LoRASpec, x_dtype: torch.dtype | None = None):
    """``(compute, output)`` dtypes when the fused path can run this LoRA linear, else ``None``.

    ``None`` while ``torch.compile`` traces: the fused functions keep the base layer as a constant, write into
    their buffers in place and talk to the checkpointing stash, none of which Dynamo traces; the references
    (PEFT's formula in plain torch ops) are traced instead, and inductor compiles them."""
    layer, A, B = spec.base_layer, spec.A, spec.B
    if torch.compiler.is_compiling() or not triton_ok(x, A, B) or _base_reason(layer) is not None:
        return None
    if not (A.device == B.device == layer.weight.device == x.device):
        return None
    dtypes = _dtypes(layer, x_dtype or x.dtype, x.device.type)
    if dtypes is None or dtypes[0] not in KERNEL_DTYPES:
        return None
    return dtypes
