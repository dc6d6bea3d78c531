"""Llama 1/2/3.x: RMSNorm with Llama casting, SwiGLU MLP, RoPE."""
from ..registry import declare

LLAMA = declare("llama", model_types=("llama",), norm="llama", activation="silu")
