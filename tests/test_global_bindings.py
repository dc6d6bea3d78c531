"""``global:<name>`` bindings reach the function an attention forward calls by global name, whichever way the
installed transformers builds that forward (both routes are tested on every transformers version):

* a plain forward (transformers 5.17) or one wrapped by decorators (5.2x: ``deprecate_kwarg``,
  ``use_kernelized_func``): the forward is re-created through every wrapper, and the wrappers still run;
* a hub-kernel slot (5.2x with the ``kernels`` package: ``self._kernel_funcs[name]``): the slot runs the
  replacement, and what was in the slot (a hub kernel ``kernelize`` put there, say) is what the rope pattern
  verifies against.
"""
import copy
import functools
import pickle

import torch
from torch import nn

from sloth_core import binding
from sloth_core.registry import generic_architecture
from sloth_core.registry.patterns import rope as rope_pattern
from sloth_core.rewriter import rewrite

CALLS = []
ACTIVE = []  # the slotted attention whose forward is running (transformers keeps it in a context variable)


def _plain(q, k, cos, sin, unsqueeze_dim=1):
    CALLS.append("plain")
    return rope_pattern.rope_reference(q, k, cos, sin, unsqueeze_dim)


def apply_rotary_pos_emb(*args, **kwargs):
    """The global the forwards call: routed to the running instance's slot, if any (the hub-kernel layer's
    ``Func`` module does this, and keys the slot by its ``kernel_layer_name``), else the plain function."""
    if ACTIVE:
        return ACTIVE[-1]._kernel_funcs["rotary_pos_emb"](*args, **kwargs)
    return _plain(*args, **kwargs)


apply_rotary_pos_emb.kernel_layer_name = "rotary_pos_emb"


def renaming(old, new):
    """Like transformers' ``deprecate_kwarg``: a ``functools.wraps`` wrapper holding the function in a cell."""
    def decorator(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            CALLS.append("renamed")
            if old in kwargs:
                kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)
        return wrapper
    return decorator


class Attention(nn.Module):
    def __init__(self, heads=2, head_dim=8):
        super().__init__()
        self.head_dim, self.heads = head_dim, heads
        self.proj = nn.Linear(heads * head_dim, heads * head_dim)

    @renaming("past_key_values", "cache")
    def forward(self, x, cos, sin, cache=None):
        b, s, _ = x.shape
        q = self.proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, q, cos, sin)
        return q + k


def routing(forward):
    """Like ``kernels.use_kernelized_func``'s forward: the instance is the active one while its forward runs."""
    @functools.wraps(forward)
    def new_forward(self, *args, **kwargs):
        ACTIVE.append(self)
        try:
            return forward(self, *args, **kwargs)
        finally:
            ACTIVE.pop()
    return new_forward


class SlottedAttention(Attention):
    """As transformers 5.2x's hub-kernel layer builds it: a per-instance module stands for the function."""

    class _Func(nn.Module):
        def forward(self, *args, **kwargs):
            CALLS.append("slot")
            return _plain(*args, **kwargs)

    def __init__(self, **kw):
        super().__init__(**kw)
        self.__dict__["_kernel_funcs"] = {"rotary_pos_emb": self._Func()}

    forward = routing(Attention.forward)


def _inputs(device, s=5, d=8):
    x = torch.randn(2, s, 16, device=device)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.outer(torch.arange(s).float(), inv).repeat(1, 2)[None].expand(2, -1, -1).to(device)
    return x, emb.cos(), emb.sin()


def test_wrapped_forward_is_recreated_through_its_wrappers(monkeypatch, device):
    assert [f.__name__ for f in binding.wrapped_chain(Attention.forward)] == ["forward", "forward"]
    assert binding.calls_global(Attention.forward, "apply_rotary_pos_emb")
    kernel = []
    monkeypatch.setattr(rope_pattern, "apply_rope", lambda *a: kernel.append(1) or rope_pattern.rope_reference(*a))
    attn, other = Attention().to(device), Attention().to(device)
    match = rope_pattern.find(attn, {})
    assert match is not None and match["_function"] is apply_rotary_pos_emb
    binding.install(attn, rope_pattern.ROPE.target, rope_pattern.ROPE.replacement(match), "rope", "triton:rope")
    x, cos, sin = _inputs(device)
    CALLS.clear()
    out = attn(x, cos, sin, past_key_values=None)  # the renaming wrapper still runs
    assert CALLS == ["renamed"] and kernel == [1]
    CALLS.clear()
    torch.testing.assert_close(out, other.__class__.forward(attn, x, cos, sin))
    assert Attention.forward.__wrapped__.__globals__["apply_rotary_pos_emb"] is apply_rotary_pos_emb
    other(x, cos, sin)
    assert kernel == [1]
    binding.uninstall(attn)
    assert "forward" not in attn.__dict__


def test_hub_kernel_slot_runs_the_replacement_and_is_verified(monkeypatch, device):
    kernel = []
    monkeypatch.setattr(rope_pattern, "apply_rope", lambda *a: kernel.append(1) or rope_pattern.rope_reference(*a))
    attn = SlottedAttention().to(device)
    before = attn._kernel_funcs["rotary_pos_emb"]
    assert binding.global_callable(attn, "apply_rotary_pos_emb") is before
    match = rope_pattern.find(attn, {})
    assert match["_function"] is before  # the slot's module is what the replacement is verified against
    binding.install(attn, rope_pattern.ROPE.target, rope_pattern.ROPE.replacement(match), "rope", "triton:rope")
    x, cos, sin = _inputs(device)
    CALLS.clear()
    attn(x, cos, sin)
    assert kernel == [1] and CALLS == ["renamed"]
    assert "forward" not in attn.__dict__  # the forward itself is untouched
    twin = copy.deepcopy(attn)  # PEFT's modules_to_save, the tests' reference copies: the kernel stays
    twin(x, cos, sin)
    assert kernel == [1, 1] and CALLS == ["renamed", "renamed"]
    unpickled = pickle.loads(pickle.dumps(attn))  # as every binding: back to what the class does, working
    assert type(unpickled._kernel_funcs["rotary_pos_emb"]) is SlottedAttention._Func
    torch.testing.assert_close(unpickled(x, cos, sin), attn(x, cos, sin))
    assert kernel == [1, 1, 1]
    binding.uninstall(attn)
    assert attn._kernel_funcs["rotary_pos_emb"] is before
    CALLS.clear()
    attn(x, cos, sin)
    assert CALLS == ["renamed", "slot", "plain"] and kernel == [1, 1, 1]


def test_a_kernelized_slot_that_disagrees_is_not_replaced(device):
    """A hub kernel in the slot that does not compute RoPE: verification catches it, nothing is swapped."""
    attn = SlottedAttention().to(device)
    slot = attn._kernel_funcs["rotary_pos_emb"]
    slot.forward = lambda q, k, cos, sin, unsqueeze_dim=1: (q * cos.unsqueeze(1), k * cos.unsqueeze(1))  # wrong
    rows = rewrite(attn, generic_architecture(), only={"rope"})
    assert [(r.pattern, r.status) for r in rows] == [("rope", "skipped")]
    assert "disagree" in rows[0].detail or "does not compute" in rows[0].detail
    assert attn._kernel_funcs["rotary_pos_emb"] is slot
