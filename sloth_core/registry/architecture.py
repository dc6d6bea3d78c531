"""Architectures: which patterns apply to which ``config.model_type``, with which parameters.

An architecture file in ``sloth_core/architectures/`` is one call to :func:`register`. Model types with no
declaration get :data:`GENERIC`, whose patterns resolve their parameters from the module itself and are verified on
every module instance before anything is swapped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .pattern import PatternUse


@dataclass(frozen=True)
class HeadFacts:
    """Facts about the causal-LM head the fused loss needs (config attribute names; ``None`` = not used)."""

    softcap_attr: str | None = None
    logit_scale_attr: str | None = None


@dataclass(frozen=True)
class LayerFacts:
    """Facts about the decoder layer that checkpointing uses.

    ``mlp_output_into_residual``: the layer ends with ``hidden = residual + mlp(norm(hidden))``, so nothing the
    layer saves for its backward depends on the MLP's output -- unless the layer has a norm on that output, named
    by ``post_mlp_norm_attr`` (Gemma2/3's ``post_feedforward_layernorm`` saves its input). Then the recompute of a
    checkpointed layer may skip computing the MLP output (:mod:`sloth_core.recompute`).

    ``attention_output_into_residual``: see :meth:`attention_output_unused`."""

    mlp_output_into_residual: bool = False
    post_mlp_norm_attr: str | None = None
    attention_output_into_residual: bool = False

    def attention_output_unused(self, layer: Any) -> bool:
        """Whether the recompute of this decoder layer instance may skip its attention output projection once the
        norm before the MLP keeps its input in host memory: declared by ``attention_output_into_residual`` (the
        layer starts with ``hidden = residual + self_attn(norm(hidden))``, the output projection is the attention
        module's last computation and the norm before the MLP reads that sum -- nothing in between saves a tensor
        for the backward), in layers whose MLP output is unused too (:mod:`sloth_core.checkpointing`)."""
        return self.attention_output_into_residual and self.mlp_output_unused(layer)

    def mlp_output_unused(self, layer: Any) -> bool:
        """Whether the recompute of this decoder layer instance may skip its MLP's output."""
        if not self.mlp_output_into_residual:
            return False
        return not (self.post_mlp_norm_attr and getattr(layer, self.post_mlp_norm_attr, None) is not None)


@dataclass(frozen=True)
class Architecture:
    """``expects``: what every model of this architecture should end up with, as groups of pattern names (a group
    is met when a pattern of it replaced something, and no module it matched was skipped); ``optimize`` warns,
    naming the pattern, for each group that is not met (:mod:`sloth_core.coverage`)."""

    name: str
    model_types: tuple[str, ...]
    patterns: tuple[PatternUse, ...]
    head: HeadFacts = field(default_factory=HeadFacts)
    layer: LayerFacts = field(default_factory=LayerFacts)
    declared: bool = True
    notes: str = ""
    expects: tuple[tuple[str, ...], ...] = ()

    def pattern_names(self) -> list[str]:
        return [p.name for p in self.patterns]


# What ``declare`` promises for every model of the usual layout: its norms, its (LoRA) gated MLP, its RoPE and its
# causal-LM loss replaced. LoRA projections outside the MLP depend on the user's adapter and are not expected.
# The loss: ours on the model's own forward, or TRL's fused LM head served by ours where TRL replaced the forward.
DECLARED_EXPECTS = (("rms_norm",), ("gated_mlp", "lora_mlp"), ("rope",), ("causal_lm_loss", "trl_fused_lm_head"))

_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Declare ``arch`` for each of its model types. Re-registering a model type under another name is an error."""
    for mt in arch.model_types:
        prev = _REGISTRY.get(mt)
        if prev is not None and prev.name != arch.name:
            raise ValueError(f"model_type {mt!r} is already declared by architecture {prev.name!r}")
        _REGISTRY[mt] = arch
    return arch


def lookup(model_type: str | None) -> Architecture | None:
    """The declared architecture of ``model_type`` (among those registered: :mod:`sloth_core.api` imports
    :mod:`sloth_core.architectures`, which declares the built-in ones), or ``None``."""
    return _REGISTRY.get(model_type or "")


def declared_model_types() -> list[str]:
    return sorted(_REGISTRY)


def generic_architecture(**_: Any) -> Architecture:
    from .patterns import GENERIC_PATTERNS

    return Architecture(name="generic", model_types=(), patterns=GENERIC_PATTERNS, declared=False)


def declare(name: str, model_types: tuple[str, ...], norm: str, activation: str, layer: LayerFacts,
            head: HeadFacts | None = None, notes: str = "") -> Architecture:
    """Register the usual decoder-only layout: RMSNorm (``norm``: ``"llama"`` or ``"gemma"`` casting, the latter with
    the ``(1 + w)`` offset), a gated MLP with ``activation`` (``"silu"`` / ``"gelu_tanh"``), the decoder layer's
    dataflow as ``layer`` states it (:class:`LayerFacts`: where the attention and MLP outputs go -- each architecture
    says it, nothing is defaulted), RoPE through ``apply_rotary_pos_emb``, PEFT LoRA layers (and LoRA gated MLPs, and
    the q/k/v LoRA projections of an attention call together) as fused functions, and the causal-LM head's fused loss
    with the ``head`` facts (or, where TRL gave the model its fused LM head, that head's chunked log-probs).
    Architectures that differ list their :class:`PatternUse` s in an :class:`Architecture` and call :func:`register`
    themselves."""
    from .patterns import (CAUSAL_LM_LOSS, GATED_MLP, LORA_LINEAR, LORA_MLP, LORA_QKV, RMS_NORM, ROPE,
                           TRL_FUSED_LM_HEAD)

    offset = {"llama": 0.0, "gemma": 1.0}[norm]
    head = head or HeadFacts()
    return register(Architecture(
        name=name,
        model_types=tuple(model_types),
        patterns=(RMS_NORM.using(cast=norm, offset=offset), LORA_MLP.using(activation=activation),
                  GATED_MLP.using(activation=activation), LORA_LINEAR.using(), ROPE.using(), LORA_QKV.using(),
                  CAUSAL_LM_LOSS.using(softcap_attr=head.softcap_attr, logit_scale_attr=head.logit_scale_attr),
                  TRL_FUSED_LM_HEAD.using()),
        head=head,
        layer=layer,
        notes=notes,
        expects=DECLARED_EXPECTS,
    ))
