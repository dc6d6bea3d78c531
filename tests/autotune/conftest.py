"""A fake, pure-PyTorch "kernel" with a declared tuning space, for testing the tuner and ``config_for``.

Its launch config picks what ``run`` does: ``BLOCK=4`` raises (as a config that fails to compile would),
``BLOCK=8`` computes a wrong answer, ``BLOCK=16`` forgets the last element (caught by NaN-poisoned outputs);
the others compute ``2 * x``. :class:`FakeTimer` times configs from a table in which the broken ones are the
fastest.
"""
from __future__ import annotations

import pytest
import torch

from sloth_core import autotune
from sloth_core.autotune import config_for, register_heuristic, register_space, runtime
from sloth_core.autotune.cache import Environment
from sloth_core.autotune.space import dtype_from_name, dtype_name, pow2_at_least, unregister_space
from sloth_core.kernels._runtime import new_empty

KERNEL = "autotune_test_kernel"
HEURISTIC = {"BLOCK": 1, "num_warps": 1}
FASTEST_CORRECT = {"BLOCK": 2, "num_warps": 1}
FAKE_ENV = Environment("Fake GPU 80GB", "3.6.0", "0.1.0")
WORKSPACE_PER_ELEMENT = 1000  # the fake kernel's declared tuning workspace, bytes per element of its bucket


def fake_run(x: torch.Tensor) -> torch.Tensor:
    cfg = config_for(KERNEL, n=x.numel(), dtype=x.dtype)
    if cfg["BLOCK"] == 4:
        raise RuntimeError("out of resources: shared memory")
    out = new_empty(x.shape, x.dtype, x.device)
    if cfg["BLOCK"] == 8:
        out.copy_(2 * x + 0.5)
    elif cfg["BLOCK"] == 16:
        out[:-1] = 2 * x[:-1]
    else:
        out.copy_(2 * x)
    return out


class FakeTimer:
    """Milliseconds from the config: broken configs are the fastest; records what it timed."""

    BLOCK_MS = {1: 5.0, 2: 2.0, 4: 0.5, 8: 0.1, 16: 0.2}

    def __init__(self):
        self.timed: list[dict] = []

    def __call__(self, fn, config):
        fn()
        self.timed.append(dict(config))
        return self.BLOCK_MS[config["BLOCK"]] + 0.1 * config["num_warps"]


def _register():
    register_heuristic(KERNEL)(lambda n, dtype: dict(HEURISTIC))
    return register_space(
        KERNEL,
        params={"BLOCK": (1, 2, 4, 8, 16), "num_warps": (1, 2, 4)},
        key=lambda n, dtype: {"n": pow2_at_least(n), "dtype": dtype_name(dtype)},
        example=lambda b: {"n": b["n"], "dtype": dtype_from_name(b["dtype"])},
        candidates=lambda b: [{"BLOCK": bl, "num_warps": w} for bl in (2, 4, 8, 16) for w in (1, 2)],
        make_inputs=lambda b, device, gen: torch.randn(b["n"], generator=gen, device=device).to(
            dtype_from_name(b["dtype"])),
        run=fake_run,
        worth_tuning=lambda b: b["n"] >= 64,
        workspace=lambda b: WORKSPACE_PER_ELEMENT * b["n"],
    )


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test here uses a cache of its own (never the user's) and starts from a clean resolution memo."""
    monkeypatch.setenv("SLOTH_CORE_CACHE_DIR", str(tmp_path / "isolated-cache"))
    autotune.reset()
    yield
    autotune.reset()


@pytest.fixture
def fake_kernel():
    spec = _register()
    try:
        yield spec
    finally:
        autotune._HEURISTICS.pop(KERNEL, None)
        unregister_space(KERNEL)


@pytest.fixture
def fake_gpu(fake_kernel, monkeypatch, tmp_path):
    """``config_for`` as on a CUDA machine (no interpreter), with the fake kernel, a fake GPU environment, a
    temporary cache directory and the fake timer. Yields the timer."""
    timer = FakeTimer()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("SLOTH_CORE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SLOTH_CORE_AUTOTUNE", raising=False)
    monkeypatch.setattr(runtime, "cuda_ready", lambda: True)
    monkeypatch.setattr(runtime, "current_environment", lambda: FAKE_ENV)
    monkeypatch.setattr(runtime, "tuning_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(runtime, "headroom", lambda: 1 << 40)  # tests of the memory rule set their own
    monkeypatch.delenv("SLOTH_CORE_TUNE_BUDGET_S", raising=False)
    runtime.set_timer(timer)
    autotune.set_tuning(None)
    autotune.reset()
    try:
        yield timer
    finally:
        runtime.set_timer(None)
        autotune.set_tuning(None)
        autotune.reset()
