"""Long runs without drift or growth (issue 20, item 6, CPU part): a tiny LoRA model trained with AdamW for many
steps follows Hugging Face's loss curve, and the process's memory stays flat across the steps and across many
optimize / restore cycles.

Training amplifies any rounding difference: HF's own run with its trainable weights moved by one float32 ulp
(x (1 + 2**-23)) drifts 2.3e-3 (relative loss) from HF's over 1,000 steps of this setup (6e-5 by step 100, 1e-3 by
step 200). The bound is therefore that baseline, measured in the same test, times ``CHAOS_SLACK`` (or ``LOSS_RTOL``
when the run is too short to drift).

CI runs ``STEPS`` steps and ``CYCLES`` cycles; ``SLOTH_CORE_LONG=1`` runs 1,000 steps and 100 cycles (a few
minutes under the interpreter): ``SLOTH_CORE_LONG=1 python -m pytest -q tests/test_long_run.py -s``.
"""
from __future__ import annotations

import copy
import gc
import os
import warnings

import pytest
import torch

import sloth_core
from sloth_core.tiny import tiny_model

LONG = os.environ.get("SLOTH_CORE_LONG") == "1"
STEPS = 1000 if LONG else 100  # a step of the optimized model takes ~0.1 s under the interpreter
CYCLES = 100 if LONG else 10
LOSS_RTOL = 1e-5  # float32: the largest relative loss difference to HF's along a run too short to drift
CHAOS_SLACK = 2.0  # ... or this many times the drift of HF's own run from a one-ulp perturbation of its weights
RSS_SLACK_MB = 24  # allocator noise; a leak of one tiny model's activations per step would pass this in ~50 steps
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _lora_model():
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama", hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, vocab_size=64, device=DEVICE)
    torch.manual_seed(0)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"]))


def _train(model, steps, record_rss=False):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    # eight batches of a few repeated sequences, seen over and over: there is something to learn
    batches = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(1))[
        torch.randint(0, 4, (8, 2), generator=torch.Generator().manual_seed(2))].to(DEVICE)
    losses, rss = [], []
    for step in range(steps):
        ids = batches[step % len(batches)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if record_rss and step % 10 == 9:
            rss.append(_rss_mb())
    return losses, rss


def _max_deviation(losses, reference):
    return max(abs(a - b) / abs(b) for a, b in zip(losses, reference))


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the RSS from /proc")
def test_a_long_lora_run_follows_hf_and_keeps_memory_flat():
    ref = _lora_model()
    model = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sloth_core.SlothCoreWarning)
        sloth_core.optimize(model)
    perturbed = copy.deepcopy(ref)
    with torch.no_grad():
        for p in perturbed.parameters():
            if p.requires_grad:
                p.mul_(1 + 2**-23)
    want, _ = _train(ref, STEPS)
    chaos = _max_deviation(_train(perturbed, STEPS)[0], want)
    got, rss = _train(model, STEPS, record_rss=True)
    deviation = _max_deviation(got, want)
    growth = max(rss[len(rss) // 4:]) - rss[len(rss) // 4]  # after a warm-up quarter
    checkpoints = ", ".join(f"{k}: {_max_deviation(got[:k], want[:k]):.1e}" for k in (10, 100, 200, 500, 1000)
                            if k <= STEPS)
    print(f"\nlong run: {STEPS} steps, loss {want[0]:.4f} -> {want[-1]:.4f} (HF) / {got[-1]:.4f} (sloth_core); max "
          f"relative loss deviation {deviation:.2e} (by step {checkpoints}); HF against its one-ulp perturbation "
          f"{chaos:.2e}; RSS {rss[len(rss) // 4]:.1f} -> {rss[-1]:.1f} MB (max growth {growth:.1f} MB)")
    assert want[-1] < want[0] - 0.1  # it trains
    assert deviation <= max(LOSS_RTOL, CHAOS_SLACK * chaos), (deviation, chaos)
    assert growth <= RSS_SLACK_MB, rss


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the RSS from /proc")
def test_optimize_restore_cycles_keep_memory_and_objects_flat():
    model = _lora_model()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def cycle():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sloth_core.SlothCoreWarning)
            sloth_core.optimize(model)
        model(input_ids=ids, labels=ids).loss.backward()
        sloth_core.restore(model)
        model.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: lazy imports, caches filled once
        cycle()
    gc.collect()
    objects, rss = len(gc.get_objects()), _rss_mb()
    for _ in range(CYCLES):
        cycle()
    gc.collect()
    grown_objects, grown_rss = len(gc.get_objects()) - objects, _rss_mb() - rss
    print(f"\n{CYCLES} optimize/restore cycles: {grown_objects:+d} Python objects, {grown_rss:+.1f} MB RSS")
    assert grown_objects < 200, grown_objects  # no per-cycle leftovers (a cycle creates thousands of objects)
    assert grown_rss <= RSS_SLACK_MB
    with torch.no_grad():
        assert not sloth_core.is_optimized(model)
