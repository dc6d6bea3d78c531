"""Pattern ``rope``: the rotary embedding an attention forward applies through the global
``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``.

The binding is per instance: the attention's forward is re-created with globals in which that one name maps to the
kernel (nothing global is patched). Meaning: ``q * cos + rotate_half(q) * sin`` (and the same for ``k``), with
``rotate_half(x) = cat(-x2, x1)``. The replacement calls the Triton kernel (q and k in one launch, backward = the
inverse rotation) when the inputs are a layout it handles, and the module's own function otherwise, so a call the
kernel does not support is still answered by the original code.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from ... import binding
from ...kernels.rope import apply_rope, rope_reference, rope_supported
from ..pattern import Match, Pattern, Probe, Skip
from ._probe import module_dtype_device, randn

FUNCTION = "apply_rotary_pos_emb"


def forward_function(module: nn.Module):
    """The plain function behind the module's forward (its class's), or ``None``."""
    fn = getattr(type(module), "forward", None)
    return fn if inspect.isfunction(fn) else None


def _heads(module: nn.Module, head_dim: int) -> tuple[int, int]:
    cfg = getattr(module, "config", None)
    hq = getattr(cfg, "num_attention_heads", None)
    hk = getattr(cfg, "num_key_value_heads", None) or hq
    if isinstance(hq, int) and isinstance(hk, int) and hq > 0 and hk > 0:
        return hq, hk
    return 4, 2


def find(module: nn.Module, params) -> Match | Skip | None:
    fn = forward_function(module)
    if fn is None or FUNCTION not in fn.__code__.co_names:
        return None
    original = fn.__globals__.get(FUNCTION)
    if not callable(original):
        return Skip(f"{FUNCTION} is not a function in the forward's module")
    bound = binding.bound_forward_function(module)  # what the binding would re-create: another pattern's wrapper?
    if bound is None or FUNCTION not in getattr(getattr(bound, "__code__", None), "co_names", ()):
        by = [r.pattern for r in binding.records(module)]
        return Skip(f"the forward bound now ({', '.join(by) or 'not a method'}) does not call {FUNCTION} itself: "
                    f"rope must be bound before patterns that wrap the forward")
    head_dim = getattr(module, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim % 2:
        return Skip("no even integer head_dim attribute")
    dtype, device = module_dtype_device(module)
    hq, hk = _heads(module, head_dim)
    sig = (original, dtype, device, head_dim, hq, hk)
    return Match({"head_dim": head_dim, "heads": (hq, hk), "_function": original}, sig)


def kernel_function(original):
    """A drop-in for ``original`` (HF's ``apply_rotary_pos_emb``): the kernel where it applies, else ``original``."""
    sig = inspect.signature(original)

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        try:
            bound = sig.bind(q, k, cos, sin, *args, **kwargs)
        except TypeError:
            return original(q, k, cos, sin, *args, **kwargs)
        extra = {n: v for n, v in bound.arguments.items() if n not in ("q", "k", "cos", "sin", "unsqueeze_dim")}
        unsqueeze_dim = bound.arguments.get("unsqueeze_dim", 1)
        if extra and any(v is not None for v in extra.values()):
            return original(q, k, cos, sin, *args, **kwargs)
        if rope_supported(q, k, cos, sin, unsqueeze_dim) is not None:
            return original(q, k, cos, sin, *args, **kwargs)
        return apply_rope(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.__wrapped_original__ = original
    return apply_rotary_pos_emb


def _reference(m: Match):
    return rope_reference


def _replacement(m: Match):
    return kernel_function(m["_function"])


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
