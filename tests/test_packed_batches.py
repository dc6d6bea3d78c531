"""Packed and padding-free batches (TRL's ``padding_free=True`` / ``packing=True``): several sequences in one row,
position ids restarting at each, the first label of each sequence ignored -- what TRL's padding-free collator
builds. Every kernel (RoPE reads the restarted positions through cos/sin, the fused loss must not predict across a
boundary) gives the unoptimized model's loss and gradients, bare and LoRA-wrapped, with and without offloaded
checkpointing, on eager and sdpa attention. (On those two, transformers 5.17 and 5.25 let the packed sequences
attend to each other -- the packed loss of the tiny Llama is not the sequences' own; keeping them apart takes a
varlen attention such as flash-attention, which TRL asks for with ``padding_free``. sloth_core's kernels do not
touch the attention: whatever it does, the optimized model does the same.)"""
import copy

import pytest
import torch

import sloth_core
from sloth_core import checkpointing as ck
from sloth_core.memory import host
from sloth_core.tiny import TINY_MODEL_TYPES, tiny_model
from sloth_core.tolerances import assert_close
from tests.sdpa_lora import TARGETS, sdpa_overrides

LENGTHS = (5, 3, 7)


def packed_batch(device, lengths=LENGTHS, vocab=128, seed=3):
    """``input_ids`` [1, sum], ``position_ids`` restarting per sequence, ``labels`` with each sequence's first
    token ignored (as TRL's ``DataCollatorForLanguageModeling(padding_free=True)`` returns them)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(2, vocab, (n,), generator=g) for n in lengths]
    ids = torch.cat(seqs)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0)[:-1].tolist()])
    labels[0, starts] = -100
    return {"input_ids": ids.to(device), "position_ids": positions.to(device), "labels": labels.to(device)}


def _model(model_type, attn, device, lora):
    model = tiny_model(model_type, device=device, **(sdpa_overrides(model_type) if attn == "sdpa" else {}))
    model.config._attn_implementation = attn
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    return model.train()


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_parity(ref, model, batch):
    loss0, grads0 = _step(ref, batch)
    loss1, grads1 = _step(model, batch)
    assert_close("loss", loss1, loss0, torch.float32, scale=4)
    assert grads0 and grads0.keys() == grads1.keys()
    for n in grads0:
        assert_close(f"grad {n}", grads1[n], grads0[n], torch.float32, scale=8)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_packed_batch_matches_the_plain_model(model_type, attn, device):
    ref = _model(model_type, attn, device, lora=False)
    model = sloth_core.optimize(copy.deepcopy(ref))
    assert not sloth_core.missing_patterns(model)
    _assert_parity(ref, model, packed_batch(device))


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma2"])
def test_packed_batch_lora_with_offloaded_checkpointing(model_type, device, monkeypatch):
    monkeypatch.setattr(host, "OFFLOAD_CPU_INPUTS", True)
    ref = _model(model_type, "sdpa", device, lora=True)
    model = sloth_core.optimize(copy.deepcopy(ref), gradient_checkpointing="offload")
    assert not sloth_core.missing_patterns(model)
    ck.reset_checkpointing_stats()
    _assert_parity(ref, model, packed_batch(device))
    assert ck.checkpointing_stats().checkpointed_calls == ref.config.num_hidden_layers
    ck.clear_host_pool()


@pytest.mark.filterwarnings("ignore")
def test_trl_padding_free_collator_batch(device):
    trl_sft = pytest.importorskip("trl.trainer.sft_trainer")
    collate = trl_sft.DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    g = torch.Generator().manual_seed(5)
    examples = [{"input_ids": torch.randint(2, 128, (n,), generator=g).tolist()} for n in LENGTHS]
    batch = {k: v.to(device) for k, v in collate(examples).items() if k in ("input_ids", "labels", "position_ids")}
    ref = _model("mistral", "sdpa", device, lora=True)
    model = sloth_core.optimize(copy.deepcopy(ref))
    _assert_parity(ref, model, batch)
