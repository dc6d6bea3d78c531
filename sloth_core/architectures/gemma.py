"""Gemma, Gemma2, Gemma3 (text): ``(1 + w)`` RMSNorm computed in fp32, GELU-tanh gated MLP, RoPE. Gemma's layer is
Llama's. Gemma2/3 normalize the attention output (``post_attention_layernorm``) and the MLP output
(``post_feedforward_layernorm``) before each residual add, soft-cap the final logits (``final_logit_softcapping``,
which the causal-LM loss must apply), and Gemma3 has per-head ``q_norm``/``k_norm``: all Gemma RMSNorms."""
from ..registry import HeadFacts, LayerFacts, declare

GEMMA = declare("gemma", model_types=("gemma",), norm="gemma", activation="gelu_tanh",
                layer=LayerFacts(attention_output_into_residual=True, mlp_output_into_residual=True))
GEMMA2 = declare("gemma2", model_types=("gemma2", "gemma3_text"), norm="gemma", activation="gelu_tanh",
                 head=HeadFacts(softcap_attr="final_logit_softcapping"),
                 layer=LayerFacts(attention_output_into_residual=False, mlp_output_into_residual=True,
                                  post_mlp_norm_attr="post_feedforward_layernorm"))
