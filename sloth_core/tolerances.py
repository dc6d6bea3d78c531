"""Dtype-aware tolerances, in one place for the rewriter's verification probes and for the tests.

Two measures are used together:

* the relative error of the whole tensor, ``||a - b|| / ||b||`` (a few ulps of the dtype), unless every
  ``|b|`` is below ``atol`` (then the norm is too small to be relative to), and
* an elementwise ``|a - b| <= atol + rtol * |b|`` check that catches a single wrong element.

NaN never passes (unless both sides hold NaN in the same place, which ``allow_nan`` opts into).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    rel_norm: float  # bound on ||a - b|| / ||b||


_TOLERANCES = {
    torch.float64: Tolerance(1e-9, 1e-9, 1e-10),
    torch.float32: Tolerance(2e-5, 2e-5, 1e-5),
    torch.float16: Tolerance(4e-3, 4e-3, 2e-3),
    torch.bfloat16: Tolerance(1.6e-2, 3.2e-2, 1.2e-2),
}


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> Tolerance:
    """The tolerance for results computed in ``dtype``; ``scale`` widens it for long reductions."""
    t = _TOLERANCES.get(dtype, _TOLERANCES[torch.float32])
    return Tolerance(t.rtol * scale, t.atol * scale, t.rel_norm * scale)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (0 when both are zero)."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    num = torch.linalg.vector_norm(a - e).item()
    den = torch.linalg.vector_norm(e).item()
    if den == 0.0:
        return num
    return num / den


def compare(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
            scale: float = 1.0, relative_always: bool = False) -> str | None:
    """None when ``actual`` matches ``expected`` within the tolerance of ``dtype`` (default: actual's dtype);
    otherwise a one-line reason naming the relative error and the worst element. ``relative_always``: the
    relative-norm bound applies to any ``expected`` that is not all zeros, also one whose every value lies below
    ``atol`` (verification's probes: a small output must still be the right one)."""
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    tol = tolerance(dtype or actual.dtype, scale)
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if a.numel() == 0:
        return None
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if nan_a.any() or nan_e.any():
        if not torch.equal(nan_a, nan_e):
            return f"NaN mismatch: {int(nan_a.sum())} NaN in actual, {int(nan_e.sum())} in expected"
        a, e = a[~nan_a], e[~nan_e]
    if not torch.isfinite(a).all() or not torch.isfinite(e).all():
        fin = torch.isfinite(e)
        if not torch.equal(a[~fin], e[~fin]) or not torch.isfinite(a[fin]).all():
            return "non-finite values differ"
        a, e = a[fin], e[fin]
    r = rel_err(a, e)
    diff = (a - e).abs()
    bound = tol.atol + tol.rtol * e.abs()
    bad = diff > bound
    # a tensor whose every expected value lies below atol (e.g. one tiny element) is judged elementwise alone:
    # its norm is too small for a relative error of it to mean anything
    norm_applies = bool((e.abs() > (0.0 if relative_always else tol.atol)).any())
    if (norm_applies and r > tol.rel_norm) or bad.any():
        i = int(torch.argmax(diff - bound))
        return (f"relative error {r:.3e} (bound {tol.rel_norm:.1e}); worst element {i}: "
                f"{a.flatten()[i].item():.6g} vs {e.flatten()[i].item():.6g} "
                f"({int(bad.sum())} of {bad.numel()} outside atol={tol.atol:.1e}, rtol={tol.rtol:.1e})")
    return None


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 scale: float = 1.0) -> None:
    """Raise ``AssertionError`` naming ``name`` and the relative error when the tensors differ."""
    why = compare(actual, expected, dtype, scale)
    if why is not None:
        raise AssertionError(f"{name}: {why}")


def is_finite_number(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))
