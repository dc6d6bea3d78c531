"""``config_for`` with tuning: cached winners, tuning on first use, modes, the interpreter, validation of
cached configs against the declared space."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from sloth_core import autotune
from sloth_core.autotune import config_for, override, runtime
from sloth_core.autotune.cache import TuningCache, TuningCacheWarning

from .conftest import FAKE_ENV, FASTEST_CORRECT, HEURISTIC, KERNEL

KEY = dict(n=200, dtype=torch.float32)  # bucket n=256
KEY_STR = "n=256,dtype=fp32"


def seed_cache(config: dict, ms: float = 1.0) -> None:
    TuningCache().store(FAKE_ENV, KERNEL, KEY_STR, {"config": config, "ms": ms})
    autotune.reset()


def test_interpreter_uses_the_heuristic_and_never_reads_the_cache(fake_gpu, monkeypatch):
    seed_cache({"BLOCK": 2, "num_warps": 2})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(TuningCache, "read", lambda self: pytest.fail("the cache was read"))
    assert config_for(KERNEL, **KEY) == HEURISTIC
    assert fake_gpu.timed == []


def test_tunes_on_first_use_then_reuses(fake_gpu, capsys):
    assert config_for(KERNEL, **KEY) == FASTEST_CORRECT
    notice, line = capsys.readouterr().err.splitlines()
    assert notice.startswith("sloth_core: tuning kernels for this GPU on first use (at most 60 s")
    assert line.startswith(f"sloth_core: tuning {KERNEL} for (n=256, fp32) ...")
    timed = len(fake_gpu.timed)
    assert timed > 0
    assert config_for(KERNEL, **KEY) == FASTEST_CORRECT  # memoized: no second tuning
    assert config_for(KERNEL, n=256, dtype=torch.float32) == FASTEST_CORRECT  # same bucket: from the cache
    assert len(fake_gpu.timed) == timed
    doc = json.loads(TuningCache().path.read_text())
    assert doc["environments"][FAKE_ENV.key]["kernels"][KERNEL][KEY_STR]["config"] == FASTEST_CORRECT
    autotune.reset()  # as a new process: read from the file, no tuning
    assert config_for(KERNEL, **KEY) == FASTEST_CORRECT
    assert len(fake_gpu.timed) == timed
    assert capsys.readouterr().err == ""


def test_small_launches_keep_the_heuristic(fake_gpu):
    assert config_for(KERNEL, n=8, dtype=torch.float32) == HEURISTIC
    assert fake_gpu.timed == []


@pytest.mark.parametrize("mode", ["cache", "0"])
def test_modes_without_tuning(fake_gpu, monkeypatch, mode):
    monkeypatch.setenv("SLOTH_CORE_AUTOTUNE", mode)
    assert config_for(KERNEL, **KEY) == HEURISTIC
    seed_cache({"BLOCK": 2, "num_warps": 2})
    assert config_for(KERNEL, **KEY) == (HEURISTIC if mode == "0" else {"BLOCK": 2, "num_warps": 2})
    assert fake_gpu.timed == []


def test_set_tuning_overrides_the_environment(fake_gpu, monkeypatch):
    monkeypatch.setenv("SLOTH_CORE_AUTOTUNE", "1")
    autotune.set_tuning(False)
    assert autotune.tuning_mode() == "off"
    assert config_for(KERNEL, **KEY) == HEURISTIC
    autotune.set_tuning(True)
    assert config_for(KERNEL, **KEY) == FASTEST_CORRECT
    with pytest.raises(ValueError):
        autotune.set_tuning("sometimes")


@pytest.mark.parametrize("bad", [
    {"BLOCK": 3, "num_warps": 1},                       # a value outside the space
    {"BLOCK": 2, "num_warps": 1, "EXTRA": 1},           # an unknown parameter
    {"BLOCK": 2},                                       # a missing one
    {"BLOCK": 2.0, "num_warps": 1},                     # the wrong type
    {"BLOCK": 1, "num_warps": 4},                       # in the space, but not a candidate of this key
])
def test_cached_config_outside_the_space_is_ignored(fake_gpu, monkeypatch, bad):
    monkeypatch.setenv("SLOTH_CORE_AUTOTUNE", "cache")
    seed_cache(bad)
    with pytest.warns(TuningCacheWarning, match="ignoring the cached"):
        assert config_for(KERNEL, **KEY) == HEURISTIC


def test_override_beats_the_cache(fake_gpu):
    seed_cache({"BLOCK": 2, "num_warps": 2})
    with override(KERNEL, num_warps=4):
        assert config_for(KERNEL, **KEY) == {"BLOCK": 1, "num_warps": 4}
        with override(KERNEL, BLOCK=16):  # nested overrides compose
            assert config_for(KERNEL, **KEY) == {"BLOCK": 16, "num_warps": 4}
    assert config_for(KERNEL, **KEY) == {"BLOCK": 2, "num_warps": 2}


def test_failed_tuning_falls_back_to_the_heuristic(fake_gpu, capsys):
    def broken(fn, config):
        raise RuntimeError("no timer")

    runtime.set_timer(broken)
    assert config_for(KERNEL, **KEY) == HEURISTIC
    assert "failed" in capsys.readouterr().err
    assert config_for(KERNEL, **KEY) == HEURISTIC  # memoized: not retried
    assert capsys.readouterr().err == ""
    assert not TuningCache().path.exists()


def test_unwritable_cache_warns_and_keeps_the_winner(fake_gpu, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SLOTH_CORE_CACHE_DIR", str(blocker / "sub"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert config_for(KERNEL, **KEY) == FASTEST_CORRECT
    assert any("cannot write the tuning cache" in str(w.message) for w in caught)


def test_no_tuning_while_tuning(fake_gpu, monkeypatch):
    """A launch inside a tuning run (e.g. the cross-entropy inside the fused loss) never starts another
    tuning, and its answer is not memoized."""
    from sloth_core.autotune import tuner

    monkeypatch.setattr(tuner, "_ACTIVE", 1)
    assert config_for(KERNEL, **KEY) == HEURISTIC
    assert fake_gpu.timed == []
    monkeypatch.setattr(tuner, "_ACTIVE", 0)
    assert config_for(KERNEL, **KEY) == FASTEST_CORRECT


def test_kernels_without_a_space_use_the_heuristic(fake_gpu):
    autotune.register_heuristic("autotune_untuned")(lambda **key: {"BLOCK": 7})
    try:
        assert config_for("autotune_untuned", n=1) == {"BLOCK": 7}
    finally:
        autotune._HEURISTICS.pop("autotune_untuned")


def test_without_cuda_the_heuristic_serves(fake_gpu, monkeypatch):
    monkeypatch.setattr(runtime, "cuda_ready", lambda: False)
    seed_cache({"BLOCK": 2, "num_warps": 2})
    assert config_for(KERNEL, **KEY) == HEURISTIC


def test_returned_configs_are_copies(fake_gpu):
    cfg = config_for(KERNEL, **KEY)
    cfg["BLOCK"] = 99
    assert config_for(KERNEL, **KEY) == FASTEST_CORRECT
