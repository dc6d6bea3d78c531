"""The memory layout of a tensor kept in host memory."""
from __future__ import annotations

import torch


def dense_order(x: torch.Tensor) -> tuple[int, ...] | None:
    """A permutation ``p`` with ``x.permute(p)`` contiguous (``x`` dense in some dimension order, e.g. an attention
    output [B, H, T, D] laid out as [B, T, H, D]), or ``None``."""
    if x.is_contiguous():
        return tuple(range(x.dim()))
    order = tuple(sorted(range(x.dim()), key=lambda d: (-x.stride(d), -x.shape[d])))
    return order if x.permute(order).is_contiguous() else None
