"""The persistent tuning cache: one JSON file of tuned launch configs, shared by every process of a user.

Location: ``$SLOTH_CORE_CACHE_DIR/autotune.json``, else the user cache directory (``$XDG_CACHE_HOME/sloth_core``
or ``~/.cache/sloth_core``; ``%LOCALAPPDATA%\\sloth_core`` on Windows). Layout::

    {"format": "sloth_core.autotune", "schema": 1,
     "environments": {
       "NVIDIA H200 | triton 3.6.0 | sloth_core 0.1.0": {
         "gpu": "NVIDIA H200", "triton": "3.6.0", "sloth_core": "0.1.0",
         "kernels": {"rms_norm": {"n_cols=4096,n_rows=8192,dw=0,dtype=bf16":
                                  {"config": {"BLOCK_M": 2, ...}, "ms": 0.0123, "heuristic_ms": 0.0151,
                                   "tuning_s": 1.9, "tuned_at": "2026-11-30T10:00:00+00:00"}}}}}}

A process only ever uses the entries of its own environment (GPU name, Triton version, sloth_core version):
a new Triton or sloth_core release starts afresh, older entries stay in the file until ``--clear``.

Safety: the file is JSON, never pickle, and is never executed. A file that does not parse, is not this
format, or has another schema version is ignored with a :class:`TuningCacheWarning` (and replaced by the
next write); entries whose values are not plain ints / floats / strings are dropped with a warning; a config
is validated against its kernel's declared space before use (see :mod:`sloth_core.autotune.space`).

Concurrency: every write is a read-merge-write under an exclusive ``fcntl.flock`` on ``autotune.json.lock``,
and lands atomically (a temporary file in the same directory, fsynced, then ``os.replace``): concurrent
writers never lose each other's entries, readers never see a partial file, and a process killed mid-write
leaves the previous file (plus, at worst, a hidden ``.autotune.json.*.tmp``). A corrupt file is reported once
per process and path, and replaced by the next write. Tuning one key is claimed with :meth:`TuningCache.tuning_slot`
(a ``flock`` per key under ``autotune.json.locks/``, released by the OS if its holder dies): the other processes
of the host (ranks of one job) wait for the winner instead of tuning the same key at once, and after a timeout use
the heuristic.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: atomic replace only
    fcntl = None

FORMAT = "sloth_core.autotune"
SCHEMA_VERSION = 1
FILE_NAME = "autotune.json"
DIR_ENV_VAR = "SLOTH_CORE_CACHE_DIR"


class TuningCacheWarning(UserWarning):
    """The tuning cache file (or part of it) was ignored."""


@dataclass(frozen=True)
class Environment:
    """What a tuned config is valid for."""

    gpu: str
    triton: str
    sloth_core: str

    @property
    def key(self) -> str:
        return f"{self.gpu} | triton {self.triton} | sloth_core {self.sloth_core}"


def cache_dir() -> Path:
    """``$SLOTH_CORE_CACHE_DIR``, else the platform's user cache directory + ``sloth_core``."""
    explicit = os.environ.get(DIR_ENV_VAR)
    if explicit:
        return Path(explicit).expanduser()
    if os.name == "nt":  # pragma: no cover
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "sloth_core"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "sloth_core"


def cache_path() -> Path:
    return cache_dir() / FILE_NAME


def empty_document() -> dict:
    return {"format": FORMAT, "schema": SCHEMA_VERSION, "environments": {}}


# ---------------------------------------------------------------------------------------------- validation


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, str)):
        return True
    return isinstance(value, float) and math.isfinite(value)


def entry_problem(entry: Any) -> str | None:
    """None when ``entry`` is a valid cache entry: ``config`` a flat dict of plain values, ``ms`` a positive
    finite number, every other field a plain scalar."""
    if not isinstance(entry, dict):
        return "entry is not an object"
    config = entry.get("config")
    if not isinstance(config, dict) or not config:
        return "config is not a non-empty object"
    for name, value in config.items():
        if not isinstance(name, str) or value is None or not _plain(value):
            return f"config value {name!r}={value!r} is not a plain int / float / string"
    ms = entry.get("ms")
    if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not (math.isfinite(ms) and ms > 0):
        return f"ms={ms!r} is not a positive number"
    for name, value in entry.items():
        if name != "config" and (not isinstance(name, str) or not _plain(value)):
            return f"field {name!r} is not a plain value"
    return None


def _validated(doc: Any, path: Path) -> dict | None:
    """The document with its invalid parts dropped (warning once), or None (warning) when it is not ours."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        warnings.warn(f"sloth_core: ignoring tuning cache {path}: not a sloth_core autotune file",
                      TuningCacheWarning, stacklevel=3)
        return None
    if doc.get("schema") != SCHEMA_VERSION:
        warnings.warn(f"sloth_core: ignoring tuning cache {path}: schema {doc.get('schema')!r} "
                      f"(this sloth_core reads schema {SCHEMA_VERSION})", TuningCacheWarning, stacklevel=3)
        return None
    clean, dropped = empty_document(), []
    environments = doc.get("environments")
    if not isinstance(environments, dict):
        environments, dropped = {}, ["environments"]
    for env_key, env in environments.items():
        env_clean = _validated_environment(env_key, env, dropped)
        if env_clean is not None:
            clean["environments"][env_key] = env_clean
    if dropped:
        shown = "; ".join(dropped[:3]) + (f"; ... ({len(dropped)} in all)" if len(dropped) > 3 else "")
        warnings.warn(f"sloth_core: ignoring invalid parts of tuning cache {path}: {shown}",
                      TuningCacheWarning, stacklevel=3)
    return clean


def _validated_environment(env_key: Any, env: Any, dropped: list[str]) -> dict | None:
    fields = ("gpu", "triton", "sloth_core")
    if not isinstance(env, dict) or not all(isinstance(env.get(f), str) for f in fields):
        dropped.append(f"environment {env_key!r}")
        return None
    if Environment(*(env[f] for f in fields)).key != env_key or not isinstance(env.get("kernels"), dict):
        dropped.append(f"environment {env_key!r}")
        return None
    kernels: dict[str, dict] = {}
    for kernel, entries in env["kernels"].items():
        if not isinstance(entries, dict):
            dropped.append(f"{kernel!r} entries")
            continue
        for key, entry in entries.items():
            why = entry_problem(entry)
            if why is not None or not isinstance(key, str):
                dropped.append(f"{kernel} [{key}]: {why or 'key is not a string'}")
                continue
            kernels.setdefault(kernel, {})[key] = entry
    return {**{f: env[f] for f in fields}, "kernels": kernels}


# ---------------------------------------------------------------------------------------------- the cache


class TuningCache:
    """The JSON file at ``path`` (default :func:`cache_path`). Lookups use a snapshot read on first use;
    writes merge into the file's current content under the lock."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else cache_path()
        self._snapshot: dict | None = None
        self._reported: set[str] = set()  # problems with the file already warned about

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    # ------------------------------------------------------------------------------------------ reading
    def read(self) -> dict:
        """The file's valid content (an empty document when missing or ignored); refreshes the snapshot."""
        self._snapshot = self._read_file()
        return self._snapshot

    def _read_file(self) -> dict:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return empty_document()
        except OSError as exc:
            self._report(f"sloth_core: cannot read tuning cache {self.path}: {exc}")
            return empty_document()
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as exc:
            self._report(f"sloth_core: ignoring corrupt tuning cache {self.path} ({type(exc).__name__}: {exc})")
            return empty_document()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            clean = _validated(doc, self.path)
        for w in seen:
            self._report(str(w.message))
        return clean or empty_document()

    def _report(self, message: str) -> None:
        """Warn about a problem with the file once (a store re-reads the file it would otherwise warn about
        again)."""
        if message not in self._reported:
            self._reported.add(message)
            warnings.warn(message, TuningCacheWarning, stacklevel=4)

    def lookup(self, env_key: str, kernel: str, key: str) -> dict | None:
        """The entry for ``kernel`` at ``key`` in environment ``env_key``, or None."""
        if self._snapshot is None:
            self.read()
        env = self._snapshot["environments"].get(env_key)
        if env is None:
            return None
        return env["kernels"].get(kernel, {}).get(key)

    def entries(self) -> list[dict]:
        """Every entry, flattened: ``{"environment", "gpu", "triton", "sloth_core", "kernel", "key", **entry}``."""
        rows = []
        for env_key, env in self.read()["environments"].items():
            for kernel, entries in env["kernels"].items():
                for key, entry in entries.items():
                    rows.append({"environment": env_key, "gpu": env["gpu"], "triton": env["triton"],
                                 "sloth_core": env["sloth_core"], "kernel": kernel, "key": key, **entry})
        return rows

    # ------------------------------------------------------------------------------------------ writing
    def store(self, env: Environment, kernel: str, key: str, entry: Mapping[str, Any]) -> None:
        """Add (or replace) one entry. The in-memory snapshot is updated first, so the entry serves this
        process even when the file cannot be written (``OSError`` is then raised)."""
        entry = dict(entry)
        why = entry_problem(entry)
        if why is not None:
            raise ValueError(f"sloth_core: refusing to store an invalid tuning entry for {kernel} [{key}]: {why}")
        if self._snapshot is None:
            self._snapshot = empty_document()
        _insert(self._snapshot, env, kernel, key, entry)
        with self._locked():
            doc = self._read_file()
            _insert(doc, env, kernel, key, entry)
            self._write(doc)
        self._snapshot = doc

    def clear(self) -> int:
        """Remove the file; returns the number of entries it held."""
        with self._locked():
            count = sum(len(e) for env in self._read_file()["environments"].values()
                        for e in env["kernels"].values())
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._snapshot = empty_document()
        return count

    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            if fcntl is not None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def tuning_slot(self, env_key: str, kernel: str, key: str, timeout_s: float,
                    poll_s: float = 0.05) -> Iterator[bool]:
        """The right to tune ``kernel`` at ``key`` in ``env_key``, among the processes of this host: yields True
        once held (released on exit, or by the OS when the holder dies), False when another process held it for
        ``timeout_s`` (the caller then uses its heuristic). After a wait, the winner the other process stored is
        in the file: re-read it (:meth:`read`) before tuning. Always True without ``fcntl`` (Windows) or when
        the lock file cannot be created."""
        if fcntl is None:  # pragma: no cover
            yield True
            return
        digest = hashlib.sha256(f"{env_key}\n{kernel}\n{key}".encode()).hexdigest()[:24]
        lock_dir = self.path.with_name(self.path.name + ".locks")
        try:
            lock_dir.mkdir(parents=True, exist_ok=True)
            lock = open(lock_dir / f"{digest}.lock", "a")
        except OSError:  # an unwritable cache directory: nothing to share, tune for this process
            yield True
            return
        with lock:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        yield False
                        return
                    time.sleep(poll_s)
            try:
                yield True
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _write(self, doc: dict) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _insert(doc: dict, env: Environment, kernel: str, key: str, entry: dict) -> None:
    slot = doc["environments"].setdefault(
        env.key, {"gpu": env.gpu, "triton": env.triton, "sloth_core": env.sloth_core, "kernels": {}})
    slot["kernels"].setdefault(kernel, {})[key] = entry
