"""Qwen3: Llama's layout plus per-head ``q_norm``/``k_norm`` RMSNorms over the head dimension, which the
``rms_norm`` pattern serves like any other Qwen3RMSNorm."""
from ..registry import LayerFacts, declare

QWEN3 = declare("qwen3", model_types=("qwen3",), norm="llama", activation="silu",
                layer=LayerFacts(attention_output_into_residual=True, mlp_output_into_residual=True))
