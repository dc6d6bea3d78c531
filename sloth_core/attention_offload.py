"""Attention tensors kept in host memory instead of recomputed, in offloading checkpointed layers, when
their mode keeps them (``"offload"``, the default, and ``"offload-attention"``: :mod:`sloth_core.checkpointing`).
Exact (tests).

A checkpointed decoder layer reruns its forward in the backward to regenerate what autograd saved. The attention
node (``F.scaled_dot_product_attention``, whatever backend PyTorch picks) saves ``q``, ``k``, ``v``, its output
``o`` and per-row statistics (the log-sum-exp ``lse``); rerunning it costs an attention forward per layer and step.
In an offloading layer (:mod:`sloth_core.checkpointing`, mode ``"offload"``, layers whose MLP keeps its input in host
memory) the attention call runs as :class:`_OffloadedAttention`:

* first forward: the attention runs as usual on detached aliases of ``q``, ``k``, ``v``, under saved-tensor hooks:
  the node's saved ``q``, ``k``, ``v`` become references to this function's own saved ``q``, ``k``, ``v`` (which
  go through the checkpoint: the backward gets the recompute's), every other saved tensor of at least
  :data:`MIN_BYTES` (``o``, ``lse``) goes to the layer's host stash (same pool, side stream and prefetch group as
  the layer input), smaller ones and the call's other tensors (a mask) stay where they are. The stash remembers
  which copy is the output.
* recompute: the attention does not run. Its output is the first forward's ``o``, copied back from host memory
  (prefetched while the layer's MLP backward ran); ``q``, ``k``, ``v`` are saved as in the first forward. The
  layer's later modules (the output projection, ...) recompute from that ``o`` as they would from a recomputed one.
* backward: the first forward's attention node is applied to the output gradient; its saved tensors unpack to the
  recomputed ``q``, ``k``, ``v`` and the host copies of the rest (``o`` is the tensor the recompute already
  restored: one copy back). ``q``, ``k``, ``v`` enter that node through :class:`_Attach` (no leaf's
  ``AccumulateGrad`` keeps them alive); an attention that is no single node (the math backend's composite) is not
  kept: the recompute and the backward run it again.
* after the attention (:meth:`sloth_core.memory.stash.LayerStash.after_attention`): the output projection (its
  input is ``o``'s memory: the same host copy) and the norm before the MLP (its input to the stash; the MLP input is
  that norm recomputed) save nothing through the checkpoint, so the recompute ends at the attention.

The kernels called and the tensors they see are the recomputing path's (the attention forward is deterministic),
so losses and gradients are bit-identical; the attention forward runs once a step instead of twice. The host
traffic grows by ``o`` and ``lse`` (64 MiB + 1 MiB a layer for Llama-3-8B at 4 x 2048 tokens).

Routing: while an offloading layer's attention module runs, ``torch.nn.functional.scaled_dot_product_attention`` (the
module attribute, through which transformers' ``sdpa`` attention calls it) is :func:`_routed_sdpa`, and torch's own
function again once it returns (:class:`_Window`: nothing stays patched between calls). Calls from other threads in
that window go straight to torch's function, at the cost of one Python call. Code that took torch's function
before (``from torch.nn.functional import scaled_dot_product_attention``), or a process where another library
replaced it, is not routed: its attention is recomputed as usual.

Used only where every condition holds: inside an offloading layer's stash scope (:func:`sloth_core.recompute.
layer_stash`), gradients enabled and wanted by ``q``, ``k`` or ``v``, ``dropout_p == 0``, tensors the stash takes
(CUDA, dense). Anything else calls the attention as is. Counters: ``sloth_core.memory.stats.STATS.attention_tensors``,
``attention_reused``.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch
import torch.nn.functional as F

from . import recompute
from .memory.layout import dense_order
from .memory.saved import kept
from .memory.stats import STATS

# torch's own function (calls here go through F, where tests count them; torch's even after a reload of this module)
_SDPA = getattr(F.scaled_dot_product_attention, "torch_function", F.scaled_dot_product_attention)
_ROUTING = threading.local()  # .stash: the stash whose attention module runs now on this thread (see _routed_sdpa)
MIN_BYTES = 1 << 20  # saved tensors below this stay on the device (seeds, offsets, small statistics)
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class _Input:
    """Stands in for the attention node's saved ``q`` / ``k`` / ``v`` (index 0 / 1 / 2)."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


class _NodeHooks:
    """The saved-tensor hooks around the first forward's attention call (see the module docstring)."""

    def __init__(self, inputs: tuple[torch.Tensor, ...], stash: Any, given: tuple[torch.Tensor, ...] = ()):
        self.inputs: tuple[torch.Tensor, ...] | None = inputs
        self.given: tuple[torch.Tensor, ...] | None = given  # other tensors of the call (a mask): kept as they are
        self.stash = stash
        self.copies: list[tuple[int, tuple, tuple, Any]] = []  # (data_ptr, shape, stride, host copy)
        self.now: tuple[torch.Tensor, ...] | None = None  # q, k, v as the backward sees them

    def pack(self, t: torch.Tensor) -> Any:
        for i, x in enumerate(self.inputs or ()):
            if t is x or (t.data_ptr() == x.data_ptr() and t.shape == x.shape and t.stride() == x.stride()
                          and t.dtype == x.dtype):
                return _Input(i)
        if any(t is g or (t.data_ptr() == g.data_ptr() and t.shape == g.shape) for g in self.given or ()):
            return kept(t)
        if t.numel() * t.element_size() >= MIN_BYTES:
            copy = self.stash.host_copy(t)
            if copy is not None:
                self.copies.append((t.data_ptr(), tuple(t.shape), t.stride(), copy))
                return copy
        return kept(t)

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, _Input):
            return self.now[packed.index]
        if isinstance(packed, torch.Tensor):
            return packed
        return packed.restore()

    def copy_of(self, t: torch.Tensor) -> Any:
        """The host copy made of ``t`` (the output), or ``None`` when the node did not save it."""
        for ptr, shape, stride, copy in self.copies:
            if ptr == t.data_ptr() and shape == tuple(t.shape) and stride == t.stride():
                return copy
        return None


class _Attach(torch.autograd.Function):
    """``t`` (an alias, no copy) as a non-leaf of a graph rooted at ``anchor`` (a 0-d leaf). The attention node's
    input edges then point to these nodes, which hold nothing -- a leaf's ``AccumulateGrad`` node would keep ``t``
    (and q, k, v's memory) alive for as long as the attention node lives."""

    @staticmethod
    def forward(ctx, anchor, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the attention node is applied directly, never past it
        return None, None


def _single_node(out: torch.Tensor, attached: tuple[torch.Tensor, ...]) -> bool:
    """Whether ``out`` comes from one node whose inputs are the attached q, k, v (a fused attention kernel), not
    from a composite of several ops (the math backend), whose inner nodes calling one node would skip."""
    node = out.grad_fn
    if node is None:
        return False
    ours = {t.grad_fn for t in attached if t.grad_fn is not None}
    edges = [fn for fn, _ in node.next_functions if fn is not None]
    return bool(edges) and all(fn in ours for fn in edges)


class _OffloadedAttention(torch.autograd.Function):
    """``F.scaled_dot_product_attention(q, k, v, **options)`` whose saved tensors live as the module docstring
    says; ``stash``: the layer's stash, ``slot``: the call's index in the layer run."""

    @staticmethod
    def forward(ctx, q, k, v, options, stash, slot):
        ctx.save_for_backward(q, k, v)  # through the checkpoint: the backward gets the recompute's q, k, v
        ctx.node = ctx.hooks = ctx.options = None
        if recompute.recomputing():
            kept = stash.kept_output(slot)
            if kept is not None:
                STATS.attention_reused += 1
                return kept.restore(keep=True).detach()  # the cached tensor itself stays out of this graph
            return F.scaled_dot_product_attention(q, k, v, **options)
        anchor = torch.zeros((), device=q.device, requires_grad=True)
        with torch.enable_grad():
            inputs = tuple(_Attach.apply(anchor, t.detach()) if t.requires_grad else t.detach() for t in (q, k, v))
        hooks = _NodeHooks(inputs, stash, tuple(t for t in options.values() if isinstance(t, torch.Tensor)))
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
            out = F.scaled_dot_product_attention(*inputs, **options)
        # the hooks live as long as the node: they must not keep q, k, v alive, nor the layer's stash (which holds
        # the layer's host copies and kept outputs: a node outliving its step -- one left in a saved graph -- would
        # keep every step's stash, and with it device memory)
        hooks.inputs = hooks.given = hooks.stash = None
        if _single_node(out, inputs):
            ctx.node, ctx.hooks = out.grad_fn, hooks
            result = out.detach()
            stash.keep_output(slot, hooks.copy_of(out), result)
            return result
        else:  # a composite: drop its graph (and its host copies); the backward recomputes the attention
            STATS.attention_composite += 1
            ctx.options = options
        return out.detach()

    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        if ctx.node is None:  # a composite attention (see forward): recompute it here
            inputs = tuple(t.detach().requires_grad_(t.requires_grad) for t in (q, k, v))
            with torch.enable_grad():
                out = F.scaled_dot_product_attention(*inputs, **ctx.options)
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, dout))
            return (*(next(grads) if t.requires_grad else None for t in inputs), None, None, None)
        ctx.hooks.now = (q, k, v)
        try:
            grads = ctx.node(dout.contiguous() if not _dense(dout) else dout)
        finally:
            ctx.hooks.now = None
        grads = tuple(grads) if isinstance(grads, (tuple, list)) else (grads,)
        return (*(g if need else None for g, need in zip(grads[:3], ctx.needs_input_grad[:3])), None, None, None)


def _dense(t: torch.Tensor) -> bool:
    return dense_order(t) is not None


def _sdpa_arguments(args: tuple, kwargs: dict) -> dict | None:
    """``F.scaled_dot_product_attention``'s arguments by name, or ``None`` when they do not bind."""
    if len(args) > len(_SDPA_PARAMS) or any(k not in _SDPA_PARAMS for k in kwargs):
        return None
    bound = dict(zip(_SDPA_PARAMS, args))
    if any(k in bound for k in kwargs):
        return None
    bound.update(kwargs)
    return bound if all(k in bound for k in ("query", "key", "value")) else None


def _offloadable(bound: dict, stash: Any) -> bool:
    q, k, v = bound["query"], bound["key"], bound["value"]
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return False
    if float(bound.get("dropout_p", 0.0) or 0.0) != 0.0 or not torch.is_grad_enabled():
        return False
    if not (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    return q.device == k.device == v.device and stash.target == ("pinned" if q.is_cuda else "host")


def _routed_sdpa(*args, **kwargs):
    """``torch.nn.functional.scaled_dot_product_attention`` while an offloading layer's attention module runs
    (:class:`_Window`): inside an offloading layer's attention module on this thread, a
    call that :func:`_offloadable` accepts runs as :class:`_OffloadedAttention`; every other call goes straight to
    torch's function. (A ``TorchFunctionMode`` around the attention module did the same, but it intercepts every
    torch call there -- about 500 a layer, tensor attribute reads included -- which made the host, not the GPU,
    the bound of the step on the H200.)"""
    stash = getattr(_ROUTING, "stash", None)
    if stash is not None:
        bound = _sdpa_arguments(args, kwargs)
        if bound is not None and _offloadable(bound, stash):
            q, k, v = bound.pop("query"), bound.pop("key"), bound.pop("value")
            slot = recompute.next_call_index("attention")
            _ROUTING.stash = None  # the attention the function runs inside goes to torch as is
            try:
                return _OffloadedAttention.apply(q, k, v, bound, stash, slot)
            finally:
                _ROUTING.stash = stash
    return _SDPA(*args, **kwargs)


_routed_sdpa.torch_function = _SDPA


class _Window:
    """While any thread runs an offloading layer's attention module, ``torch.nn.functional.
    scaled_dot_product_attention`` (the module attribute, through which transformers' ``sdpa`` attention calls it)
    is :func:`_routed_sdpa`; when the last such module returns, torch's own function is put back. Counted under a
    lock across threads: the attribute is process-wide, so nothing is left patched between calls (``restore``
    has nothing to undo)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open = 0

    def enter(self) -> bool:
        """Open the window; ``False`` (nothing changed) when the attribute is someone else's function (another
        library patched it): that attention is left to it and recomputed as usual."""
        functional = torch.nn.functional
        with self._lock:
            if functional.scaled_dot_product_attention not in (_SDPA, _routed_sdpa):
                return False
            self._open += 1
            functional.scaled_dot_product_attention = _routed_sdpa
            return True

    def leave(self) -> None:
        functional = torch.nn.functional
        with self._lock:
            self._open -= 1
            if self._open == 0 and functional.scaled_dot_product_attention is _routed_sdpa:
                functional.scaled_dot_product_attention = _SDPA


_WINDOW = _Window()


@contextlib.contextmanager
def _routing(stash: Any):
    if not _WINDOW.enter():
        yield
        return
    previous = getattr(_ROUTING, "stash", None)
    _ROUTING.stash = stash
    try:
        yield
    finally:
        _ROUTING.stash = previous
        _WINDOW.leave()


def attention_offload():
    """A context in which the attention calls of the offloading layer running now keep their tensors in its host
    stash (a no-op outside such a layer): calls of ``torch.nn.functional.scaled_dot_product_attention`` made
    through the module attribute (as transformers' ``sdpa`` attention does) are routed (:func:`_routed_sdpa`)."""
    stash = recompute.layer_stash()
    if stash is None or not stash.attention:  # the layer's mode, read when the layer started
        return contextlib.nullcontext()
    return _routing(stash)
