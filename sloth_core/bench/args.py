"""What the ``sloth-core bench`` sub-commands share: the model shapes, modes and kernels they name, the
positive-integer argument type and the checks of named choices (a leaf: the sub-commands import it,
:mod:`sloth_core.bench.cli` imports them)."""
from __future__ import annotations

import argparse
from typing import Iterable, Sequence

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


def _sloth_options(opt_in: Sequence[str], exclude: Sequence[str]) -> dict:
    """``optimize``'s ``opt_in`` / ``exclude`` options, the names checked before anything is built."""
    from ..registry.patterns import ALL_PATTERNS, OPT_IN_PATTERNS

    options = {}
    if opt_in:
        options["opt_in"] = tuple(_known(opt_in, [p.name for p in OPT_IN_PATTERNS], "opt-in pattern"))
    if exclude:
        options["exclude"] = tuple(_known(exclude, [p.name for p in ALL_PATTERNS], "pattern"))
    return options


def _known(values: Iterable[str] | str, known: Iterable[str], what: str) -> list[str]:
    values = [values] if isinstance(values, str) else list(values)
    known = list(known)
    unknown = [v for v in values if v not in known]
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(map(repr, unknown))}; known: {', '.join(known) or '(none)'}")
    if not values:
        raise ValueError(f"no {what} given; known: {', '.join(known)}")
    return list(dict.fromkeys(values))
