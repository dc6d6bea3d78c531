"""LoRA linears and LoRA gated MLPs for inference: the functions of :mod:`sloth_core.kernels.lora_linear` and
:mod:`~sloth_core.kernels.lora_mlp` without autograd.

No ``autograd.Function``, nothing saved, no checkpointing stash: callers run them with gradients off
(:mod:`sloth_core.inference`). A 4-bit base on a few rows (decoding: ``M <= nf4_gemv.MAX_ROWS`` tokens) goes through
the fused dequantize-GEMV (:func:`nf4_gemv.nf4_gemv_weight`: the weight is never dequantized into memory); more rows
(prefill) and 16-bit bases take the training path's forward GEMMs (:func:`lora._project`: a 4-bit weight
dequantized once into a temporary, then one GEMM). The LoRA term ``s (x A^T) B^T`` is added in torch::

    y = x W^T (+ b);   y += s * (x A^T) B^T          (decoding, 4-bit base)
    y = s * (x A^T) B^T (+ b);   y += x W^T          (otherwise: lora._base_plus_lora)

Dtypes and fallbacks as :func:`lora.lora_linear` / :func:`lora.lora_mlp`: inputs the fused path cannot take run
the references (PEFT's computation).
"""
from __future__ import annotations

from typing import Callable

import torch

from sloth_core.kernels import gated_activation as _ga
from sloth_core.kernels.lora_base import LoRASpec, _fused_dtypes, _is_4bit, _quant_state
from sloth_core.kernels.lora_gemm import _input_xa, _no_autocast, _project
from sloth_core.kernels.lora_linear import lora_linear, lora_linear_reference
from sloth_core.kernels.lora_mlp import _mlp_dtypes, lora_mlp, lora_mlp_reference
from sloth_core.kernels.nf4_gemv import MAX_ROWS, nf4_gemv_weight

Cast = Callable[[torch.Tensor, torch.dtype], torch.Tensor]


def decodes(x2: torch.Tensor, spec: LoRASpec) -> bool:
    """Whether ``x2`` [M, in] (compute dtype) on this layer takes the fused dequantize-GEMV."""
    return x2.shape[0] <= MAX_ROWS and _is_4bit(spec.base_layer)


def _linear2d(x2: torch.Tensor, spec: LoRASpec, cast: Cast | None = None) -> torch.Tensor:
    layer, A, B, scale = spec[:4]
    if not decodes(x2, spec):
        return _project(x2, spec)[0]
    A, B = (t.to(x2.dtype) if cast is None else cast(t, x2.dtype) for t in (A, B))
    y = nf4_gemv_weight(x2, layer.weight, _quant_state(layer), bias=getattr(layer, "bias", None))
    return y.addmm_(_input_xa(x2, A), B.t(), alpha=scale)


def lora_linear_infer(x: torch.Tensor, base_layer, A: torch.Tensor, B: torch.Tensor, scale: float,
                      dropout: float = 0.0, cast: Cast | None = None) -> torch.Tensor:
    """``base_layer(x) + scale * (x A^T) B^T`` without autograd (see the module docstring). ``cast(t, dtype)``:
    ``t.to(dtype)`` for the adapters, e.g. from a cache (PEFT keeps them in float32 under a bf16 base: two casts a
    decoding step and layer otherwise). ``dropout`` > 0 (a layer in training mode): :func:`lora_linear` draws it."""
    spec = LoRASpec(base_layer, A, B, float(scale), float(dropout))
    if spec.dropout:
        return lora_linear(x, *spec)
    dtypes = _fused_dtypes(x, spec)
    if dtypes is None or x.numel() == 0:
        return lora_linear_reference(x, *spec)
    compute, out = dtypes
    x2 = x.reshape(-1, x.shape[-1]).to(compute)
    with _no_autocast(x.device.type):
        y = _linear2d(x2, spec, cast)
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(out)


def lora_mlp_infer(x: torch.Tensor, gate: LoRASpec, up: LoRASpec, down: LoRASpec, activation: str,
                   cast: Cast | None = None) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` with LoRA projections, without autograd: the three projections as
    :func:`lora_linear_infer`, the gated activation kernel between them."""
    if gate.dropout or up.dropout or down.dropout:  # layers in training mode: the training path draws the masks
        return lora_mlp(x, gate, up, down, activation)
    dtypes = _mlp_dtypes(x, gate, up, down)
    if dtypes is None or x.numel() == 0:
        return lora_mlp_reference(x, gate, up, down, activation)
    compute, out = dtypes
    x2 = x.reshape(-1, x.shape[-1]).to(compute)
    with _no_autocast(x.device.type):
        m = _ga.gated_activation(_linear2d(x2, gate, cast), _linear2d(x2, up, cast), activation)
        h = _linear2d(m, down, cast)
    return h.reshape(*x.shape[:-1], h.shape[-1]).to(out)
