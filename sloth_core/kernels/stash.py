"""What the kernels of an offloading checkpointed layer may ask its stash: the seam between the kernels and the
activation-memory code. The kernels see only these protocols (through :func:`sloth_core.recompute.layer_stash`
and :func:`sloth_core.recompute.mlp_input_stash`); :class:`sloth_core.memory.stash.LayerStash` implements them. The
kernels import nothing from the checkpointing code.

A *handle* is what a stash gives back for a tensor it keeps: ``restore()`` returns the tensor (in the backward, or
in the recompute), wherever it was kept. The stash answers ``None`` for a tensor it does not take (save it as
usual) and :data:`RECOMPUTED`-like sentinels the kernel never restores (save nothing: the recompute regenerates it).
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import torch


class Handle(Protocol):
    """A kept tensor."""

    def restore(self) -> torch.Tensor: ...


class ProjectionCall(Protocol):
    """One LoRA linear call of a layer run, as the stash sees it."""

    handle: Any            # None: save the input as usual; else a Handle or a sentinel (save nothing)
    output_unused: bool    # the recompute may leave this projection's output uncomputed


@runtime_checkable
class LayerStash(Protocol):
    """The stash of one offloading layer call (its first forward and its recompute share it)."""

    def __call__(self, x: torch.Tensor) -> Handle:
        """Keep the fused LoRA MLP's input ``x`` (:data:`InputStash`)."""

    def projection(self, x: torch.Tensor) -> ProjectionCall:
        """A LoRA linear of the layer starts with input ``x``."""

    def projected(self, call: ProjectionCall, y: torch.Tensor) -> None:
        """``call`` computed ``y``."""

    def after_attention(self, kind: str, x: torch.Tensor, share: bool = False) -> Any:
        """A module after the attention (``kind``: ``"rms_norm"``) saves ``x``: ``None`` (save it), a handle, or
        a sentinel (save nothing)."""

    def norm_output(self, out: torch.Tensor, recompute_norm: Callable[[], torch.Tensor]) -> None:
        """``out`` (a norm whose input the stash keeps) can be recomputed by ``recompute_norm()``."""

    def qkv_slot(self) -> int | None:
        """The index of a fused q/k/v call whose outputs the layer keeps, else ``None``."""

    def kept_qkv(self, slot: int) -> tuple[torch.Tensor, ...] | None:
        """In the recompute: the outputs the first forward kept for ``slot``."""

    def keep_qkv(self, slot: int, outputs: tuple[torch.Tensor, ...]) -> None:
        """In the first forward: keep ``outputs`` for ``slot``."""


# The fused LoRA MLP's stash for its input (:func:`sloth_core.recompute.mlp_input_stash`): input -> handle.
InputStash = Callable[[torch.Tensor], Handle]
