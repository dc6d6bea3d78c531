"""Tuning spaces: what a kernel family declares, next to its kernel, so that it can be tuned.

A :class:`TuningSpec` holds

* ``params``: every tunable launch parameter and the values it may ever take (a tuple, a ``range``, any
  container). A config read from the cache is used only when its names are exactly these and every value is
  allowed -- and it is one of the candidates of its bucket;
* ``key``: ``(**launch key) -> bucket``, the tuning key of a launch: a flat dict of ints / strings (e.g. the
  exact row width, the row count rounded up to a power of 2, the dtype name). Launches in one bucket share
  a tuned config, so every candidate of a bucket must be valid for every launch in it;
* ``example``: ``bucket -> launch key``, the launch the bucket stands for (the heuristic's answer for it is
  always a candidate; inputs are built for it);
* ``candidates``: ``bucket -> iterable of configs`` (dicts over ``params``) worth timing;
* ``make_inputs(bucket, device, generator)``: realistic random inputs (never zeros) for that launch;
* ``run(inputs)``: launches the kernel(s) through their launchers -- which ask ``config_for``, so the tuner
  forces each candidate with ``override`` -- and returns the output tensors (a tensor or a tuple; every
  tensor the launch writes, so that a config that gets any of them wrong is caught);
* ``reference(inputs)``: optional; the outputs to match. Default: ``run`` under the heuristic config;
* ``worth_tuning(bucket)``: optional; ``False`` for launches too small to gain from tuning (probes, toy
  shapes): they keep the heuristic and are never timed;
* ``tolerance_scale``: outputs must match within ``sloth_core.tolerances`` of their dtype times this;
* ``workspace(bucket)``: bytes of device memory tuning the bucket allocates at most (its inputs, the expected
  outputs, one candidate's outputs and scratch, transients included): tuning on first use starts only when they
  fit under the process's peak (see :mod:`sloth_core.autotune.budget`). Without it a bucket is tuned only by
  ``sloth-core tune``, never on first use.
"""
from __future__ import annotations

import math
from collections.abc import Container
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

_SPACES: dict[str, "TuningSpec"] = {}

_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}

Bucket = dict[str, Any]
Config = dict[str, Any]


@dataclass(frozen=True)
class TuningSpec:
    kernel: str
    params: Mapping[str, Container]
    key: Callable[..., Bucket]
    example: Callable[[Bucket], dict]
    candidates: Callable[[Bucket], Iterable[Config]]
    make_inputs: Callable[[Bucket, Any, Any], Any]
    run: Callable[[Any], Any]
    reference: Callable[[Any], Any] | None = None
    worth_tuning: Callable[[Bucket], bool] | None = None
    tolerance_scale: float = 2.0
    workspace: Callable[[Bucket], int] | None = None

    # ------------------------------------------------------------------------------------------ buckets
    def bucket(self, launch_key: Mapping[str, Any]) -> Bucket:
        """The bucket of a launch key, checked to be flat and plain (ints / strings)."""
        bucket = dict(self.key(**launch_key))
        for name, value in bucket.items():
            if not isinstance(name, str) or not _plain(value):
                raise TypeError(f"{self.kernel}: tuning key entry {name!r}={value!r} is not a plain int / string")
        return bucket

    def should_tune(self, bucket: Bucket) -> bool:
        return True if self.worth_tuning is None else bool(self.worth_tuning(bucket))

    # ------------------------------------------------------------------------------------------ configs
    def project(self, config: Mapping[str, Any]) -> Config:
        """The tunable part of a full launch config."""
        return {name: config[name] for name in self.params if name in config}

    def heuristic(self, bucket: Bucket) -> Config:
        """The registered heuristic's config for the bucket's example launch (tunable part)."""
        from .heuristics import heuristic_config

        return self.project(heuristic_config(self.kernel, **self.example(bucket)))

    def candidates_for(self, bucket: Bucket) -> list[Config]:
        """The heuristic's config first, then the declared candidates; deduplicated, each within ``params``."""
        out: list[Config] = []
        for cfg in [self.heuristic(bucket), *self.candidates(bucket)]:
            cfg = dict(cfg)
            why = self.outside_params(cfg)
            if why is not None:
                raise ValueError(f"{self.kernel}: candidate {cfg} for {format_key(bucket)}: {why}")
            if cfg not in out:
                out.append(cfg)
        return out

    def outside_params(self, config: Any) -> str | None:
        """None when ``config`` names exactly ``params`` with allowed plain values, else why not."""
        if not isinstance(config, dict):
            return f"not a dict ({type(config).__name__})"
        names, declared = set(config), set(self.params)
        if names != declared:
            return f"parameters {sorted(names)} are not the declared {sorted(declared)}"
        for name, value in config.items():
            if not _plain(value) or value not in self.params[name]:
                return f"{name}={value!r} is not in the declared space"
        return None

    def accepts(self, config: Any, bucket: Bucket) -> str | None:
        """None when a (cached) config may be used for ``bucket``: within ``params`` and one of the bucket's
        candidates. Otherwise the reason."""
        why = self.outside_params(config)
        if why is not None:
            return why
        if _typed(config) not in [_typed(c) for c in self.candidates_for(bucket)]:
            return "not a candidate for this key"
        return None


def register_space(kernel: str, *, params: Mapping[str, Container], key: Callable[..., Bucket],
                   candidates: Callable[[Bucket], Iterable[Config]], make_inputs: Callable, run: Callable,
                   example: Callable[[Bucket], dict] | None = None, reference: Callable | None = None,
                   worth_tuning: Callable[[Bucket], bool] | None = None, tolerance_scale: float = 2.0,
                   workspace: Callable[[Bucket], int] | None = None) -> TuningSpec:
    """Declare ``kernel``'s tuning space (see the module docstring); ``example`` defaults to the bucket."""
    spec = TuningSpec(kernel=kernel, params=dict(params), key=key, example=example or (lambda b: dict(b)),
                      candidates=candidates, make_inputs=make_inputs, run=run, reference=reference,
                      worth_tuning=worth_tuning, tolerance_scale=tolerance_scale, workspace=workspace)
    _SPACES[kernel] = spec
    from .heuristics import _RESOLVED

    _RESOLVED.clear()
    return spec


def get_space(kernel: str) -> TuningSpec | None:
    return _SPACES.get(kernel)


def unregister_space(kernel: str) -> None:
    _SPACES.pop(kernel, None)
    from .heuristics import _RESOLVED

    _RESOLVED.clear()


def registered_spaces() -> list[str]:
    return sorted(_SPACES)


BUILTIN_KERNEL_MODULES = ("rms_norm", "gated_activation", "rope", "cross_entropy", "fused_linear_cross_entropy")


def load_builtin_spaces() -> list[str]:
    """Import sloth_core's kernel families (each registers its space on import); the registered kernels."""
    import importlib

    for module in BUILTIN_KERNEL_MODULES:
        importlib.import_module(f"sloth_core.kernels.{module}")
    return registered_spaces()


# ---------------------------------------------------------------------------------------------- helpers


def _typed(config: Mapping[str, Any]) -> frozenset:
    """Config identity that tells ``1`` from ``1.0`` and ``True`` (JSON round trips keep the type)."""
    return frozenset((k, type(v).__name__, v) for k, v in config.items())


def _plain(value: Any) -> bool:
    if isinstance(value, bool) or isinstance(value, (int, str)):
        return True
    return isinstance(value, float) and math.isfinite(value)


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (``fp32``, ``fp16``, ``fp64``; other dtypes by their torch name)."""
    name = str(dtype).replace("torch.", "")
    return _DTYPE_NAMES.get(name, name)


def dtype_from_name(name: str):
    import torch

    for full, short in _DTYPE_NAMES.items():
        if name in (full, short):
            return getattr(torch, full)
    raise ValueError(f"unknown dtype name {name!r}; expected one of {sorted(_DTYPE_NAMES.values())}")


def pow2_at_least(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def pow2_at_most(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n.bit_length() - 1)


def rows_bucket(n_rows: int, row_elems: int = 1, max_elems: int = 1 << 27) -> int:
    """``n_rows`` rounded up to a power of 2, capped so that ``rows * row_elems`` stays within ``max_elems``
    (larger launches share the last bucket: their inputs would not fit a tuning run, and kernels of that
    size behave alike)."""
    cap = pow2_at_most(max(1, max_elems // max(1, row_elems)))
    return min(pow2_at_least(max(1, n_rows)), cap)


def format_key(bucket: Mapping[str, Any]) -> str:
    """The cache's key string of a bucket: ``"n_rows=8192,n_cols=4096,dtype=bf16"``."""
    return ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in bucket.items())


def parse_key(key: str) -> Bucket:
    """The bucket of a cache key string (:func:`format_key`'s inverse: integers back to ``int``)."""
    bucket: Bucket = {}
    for part in key.split(","):
        name, _, value = part.partition("=")
        bucket[name] = int(value) if value.lstrip("-").isdigit() else value
    return bucket


def describe_key(bucket: Mapping[str, Any]) -> str:
    """For humans: ``"n_rows=8192, n_cols=4096, bf16"``."""
    parts = [str(v) if k == "dtype" else f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in bucket.items()]
    return ", ".join(parts)


def warps_for(elems: int, choices: Iterable[int] = (1, 2, 4, 8, 16), min_per_thread: int = 1,
              max_per_thread: int = 64) -> list[int]:
    """``num_warps`` choices giving each thread between ``min_per_thread`` and ``max_per_thread`` elements
    of an ``elems``-element block."""
    return [w for w in choices if min_per_thread <= elems / (32 * w) <= max_per_thread]
