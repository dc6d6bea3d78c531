"""Pattern ``rope``: the rotary embedding an attention forward applies through the global
``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``.

The binding is per instance (nothing global is patched): where transformers' hub-kernel layer gave the attention a
slot for that function (transformers 5.2x, whose ``kernels`` dependency makes ``apply_rotary_pos_emb`` a module
routed per instance), the slot runs the kernel, and what was in the slot -- HF's function or a hub kernel that
``kernelize`` put there -- is what gets verified; otherwise the attention's forward is re-created (through the
decorators that wrap it) with globals in which that one name maps to the kernel.

Meaning: ``q * cos + rotate_half(q) * sin`` (and the same for ``k``), with ``rotate_half(x) = cat(-x2, x1)``.
The replacement calls the Triton kernel (q and k in one launch, backward = the inverse rotation) when the inputs
are a layout it handles, and the module's own function otherwise, so a call the kernel does not support is still
answered by the original code.
"""
from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn

from ... import binding
from ...kernels.rope import apply_rope, rope_reference, rope_supported
from ...tolerances import compare
from ...warning import SlothCoreWarning
from ..pattern import Match, Pattern, Probe, Skip
from ._probe import module_dtype_device, randn

FUNCTION = "apply_rotary_pos_emb"


def _heads(module: nn.Module, head_dim: int) -> tuple[int, int]:
    cfg = getattr(module, "config", None)
    hq = getattr(cfg, "num_attention_heads", None)
    hk = getattr(cfg, "num_key_value_heads", None) or hq
    if isinstance(hq, int) and isinstance(hk, int) and hq > 0 and hk > 0:
        return hq, hk
    return 4, 2


def find(module: nn.Module, params) -> Match | Skip | None:
    fn = getattr(type(module), "forward", None)
    if not inspect.isfunction(fn) or not binding.calls_global(fn, FUNCTION):
        return None
    original = binding.global_callable(module, FUNCTION)
    if not callable(original):
        return Skip(f"{FUNCTION} is not a function in the forward's module")
    if binding.hub_slot(module, FUNCTION) is None:
        bound = binding.bound_forward_function(module)  # what the binding would re-create: another pattern's wrapper?
        if bound is None or not binding.calls_global(bound, FUNCTION):
            by = [r.pattern for r in binding.records(module)]
            return Skip(f"the forward bound now ({', '.join(by) or 'not a method'}) does not call {FUNCTION} "
                        f"itself: rope must be bound before patterns that wrap the forward")
    head_dim = getattr(module, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim % 2:
        return Skip("no even integer head_dim attribute")
    dtype, device = module_dtype_device(module)
    hq, hk = _heads(module, head_dim)
    # A hub-kernel slot is one module per instance: its class (and any forward kernelize set on it) is what to verify.
    if isinstance(original, nn.Module):
        forward = original.__dict__.get("forward")
        what = (type(original), getattr(forward, "__func__", forward))
    else:
        what = original
    sig = (what, dtype, device, head_dim, hq, hk)
    return Match({"head_dim": head_dim, "heads": (hq, hk), "_dtype": dtype, "_function": original}, sig)


def _named_signature(original) -> inspect.Signature | None:
    """``original``'s signature when its parameters are named (a plain function); ``None`` for a hub-kernel
    module, whose forward takes ``*args, **kwargs``."""
    if not inspect.isfunction(original):
        return None
    return inspect.signature(original)


def _unsqueeze_dim(sig: inspect.Signature | None, args: tuple, kwargs: dict) -> int | None:
    """The ``unsqueeze_dim`` of a call ``(q, k, cos, sin, *args, **kwargs)``, or ``None`` when the call passes
    anything else the kernel does not implement. Without a named signature, the hub-kernel interface of
    ``rotary_pos_emb``: ``(q, k, cos, sin, unsqueeze_dim=1)``."""
    if sig is None:
        if len(args) > 1 or set(kwargs) - {"unsqueeze_dim"} or (args and "unsqueeze_dim" in kwargs):
            return None
        return args[0] if args else kwargs.get("unsqueeze_dim", 1)
    try:
        bound = sig.bind(None, None, None, None, *args, **kwargs)
    except TypeError:
        return None
    names = list(sig.parameters)[:4]
    extra = {n: v for n, v in bound.arguments.items() if n not in names and n != "unsqueeze_dim"}
    if any(v is not None for v in extra.values()):
        return None
    return bound.arguments.get("unsqueeze_dim", 1)


def _same_on(original, q, k, cos, sin, args, kwargs, unsqueeze_dim) -> str | None:
    """None when the kernel gives ``original``'s outputs (dtypes and values) on these inputs, else why not."""
    with torch.no_grad():
        want = original(q.detach(), k.detach(), cos, sin, *args, **kwargs)
        got = apply_rope(q.detach(), k.detach(), cos, sin, unsqueeze_dim)
    for name, g, w in zip(("q", "k"), got, want):
        if g.dtype != w.dtype:
            return f"returns {name} in {w.dtype}, the kernel in {g.dtype}"
        why = compare(g, w)
        if why is not None:
            return f"{name}: {why}"
    return None


def kernel_function(original, verified_dtype: torch.dtype):
    """A drop-in for ``original`` (HF's ``apply_rotary_pos_emb``, or the instance's hub-kernel slot for it): the
    kernel where it applies, else ``original``. Verification probed q, k and the tables in ``verified_dtype``; each
    other setting of dtypes (OLMo's float32 tables with bfloat16 q, cast back to q's dtype; autocast) is compared
    with ``original`` on its first call, and one the kernel does not reproduce runs ``original`` (with a
    warning)."""
    sig = _named_signature(original)
    # dtypes of (q, k, cos, sin) -> whether the kernel computes original's outputs there
    verdicts: dict[tuple, bool] = {(verified_dtype,) * 4: True}

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = _unsqueeze_dim(sig, args, kwargs)
        if not isinstance(unsqueeze_dim, int) or rope_supported(q, k, cos, sin, unsqueeze_dim) is not None:
            return original(q, k, cos, sin, *args, **kwargs)
        setting = (q.dtype, k.dtype, cos.dtype, sin.dtype)
        ok = verdicts.get(setting)
        if ok is None:
            why = _same_on(original, q, k, cos, sin, args, kwargs, unsqueeze_dim)
            ok = verdicts[setting] = why is None
            if why is not None:
                warnings.warn(f"sloth_core: rope: {getattr(original, '__qualname__', type(original).__name__)} "
                              f"with q {q.dtype}, cos/sin {cos.dtype}: {why}; this setting runs the original "
                              f"function", SlothCoreWarning, stacklevel=2)
        if not ok:
            return original(q, k, cos, sin, *args, **kwargs)
        return apply_rope(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.__wrapped_original__ = original
    return apply_rotary_pos_emb


def _reference(m: Match):
    return rope_reference


def _replacement(m: Match):
    return kernel_function(m["_function"], m["_dtype"])


def _original(module: nn.Module, m: Match):
    return m["_function"]


def _probe(module: nn.Module, m: Match, gen: torch.Generator) -> Probe:
    dtype, device = module_dtype_device(module)
    d = m["head_dim"]
    hq, hk = m["heads"]
    b, s = 2, 5
    # q, k as the attention builds them: [B, S, H, D] projections viewed as [B, H, S, D]
    q = randn((b, s, hq, d), dtype, device, gen).transpose(1, 2)
    k = randn((b, s, hk, d), dtype, device, gen).transpose(1, 2)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    pos = torch.arange(s, dtype=torch.float32) + torch.randint(0, 64, (1,), generator=gen)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)[None].expand(b, -1, -1)
    cos, sin = emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)
    return Probe(inputs=(q.requires_grad_(), k.requires_grad_(), cos, sin), dtype=dtype)


ROPE = Pattern(
    name="rope",
    kernel="triton:rope",
    find=find,
    reference=_reference,
    replacement=_replacement,
    original=_original,
    probe=_probe,
    target="global:" + FUNCTION,
    defaults={},
)
