"""Installing replacements on module instances, and undoing them.

Two targets:

* ``"forward"``: the instance's ``forward`` attribute is set to the replacement, bound to the instance as a method (so
  ``deepcopy`` rebinds it to the copy). Where accelerate has wrapped the forward (``_hf_hook`` with ``_old_forward``),
  the wrapped ``_old_forward`` is replaced instead so the hook keeps running.
* ``"global:<name>"``: calls of the global function ``<name>`` inside the instance's forward run the replacement.
  Where transformers' hub-kernel layer gave the instance a slot for that function (transformers 5.2x with the
  ``kernels`` package), the slot is set; otherwise the instance's forward is re-created from its class function's
  code (through the decorators that wrap it) with a copy of the function's globals in which ``<name>`` maps to the
  replacement. The class, the module-level function and every other instance are untouched.

Each install is recorded on the module itself (``module._sloth_core_bindings``), so :func:`uninstall_all` finds
it on any module it walks, copies made by ``deepcopy`` included. Records are undone in reverse order.
"""
from __future__ import annotations

import copy
import functools
import inspect
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
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
    installed: Any = None  # what the install set (to tell whether something replaced it since)


def _forward_attr(module: nn.Module) -> str:
    if getattr(module, "_hf_hook", None) is not None and "_old_forward" in module.__dict__:
        return "_old_forward"
    return "forward"


def _describe(value: Any) -> str:
    """A callable's real name and file (``functools.wraps`` copies the wrapped function's names: the code tells)."""
    fn = getattr(value, "__func__", value)
    code = getattr(fn, "__code__", None)
    if code is None:
        return type(fn).__qualname__
    where = "/".join(code.co_filename.replace("\\", "/").split("/")[-3:])
    return f"{getattr(code, 'co_qualname', code.co_name)} ({where})"


class _Records(list):
    """A module's binding records. Pickled (``torch.save``, ``pickle``) empty: the replacements are closures that
    do not pickle -- an unpickled module runs its class's forwards, and its record must not claim otherwise (the
    next ``optimize`` binds it again). Deep copies keep them: their bound replacements are rebound to the copy."""

    def __reduce_ex__(self, protocol):
        return _Records, ()

    def __deepcopy__(self, memo):
        new = _Records()
        memo[id(self)] = new
        new.extend(copy.deepcopy(list(self), memo))
        return new


def records(module: nn.Module) -> list[BindingRecord]:
    return module.__dict__.get(RECORD_ATTR, [])


def any_bound(root: nn.Module) -> bool:
    """Whether any module under ``root`` holds a binding now."""
    return any(records(m) for m in root.modules())


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
            return _class_forward(module)
    current = module.__dict__.get(_forward_attr(module))
    if isinstance(current, types.MethodType) and current.__self__ is module:
        return current
    return _class_forward(module)


def _class_forward(module: nn.Module) -> Callable:
    """The class's forward bound to ``module``: a bound method (callers read ``__self__``), while ``torch.compile``
    traces a ``functools.partial`` (Dynamo cannot trace a ``types.MethodType`` built on the fly)."""
    if torch.compiler.is_compiling():
        return functools.partial(type(module).forward, module)
    return types.MethodType(type(module).forward, module)


def is_bound(module: nn.Module, pattern: str) -> bool:
    return any(r.pattern == pattern for r in records(module))


def _push(module: nn.Module, rec: BindingRecord, value: Any) -> None:
    rec.installed = value
    recs = module.__dict__.get(RECORD_ATTR)
    if not isinstance(recs, _Records):
        recs = module.__dict__[RECORD_ATTR] = _Records(recs or ())
    recs.append(rec)
    module.__dict__[rec.attr] = value


def install_attr(module: nn.Module, attr: str, value: Any, pattern: str, kernel: str) -> None:
    """Set a plain instance attribute, recorded so that :func:`uninstall` puts the previous value back."""
    _push(module, BindingRecord(pattern, kernel, attr, module.__dict__.get(attr, _MISSING)), value)


def _named(fn: Callable, name: str) -> Callable:
    """``fn`` under the name ``name``: a bound method pickles as ``getattr(instance, name)``, so a replacement
    installed as ``forward`` unpickles as the class's forward (the replacement itself does not pickle), not as a
    lookup of its own name that fails (``_checkpointed_forward``)."""
    if not inspect.isfunction(fn) or fn.__name__ == name:
        return fn
    new = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    new.__doc__ = fn.__doc__
    new.__dict__.update(fn.__dict__)
    return new


def install_forward(module: nn.Module, replacement: Callable, pattern: str, kernel: str) -> None:
    attr = _forward_attr(module)
    _push(module, BindingRecord(pattern, kernel, attr, module.__dict__.get(attr, _MISSING)),
          types.MethodType(_named(replacement, attr), module))


def _cell_holds(cell: types.CellType, obj: Any) -> bool:
    try:
        return cell.cell_contents is obj
    except ValueError:  # an empty cell
        return False


def wrapped_chain(fn: Callable) -> list[types.FunctionType]:
    """``fn`` and the functions its decorators wrap, outermost first: each ``__wrapped__`` (``functools.wraps``)
    that the wrapper holds in a closure cell, so that :func:`globals_function` can rebuild the chain. transformers
    5.2x wraps attention forwards twice (``deprecate_kwarg``, and the hub-kernel layer's ``use_kernelized_func``);
    5.17 not at all."""
    chain = []
    while inspect.isfunction(fn):
        chain.append(fn)
        inner = getattr(fn, "__wrapped__", None)
        if not inspect.isfunction(inner) or not any(_cell_holds(c, inner) for c in fn.__closure__ or ()):
            break
        fn = inner
    return chain


def calls_global(fn: Callable, name: str) -> bool:
    """Whether ``fn``, or a function its decorators wrap (:func:`wrapped_chain`), looks up the global ``name``."""
    return any(name in f.__code__.co_names for f in wrapped_chain(fn))


def globals_function(fn: types.FunctionType, name: str, value: Any) -> types.FunctionType:
    """A copy of ``fn`` whose global ``name`` is ``value``. When ``fn`` is a decorator's wrapper
    (:func:`wrapped_chain`), the copy wraps a copy of the wrapped function made the same way, so every decorator
    still runs; only functions that look ``name`` up get a copy of their globals."""
    inner = getattr(fn, "__wrapped__", None)
    closure = fn.__closure__
    new_inner = None
    if inspect.isfunction(inner) and closure and any(_cell_holds(c, inner) for c in closure):
        new_inner = globals_function(inner, name, value)
        closure = tuple(types.CellType(new_inner) if _cell_holds(c, inner) else c for c in closure)
    g = fn.__globals__
    if name in fn.__code__.co_names:
        # without ``__name__``: Dynamo takes globals carrying one for the named module's own and would guard the
        # name's value through that module (where it is the original), not through this copy
        g = {k: v for k, v in g.items() if k != "__name__"}
        g[name] = value
    new = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, closure)
    new.__module__ = fn.__module__
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    new.__doc__ = fn.__doc__
    new.__dict__.update(fn.__dict__)
    if new_inner is not None:
        new.__wrapped__ = new_inner
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


# transformers' hub-kernel layer (``kernels.use_kernelized_func``, transformers 5.2x with its ``kernels`` dependency)
# turns a kernelizable global function into a module (``kernel_layer_name``: "rotary_pos_emb" for
# ``apply_rotary_pos_emb``) and gives each attention instance a private copy in this dict, keyed by that name; the
# global routes calls made inside the instance's forward to it. ``kernelize`` swaps those copies' forwards for hub
# kernels.
HUB_SLOTS_ATTR = "_kernel_funcs"


def _looked_up(fn: Callable, name: str) -> Any:
    """The global ``name`` as ``fn`` (or a function its decorators wrap) looks it up; ``_MISSING`` where none
    does."""
    for f in wrapped_chain(fn):
        if name in f.__code__.co_names:
            return f.__globals__.get(name)
    return _MISSING


def _hub_slot_key(module: nn.Module, name: str) -> str | None:
    """The key of the instance's hub-kernel slot for the global function ``name``, or ``None``: the global's
    ``kernel_layer_name`` (the key ``use_kernelized_func`` gives a function module without a ``__name__``), or
    ``name`` itself."""
    slots = module.__dict__.get(HUB_SLOTS_ATTR)
    if not isinstance(slots, dict):
        return None
    found = _looked_up(type(module).forward, name)
    for key in (getattr(found, "kernel_layer_name", None), name):
        if isinstance(key, str) and isinstance(slots.get(key), nn.Module):
            return key
    return None


def hub_slot(module: nn.Module, name: str) -> nn.Module | None:
    """The instance's hub-kernel slot for the global function ``name``, or ``None``."""
    key = _hub_slot_key(module, name)
    return None if key is None else module.__dict__[HUB_SLOTS_ATTR][key]


def global_callable(module: nn.Module, name: str) -> Callable | None:
    """What a call of the global ``name`` inside the instance's forward runs: its hub-kernel slot (which may hold a
    hub kernel, or a replacement installed here), else the global that the instance's bound forward -- or, when that
    is another pattern's wrapper, its class's -- looks up, through the decorators that wrap it."""
    slot = hub_slot(module, name)
    if slot is not None:
        return slot
    for fn in (bound_forward_function(module), type(module).forward):
        found = _looked_up(fn, name)
        if found is not _MISSING:
            return found
    return None


def _as_unpickled(previous: nn.Module) -> nn.Module:
    return previous


class _Slot(nn.Module):
    """A hub-kernel slot that runs ``fn`` in place of ``previous``. Its bound ``forward`` ignores ``self``: under
    ``torch.compile`` the hub-kernel layer calls ``slot.forward.__func__`` with the shared global module as
    ``self``. Pickled, it is ``previous`` (a pickled model gets the forwards of its classes back, as the other
    bindings do: the kernel closure does not pickle)."""

    def __init__(self, fn: Callable, previous: nn.Module):
        super().__init__()
        self.__dict__["previous"] = previous  # not a submodule: the slots are not part of the module tree

        def forward(_self, *args, **kwargs):
            return fn(*args, **kwargs)

        self.forward = types.MethodType(forward, self)

    def __reduce_ex__(self, protocol):
        return _as_unpickled, (self.__dict__["previous"],)

    def __copy__(self):
        new = _Slot.__new__(_Slot)
        new.__dict__.update(self.__dict__)
        new.__dict__["forward"] = types.MethodType(self.forward.__func__, new)
        return new

    def __deepcopy__(self, memo):
        new = _Slot.__new__(_Slot)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))  # the bound forward is rebound to ``new``
        return new


def install_global(module: nn.Module, name: str, replacement: Callable, pattern: str, kernel: str) -> None:
    """Make calls of the global ``name`` inside this instance's forward run ``replacement``: through its hub-kernel
    slot where it has one (transformers' own extension point), else by re-creating its forward with a copy of the
    globals (:func:`globals_function`)."""
    key = _hub_slot_key(module, name)
    if key is not None:
        slots = module.__dict__[HUB_SLOTS_ATTR]
        install_attr(module, HUB_SLOTS_ATTR, {**slots, key: _Slot(replacement, slots[key])}, pattern, kernel)
        return
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


def _put_back(module: nn.Module, rec: BindingRecord) -> None:
    if rec.previous is _MISSING:
        module.__dict__.pop(rec.attr, None)
    else:
        module.__dict__[rec.attr] = rec.previous


def uninstall(module: nn.Module) -> int:
    """Undo every binding on ``module``; returns how many were undone."""
    recs = module.__dict__.pop(RECORD_ATTR, [])
    for rec in reversed(recs):
        _put_back(module, rec)
    return len(recs)


def uninstall_pattern(module: nn.Module, pattern: str) -> bool:
    """Undo ``pattern``'s bindings on ``module`` alone; ``False`` (nothing undone) when another binding was
    installed after them on the same attribute (it wraps what they installed)."""
    recs = records(module)
    mine = [i for i, r in enumerate(recs) if r.pattern == pattern]
    if not mine or any(r.pattern != pattern and r.attr in {recs[i].attr for i in mine} for r in recs[mine[0]:]):
        return False
    for i in reversed(mine):
        _put_back(module, recs.pop(i))
    if not recs:
        del module.__dict__[RECORD_ATTR]
    return True


def uninstall_all(root: nn.Module) -> int:
    return sum(uninstall(m) for m in root.modules())
