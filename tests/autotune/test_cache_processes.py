"""The tuning cache under other processes: a writer killed mid-write leaves the previous file, a corrupt file is
reported once, and the processes of one host (ranks of a job) tune a key once: the others wait for its winner, or
use the heuristic after a timeout. The child processes load ``cache.py`` alone (stdlib only: no torch import)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from sloth_core import autotune
from sloth_core.autotune import cache as cache_module
from sloth_core.autotune import config_for, runtime
from sloth_core.autotune.cache import Environment, TuningCache, TuningCacheWarning

from .conftest import FAKE_ENV, FASTEST_CORRECT, HEURISTIC, KERNEL

ENV = Environment("NVIDIA H200", "3.6.0", "0.1.0")
KEY = dict(n=200, dtype=torch.float32)  # bucket n=256
KEY_STR = "n=256,dtype=fp32"

_CHILD_PRELUDE = f"""
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("cache", {cache_module.__file__!r})
cache = sys.modules["cache"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cache)
"""


def _entry(ms: float, **config) -> dict:
    return {"config": config or {"BLOCK": 2}, "ms": ms}


def _child(body: str, **values) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _CHILD_PRELUDE + body.format(**values)])


def _wait_for(path: Path, child: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not path.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert path.exists(), f"the child never {what} (exit code {child.poll()})"


def _kill(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)


_KILLED_WRITER = """
env = cache.Environment("NVIDIA H200", "3.6.0", "0.1.0")
c = cache.TuningCache({path!r})
c.store(env, "rope", "first", {{"config": {{"BLOCK": 1}}, "ms": 1.0}})
def stalled_fsync(fd):  # the new content is in the temporary file, not yet renamed: the parent kills us now
    open({marker!r}, "w").close()
    time.sleep(60)
os.fsync = stalled_fsync
c.store(env, "rope", "second", {{"config": {{"BLOCK": 2}}, "ms": 1.0}})
"""


def test_a_writer_killed_mid_write_leaves_the_previous_file(tmp_path):
    path, marker = tmp_path / "autotune.json", tmp_path / "marker"
    child = _child(_KILLED_WRITER, path=str(path), marker=str(marker))
    try:
        _wait_for(marker, child, "reached its write")
    finally:
        _kill(child)
    assert child.returncode == -signal.SIGKILL
    doc = json.loads(path.read_text())  # complete, valid JSON: the previous file
    assert list(doc["environments"][ENV.key]["kernels"]["rope"]) == ["first"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        assert TuningCache(path).lookup(ENV.key, "rope", "first") == {"config": {"BLOCK": 1}, "ms": 1.0}
    # the temporary file may be left, hidden; nothing else sits beside the cache
    visible = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".autotune.json."))
    assert visible == ["autotune.json", "autotune.json.lock", "marker"]
    TuningCache(path).store(ENV, "rope", "third", _entry(1.0))  # and the next write works
    assert sorted(json.loads(path.read_text())["environments"][ENV.key]["kernels"]["rope"]) == ["first", "third"]


def test_a_corrupt_file_is_reported_once(tmp_path):
    path = tmp_path / "autotune.json"
    path.write_text('{"format": "sloth_core.autotune", "sch')  # a half-written file, as an old writer left it
    cache = TuningCache(path)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert cache.lookup(ENV.key, "rope", "k") is None
        cache.read()
        cache.store(ENV, "rope", "k", _entry(1.0))  # re-reads the corrupt file under the lock: no second warning
    reported = [str(w.message) for w in seen if issubclass(w.category, TuningCacheWarning)]
    assert len(reported) == 1 and reported[0].startswith(f"sloth_core: ignoring corrupt tuning cache {path} "
                                                         f"(JSONDecodeError: Unterminated string"), reported
    assert TuningCache(path).lookup(ENV.key, "rope", "k") == _entry(1.0)  # replaced by the write


_SLOT_HOLDER = """
c = cache.TuningCache({path!r})
with c.tuning_slot({env_key!r}, {kernel!r}, {key!r}, timeout_s=5) as held:
    assert held
    open({marker!r}, "w").close()
    time.sleep({hold_s})
    if {store}:
        c.store(cache.Environment(*{env!r}), {kernel!r}, {key!r}, {{"config": {{"BLOCK": 16, "num_warps": 2}},
                                                               "ms": 0.5}})
"""


def _hold_slot(path, marker, env, kernel, key, hold_s, store=False):
    child = _child(_SLOT_HOLDER, path=str(path), marker=str(marker), env_key=env.key,
                   env=(env.gpu, env.triton, env.sloth_core), kernel=kernel, key=key, hold_s=hold_s, store=store)
    _wait_for(marker, child, "took the slot")
    return child


def test_a_tuning_slot_is_one_process_s_at_a_time_and_freed_when_its_holder_dies(tmp_path):
    path = tmp_path / "autotune.json"
    child = _hold_slot(path, tmp_path / "marker", ENV, "rope", "k", hold_s=60)
    try:
        cache = TuningCache(path)
        with cache.tuning_slot(ENV.key, "rope", "k", timeout_s=0.2) as held:
            assert not held
        with cache.tuning_slot(ENV.key, "rope", "other key", timeout_s=0.2) as held:
            assert held  # another key is free
    finally:
        _kill(child)  # SIGKILL: the OS releases its lock
    with TuningCache(path).tuning_slot(ENV.key, "rope", "k", timeout_s=10) as held:
        assert held


def test_a_rank_waits_for_the_winner_another_rank_is_tuning(fake_gpu, tmp_path):
    """The other process holds the key's slot, then stores the winner (BLOCK=16, as no tuning here would pick):
    ``config_for`` waits for it and uses it without tuning."""
    child = _hold_slot(TuningCache().path, tmp_path / "marker", FAKE_ENV, KERNEL, KEY_STR, hold_s=0.5, store=True)
    try:
        assert config_for(KERNEL, **KEY) == {"BLOCK": 16, "num_warps": 2}
    finally:
        _kill(child)
    assert fake_gpu.timed == []


def test_a_rank_that_waited_too_long_uses_the_heuristic(fake_gpu, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "TUNE_WAIT_S", 0.3)
    child = _hold_slot(TuningCache().path, tmp_path / "marker", FAKE_ENV, KERNEL, KEY_STR, hold_s=60)
    try:
        with pytest.warns(TuningCacheWarning, match=f"another process has been tuning {KERNEL} .* heuristic"):
            assert config_for(KERNEL, **KEY) == HEURISTIC
    finally:
        _kill(child)
    assert fake_gpu.timed == []
    autotune.reset()  # a later process finds the slot free and tunes
    assert config_for(KERNEL, **KEY) == FASTEST_CORRECT
