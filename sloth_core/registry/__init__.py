"""The pattern registry: patterns (what to find, what it means, what to put) and architectures (which patterns
apply to which ``model_type``, with which parameters)."""
from .architecture import (Architecture, HeadFacts, LayerFacts, declare, declared_model_types, generic_architecture,
                           lookup, register)
from .pattern import Match, Pattern, PatternUse, Probe, Skip

__all__ = ["Architecture", "HeadFacts", "LayerFacts", "declare", "Match", "Pattern", "PatternUse", "Probe", "Skip",
           "declared_model_types", "generic_architecture", "lookup", "register"]
