"""A bound forward replacement runs only on a setting that was verified.

A pattern may declare ``setting(module, args) -> tuple | None``: what its verification depended on that can change after
``optimize`` -- parameter dtypes and devices (``.to()``, ``.half()``, a trainer's cast), the input dtype, autocast.
The rewriter wraps such a pattern's replacement with :func:`guard` and records the setting its probe ran
(:func:`seed`). At every call the guard reads the setting (attribute reads, one tuple lookup):

* a verified one runs the kernel (``None``: the replacement runs the original path itself, nothing to check);
* a new one is verified on its first call -- the pattern's probe on the module as it is now, replacement ==
  reference == the forward the binding replaced -- once per (pattern, signature) for the whole ``optimize`` call;
* one that does not verify, or that the probe cannot build (an input dtype the probe does not draw), runs the
  forward the binding replaced, and says so (:mod:`sloth_core.fallback`: a warning, status ``fallback`` in the
  report; the next ``optimize`` verifies again).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from . import binding, fallback
from .memory.saved import kept
from .recompute import outside_checkpointed_layer
from .registry.pattern import Match, Pattern
from .verify import raised, verify

Verified = dict  # setting -> None (verified) or the reason it is not


def seed(pattern: Pattern, module: nn.Module, inputs: tuple, verified: Verified) -> None:
    """Record that ``pattern`` verified on ``module`` with the probe ``inputs``."""
    if pattern.setting is not None:
        verified[pattern.setting(module, inputs)] = None


def _same(t):
    return t


@torch.compiler.disable  # under torch.compile: run eagerly (one graph break where a setting is new), not traced
def _verify_now(pattern: Pattern, m: Match, module: nn.Module, now: tuple, replacement: Callable) -> str | None:
    try:
        probe = pattern.probe(module, m, torch.Generator().manual_seed(0))
    except Exception as e:
        return raised("its new setting could not be probed", e).reason
    probed = pattern.setting(module, probe.inputs)
    if probed != now:
        return f"its setting {now} is not one the probe can draw ({probed})"
    # the first call may come inside a checkpointed layer: the probe's tensors must not join its saved tensors, nor
    # its calls the layer's (:mod:`sloth_core.recompute`)
    with torch.autograd.graph.saved_tensors_hooks(kept, _same), outside_checkpointed_layer():
        why = verify(original=pattern.adapted(binding.previous_forward(module, pattern.name)),
                     replacement=pattern.bound(replacement, module),
                     reference=pattern.bound(pattern.reference(m), module), probe=probe)
    return None if why is None else f"its setting changed since it was verified and the new one {now} does not " \
                                    f"verify: {why.reason}"


def guard(pattern: Pattern, m: Match, replacement: Callable, verified: Verified) -> Callable:
    """``replacement`` (a ``"forward"`` target's function of the module) behind the setting check; ``verified``
    is shared by the bindings of one signature."""
    if pattern.setting is None:
        return replacement
    name = pattern.name

    def forward(self, *args, **kwargs):
        now = pattern.setting(self, args)
        if now is None:  # the replacement serves this call through the original path itself
            return replacement(self, *args, **kwargs)
        if now in verified:
            why = verified[now]
        else:
            why = verified[now] = _verify_now(pattern, m, self, now, replacement)
        if why is None:
            return replacement(self, *args, **kwargs)
        fallback.fall_back(self, name, why)
        return binding.previous_forward(self, name)(*args, **kwargs)

    forward.__signature__ = getattr(replacement, "__signature__", None)
    return forward
