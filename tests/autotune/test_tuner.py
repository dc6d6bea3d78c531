"""The tuner with a fake timer: the fastest correct candidate wins; wrong, raising and incomplete ones are
discarded with their reason."""
from __future__ import annotations

import pytest
import torch

from sloth_core.autotune.tuner import TuningError, tune
from sloth_core.kernels import _runtime

from .conftest import FASTEST_CORRECT, HEURISTIC, KERNEL, FakeTimer

BUCKET = {"n": 256, "dtype": "fp32"}


def test_picks_the_fastest_correct_candidate(fake_kernel):
    timer = FakeTimer()
    result = tune(KERNEL, BUCKET, device="cpu", timer=timer)
    assert result.config == FASTEST_CORRECT
    assert result.ms == pytest.approx(2.1)
    assert result.heuristic_config == HEURISTIC and result.heuristic_ms == pytest.approx(5.1)
    assert result.speedup == pytest.approx(5.1 / 2.1)
    assert result.trials[0].config == HEURISTIC  # the heuristic is always a candidate, tried first
    assert len(result.trials) == 9


def test_discards_wrong_raising_and_incomplete_candidates(fake_kernel):
    _runtime.set_poison(False)  # the tuner poisons outputs itself
    try:
        timer = FakeTimer()
        result = tune(KERNEL, BUCKET, device="cpu", timer=timer)
        assert not _runtime.poisoning()  # restored
    finally:
        _runtime.set_poison(True)
    assert sorted(t.config["BLOCK"] for t in result.discarded) == [4, 4, 8, 8, 16, 16]
    errors = {t.config["BLOCK"]: t.error for t in result.discarded}
    assert "RuntimeError: out of resources" in errors[4]
    assert errors[8].startswith("wrong result") and "relative error" in errors[8]
    assert errors[16].startswith("wrong result") and "NaN" in errors[16]
    assert all(cfg["BLOCK"] in (1, 2) for cfg in timer.timed)  # discarded candidates are never timed
    assert result.config["BLOCK"] not in errors


def test_explicit_candidates_and_reference(fake_kernel, monkeypatch):
    """``candidates`` replaces the list (the heuristic stays first); a spec's ``reference`` is what outputs
    must match."""
    timer = FakeTimer()
    result = tune(KERNEL, BUCKET, device="cpu", timer=timer, candidates=[{"BLOCK": 16, "num_warps": 4}])
    assert [t.config for t in result.trials] == [HEURISTIC, {"BLOCK": 16, "num_warps": 4}]
    assert result.config == HEURISTIC

    from dataclasses import replace

    wrong_reference = replace(fake_kernel, reference=lambda x: 2 * x + 0.5)
    result = tune(wrong_reference, BUCKET, device="cpu", timer=timer)
    assert result.config["BLOCK"] == 8  # only the "wrong" config matches this reference


def test_out_of_space_candidates_are_refused(fake_kernel):
    with pytest.raises(ValueError, match="not in the declared space"):
        tune(KERNEL, BUCKET, device="cpu", timer=FakeTimer(), candidates=[{"BLOCK": 3, "num_warps": 1}])
    with pytest.raises(ValueError, match="declared"):
        tune(KERNEL, BUCKET, device="cpu", timer=FakeTimer(), candidates=[{"BLOCK": 2}])


def test_heuristic_is_kept_within_noise(fake_kernel):
    class AlmostEqual(FakeTimer):
        def __call__(self, fn, config):
            return 1.0 if config == HEURISTIC else 0.995

    assert tune(KERNEL, BUCKET, device="cpu", timer=AlmostEqual()).config == HEURISTIC
    assert tune(KERNEL, BUCKET, device="cpu", timer=AlmostEqual(), min_gain=0.0).config != HEURISTIC


def test_failing_reference_raises(fake_kernel):
    from dataclasses import replace

    def broken(x):
        raise RuntimeError("boom")

    with pytest.raises(TuningError, match="reference run failed"):
        tune(replace(fake_kernel, reference=broken), BUCKET, device="cpu", timer=FakeTimer())


def test_all_candidates_failing_raises(fake_kernel):
    class Broken(FakeTimer):
        def __call__(self, fn, config):
            raise RuntimeError("no timer")

    with pytest.raises(TuningError, match="every candidate failed"):
        tune(KERNEL, BUCKET, device="cpu", timer=Broken())


def test_inputs_are_random_and_seeded(fake_kernel):
    gen = torch.Generator().manual_seed(0)
    x = fake_kernel.make_inputs(BUCKET, torch.device("cpu"), gen)
    assert x.abs().min() > 0 and x.std() > 0.5
    state = torch.get_rng_state()
    tune(KERNEL, BUCKET, device="cpu", timer=FakeTimer())
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_device_comparison_agrees_with_the_tolerances(dtype, monkeypatch):
    """The tuner's chunked comparison passes and fails exactly where ``sloth_core.tolerances.compare`` does."""
    from sloth_core.autotune import tuner
    from sloth_core.tolerances import compare, tolerance

    monkeypatch.setattr(tuner, "_COMPARE_CHUNK", 37)  # several chunks
    gen = torch.Generator().manual_seed(0)
    e = torch.randn(300, generator=gen).to(dtype)
    tol = tolerance(dtype)
    cases = {
        "equal": e.clone(),
        "tiny noise": (e.float() * (1 + 0.1 * tol.rel_norm * torch.randn(300, generator=gen))).to(dtype),
        "scaled": (e.float() * (1 + 5 * tol.rel_norm)).to(dtype),
        "one element": e.clone().index_fill_(0, torch.tensor([123]), 7.0),
        "nan": e.clone().index_fill_(0, torch.tensor([5]), float("nan")),
    }
    tiny = (e.float() * tol.atol / 4).to(dtype)  # every value below atol: judged elementwise alone
    tiny_cases = {"tiny, relatively far": (tiny.float() * 1.5).to(dtype), "tiny, beyond atol": tiny + 2 * tol.atol}
    for name, a in tiny_cases.items():
        ours = tuner.compare_on_device(a, tiny, scale=1.0) is None
        assert ours == (compare(a, tiny, dtype=dtype) is None) == (name == "tiny, relatively far"), name
    e_nan = e.clone().index_fill_(0, torch.tensor([5]), float("nan"))
    for name, a in cases.items():
        for expected in (e, e_nan):
            ours = tuner.compare_on_device(a, expected, scale=1.0) is None
            theirs = compare(a, expected, dtype=dtype) is None
            assert ours == theirs, (name, ours, theirs)
    assert tuner.compare_on_device(cases["equal"], e) is None
    assert tuner.compare_on_device(cases["one element"], e) is not None
    assert tuner.compare_on_device(e[:10], e) is not None  # shapes
