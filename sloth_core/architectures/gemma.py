"""Gemma, Gemma2, Gemma3 (text): ``(1 + w)`` RMSNorm computed in fp32, GELU-tanh gated MLP, RoPE. Gemma2/3's extra
pre/post feed-forward norms and Gemma3's per-head ``q_norm``/``k_norm`` are Gemma RMSNorms too. Gemma2/3 soft-cap
the final logits (``final_logit_softcapping``), which the causal-LM loss must apply; their
``post_feedforward_layernorm`` sits between the MLP and the residual add."""
from ..registry import HeadFacts, declare

GEMMA = declare("gemma", model_types=("gemma", "gemma2", "gemma3_text"), norm="gemma", activation="gelu_tanh",
                head=HeadFacts(softcap_attr="final_logit_softcapping"),
                post_mlp_norm_attr="post_feedforward_layernorm")
