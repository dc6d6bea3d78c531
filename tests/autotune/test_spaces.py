"""The tuning spaces the kernel families declare: buckets, candidates, validation; and, with a fake timer, one
small tuning run of each kernel on the test device (its inputs, its run and the comparison work end to end)."""
from __future__ import annotations

import pytest
import torch

from sloth_core.autotune import get_space, registered_spaces
from sloth_core.autotune.space import format_key, load_builtin_spaces
from sloth_core.autotune.tuner import tune
from sloth_core.kernels import fused_linear_cross_entropy

load_builtin_spaces()

BF16 = torch.bfloat16
LLAMA_KEYS = {  # launch keys of a Llama-3-8B step over 4096 tokens, as the launchers pass them
    "rms_norm": dict(n_rows=4096, n_cols=4096, dtype=BF16, dw_reduction=False, interpret=False, num_sms=132),
    "gated_activation": dict(n=4096 * 14336, dtype=BF16),
    "rope": dict(n_tokens=4096, n_heads=32, half=64, dtype=BF16),
    "cross_entropy": dict(n_rows=2048, n_cols=128256, dtype=BF16),
    "fused_linear_cross_entropy": dict(n_tokens=4096, vocab=128256, hidden=4096, dtype=BF16),
}
SMALL_BUCKETS = {  # tiny launches (cheap under the interpreter)
    "rms_norm": {"n_cols": 256, "n_rows": 16, "dw": 0, "dtype": "fp32"},
    "gated_activation": {"n": 2048, "dtype": "bf16"},
    "rope": {"n_tokens": 4, "n_heads": 8, "half": 64, "dtype": "fp16"},
    "cross_entropy": {"n_cols": 1500, "n_rows": 4, "dtype": "fp32"},
    "fused_linear_cross_entropy": {"n_tokens": 64, "vocab": 300, "hidden": 32, "dtype": "fp32"},
}
SMALL_CANDIDATES = {  # below the smallest declared chunk (256 tokens): chunks chosen for the test
    "fused_linear_cross_entropy": [{"chunk_tokens": 16}, {"chunk_tokens": 48}],
}


def test_every_kernel_declares_a_space():
    assert set(LLAMA_KEYS) <= set(registered_spaces()) == set(load_builtin_spaces())


@pytest.mark.parametrize("kernel", sorted(LLAMA_KEYS))
def test_candidates_at_llama_shapes(kernel):
    spec = get_space(kernel)
    bucket = spec.bucket(LLAMA_KEYS[kernel])
    candidates = spec.candidates_for(bucket)
    assert 2 <= len(candidates) <= 40, len(candidates)
    assert candidates[0] == spec.heuristic(bucket)
    assert len({format_key(c) for c in candidates}) == len(candidates)
    assert all(spec.accepts(c, bucket) is None for c in candidates)
    assert spec.should_tune(bucket)
    first = dict(candidates[0])
    name = next(iter(first))
    assert spec.accepts({**first, "UNKNOWN": 1}, bucket) is not None
    assert spec.accepts({**first, name: -3}, bucket) is not None
    assert spec.accepts({**first, name: str(first[name])}, bucket) is not None


def test_buckets():
    norm = get_space("rms_norm")
    key = dict(LLAMA_KEYS["rms_norm"])
    assert norm.bucket(key) == {"n_cols": 4096, "n_rows": 4096, "dw": 0, "dtype": "bf16"}
    assert norm.bucket({**key, "n_rows": 3000, "num_sms": 80}) == norm.bucket(key)  # rows: next power of 2
    assert norm.bucket({**key, "n_cols": 4095}) != norm.bucket(key)                # widths: exact
    assert norm.bucket({**key, "dtype": torch.float16}) != norm.bucket(key)
    assert norm.bucket({**key, "dw_reduction": True}) != norm.bucket(key)
    assert norm.bucket({**key, "n_rows": 1 << 24})["n_rows"] == 1 << 15  # capped at 2^27 elements
    ce = get_space("cross_entropy").bucket(LLAMA_KEYS["cross_entropy"])
    assert ce["n_rows"] * ce["n_cols"] <= 1 << 27
    assert not get_space("rms_norm").should_tune(norm.bucket({**key, "n_rows": 8}))  # a probe: not tuned


def test_fused_loss_chunks_stay_within_the_memory_budget():
    spec = get_space("fused_linear_cross_entropy")
    for vocab in (32768, 128256, 256000):
        bucket = spec.bucket({**LLAMA_KEYS["fused_linear_cross_entropy"], "vocab": vocab})
        for cfg in spec.candidates(bucket):
            assert cfg["chunk_tokens"] * vocab * 2 <= fused_linear_cross_entropy.CHUNK_BYTES_BUDGET


class IncreasingTimer:
    """Runs the candidate once; later candidates are slower."""

    def __init__(self):
        self.calls = 0

    def __call__(self, fn, config):
        fn()
        self.calls += 1
        return 1.0 + 0.01 * self.calls


@pytest.mark.parametrize("kernel", sorted(SMALL_BUCKETS))
def test_small_tuning_run(kernel, device):
    """Two candidates (besides the heuristic) pass the comparison with the heuristic's outputs."""
    spec = get_space(kernel)
    bucket = SMALL_BUCKETS[kernel]
    heuristic = spec.heuristic(bucket)
    others = SMALL_CANDIDATES.get(kernel) or [c for c in spec.candidates(bucket) if c != heuristic][:2]
    assert others, "no candidate besides the heuristic"
    result = tune(kernel, bucket, device=device, timer=IncreasingTimer(), candidates=others, min_gain=0.0)
    assert [t.error for t in result.trials] == [None] * len(result.trials)
    assert result.config == heuristic  # the first timed is the fastest with this timer


def test_tuning_run_discards_a_refused_config(device):
    """The rope launcher refuses a BLOCK_HALF smaller than half the head dim: that candidate is discarded."""
    bucket = SMALL_BUCKETS["rope"]
    bad = {**get_space("rope").heuristic(bucket), "BLOCK_HALF": 32}
    result = tune("rope", bucket, device=device, timer=IncreasingTimer(), candidates=[bad])
    assert result.trials[1].error and "BLOCK_HALF" in result.trials[1].error
