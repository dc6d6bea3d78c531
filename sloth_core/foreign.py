"""Code another kernel library put where transformers' was, named by its library.

Liger-Kernel (``apply_liger_kernel_to_llama()``, which TRL's ``use_liger_kernel=True`` and the HF ``Trainer`` call)
replaces, process-wide, the classes and functions of a ``modeling_<type>`` module (``LlamaRMSNorm`` ->
``LigerRMSNorm``, ``LlamaMLP`` -> ``LigerSwiGLUMLP``, ``apply_rotary_pos_emb`` -> ``liger_rotary_pos_emb``,
``LlamaForCausalLM.forward`` -> its ``lce_forward``), so every model built afterwards has them; with ``model=``
it also sets the ``forward`` of the modules of that one instance. The patterns verify what they find -- the
module's own forward, whoever wrote it, is the ``original`` of the probe -- and the report names whose function
sloth_core's kernel serves (``serves Liger-Kernel's LigerRMSNorm.forward``) or left, and why.

:func:`origin` names a callable's library; :func:`servable` says whether a forward that library set on an instance
may be verified and served by a pattern that declares ``serves_foreign`` (its fallback then runs that forward);
other libraries' instance forwards (TRL's fused LM head, ...) are left to them.
"""
from __future__ import annotations

from typing import Any

# Top-level package -> the name the report gives it; these libraries' instance forwards may be served.
SERVABLE_LIBRARIES = {"liger_kernel": "Liger-Kernel"}
# Packages whose code is what the patterns are written against: not foreign. ``kernels`` is transformers' hub-kernel
# layer, whose function modules hold HF's own functions unless ``kernelize`` swapped them (the rope pattern verifies
# either: :mod:`sloth_core.registry.patterns.rope`).
_OWN = ("transformers", "torch", "peft", "bitsandbytes", "sloth_core", "builtins", "kernels")


def _code_owner(obj: Any) -> tuple[str, str] | None:
    """(top-level package, qualified name) of the function behind ``obj`` (a function, a bound method, a module
    instance: its class's forward), or ``None`` when it has none."""
    fn = getattr(obj, "__func__", obj)
    if not hasattr(fn, "__code__") and not isinstance(fn, type):
        fn = getattr(type(obj), "forward", None)
        fn = getattr(fn, "__func__", fn)
    module = getattr(fn, "__module__", None)
    if not isinstance(module, str):
        return None
    return module.split(".", 1)[0], getattr(fn, "__qualname__", getattr(fn, "__name__", repr(fn)))


def origin(obj: Any) -> str | None:
    """``"<library>'s <qualified name>"`` for a callable that is not transformers' / torch's / PEFT's /
    bitsandbytes' / ours (``"Liger-Kernel's LigerRMSNorm.forward"``), else ``None``."""
    owner = _code_owner(obj)
    if owner is None or owner[0] in _OWN:
        return None
    top, name = owner
    return f"{SERVABLE_LIBRARIES.get(top, top)}'s {name}"


def servable(obj: Any) -> bool:
    """Whether ``obj`` comes from a library whose instance forwards a pattern may verify and serve."""
    owner = _code_owner(obj)
    return owner is not None and owner[0] in SERVABLE_LIBRARIES


def is_liger_class(cls: type, *names: str) -> bool:
    """Whether ``cls`` is Liger-Kernel's class of one of ``names`` (or a subclass of one)."""
    return any(c.__name__ in names and c.__module__.split(".", 1)[0] == "liger_kernel" for c in cls.__mro__)
