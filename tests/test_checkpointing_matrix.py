"""Checkpointing ("on", "offload") with eager and sdpa attention, with and without ``use_cache``, for every tiny
architecture: the loss and every gradient equal the un-checkpointed model's, and the checkpoint runs once per
layer. transformers 5.2x renamed the layers' cache argument (``past_key_values`` -> ``cache``); a checkpointed call
that kept it wrote the cache twice (the recompute appends its keys again) and failed with a size mismatch deep in
the attention.

The full matrix runs with checkpointing alone (``patterns=()``: fast); the kernels join in on a LoRA model with
eager attention and the cache on, the combination that failed out of the box.
"""
import copy

import pytest
import torch

import sloth_core
from sloth_core import checkpointing as ck
from sloth_core.memory import host
from sloth_core.tiny import TINY_MODEL_TYPES, tiny_model
from tests.batches import token_batch
from tests.sdpa_lora import TARGETS, sdpa_overrides

pytestmark = pytest.mark.filterwarnings("ignore:sloth_core checkpointing.*KV cache")


@pytest.fixture(autouse=True)
def _offload_on_cpu(monkeypatch):
    monkeypatch.setattr(host, "OFFLOAD_CPU_INPUTS", True)
    yield
    ck.clear_host_pool()


def _model(model_type, attn, device):
    model = tiny_model(model_type, device=device, **(sdpa_overrides(model_type) if attn == "sdpa" else {}))
    model.config._attn_implementation = attn
    return model


def _step(model, ids, labels, use_cache):
    model.zero_grad(set_to_none=True)
    kwargs = {} if use_cache is None else {"use_cache": use_cache}
    loss = model(input_ids=ids, labels=labels, **kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_checkpointed_parity(ref, model, use_cache, device, exact):
    ids, labels = token_batch(device, s=9)
    loss0, grads0 = _step(ref, ids, labels, use_cache)
    ck.reset_checkpointing_stats()
    loss1, grads1 = _step(model, ids, labels, use_cache)
    assert ck.checkpointing_stats().checkpointed_calls == ref.config.num_hidden_layers
    close = torch.equal if exact else (lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-5))
    assert close(loss1, loss0), (loss1, loss0)
    assert grads0 and grads0.keys() == grads1.keys()
    bad = [n for n in grads0 if not close(grads1[n], grads0[n])]
    assert not bad, f"gradients differ: {bad[:4]}"


@pytest.mark.parametrize("use_cache", [None, True, False])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mode", ["on", "offload"])
@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_checkpointing_matches_the_plain_model(model_type, mode, attn, use_cache, device):
    ref = _model(model_type, attn, device).train()
    model = sloth_core.optimize(copy.deepcopy(ref), patterns=(), gradient_checkpointing=mode)
    _assert_checkpointed_parity(ref, model, use_cache, device, exact=device.type == "cpu")


@pytest.mark.parametrize("mode", ["on", "offload"])
@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_optimized_lora_model_checkpoints_with_eager_attention_and_the_cache_on(model_type, mode, device):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    ref = get_peft_model(_model(model_type, "eager", device),
                         LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model = sloth_core.optimize(copy.deepcopy(ref), gradient_checkpointing=mode)
    assert not sloth_core.missing_patterns(model)
    _assert_checkpointed_parity(ref, model, True, device, exact=False)
