"""Triton's interpreter casts float32 to bfloat16 by truncation; a GPU rounds to nearest even. On the CPU the tests
install a rounding cast in the interpreter, so that kernels round there as they do on a GPU and the bfloat16 tests
hold the GPU's bounds. (The interpreter's own round-to-nearest path, ``rounding_mode=RTNE``, is not used: it rounds
half up and drops the carry into the exponent.)

:func:`install` patches ``triton.runtime.interpreter._convert_float`` for float32 -> bfloat16 and leaves every other
conversion to it; :func:`rounds` says whether it is in place (a Triton without that function keeps truncating, and
the tests keep the interpreter's wider bounds).
"""
from __future__ import annotations

import numpy as np

_MARK = "_sloth_core_rounding"


def _float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even bfloat16 bits (uint16) of float32 ``values``; NaN stays NaN."""
    f = np.ascontiguousarray(values, dtype=np.float32)  # (at least one dimension: a scalar gets its shape back)
    bits = f.view(np.uint32).astype(np.uint64)
    out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    out[np.isnan(f)] = 0x7FC0
    return out.reshape(np.shape(values))


def _interpreter():
    try:
        from triton.runtime import interpreter
    except Exception:  # pragma: no cover - no Triton
        return None
    return interpreter


def rounds() -> bool:
    """Whether Triton's interpreter rounds float32 -> bfloat16 in this process (:func:`install` ran and could)."""
    return getattr(getattr(_interpreter(), "_convert_float", None), _MARK, False)


def install() -> None:
    import triton.language as tl

    interpreter = _interpreter()
    original = getattr(interpreter, "_convert_float", None)
    if original is None or rounds():
        return

    def convert(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16 and np.asarray(input).dtype == np.float32:
            return _float32_to_bfloat16_bits(input)
        return original(input, input_dtype, output_dtype, rounding_mode)

    setattr(convert, _MARK, True)
    interpreter._convert_float = convert
