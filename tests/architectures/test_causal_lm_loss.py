"""The causal-LM head with the fused linear cross-entropy: HF's loss semantics (shift, ignore_index,
num_items_in_batch, soft-capping), logits only when asked for, and the fallbacks to the plain path."""
import copy

import pytest
import torch

import sloth_core
from sloth_core.tiny import TINY_MODEL_TYPES, tiny_model
from sloth_core.tolerances import assert_close


def _labels(device, b=2, s=7, vocab=128, seed=1, ignore="some"):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (b, s), generator=g)
    if ignore == "some":
        labels[0, :3] = -100
    elif ignore == "all":
        labels[:] = -100
    return labels.to(device)


def _loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(ref, model, **inputs):
    out0, g0 = _loss_and_grads(ref, **inputs)
    out1, g1 = _loss_and_grads(model, **inputs)
    assert_close("loss", out1.loss, out0.loss, torch.float32, scale=4)
    assert g0.keys() == g1.keys()
    for n in g0:
        assert_close(f"grad {n}", g1[n], g0[n], torch.float32, scale=8)
    return out0, out1


def _replaced(model, pattern="causal_lm_loss"):
    return [r for r in sloth_core.report(model) if r.pattern == pattern and r.status == "replaced"]


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_loss_without_logits_and_gradient_accumulation(model_type, device):
    ref = tiny_model(model_type, device=device)
    model = sloth_core.optimize(copy.deepcopy(ref))
    assert _replaced(model)
    ids = _labels(device, ignore="none")
    labels = _labels(device, seed=2)
    out0, out1 = _assert_same(ref, model, input_ids=ids, labels=labels)
    assert out1.logits is None and out0.logits is not None
    # gradient accumulation: a sum divided by the number of items of the whole batch, as the Trainer passes it
    n_items = torch.tensor(23, device=device)
    _assert_same(ref, model, input_ids=ids, labels=labels, num_items_in_batch=n_items)
    # labels already shifted by the caller
    shift = _labels(device, seed=3)
    _assert_same(ref, model, input_ids=ids, labels=labels, shift_labels=shift)


def test_return_logits_option_and_tuple_output(device):
    ref = tiny_model("gemma2", device=device)
    model = sloth_core.optimize(copy.deepcopy(ref), return_logits=True)
    ids, labels = _labels(device, ignore="none"), _labels(device, seed=2)
    out0, out1 = _assert_same(ref, model, input_ids=ids, labels=labels)
    assert_close("soft-capped logits", out1.logits.detach(), out0.logits.detach(), torch.float32, scale=4)
    tup = model(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(tup, tuple)
    assert_close("tuple loss", tup[0].detach(), out0.loss.detach(), torch.float32, scale=4)


def test_all_labels_ignored_matches_hf(device):
    ref = tiny_model("llama", device=device)
    model = sloth_core.optimize(copy.deepcopy(ref))
    ids, labels = _labels(device, ignore="none"), _labels(device, ignore="all")
    l0 = ref(input_ids=ids, labels=labels).loss
    l1 = model(input_ids=ids, labels=labels).loss
    assert torch.isnan(l0) == torch.isnan(l1)  # mean over zero items: NaN in HF, NaN here
    n = torch.tensor(4, device=device)
    _, g1 = _loss_and_grads(model, input_ids=ids, labels=labels, num_items_in_batch=n)
    assert all(torch.count_nonzero(g) == 0 for g in g1.values())


def test_logits_to_keep_takes_the_plain_path(device):
    ref = tiny_model("qwen3", device=device)
    model = sloth_core.optimize(copy.deepcopy(ref))
    ids = _labels(device, ignore="none")
    with torch.no_grad():
        a = ref(input_ids=ids, logits_to_keep=1).logits
        b = model(input_ids=ids, logits_to_keep=1).logits
    assert a.shape[1] == 1
    assert_close("logits", b, a, torch.float32, scale=4)


def test_lora_on_lm_head_keeps_plain_path_and_reports(device):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM")
    ref = get_peft_model(tiny_model("llama", device=device), cfg)
    model = sloth_core.optimize(copy.deepcopy(ref))
    rows = [r for r in sloth_core.report(model) if r.pattern == "causal_lm_loss"]
    assert rows and rows[0].status == "skipped" and "lm_head" in rows[0].detail
    _assert_same(ref, model, input_ids=_labels(device, ignore="none"), labels=_labels(device, seed=2))


def test_lm_head_in_modules_to_save_gets_gradients(device):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"],
                     task_type="CAUSAL_LM")
    ref = get_peft_model(tiny_model("mistral", device=device), cfg)
    model = sloth_core.optimize(copy.deepcopy(ref))
    assert _replaced(model)
    _, grads = _assert_same(ref, model, input_ids=_labels(device, ignore="none"), labels=_labels(device, seed=2))
    model.zero_grad()
    out = model(input_ids=_labels(device, ignore="none"), labels=_labels(device, seed=2))
    out.loss.backward()
    head = [p for n, p in model.named_parameters() if "modules_to_save" in n and "lm_head" in n]
    assert head and all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)


def test_lora_added_to_lm_head_after_optimize_falls_back(device):
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama", device=device)
    ref = copy.deepcopy(base)
    model = sloth_core.optimize(base)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], task_type="CAUSAL_LM")
    torch.manual_seed(0)
    ref = get_peft_model(ref, cfg)
    torch.manual_seed(0)
    model = get_peft_model(model, cfg)
    with torch.no_grad():
        for (n, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
            if "lora_B" in n:
                p.normal_(0, 0.05)
                q.copy_(p)
    _assert_same(ref, model, input_ids=_labels(device, ignore="none"), labels=_labels(device, seed=2))


def test_without_gradients_the_logits_come_back_with_the_loss(device):
    """Evaluation loops run without gradients and hand the logits to their metrics: HF's own path answers."""
    ref = tiny_model("gemma2", device=device)
    model = sloth_core.optimize(copy.deepcopy(ref))
    ids, labels = _labels(device, ignore="none"), _labels(device, seed=2)
    with torch.no_grad():
        a, b = ref(input_ids=ids, labels=labels), model(input_ids=ids, labels=labels)
    assert b.logits is not None
    assert_close("logits", b.logits, a.logits, torch.float32, scale=4)
    assert_close("loss", b.loss, a.loss, torch.float32, scale=4)
