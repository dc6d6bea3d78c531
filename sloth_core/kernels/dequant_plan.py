"""The dequantized weight of a bitsandbytes ``Linear4bit`` (:func:`dequantize_weight`): checked once, then launched
again from a launch plan kept on its ``Params4bit`` (:mod:`sloth_core.kernels.dequant` holds the kernel)."""
from __future__ import annotations

import math

import torch

from sloth_core.kernels._runtime import (interpreting, launch_kernel, new_empty, replay_launch,
                                         unsupported_reason)
from sloth_core.kernels.dequant import (_OUT, _PACKED, OUT_DTYPES, _dequant_4bit_kernel, _kernel_args, _kernel_dtype,
                                        dequantize_4bit, dequantize_4bit_rows)
from sloth_core.kernels.dequant_checks import _check_inputs, _resolve_out


def _param_and_state(module_or_param):
    if isinstance(module_or_param, torch.nn.Module):
        param = getattr(module_or_param, "weight", None)
        state = getattr(param, "quant_state", None) or getattr(module_or_param, "quant_state", None)
    else:
        param, state = module_or_param, getattr(module_or_param, "quant_state", None)
    if not isinstance(param, torch.Tensor) or state is None:
        raise ValueError(f"dequantize_weight: {type(module_or_param).__name__} is not a bitsandbytes 4-bit weight "
                         "(expected a Linear4bit module or a quantized Params4bit with a quant_state)")
    return param, state


def dequantize_weight(module_or_param, dtype: torch.dtype | None = None,
                      rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The dequantized weight of a ``bitsandbytes.nn.Linear4bit`` (or of its ``Params4bit``), shape
    ``quant_state.shape``, in ``dtype`` (default ``quant_state.dtype``); ``rows=(start, stop)``: only those rows
    of the 2-D weight (:func:`dequantize_4bit_rows`).

    A fresh tensor (from the caching allocator: dropping it right after use lets the next dequantization, or
    anything else, reuse its memory). The first call for a weight, row range and dtype checks the inputs and
    leaves a :class:`_LaunchPlan` on the ``Params4bit``; later calls that find the same storage and quantization
    state launch that plan (the QLoRA step dequantizes ~600 times)."""
    param, state = _param_and_state(module_or_param)
    dtype = dtype or state.dtype
    if rows is not None and type(rows) is not tuple:
        rows = tuple(rows)  # the plans' key (a list works as well)
    plans = param.__dict__.get(_PLANS_ATTR)
    plan = plans.get((rows, dtype)) if plans is not None else None
    if plan is not None and plan.serves(param, state):
        return plan.run(param)
    plan = _LaunchPlan.make(param, state, dtype, rows)  # checks the inputs
    if plan is None:  # the full path (which raises on bad input)
        data = _packed_codes(param)
        if rows is None:
            return dequantize_4bit(data, state, dtype=dtype)
        return dequantize_4bit_rows(data, state, *rows, dtype=dtype)
    if plans is None:
        plans = param.__dict__.setdefault(_PLANS_ATTR, _Plans())
    plans[(rows, dtype)] = plan
    return plan.run(param)


_PLANS_ATTR = "_sloth_core_dequant_plans"  # on a Params4bit: {(rows, dtype): _LaunchPlan}


class _Plans(dict):
    """A ``Params4bit``'s launch plans. They hold a compiled kernel's launcher and the weight's address: a copy of
    the weight (``copy``, ``deepcopy``, pickling -- ``Params4bit`` carries its ``__dict__`` through all three) starts
    without plans and makes its own."""

    def __reduce__(self):
        return (_Plans, ())

    def __copy__(self):
        return _Plans()

    def __deepcopy__(self, memo):
        return _Plans()


def _plan_parts(param, state) -> tuple:
    """What a plan's launch depends on besides the packed codes' address: compared by identity."""
    s2 = state.state2 if state.nested else None
    second = (s2.absmax, s2.code, s2.dtype, s2.blocksize) if s2 is not None else (None,) * 4
    return (state, param.dtype, state.absmax, state.offset, s2, *second, state.quant_type, state.blocksize,
            state.shape, state.nested, getattr(state, "packing_format_for_cpu", False))


def _packed_codes(param) -> torch.Tensor:
    data = param.data
    if data.dtype != torch.uint8 and data.dtype == getattr(param, "quant_storage", None):
        data = data.view(torch.uint8)  # bitsandbytes' quant_storage (e.g. bf16 for FSDP) holds the same bytes
    return data


class WeightPlan:
    """What a plan kept on a ``Params4bit`` was made for (its packed codes' address and size, the objects of its
    ``QuantState``, interpreter or not), and whether it still serves a call: compared by identity (see
    :class:`_LaunchPlan`). The dequantization plans and the GEMV plans (``nf4_gemv._GemvPlan``) share it."""

    __slots__ = ("parts", "ptr", "numel", "interp")

    def _bind(self, param, state) -> None:
        self.parts, self.ptr, self.numel = _plan_parts(param, state), param.data_ptr(), param.numel()
        self.interp = interpreting()

    def serves(self, param, state) -> bool:
        if param.data_ptr() != self.ptr or param.numel() != self.numel or self.interp != interpreting():
            return False
        return all(a is b for a, b in zip(self.parts, _plan_parts(param, state)))


class _LaunchPlan(WeightPlan):
    """One checked dequantization of a ``Params4bit`` (a row range, an output dtype), ready to launch again.

    Made after the inputs passed :func:`_check_inputs`, it holds the launch configuration, the scale operands
    and -- on a GPU, after its first launch -- the compiled kernel's launcher (``_runtime.compiled_launcher``): a call
    then costs an allocation and a launch (H200 host: ~30 us against ~85-100 us through the checked path).
    It serves a call only while the weight's packed codes are at the same address with the same size and dtype
    and its ``QuantState`` is the same object holding the same objects (absmax, offset, the nested state and its
    tensors, type, blocksize, shape) -- compared by identity, never with ``==`` (a ``QuantState``'s ``==``
    compares tensors, a device synchronization); anything else makes a new plan. The codes are read through their
    address, which the plan does not keep alive: the caller's ``Params4bit`` does. Only the direct kernel path is
    planned: the paths that compute the scales or copy rows out in torch (a second level that is not float32, a
    row range that does not start a block) run in full every time."""

    __slots__ = ("shape", "kernel_dtype", "dtype", "device", "grid", "args", "kwargs", "launcher", "replay_tail")

    @classmethod
    def make(cls, param, state, dtype: torch.dtype, rows) -> "_LaunchPlan | None":
        """The plan of ``param`` (its ``state``) for ``dtype`` and ``rows``, or ``None`` where the full path must
        run (which then raises on bad input)."""
        data = _packed_codes(param)
        _check_inputs(data, state)
        shape = tuple(int(d) for d in state.shape)
        first_block = 0
        if rows is not None:
            if len(shape) != 2 or not 0 <= rows[0] <= rows[1] <= shape[0] or (rows[0] * shape[1]) % state.blocksize:
                return None
            shape, first_block = (rows[1] - rows[0], shape[1]), rows[0] * shape[1] // state.blocksize
        dtype = _resolve_out(state, None, dtype, data.device, shape)
        n = math.prod(shape)
        if not (n and dtype in OUT_DTYPES and data.is_contiguous() and unsupported_reason(data.device, dtype) is None):
            return None
        kernel_dtype = _kernel_dtype(dtype)
        grid, args, kwargs = _kernel_args(data, state, n, kernel_dtype, data.device, first_block)
        if not _reads_the_state(state, *args[1:5], nested=kwargs["NESTED"]):
            return None
        plan = cls()
        plan._bind(param, state)
        plan.shape, plan.dtype, plan.kernel_dtype, plan.device = shape, dtype, kernel_dtype, data.device
        plan.grid, plan.args, plan.kwargs = grid, args, kwargs
        plan.args[_PACKED] = None  # read from the Params4bit at each JIT launch: not kept alive here
        plan.launcher = plan.replay_tail = None
        return plan

    def run(self, param) -> torch.Tensor:
        out = new_empty(self.shape, self.kernel_dtype, self.device)
        if self.launcher is not None and out.data_ptr() % 16 == 0:  # aligned as the compiled launch's output
            self.launcher(self.ptr, *self.args[1:_OUT], out, *self.replay_tail)
        else:
            args = list(self.args)
            args[_PACKED], args[_OUT] = _packed_codes(param).reshape(-1), out
            compiled = launch_kernel(_dequant_4bit_kernel, self.grid, *args, **self.kwargs)
            if self.launcher is None and out.data_ptr() % 16 == 0:
                self._keep_launcher(compiled)
        if self.kernel_dtype != self.dtype:
            out = new_empty(self.shape, self.dtype, self.device).copy_(out)
        return out

    def _keep_launcher(self, compiled) -> None:
        kept = replay_launch(_dequant_4bit_kernel, compiled, self.grid, self.args, self.kwargs, _ARG_NAMES, _OUT + 1)
        if kept is not None:
            self.launcher, self.replay_tail = kept


def _reads_the_state(state, absmax, absmax2, code2, offset, nested: bool) -> bool:
    """Whether the scale operands :func:`_scale_operands` gave are the state's own tensors (or views of them), which
    a plan may keep: a copy (made contiguous or float32, or scales computed in torch) would go stale when the
    state's values change in place."""
    if not nested:
        return absmax is state.absmax
    s2 = state.state2
    own_offset = not torch.is_tensor(state.offset) or offset.data_ptr() == state.offset.data_ptr()
    return absmax is state.absmax and absmax2 is s2.absmax and code2 is s2.code and own_offset


_ARG_NAMES = ("packed_ptr", "absmax_ptr", "absmax2_ptr", "code2_ptr", "offset_ptr", "table_ptr", "out_ptr",
              "n_elements", "n_bytes", "n_blocks", "first_block")
