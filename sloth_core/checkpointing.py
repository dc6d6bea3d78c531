"""Gradient checkpointing of decoder layers, optionally offloading the kept layer inputs to pinned host memory.

    from sloth_core.checkpointing import enable_checkpointing, disable_checkpointing, checkpointed_layers
    enable_checkpointing(model, "on")        # or "offload"; returns the paths of the wrapped layers
    disable_checkpointing(model)             # back to the original forwards, bit-identical

What is wrapped: every ``transformers.modeling_layers.GradientCheckpointingLayer`` instance (the decoder layers of
transformers 5.x), or, for models without one, the children of a ``ModuleList`` named ``layers`` or ``h``. A layer
inside an already-wrapped layer is left alone (no nested checkpoints). Only the instance's ``forward`` is replaced
(through :mod:`sloth_core.binding`, pattern name ``"checkpointing"``), so ``sloth_core.restore`` undoes it too.

This module holds the public API and which layers are wrapped; :mod:`sloth_core.checkpointing_wrapper` the layer
wrapper, the checkpointed call and the offloading of its input; :mod:`sloth_core.memory` holds the host buffers and
copies (``host``), the per-layer stash (``stash``), the counters (``stats``).

When: a wrapped layer checkpoints every call that builds a graph -- ``torch.is_grad_enabled()`` and some tensor input
or some parameter of the layer requires grad -- in ``train()`` *and* ``eval()`` mode (Hugging Face's own
checkpointing only acts in training mode, and ``from_pretrained`` returns an eval-mode model). Other calls
(``no_grad``, inference, fully frozen layers) run the layer as is.

Hugging Face's checkpointing: wrapped layers get ``gradient_checkpointing`` set to a falsy marker (restored by
:func:`disable_checkpointing`, unless it was changed meanwhile), so ``GradientCheckpointingLayer.__call__`` does not
checkpoint a second time. If it is turned back on afterwards (``model.gradient_checkpointing_enable()``), the
wrapper sees that Hugging Face already checkpoints the call (training mode) and runs the layer as is.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from . import binding
from .checkpointing_wrapper import (OFFLOAD_MODES, PATTERN, STATE_ATTR, _gradient_checkpointing_layer_class, _install,
                                    _LayerState, _suspend_hf_checkpointing, _undo, _warn_once)
from .memory.host import POOL
from .memory.stats import STATS, CheckpointingStats, checkpointing_stats, reset_checkpointing_stats  # noqa: F401

MODES = ("off", "on", *OFFLOAD_MODES)
_FALLBACK_CONTAINERS = ("layers", "h")


# ---------------------------------------------------------------------------------------------------------------------
# Counters (tests and benchmarks read them)


# CheckpointingStats, STATS, checkpointing_stats, reset_checkpointing_stats: sloth_core.memory.stats


# ---------------------------------------------------------------------------------------------------------------------
# Public API


def enable_checkpointing(model: nn.Module, mode: str = "on",
                         mlp_output_unused: Callable[[nn.Module], bool] | None = None,
                         attention_output_unused: Callable[[nn.Module], bool] | None = None) -> list[str]:
    """Checkpoint the decoder layers of ``model`` (a transformers model or a PEFT model around one).

    ``mode``: ``"on"`` (keep each layer's input on its device), ``"offload"`` (keep it in pinned host memory, and the
    attention output and the q/k/v projection outputs too, instead of recomputing them), ``"offload-attention"`` /
    ``"offload-qkv"`` (the inputs and only that one), ``"offload-inputs"`` (the inputs alone) or ``"off"`` (same as
    :func:`disable_checkpointing`). The mode is stored per layer; a layer call reads it when it starts. In place.
    Calling it again changes the mode of the layers already wrapped; it never wraps twice. Returns the paths
    (``model.named_modules()`` names) of the wrapped layers.

    ``mlp_output_unused(layer)``: whether nothing the layer saves for its backward depends on its MLP's output
    (the MLP output only feeds the residual add that ends the layer; declared per architecture by
    :class:`sloth_core.registry.LayerFacts`). For such layers the fused LoRA MLP skips its down projection in
    the recompute (:mod:`sloth_core.recompute`).

    ``attention_output_unused(layer)``: whether nothing the layer saves between its attention's output projection
    and the norm before its MLP depends on that projection's output (:meth:`sloth_core.registry.LayerFacts.
    attention_output_unused`). In such offloading layers the norm keeps its input in host memory, and the
    recompute skips the output projection (:class:`LayerStash`).
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
    POOL.clear()


# ---------------------------------------------------------------------------------------------------------------------
# Which layers


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
