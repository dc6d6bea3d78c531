"""Reading a PEFT LoRA linear layer into a :class:`LoRASpec` for the fused LoRA functions, or saying why they cannot
compute it."""
from __future__ import annotations

import functools

from torch import nn

from sloth_core.kernels.lora_base import LoRASpec, _base_reason


@functools.lru_cache(maxsize=None)
def _peft_classes() -> tuple[type, tuple[type, ...]]:
    """``(LoraLayer, the LoRA linear classes the fused path computes)``."""
    from peft.tuners.lora.layer import Linear, LoraLayer

    try:
        from peft.tuners.lora.bnb import Linear4bit, Linear8bitLt
    except ImportError:  # peft without bitsandbytes support
        return LoraLayer, (Linear,)
    return LoraLayer, (Linear, Linear4bit, Linear8bitLt)


def _hooks_reason(name: str, module: nn.Module) -> str | None:
    if module._forward_hooks or module._forward_pre_hooks:
        return f"{name} has forward hooks (the fused path would skip them)"
    return None


def _adapter_reason(layer: nn.Module, adapter: str) -> str | None:
    """Why the one active adapter is not plain LoRA (``None``: it is)."""
    if adapter in getattr(layer, "lora_variant", {}):
        return (f"adapter {adapter!r} uses the {type(layer.lora_variant[adapter]).__name__} variant "
                "(DoRA, ...); only plain LoRA is supported")
    dropout = layer.lora_dropout[adapter]
    if type(dropout) not in (nn.Identity, nn.Dropout):
        return f"lora_dropout is a {type(dropout).__name__} (torch.nn.Dropout and Identity are supported)"
    if isinstance(dropout, nn.Dropout):
        if dropout.inplace:
            return "lora_dropout is in place (inplace=True)"
        if dropout.p > 0 and not getattr(layer, "cast_input_dtype_enabled", True):
            return "lora_dropout > 0 with the input cast to the adapter dtype disabled (cast_input_dtype_enabled)"
        if _hooks_reason("lora_dropout", dropout):
            return _hooks_reason("lora_dropout", dropout)
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        return "lora_bias=True is not supported"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out=True is not supported"
    lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_B.bias is not None:
        return "the adapter's lora_A/lora_B are not bias-free nn.Linear layers"
    return _hooks_reason("lora_A", lora_A) or _hooks_reason("lora_B", lora_B)


def lora_spec(peft_lora_layer: nn.Module) -> LoRASpec | str:
    """The :class:`LoRASpec` of a PEFT LoRA linear layer, or the reason the fused functions cannot compute it.

    Cheap (attribute reads): call it at each forward, since adapters can be switched, merged or disabled."""
    layer = peft_lora_layer
    try:
        lora_layer, linear_classes = _peft_classes()
    except ImportError:
        return "peft is not installed"
    if not isinstance(layer, lora_layer):
        return f"{type(layer).__name__} is not a PEFT LoRA layer"
    base = layer.get_base_layer()
    why = _base_reason(base)
    if why is not None:
        return why
    if not isinstance(layer, linear_classes):
        return (f"PEFT LoRA layer {type(layer).__name__} is not supported "
                "(LoRA Linear, Linear4bit and Linear8bitLt are)")
    if layer.disable_adapters:
        return "the adapters are disabled"
    if layer.merged:
        return "the adapters are merged into the base weight"
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return f"{len(active)} active LoRA adapters ({', '.join(active) or 'none'}); exactly one is supported"
    adapter = active[0]
    why = _adapter_reason(layer, adapter) or _hooks_reason("the base layer", base)
    if why is not None:
        return why
    dropout = layer.lora_dropout[adapter]
    p = float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    return LoRASpec(base, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, float(layer.scaling[adapter]),
                    p)
