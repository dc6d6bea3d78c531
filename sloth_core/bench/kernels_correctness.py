"""The correctness guard of ``sloth-core bench kernels``: every provider's outputs and gradients against
``hf_eager``'s on the same inputs, as a relative error in float64."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from . import timing
from .timing import InputSet, reset_grads
#: ||a - b|| / ||b|| above which a provider disagrees with hf_eager (bf16 has 8 mantissa bits: 2^-8 = 3.9e-3).
MISMATCH_REL_ERR = 2e-2
_REL_ERR_CHUNK = 1 << 24


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64, computed on the tensors' device in chunks (the
    logits gradients are gigabytes); ``inf`` when the shapes differ."""
    if actual.shape != expected.shape:
        return math.inf
    a, e = actual.detach().reshape(-1), expected.detach().reshape(-1).to(actual.device)
    num = torch.zeros((), dtype=torch.float64, device=a.device)
    den = torch.zeros((), dtype=torch.float64, device=a.device)
    for start in range(0, a.numel(), _REL_ERR_CHUNK):
        x, y = a[start:start + _REL_ERR_CHUNK].double(), e[start:start + _REL_ERR_CHUNK].double()
        num += (x - y).square().sum()
        den += y.square().sum()
    num, den = num.sqrt().item(), den.sqrt().item()
    return num / den if den > 0 else num


def max_rel_err(outputs: Sequence[torch.Tensor | None], reference: Sequence[torch.Tensor | None]) -> float:
    """The largest :func:`rel_err` over matching outputs (``inf`` when the outputs do not correspond)."""
    if len(outputs) != len(reference):
        return math.inf
    worst = 0.0
    for out, ref in zip(outputs, reference):
        if out is None or ref is None:
            if out is not ref:
                return math.inf
            continue
        err = rel_err(out, ref)
        if not err <= worst:  # NaN wins
            worst = err
    return worst


def _clone(inputs: InputSet) -> InputSet:
    """A copy of the set (fresh leaves) for the correctness check: some providers overwrite their inputs."""
    args = tuple(a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in inputs.args)
    return InputSet(args, inputs.grads)


def outputs_and_grads(fn: Callable, inputs: InputSet, mode: str, params: Sequence[torch.Tensor]) -> list:
    """Forward outputs, then (``fwd_bwd``) the gradients of the inputs that require grad and of ``params``."""
    leaves = [*inputs.leaves(), *params]
    reset_grads(leaves)
    out = [o.detach() for o in timing.run_once(fn, inputs, mode)]
    if mode == "fwd_bwd":
        out += [leaf.grad for leaf in leaves]
    reset_grads(leaves)
    return out
