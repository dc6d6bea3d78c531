"""Patterns ``lora_linear`` and ``lora_mlp``: PEFT LoRA layers as single fused autograd functions.

* ``lora_linear``: a PEFT ``lora.Linear`` / ``lora.Linear4bit`` (base ``nn.Linear`` or bitsandbytes NF4/FP4
  ``Linear4bit``) computes ``base(x) + s * (x A^T) B^T`` in one function: one dequantization of a 4-bit base per use,
  only ``x`` and ``x A^T`` saved, hand-derived gradients for ``x``, ``A``, ``B`` (:mod:`sloth_core.kernels.lora`).
* ``lora_mlp``: a gated MLP whose three projections are all such LoRA layers runs as one function with the fused
  activation kernel; the backward recomputes ``act(g) * u``. It supersedes ``gated_mlp`` on the module.

Supported: ``lora_dropout=0``, no LoRA bias, no DoRA, one active adapter (rsLoRA is just its scaling), adapters
neither merged nor disabled. Anything else keeps PEFT's path and the report says why. The replacement forwards
re-read the adapter state at every call (:func:`lora_spec` is attribute reads), so switching adapters, merging or
disabling them later falls back to the module's own forward instead of computing something else.
"""
from __future__ import annotations

from torch import nn

from ...kernels.lora import lora_linear, lora_linear_reference, lora_mlp, lora_mlp_reference, lora_spec
from ..pattern import Match, Pattern, Probe, Skip
from . import gated_mlp
from ._probe import module_dtype_device, randn


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "get_base_layer")


def _trainable(*specs) -> tuple:
    return tuple(t for s in specs for t in (s.A, s.B) if t.requires_grad)


# --- lora_linear ------------------------------------------------------------------------------------------------
def find_linear(module: nn.Module, params) -> Match | Skip | None:
    if not _is_lora_layer(module):
        return None
    spec = lora_spec(module)
    if isinstance(spec, str):
        return Skip(spec)
    base = spec.base_layer
    dtype, device = module_dtype_device(base)
    sig = (type(module), type(base), dtype, device, base.in_features, base.out_features, tuple(spec.A.shape),
           spec.A.dtype, spec.scale)
    return Match({"r": spec.A.shape[0], "scale": spec.scale, "in": base.in_features}, sig)


def _linear_with(fn):
    def make(m: Match):
        def forward(self, x, *args, **kwargs):
            spec = lora_spec(self)
            if isinstance(spec, str) or args or kwargs:
                return type(self).forward(self, x, *args, **kwargs)
            return fn(x, *spec)

        return forward

    return make


def _probe_linear(module: nn.Module, m: Match, gen) -> Probe:
    spec = lora_spec(module)
    dtype, device = module_dtype_device(spec.base_layer)
    x = randn((2, 3, m["in"]), dtype, device, gen)
    return Probe(inputs=(x.requires_grad_(),), params=_trainable(spec), dtype=dtype)


LORA_LINEAR = Pattern(
    name="lora_linear",
    kernel="triton:lora_linear",
    find=find_linear,
    reference=_linear_with(lora_linear_reference),
    replacement=_linear_with(lora_linear),
    original=lambda module, m: module.forward,
    probe=_probe_linear,
    defaults={},
)


# --- lora_mlp ---------------------------------------------------------------------------------------------------
def _mlp_specs(module: nn.Module):
    specs = [lora_spec(getattr(module, name)) for name in ("gate_proj", "up_proj", "down_proj")]
    bad = [s for s in specs if isinstance(s, str)]
    return bad[0] if bad else specs


def find_mlp(module: nn.Module, params) -> Match | Skip | None:
    found = gated_mlp.find(module, params)
    if not isinstance(found, Match):
        return found
    if not all(_is_lora_layer(getattr(module, n)) for n in ("gate_proj", "up_proj", "down_proj")):
        return None  # plain projections: gated_mlp's business
    specs = _mlp_specs(module)
    if isinstance(specs, str):
        return Skip(specs)
    sig = found.signature + tuple((tuple(s.A.shape), s.A.dtype, s.scale) for s in specs)
    return Match({**found.params, "r": specs[0].A.shape[0]}, sig)


def _mlp_with(fn):
    def make(m: Match):
        activation = m["activation"]

        def forward(self, x):
            specs = _mlp_specs(self)
            if isinstance(specs, str):
                return type(self).forward(self, x)
            return fn(x, *specs, activation)

        return forward

    return make


def _probe_mlp(module: nn.Module, m: Match, gen) -> Probe:
    probe = gated_mlp.probe(module, m, gen)
    return Probe(inputs=probe.inputs, params=_trainable(*_mlp_specs(module)), dtype=probe.dtype)


LORA_MLP = Pattern(
    name="lora_mlp",
    kernel="triton:lora_mlp",
    find=find_mlp,
    reference=_mlp_with(lora_mlp_reference),
    replacement=_mlp_with(lora_mlp),
    original=lambda module, m: module.forward,
    probe=_probe_mlp,
    defaults={"activation": "auto"},
    supersedes=("gated_mlp",),
)
