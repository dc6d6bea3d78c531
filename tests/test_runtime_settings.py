"""A LoRA kernel only runs on the setting its verification saw. A change after ``optimize`` -- TRL casting the
adapters of a 4-bit model to bf16, ``.to()`` -- makes the replacement run PEFT's forward, with a warning naming
the change; ``report()`` shows those modules as ``fallback``, never ``replaced``; the next ``optimize`` verifies
the new setting and binds (or skips, with the reason) again."""
import copy

import pytest
import torch

import sloth_core
from sloth_core.tiny import tiny_model
from sloth_core.tolerances import assert_close
from tests.batches import token_batch
from tests.sdpa_lora import TARGETS

LORA_PATTERNS = {"lora_linear", "lora_mlp", "lora_qkv"}


def _lora(device):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama", device=device),
                           LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def _cast_adapters(model, dtype):
    """What TRL does to the adapters of a 4-bit model after the user's optimize line."""
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.to(dtype)


def _statuses(model):
    return {(r.pattern, r.status) for r in sloth_core.report(model) if r.pattern in LORA_PATTERNS}


def _loss(model, device):
    ids, labels = token_batch(device)
    return model(input_ids=ids, labels=labels).loss


def test_a_cast_after_optimize_falls_back_says_so_and_is_verified_again(device):
    ref = _lora(device)
    model = sloth_core.optimize(copy.deepcopy(ref))
    assert _statuses(model) == {(p, "replaced") for p in LORA_PATTERNS}
    _cast_adapters(ref, torch.bfloat16)
    _cast_adapters(model, torch.bfloat16)
    with pytest.warns(sloth_core.SlothCoreWarning, match=r"lora_A dtype torch.float32 -> torch.bfloat16"):
        loss = _loss(model, device)
    assert _statuses(model) == {(p, "fallback") for p in LORA_PATTERNS}
    fallback = [r for r in sloth_core.report(model) if r.status == "fallback"]
    assert all("changed since it was verified" in r.detail for r in fallback)
    assert_close("loss", loss, _loss(ref, device), torch.float32, scale=4)  # PEFT's path, exactly the reference's

    sloth_core.optimize(model)  # verifies the new setting: bound again where it verifies, else skipped with why
    rows = [r for r in sloth_core.report(model) if r.pattern in LORA_PATTERNS]
    assert rows and all(r.status in ("replaced", "skipped") for r in rows)
    assert {r.module for r in rows if r.pattern == "lora_linear"} >= {r.module for r in fallback
                                                                      if r.pattern == "lora_linear"}
    assert_close("loss", _loss(model, device), _loss(ref, device), torch.float32, scale=8)


def test_nothing_changes_nothing_falls_back(device, recwarn):
    model = sloth_core.optimize(_lora(device))
    _loss(model, device).backward()
    assert not [w for w in recwarn if "changed since it was verified" in str(w.message)]
    assert _statuses(model) == {(p, "replaced") for p in LORA_PATTERNS}


def test_the_qkv_group_is_not_reported_where_its_projections_are_not_bound(device):
    """lora_qkv answers through the q/k/v lora_linear forwards: with those left to PEFT it would never run, and
    says so instead of "replaced"."""
    model = sloth_core.optimize(_lora(device), exclude="lora_linear")
    rows = [r for r in sloth_core.report(model) if r.pattern == "lora_qkv"]
    assert rows and all(r.status == "skipped" and "not bound by lora_linear" in r.detail for r in rows)


def test_restore_forgets_the_fallbacks(device):
    model = sloth_core.optimize(_lora(device))
    _cast_adapters(model, torch.bfloat16)
    with pytest.warns(sloth_core.SlothCoreWarning):
        _loss(model, device)
    sloth_core.restore(model)
    _cast_adapters(model, torch.float32)
    sloth_core.optimize(model)
    assert _statuses(model) == {(p, "replaced") for p in LORA_PATTERNS}
