"""What the code running right now is: a decoder layer's first forward, or its recompute in the backward.

:mod:`sloth_core.checkpointing` reruns a checkpointed decoder layer in the backward only to regenerate the tensors
its autograd nodes saved (``torch.utils.checkpoint`` with ``use_reentrant=False``: the recompute's outputs are
thrown away, and it stops as soon as the last saved tensor is regenerated). A computation whose result no saved
tensor depends on is wasted there. The one such computation worth skipping is the MLP's down projection
``h = m W_d^T (+ LoRA)`` (a quarter of a Llama layer's FLOPs) in layers whose MLP output only feeds the residual add
that ends the layer -- nothing saved depends on ``h`` then (the fused LoRA MLP then also moves the recompute of
its gate/up projections into its backward, in chunks: :mod:`sloth_core.kernels.lora_mlp`). Which layers those are
is declared per architecture (:class:`sloth_core.registry.LayerFacts`); the checkpointing wrapper opens
:func:`checkpointed_layer_scope`
around the first forward and around the recompute of each layer, and the fused LoRA MLP asks
:func:`mlp_output_unused`, :func:`mlp_recomputed_in_backward` and :func:`in_checkpointed_layer`.

The state is thread-local: the recompute runs on the autograd engine's thread, inside the unpack hook of the
backward, and everything it calls runs on that thread too.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading

from .kernels.stash import InputStash, LayerStash

_STATE = threading.local()


@dataclasses.dataclass
class RecomputeStats:
    mlp_outputs_skipped: int = 0  # MLP down projections not computed in a recompute (tests read it)
    projection_outputs_skipped: int = 0  # attention output projections not computed in a recompute (the same)


STATS = RecomputeStats()


def recomputing() -> bool:
    """Whether a checkpointed layer is being recomputed (in the backward) on this thread."""
    return getattr(_STATE, "recompute_depth", 0) > 0


def in_checkpointed_layer() -> bool:
    """Whether a checkpointed layer runs on this thread -- its first forward or its recompute. The tensors an
    autograd node created now saves reach its backward as the recompute's fresh copies, read by that backward
    alone: the backward may overwrite them."""
    return getattr(_STATE, "layer_depth", 0) > 0


def mlp_output_unused() -> bool:
    """Whether the MLP running now is the recompute of a layer whose MLP output no saved tensor depends on: its
    value is never read, so it need not be computed (only the tensors the backward needs)."""
    return recomputing() and getattr(_STATE, "mlp_output_unused", False)


def mlp_recomputed_in_backward() -> bool:
    """Whether the MLP running now belongs to a checkpointed layer whose MLP output no saved tensor depends on --
    in its first forward or in its recompute. Both must save the same tensors (the checkpoint matches them one
    to one), and the first forward's autograd node runs the backward: such an MLP saves only its input and
    recomputes what its backward needs there."""
    return in_checkpointed_layer() and getattr(_STATE, "mlp_output_unused", False)


def mlp_input_stash() -> InputStash | None:
    """Where such an MLP (:func:`mlp_recomputed_in_backward`) of an offloading layer keeps its input, or ``None``.

    ``stash(x)`` returns a handle whose ``restore()`` gives ``x`` back (on its device) in the backward; the
    checkpointing wrapper passes one that moves ``x`` to host memory like the layer input, prefetched in the
    backward. An MLP that keeps its input there saves no tensor through the checkpoint: its backward then runs
    before the layer's recompute, which is triggered by the first saved tensor the backward unpacks after it --
    so the recomputed attention tensors are not alive while the MLP's backward runs. Both passes of the layer
    must then save nothing in the MLP (the checkpoint pairs the saved tensors one to one)."""
    return getattr(_STATE, "stash", None) if mlp_recomputed_in_backward() else None


def layer_stash() -> LayerStash | None:
    """The host-memory stash of the offloading layer running now (first forward or recompute), or ``None``: the
    kernels ask it what :class:`sloth_core.kernels.stash.LayerStash` says; the attention offload
    (:mod:`sloth_core.attention_offload`) keeps attention tensors there."""
    return getattr(_STATE, "stash", None) if in_checkpointed_layer() else None


def next_call_index(kind: str) -> int:
    """``0, 1, 2, ...`` for the successive calls of ``kind`` in this run of the checkpointed layer (the first
    forward and each recompute count from 0): the recompute's n-th call finds what the first forward's n-th call
    kept."""
    counters = getattr(_STATE, "counters", None)
    if counters is None:
        raise RuntimeError("next_call_index: not inside a checkpointed layer")
    n = counters.get(kind, 0)
    counters[kind] = n + 1
    return n


def calls_in_run(kind: str) -> int:
    """How many calls of ``kind`` this run of the checkpointed layer has made so far (0 outside one)."""
    counters = getattr(_STATE, "counters", None)
    return counters.get(kind, 0) if counters is not None else 0


@contextlib.contextmanager
def checkpointed_layer_scope(recompute: bool, mlp_output_unused: bool = False,
                             stash: LayerStash | None = None):
    """Mark the code inside as a checkpointed layer's first forward (``recompute=False``) or its recompute
    (``mlp_output_unused``: the layer's MLP output feeds nothing its backward needs; ``stash``: see
    :func:`mlp_input_stash`)."""
    prev = (getattr(_STATE, "layer_depth", 0), getattr(_STATE, "recompute_depth", 0),
            getattr(_STATE, "mlp_output_unused", False), getattr(_STATE, "stash", None),
            getattr(_STATE, "counters", None))
    _STATE.layer_depth = prev[0] + 1
    _STATE.recompute_depth = prev[1] + (1 if recompute else 0)
    _STATE.mlp_output_unused = bool(mlp_output_unused)
    _STATE.stash = stash
    _STATE.counters = {}
    try:
        yield
    finally:
        (_STATE.layer_depth, _STATE.recompute_depth, _STATE.mlp_output_unused, _STATE.stash,
         _STATE.counters) = prev


@contextlib.contextmanager
def outside_checkpointed_layer():
    """Run the code inside as if no checkpointed layer were running (a verification probe called from inside a
    layer's first forward must not count as the layer's calls, nor reach its stash)."""
    prev = (getattr(_STATE, "layer_depth", 0), getattr(_STATE, "recompute_depth", 0),
            getattr(_STATE, "mlp_output_unused", False), getattr(_STATE, "stash", None),
            getattr(_STATE, "counters", None))
    _STATE.layer_depth, _STATE.recompute_depth, _STATE.mlp_output_unused, _STATE.stash, _STATE.counters = \
        0, 0, False, None, None
    try:
        yield
    finally:
        (_STATE.layer_depth, _STATE.recompute_depth, _STATE.mlp_output_unused, _STATE.stash,
         _STATE.counters) = prev
