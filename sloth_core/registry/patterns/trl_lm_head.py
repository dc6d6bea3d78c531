"""Pattern ``trl_fused_lm_head``: TRL's fused LM head served by :func:`~sloth_core.kernels.linear_log_probs`.

TRL (1.15+) gives the model a forward of its own (``add_fused_lm_head``: ``SFTTrainer`` and ``DPOTrainer`` do it
in their ``__init__``) that, called with ``fused_lm_head=True``, runs the decoder and then asks its autograd
function ``_ChunkedLogProbFunction`` -- looked up as a global of ``trl.trainer.utils`` -- for per-token
``log_probs`` and, as the trainer asks, ``entropy`` / ``is_top1``, in chunks, without the logits. Our fused
causal-LM loss never runs there. This pattern finds that forward on the instance and re-creates it with the global
bound to :class:`_Served` (:mod:`sloth_core.binding`, target ``global:``): TRL's forward, its masking, loss and
metrics stay as they are; the chunked head under them is ours.

:class:`_Served` runs the kernel only on a setting that was verified against TRL's own function: the compute dtype
(after autocast), the device, the soft-cap and logit scale TRL passes, the shapes and which of weight / bias take
gradients. Each setting is verified on its first call (the probe ``optimize`` verified the kernel with, on the call's
weight: a few rows, once per setting), and a setting that does not verify -- or that the kernel does not serve: a
temperature other than 1, outputs other than ``log_probs`` / ``entropy`` / ``is_top1`` (DPO's ``mean_logits``), a
sharded or non-floating weight -- runs TRL's function, with one warning naming the reason.
"""
from __future__ import annotations

import threading
import warnings
from typing import Any

import torch
from torch import nn

from ... import binding
from ...kernels.linear_log_probs import linear_log_probs, linear_log_probs_reference
from ...verify import verify
from ...warning import SlothCoreWarning
from ..pattern import Match, Pattern, Probe, Skip
from ._probe import autocast_state

GLOBAL = "_ChunkedLogProbFunction"
NAME = "trl_fused_lm_head"
SERVED = ("log_probs", "entropy", "is_top1")
_PROBE_CHUNK = 4096  # TRL's vocabulary chunk in the probe's calls of its function


class _Head:
    """The lm_head and the transform a probe calls the function with (passed through the probe untouched)."""

    def __init__(self, weight, bias, softcap, logit_scale):
        self.weight, self.bias, self.softcap, self.logit_scale = weight, bias, softcap, logit_scale


def _adapt(fn):
    """Probe calls: ``(hidden, labels, head) -> (log_probs, entropy, is_top1 as 0/1)`` through ``fn.apply`` with
    TRL's arguments (for :class:`_Served`, its kernel path: the probe verifies the kernel, not the check)."""
    apply = getattr(fn, "kernel_apply", None) or fn.apply

    def call(hidden, labels, head):
        out = apply(hidden, head.weight, head.bias, labels, 1.0, _PROBE_CHUNK, head.softcap, head.logit_scale,
                       SERVED)
        return out[0], out[1], out[4].to(torch.float32)

    return call


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    return autocast_state(hidden.device) or hidden.dtype


def _in_compute_dtype(fn, hidden, weight, bias, targets, softcap, logit_scale):
    """``fn`` (the kernel or its reference) on the inputs cast to the compute dtype (autocast's, as TRL's function
    takes it), autocast off; TRL's unit logit scale is "no scale"."""
    dtype = _compute_dtype(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        return fn(hidden.to(dtype), weight.to(dtype), targets, None if bias is None else bias.to(dtype), softcap,
                  None if float(logit_scale) == 1.0 else float(logit_scale))


def _setting(hidden, weight, bias, softcap, logit_scale) -> tuple:
    """What a verification holds for: compute dtype, device, shapes, transform, which of weight / bias train."""
    return (_compute_dtype(hidden), weight.device, tuple(weight.shape), bias is not None, softcap,
            float(logit_scale), weight.requires_grad, bias is not None and bias.requires_grad)


def _probe_for(weight: torch.Tensor, bias, softcap, logit_scale, dtype: torch.dtype, gen: torch.Generator,
               rows: int = 12) -> Probe:
    """Hidden states with a clear winner per row (no near-tie can flip ``is_top1`` between two roundings of the
    same logits): each leans towards one token's weight row; half the labels are that token, half another."""
    w = weight.detach().to(dtype)
    vocab, n_hidden = w.shape
    norms = w.float().norm(dim=1).cpu()
    pool = torch.nonzero(norms >= norms.median()).squeeze(-1)
    cand = 4 * rows
    target = pool[torch.randint(0, len(pool), (cand,), generator=gen)]
    lean = w[target.to(w.device)].float() / norms[target].clamp_min(1e-6).unsqueeze(-1).to(w.device)
    noise = torch.randn(cand, n_hidden, generator=gen).to(w.device)
    hidden = (noise + 6.0 * lean).to(dtype)  # the leaned-to token's logit: 6 |w_t| against noise of |w_v|
    logits = hidden.float() @ w.float().t()
    if bias is not None:
        logits = logits + bias.detach().float()
    top2 = logits.topk(min(2, vocab), dim=-1).values
    gap = (top2[:, 0] - top2[:, -1]) if vocab > 1 else torch.full((cand,), 1.0, device=w.device)
    clear = (gap > 0.05 * top2[:, 0].abs() + 1e-3).cpu()
    order = torch.argsort((~clear).to(torch.int8), stable=True)[:rows]
    hidden = hidden[order.to(w.device)]
    winner = logits[order.to(w.device)].argmax(-1).cpu()
    other = (winner + 1 + torch.randint(0, max(vocab - 1, 1), (rows,), generator=gen)) % vocab
    labels = torch.where(torch.arange(rows) % 2 == 0, winner, other).to(w.device)
    head = _Head(w if weight.dtype == dtype else weight, bias, softcap, logit_scale)
    params = tuple(t for t in (weight, bias) if t is not None and t.requires_grad)
    return Probe(inputs=(hidden.requires_grad_(), labels, head), params=params, dtype=dtype)


class _Reference:
    """TRL's function's ``apply`` in plain PyTorch (full logits): the meaning of the pattern."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0,
              outputs=("log_probs",)):
        log_probs, entropy, top1 = _in_compute_dtype(linear_log_probs_reference, hidden, weight, bias, targets,
                                                     softcap, logit_scale)
        return log_probs, entropy, None, None, top1


class _Served:
    """Stands where TRL's forward looks up ``_ChunkedLogProbFunction``: ``apply`` takes its arguments and returns
    its five outputs (``log_probs``, ``entropy``, ``log_sum_sq_probs``, ``mean_logits``, ``is_top1``; the ones not
    asked for are ``None``). Runs the kernel on verified settings, TRL's function (``original``) otherwise."""

    def __init__(self, original: Any):
        self.original = original
        self._verified: dict[tuple, str | None] = {}  # setting -> None (verified) or why it is not served
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def _why_not(self, hidden, weight, bias, targets, temperature, softcap, logit_scale, outputs) -> str | None:
        extra = [o for o in outputs if o not in SERVED]
        if extra:
            return f"outputs {extra} are TRL's alone (the kernel serves {list(SERVED)})"
        if float(temperature) != 1.0:
            return f"temperature {temperature} (the kernel serves 1.0)"
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and (type(t).__name__ == "DTensor" or hasattr(t, "ds_id") or not t.is_floating_point()):
                return f"the lm_head {name} is a {type(t).__name__} of {t.dtype} (sharded or not floating)"
        if torch.is_tensor(logit_scale) or torch.is_tensor(softcap):
            return "a tensor-valued logit scale or soft-cap"
        key = _setting(hidden, weight, bias, softcap, logit_scale)
        with self._lock:
            if key not in self._verified:
                probe = _probe_for(weight, bias, softcap, float(logit_scale), key[0], torch.Generator().manual_seed(0))
                why = verify(original=_adapt(self.original), replacement=_adapt(self), reference=_adapt(_Reference),
                             probe=probe)
                self._verified[key] = None if why is None else f"not verified for {key[0]}: {why}"
            return self._verified[key]

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0,
              outputs=("log_probs",)):
        why = self._why_not(hidden, weight, bias, targets, temperature, softcap, logit_scale, outputs)
        if why is not None:
            if why not in self._warned:
                self._warned.add(why)
                warnings.warn(f"sloth_core: {NAME}: TRL's chunked LM head runs on this call: {why}",
                              SlothCoreWarning, stacklevel=3)
            return self.original.apply(hidden, weight, bias, targets, temperature, chunk_size, softcap,
                                       logit_scale, outputs)
        return self.kernel_apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale,
                                 outputs)

    @staticmethod
    def kernel_apply(hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0,
                     outputs=("log_probs",)):
        """The kernel, unchecked (what verification runs)."""
        log_probs, entropy, top1 = _in_compute_dtype(linear_log_probs, hidden, weight, bias, targets, softcap,
                                                     logit_scale)
        return (log_probs, entropy if "entropy" in outputs else None, None, None,
                top1 if "is_top1" in outputs else None)


def _head(module: nn.Module) -> nn.Module | None:
    get = getattr(module, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


def find(module: nn.Module, params) -> Match | Skip | None:
    if "forward" not in module.__dict__ and "_old_forward" not in module.__dict__:
        return None
    fn = binding.bound_forward_function(module)
    if fn is None or not binding.calls_global(fn, GLOBAL):
        return None
    original = binding.global_callable(module, GLOBAL)
    if not callable(getattr(original, "apply", None)):
        return Skip(f"{GLOBAL} is {original!r}, not TRL's autograd function")
    head = _head(module)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        return Skip("the lm_head weight is not a floating-point tensor (a quantized head): TRL's function stays")
    bias = getattr(head, "bias", None)
    config = getattr(module, "config", None)
    text_config = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return Match({"_original": original, "_softcap": softcap},
                 (type(module), weight.dtype, weight.device, tuple(weight.shape), bias is not None, softcap,
                  weight.requires_grad))


def _probe(module: nn.Module, m: Match, gen: torch.Generator) -> Probe:
    head = _head(module)
    return _probe_for(head.weight, head.bias, m["_softcap"], 1.0, head.weight.dtype, gen)


def _replacement(m: Match) -> _Served:
    return _Served(m["_original"])


TRL_FUSED_LM_HEAD = Pattern(
    name=NAME,
    kernel="cublas+triton:linear_log_probs",  # the projection in cuBLAS, the row statistics in Triton
    find=find,
    reference=lambda m: _Reference,
    replacement=_replacement,
    original=lambda module, m: m["_original"],
    probe=_probe,
    adapt=_adapt,
    target=f"global:{GLOBAL}",
)
