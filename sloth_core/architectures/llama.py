"""Llama 1/2/3.x: RMSNorm with Llama casting, SwiGLU MLP, RoPE; attention and MLP outputs straight into the residual
adds."""
from ..registry import LayerFacts, declare

LLAMA = declare("llama", model_types=("llama",), norm="llama", activation="silu",
                layer=LayerFacts(attention_output_into_residual=True, mlp_output_into_residual=True))
