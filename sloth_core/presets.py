"""The models sloth_core is measured and tuned on, by name: their transformers config kwargs (the released
checkpoints' ``config.json``, minus token ids and dtype) -- the one home of these shapes. ``bench train`` builds
random-weight models from them, ``bench kernels`` and ``tune`` take their shapes
(:func:`sloth_core.autotune.presets.shape_from_config`); ``tiny-llama`` is the benchmark's own CPU-sized model.
"""
from __future__ import annotations

from typing import Any

MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                       rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu", max_position_embeddings=8192,
                       attention_bias=False, mlp_bias=False, tie_word_embeddings=False),
    "gemma-2-9b": dict(model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000,
                       rope_theta=10000.0, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                       max_position_embeddings=8192, query_pre_attn_scalar=256, sliding_window=4096,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0, attention_bias=False,
                       tie_word_embeddings=True),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu", max_position_embeddings=40960,
                     attention_bias=False, use_sliding_window=False, sliding_window=None, max_window_layers=36,
                     tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32768,  # v0.3
                       rope_theta=1000000.0, rms_norm_eps=1e-5, hidden_act="silu", max_position_embeddings=32768,
                       sliding_window=None, tie_word_embeddings=False),
    "tiny-llama": dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=1024, rope_theta=10000.0,
                       rms_norm_eps=1e-5, hidden_act="silu", max_position_embeddings=4096,
                       tie_word_embeddings=False),
}

# The released models among them (``bench kernels`` / ``tune`` presets; the order the reports list them in).
REAL_MODELS = ("llama-3-8b", "gemma-2-9b", "qwen3-8b", "mistral-7b")
