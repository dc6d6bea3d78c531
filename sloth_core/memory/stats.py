"""The counters of checkpointing and offloading (tests and benchmarks read them)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class CheckpointingStats:
    checkpointed_calls: int = 0  # layer calls run under a checkpoint
    offloaded: int = 0           # tensors copied to host memory: layer inputs and MLP inputs
    mlp_inputs: int = 0          # of those, MLP inputs (kept by the fused LoRA MLP: recompute.mlp_input_stash)
    attention_tensors: int = 0   # of those, tensors attention nodes saved (sloth_core.attention_offload)
    attention_reused: int = 0    # attention outputs a recompute took from host memory instead of recomputing
    attention_composite: int = 0  # attention calls that were no single node (math backend): recomputed as before
    qkv_outputs: int = 0         # of the offloaded tensors, q/k/v projection outputs (modes keeping them)
    qkv_reused: int = 0          # q/k/v projection calls a recompute answered from host memory instead of computing
    offloaded_bytes: int = 0
    pinned: int = 0              # of those, into pinned memory
    kept_on_device: int = 0      # "offload" calls whose input stayed on its device
    recomputes: int = 0          # layer recomputes in the backward
    restored: int = 0            # copies back to the device
    prefetched: int = 0          # of those, started before they were asked for
    host_allocations: int = 0    # host buffers allocated (pool misses)


STATS = CheckpointingStats()


def checkpointing_stats() -> CheckpointingStats:
    """A snapshot of the counters."""
    return dataclasses.replace(STATS)


def reset_checkpointing_stats() -> None:
    for f in dataclasses.fields(STATS):
        setattr(STATS, f.name, 0)
