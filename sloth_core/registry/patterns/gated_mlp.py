"""Pattern ``gated_mlp``: ``down_proj(act(gate_proj(x)) * up_proj(x))`` (Llama/Mistral/Qwen3 SwiGLU, Gemma GeGLU).

The projections are called as they are (``nn.Linear``, bitsandbytes ``Linear4bit``, PEFT LoRA layers), so LoRA
added before or after ``optimize`` keeps working; only ``act(g) * u`` goes to the fused kernel, whose backward
recomputes the activation instead of storing it.

The activation is read off the module's ``act_fn``: ``silu`` (``SiLUActivation``, ``nn.SiLU``) or ``gelu_tanh``
(``GELUTanh``, ``nn.GELU(approximate="tanh")``). An architecture may declare the activation it expects; a module
whose activation differs, or is anything else, is skipped with the reason.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from ... import bound_by_others
from ...kernels.gated_activation import gated_activation, gated_activation_reference
from ... import foreign
from ..pattern import Match, Pattern, Probe, Skip
from ._probe import autocast_state, input_dtype, module_dtype_device, randn

_CHILDREN = ("gate_proj", "up_proj", "down_proj")


def activation_of(act: object) -> str | None:
    """``"silu"``, ``"gelu_tanh"`` or ``None`` (unsupported) for an activation module or function."""
    if isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation":
        return "silu"
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else None
    if type(act).__name__ in ("GELUTanh", "PytorchGELUTanh"):
        inner = getattr(act, "act", None)
        if isinstance(inner, functools.partial):
            ok = inner.func is nn.functional.gelu and inner.keywords.get("approximate") == "tanh"
            return "gelu_tanh" if ok else None
        return "gelu_tanh" if inner is None else None
    if act is nn.functional.silu:
        return "silu"
    return None


def _in_features(proj: nn.Module) -> int | None:
    for m in (proj, getattr(proj, "base_layer", None)):
        n = getattr(m, "in_features", None)
        if isinstance(n, int):
            return n
    return None


# Liger-Kernel's gated MLPs (what ``apply_liger_kernel_to_<type>()`` makes the model's MLP class) have no ``act_fn``:
# their forward is ``down_proj(<fused act(gate) * up>)`` with the activation of the class.
_LIGER_ACTIVATIONS = {"LigerSwiGLUMLP": "silu", "LigerGEGLUMLP": "gelu_tanh"}


def _liger_activation(module: nn.Module) -> str | None:
    return next((a for name, a in _LIGER_ACTIVATIONS.items() if foreign.is_liger_class(type(module), name)), None)


def find(module: nn.Module, params) -> Match | Skip | None:
    if not all(isinstance(getattr(module, c, None), nn.Module) for c in _CHILDREN):
        return None
    act = getattr(module, "act_fn", None)
    if act is None:
        activation = _liger_activation(module)
        if activation is None:
            return None
    else:
        activation = activation_of(act)
    if activation is None:
        return Skip(f"activation {type(act).__name__} is not supported (silu, gelu_tanh are)")
    want = params["activation"]
    if want not in ("auto", activation):
        return Skip(f"architecture declares {want} but the module's activation is {activation}")
    hidden = _in_features(module.gate_proj)
    if hidden is None:
        return Skip("gate_proj has no in_features")
    dtype, device = module_dtype_device(module)
    sig = (type(module), type(module.gate_proj), dtype, device, hidden, _in_features(module.down_proj), activation,
           bound_by_others.hub_kernel(act) if isinstance(act, nn.Module) else None)
    return Match({"activation": activation, "hidden": hidden}, sig)


def _forward_with(act_times_up):
    def make(m: Match):
        activation = m["activation"]

        def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
            gate = self.gate_proj(x)  # gate before up: the same order (and dropout RNG draws) as HF's forward
            up = self.up_proj(x)
            return self.down_proj(act_times_up(gate, up, activation))

        return forward

    return make


def _original(module: nn.Module, m: Match):
    return module.forward


def _setting(module: nn.Module, args: tuple) -> tuple:
    w = module.gate_proj.weight
    return input_dtype(args), w.dtype, w.device, autocast_state(w.device)


def probe(module: nn.Module, m: Match, gen: torch.Generator) -> Probe:
    dtype, device = module_dtype_device(module)
    x = randn((2, 3, m["hidden"]), dtype, device, gen)
    return Probe(inputs=(x.requires_grad_(),), dtype=dtype)


GATED_MLP = Pattern(
    name="gated_mlp",
    kernel="triton:gated_activation",
    find=find,
    reference=_forward_with(gated_activation_reference),
    replacement=_forward_with(gated_activation),
    original=_original,
    probe=probe,
    setting=_setting,
    defaults={"activation": "auto"},
    serves_foreign=True,
)
