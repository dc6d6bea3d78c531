"""The per-layer stash of an offloading checkpointed layer: what the layer's kernels (the fused LoRA MLP, the
fused q/k/v projection, the attention offload) keep in host memory in its first forward and take back in its
recompute, matched by call order within the layer run (:mod:`sloth_core.recompute`). :mod:`sloth_core.checkpointing`
makes one per layer call (:func:`layer_stash_for`) and hands it to the layer through the recompute scope."""
from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable

import torch

from .. import recompute
from .host import Group, HostCopy, offload_target
from .stats import STATS


class _KeptOnDevice:
    """A stashed tensor that could not go to host memory: kept as is."""

    def __init__(self, x: torch.Tensor):
        self._x = x

    def restore(self) -> torch.Tensor:
        return self._x


class LayerStash:
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
    * :meth:`qkv_slot` / :meth:`keep_qkv` / :meth:`kept_qkv` (modes keeping the q/k/v outputs): the fused q/k/v
      projection's outputs, which the recompute takes back instead of computing them.

    The MLP input of a layer whose norm before the MLP kept its input here is not copied: its handle recomputes
    the norm from that copy (the same kernel on the same tensor: the same values)."""

    PROJECTION = "lora_linear"  # the call kind of :meth:`projection`
    QKV = "lora_qkv"  # ... and of :meth:`qkv_slot`

    def __init__(self, target: str, group: "Group", keeps: tuple[bool, bool] = (True, True),
                 keep_norm_input: bool = False):
        self.target, self.group = target, group
        # the layer's mode, read when the layer started: the first forward and the recompute take the same path (the
        # checkpoint pairs their saves)
        self.attention, self.qkv = keeps
        self.keep_norm_input = keep_norm_input
        self._outputs: dict[int, tuple[HostCopy, weakref.ref]] = {}
        self._qkv: dict[int, list[HostCopy]] = {}
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

    def host_copy(self, x: torch.Tensor, kind: str = "attention") -> "HostCopy | None":
        copies = self.host_copies((x,), kind)
        return copies[0] if copies is not None else None

    def host_copies(self, xs: tuple[torch.Tensor, ...], kind: str) -> "list[HostCopy] | None":
        """Host copies of all of ``xs`` in this layer's group, started together, or ``None`` when one of them
        cannot go to host memory."""
        if any(offload_target(x) != self.target for x in xs):
            return None
        return HostCopy.many(xs, pinned=self.target == "pinned", group=self.group, kind=kind)

    def keep_output(self, slot: int, copy: "HostCopy | None", output: torch.Tensor) -> None:
        """``copy`` holds the ``slot``-th attention call's ``output`` (the tensor the call returned)."""
        if copy is not None:
            self._outputs[slot] = (copy, weakref.ref(output))

    def kept_output(self, slot: int) -> "HostCopy | None":
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
    """One LoRA linear call of a layer run (:meth:`LayerStash.projection`)."""

    index: int
    handle: Any  # None: save as usual; RECOMPUTED: save nothing; else a handle whose restore() gives the input
    output_unused: bool  # the recompute may leave the output uncomputed


RECOMPUTED = object()  # LayerStash.after_attention in the recompute: save nothing
_ATTENTION_MODULE = "attention_module"  # the call kind counting the attention module's returns in a layer run


def _same_memory(x: torch.Tensor, y: torch.Tensor) -> bool:
    """``x`` and ``y`` are the same elements in the same order (views of one dense block, shapes may differ)."""
    return (x.data_ptr() == y.data_ptr() and x.numel() == y.numel() and x.dtype == y.dtype
            and x.device == y.device and x.is_contiguous() and y.is_contiguous())


class _SharedView:
    """Another tensor's host copy seen with ``shape`` (the output projection's input is the attention output's
    memory: one copy serves both)."""

    def __init__(self, copy: "HostCopy", shape: torch.Size):
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


def layer_stash_for(hidden: torch.Tensor, group: "Group | None", keeps: tuple[bool, bool],
                 keep_norm_input: bool = False) -> LayerStash | None:
    """The stash of an offloading layer whose input goes to host memory (``None`` when it stays on the device);
    ``keeps``: :data:`OFFLOAD_MODES`' (attention output, q/k/v outputs) of the layer's mode."""
    target = offload_target(hidden)
    return LayerStash(target, group, keeps, keep_norm_input) if target is not None and group is not None else None
