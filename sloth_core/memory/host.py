"""Host memory for offloaded activations: where a tensor goes (:func:`offload_target`), the pool of host buffers
(:class:`HostPool`), the side CUDA stream and its cheap switching, the copies themselves (:class:`HostCopy`) and
the prefetch groups (:class:`Group`). The rules these follow -- one side stream per device, a buffer reused only
after the copies that read it, prefetch one layer ahead -- are :mod:`sloth_core.checkpointing_wrapper`'s module
docstring.
"""
from __future__ import annotations

import bisect
import threading
import weakref
from typing import Any

import torch

from .layout import dense_order
from .stats import STATS

# Test hook: route CPU layer inputs through the offload path too (plain host buffers, synchronous copies).
OFFLOAD_CPU_INPUTS = False


def offload_target(x: torch.Tensor) -> str | None:
    if dense_order(x) is None:
        return None
    if x.is_cuda:
        return "pinned"
    if x.device.type == "cpu" and OFFLOAD_CPU_INPUTS:
        return "host"
    return None


def _capacity(numel: int) -> int:
    """The size of a new pool buffer: ``numel`` rounded up to a power of 2 (at least 1024)."""
    return max(1024, 1 << (numel - 1).bit_length())


class HostPool:
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


POOL = HostPool()
PREFETCH_FROM_SIDE_POOL = True  # copies back allocate from the side stream's pool (see HostCopy.prefetch)
_SIDE_STREAMS: dict[int, "torch.cuda.Stream"] = {}
_CHAIN = threading.local()  # the last Group made by this thread's forward


class Group:
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

    def live(self) -> list["HostCopy"]:
        return [c for c in (m() for m in self.members) if c is not None]

    def prefetch_rest(self, restoring: "HostCopy") -> None:
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


def _copies_to_host(copies: "list[HostCopy]", tensors: list[torch.Tensor]) -> None:
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


class HostCopy:
    """A tensor of an offloading layer (its input, its MLP input, an attention tensor) held in a pooled host buffer
    between the layer's forward and the backward that reads it. Dense tensors in any dimension order (e.g. an
    attention output [B, H, T, D] laid out as [B, T, H, D]) come back with their strides.

    ``HostCopy(x, ...)`` starts the copy; :meth:`many` starts several with one stream switch."""

    def __init__(self, x: torch.Tensor, pinned: bool, group: Group | None = None, kind: str = "input",
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
        self._key, self._buf = POOL.acquire(x.numel(), x.dtype, x.device, pinned)
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
    def many(cls, xs: "tuple[torch.Tensor, ...] | list[torch.Tensor]", pinned: bool, group: Group | None = None,
             kind: str = "input") -> "list[HostCopy]":
        """``[HostCopy(x, ...) for x in xs]`` with the device copies started together."""
        copies = [cls(x, pinned, group, kind, start=not x.is_cuda) for x in xs]
        cuda = [(c, x) for c, x in zip(copies, xs) if x.is_cuda]
        if cuda:
            _copies_to_host([c for c, _ in cuda], [x for _, x in cuda])
        return copies

    def __del__(self):
        buf = self.__dict__.get("_buf")
        if buf is not None:  # the buffer's last copies were queued on the side stream: later ones queue after
            POOL.release(self._key, buf)

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
        if PREFETCH_FROM_SIDE_POOL:
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
        """The tensor on its device; starts the copies back its group's prefetch rule names (:class:`Group`).
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
            if PREFETCH_FROM_SIDE_POOL:
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
