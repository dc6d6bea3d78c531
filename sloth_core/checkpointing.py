"""Gradient checkpointing of decoder layers, optionally offloading the kept layer inputs to pinned host memory.

    from sloth_core.checkpointing import enable_checkpointing, disable_checkpointing, checkpointed_layers
    enable_checkpointing(model, "on")        # or "offload"; returns the paths of the wrapped layers
    disable_checkpointing(model)             # back to the original forwards, bit-identical

What is wrapped: every ``transformers.modeling_layers.GradientCheckpointingLayer`` instance (the decoder layers of
transformers 5.x), or, for models without one, the children of a ``ModuleList`` named ``layers`` or ``h``. A layer
inside an already-wrapped layer is left alone (no nested checkpoints). Only the instance's ``forward`` is replaced
(through :mod:`sloth_core.binding`, pattern name ``"checkpointing"``), so ``sloth_core.restore`` undoes it too.

When: a wrapped layer checkpoints every call that builds a graph -- ``torch.is_grad_enabled()`` and some tensor input
or some parameter of the layer requires grad -- in ``train()`` *and* ``eval()`` mode (Hugging Face's own
checkpointing only acts in training mode, and ``from_pretrained`` returns an eval-mode model). Other calls
(``no_grad``, inference, fully frozen layers) run the layer as is.

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
  buffers, also when the batch length varies) receives the input on a side CUDA stream (``non_blocking``). The side stream first waits for the compute
  stream (the input is complete), and ``record_stream`` keeps the caching allocator from handing the input's memory
  to anyone else before the copy has read it. The device tensor is then no longer referenced by the graph.
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
  recompute takes them back instead of running the projections (:meth:`_LayerStash.kept_qkv`).
* Prefetch: the host copies one layer call makes form a group (:class:`_Group`). In the backward, restoring any
  copy of a group starts copying back the rest of that group, and restoring a layer input (its recompute starts)
  starts copying back the previous layer's last copy (its MLP input, or its input) -- each copy overlaps the
  backward that runs before it is needed, and at most one layer's copies are in flight ahead.

Inputs that are not on a CUDA device (or not dense) stay where they are: ``"offload"`` then behaves as ``"on"``.
For the CPU test suite ``_OFFLOAD_CPU_INPUTS = True`` makes CPU inputs take the whole offload path with plain
(unpinned) host buffers and synchronous copies.

KV caches: a layer whose class does not declare ``_can_checkpoint_with_cache`` gets its cache argument -- any keyword
whose value is a transformers ``Cache`` (``past_key_values`` up to transformers 5.17, ``cache`` from 5.2x), or one
named ``past_key_values`` / ``cache`` / ``layer_past`` -- set to ``None`` and ``use_cache=False`` on checkpointed
calls (what Hugging Face's checkpointing does: the recompute would write the cache a second time). The loss and
gradients are unchanged; the returned cache stays empty.

Hugging Face's checkpointing: wrapped layers get ``gradient_checkpointing`` set to a falsy marker (restored by
:func:`disable_checkpointing`, unless it was changed meanwhile), so ``GradientCheckpointingLayer.__call__`` does not
checkpoint a second time. If it is turned back on afterwards (``model.gradient_checkpointing_enable()``), the
wrapper sees that Hugging Face already checkpoints the call (training mode) and runs the layer as is.
"""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import threading
import warnings
import weakref
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import binding
from .attention_offload import attention_offload
from . import recompute
from .recompute import checkpointed_layer_scope
from .memory.layout import dense_order
from .memory.stats import STATS, CheckpointingStats, checkpointing_stats, reset_checkpointing_stats  # noqa: F401
from .warning import SlothCoreWarning

PATTERN = "checkpointing"
KERNEL = "torch.utils.checkpoint"
# What each mode keeps in host memory besides the layer (and MLP) inputs: (the attention output, the q/k/v outputs).
OFFLOAD_MODES = {"offload": (True, True), "offload-attention": (True, False), "offload-qkv": (False, True),
                 "offload-inputs": (False, False)}
MODES = ("off", "on", *OFFLOAD_MODES)
STATE_ATTR = "_sloth_core_checkpointing"
HF_FLAG = "gradient_checkpointing"
_FALLBACK_CONTAINERS = ("layers", "h")
ATTENTION_ATTR = "self_attn"  # the decoder layer's attention module (transformers' name in every decoder layer)
MLP_ATTR = "mlp"  # ... and its MLP
LORA_MLP_PATTERN = "lora_mlp"  # the registry pattern of the fused LoRA MLP (sloth_core.registry.patterns.lora)
# The attention output kept (sloth_core.attention_offload; exact, tests) instead of recomputed (the recompute then
# skips the output projection: _LayerStash). H200, same machine: steps 1.5% (QLoRA) / 0.9% (LoRA) shorter than
# without (train_llama-3-8b_20261129_s7a / s7b); with the q/k/v outputs kept in both, 0.9% / 1.5% (s7c against s7e).
# The q/k/v outputs kept: the fused q/k/v LoRA projection (sloth_core.kernels.lora.lora_qkv) keeps its three outputs
# in host memory, and the recompute takes them back instead of running the projections' GEMMs again (its saved x
# and x A^T are recomputed as before). Exact: the recompute's input is bitwise the first forward's. Costs q + k + v
# of host traffic a layer each way (96 MiB for Llama-3-8B at 4 x 2048 tokens). H200, same machine: steps 2.3%
# (QLoRA) / 3.0% (LoRA) shorter with it (s7c against s7d, attention kept in both). Both kept against neither (s7f /
# s7g, W_d change included): LoRA 592.1 against 615.7 ms, QLoRA 647.0 against 629.2 ms: a QLoRA step takes the host
# about as long as the GPU (diag_offload_jitter_qlora_h200_20261129.txt), and the copies are host work (_HostCopy:
# 0.14 s of 1.76 s profiled over two steps, profile_host_qlora_h200_20261129_s7.txt).
_CACHE_KWARGS = ("past_key_values", "cache", "layer_past")

# Test hook: route CPU layer inputs through the offload path too (plain host buffers, synchronous copies).
_OFFLOAD_CPU_INPUTS = False


# ---------------------------------------------------------------------------------------------------------------------
# Counters (tests and benchmarks read them)


# CheckpointingStats, STATS, checkpointing_stats, reset_checkpointing_stats: sloth_core.memory.stats


_warned: set[str] = set()


def _warn_once(key: str, message: str, stacklevel: int = 3) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, SlothCoreWarning, stacklevel=stacklevel)


# ---------------------------------------------------------------------------------------------------------------------
# Public API


def enable_checkpointing(model: nn.Module, mode: str = "on",
                         mlp_output_unused: Callable[[nn.Module], bool] | None = None,
                         attention_output_unused: Callable[[nn.Module], bool] | None = None) -> list[str]:
    """Checkpoint the decoder layers of ``model`` (a transformers model or a PEFT model around one).

    ``mode``: ``"on"`` (keep each layer's input on its device), ``"offload"`` (keep it in pinned host memory, and
    the attention output and the q/k/v projection outputs too, instead of recomputing them), ``"offload-attention"``
    / ``"offload-qkv"`` (the inputs and only that one), ``"offload-inputs"`` (the inputs alone) or ``"off"`` (same
    as :func:`disable_checkpointing`). The mode is stored per layer; a layer call reads it when it starts. In place. Calling it again changes the mode of the layers
    already wrapped; it never wraps twice. Returns the paths (``model.named_modules()`` names) of the wrapped
    layers.

    ``mlp_output_unused(layer)``: whether nothing the layer saves for its backward depends on its MLP's output
    (the MLP output only feeds the residual add that ends the layer; declared per architecture by
    :class:`sloth_core.registry.LayerFacts`). For such layers the fused LoRA MLP skips its down projection in
    the recompute (:mod:`sloth_core.recompute`).

    ``attention_output_unused(layer)``: whether nothing the layer saves between its attention's output projection
    and the norm before its MLP depends on that projection's output (:meth:`sloth_core.registry.LayerFacts.
    attention_output_unused`). In such offloading layers the norm keeps its input in host memory, and the
    recompute skips the output projection (:class:`_LayerStash`).
    """
    if mode not in MODES:
        raise ValueError(f"enable_checkpointing(mode={mode!r}): expected one of {MODES}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"enable_checkpointing(model): expected a torch.nn.Module, got {type(model).__name__}")
    if mode == "off":
        disable_checkpointing(model)
        return []
    layers = decoder_layers(model)
    if not layers:
        _warn_once(f"no-layers:{type(model).__name__}",
                   f"enable_checkpointing: found no decoder layers in {type(model).__name__} (no "
                   f"GradientCheckpointingLayer, no ModuleList named {' / '.join(_FALLBACK_CONTAINERS)}); "
                   f"nothing is checkpointed")
    for _, layer in layers:
        unused = bool(mlp_output_unused(layer)) if mlp_output_unused is not None else False
        projection = unused and attention_output_unused is not None and bool(attention_output_unused(layer))
        state = layer.__dict__.get(STATE_ATTR)
        if isinstance(state, _LayerState) and binding.is_bound(layer, PATTERN):
            state.mode, state.mlp_output_unused, state.attention_output_unused = mode, unused, projection
            _suspend_hf_checkpointing(layer)
        else:
            _install(layer, _LayerState(mode, unused, projection))
    return [path for path, _ in layers]


def disable_checkpointing(model: nn.Module) -> None:
    """Undo :func:`enable_checkpointing` on every layer of ``model``: the layers' ``forward`` (and Hugging Face's
    ``gradient_checkpointing`` flag) are what they were before; other sloth_core replacements stay."""
    todo = []
    for path, module in model.named_modules():
        recs = binding.records(module)
        ours = [r for r in recs if r.pattern == PATTERN]
        if not ours:
            continue
        for rec in ours:
            i = next(k for k, r in enumerate(recs) if r is rec)
            later = [r.pattern for r in recs[i + 1:] if r.pattern != PATTERN and r.attr == rec.attr]
            if later:
                raise RuntimeError(f"disable_checkpointing: {path or type(module).__name__}.{rec.attr} was replaced "
                                   f"again after checkpointing was enabled (by {later[0]!r}); "
                                   f"sloth_core.restore(model) undoes both")
        todo.append((module, ours))
    for module, ours in todo:
        for rec in reversed(ours):
            _undo(module, rec)
        recs = module.__dict__[binding.RECORD_ATTR]
        recs[:] = [r for r in recs if r.pattern != PATTERN]
        if not recs:
            del module.__dict__[binding.RECORD_ATTR]


def checkpointed_layers(model: nn.Module) -> list[str]:
    """Paths of the layers of ``model`` that :func:`enable_checkpointing` wrapped."""
    return [path for path, _ in checkpointed_modes(model)]


def checkpointed_modes(model: nn.Module) -> list[tuple[str, str]]:
    """``(path, mode)`` of each layer of ``model`` that :func:`enable_checkpointing` wrapped."""
    return [(path, m.__dict__[STATE_ATTR].mode) for path, m in model.named_modules()
            if binding.is_bound(m, PATTERN) and isinstance(m.__dict__.get(STATE_ATTR), _LayerState)]


def clear_host_pool() -> None:
    """Drop the pooled host buffers (they are reused across steps otherwise)."""
    _POOL.clear()


# ---------------------------------------------------------------------------------------------------------------------
# Which layers


@functools.cache
def _gradient_checkpointing_layer_class():
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - transformers < 4.52
        return None
    return GradientCheckpointingLayer


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost decoder layers of ``model`` (``GradientCheckpointingLayer`` s, else the children of a
    ``ModuleList`` named ``layers`` / ``h``), with their paths."""
    gcl = _gradient_checkpointing_layer_class()
    named = list(model.named_modules())
    found = [(p, m) for p, m in named if gcl is not None and isinstance(m, gcl)]
    if not found:
        found = [(f"{p}.{name}" if p else name, child) for p, m in named
                 if isinstance(m, nn.ModuleList) and p.rsplit(".", 1)[-1] in _FALLBACK_CONTAINERS
                 for name, child in m.named_children()]
    outer: list[tuple[str, nn.Module]] = []
    for path, module in found:  # pre-order: a nested layer follows its enclosing one
        if outer and (outer[-1][0] == "" or path.startswith(outer[-1][0] + ".")):
            continue
        outer.append((path, module))
    return outer


# ---------------------------------------------------------------------------------------------------------------------
# Installing / undoing


@dataclasses.dataclass
class _LayerState:
    mode: str
    mlp_output_unused: bool = False  # see enable_checkpointing
    attention_output_unused: bool = False  # see enable_checkpointing


class _Suspended:
    """Stands in for a wrapped layer's Hugging Face ``gradient_checkpointing`` flag: falsy, so
    ``GradientCheckpointingLayer.__call__`` does not checkpoint on top of the wrapper. One instance, kept by
    ``copy``/``deepcopy``/pickle, so :func:`disable_checkpointing` recognises it on copies."""

    _instance: "_Suspended | None" = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "<gradient_checkpointing suspended by sloth_core.checkpointing>"

    def __reduce__(self):
        return (_Suspended, ())

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


_SUSPENDED = _Suspended()


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
    layer's stash learns where the module's calls end (:meth:`_LayerStash.attention_module_done`)."""
    stash = recompute.layer_stash()
    start = recompute.calls_in_run(_LayerStash.PROJECTION) if stash is not None else 0
    with attention_offload():
        out = binding.previous_forward(self, PATTERN)(*args, **kwargs)
    if stash is not None:
        stash.attention_module_done(start, out)
    return out


def _keeps_norm_input(layer: nn.Module, state: _LayerState) -> bool:
    """Whether an offloading layer's norm before the MLP keeps its input in host memory (:class:`_LayerStash`):
    declared (``state.attention_output_unused``), and the layer's MLP is the fused LoRA MLP, whose input is then
    that norm recomputed."""
    mlp = getattr(layer, MLP_ATTR, None)
    return state.attention_output_unused and isinstance(mlp, nn.Module) and binding.is_bound(mlp, LORA_MLP_PATTERN)


def _suspend_hf_checkpointing(layer: nn.Module) -> None:
    if any(r.pattern == PATTERN and r.attr == HF_FLAG for r in binding.records(layer)):
        layer.__dict__[HF_FLAG] = _SUSPENDED
    elif hasattr(layer, HF_FLAG):
        _push(layer, HF_FLAG, _SUSPENDED)


def _undo(module: nn.Module, rec: binding.BindingRecord) -> None:
    if rec.attr == HF_FLAG and module.__dict__.get(rec.attr) is not _SUSPENDED:
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
    if dropped:
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
    STATS.checkpointed_calls += 1
    keeps = OFFLOAD_MODES.get(state.mode)
    group = _Group(hidden.device) if keeps is not None else None
    hooks = _offloading(hidden, group) if keeps is not None else contextlib.nullcontext()
    stash = _layer_stash(hidden, group, keeps, _keeps_norm_input(self, state)) \
        if keeps is not None and state.mlp_output_unused else None
    with hooks:
        # The input goes in positionally: the checkpoint keeps it (through the ambient saved-tensor hooks, which
        # is where offloading catches it) and infers from it whose RNG state to preserve.
        return checkpoint(_marking_recomputes(run, state.mlp_output_unused, stash), hidden, use_reentrant=False,
                          preserve_rng_state=True)


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


class _KeptOnDevice:
    """A stashed tensor that could not go to host memory: kept as is."""

    def __init__(self, x: torch.Tensor):
        self._x = x

    def restore(self) -> torch.Tensor:
        return self._x


class _LayerStash:
    """What one call of an offloading layer keeps in host memory besides its input (the same pool, the same side
    stream, the same prefetch group), shared by the layer's first forward and its recompute:

    * called as ``stash(x)`` (:func:`sloth_core.recompute.mlp_input_stash`): the fused LoRA MLP's input; the
      handle's ``restore()`` gives it back in the backward (it stays on the device when it cannot go);
    * :meth:`host_copy`: a tensor an attention node saves (:mod:`sloth_core.attention_offload`), or ``None``
      when it cannot go to host memory;
    * :meth:`keep_output` / :meth:`kept_output`: which of those copies is the ``slot``-th attention call's output,
      so that the recompute can return it instead of running the attention again;
    * :meth:`after_attention`: for the functions after a kept attention (the output projection, the norm before
      the MLP), a handle that keeps their input here, so that they save nothing through the checkpoint and the
      recompute can end at the attention (:data:`RECOMPUTED` in the recompute). Without a kept attention, in
      layers whose norm before the MLP keeps its input (``keep_norm_input``: declared by the architecture,
      fused LoRA MLP), that norm's input -- the norms that run after the attention module returned.
    * :meth:`projection`: for a LoRA linear, the same, and whether the recompute may leave its output
      uncomputed: the attention module's last LoRA linear (its output projection), in a layer whose norm before
      the MLP kept its input and whose MLP input is that norm recomputed. Nothing saved then depends on the
      projection's output (``keep_norm_input`` declares that nothing in between saves), so the recompute ends
      once the projection has saved its input -- the output projection's GEMM runs once a step, not twice;
    * :meth:`qkv_slot` / :meth:`keep_qkv` / :meth:`kept_qkv` (modes keeping the q/k/v outputs): the fused q/k/v projection's
      outputs, which the recompute takes back instead of computing them.

    The MLP input of a layer whose norm before the MLP kept its input here is not copied: its handle recomputes
    the norm from that copy (the same kernel on the same tensor: the same values)."""

    PROJECTION = "lora_linear"  # the call kind of :meth:`projection`
    QKV = "lora_qkv"  # ... and of :meth:`qkv_slot`

    def __init__(self, target: str, group: "_Group", keeps: tuple[bool, bool] = (True, True),
                 keep_norm_input: bool = False):
        self.target, self.group = target, group
        # the layer's mode, read when the layer started: the first forward and the recompute take the same path (the
        # checkpoint pairs their saves)
        self.attention, self.qkv = keeps
        self.keep_norm_input = keep_norm_input
        self._outputs: dict[int, tuple[_HostCopy, weakref.ref]] = {}
        self._qkv: dict[int, list[_HostCopy]] = {}
        self._decisions: dict[tuple[str, int], bool] = {}
        self._norm_outputs: list[tuple[torch.Tensor, Callable[[], torch.Tensor]]] = []
        # first forward: the attention module's last LoRA linear call, and whether the MLP input was derived
        self._output_projection: int | None = None
        self._last_projection: tuple[int, weakref.ref] | None = None
        self._mlp_input_derived = False

    def __call__(self, x: torch.Tensor) -> Any:
        for i, (out, recompute_norm) in enumerate(self._norm_outputs):
            if _same_memory(x, out):
                del self._norm_outputs[i]
                STATS.mlp_inputs += 1
                if not recompute.recomputing():
                    self._mlp_input_derived = True
                return _Derived(recompute_norm, x.shape)
        copy = self.host_copy(x, kind="mlp_input")
        return copy if copy is not None else _KeptOnDevice(x)

    def after_attention(self, kind: str, x: torch.Tensor, share: bool = False) -> Any:
        """A handle whose ``restore()`` gives ``x`` back in the backward, for a function of ``kind`` running after
        this layer's kept attention output (``share``: only when ``x`` is that output's memory, e.g. the output
        projection's input); ``None``: save as usual. The recompute replays the first forward's answer by call
        order, returning :data:`RECOMPUTED` (save nothing: that node's backward never runs) where it kept."""
        return self._after_attention(kind, recompute.next_call_index(kind), x, share)

    def _after_attention(self, kind: str, index: int, x: torch.Tensor, share: bool) -> Any:
        if recompute.recomputing():
            return RECOMPUTED if self._decisions.get((kind, index)) else None
        handle = None
        if self.attention and recompute.calls_in_run("attention") and self._outputs:
            handle = self._share(x) if share else self.host_copy(x, kind="after_attention")
        elif self.keep_norm_input and kind == "rms_norm" and recompute.calls_in_run(_ATTENTION_MODULE):
            handle = self.host_copy(x, kind="after_attention")
        self._decisions[(kind, index)] = handle is not None
        return handle

    def projection(self, x: torch.Tensor) -> "_ProjectionCall":
        """A LoRA linear of this layer starts, with input ``x``: its handle as :meth:`after_attention` gives it,
        and whether this call -- in the recompute -- may leave its output uncomputed (see the class docstring).
        It reports its output to :meth:`projected`."""
        index = recompute.next_call_index(self.PROJECTION)
        handle = self._after_attention(self.PROJECTION, index, x, share=True)
        unused = (recompute.recomputing() and self.keep_norm_input and self._mlp_input_derived
                  and self._output_projection == index)
        return _ProjectionCall(index, handle, unused)

    def projected(self, call: "_ProjectionCall", y: torch.Tensor) -> None:
        """``call`` computed ``y`` (first forward)."""
        if not recompute.recomputing():
            self._last_projection = (call.index, weakref.ref(y))

    def attention_module_done(self, projections_before: int, output: Any) -> None:
        """The attention module returned ``output``; it started when :meth:`projection` had been called
        ``projections_before`` times in this run. In the first forward its output projection is the last LoRA
        linear it called, if that one computed the module's output tensor (a view of the same memory)."""
        recompute.next_call_index(_ATTENTION_MODULE)
        if recompute.recomputing():
            return
        self._output_projection = None
        n = recompute.calls_in_run(self.PROJECTION)
        last = self._last_projection
        out = output[0] if isinstance(output, (tuple, list)) and output else output
        if n > projections_before and last is not None and last[0] == n - 1 and isinstance(out, torch.Tensor):
            y = last[1]()
            if y is not None and _same_memory(out, y):
                self._output_projection = n - 1

    def norm_output(self, out: torch.Tensor, recompute_norm: Callable[[], torch.Tensor]) -> None:
        """``out`` (a norm's output whose input is kept here) can be recomputed by ``recompute_norm()``."""
        self._norm_outputs.append((out, recompute_norm))

    def _share(self, x: torch.Tensor) -> "_SharedView | None":
        for copy, output in self._outputs.values():
            output = output()  # alive: x's memory cannot be someone else's
            if output is not None and _same_memory(x, output.permute(copy.order)):
                return _SharedView(copy, x.shape)
        return None

    def host_copy(self, x: torch.Tensor, kind: str = "attention") -> "_HostCopy | None":
        copies = self.host_copies((x,), kind)
        return copies[0] if copies is not None else None

    def host_copies(self, xs: tuple[torch.Tensor, ...], kind: str) -> "list[_HostCopy] | None":
        """Host copies of all of ``xs`` in this layer's group, started together, or ``None`` when one of them
        cannot go to host memory."""
        if any(_offload_target(x) != self.target for x in xs):
            return None
        return _HostCopy.many(xs, pinned=self.target == "pinned", group=self.group, kind=kind)

    def keep_output(self, slot: int, copy: "_HostCopy | None", output: torch.Tensor) -> None:
        """``copy`` holds the ``slot``-th attention call's ``output`` (the tensor the call returned)."""
        if copy is not None:
            self._outputs[slot] = (copy, weakref.ref(output))

    def kept_output(self, slot: int) -> "_HostCopy | None":
        kept = self._outputs.get(slot)
        return kept[0] if kept is not None else None

    def qkv_slot(self) -> int | None:
        """The index of a fused q/k/v projection call in this layer run when the layer keeps their outputs
        (its mode, read when the layer started), else ``None``."""
        return recompute.next_call_index(self.QKV) if self.qkv else None

    def keep_qkv(self, slot: int, outputs: tuple[torch.Tensor, ...]) -> None:
        """First forward: the ``slot``-th q/k/v call computed ``outputs``; their host copies answer the recompute's
        call (all of them or none: an output that cannot go to host memory keeps the call computing)."""
        copies = None if recompute.recomputing() else self.host_copies(outputs, kind="qkv")
        if copies is not None:
            self._qkv[slot] = copies

    def kept_qkv(self, slot: int) -> "tuple[torch.Tensor, ...] | None":
        """Recompute: the ``slot``-th q/k/v call's outputs from the first forward, back on the device, or ``None``
        (compute them)."""
        copies = self._qkv.get(slot) if recompute.recomputing() else None
        if copies is None:
            return None
        STATS.qkv_reused += 1
        return tuple(c.restore() for c in copies)


@dataclasses.dataclass
class _ProjectionCall:
    """One LoRA linear call of a layer run (:meth:`_LayerStash.projection`)."""

    index: int
    handle: Any  # None: save as usual; RECOMPUTED: save nothing; else a handle whose restore() gives the input
    output_unused: bool  # the recompute may leave the output uncomputed


RECOMPUTED = object()  # _LayerStash.after_attention in the recompute: save nothing
_ATTENTION_MODULE = "attention_module"  # the call kind counting the attention module's returns in a layer run


def _same_memory(x: torch.Tensor, y: torch.Tensor) -> bool:
    """``x`` and ``y`` are the same elements in the same order (views of one dense block, shapes may differ)."""
    return (x.data_ptr() == y.data_ptr() and x.numel() == y.numel() and x.dtype == y.dtype
            and x.device == y.device and x.is_contiguous() and y.is_contiguous())


class _SharedView:
    """Another tensor's host copy seen with ``shape`` (the output projection's input is the attention output's
    memory: one copy serves both)."""

    def __init__(self, copy: "_HostCopy", shape: torch.Size):
        self.copy, self.shape = copy, shape

    def restore(self) -> torch.Tensor:
        # kept: the attention's recompute and its node read the same copy after this
        return self.copy.restore(keep=True).permute(self.copy.order).reshape(self.shape)


class _Derived:
    """An MLP input recomputed from a kept norm input: ``recompute_norm()`` seen with ``shape``."""

    def __init__(self, recompute_norm: Callable[[], torch.Tensor], shape: torch.Size):
        self.recompute_norm, self.shape = recompute_norm, shape

    def restore(self) -> torch.Tensor:
        return self.recompute_norm().reshape(self.shape)


def _layer_stash(hidden: torch.Tensor, group: "_Group | None", keeps: tuple[bool, bool],
                 keep_norm_input: bool = False) -> _LayerStash | None:
    """The stash of an offloading layer whose input goes to host memory (``None`` when it stays on the device);
    ``keeps``: :data:`OFFLOAD_MODES`' (attention output, q/k/v outputs) of the layer's mode."""
    target = _offload_target(hidden)
    return _LayerStash(target, group, keeps, keep_norm_input) if target is not None and group is not None else None


# ---------------------------------------------------------------------------------------------------------------------
# Offloading the kept input


def _offload_target(x: torch.Tensor) -> str | None:
    if dense_order(x) is None:
        return None
    if x.is_cuda:
        return "pinned"
    if x.device.type == "cpu" and _OFFLOAD_CPU_INPUTS:
        return "host"
    return None


@contextlib.contextmanager
def _offloading(hidden: torch.Tensor, group: "_Group"):
    target = _offload_target(hidden)
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

    def __init__(self, hidden: torch.Tensor, target: str, group: "_Group"):
        self.hidden: torch.Tensor | None = hidden
        self.target, self.group = target, group
        self.caught = False

    def _is_input(self, x: torch.Tensor) -> bool:
        h = self.hidden
        return h is not None and (x is h or (x.data_ptr() == h.data_ptr() and x.shape == h.shape
                                             and x.dtype == h.dtype and x.device == h.device))

    def pack(self, x: torch.Tensor) -> Any:
        if not self._is_input(x):
            return x
        self.hidden = None
        self.caught = True
        return _HostCopy(x, pinned=self.target == "pinned", group=self.group, kind="input")

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        return packed.restore() if isinstance(packed, _HostCopy) else packed


def _capacity(numel: int) -> int:
    """The size of a new pool buffer: ``numel`` rounded up to a power of 2 (at least 1024)."""
    return max(1024, 1 << (numel - 1).bit_length())


class _HostPool:
    """Free host buffers by (device they serve, dtype, pinned), each list sorted by size. A request takes the
    smallest free buffer that holds it and allocates (a power-of-2 size) only when none does: batches of varying
    length reuse the buffers of earlier, longer ones instead of allocating for every new size -- pinning host
    memory costs about a second per few GiB, more than a training step. Buffers come back from ``__del__`` (any
    thread): a reentrant lock."""

    def __init__(self):
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.RLock()

    def acquire(self, numel: int, dtype: torch.dtype, device: torch.device, pinned: bool):
        key = (str(device), dtype, pinned)
        with self._lock:
            free = self._free.get(key)
            if free:
                i = bisect.bisect_left(free, numel, key=torch.Tensor.numel)
                if i < len(free):
                    return key, free.pop(i)
        STATS.host_allocations += 1
        return key, torch.empty(_capacity(numel), dtype=dtype, pin_memory=pinned)

    def release(self, key: tuple, buf: torch.Tensor) -> None:
        with self._lock:
            bisect.insort(self._free.setdefault(key, []), buf, key=torch.Tensor.numel)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


_POOL = _HostPool()
_PREFETCH_FROM_SIDE_POOL = True  # copies back allocate from the side stream's pool (see _HostCopy.prefetch)
_SIDE_STREAMS: dict[int, "torch.cuda.Stream"] = {}
_CHAIN = threading.local()  # the last _Group made by this thread's forward


class _Group:
    """The host copies one call of an offloading layer made (its input, its MLP input, attention tensors), in
    the order they were made, and the group of the layer call before it on this thread (forward order).

    Prefetch rule, in the backward (which visits the groups in reverse): restoring any copy of a group starts the
    copies back of the rest of its group; restoring a group's layer input (the start of the layer's recompute)
    also starts the copy back of the previous group's last copy -- the first one the previous layer's backward
    asks for (its MLP input, or its layer input when it has nothing else)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.members: list[weakref.ref] = []
        last = getattr(_CHAIN, "last", None)
        last = last() if last is not None else None
        self.previous = weakref.ref(last) if last is not None and last.device == device else None
        _CHAIN.last = weakref.ref(self)

    def live(self) -> list["_HostCopy"]:
        return [c for c in (m() for m in self.members) if c is not None]

    def prefetch_rest(self, restoring: "_HostCopy") -> None:
        for c in self.live():
            if c is not restoring and c.restores == 0:
                c.prefetch()

    def prefetch_previous(self) -> None:
        previous = self.previous() if self.previous is not None else None
        copies = previous.live() if previous is not None else []
        if copies and copies[-1].restores == 0:
            copies[-1].prefetch()


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _SIDE_STREAMS.get(index)
    if stream is None:
        stream = _SIDE_STREAMS.setdefault(index, torch.cuda.Stream(device=index))
    return stream


# Stream switching costs tens of microseconds through torch.cuda's public helpers (``current_stream`` builds a
# Stream object under a device guard, ``torch.cuda.stream`` does that twice more); an offloading step switches
# ~450 times. On the current device, the same calls go through the bindings those helpers wrap, with the Stream
# objects cached by id; elsewhere (another device current) through the public helpers.
_GET_STREAM = getattr(torch._C, "_cuda_getCurrentStream", None)
_SET_STREAM = getattr(torch._C, "_cuda_setStream", None)
_STREAMS: dict[tuple, "torch.cuda.Stream"] = {}
_READY = threading.local()  # per thread and device: an event marking the current stream's queue for the side stream


def _fast_streams(device: torch.device) -> bool:
    return _GET_STREAM is not None and _SET_STREAM is not None and device.index == torch.cuda.current_device()


def _current_stream(device: torch.device) -> "torch.cuda.Stream":
    if not _fast_streams(device):
        return torch.cuda.current_stream(device)
    key = tuple(_GET_STREAM(device.index))
    stream = _STREAMS.get(key)
    if stream is None:
        if len(_STREAMS) >= 64:  # streams made and dropped over and over (external ones have ids of their own)
            _STREAMS.clear()
        stream = _STREAMS.setdefault(key, torch.cuda.Stream(stream_id=key[0], device_index=key[1],
                                                            device_type=key[2]))
    return stream


class _OnStream:
    """``torch.cuda.stream(stream)`` where ``current`` is the current stream (of ``stream``'s device)."""

    __slots__ = ("stream", "current", "public")

    def __init__(self, stream: "torch.cuda.Stream", current: "torch.cuda.Stream"):
        self.stream, self.current = stream, current
        self.public = None if _fast_streams(stream.device) else torch.cuda.stream(stream)

    def __enter__(self) -> None:
        if self.public is not None:
            self.public.__enter__()
            return
        s = self.stream
        _SET_STREAM(stream_id=s.stream_id, device_index=s.device_index, device_type=s.device_type)

    def __exit__(self, *exc) -> None:
        if self.public is not None:
            self.public.__exit__(*exc)
            return
        c = self.current
        _SET_STREAM(stream_id=c.stream_id, device_index=c.device_index, device_type=c.device_type)


def _side_waits_for(current: "torch.cuda.Stream", side: "torch.cuda.Stream") -> None:
    """``side.wait_stream(current)`` through one reused event (a wait takes the event's latest record; the event is
    this thread's, so no other thread records it between the two calls)."""
    events = getattr(_READY, "events", None)
    if events is None:
        events = _READY.events = {}
    ready = events.get(current.device_index)
    if ready is None:
        ready = events[current.device_index] = torch.cuda.Event()
    ready.record(current)
    side.wait_event(ready)


def _copies_to_host(copies: "list[_HostCopy]", tensors: list[torch.Tensor]) -> None:
    """Start each ``copies[i].host.copy_(tensors[i])`` on the side stream of their device, after the work queued
    on the current stream (which produces the tensors), with one stream switch for all of them."""
    device = tensors[0].device
    side, current = _side_stream(device), _current_stream(device)
    _side_waits_for(current, side)
    with _OnStream(side, current):
        for copy, x in zip(copies, tensors):
            copy.host.copy_(x if copy.inverse is None else x.permute(copy.order), non_blocking=True)
    for x in tensors:
        x.record_stream(side)  # its memory is not reused before the copy has read it


_IDENTITY = tuple(tuple(range(n)) for n in range(9))


class _HostCopy:
    """A tensor of an offloading layer (its input, its MLP input, an attention tensor) held in a pooled host buffer
    between the layer's forward and the backward that reads it. Dense tensors in any dimension order (e.g. an
    attention output [B, H, T, D] laid out as [B, T, H, D]) come back with their strides.

    ``_HostCopy(x, ...)`` starts the copy; :meth:`many` starts several with one stream switch."""

    def __init__(self, x: torch.Tensor, pinned: bool, group: _Group | None = None, kind: str = "input",
                 start: bool = True):
        if x.is_contiguous():
            order = _IDENTITY[x.dim()] if x.dim() < len(_IDENTITY) else tuple(range(x.dim()))
            self.inverse, shape = None, x.shape
        else:
            order = dense_order(x)
            self.inverse = tuple(sorted(range(len(order)), key=order.__getitem__))
            shape = x.permute(order).shape
        self.order = order
        self.shape, self.dtype, self.device = shape, x.dtype, x.device
        self._key, self._buf = _POOL.acquire(x.numel(), x.dtype, x.device, pinned)
        self.host = self._buf[: x.numel()].view(shape)
        self._ahead: tuple[torch.Tensor, Any] | None = None  # a copy back started before it was asked for
        self._kept: torch.Tensor | None = None  # restored with keep=True: the next restore returns it
        self.restores = 0
        self.kind = kind
        if start:
            if x.is_cuda:
                _copies_to_host([self], [x])
            else:
                self.host.copy_(x if self.inverse is None else x.permute(order))
        STATS.offloaded += 1
        STATS.mlp_inputs += int(kind == "mlp_input")
        STATS.attention_tensors += int(kind == "attention")
        STATS.qkv_outputs += int(kind == "qkv")
        STATS.offloaded_bytes += x.numel() * x.element_size()
        STATS.pinned += int(pinned)
        self.group = weakref.ref(group) if group is not None else None
        if group is not None:
            group.members.append(weakref.ref(self))

    @classmethod
    def many(cls, xs: "tuple[torch.Tensor, ...] | list[torch.Tensor]", pinned: bool, group: _Group | None = None,
             kind: str = "input") -> "list[_HostCopy]":
        """``[_HostCopy(x, ...) for x in xs]`` with the device copies started together."""
        copies = [cls(x, pinned, group, kind, start=not x.is_cuda) for x in xs]
        cuda = [(c, x) for c, x in zip(copies, xs) if x.is_cuda]
        if cuda:
            _copies_to_host([c for c, _ in cuda], [x for _, x in cuda])
        return copies

    def __del__(self):
        buf = self.__dict__.get("_buf")
        if buf is not None:  # the buffer's last copies were queued on the side stream: later ones queue after
            _POOL.release(self._key, buf)

    def prefetch(self) -> None:
        """Start copying the tensor back to its device (no-op when already started)."""
        if self._ahead is not None or self._kept is not None:
            return
        if self.device.type != "cuda":
            y = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            y.copy_(self.host)
            self._ahead = (y, None)
            return
        side = _side_stream(self.device)
        current = _current_stream(self.device)
        if _PREFETCH_FROM_SIDE_POOL:
            # allocated from the side stream's pool: the copy need not wait for the compute stream's queued work
            # (which may be milliseconds long); restore() records the compute stream's use of it
            with _OnStream(side, current):
                y = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                y.copy_(self.host, non_blocking=True)
                done = torch.cuda.Event()
                done.record(side)
        else:
            y = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            _side_waits_for(current, side)  # y's memory may have just been freed there
            with _OnStream(side, current):
                y.copy_(self.host, non_blocking=True)
                done = torch.cuda.Event()
                done.record(side)
            y.record_stream(side)  # safe to free even if never waited on
        self._ahead = (y, done)

    def restore(self, keep: bool = False) -> torch.Tensor:
        """The tensor on its device; starts the copies back its group's prefetch rule names (:class:`_Group`).
        ``keep``: hold on to the device tensor, which the next ``restore`` returns (no second copy)."""
        if self._kept is not None:
            y = self._kept
            self._kept = y if keep else None
            self.restores += 1
            return y
        early = self._ahead is not None
        self.prefetch()
        y, done = self._ahead
        self._ahead = None
        if done is not None:
            current = _current_stream(self.device)
            current.wait_event(done)
            if _PREFETCH_FROM_SIDE_POOL:
                y.record_stream(current)  # its memory goes back to the side pool only after the compute uses
        self.restores += 1
        STATS.restored += 1
        STATS.prefetched += int(early)
        group = self.group() if self.group is not None else None
        if group is not None:
            group.prefetch_rest(self)
            if self.kind == "input":
                group.prefetch_previous()
        if self.inverse is not None:
            y = y.permute(self.inverse)
        if keep:
            self._kept = y
        return y
