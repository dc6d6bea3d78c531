"""Runtime dispatch shared by every kernel family.

A Triton kernel runs when every tensor it touches lives on a CUDA device, or on the CPU while Triton's
interpreter is active (``TRITON_INTERPRET=1``), and has a dtype the kernels were written for. Anything else
(CPU tensors without the interpreter, float64, ...) takes the family's naive PyTorch reference path: a
wrong answer is never an option.

``new_empty`` is the one allocator kernels use for their outputs. When poisoning is on (the test suite turns
it on), fresh outputs are filled with NaN so that an element a kernel forgot to write fails every comparison.
"""
from __future__ import annotations

import os
import threading

import torch

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_poison = os.environ.get("SLOTH_CORE_POISON", "0") == "1"


# ``os.environ.get`` encodes the key and decodes the value (~1 us); a training step asks ~4,000 times. CPython's
# ``os.environ`` keeps the encoded variables in ``_data`` (updated by every assignment through ``os.environ``).
_ENV = getattr(os.environ, "_data", None)
try:
    _INTERPRET_KEY, _ONE = os.environ.encodekey("TRITON_INTERPRET"), os.environ.encodevalue("1")
except AttributeError:  # another Python's os.environ
    _ENV = None


def interpreting() -> bool:
    """True when Triton's interpreter runs kernels on the CPU (``TRITON_INTERPRET=1``)."""
    if _ENV is not None:
        return _ENV.get(_INTERPRET_KEY) == _ONE
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Triton's interpreter is not thread-safe: each launch swaps ``triton.language``'s functions for interpreted
# ones and puts them back when it returns, and one builder object holds the current program id for the whole
# process. Two threads launching at once see each other's half (``Did you forget to add @triton.jit ?``) or,
# worse, each other's program ids. Under the interpreter, launches therefore take this lock, one at a time.
_INTERPRETER_LOCK = threading.Lock()


def launch_kernel(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``: every sloth_core kernel launch goes through here. Under the interpreter
    (``TRITON_INTERPRET=1``) launches from several threads run one after the other (see ``_INTERPRETER_LOCK``);
    on a GPU this is the plain launch."""
    if interpreting():
        with _INTERPRETER_LOCK:
            return kernel[grid](*args, **kwargs)
    return kernel[grid](*args, **kwargs)


#: Tags of sloth_core's custom ops (the launches ``torch.compile`` records as graph nodes): inductor hands each op
#: inputs with exactly the strides its fake implementation saw, so the layouts the launches choose (an output
#: in its input's layout, a transposed view read in place) are the ones the fake implementations promised.
OP_TAGS = (torch.Tag.needs_exact_strides,)


def set_poison(enabled: bool) -> None:
    """Turn NaN-poisoning of kernel outputs on or off (tests turn it on)."""
    global _poison
    _poison = bool(enabled)


def poisoning() -> bool:
    return _poison


def triton_ok(*tensors: torch.Tensor | None) -> bool:
    """Whether a Triton kernel may run on these tensors (``None`` entries are ignored)."""
    interp = interpreting()
    for t in tensors:
        if t is None:
            continue
        if t.dtype not in KERNEL_DTYPES:
            return False
        if t.device.type == "cuda":
            if interp:
                return False
        elif not (interp and t.device.type == "cpu"):
            return False
    return True


def unsupported_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why no kernel can run for a module living on ``device`` in ``dtype`` (``None``: kernels can run)."""
    if dtype not in KERNEL_DTYPES:
        return f"dtype {dtype} has no kernel (float32, bfloat16, float16 do)"
    if device.type == "cuda" and not interpreting():
        return None
    if device.type == "cpu" and interpreting():
        return None
    return (f"module on {device.type}: the Triton kernels need a CUDA device "
            f"(or the CPU with TRITON_INTERPRET=1)")


def new_empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; NaN-filled when poisoning is on (floating dtypes only)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def new_empty_like(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.empty_like`` for kernel outputs: the shape of ``x`` and, when ``x`` is dense, its memory layout
    (e.g. a transposed view gets a transposed output, as PyTorch's elementwise ops give); NaN-filled when
    poisoning is on."""
    out = torch.empty_like(x, dtype=dtype if dtype is not None else x.dtype)
    if _poison and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host-side grid and size arithmetic (plain Python: ``triton.cdiv`` is a Triton
    ``ConstexprFunction``, about 2 us a call from the host, and a step launches thousands of kernels)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def compiled_launcher(compiled, grid: tuple[int, ...]):
    """The launcher of a kernel Triton compiled -- what ``jit_fn[grid](...)`` returned -- for ``grid``:
    ``launcher(*args)`` with every kernel argument in signature order (constexprs included) launches it again on
    the current stream, skipping ``JITFunction.run``'s argument binding, specialization and cache lookup (~30 us
    of host time a launch against ~12 us). ``None`` under the interpreter, or when this Triton has no
    ``CompiledKernel[grid]``.

    The caller guarantees that the arguments specialize as the compiled ones did: the same dtypes, the same
    integer values (Triton specializes integers equal to 1 and multiples of 16) and pointers aligned to 16 bytes
    where the compiled ones were."""
    if interpreting() or not hasattr(type(compiled), "__getitem__") or not hasattr(compiled, "packed_metadata"):
        return None
    try:
        return compiled[tuple(grid) + (1,) * (3 - len(grid))]
    except Exception:  # another Triton's compiled-kernel API: launch through the JIT function
        return None


def replay_launch(kernel, compiled, grid: tuple[int, ...], args: list, kwargs: dict, arg_names: tuple[str, ...],
                  tail_from: int):
    """``(launcher, tail)`` to launch ``compiled`` again as ``launcher(*new_args[:tail_from], *tail)``
    (:func:`compiled_launcher`): ``tail`` is ``args[tail_from:]`` followed by the keyword arguments in signature
    order. ``None`` when there is no launcher, or ``kernel``'s signature is not ``arg_names`` then ``kwargs``."""
    launcher = compiled_launcher(compiled, grid)
    names = getattr(kernel, "arg_names", None)
    if launcher is None or names is None or tuple(names[:len(args)]) != arg_names \
            or any(name not in kwargs for name in names[len(args):]):
        return None
    return launcher, tuple(args[tail_from:]) + tuple(kwargs[name] for name in names[len(args):])
