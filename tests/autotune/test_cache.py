"""The JSON tuning cache: round trip, concurrent writers, rejection of corrupt / foreign / invalid content,
environment keys."""
from __future__ import annotations

import json
import multiprocessing

import pytest

from sloth_core.autotune.cache import (
    FORMAT,
    SCHEMA_VERSION,
    Environment,
    TuningCache,
    TuningCacheWarning,
    cache_dir,
    cache_path,
)

ENV = Environment("NVIDIA H200", "3.6.0", "0.1.0")


def entry(ms: float = 0.5, **config) -> dict:
    return {"config": config or {"BLOCK": 1024, "num_warps": 4}, "ms": ms, "heuristic_ms": 0.6, "tuning_s": 1.5}


def test_round_trip(tmp_path):
    path = tmp_path / "autotune.json"
    TuningCache(path).store(ENV, "rms_norm", "n_cols=4096,n_rows=8192,dtype=bf16", entry(0.25, BLOCK_M=2))
    TuningCache(path).store(ENV, "rope", "n_tokens=4096", entry(0.1))
    fresh = TuningCache(path)
    assert fresh.lookup(ENV.key, "rms_norm", "n_cols=4096,n_rows=8192,dtype=bf16") == entry(0.25, BLOCK_M=2)
    assert fresh.lookup(ENV.key, "rope", "n_tokens=4096") == entry(0.1)
    assert fresh.lookup(ENV.key, "rope", "n_tokens=8192") is None
    doc = json.loads(path.read_text())
    assert doc["format"] == FORMAT and doc["schema"] == SCHEMA_VERSION
    assert sorted(e["kernel"] for e in fresh.entries()) == ["rms_norm", "rope"]
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed over the cache


def test_keys_differ_by_gpu_and_versions(tmp_path):
    cache = TuningCache(tmp_path / "autotune.json")
    others = [Environment("NVIDIA A10", "3.6.0", "0.1.0"), Environment("NVIDIA H200", "3.7.0", "0.1.0"),
              Environment("NVIDIA H200", "3.6.0", "0.2.0")]
    assert len({ENV.key, *(e.key for e in others)}) == 4
    cache.store(ENV, "rope", "k", entry(1.0))
    for i, other in enumerate(others):
        assert cache.lookup(other.key, "rope", "k") is None
        cache.store(other, "rope", "k", entry(2.0 + i))
    fresh = TuningCache(cache.path)
    assert fresh.lookup(ENV.key, "rope", "k")["ms"] == 1.0
    assert [fresh.lookup(o.key, "rope", "k")["ms"] for o in others] == [2.0, 3.0, 4.0]


def test_current_environment_follows_gpu_and_versions(monkeypatch):
    """The environment describes the GPU name, Triton's version and sloth_core's version."""
    import torch
    import triton

    import sloth_core
    import sloth_core.version
    from sloth_core.autotune import runtime

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    base = runtime.current_environment()
    assert base.gpu == "NVIDIA H200" and base.triton == triton.__version__
    assert base.sloth_core == sloth_core.__version__
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10")
    keys = {base.key, runtime.current_environment().key}
    monkeypatch.setattr(triton, "__version__", "9.9.9")
    keys.add(runtime.current_environment().key)
    monkeypatch.setattr(sloth_core.version, "__version__", "9.9.9")
    keys.add(runtime.current_environment().key)
    assert len(keys) == 4


def _writer(path: str, worker: int, count: int) -> None:
    cache = TuningCache(path)
    for i in range(count):
        cache.store(ENV, f"kernel{worker}", f"key{i}", entry(1.0 + i, BLOCK=worker))


def test_concurrent_writers_keep_every_entry(tmp_path):
    path = tmp_path / "autotune.json"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), w, 20)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    doc = json.loads(path.read_text())  # valid JSON
    kernels = doc["environments"][ENV.key]["kernels"]
    assert sorted(kernels) == [f"kernel{w}" for w in range(4)]
    for w in range(4):
        assert sorted(kernels[f"kernel{w}"]) == sorted(f"key{i}" for i in range(20))
        assert all(e["config"] == {"BLOCK": w} for e in kernels[f"kernel{w}"].values())


@pytest.mark.parametrize("content", ["{not json", "", "[1, 2", "\x00\x01garbage"])
def test_corrupt_file_is_ignored_with_a_warning(tmp_path, content):
    path = tmp_path / "autotune.json"
    path.write_text(content)
    with pytest.warns(TuningCacheWarning, match="corrupt"):
        assert TuningCache(path).lookup(ENV.key, "rope", "k") is None
    with pytest.warns(TuningCacheWarning):  # the next write replaces it with a valid file
        TuningCache(path).store(ENV, "rope", "k", entry())
    assert TuningCache(path).lookup(ENV.key, "rope", "k") == entry()


@pytest.mark.parametrize("doc, match", [
    ({"format": FORMAT, "schema": SCHEMA_VERSION + 1, "environments": {}}, "schema"),
    ({"format": FORMAT, "schema": 0, "environments": {}}, "schema"),
    ({"format": "something else", "schema": SCHEMA_VERSION}, "not a sloth_core"),
    ([1, 2, 3], "not a sloth_core"),
    ({"py/object": "os.system", "args": ["echo pwned"]}, "not a sloth_core"),
])
def test_foreign_or_stale_file_is_ignored(tmp_path, doc, match):
    path = tmp_path / "autotune.json"
    valid_entry = {ENV.key: {"gpu": ENV.gpu, "triton": ENV.triton, "sloth_core": ENV.sloth_core,
                             "kernels": {"rope": {"k": entry()}}}}
    if isinstance(doc, dict):
        doc = {**doc, "environments": valid_entry}
    path.write_text(json.dumps(doc))
    with pytest.warns(TuningCacheWarning, match=match):
        assert TuningCache(path).lookup(ENV.key, "rope", "k") is None


@pytest.mark.parametrize("bad", [
    {"config": {"BLOCK": [1024]}, "ms": 1.0},                  # nested value
    {"config": {"BLOCK": {"__reduce__": "os.system"}}, "ms": 1.0},
    {"config": {"BLOCK": None}, "ms": 1.0},
    {"config": {}, "ms": 1.0},
    {"config": {"BLOCK": 1024}, "ms": -1.0},
    {"config": {"BLOCK": 1024}, "ms": "fast"},
    {"config": {"BLOCK": 1024}, "ms": 1.0, "extra": [1]},
    "BLOCK=1024",
])
def test_invalid_entries_are_dropped_with_a_warning(tmp_path, bad):
    path = tmp_path / "autotune.json"
    kernels = {"rope": {"bad": bad, "good": entry()}}
    path.write_text(json.dumps({"format": FORMAT, "schema": SCHEMA_VERSION, "environments": {
        ENV.key: {"gpu": ENV.gpu, "triton": ENV.triton, "sloth_core": ENV.sloth_core, "kernels": kernels}}}))
    with pytest.warns(TuningCacheWarning, match="invalid"):
        cache = TuningCache(path)
        assert cache.lookup(ENV.key, "rope", "bad") is None
    assert cache.lookup(ENV.key, "rope", "good") == entry()


def test_mislabelled_environment_is_dropped(tmp_path):
    """An environment whose fields do not match its key (e.g. edited by hand) is not trusted."""
    path = tmp_path / "autotune.json"
    path.write_text(json.dumps({"format": FORMAT, "schema": SCHEMA_VERSION, "environments": {
        ENV.key: {"gpu": "NVIDIA A10", "triton": ENV.triton, "sloth_core": ENV.sloth_core,
                  "kernels": {"rope": {"k": entry()}}}}}))
    with pytest.warns(TuningCacheWarning, match="invalid"):
        assert TuningCache(path).lookup(ENV.key, "rope", "k") is None


def test_store_refuses_invalid_entries(tmp_path):
    cache = TuningCache(tmp_path / "autotune.json")
    with pytest.raises(ValueError, match="invalid tuning entry"):
        cache.store(ENV, "rope", "k", {"config": {"BLOCK": object()}, "ms": 1.0})
    assert not cache.path.exists()


def test_clear(tmp_path):
    cache = TuningCache(tmp_path / "autotune.json")
    cache.store(ENV, "rope", "a", entry())
    cache.store(ENV, "rope", "b", entry())
    assert cache.clear() == 2
    assert not cache.path.exists()
    assert cache.lookup(ENV.key, "rope", "a") is None
    assert TuningCache(cache.path).clear() == 0


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("SLOTH_CORE_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_path() == tmp_path / "mine" / "autotune.json"
    monkeypatch.delenv("SLOTH_CORE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "sloth_core"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "sloth_core"


def test_unwritable_directory_keeps_the_entry_in_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = TuningCache(blocker / "autotune.json")
    with pytest.raises(OSError):
        cache.store(ENV, "rope", "k", entry())
    assert cache.lookup(ENV.key, "rope", "k") == entry()
