"""Pattern ``causal_lm_loss``: a ``*ForCausalLM`` head computing its loss with the fused linear cross-entropy.

When ``labels`` are given, the replacement forward runs the decoder, then
``fused_linear_cross_entropy(h, W_lm_head, shifted labels)`` on the final hidden states -- the ``[tokens, vocab]``
logits are never materialized -- with the architecture's final-logit soft-capping ``c * tanh(z / c)`` and the
``num_items_in_batch`` divisor exactly as transformers' ``ForCausalLMLoss`` applies them (labels padded with
``ignore_index`` and shifted left by one, or the ``shift_labels`` given). Logits are then not returned unless
``optimize(..., return_logits=True)``. Without labels, and whenever the fused path cannot serve the call, the
class's own forward runs unchanged:

* gradients off (evaluation and prediction loops: ``Trainer.evaluate`` hands the logits to ``compute_metrics``);
* ``logits_to_keep`` other than 0, ``skip_logits=False`` (Liger-Kernel's ``lce_forward`` as the class forward), a
  ``loss_function`` other than transformers' ``ForCausalLMLoss``;
* an ``lm_head`` that is not a plain ``nn.Linear`` (a LoRA layer on ``lm_head``, a quantized head) or that has
  hooks. PEFT's ``modules_to_save`` copy of ``lm_head`` is served: its weight receives gradients;
* an ``lm_head`` whose weight is not whole at the loss: FSDP2 ``fully_shard(lm_head)`` on its own, a ``DTensor``
  weight (:mod:`sloth_core.distributed`); a warning names it and the report says ``fallback``. Under FSDP2 on the
  model's root (the usual wrapping) the root's pre-forward hook has gathered the weight and the fused loss serves.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect

import torch
from torch import nn
from torch.nn import functional as F
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ...distributed import sharded_head_reason
from ...fallback import fall_back
from ...kernels.fused_linear_cross_entropy import (fused_linear_cross_entropy,
                                                    fused_linear_cross_entropy_reference)
from ..pattern import Match, Pattern, Probe, Skip
from ._probe import autocast_state, module_dtype_device, randn

# The causal-LM forward's arguments, by meaning: the labels and ``logits_to_keep`` are the head's; every other named
# argument (the input ids, masks, positions, the KV cache -- ``past_key_values`` up to transformers 5.17, ``cache``
# from 5.2x --, ``use_cache``, ...) and the ``**kwargs`` go to the decoder unchanged, which must accept them.
_HEAD_ARGS = ("labels", "logits_to_keep")
# Head arguments some class forwards add: Liger-Kernel's ``lce_forward`` (``apply_liger_kernel_to_llama()`` makes it
# ``LlamaForCausalLM.forward``) takes ``skip_logits``; ``False`` asks for the logits, which the class forward serves.
_OPTIONAL_HEAD_ARGS = ("skip_logits",)


def head_linear(lm_head: nn.Module) -> nn.Linear | None:
    """The ``nn.Linear`` that computes the logits (through PEFT's ``modules_to_save`` wrapper), or ``None``."""
    if type(lm_head).__name__ == "ModulesToSaveWrapper":
        if getattr(lm_head, "disable_adapters", False):
            return head_linear(lm_head.original_module)
        active = [a for a in getattr(lm_head, "active_adapters", []) if a in lm_head.modules_to_save]
        return head_linear(lm_head.modules_to_save[active[0]]) if len(active) == 1 else None
    if type(lm_head) is not nn.Linear:
        return None
    if lm_head._forward_hooks or lm_head._forward_pre_hooks or getattr(lm_head, "_hf_hook", None) is not None:
        return None
    return lm_head


def _decoder(module: nn.Module) -> nn.Module | None:
    return getattr(module, getattr(module, "base_model_prefix", "model") or "model", None)


def _class_forward(module: nn.Module):
    return type(module).forward


def _loss_is_hf_causal(module: nn.Module) -> bool:
    return getattr(module, "loss_function", None) is ForCausalLMLoss


def _signature(fn) -> inspect.Signature:
    return inspect.signature(inspect.unwrap(fn))


def _passes_through(module: nn.Module, sig: inspect.Signature) -> str | None:
    """Why the class forward's arguments (``sig``) cannot be split into the head's and the decoder's (``None``: they
    can): it must take ``self``, ``labels``, ``logits_to_keep`` and ``**kwargs``, and the decoder must accept every
    other argument by name."""
    params = sig.parameters
    names = list(params)
    if not names or names[0] != "self" or not all(n in params for n in _HEAD_ARGS) or \
            not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return f"forward parameters {tuple(names)} lack self / labels / logits_to_keep / **kwargs"
    decoder = _signature(type(_decoder(module)).forward).parameters
    if any(p.kind is p.VAR_KEYWORD for p in decoder.values()):
        return None
    missing = [n for n, p in params.items() if n != "self" and n not in _HEAD_ARGS and p.kind is not p.VAR_KEYWORD
               and n not in decoder]
    return f"the decoder does not take {missing}" if missing else None


def find(module: nn.Module, params) -> Match | Skip | None:
    if not type(module).__name__.endswith("ForCausalLM") or not isinstance(getattr(module, "lm_head", None),
                                                                               nn.Module):
        return None
    if not isinstance(_decoder(module), nn.Module):
        return Skip("no decoder under base_model_prefix")
    forward_sig = _signature(_class_forward(module))
    why = _passes_through(module, forward_sig)
    if why is not None:
        return Skip(f"not transformers' causal-LM forward: {why}")
    if head_linear(module.lm_head) is None:
        return Skip(f"lm_head is a {type(module.lm_head).__name__} (LoRA or quantized head): the fused loss cannot "
                    f"serve it, the plain path stays")
    if not _loss_is_hf_causal(module):
        return Skip("loss_function is not transformers' ForCausalLMLoss")
    cfg = module.config
    softcap = getattr(cfg, params["softcap_attr"], None) if params["softcap_attr"] else None
    scale = getattr(cfg, params["logit_scale_attr"], None) if params["logit_scale_attr"] else None
    dtype, device = module_dtype_device(module.lm_head)
    sig = (type(module), dtype, device, softcap, scale, params["return_logits"])
    return Match({"softcap": softcap, "logit_scale": scale, "return_logits": params["return_logits"],
                  "_signature": forward_sig}, sig)


def _split(sig: inspect.Signature, module: nn.Module, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """The call's arguments, bound to the class forward's signature ``sig``, as (the head's: labels,
    logits_to_keep; the decoder's, by name)."""
    bound = sig.bind(module, *args, **kwargs)
    bound.apply_defaults()
    named = dict(bound.arguments)
    named.pop(next(iter(sig.parameters)))
    var_kw = next(n for n, p in sig.parameters.items() if p.kind is p.VAR_KEYWORD)
    extra = named.pop(var_kw, {})
    head = {n: named.pop(n) for n in _HEAD_ARGS}
    head.update({n: named.pop(n) for n in _OPTIONAL_HEAD_ARGS if n in named})
    head.update({n: extra.pop(n) for n in _OPTIONAL_HEAD_ARGS if n in extra})
    return head, {**named, **extra}


# read once: Dynamo cannot trace ``dataclasses.fields`` of a class
_OUTPUT_FIELDS = frozenset(f.name for f in dataclasses.fields(CausalLMOutputWithPast)) - {"loss", "logits"}


def _output(loss, logits, outputs) -> CausalLMOutputWithPast:
    """The causal-LM output with the decoder's cache / hidden states / attentions under whatever names this
    transformers gives them (the two output classes share the names)."""
    rest = {k: v for k, v in outputs.items() if k in _OUTPUT_FIELDS}
    return CausalLMOutputWithPast(loss=loss, logits=logits, **rest)


def _forward_with(loss_fn):
    def make(m: Match):
        softcap, scale, return_logits = m["softcap"], m["logit_scale"], m["return_logits"]

        def forward(self, *args, **kwargs):
            head_args, decoder_args = _split(m["_signature"], self, args, kwargs)
            labels, logits_to_keep = head_args["labels"], head_args["logits_to_keep"]
            head = head_linear(self.lm_head) if labels is not None else None
            sharded = sharded_head_reason(self.lm_head) if labels is not None else None
            if sharded is not None and torch.is_grad_enabled():
                fall_back(self, "causal_lm_loss", f"Hugging Face's loss runs: {sharded}")
                head = None
            if head is None or not torch.is_grad_enabled() or head_args.get("skip_logits") is False or \
                    not (isinstance(logits_to_keep, int) and logits_to_keep == 0) or not _loss_is_hf_causal(self):
                return _class_forward(self)(self, *args, **kwargs)
            return_dict = decoder_args.pop("return_dict", None)
            if return_dict is None:
                return_dict = getattr(self.config, "return_dict", True)
            ignore_index = decoder_args.pop("ignore_index", -100)
            shift_labels = decoder_args.pop("shift_labels", None)
            num_items_in_batch = decoder_args.pop("num_items_in_batch", None)
            outputs = _decoder(self)(**decoder_args)
            hidden = outputs[0]
            given = ("shift_labels", shift_labels) if shift_labels is not None else ("labels", labels)
            if tuple(given[1].shape) != tuple(hidden.shape[:-1]):
                raise ValueError(f"{type(self).__name__}: {given[0]} of shape {tuple(given[1].shape)} do not match "
                                 f"the inputs' (batch, sequence) shape {tuple(hidden.shape[:-1])}")
            if shift_labels is None:
                shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
            loss = loss_fn(hidden.reshape(-1, hidden.shape[-1]), head.weight,
                           shift_labels.reshape(-1).to(hidden.device), head.bias, ignore_index=ignore_index,
                           softcap=softcap, logit_scale=scale, num_items_in_batch=num_items_in_batch)
            logits = None
            if return_logits:
                logits = self.lm_head(hidden)
                if softcap is not None:
                    logits = torch.tanh(logits / softcap) * softcap
            out = _output(loss, logits, outputs)
            return out if return_dict else out.to_tuple()

        # The class forward's signature: trainers read it to pick the batch's columns (HF Trainer's
        # remove_unused_columns drops every column a ``(*args, **kwargs)`` forward does not name).
        forward.__signature__ = m["_signature"]
        return forward

    return make


def _setting(module: nn.Module, args: tuple) -> tuple | None:
    head = head_linear(module.lm_head)
    if head is None:  # the replacement runs the class forward itself
        return None
    w = head.weight
    return w.dtype, w.device, w.requires_grad, autocast_state(w.device)


def _original(module: nn.Module, m: Match):
    return module.forward


class _HiddenStatesDecoder(nn.Module):
    """Stands in for the decoder during verification: ``inputs_embeds`` come back as the final hidden states, so
    the probe compares the head alone (loss, and its gradient with respect to the hidden states) instead of a
    32-layer bf16 network's rounding noise."""

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        return BaseModelOutputWithPast(last_hidden_state=inputs_embeds)


@contextlib.contextmanager
def _decoder_replaced_by_hidden_states(module: nn.Module):
    name = getattr(module, "base_model_prefix", "model") or "model"
    decoder = module._modules[name]
    module._modules[name] = _HiddenStatesDecoder()
    try:
        yield
    finally:
        module._modules[name] = decoder


def _adapt(fn):
    """Probe calls: ``(hidden_states, labels) -> loss`` through the head only (see :class:`_HiddenStatesDecoder`)."""
    module = fn.__self__

    def call(hidden_states, labels):
        with _decoder_replaced_by_hidden_states(module):
            return fn(inputs_embeds=hidden_states, labels=labels).loss

    return call


def _probe(module: nn.Module, m: Match, gen: torch.Generator) -> Probe:
    dtype, device = module_dtype_device(module.lm_head)
    hidden = module.lm_head.in_features if isinstance(module.lm_head, nn.Linear) else module.config.hidden_size
    vocab = head_linear(module.lm_head).out_features
    weight = head_linear(module.lm_head).weight
    # Hidden states scaled so that the logits spread as a trained model's do (std ~3): with a freshly initialized
    # head's tiny logits every loss is ~log(vocab) and every gradient below the bf16 tolerance's atol, and a head
    # that scales its logits (Granite's logits_scaling) would pass for one that does not.
    row_norm = weight.detach().float().norm(dim=1).mean().clamp_min(1e-6).item()
    embeds = randn((2, 6, hidden), dtype, device, gen, scale=3.0 / row_norm)
    labels = torch.randint(0, vocab, (2, 6), generator=gen)
    labels[0, :2] = -100
    return Probe(inputs=(embeds.requires_grad_(), labels.to(device)),
                 params=(weight,) if weight.requires_grad else (), dtype=dtype)


CAUSAL_LM_LOSS = Pattern(
    name="causal_lm_loss",
    kernel="cublas+triton:fused_linear_cross_entropy",  # the projection in cuBLAS, the loss in Triton
    find=find,
    reference=_forward_with(fused_linear_cross_entropy_reference),
    replacement=_forward_with(fused_linear_cross_entropy),
    original=_original,
    probe=_probe,
    adapt=_adapt,
    setting=_setting,
    defaults={"softcap_attr": "final_logit_softcapping", "logit_scale_attr": None, "return_logits": False},
)
