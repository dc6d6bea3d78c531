"""Numeric verification: a swap is legal only when ``replacement == reference == original`` on a probe.

The probe runs each of the three callables on fresh copies of the same random inputs, with the same RNG state
(so dropout, if any, draws the same masks), and compares the outputs and the gradients of the inputs that require
grad and of the pattern's parameters (``torch.autograd.grad``: nothing accumulates into ``.grad``) under the
tolerance of the module's dtype (``sloth_core.tolerances``). The caller's RNG state is left as it was.
"""
from __future__ import annotations

import contextlib
import threading
import traceback
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .registry.pattern import Probe
from .tolerances import compare

# Two computations in the same low precision may each be a couple of ulps from the exact value.
_SCALE = 2.0

_PROBING = threading.local()  # .depth: verifications running on this thread (see probing())


def probing() -> bool:
    """Whether this thread is running a verification probe: code that speaks to the user about *their* call (the
    inference mode's "gradients are enabled" warning) stays quiet for the probe's calls, which run with gradients
    on by design."""
    return getattr(_PROBING, "depth", 0) > 0


def _fresh(inputs: Sequence) -> list:
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            y = x.detach().clone()
            out.append(y.requires_grad_(x.requires_grad) if y.is_floating_point() else y)
        else:
            out.append(x)
    return out


def _flatten(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for t in out if isinstance(t, torch.Tensor)]
    raise TypeError(f"probe output of type {type(out).__name__} is not a tensor or tuple of tensors")


def _run(fn: Callable, probe: Probe, grad_seed: int, rng_seed: int):
    inputs = _fresh(probe.inputs)
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad] + list(probe.params)
    with torch.random.fork_rng(devices=_cuda_devices(inputs)):
        torch.manual_seed(rng_seed)
        with torch.enable_grad():
            outs = _flatten(fn(*inputs))
            gen = torch.Generator().manual_seed(grad_seed)
            grads_out = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in outs]
            pairs = [(o, g) for o, g in zip(outs, grads_out) if o.requires_grad]
            grads = []
            if wrt and pairs:
                grads = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
    return [o.detach() for o in outs], [None if g is None else g.detach() for g in grads]


def _cuda_devices(inputs) -> list[int]:
    return sorted({t.device.index or 0 for t in inputs if isinstance(t, torch.Tensor) and t.is_cuda})


def _differ(what: str, a: list, b: list, dtype: torch.dtype) -> str | None:
    if len(a) != len(b):
        return f"{what}: {len(a)} tensors vs {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if (x is None) != (y is None):
            return f"{what}[{i}]: one side has no gradient"
        if x is None:
            continue
        if x.dtype != y.dtype:
            return f"{what}[{i}]: dtype {x.dtype} vs {y.dtype}"
        why = compare(x, y, dtype, scale=_SCALE, relative_always=True)
        if why is not None:
            return f"{what}[{i}]: {why}"
    return None


@dataclass(frozen=True)
class Failure:
    """Why a swap was not verified: ``reason`` is one readable line; ``error`` the full text of the exception that
    was raised, if one was (kept for the report)."""

    reason: str
    error: str = ""

    def __str__(self) -> str:
        return self.reason


def describe_exception(e: BaseException) -> str:
    """One readable line for ``e``: the innermost exception it was raised from (Triton's interpreter wraps a
    kernel's error in ``InterpreterError(repr(inner))`` layers), as ``Type: first line of the message``."""
    seen = set()
    while (e.__cause__ is not None) and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def raised(what: str, e: BaseException) -> Failure:
    """``what`` failed with ``e``: the readable line, and the exception's full text for the report."""
    return Failure(f"{what}: {describe_exception(e)}", "".join(traceback.format_exception_only(type(e), e)).strip())


def _tolerance_dtype(probe: Probe) -> torch.dtype:
    """The probe's dtype, or the autocast dtype where autocast is on for its inputs' device and computes in less
    (the three callables then compute in it)."""
    for t in probe.inputs:
        if isinstance(t, torch.Tensor) and torch.is_autocast_enabled(t.device.type):
            low = torch.get_autocast_dtype(t.device.type)
            if torch.finfo(low).bits < torch.finfo(probe.dtype).bits:
                return low
    return probe.dtype


@contextlib.contextmanager
def _standing_in(pairs):
    """The parameters hold their stand-in values (``.data`` swapped: their own storage is not written)."""
    own = [p.data for p, _ in pairs]
    try:
        for p, values in pairs:
            p.data = values
        yield
    finally:
        for (p, _), data in zip(pairs, own):
            p.data = data


def verify(original: Callable, replacement: Callable, reference: Callable, probe: Probe,
           seed: int = 0) -> Failure | None:
    """``None`` when the three agree on ``probe`` (outputs and gradients, within the tolerance of the dtype they
    compute in), else the reason they do not."""
    _PROBING.depth = getattr(_PROBING, "depth", 0) + 1
    try:
        with _standing_in(probe.stand_ins):
            return _verify(original, replacement, reference, probe, seed)
    finally:
        _PROBING.depth -= 1


def _verify(original, replacement, reference, probe: Probe, seed: int) -> Failure | None:
    try:
        o_out, o_grad = _run(original, probe, seed + 1, seed + 2)
    except Exception as e:  # the module cannot run the probe at all
        return raised("probe failed on the original module", e)
    for name, fn in (("reference", reference), ("replacement", replacement)):
        try:
            out, grad = _run(fn, probe, seed + 1, seed + 2)
        except Exception as e:
            return raised(f"probe failed on the {name}", e)
        dtype = _tolerance_dtype(probe)
        why = _differ("output", out, o_out, dtype) or _differ("gradient", grad, o_grad, dtype)
        if why is not None:
            verb = "does not compute the pattern's function" if name == "reference" else "kernel disagrees"
            return Failure(f"{verb}: {name} vs original {why}")
    return None
