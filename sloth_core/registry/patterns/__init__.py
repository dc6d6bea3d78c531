"""The built-in patterns. Architectures pick from these with parameters (``RMS_NORM.using(cast="gemma")``)."""
from .causal_lm_loss import CAUSAL_LM_LOSS
from .gated_mlp import GATED_MLP
from .lora import LORA_LINEAR, LORA_MLP, LORA_QKV
from .rms_norm import RMS_NORM
from .rope import ROPE
from .trl_lm_head import TRL_FUSED_LM_HEAD

# LORA_QKV after ROPE: rope re-creates the attention's forward function with its kernel in the globals, lora_qkv
# wraps whatever forward is bound before it (in the other order rope reports itself skipped: it cannot reach the
# function inside the wrapper).
ALL_PATTERNS = (RMS_NORM, LORA_MLP, GATED_MLP, LORA_LINEAR, ROPE, LORA_QKV, CAUSAL_LM_LOSS,
                TRL_FUSED_LM_HEAD)
# Built and verified but in no default list (``optimize(opt_in=...)`` applies them): none at the moment.
OPT_IN_PATTERNS: tuple = ()
# For model types nobody declared: every parameter is resolved from the module and verified per instance.
GENERIC_PATTERNS = tuple(p.using() for p in ALL_PATTERNS)

__all__ = ["RMS_NORM", "GATED_MLP", "LORA_LINEAR", "LORA_MLP", "LORA_QKV", "ROPE", "CAUSAL_LM_LOSS",
           "TRL_FUSED_LM_HEAD", "ALL_PATTERNS", "OPT_IN_PATTERNS", "GENERIC_PATTERNS"]
