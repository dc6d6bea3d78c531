"""Patterns ``lora_linear``, ``lora_mlp`` and ``lora_qkv``: PEFT LoRA layers as single fused autograd functions.

* ``lora_linear``: a PEFT ``lora.Linear`` / ``lora.Linear4bit`` / ``lora.Linear8bitLt`` computes
  ``base(x) + s * (x A^T) B^T`` (with ``lora_dropout``'s mask on the LoRA branch in training mode) in one function:
  one dequantization of a quantized base per use, only ``x`` and ``x A^T`` saved (the dropped input and the mask
  with dropout), hand-derived gradients for ``x``, ``A``, ``B`` (:mod:`sloth_core.kernels.lora_linear`).
* ``lora_mlp``: a gated MLP whose three projections are all such LoRA layers runs as one function with the fused
  activation kernel; the backward recomputes ``act(g) * u``. It supersedes ``gated_mlp`` on the module.
* ``lora_qkv``: an attention module whose ``q_proj``, ``k_proj``, ``v_proj`` are such LoRA layers on the same
  input: its forward runs as it is, but inside it the first of the three projections to be called computes all
  three in one function (:func:`lora_qkv`: the input read once for the three ``x A^T`` and the three ``dA``) and
  the other two return their share when called with the same, unmodified input tensor; anything else (another
  input, an in-place change of it, a projection called alone) computes as ``lora_linear``. The group lives for
  one call of the attention forward, so nothing is kept between calls. Measured on one H200 (Llama-3-8B shape,
  batch 4 x 2048, ``sloth-core bench train``, 2026-11-29, two runs minutes apart, HF + PEFT 6,459 / 6,450 and
  6,538 / 6,543 tokens/s): LoRA 12,437 tokens/s with it vs 12,229 without, QLoRA 12,171 vs 12,027
  (``benchmarks/results/train_llama-3-8b_20261129_s4_qkv`` / ``_s4_default``), so it is in the default list.
  ``optimize(model, exclude="lora_qkv")`` leaves the three projections to ``lora_linear``.

Supported: bases ``nn.Linear``, bitsandbytes NF4/FP4 ``Linear4bit`` and LLM.int8 ``Linear8bitLt`` (dequantized
on use: :mod:`sloth_core.kernels.dequant_int8`), ``lora_dropout`` an ``nn.Dropout`` (any ``p``: the masks drawn as
PEFT draws them, :func:`sloth_core.kernels.lora_linear.dropout_mask`; with dropout active, ``lora_qkv`` and
``lora_mlp`` run their projections as separate ``lora_linear`` functions, one mask each), no LoRA bias, no DoRA,
one active adapter (rsLoRA is just its scaling), adapters neither merged nor disabled. Anything else keeps PEFT's
path and the report says why. Each pattern's dropout in effect (training or eval mode) is its ``setting``: one
verification did not see is verified on first use (:mod:`sloth_core.guard`). The replacement forwards
re-read the adapter state at every call (:func:`lora_spec` is attribute reads), so switching adapters, merging or
disabling them later falls back to the module's own forward instead of computing something else; so does a
setting verification never saw (:func:`lora_settings.setting`: a trainer's cast of the adapters, ``.to()``), which
:mod:`sloth_core.fallback` reports until ``optimize`` verifies it.

Under ``torch.compile`` the three patterns step aside: Dynamo traces PEFT's own forwards (plain torch ops, which
inductor compiles), not the fused functions, whose base layer rides along as a constant, whose buffers are
written in place and whose checkpointing bookkeeping (:mod:`sloth_core.recompute`) lives outside the graph.
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn

from ... import binding
from ...distributed import sharded_4bit_reason
from ...fallback import fall_back, fallback_reason, resume
from ...inference_mode import decoding_mode
from ...kernels.lora_infer import lora_linear_infer, lora_mlp_infer
from ...kernels.lora_linear import lora_linear, lora_linear_reference
from ...kernels.lora_mlp import lora_mlp, lora_mlp_reference
from ...kernels.lora_peft import lora_spec
from ...kernels.lora_qkv import lora_qkv
from ...kernels.nf4_gemv import MAX_ROWS
from ..pattern import Match, Pattern, Probe, Skip
from . import gated_mlp
from ._probe import module_dtype_device, randn
from .lora_settings import (is_lora_layer, mode_setting, say_traced_lora_is_peft, setting, setting_change,
                            stand_ins, trainable)


# --- lora_linear ------------------------------------------------------------------------------------------------
def find_linear(module: nn.Module, params) -> Match | Skip | None:
    if not is_lora_layer(module):
        return None
    spec = lora_spec(module)
    if isinstance(spec, str):
        return Skip(spec)
    base = spec.base_layer
    dtype, device = module_dtype_device(base)
    sig = (type(module), type(base), dtype, device, base.in_features, base.out_features, tuple(spec.A.shape),
           spec.A.dtype, spec.scale)
    return Match({"r": spec.A.shape[0], "scale": spec.scale, "in": base.in_features,
                  "_settings": (setting(spec),)}, sig + setting(spec))


def _inference_key(x, specs) -> tuple:
    """What an inference-path verification covers (:mod:`sloth_core.inference_mode`): the layers' settings and
    shapes, the input dtype, and the number of rows when decoding (a few: the fused 4-bit GEMV, one kernel variant
    a count) or ``"prefill"``."""
    rows = x.numel() // max(1, x.shape[-1])
    return (x.dtype, x.device, rows if rows <= MAX_ROWS else "prefill") + tuple(
        (type(s.base_layer), s.base_layer.in_features, s.base_layer.out_features, tuple(s.A.shape)) + setting(s)
        for s in specs)


def _linear_with(fn, grouped: bool = False):
    """The forward of a LoRA linear through ``fn``; ``grouped`` (the replacement): inside a ``lora_qkv`` attention
    call the q/k/v group answers first, and in inference mode (``for_inference``) :func:`lora_linear_infer` runs."""
    def make(m: Match):
        def forward(self, x, *args, **kwargs):
            if torch.compiler.is_compiling():  # traced: PEFT's forward (see the module docstring)
                say_traced_lora_is_peft()
                return type(self).forward(self, x, *args, **kwargs)
            mode = decoding_mode(self) if grouped else None
            group = getattr(_QKV_GROUP, "active", None) if grouped and mode is None else None
            if group is not None and not (args or kwargs):
                out = group.pending_output(self, x)  # computed with q/k/v's specs read moments ago, this call
                if out is not None:
                    resume(self, "lora_linear")
                    return out
            spec = lora_spec(self)
            if isinstance(spec, str) or args or kwargs:
                why = sharded_4bit_reason(self.get_base_layer())
                if why is not None:  # PEFT's forward would fail deep inside bitsandbytes
                    raise NotImplementedError(f"sloth_core: {why}")
                if grouped:
                    fall_back(self, "lora_linear", spec if isinstance(spec, str) else
                              f"called with arguments besides x (keywords {sorted(kwargs)})", lasting=False)
                return type(self).forward(self, x, *args, **kwargs)
            changed = setting_change((spec,), m["_settings"])
            if changed is not None:
                fall_back(self, "lora_linear", changed)
                return type(self).forward(self, x)
            if grouped:
                resume(self, "lora_linear")
            if mode is not None:
                return mode.run(self, "lora_linear", ("lora_linear",) + _inference_key(x, (spec,)),
                                lambda: lora_linear_infer(x, *spec, cast=mode.cast),
                                lambda: fn(x, *spec))
            out = group.project(self, x, spec) if group is not None else None
            return fn(x, *spec) if out is None else out

        return forward

    return make


def _probe_linear(module: nn.Module, m: Match, gen) -> Probe:
    spec = lora_spec(module)
    dtype, device = module_dtype_device(spec.base_layer)
    x = randn((2, 3, m["in"]), dtype, device, gen)
    return Probe(inputs=(x.requires_grad_(),), params=trainable(spec), dtype=dtype,
                 stand_ins=stand_ins((spec,), gen))


LORA_LINEAR = Pattern(
    name="lora_linear",
    kernel="cublas:lora_linear",  # torch GEMMs (cuBLAS); 4-bit bases dequantized by a Triton kernel
    find=find_linear,
    reference=_linear_with(lora_linear_reference),
    replacement=_linear_with(lora_linear, grouped=True),
    original=lambda module, m: module.forward,
    probe=_probe_linear,
    defaults={},
    setting=mode_setting,
)


# --- lora_mlp ---------------------------------------------------------------------------------------------------
_MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _mlp_specs(module: nn.Module):
    specs = [lora_spec(getattr(module, name)) for name in _MLP_PROJECTIONS]
    bad = [s for s in specs if isinstance(s, str)]
    return bad[0] if bad else specs


def find_mlp(module: nn.Module, params) -> Match | Skip | None:
    found = gated_mlp.find(module, params)
    if not isinstance(found, Match):
        return found
    if not all(is_lora_layer(getattr(module, n)) for n in _MLP_PROJECTIONS):
        return None  # plain projections: gated_mlp's business
    specs = _mlp_specs(module)
    if isinstance(specs, str):
        return Skip(specs)
    settings = tuple(setting(s) for s in specs)
    sig = found.signature + tuple((tuple(s.A.shape), s.A.dtype, s.scale) for s in specs) + settings
    return Match({**found.params, "r": specs[0].A.shape[0], "_settings": settings}, sig)


def _mlp_with(fn, infer: bool = False):
    """The forward of a LoRA MLP through ``fn``; ``infer`` (the replacement): in inference mode
    (``for_inference``) :func:`lora_mlp_infer` runs."""
    def make(m: Match):
        activation = m["activation"]

        def forward(self, x):
            if torch.compiler.is_compiling():  # traced: the MLP's own forward through PEFT's layers
                say_traced_lora_is_peft()
                return binding.previous_forward(self, "lora_mlp")(x)
            specs = _mlp_specs(self)
            if isinstance(specs, str):
                if infer:
                    fall_back(self, "lora_mlp", specs, lasting=False)
                return binding.previous_forward(self, "lora_mlp")(x)
            changed = setting_change(specs, m["_settings"])
            if changed is not None:
                fall_back(self, "lora_mlp", changed)
                return binding.previous_forward(self, "lora_mlp")(x)
            if infer and fallback_reason(self, "lora_mlp") is not None:  # a passing state is over: the notes
                resume(self, "lora_mlp")  # its projections' forwards made while it lasted go too
                for name in _MLP_PROJECTIONS:
                    resume(getattr(self, name), "lora_linear")
            mode = decoding_mode(self) if infer else None
            if mode is not None:
                return mode.run(self, "lora_mlp", ("lora_mlp",) + _inference_key(x, specs) + (activation,),
                                lambda: lora_mlp_infer(x, *specs, activation, mode.cast),
                                lambda: fn(x, *specs, activation))
            return fn(x, *specs, activation)

        return forward

    return make


def _probe_mlp(module: nn.Module, m: Match, gen) -> Probe:
    probe = gated_mlp.probe(module, m, gen)
    specs = _mlp_specs(module)
    return Probe(inputs=probe.inputs, params=trainable(*specs), dtype=probe.dtype, stand_ins=stand_ins(specs, gen))


LORA_MLP = Pattern(
    name="lora_mlp",
    kernel="cublas+triton:lora_mlp",  # torch GEMMs (cuBLAS), the Triton gated activation
    find=find_mlp,
    reference=_mlp_with(lora_mlp_reference),
    replacement=_mlp_with(lora_mlp, infer=True),
    original=lambda module, m: module.forward,
    probe=_probe_mlp,
    defaults={"activation": "auto"},
    supersedes=("gated_mlp",),
    serves_foreign=True,
    setting=mode_setting,
)


# --- lora_qkv ---------------------------------------------------------------------------------------------------
_QKV = ("q_proj", "k_proj", "v_proj")
_QKV_GROUP = threading.local()  # the group of the attention call running on this thread (the recompute: autograd's)


class _QKVGroup:
    """The q, k, v projections of one attention call (see the module docstring)."""

    def __init__(self, attention: nn.Module):
        self.modules = tuple(getattr(attention, name) for name in _QKV)
        self.pending: dict[int, object] = {}
        self.x = self.version = None

    def _index(self, module: nn.Module) -> int | None:
        return next((i for i, m in enumerate(self.modules) if m is module), None)

    def pending_output(self, module: nn.Module, x):
        """The output an earlier :meth:`project` of this attention call computed for ``module`` on this same,
        unmodified ``x`` (handed out once), else ``None``."""
        if self.x is not x or self.version != x._version:
            return None
        return self.pending.pop(self._index(module), None)

    def project(self, module: nn.Module, x, spec):
        """``module(x)`` (``spec``: its :func:`lora_spec`) from the group, computing the other two projections'
        outputs with it, or ``None`` when the group cannot answer (the caller computes it)."""
        index = self._index(module)
        if index is None:
            return None
        specs = [spec if m is module else lora_spec(m) for m in self.modules]
        if any(isinstance(spec, str) for spec in specs) or len({spec.A.shape[1] for spec in specs}) != 1:
            return None
        outs = lora_qkv(x, *specs)
        self.x, self.version = x, x._version
        self.pending = {i: out for i, out in enumerate(outs) if i != index}
        return outs[index]


@contextlib.contextmanager
def _grouping(attention: nn.Module):
    previous = getattr(_QKV_GROUP, "active", None)
    _QKV_GROUP.active = _QKVGroup(attention)
    try:
        yield
    finally:
        _QKV_GROUP.active = previous


def find_qkv(module: nn.Module, params) -> Match | Skip | None:
    projections = [getattr(module, name, None) for name in _QKV]
    if not all(isinstance(p, nn.Module) and is_lora_layer(p) for p in projections):
        return None
    if not isinstance(getattr(module, "head_dim", None), int):
        return None  # not an attention module this pattern can probe
    specs = [lora_spec(p) for p in projections]
    bad = [f"{name}: {spec}" for name, spec in zip(_QKV, specs) if isinstance(spec, str)]
    if bad:
        return Skip(bad[0])
    unbound = [name for name, p in zip(_QKV, projections) if not binding.is_bound(p, "lora_linear")]
    if unbound:  # the group answers through the projections' lora_linear forwards: without them it never runs
        return Skip(f"{', '.join(unbound)} not bound by lora_linear (see its rows): the fused q/k/v group would "
                    f"never run")
    hidden = {spec.base_layer.in_features for spec in specs}
    if len(hidden) != 1:
        return Skip(f"q/k/v take inputs of different widths {sorted(hidden)}")
    dtype, device = module_dtype_device(specs[0].base_layer)
    settings = tuple(setting(s) for s in specs)
    sig = (type(module), dtype, device, module.head_dim) + tuple(
        (type(s.base_layer), s.base_layer.out_features, tuple(s.A.shape), s.A.dtype, s.scale) for s in specs) + settings
    return Match({"hidden": hidden.pop(), "head_dim": module.head_dim,
                  "r": tuple(s.A.shape[0] for s in specs), "_settings": settings}, sig)


def _attention_with(grouped: bool):
    """The attention's own forward -- the one bound before this pattern (``rope`` rebinds it), not the class's --
    run inside a q/k/v group when ``grouped``."""
    def make(m: Match):
        def forward(self, *args, **kwargs):
            inner = binding.previous_forward(self, "lora_qkv")
            if not grouped or torch.compiler.is_compiling() or not _qkv_as_verified(self, m["_settings"]):
                return inner(*args, **kwargs)  # each projection answers for itself (traced: PEFT's formula)
            with _grouping(self):
                return inner(*args, **kwargs)

        return forward

    return make


def _qkv_as_verified(attention: nn.Module, settings: tuple) -> bool:
    """Whether q, k, v are still as the group's verification saw them (else it falls back, saying so)."""
    specs = [lora_spec(getattr(attention, name)) for name in _QKV]
    why = next((f"{name}: {spec}" for name, spec in zip(_QKV, specs) if isinstance(spec, str)), None)
    if why is not None:  # the projections fall back too, each with its reason
        fall_back(attention, "lora_qkv", why, lasting=False)
        return True
    changed = setting_change(specs, settings)
    if changed is not None:
        fall_back(attention, "lora_qkv", changed)
    else:
        resume(attention, "lora_qkv")
    return changed is None


def _probe_qkv(module: nn.Module, m: Match, gen) -> Probe:
    dtype, device = module_dtype_device(module)
    hidden = randn((2, 3, m["hidden"]), dtype, device, gen).requires_grad_()
    cos, sin = (randn((2, 3, m["head_dim"]), dtype, device, gen) for _ in range(2))
    specs = [lora_spec(getattr(module, name)) for name in _QKV]
    return Probe(inputs=(hidden, cos, sin), params=trainable(*specs), dtype=dtype, stand_ins=stand_ins(specs, gen))


def _attention_output(fn):
    """An attention forward as a function of ``(hidden, cos, sin)`` returning the attention output (no mask)."""
    return lambda hidden, cos, sin: fn(hidden, (cos, sin), None)[0]


LORA_QKV = Pattern(
    name="lora_qkv",
    kernel="cublas:lora_qkv",  # torch GEMMs (cuBLAS)
    find=find_qkv,
    reference=_attention_with(grouped=False),
    replacement=_attention_with(grouped=True),
    original=lambda module, m: module.forward,
    probe=_probe_qkv,
    defaults={},
    adapt=_attention_output,
    setting=mode_setting,
)
