"""What someone other than sloth_core put on a module instance, read through sloth_core's own bindings: another
library's forward (TRL's fused LM head, Liger-Kernel's ``model=`` patching), the hub kernel ``kernels.kernelize``
set, or a replacement made after one of our installs."""
from __future__ import annotations

from typing import Any

from torch import nn

from .binding import MISSING as _MISSING
from .binding import _describe, _forward_attr, hub_slot, records


def foreign_forward_function(module: nn.Module) -> Any:
    """The forward someone other than sloth_core set on this instance (TRL's fused LM head sets ``model.forward``,
    Liger-Kernel's ``model=`` patching the forwards of the model's norms and MLPs), also where one of our
    ``global:`` bindings re-created it, or ``None``: no instance forward, the class's own (bound, as accelerate
    keeps it in ``_old_forward``), or one of ours over either."""
    attr = _forward_attr(module)
    current = module.__dict__.get(attr, _MISSING)
    for rec in reversed(records(module)):  # back through our installs to what was there before them
        if rec.attr == attr and rec.installed is current:
            current = rec.previous
    if current is _MISSING or getattr(current, "__func__", current) is type(module).forward:
        return None
    return current


def name_of(fn: Any) -> str:
    """A forward's real name and file (for :func:`foreign_forward_function`'s result)."""
    return _describe(fn)


#: Where ``kernels.kernelize`` records, on an instance, the repository whose layer forward it set there.
HUB_KERNEL_ATTR = "_kernel_repo"


def hub_kernel(module: nn.Module) -> str | None:
    """The repository of the hub kernel whose forward ``kernels.kernelize`` (transformers' hub-kernel layers) set
    on this instance, or ``None``. Such a forward is verified like the class's own: it is what the module computes
    now."""
    repo = module.__dict__.get(HUB_KERNEL_ATTR)
    return None if repo is None else str(repo)


def hub_kernel_at(module: nn.Module, target: str) -> str | None:
    """:func:`hub_kernel` of what a binding ``target`` would replace: the instance's forward, or its hub-kernel
    slot for a ``"global:<name>"`` target."""
    if target.startswith("global:"):
        slot = hub_slot(module, target[len("global:"):])
        return None if slot is None else hub_kernel(slot)
    return hub_kernel(module)


def replaced_since(module: nn.Module, pattern: str) -> str | None:
    """The name of what replaced, after the install, the attribute ``pattern`` set on ``module`` (TRL's fused LM
    head wraps the forward the fused loss set), or ``None``: it is still there, or a later binding of ours wraps
    it."""
    recs = records(module)
    for i in range(len(recs) - 1, -1, -1):
        rec = recs[i]
        if rec.pattern != pattern:
            continue
        if any(r.attr == rec.attr for r in recs[i + 1:]):
            return None
        current = module.__dict__.get(rec.attr, _MISSING)
        return None if current is rec.installed else _describe(current)
    return None
