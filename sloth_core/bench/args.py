"""What the ``sloth-core bench`` sub-commands share: the model shapes, modes and kernels they name, and the
positive-integer argument type (a leaf: the sub-commands import it, :mod:`sloth_core.bench.cli` imports them)."""
from __future__ import annotations

import argparse

from ..presets import REAL_MODELS as MODELS  # noqa: F401  (the model shapes the sub-commands take)

MODES = ("fwd", "fwd_bwd")
KERNELS = ("rms_norm", "gated_activation", "rope", "cross_entropy", "fused_linear_cross_entropy", "dequant", "lora")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value
