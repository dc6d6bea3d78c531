"""Pattern ``rms_norm``: RMSNorm modules (``y = w_eff * x / sqrt(mean(x^2) + eps)``).

Matches any module whose class name contains ``RMSNorm`` with a 1-D ``weight`` and a float epsilon
(``variance_epsilon`` or ``eps``), and no children. This covers the decoder norms, Gemma2/3's extra pre/post
feed-forward norms, and Qwen3/Gemma3's per-head ``q_norm``/``k_norm`` (their input is ``[B, S, H, D]`` or a
transposed view, normalized over the head dimension).

Parameters: ``cast`` is ``"llama"`` (fp32 statistics, cast back to the input dtype *before* the weight multiply),
``"gemma"`` (everything in fp32, ``(offset + w)``, cast at the end) or ``"auto"`` (undeclared models: both are tried,
the one that verifies against the module wins); ``offset`` is 0 for Llama and 1 for Gemma's ``(1 + w)``.
"""
from __future__ import annotations

import torch
from torch import nn

from ... import bound_by_others
from ...kernels.rms_norm import rms_norm, rms_norm_reference
from ..pattern import Match, Pattern, Probe, Skip
from ._probe import autocast_state, input_dtype, module_dtype_device, randn, row_scales

_CASTS = {"llama": 0.0, "gemma": 1.0}


def _eps(module: nn.Module) -> float | None:
    for attr in ("variance_epsilon", "eps"):
        v = getattr(module, attr, None)
        if isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool)):
            return float(v)
    return None


def find(module: nn.Module, params) -> list[Match] | Skip | None:
    name = type(module).__name__
    if "rmsnorm" not in name.lower():
        return None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return Skip("no 1-D weight (a norm without scale is not supported)")
    if getattr(module, "bias", None) is not None:
        return Skip("has a bias")
    if next(module.children(), None) is not None:
        return Skip("has child modules")
    eps = _eps(module)
    if eps is None:
        return Skip("no float epsilon attribute (variance_epsilon / eps)")
    casts = list(_CASTS) if params["cast"] == "auto" else [params["cast"]]
    matches = []
    for cast in casts:
        offset = _CASTS[cast] if params["offset"] is None else float(params["offset"])
        sig = (type(module), weight.dtype, weight.device, tuple(weight.shape), eps, cast, offset,
               weight.requires_grad, bound_by_others.hub_kernel(module))
        matches.append(Match({"cast": cast, "offset": offset, "eps": eps}, sig))
    return matches


def _forward_with(norm):
    def make(m: Match):
        eps, offset, cast = m["eps"], m["offset"], m["cast"]

        def forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
            return norm(hidden_states, self.weight, eps, offset, cast)

        return forward

    return make


def _original(module: nn.Module, m: Match):
    return module.forward


def _setting(module: nn.Module, args: tuple) -> tuple:
    w = module.weight
    return input_dtype(args), w.dtype, w.device, w.requires_grad, autocast_state(w.device)


def _probe(module: nn.Module, m: Match, gen: torch.Generator) -> Probe:
    dtype, device = module_dtype_device(module)
    n = module.weight.shape[0]
    x = (randn((2, 3, n), torch.float32, "cpu", gen) * row_scales(3, gen)).to(device=device, dtype=dtype)
    params = (module.weight,) if module.weight.requires_grad else ()
    return Probe(inputs=(x.requires_grad_(),), params=params, dtype=dtype)


RMS_NORM = Pattern(
    name="rms_norm",
    kernel="triton:rms_norm",
    find=find,
    reference=_forward_with(rms_norm_reference),
    replacement=_forward_with(rms_norm),
    original=_original,
    probe=_probe,
    setting=_setting,
    defaults={"cast": "auto", "offset": None},
    serves_foreign=True,
)
