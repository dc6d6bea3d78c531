"""What sloth_core needs to know about PyTorch's distributed engines (DDP, FSDP2 ``fully_shard``); it runs none of
its own and makes no collective call.

* DDP keeps every parameter whole on every rank: the kernels see what they see in one process.
* FSDP2 shards each parameter of a ``fully_shard``-ed module into a ``DTensor`` and gathers it into a plain tensor
  in that module's pre-forward hook: a kernel bound inside the module (norms, MLPs, LoRA layers of a sharded
  decoder layer; the loss of a sharded root) reads whole tensors. Outside that window -- ``optimize`` called after
  ``fully_shard``, or an ``lm_head`` sharded on its own, whose weight the fused loss reads before the head's hook
  would run -- the parameters are shards, which the kernels do not take.
* bitsandbytes 4-bit weights (``Params4bit``, 0.50) lose their quantization state when FSDP2 shards and gathers
  them: such a layer cannot run at all, with or without sloth_core.
"""
from __future__ import annotations

from torch import nn


def is_shard(t) -> bool:
    """A ``DTensor`` (a sharded or replicated distributed tensor), by type name: torch.distributed stays unimported."""
    return type(t).__name__ == "DTensor"


def sharded_parameters(module: nn.Module) -> list[str]:
    """The names of ``module``'s parameters that are ``DTensor`` shards now."""
    return [name for name, p in module.named_parameters() if is_shard(p)]


def _fsdp_wrapped(module: nn.Module) -> bool:
    return any(c.__name__ == "FSDPModule" for c in type(module).__mro__)


def sharded_head_reason(lm_head: nn.Module) -> str | None:
    """Why the fused loss cannot read ``lm_head``'s weight whole at the loss (``None``: it can)."""
    if _fsdp_wrapped(lm_head):
        return ("the lm_head is sharded on its own by FSDP2 fully_shard (its weight is gathered only when the head "
                "itself is called); shard the model's root without a separate fully_shard(lm_head) for the fused loss")
    names = sharded_parameters(lm_head)
    if names:
        return f"the lm_head's {', '.join(names)} is a DTensor shard (tensor or FSDP sharding)"
    return None


def sharded_4bit_reason(base: nn.Module) -> str | None:
    """Why a bitsandbytes 4-bit layer cannot run under FSDP2 (``None``: it is not one that FSDP2 sharded)."""
    w = getattr(base, "weight", None)
    if w is None or "Linear4bit" not in [c.__name__ for c in type(base).__mro__] or type(w).__name__ == "Params4bit" \
            or getattr(w, "quant_state", None) is not None:
        return None
    return (f"{type(base).__name__}'s 4-bit weight is a {type(w).__name__} without quantization state, not "
            f"bitsandbytes' Params4bit: FSDP2 fully_shard (or another engine that re-creates parameters) dropped it; "
            f"bitsandbytes 4-bit layers do not run under FSDP2. Train QLoRA with DDP (each rank holds the whole 4-bit "
            f"model), or FSDP2 on a 16-bit base")
