"""The input checks of the 4-bit dequantization (:mod:`sloth_core.kernels.dequant`): the packed codes and their
bitsandbytes ``QuantState`` (quantization type, blocksize, sizes, devices, the nested state) and the output."""
from __future__ import annotations

import math

import torch

from sloth_core.kernels._runtime import cdiv

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit accepts


def _check_quant_type(quant_type) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"dequantize_4bit: quant_state.quant_type is {quant_type!r}; expected one of {QUANT_TYPES}")


def _check_same_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"dequantize_4bit: {name} must be a tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"dequantize_4bit: {name} is on {t.device} but weight_data is on {device}")


def _num_elements(quant_state) -> int:
    if getattr(quant_state, "shape", None) is None:
        raise ValueError("dequantize_4bit: quant_state.shape is missing")
    return math.prod(quant_state.shape)


def _check_inputs(weight_data, quant_state) -> None:
    if not isinstance(weight_data, torch.Tensor):
        raise ValueError(f"dequantize_4bit: weight_data must be a tensor, got {type(weight_data).__name__}")
    if quant_state is None:
        raise ValueError("dequantize_4bit: quant_state is missing (None); pass the weight's "
                         "bitsandbytes QuantState (Params4bit.quant_state)")
    if weight_data.dtype != torch.uint8:
        raise ValueError(f"dequantize_4bit: weight_data must be uint8 (packed 4-bit codes), got {weight_data.dtype}"
                         " (a Params4bit with another quant_storage: pass data.view(torch.uint8))")
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError("dequantize_4bit: weight_data is in bitsandbytes' CPU inference packing "
                         "(packing_format_for_cpu); undo it with "
                         "bitsandbytes.functional._convert_weight_packed_for_cpu_inverse first")
    _check_quant_type(getattr(quant_state, "quant_type", None))
    if quant_state.blocksize not in BLOCKSIZES:
        raise ValueError(f"dequantize_4bit: quant_state.blocksize is {quant_state.blocksize}; "
                         f"expected one of {BLOCKSIZES}")
    n = _num_elements(quant_state)
    if weight_data.numel() != (n + 1) // 2:
        raise ValueError(f"dequantize_4bit: weight_data has {weight_data.numel()} bytes but quant_state.shape "
                         f"{tuple(quant_state.shape)} needs {(n + 1) // 2} (two 4-bit codes a byte)")
    blocks = cdiv(n, quant_state.blocksize)
    device = weight_data.device
    _check_same_device("quant_state.absmax", quant_state.absmax, device)
    if quant_state.absmax.numel() < blocks:
        raise ValueError(f"dequantize_4bit: quant_state.absmax has {quant_state.absmax.numel()} entries, "
                         f"{blocks} blocks need one each")
    if quant_state.nested:
        _check_nested(quant_state, blocks, device)


def _check_nested(quant_state, blocks: int, device: torch.device) -> None:
    s2 = quant_state.state2
    if s2 is None or quant_state.offset is None:
        raise ValueError("dequantize_4bit: nested quant_state without state2/offset")
    if quant_state.absmax.dtype != torch.uint8:
        raise ValueError(f"dequantize_4bit: nested quant_state.absmax must be uint8 codes, "
                         f"got {quant_state.absmax.dtype}")
    _check_same_device("quant_state.state2.absmax", s2.absmax, device)
    _check_same_device("quant_state.state2.code", s2.code, device)
    if isinstance(quant_state.offset, torch.Tensor):
        _check_same_device("quant_state.offset", quant_state.offset, device)
    if s2.absmax.numel() < cdiv(blocks, s2.blocksize) or s2.code.numel() < 256:
        raise ValueError("dequantize_4bit: quant_state.state2 is too small for quant_state.absmax")


def _resolve_out(quant_state, out: torch.Tensor | None, dtype: torch.dtype | None, device,
                 shape: tuple[int, ...] | None = None) -> torch.dtype:
    """The output dtype; checks ``out`` (dtype, device, ``shape``: default ``quant_state.shape``)."""
    dtype = dtype or (out.dtype if out is not None else quant_state.dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dequantize_4bit: output dtype must be a floating dtype, got {dtype}")
    if out is not None:
        if out.dtype != dtype:
            raise ValueError(f"dequantize_4bit: out has dtype {out.dtype} but dtype={dtype} was asked for")
        expected = tuple(quant_state.shape) if shape is None else shape
        if tuple(out.shape) != expected:
            raise ValueError(f"dequantize_4bit: out has shape {tuple(out.shape)}, expected {expected}")
        if out.device != device:
            raise ValueError(f"dequantize_4bit: out is on {out.device} but weight_data is on {device}")
    return dtype
