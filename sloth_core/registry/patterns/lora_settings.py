"""What the LoRA patterns (:mod:`sloth_core.registry.patterns.lora`) check and probe: which modules are PEFT LoRA
layers, the setting a layer's verification saw and how it changed since, the guarded mode setting, the probe's
trainable parameters and stand-ins, and the notice given when ``torch.compile`` traces PEFT's forwards instead."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ...warning import SlothCoreWarning
from ._probe import randn


def is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "get_base_layer")


def trainable(*specs) -> tuple:
    return tuple(t for s in specs for t in (s.A, s.B) if t.requires_grad)


def stand_ins(specs, gen) -> tuple:
    """Random values for the adapter matrices that are all zero (``B`` as PEFT initializes it), so the probe's
    gradient of ``A`` (zero on every side otherwise) is compared too, by the relative-norm bound (a wrong ``dA``
    fails it at any size). Their size, 0.02, is that of a trained ``B``. With ``B`` of ``A``'s size, ``dA`` grows
    past the elementwise bound's absolute part, and in bf16 under Triton's interpreter (whose casts truncate) a few
    of its elements, sums of many products, then differ from PEFT's by more than that bound although both are as
    far from a float64 reference (measured on a tiny NF4 MLP: relative error 7.2e-3 vs PEFT's 5.3e-3)."""
    return tuple((t, randn(t.shape, t.dtype, t.device, gen, scale=0.02))
                 for s in specs for t in (s.A, s.B) if not t.detach().any())


SETTING_NAMES = ("lora_A dtype", "lora_B dtype", "adapter device", "base weight dtype", "base weight device",
            "4-bit compute dtype", "scale")


def setting(spec) -> tuple:
    """What verification saw of one LoRA layer that a trainer or the user can change after ``optimize`` (TRL casts
    the adapters of a 4-bit model to bf16, ``.to()`` moves them): attribute reads, checked at every call."""
    w = spec.base_layer.weight
    return (spec.A.dtype, spec.B.dtype, spec.A.device, w.dtype, w.device,
            getattr(spec.base_layer, "compute_dtype", None), spec.scale)


def mode_setting(module: nn.Module, args=None) -> tuple:
    """The pattern ``setting`` (:mod:`sloth_core.guard`) of the LoRA patterns: whether the bound module is in
    training mode. That decides the dropout the layers apply (their ``lora_dropout`` in training mode, 0 in eval
    mode) and how an LLM.int8 base multiplies (bitsandbytes' forward on a CPU uses the dequantized weight in
    training mode, int8-quantized inputs in eval mode); the rest of a layer's setting is checked by its forward
    (:func:`setting_change`). One attribute read a call: a model optimized in eval mode (as ``from_pretrained`` returns
    it) verifies its training-mode path -- the dropout masks, with the same RNG state on both sides -- on its first
    training call. (A mode set on the dropout modules alone, not through ``.train()`` / ``.eval()`` of the module
    or one above it, is not seen.) ``None`` while ``torch.compile`` traces: the patterns step aside for PEFT's
    forwards then (:mod:`sloth_core.registry.patterns.lora`), with nothing to verify."""
    return None if torch.compiler.is_compiling() else (module.training,)


def setting_change(specs, verified: tuple) -> str | None:
    """How the layers' settings differ from the ``verified`` ones (``None``: they do not)."""
    for spec, seen in zip(specs, verified):
        now = setting(spec)
        if now == seen:  # the per-call path: one tuple comparison
            continue
        name, a, b = next((n, a, b) for n, a, b in zip(SETTING_NAMES, seen, now) if a != b)
        return f"its LoRA setting changed since it was verified ({name} {a} -> {b})"
    return None


def say_traced_lora_is_peft() -> None:
    """Warn, at trace time (a warning in traced code would break the graph), that the compiled graph computes the
    LoRA layers with PEFT's formula: the fused LoRA functions and what they save are eager-only."""
    from torch._dynamo.comptime import comptime  # loaded while tracing anyway

    comptime(lambda _ctx: warnings.warn(
        "sloth_core: under torch.compile the LoRA patterns (lora_linear, lora_mlp, lora_qkv) step aside: the graph "
        "computes PEFT's forwards, compiled by the backend; the fused LoRA functions (and their memory savings) run "
        "in eager mode only", SlothCoreWarning, stacklevel=2))
