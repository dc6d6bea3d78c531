"""What a pattern is.

A :class:`Pattern` is declarative, in the spirit of Inductor's pattern matcher (a pattern is two plain functions
plus a check):

* ``find(module, params)`` -- the structural check (class, attributes, children). It answers ``None`` (not this
  pattern), a :class:`Skip` (looks like it, but is not supported: reported with the reason), or one or more
  :class:`Match` candidates (e.g. both RMSNorm castings when the architecture is not declared).
* ``reference(match)`` -- a function in plain PyTorch: the *meaning* of the pattern.
* ``replacement(match)`` -- a function with the same signature, backed by a Triton kernel. For ``"forward"``
  targets both take the module first (``fn(module, *inputs)``, installed as a method, so a ``deepcopy`` of the
  module computes with the copy's weights); for ``"global:<name>"`` targets they take the global's arguments.
* ``original(module, match)`` -- the callable the replacement stands in for (the module's bound forward, or the
  function its forward calls).
* ``probe(module, match, generator)`` -- random inputs to establish ``replacement == reference == original``, and the
  parameters whose gradients must agree too.
* ``adapt`` -- optional: turns each of the three callables into a function of the probe's inputs returning
  tensors (e.g. keyword calls of a model forward, keeping only ``.loss``).
* ``setting`` -- optional: what the verification depended on that may change after ``optimize`` (``.to()``,
  autocast); a new value is verified on first use (:mod:`sloth_core.guard`).
* ``target`` -- where the replacement goes: ``"forward"`` (the module's own forward) or ``"global:<name>"`` (a
  function its forward looks up by global name, such as ``apply_rotary_pos_emb``).

An architecture uses a pattern with parameters: ``RMS_NORM.using(cast="gemma", offset=1.0)``.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class Skip:
    """A module that looks like the pattern but is not supported; ``reason`` goes to the report."""

    reason: str


@dataclass(frozen=True)
class Match:
    """One way a module matches a pattern: the resolved parameters and a signature for caching verification."""

    params: Mapping[str, Any]
    signature: tuple = ()

    def __getitem__(self, key: str) -> Any:
        return self.params[key]

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.params.items()) if not k.startswith("_"))


@dataclass(frozen=True)
class Probe:
    """Inputs for a verification run. Tensors in ``inputs`` that require grad, and ``params``, get their
    gradients compared. ``stand_ins``: ``(parameter, values)`` pairs the parameter holds while the probe runs
    (its own values are back afterwards), where its own would hide a wrong gradient -- a LoRA ``B`` still at its
    zero initialization makes the gradient of ``A`` zero on every side."""

    inputs: tuple
    params: tuple[torch.Tensor, ...] = ()
    dtype: torch.dtype = torch.float32
    stand_ins: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()


FindResult = None | Skip | Match | Sequence[Match]


@dataclass(frozen=True)
class Pattern:
    name: str
    kernel: str
    find: Callable[[nn.Module, Mapping[str, Any]], FindResult]
    reference: Callable[[Match], Callable]
    replacement: Callable[[Match], Callable]
    original: Callable[[nn.Module, Match], Callable]
    probe: Callable[[nn.Module, Match, torch.Generator], Probe]
    target: str = "forward"
    defaults: Mapping[str, Any] = field(default_factory=dict)
    adapt: Callable[[Callable], Callable] | None = None
    supersedes: tuple[str, ...] = ()  # patterns that leave a module alone once this one is bound on it
    # whether a ``"forward"`` replacement may stand in for a forward another kernel library set on the instance
    # (:func:`sloth_core.foreign.servable`: Liger-Kernel's ``model=`` patching): verified against it, and its
    # fallbacks run that forward (:func:`sloth_core.binding.previous_forward`), not the class's
    serves_foreign: bool = False
    # ``setting(module, args) -> tuple``: what verification depended on that can change after optimize (parameter
    # dtypes / devices, input dtype, autocast); checked at every call of a ``"forward"`` replacement
    # (:mod:`sloth_core.guard`)
    setting: Callable[[nn.Module, tuple], tuple | None] | None = None

    def bound(self, fn: Callable, module: nn.Module) -> Callable:
        """``fn`` (from ``reference``/``replacement``) as a callable of the inputs alone."""
        fn = types.MethodType(fn, module) if self.target == "forward" else fn
        return self.adapted(fn)

    def adapted(self, fn: Callable) -> Callable:
        return fn if self.adapt is None else self.adapt(fn)

    def using(self, **params: Any) -> "PatternUse":
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise TypeError(f"pattern {self.name!r} has no parameter(s) {sorted(unknown)}; "
                            f"it takes {sorted(self.defaults)}")
        return PatternUse(self, MappingProxyType({**self.defaults, **params}))


@dataclass(frozen=True)
class PatternUse:
    """A pattern with the parameters an architecture declares for it."""

    pattern: Pattern
    params: Mapping[str, Any]

    @property
    def name(self) -> str:
        return self.pattern.name

    def with_params(self, **params: Any) -> "PatternUse":
        return self.pattern.using(**{**self.params, **params})

    def find(self, module: nn.Module) -> list[Match] | Skip | None:
        res = self.pattern.find(module, self.params)
        if res is None or isinstance(res, Skip):
            return res
        if isinstance(res, Match):
            return [res]
        return list(res)
