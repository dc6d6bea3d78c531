"""The weight of a bitsandbytes LLM.int8 layer (``Linear8bitLt`` with ``has_fp16_weights=False``, what
``load_in_8bit`` gives), dequantized: the one home of that fact (the fused LoRA functions and ``save_merged`` use
it).

bitsandbytes 0.50 keeps the weight row-wise quantized: ``CB`` int8 [out, in] (the parameter's data) and ``SCB``
float32 [out], the absolute maximum of each row, with::

    W[i, j] = CB[i, j] * (SCB[i] * (1 / 127))          (the product in float32, rounded once to ``dtype``)

exactly as bitsandbytes' own backward and its CPU training path dequantize it
(``CB.to(dtype).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0))`` in ``bitsandbytes/autograd/_functions.py``; ``CB`` is exact
in every float dtype). ``SCB`` sits on the parameter until the layer's first forward, which moves it (and ``CB``)
to ``layer.state``.

What the dequantized weight does *not* reproduce: bitsandbytes' forward on a GPU (``MatMul8bitLt``) also quantizes
the *input* row-wise to int8 and multiplies in int8 (columns of the input with a value above ``threshold``, when
``threshold > 0``, in fp16). That forward approximates ``x W^T`` with this ``W``; a GEMM on the dequantized weight
computes ``x W^T`` itself, to the rounding of its dtype. Whether the two agree within the tolerance of the dtype is
established per module by the verification probe against bitsandbytes' own forward (:mod:`sloth_core.verify`).
"""
from __future__ import annotations

import torch
from torch import nn


def int8_parts(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(CB, SCB)`` of a quantized ``Linear8bitLt`` (or ``None`` when its weight is not quantized: an fp16
    weight, or int8 data without its row statistics)."""
    weight = layer.weight
    state = getattr(layer, "state", None)
    cb = weight.data if weight.dtype == torch.int8 else getattr(state, "CB", None)
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = getattr(state, "SCB", None)
    if cb is None or scb is None or cb.dtype != torch.int8 or cb.dim() != 2 or scb.shape != (cb.shape[0],):
        return None
    return cb, scb


def int8_reason(layer: nn.Module) -> str | None:
    """Why the dequantized weight of this ``Linear8bitLt`` cannot stand for its weight (``None``: it can)."""
    state = getattr(layer, "state", None)
    if getattr(state, "has_fp16_weights", False):
        return "the 8-bit base layer keeps a trainable fp16 weight (has_fp16_weights=True)"
    if int8_parts(layer) is None:
        return "the 8-bit base layer is not quantized (no int8 weight with its row scales SCB)"
    return None


def dequantize_int8(layer: nn.Module, dtype: torch.dtype = torch.float32,
                    rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The weight [out, in] of a quantized ``Linear8bitLt`` in ``dtype`` (``rows=(start, stop)``: those rows only),
    bitwise as bitsandbytes dequantizes it. A fresh temporary: use it and drop it."""
    parts = int8_parts(layer)
    if parts is None:
        raise ValueError(f"dequantize_int8: {int8_reason(layer)}")
    cb, scb = parts
    if rows is not None:
        cb, scb = cb[rows[0]:rows[1]], scb[rows[0]:rows[1]]
    return cb.to(dtype, copy=True).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))
