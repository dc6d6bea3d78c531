"""Mistral: Llama's layout (RMSNorm with Llama casting, SwiGLU MLP, RoPE; sliding window lives in attention)."""
from ..registry import LayerFacts, declare

MISTRAL = declare("mistral", model_types=("mistral",), norm="llama", activation="silu",
                  layer=LayerFacts(attention_output_into_residual=True, mlp_output_into_residual=True))
