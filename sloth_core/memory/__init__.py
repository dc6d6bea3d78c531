"""Activation memory: what checkpointing and offloading keep, where, and the counters of it (being moved here from
:mod:`sloth_core.checkpointing` one job at a time; issue 18)."""
