"""The rewriter: walk a model, find what matches, verify it, bind the kernel-backed replacement.

For each pattern of the architecture (declared, or GENERIC), for each module of ``named_modules()``:

1. ``find``: the structural check; a ``Skip`` is reported with its reason.
2. ``verify``: ``replacement == reference == original`` on a random probe in the module's dtype
   (:mod:`sloth_core.verify`). Declared architectures verify once per signature (class, dtype, shape, params);
   undeclared ones verify every instance. A module that does not verify stays untouched and is reported.
3. ``install``: the replacement is bound on that instance only (:mod:`sloth_core.binding`), behind the pattern's
   setting check where it declares one (:mod:`sloth_core.guard`: a setting changed since is verified on first use).

A binding that fell back since (:mod:`sloth_core.fallback`: its module's setting changed after it was verified) is
undone and its module goes through the three steps again.
"""
from __future__ import annotations

import torch
from torch import nn

from . import binding, bound_by_others, fallback, foreign, guard
from .kernels._runtime import unsupported_reason
from .registry.architecture import Architecture
from .registry.pattern import Match, Pattern, PatternUse, Skip
from .registry.patterns._probe import module_dtype_device
from .reporting import ReportRow
from .verify import Failure, raised, verify


def _try_matches(module: nn.Module, use: PatternUse, matches: list[Match], cache: dict | None,
                 gen_seed: int, settings: dict, forward: str | None = None) -> tuple[Match | None, Failure]:
    pattern = use.pattern
    reasons = []
    for m in matches:
        key = (pattern.name, m.signature, forward)
        if cache is not None and key in cache:
            why = cache[key]
        else:
            gen = torch.Generator().manual_seed(gen_seed)
            try:
                probe = pattern.probe(module, m, gen)
            except Exception as e:
                why = raised("could not build a probe", e)
            else:
                why = verify(original=pattern.adapted(pattern.original(module, m)),
                             replacement=pattern.bound(pattern.replacement(m), module),
                             reference=pattern.bound(pattern.reference(m), module),
                             probe=probe, seed=gen_seed)
                if why is None:
                    guard.seed(pattern, module, probe.inputs, settings.setdefault(key, {}))
            if cache is not None:
                cache[key] = why
        if why is None:
            return m, Failure("")
        reasons.append(Failure(f"[{m.describe()}] {why}" if len(matches) > 1 else why.reason, why.error))
    return None, Failure("not verified: " + "; ".join(r.reason for r in reasons),
                         "\n".join(r.error for r in reasons if r.error))


def _whose(pattern: Pattern, module: nn.Module, match: Match, theirs) -> str | None:
    """The library other than transformers' whose function the pattern verified against (:mod:`sloth_core.foreign`),
    or ``None``: a forward target's forward as the instance had it before us (``theirs``, or its class's), a
    global's function as the instance's forward calls it."""
    if pattern.target == "forward":
        return foreign.origin(theirs or type(module).forward)
    return foreign.origin(pattern.original(module, match))


def rewrite(model: nn.Module, arch: Architecture, only: set[str] | None = None,
            exclude: set[str] | None = None, verify_every: bool = False, seed: int = 0) -> list[ReportRow]:
    """Bind every verified match of ``arch``'s patterns inside ``model``; return the report rows."""
    rows: list[ReportRow] = []
    cache = None if (verify_every or not arch.declared) else {}
    settings: dict = {}  # (pattern, signature) -> the settings verified for it (:mod:`sloth_core.guard`)
    modules = list(model.named_modules())
    for use in arch.patterns:
        pattern = use.pattern
        if (only is not None and pattern.name not in only) or (exclude and pattern.name in exclude):
            continue
        blockers = [pattern.name] + [u.name for u in arch.patterns if pattern.name in u.pattern.supersedes]
        for path, module in modules:
            if fallback.fallback_reason(module, pattern.name) is not None and (
                    binding.uninstall_pattern(module, pattern.name) or not binding.is_bound(module, pattern.name)):
                fallback.clear(module, pattern.name)  # its setting changed since: verify the new one
            if any(binding.is_bound(module, name) for name in blockers):
                continue
            found = use.find(module)
            if found is None:
                continue
            hub = None if isinstance(found, Skip) else bound_by_others.hub_kernel_at(module, pattern.target)
            # the forward another library set on the instance, if any (a forward target's "original")
            theirs = bound_by_others.foreign_forward_function(module) if pattern.target == "forward" else None
            other = None if theirs is None else bound_by_others.name_of(theirs)
            # a hub kernel's forward is verified like the class's; so is another library's where the pattern serves it
            if not isinstance(found, Skip) and other is not None and hub is None and not (
                    pattern.serves_foreign and foreign.servable(theirs)):
                whose = foreign.origin(theirs) or other
                found = Skip(f"its forward was replaced on this instance by {whose} (TRL's fused LM head, "
                             f"Liger-Kernel's fused loss, for two): left to it")
            if not isinstance(found, Skip):
                dtype, device = module_dtype_device(module)
                why = unsupported_reason(device, dtype)
                found = found if why is None else Skip(why)
            if isinstance(found, Skip):
                rows.append(ReportRow(path, pattern.name, pattern.kernel, "skipped", found.reason))
                continue
            # an instance forward another library set is part of what was verified (``other``)
            match, why = _try_matches(module, use, found, cache, seed, settings, other)
            serves = _whose(pattern, module, match or found[0], theirs)
            if match is None:
                reason = why.reason
                if hub is not None:
                    reason += f" (what it computes now is the hub kernel {hub} that kernels.kernelize set: left to it)"
                elif serves:
                    reason += f" (the module runs {serves}: left to it)"
                rows.append(ReportRow(path, pattern.name, pattern.kernel, "skipped", reason, why.error))
                continue
            for name in pattern.supersedes:  # e.g. lora_mlp on an MLP gated_mlp took before PEFT added the LoRA
                binding.uninstall_pattern(module, name)
            replacement = pattern.replacement(match)
            if pattern.target == "forward":
                verified = settings.setdefault((pattern.name, match.signature, other), {})
                replacement = guard.guard(pattern, match, replacement, verified)
            binding.install(module, pattern.target, replacement, pattern.name, pattern.kernel)
            detail = match.describe()
            if hub is not None:
                detail += f", over the hub kernel {hub}"
            elif serves:
                detail += f"; serves {serves} (verified against it)"
            rows.append(ReportRow(path, pattern.name, pattern.kernel, "replaced", detail))
    return rows
