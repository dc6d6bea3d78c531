"""The GEMM pieces the fused LoRA functions are built of: ``x W^T + b + s xa B^T`` with the LoRA term written first
and the base GEMM adding into it, the input gradient likewise, and mixed-dtype products with one rounding; and what
the functions share besides (autocast off inside, the placeholder of an output nothing reads)."""
from __future__ import annotations

import contextlib
import itertools

import torch
from torch import nn

from sloth_core.kernels._runtime import new_empty
from sloth_core.kernels.lora_base import LoRASpec, base_weight


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
    w = base_weight(layer, rows, x.dtype).to(x.dtype)
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
    layer, A, B, scale = spec[:4]
    xa = _input_xa(x, A)
    return _base_plus_lora(x, xa, layer, B, scale), xa


def _base_input_grad(dy: torch.Tensor, layer: nn.Module, accumulate: torch.Tensor | None = None,
                     rows: tuple[int, int] | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``dy W`` (``W``'s rows ``c0:c1`` with ``rows = (c0, c1)``), added to ``accumulate`` in place when given;
    ``weight``: that ``W`` (rows) in ``dy``'s dtype, already at hand."""
    w = base_weight(layer, rows, dy.dtype).to(dy.dtype) if weight is None else weight
    dx = torch.mm(dy, w) if accumulate is None else accumulate.addmm_(dy, w)
    del w
    return dx


def _input_grad(dy: torch.Tensor, dyB: torch.Tensor, spec: LoRASpec,
                accumulate: torch.Tensor | None = None) -> torch.Tensor:
    """``dy W + s * dyB A`` (added to ``accumulate`` in place when given): the LoRA term first, the base GEMM
    adding into it (as :func:`_base_plus_lora`)."""
    layer, A, _, scale = spec[:4]
    if accumulate is None:
        lora = _scaled_mm(dyB, A.to(dy.dtype), scale, dy.dtype)
    else:
        lora = accumulate.addmm_(dyB, A.to(dy.dtype), alpha=scale)
    return _base_input_grad(dy, layer, lora)


def _project_backward(dy: torch.Tensor, x: torch.Tensor, xa: torch.Tensor, spec: LoRASpec,
                      needs: tuple[bool, bool, bool], accumulate: torch.Tensor | None = None):
    """``(dx, dA, dB)`` of one LoRA linear (``None`` where ``needs`` says the gradient is not wanted)."""
    need_dx, need_dA, need_dB = needs
    _, A, B, scale = spec[:4]
    dyB = torch.mm(dy, B.to(dy.dtype)) if need_dx or need_dA else None
    dA = _scaled_mm(dyB.t(), x, scale, A.dtype) if need_dA else None
    dB = _scaled_mm(dy.t(), xa, scale, B.dtype) if need_dB else None
    dx = _input_grad(dy, dyB, spec, accumulate) if need_dx else accumulate
    return dx, dA, dB


def _rank_slices(As) -> list[slice]:
    """The columns of each adapter's ``x A^T`` in the concatenated ``xa``."""
    ends = list(itertools.accumulate(A.shape[0] for A in As))
    return [slice(end - A.shape[0], end) for A, end in zip(As, ends)]


def _no_autocast(device_type: str):
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _unused_output(like: torch.Tensor, features: int) -> torch.Tensor:
    """A NaN [T, features] tensor that takes no memory (an expanded scalar): the output of a computation skipped
    because nothing reads it. Should anything read it after all, the NaNs make that loud."""
    return torch.full((1, 1), float("nan"), dtype=like.dtype, device=like.device).expand(like.shape[0], features)
