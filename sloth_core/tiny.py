"""Tiny random-weight models of the declared architectures, built from config objects (no downloads).

Used by the test suite, the demo (``python -m sloth_core demo``) and the CPU-side benchmarks. Each preset keeps the
features that matter to the patterns: GQA, an explicit ``head_dim``, Gemma2/3 soft-capping and sliding windows,
Qwen3/Gemma3 per-head norms.
"""
from __future__ import annotations

import torch

_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False)


def _configs():
    from transformers import (Gemma2Config, Gemma3TextConfig, GemmaConfig, LlamaConfig, MistralConfig,
                              Qwen3Config)

    gemma_extra = dict(query_pre_attn_scalar=16, sliding_window=4, final_logit_softcapping=30.0,
                       attn_logit_softcapping=50.0)
    def gemma3(**kw):
        n = kw.get("num_hidden_layers", _COMMON["num_hidden_layers"])
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
        return Gemma3TextConfig(**{**gemma_extra, "layer_types": layer_types, **kw})

    return {
        "llama": lambda **kw: LlamaConfig(**{"rms_norm_eps": 1e-5, **kw}),
        "mistral": lambda **kw: MistralConfig(**{"sliding_window": None, **kw}),
        "qwen3": lambda **kw: Qwen3Config(**kw),
        "gemma": lambda **kw: GemmaConfig(**kw),
        "gemma2": lambda **kw: Gemma2Config(**{**gemma_extra, **kw}),
        "gemma3_text": gemma3,
    }


TINY_MODEL_TYPES = ("llama", "mistral", "qwen3", "gemma", "gemma2", "gemma3_text")


def tiny_config(model_type: str, **overrides):
    try:
        make = _configs()[model_type]
    except KeyError:
        raise ValueError(f"no tiny preset for model_type {model_type!r}; have {sorted(TINY_MODEL_TYPES)}") from None
    cfg = make(**{**_COMMON, **overrides})  # overrides go to the constructor: derived fields (layer_types) follow
    cfg._attn_implementation = "eager"
    return cfg


def tiny_model(model_type: str, dtype: torch.dtype = torch.float32, seed: int = 0, device="cpu", **overrides):
    """A causal LM of ``model_type`` with random weights (norm weights randomized too, so ``w`` vs ``1 + w``
    matters)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(torch.randn_like(p, dtype=torch.float32).mul_(0.3).to(p.dtype))
    return model.to(device)
