"""Installing replacements on module instances, and undoing them.

Two targets:

* ``"forward"``: the instance's ``forward`` attribute is set to the replacement, bound to the instance as a method
  (so ``deepcopy`` rebinds it to the copy). Where accelerate has wrapped the forward (``_hf_hook`` with ``_old_forward``), the wrapped
  ``_old_forward`` is replaced instead so the hook keeps running.
* ``"global:<name>"``: the instance's forward is re-created from its class function's code with a copy of the
  function's globals in which ``<name>`` maps to the replacement. The class, the module-level function and every
  other instance are untouched.

Each install is recorded on the module itself (``module._sloth_core_bindings``), so :func:`uninstall_all` finds
it on any module it walks, copies made by ``deepcopy`` included. Records are undone in reverse order.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

RECORD_ATTR = "_sloth_core_bindings"


class _Missing:
    """Marks "the instance had no such attribute". A singleton that survives copy, deepcopy and pickling, so the
    records of a deep-copied module (PEFT's ``modules_to_save``) still undo correctly."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (_Missing, ())

    def __repr__(self):
        return "<missing>"


MISSING = _MISSING = _Missing()


@dataclass
class BindingRecord:
    pattern: str
    kernel: str
    attr: str
    previous: Any  # the instance attribute before install, or _MISSING


def _forward_attr(module: nn.Module) -> str:
    if getattr(module, "_hf_hook", None) is not None and "_old_forward" in module.__dict__:
        return "_old_forward"
    return "forward"


def records(module: nn.Module) -> list[BindingRecord]:
    return module.__dict__.get(RECORD_ATTR, [])


_FORWARD_ATTRS = ("forward", "_old_forward")


def previous_forward(module: nn.Module, pattern: str) -> Callable:
    """The forward a ``pattern`` forward replacement wraps, bound to ``module``: the one ``module`` had when the
    pattern was installed (another pattern's binding, e.g. a ``global:`` rebinding of the same forward), or, before
    the install (verification), the one it has now; the class's when there was none. Looked up on the instance,
    so a deep copy calls its own."""
    for rec in reversed(records(module)):
        if rec.pattern == pattern and rec.attr in _FORWARD_ATTRS:
            if callable(rec.previous) and rec.previous is not _MISSING:
                return rec.previous
            return types.MethodType(type(module).forward, module)
    current = module.__dict__.get(_forward_attr(module))
    if isinstance(current, types.MethodType) and current.__self__ is module:
        return current
    return types.MethodType(type(module).forward, module)


def is_bound(module: nn.Module, pattern: str) -> bool:
    return any(r.pattern == pattern for r in records(module))


def _push(module: nn.Module, rec: BindingRecord, value: Any) -> None:
    module.__dict__.setdefault(RECORD_ATTR, []).append(rec)
    module.__dict__[rec.attr] = value


def install_attr(module: nn.Module, attr: str, value: Any, pattern: str, kernel: str) -> None:
    """Set a plain instance attribute, recorded so that :func:`uninstall` puts the previous value back."""
    _push(module, BindingRecord(pattern, kernel, attr, module.__dict__.get(attr, _MISSING)), value)


def install_forward(module: nn.Module, replacement: Callable, pattern: str, kernel: str) -> None:
    attr = _forward_attr(module)
    _push(module, BindingRecord(pattern, kernel, attr, module.__dict__.get(attr, _MISSING)),
          types.MethodType(replacement, module))


def globals_function(fn: types.FunctionType, name: str, value: Any) -> types.FunctionType:
    """A copy of ``fn`` whose global ``name`` is ``value``."""
    g = dict(fn.__globals__)
    g[name] = value
    new = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    new.__doc__ = fn.__doc__
    new.__dict__.update(fn.__dict__)
    return new


def bound_forward_function(module: nn.Module) -> Callable | None:
    """The plain function a ``global:`` binding would re-create: the instance's bound forward's (another
    pattern's replacement, or an earlier re-creation), else the class's; ``None`` when the instance's forward is
    something else (not a method bound to it)."""
    current = module.__dict__.get(_forward_attr(module), _MISSING)
    if current is _MISSING:
        return type(module).forward
    if isinstance(current, types.MethodType) and current.__self__ is module:
        return current.__func__
    return None


def install_global(module: nn.Module, name: str, replacement: Callable, pattern: str, kernel: str) -> None:
    attr = _forward_attr(module)
    current = module.__dict__.get(attr, _MISSING)
    fn = bound_forward_function(module)
    if fn is None:
        raise RuntimeError(f"cannot rebind global {name!r}: {type(module).__name__}.{attr} was replaced by "
                           f"something else ({current!r})")
    new = globals_function(fn, name, replacement)
    _push(module, BindingRecord(pattern, kernel, attr, current), types.MethodType(new, module))


def install(module: nn.Module, target: str, replacement: Callable, pattern: str, kernel: str) -> None:
    if target == "forward":
        install_forward(module, replacement, pattern, kernel)
    elif target.startswith("global:"):
        install_global(module, target[len("global:"):], replacement, pattern, kernel)
    else:
        raise ValueError(f"unknown binding target {target!r}")


def uninstall(module: nn.Module) -> int:
    """Undo every binding on ``module``; returns how many were undone."""
    recs = module.__dict__.pop(RECORD_ATTR, [])
    for rec in reversed(recs):
        if rec.previous is _MISSING:
            module.__dict__.pop(rec.attr, None)
        else:
            module.__dict__[rec.attr] = rec.previous
    return len(recs)


def uninstall_all(root: nn.Module) -> int:
    return sum(uninstall(m) for m in root.modules())
