"""Helpers shared by the patterns' verification probes."""
from __future__ import annotations

import torch
from torch import nn


def module_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The compute dtype and device of ``module``: its first floating parameter that is not a LoRA adapter's
    (PEFT keeps adapters in fp32 under a bf16 base; bitsandbytes 4-bit weights are uint8 storage, so their
    ``compute_dtype``/quant state are consulted), or float32 on the CPU."""
    for name, p in module.named_parameters():
        if p.is_floating_point() and "lora_" not in name:
            return p.dtype, p.device
    for m in module.modules():
        cd = getattr(m, "compute_dtype", None)
        w = getattr(m, "weight", None)
        if isinstance(cd, torch.dtype) and w is not None:
            return cd, w.device
        qs = getattr(w, "quant_state", None)
        if qs is not None and getattr(qs, "dtype", None) is not None:
            return qs.dtype, w.device
    for p in module.parameters():
        return torch.float32, p.device
    return torch.float32, torch.device("cpu")


def randn(shape, dtype, device, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Normal noise drawn on the CPU from ``generator`` (reproducible), then moved; never zeros."""
    t = torch.randn(shape, generator=generator, dtype=torch.float32) * scale
    return t.to(device=device, dtype=dtype)


def row_scales(rows: int, generator: torch.Generator) -> torch.Tensor:
    """Per-row magnitudes spanning 1e-3..10 so that epsilon terms and large values are both exercised."""
    exps = torch.linspace(-3.0, 1.0, rows)
    jitter = torch.rand(rows, generator=generator) * 0.5
    return (10.0 ** (exps + jitter)).unsqueeze(-1)


def autocast_state(device: torch.device) -> torch.dtype | None:
    """The autocast dtype on ``device``'s type, or ``None`` when autocast is off (a part of a pattern's
    ``setting``)."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def input_dtype(args: tuple) -> torch.dtype | None:
    """The dtype of a call's first positional argument, when it is a tensor (a part of a pattern's ``setting``)."""
    return args[0].dtype if args and isinstance(args[0], torch.Tensor) else None
