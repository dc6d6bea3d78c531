"""The checkpointed decoder-layer call of :mod:`sloth_core.checkpointing` (which holds the public API): installing
and undoing the wrapper, the checkpointed call, and the saved-tensor hooks that offload the layer input.

How, mode ``"on"``: ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the forward keeps no activation
of the layer, only its input ``hidden_states`` (the other arguments -- masks, ``position_embeddings``, ... -- are
shared by all layers); the backward reruns the layer with the CPU and device RNG states of the forward (dropout
masks are the same) and under the forward's autocast state. Non-reentrant checkpointing gives parameters their
gradients even when the layer input does not require grad (LoRA without ``enable_input_require_grads``).

The layer's first forward and its recompute run under :func:`sloth_core.recompute.checkpointed_layer_scope`, so
fused functions know which one they are in: their backward may then overwrite the (recomputed, private) tensors it
receives, and in layers declared to feed their MLP output straight into the closing residual add
(``LayerFacts``) the recompute skips the MLP's down projection, whose value no saved tensor depends on.

Mode ``"offload"``: the same, and the one tensor the checkpoint keeps -- the layer input -- is moved to host memory.
The checkpoint saves its positional inputs through the ambient ``saved_tensors_hooks``; the wrapper puts a pair of
hooks around the checkpoint call that catch exactly the layer input:

* pack (forward): a pinned host buffer from a pool (the smallest free one that holds it, so steps reuse the same
  buffers, also when the batch length varies) receives the input on a side CUDA stream (``non_blocking``). The side
  stream first waits for the compute stream (the input is complete), and ``record_stream`` keeps the caching allocator
  from handing the input's memory to anyone else before the copy has read it. The device tensor is then no longer
  referenced by the graph.
* unpack (start of the layer's recompute, in the backward): the input is copied back on the side stream into a fresh
  device tensor (unless a prefetch already started that) and the compute stream waits on that copy's event.
* A pinned buffer returns to the pool when the graph that holds it is freed. All copies into and out of the pool's
  buffers of one device run on that device's single side stream, so a reused buffer is never written before the
  copies that read it earlier have run.

* The MLP input too, in layers whose MLP output nothing saved depends on (``LayerFacts``): the wrapper hands the
  layer a stash (:func:`sloth_core.recompute.mlp_input_stash`) that puts the fused LoRA MLP's input into the same
  pool. That MLP then saves nothing through the checkpoint, so its backward (which recomputes gate/up itself) runs
  before the layer's recompute -- the recomputed attention tensors are not alive during it.
* In those layers, in modes ``"offload"`` (the default) and ``"offload-attention"``, the attention's output and
  row statistics too (:mod:`sloth_core.attention_offload`, through a wrapper on the layer's ``self_attn``): the
  recompute takes the output back instead of running the attention, and ends there.
* In those layers, in modes ``"offload"`` and ``"offload-qkv"``, the fused q/k/v projection's three outputs too: the
  recompute takes them back instead of running the projections (:meth:`sloth_core.memory.stash.LayerStash.kept_qkv`).
* Prefetch: the host copies one layer call makes form a group (:class:`sloth_core.memory.host.Group`). In the
  backward, restoring any copy of a group starts copying back the rest of that group, and restoring a layer input (its
  recompute starts) starts copying back the previous layer's last copy (its MLP input, or its input) -- each copy
  overlaps the backward that runs before it is needed, and at most one layer's copies are in flight ahead.

Inputs that are not on a CUDA device (or not dense) stay where they are: ``"offload"`` then behaves as ``"on"``.
For the CPU test suite ``OFFLOAD_CPU_INPUTS = True`` makes CPU inputs take the whole offload path with plain
(unpinned) host buffers and synchronous copies.

KV caches: a layer whose class does not declare ``_can_checkpoint_with_cache`` gets its cache argument -- any keyword
whose value is a transformers ``Cache`` (``past_key_values`` up to transformers 5.17, ``cache`` from 5.2x), or one
named ``past_key_values`` / ``cache`` / ``layer_past`` -- set to ``None`` and ``use_cache=False`` on checkpointed
calls (what Hugging Face's checkpointing does: the recompute would write the cache a second time). The loss and
gradients are unchanged; the returned cache stays empty.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import warnings
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import binding
from .attention_offload import attention_offload
from . import recompute
from .recompute import checkpointed_layer_scope
from .memory.host import Group, HostCopy, offload_target
from .memory.saved import kept
from .memory.stash import LayerStash, layer_stash_for
from .memory.stats import STATS
from .warning import SlothCoreWarning

PATTERN = "checkpointing"
KERNEL = "torch.utils.checkpoint"
# What each mode keeps in host memory besides the layer (and MLP) inputs: (the attention output, the q/k/v outputs).
OFFLOAD_MODES = {"offload": (True, True), "offload-attention": (True, False), "offload-qkv": (False, True),
                 "offload-inputs": (False, False)}
STATE_ATTR = "_sloth_core_checkpointing"
HF_FLAG = "gradient_checkpointing"
ATTENTION_ATTR = "self_attn"  # the decoder layer's attention module (transformers' name in every decoder layer)
MLP_ATTR = "mlp"  # ... and its MLP
LORA_MLP_PATTERN = "lora_mlp"  # the registry pattern of the fused LoRA MLP (sloth_core.registry.patterns.lora)
# The attention output kept (sloth_core.attention_offload; exact, tests) instead of recomputed (the recompute then
# skips the output projection: LayerStash). H200, same machine: steps 1.5% (QLoRA) / 0.9% (LoRA) shorter than
# without (train_llama-3-8b_20261129_s7a / s7b); with the q/k/v outputs kept in both, 0.9% / 1.5% (s7c against s7e).
# The q/k/v outputs kept: the fused q/k/v LoRA projection (sloth_core.kernels.lora_qkv.lora_qkv) keeps its three
# outputs in host memory, and the recompute takes them back instead of running the projections' GEMMs again (its saved x
# and x A^T are recomputed as before). Exact: the recompute's input is bitwise the first forward's. Costs q + k + v
# of host traffic a layer each way (96 MiB for Llama-3-8B at 4 x 2048 tokens). H200, same machine: steps 2.3%
# (QLoRA) / 3.0% (LoRA) shorter with it (s7c against s7d, attention kept in both). Both kept against neither (s7f /
# s7g, W_d change included): LoRA 592.1 against 615.7 ms, QLoRA 647.0 against 629.2 ms: a QLoRA step takes the host
# about as long as the GPU (diag_offload_jitter_qlora_h200_20261129.txt), and the copies are host work (HostCopy:
# 0.14 s of 1.76 s profiled over two steps, profile_host_qlora_h200_20261129_s7.txt).
_CACHE_KWARGS = ("past_key_values", "cache", "layer_past")


_warned: set[str] = set()


def _warn_once(key: str, message: str, stacklevel: int = 3) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, SlothCoreWarning, stacklevel=stacklevel)


def _gradient_checkpointing_layer_class():
    """transformers' ``GradientCheckpointingLayer``, or ``None`` while its module is not loaded (then no layer is
    one). Looked up in ``sys.modules``, which Dynamo traces (a cached import it would trace with a warning)."""
    return getattr(sys.modules.get("transformers.modeling_layers"), "GradientCheckpointingLayer", None)


# ---------------------------------------------------------------------------------------------------------------------
# Installing / undoing


@dataclasses.dataclass
class _LayerState:
    mode: str
    mlp_output_unused: bool = False  # see enable_checkpointing
    attention_output_unused: bool = False  # see enable_checkpointing


class _Suspended:
    """Stands in for a wrapped layer's Hugging Face ``gradient_checkpointing`` flag: falsy, so
    ``GradientCheckpointingLayer.__call__`` does not checkpoint on top of the wrapper. It remembers HF's value
    (``hf_on``). Kept by ``copy``/``deepcopy`` (one instance a value, so :func:`disable_checkpointing` recognises it
    on copies); pickled as HF's value itself: an unpickled layer has lost our wrapper (its binding records pickle
    empty) and gets HF's checkpointing back."""

    _instances: "dict[bool, _Suspended]" = {}

    def __new__(cls, hf_on: bool = False):
        inst = cls._instances.get(bool(hf_on))
        if inst is None:
            inst = cls._instances[bool(hf_on)] = super().__new__(cls)
            inst.hf_on = bool(hf_on)
        return inst

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"<gradient_checkpointing suspended by sloth_core.checkpointing (HF's: {self.hf_on})>"

    def __reduce__(self):
        return (bool, (self.hf_on,))

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


def _is_missing(previous: Any) -> bool:
    return previous is binding.MISSING


def _push(module: nn.Module, attr: str, value: Any) -> None:
    binding.install_attr(module, attr, value, PATTERN, KERNEL)


def _install(layer: nn.Module, state: _LayerState) -> None:
    _push(layer, STATE_ATTR, state)
    _suspend_hf_checkpointing(layer)
    binding.install_forward(layer, _checkpointed_forward, PATTERN, KERNEL)
    attention = getattr(layer, ATTENTION_ATTR, None)
    if isinstance(attention, nn.Module) and not binding.is_bound(attention, PATTERN):
        binding.install_forward(attention, _attention_forward, PATTERN, KERNEL)


def _attention_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The attention module's forward inside :func:`sloth_core.attention_offload.attention_offload` when the mode of
    the offloading layer running it keeps the attention output (read when the layer started; a no-op otherwise); the
    layer's stash learns where the module's calls end (:meth:`LayerStash.attention_module_done`)."""
    stash = recompute.layer_stash()
    start = recompute.calls_in_run(LayerStash.PROJECTION) if stash is not None else 0
    with attention_offload():
        out = binding.previous_forward(self, PATTERN)(*args, **kwargs)
    if stash is not None:
        stash.attention_module_done(start, out)
    return out


def _keeps_norm_input(layer: nn.Module, state: _LayerState) -> bool:
    """Whether an offloading layer's norm before the MLP keeps its input in host memory (:class:`LayerStash`):
    declared (``state.attention_output_unused``), and the layer's MLP is the fused LoRA MLP, whose input is then
    that norm recomputed."""
    mlp = getattr(layer, MLP_ATTR, None)
    return state.attention_output_unused and isinstance(mlp, nn.Module) and binding.is_bound(mlp, LORA_MLP_PATTERN)


def _suspend_hf_checkpointing(layer: nn.Module) -> None:
    current = getattr(layer, HF_FLAG, False)
    marker = _Suspended(current.hf_on if isinstance(current, _Suspended) else bool(current))
    if any(r.pattern == PATTERN and r.attr == HF_FLAG for r in binding.records(layer)):
        layer.__dict__[HF_FLAG] = marker
    elif hasattr(layer, HF_FLAG):
        _push(layer, HF_FLAG, marker)


def _undo(module: nn.Module, rec: binding.BindingRecord) -> None:
    if rec.attr == HF_FLAG and not isinstance(module.__dict__.get(rec.attr), _Suspended):
        return  # set again since (e.g. gradient_checkpointing_enable()): leave the user's value
    if _is_missing(rec.previous):
        module.__dict__.pop(rec.attr, None)
    else:
        module.__dict__[rec.attr] = rec.previous


# ---------------------------------------------------------------------------------------------------------------------
# The wrapper


def _inner_forward(layer: nn.Module) -> Callable:
    """The forward the wrapper replaced (looked up on the instance, so a deep copy calls its own)."""
    return binding.previous_forward(layer, PATTERN)


def _hf_checkpoints_this_call(layer: nn.Module) -> bool:
    gcl = _gradient_checkpointing_layer_class()
    return gcl is not None and isinstance(layer, gcl) and bool(getattr(layer, HF_FLAG, False)) and layer.training


def _requires_grad(obj: Any, depth: int = 2) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.requires_grad
    if depth > 0:
        if isinstance(obj, (tuple, list)):
            return any(_requires_grad(o, depth - 1) for o in obj)
        if isinstance(obj, dict):
            return any(_requires_grad(o, depth - 1) for o in obj.values())
    return False


def _builds_graph(layer: nn.Module, args: tuple, kwargs: dict) -> bool:
    return torch.is_grad_enabled() and (_requires_grad(args) or _requires_grad(kwargs)
                                        or any(p.requires_grad for p in layer.parameters()))


def _is_cache(value: Any) -> bool:
    from transformers.cache_utils import Cache

    return isinstance(value, Cache)


def _without_cache(layer: nn.Module, kwargs: dict) -> dict:
    if getattr(layer, "_can_checkpoint_with_cache", False):
        return kwargs
    out = dict(kwargs)
    dropped = [k for k, v in out.items() if v is not None and (k in _CACHE_KWARGS or _is_cache(v))]
    for k in dropped:
        out[k] = None
    if out.get("use_cache"):
        out["use_cache"] = False
    if dropped and not torch.compiler.is_compiling():  # (a warning in traced code would break the graph)
        _warn_once("cache", f"sloth_core checkpointing: {type(layer).__name__} runs checkpointed calls without "
                            f"its KV cache ({', '.join(dropped)}=None, use_cache=False), as Hugging Face's "
                            f"checkpointing does; the loss and gradients are unchanged")
    return out


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    inner = _inner_forward(self)
    state = self.__dict__.get(STATE_ATTR)
    if not isinstance(state, _LayerState) or _hf_checkpoints_this_call(self) or \
            not _builds_graph(self, args, kwargs):
        return inner(*args, **kwargs)
    kwargs = _without_cache(self, kwargs)
    if args and isinstance(args[0], torch.Tensor):
        hidden, rest = args[0], args[1:]

        def run(h):
            return inner(h, *rest, **kwargs)
    elif isinstance(kwargs.get("hidden_states"), torch.Tensor):
        hidden = kwargs["hidden_states"]
        others = {k: v for k, v in kwargs.items() if k != "hidden_states"}

        def run(h):
            return inner(*args, hidden_states=h, **others)
    else:
        return inner(*args, **kwargs)
    keeps = OFFLOAD_MODES.get(state.mode)
    if torch.compiler.is_compiling():  # traced: torch's checkpoint alone, the input kept on the device
        if keeps is not None:  # warned at trace time (a warning in traced code would break the graph)
            from torch._dynamo.comptime import comptime  # (loaded while tracing anyway; 1 s to import)

            comptime(_warn_offload_traced)
        return checkpoint(run, hidden, use_reentrant=False, preserve_rng_state=True)
    STATS.checkpointed_calls += 1
    group = Group(hidden.device) if keeps is not None else None
    hooks = _offloading(hidden, group) if keeps is not None else contextlib.nullcontext()
    stash = layer_stash_for(hidden, group, keeps, _keeps_norm_input(self, state)) \
        if keeps is not None and state.mlp_output_unused else None
    with hooks:
        # The input goes in positionally: the checkpoint keeps it (through the ambient saved-tensor hooks, which
        # is where offloading catches it) and infers from it whose RNG state to preserve.
        return checkpoint(_marking_recomputes(run, state.mlp_output_unused, stash), hidden, use_reentrant=False,
                          preserve_rng_state=True)


def _warn_offload_traced(_ctx=None) -> None:
    _warn_once("compile", "sloth_core checkpointing: under torch.compile the offloading modes run as \"on\" "
                          "(the layer inputs stay in device memory; offloading to host memory is eager-only)",
               stacklevel=2)


def _marking_recomputes(run: Callable, mlp_output_unused: bool, stash: Callable | None = None) -> Callable:
    """``run`` under :func:`sloth_core.recompute.checkpointed_layer_scope`: its first call is the layer's
    forward, the later ones the checkpoint's recomputes in the backward (``stash``: the same for all calls)."""
    calls = 0

    def marked(h):
        nonlocal calls
        calls += 1
        if calls > 1:
            STATS.recomputes += 1
        with checkpointed_layer_scope(recompute=calls > 1, mlp_output_unused=mlp_output_unused, stash=stash):
            return run(h)

    return marked


# ---------------------------------------------------------------------------------------------------------------------
# Offloading the kept input


@contextlib.contextmanager
def _offloading(hidden: torch.Tensor, group: "Group"):
    target = offload_target(hidden)
    if target is None:
        STATS.kept_on_device += 1
        yield
        return
    catcher = _InputCatcher(hidden, target, group)
    try:
        with torch.autograd.graph.saved_tensors_hooks(catcher.pack, catcher.unpack):
            yield
    finally:
        caught = catcher.caught
        catcher.hidden = None  # the hooks live as long as the graph: they must not keep the input alive
    if not caught:
        STATS.kept_on_device += 1
        _warn_once("not-caught", "sloth_core checkpointing: torch.utils.checkpoint did not save the layer input "
                                 "through saved-tensor hooks; \"offload\" keeps it on the device (as \"on\")")


class _InputCatcher:
    """The saved-tensor hooks around one checkpoint call: the layer input goes to host memory, anything else
    passes through."""

    def __init__(self, hidden: torch.Tensor, target: str, group: "Group"):
        self.hidden: torch.Tensor | None = hidden
        self.target, self.group = target, group
        self.caught = False

    def _is_input(self, x: torch.Tensor) -> bool:
        h = self.hidden
        return h is not None and (x is h or (x.data_ptr() == h.data_ptr() and x.shape == h.shape
                                             and x.dtype == h.dtype and x.device == h.device))

    def pack(self, x: torch.Tensor) -> Any:
        if not self._is_input(x):
            return kept(x)
        self.hidden = None
        self.caught = True
        return HostCopy(x, pinned=self.target == "pinned", group=self.group, kind="input")

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        return packed.restore() if isinstance(packed, HostCopy) else packed
