"""Tuning on first use within its budget: never above the process's peak memory, never past its seconds."""
from __future__ import annotations

import json

import pytest
import torch

from sloth_core import autotune
from sloth_core.autotune import budget as budget_mod
from sloth_core.autotune import config_for, runtime
from sloth_core.autotune.cache import TuningCache
from sloth_core.autotune.space import BUILTIN_KERNEL_MODULES, get_space
from sloth_core.autotune.tuner import scratch_bytes

from .conftest import FAKE_ENV, FASTEST_CORRECT, HEURISTIC, KERNEL, WORKSPACE_PER_ELEMENT

KEY = dict(n=200, dtype=torch.float32)  # bucket n=256
NEED = WORKSPACE_PER_ELEMENT * 256 + scratch_bytes(torch.device("cpu"))


def test_a_key_that_does_not_fit_under_the_peak_waits_for_room(fake_gpu, monkeypatch, capsys):
    room = {"bytes": NEED - 1}
    monkeypatch.setattr(runtime, "headroom", lambda: room["bytes"])
    for _ in range(3):  # deferred: the heuristic serves, nothing is timed, nothing memoized
        assert config_for(KERNEL, **KEY) == HEURISTIC
    assert fake_gpu.timed == [] and capsys.readouterr().err == ""
    assert runtime.budget().deferred == {"autotune_test_kernel (n=256, fp32)": 3}
    room["bytes"] = NEED  # the next step's launch: the last step's activations are gone
    assert config_for(KERNEL, **KEY) == FASTEST_CORRECT
    assert fake_gpu.timed


def test_a_key_that_never_fits_keeps_the_heuristic_and_says_so(fake_gpu, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "headroom", lambda: 1024)
    for _ in range(budget_mod.MAX_DEFERRALS + 5):
        assert config_for(KERNEL, **KEY) == HEURISTIC
    err = capsys.readouterr().err
    assert err.count("not tuning autotune_test_kernel (n=256, fp32): it needs") == 1
    assert "`sloth-core tune` tunes it ahead" in err
    assert runtime.budget().deferred["autotune_test_kernel (n=256, fp32)"] == budget_mod.MAX_DEFERRALS
    assert fake_gpu.timed == []


def test_no_budget_no_tuning(fake_gpu, monkeypatch, capsys):
    monkeypatch.setenv("SLOTH_CORE_TUNE_BUDGET_S", "0")
    autotune.reset()
    assert config_for(KERNEL, **KEY) == HEURISTIC
    assert fake_gpu.timed == []
    assert "the tuning budget (0 s, $SLOTH_CORE_TUNE_BUDGET_S) is spent" in capsys.readouterr().err


def test_a_bad_budget_warns_and_uses_the_default(fake_gpu, monkeypatch):
    monkeypatch.setenv("SLOTH_CORE_TUNE_BUDGET_S", "soon")
    autotune.reset()
    with pytest.warns(UserWarning, match="SLOTH_CORE_TUNE_BUDGET_S='soon' is not a number"):
        assert config_for(KERNEL, **KEY) == FASTEST_CORRECT
    assert runtime.budget().seconds == budget_mod.DEFAULT_BUDGET_S


def test_tuning_cut_by_the_budget_is_used_but_not_cached(fake_gpu, monkeypatch, capsys):
    clock = {"now": 0.0}
    monkeypatch.setattr(budget_mod.time, "perf_counter", lambda: clock["now"])
    real_timer = fake_gpu.__call__

    def slow_timer(fn, config):  # every timing takes 40 "seconds" of the 60
        clock["now"] += 40.0
        return real_timer(fn, config)

    runtime.set_timer(slow_timer)
    from sloth_core.autotune import tuner
    monkeypatch.setattr(tuner.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: clock["now"])
    config = config_for(KERNEL, **KEY)
    # the heuristic's config is timed first (0 -> 40 s), then one more candidate starts (40 -> 80 s), the best of
    # the two wins; the 7 others are never started
    assert config == FASTEST_CORRECT and fake_gpu.timed == [HEURISTIC, FASTEST_CORRECT]
    assert "(80.0 s; 7 candidates untried (budget spent), not cached)" in capsys.readouterr().err
    assert not TuningCache().path.exists() or KERNEL not in json.dumps(json.loads(TuningCache().path.read_text()))
    assert runtime.budget().left() == 0.0
    assert config_for(KERNEL, n=1000, dtype=torch.float32) == HEURISTIC  # another key: budget spent




def test_every_builtin_kernel_declares_its_tuning_workspace():
    import importlib

    for name in BUILTIN_KERNEL_MODULES:
        importlib.import_module(f"sloth_core.kernels.{name}")
        spec = get_space(name)
        assert spec is not None and spec.workspace is not None, name
        bucket = spec.bucket(_example_key(name))
        assert spec.workspace(bucket) > 0


def _example_key(name: str) -> dict:
    return {
        "rms_norm": dict(n_rows=4096, n_cols=4096, dtype=torch.bfloat16, dw_reduction=False),
        "gated_activation": dict(n=4096 * 14336, dtype=torch.bfloat16),
        "rope": dict(n_tokens=4096, n_heads=32, half=64, dtype=torch.bfloat16),
        "cross_entropy": dict(n_rows=4096, n_cols=128256, dtype=torch.bfloat16),
        "fused_linear_cross_entropy": dict(n_tokens=4096, vocab=128256, hidden=4096, dtype=torch.bfloat16),
    }[name]


@pytest.mark.cuda
@pytest.mark.parametrize("name", BUILTIN_KERNEL_MODULES)
def test_declared_workspace_bounds_what_tuning_allocates(name):
    """On the GPU: a real tuning of an 8B-shaped key allocates no more than its spec declares (plus the tuner's
    scratch), so the memory rule of tuning on first use holds."""
    import importlib

    from sloth_core.autotune.tuner import tune

    importlib.import_module(f"sloth_core.kernels.{name}")
    spec = get_space(name)
    bucket = spec.bucket(_example_key(name))
    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    tune(name, bucket, device=device)
    used = torch.cuda.max_memory_allocated(device) - base
    declared = spec.workspace(bucket) + scratch_bytes(device)
    print(f"{name}: tuning allocated {used / 2**20:.0f} MiB, declared {declared / 2**20:.0f} MiB")
    assert used <= declared, f"{name} ({bucket}): tuning allocated {used} bytes, declared {declared}"


def test_a_shipped_table_serves_its_gpu_without_tuning(fake_gpu, monkeypatch, tmp_path):
    from sloth_core.autotune import shipped
    from sloth_core.autotune.cache import Environment

    table = TuningCache(tmp_path / "shipped" / "fake.json")
    other_triton = Environment(FAKE_ENV.gpu, "0.0.1", "0.0.1")
    table.store(other_triton, KERNEL, "n=256,dtype=fp32", {"config": {"BLOCK": 16, "num_warps": 2}, "ms": 1.0})
    table.store(FAKE_ENV, KERNEL, "n=256,dtype=fp32", {"config": {"BLOCK": 2, "num_warps": 2}, "ms": 1.0})
    table.store(Environment("Another GPU", FAKE_ENV.triton, "0.1.0"), KERNEL, "n=512,dtype=fp32",
                {"config": {"BLOCK": 2, "num_warps": 2}, "ms": 1.0})
    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path / "shipped")
    assert config_for(KERNEL, **KEY) == {"BLOCK": 2, "num_warps": 2}  # this GPU, this Triton: no tuning
    assert fake_gpu.timed == []
    assert config_for(KERNEL, n=512, dtype=torch.float32) == FASTEST_CORRECT  # another GPU's entry: tuned here
    assert fake_gpu.timed


def test_the_shipped_tables_hold_valid_configs():
    """Every entry of the tables in the package is within its kernel's space and a candidate of its bucket."""
    import importlib

    from sloth_core.autotune import shipped
    from sloth_core.autotune.space import parse_key

    for doc in shipped._tables(shipped.SHIPPED_DIR):
        for env in doc["environments"].values():
            for kernel, entries in env["kernels"].items():
                importlib.import_module(f"sloth_core.kernels.{kernel}")
                spec = get_space(kernel)
                for key, entry in entries.items():
                    assert spec.accepts(entry["config"], parse_key(key)) is None, (env["gpu"], kernel, key)
