"""Activation memory: what checkpointing and offloading keep and where. ``host``: where a tensor goes, the host buffer
pool, the side stream, the copies and their prefetch groups; ``stash``: the per-layer stash the kernels of an
offloading layer keep their tensors in; ``layout``: a tensor's dense order; ``saved``: what a saved-tensor hook keeps
on the device; ``stats``: the counters. The layer wrapper is :mod:`sloth_core.checkpointing_wrapper`, the public API
:mod:`sloth_core.checkpointing`.
"""
