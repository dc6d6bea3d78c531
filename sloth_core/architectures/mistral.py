"""Mistral: Llama's layout (RMSNorm with Llama casting, SwiGLU MLP, RoPE; sliding window lives in attention)."""
from ..registry import declare

MISTRAL = declare("mistral", model_types=("mistral",), norm="llama", activation="silu")
