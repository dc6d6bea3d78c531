"""Dequantization of bitsandbytes 4-bit weights (NF4 / FP4, plain or double-quantized absmax).

Storage (``bitsandbytes.nn.Params4bit`` + ``bitsandbytes.functional.QuantState``), for a weight of ``n`` elements
in row-major order, ``blocksize`` ``B`` and ``nb = ceil(n / B)`` blocks:

* ``packed``: ``ceil(n / 2)`` uint8 bytes; byte ``j`` holds element ``2j`` in its HIGH nibble and element
  ``2j + 1`` in its LOW nibble (``q[2j] = packed[j] >> 4``, ``q[2j+1] = packed[j] & 0xF``);
* ``absmax[b]`` (float32), the scale of block ``b`` (elements ``b*B .. b*B + B - 1``); when nested
  (``compress_statistics=True``) it is stored as uint8 codes ``absmax_q`` of an 8-bit blockwise quantization of
  ``absmax - offset`` with ``state2 = (absmax2, code2, blocksize2)``.

Forward (every operation rounded to float32 separately, exactly bitsandbytes' order, no fused multiply-add)::

    absmax[b] = fp32(fp32(code2[absmax_q[b]] * absmax2[b // blocksize2]) + offset)   (nested)
    w[i]      = cast_dtype(fp32(table[q[i]] * absmax[i // B]))                      (round to nearest even)

``table`` is bitsandbytes' 16-entry code book of ``quant_type``: NF4's normal-quantile values, or FP4's
``sign * {0, 0.0625, 8, 12, 4, 6, 2, 3} / 12`` (code ``0b1000`` is ``-0.0`` as in bitsandbytes' CUDA kernel,
``lut[0] * -1.0f``; ``QuantState.code`` holds ``+0.0`` there, but bitsandbytes' 4-bit dequantization never reads
``QuantState.code``, and its CPU paths disagree among themselves on that sign).

Blocks are indexed over the FLAT element index (``i // B``), as bitsandbytes' CUDA kernel and its generic torch
path do. (bitsandbytes 0.50's CPU AVX-512 kernel indexes blocks per row: it is wrong when the last dim is not a
multiple of the blocksize; real ``Linear4bit`` weights never hit that.)

Backward: none. The codes are integers; in QLoRA the dequantized weight is a constant of the LoRA autograd
(``dX = dY @ W`` re-dequantizes ``W``), so this family has no gradient and no ``autograd.Function``.

Results are BIT-IDENTICAL to ``bitsandbytes.functional.dequantize_4bit`` (0.50). On the GPU the kernel rounds
float32 to bf16/fp16 itself (``cvt.rn``). Under Triton's interpreter a float32 -> bf16 cast truncates instead of
rounding, so there (only) a bf16 result is produced in float32 by the kernel and rounded by torch.

Output buffers: :func:`dequantize_weight` returns a tensor of PyTorch's caching allocator, which the caller
drops as soon as its GEMM is queued (the LoRA autograd uses a dequantized weight once, never keeps it). The
allocator hands the same blocks back for the next weight of that size, so dequantizing every layer of a model
reuses the same device memory step after step -- and between two uses that memory is free for everything else
(persistent per-size buffers -- q/o, k/v, gate/up/down and row ranges of a Llama layer -- stayed allocated
through the attention backward, where a QLoRA step's memory peaks). Callers that want a buffer of their own pass ``out=`` to :func:`dequantize_4bit`.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sloth_core.autotune import config_for, register_heuristic
from sloth_core.kernels._runtime import (cdiv, compiled_launcher, interpreting, new_empty, next_power_of_2,
                                        triton_ok, unsupported_reason)

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit accepts
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
        1.0)
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)  # codes 0b000..0b111, sign in bit 0b1000

_INT32_LIMIT = 2 ** 31 - 1


# --------------------------------------------------------------------------------------------- code tables


def _build_table(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32)
    mags = torch.tensor(_FP4_MAGNITUDES, dtype=torch.float32) / 12.0  # float32 division, as bitsandbytes
    return torch.cat([mags, -mags])  # -(+0.0) = -0.0 for code 0b1000


_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def code_table(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' 16-entry float32 code book of ``quant_type`` on ``device`` (cached)."""
    _check_quant_type(quant_type)
    key = (quant_type, torch.device(device))
    if key not in _TABLES:
        _TABLES[key] = _build_table(quant_type).to(key[1])
    return _TABLES[key]


# --------------------------------------------------------------------------------------------- validation


def _check_quant_type(quant_type) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"dequantize_4bit: quant_state.quant_type is {quant_type!r}; expected one of {QUANT_TYPES}")


def _check_same_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"dequantize_4bit: {name} must be a tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"dequantize_4bit: {name} is on {t.device} but weight_data is on {device}")


def _num_elements(quant_state) -> int:
    if getattr(quant_state, "shape", None) is None:
        raise ValueError("dequantize_4bit: quant_state.shape is missing")
    return math.prod(quant_state.shape)


def _check_inputs(weight_data, quant_state) -> None:
    if not isinstance(weight_data, torch.Tensor):
        raise ValueError(f"dequantize_4bit: weight_data must be a tensor, got {type(weight_data).__name__}")
    if quant_state is None:
        raise ValueError("dequantize_4bit: quant_state is missing (None); pass the weight's "
                         "bitsandbytes QuantState (Params4bit.quant_state)")
    if weight_data.dtype != torch.uint8:
        raise ValueError(f"dequantize_4bit: weight_data must be uint8 (packed 4-bit codes), got {weight_data.dtype}"
                         " (a Params4bit with another quant_storage: pass data.view(torch.uint8))")
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError("dequantize_4bit: weight_data is in bitsandbytes' CPU inference packing "
                         "(packing_format_for_cpu); undo it with "
                         "bitsandbytes.functional._convert_weight_packed_for_cpu_inverse first")
    _check_quant_type(getattr(quant_state, "quant_type", None))
    if quant_state.blocksize not in BLOCKSIZES:
        raise ValueError(f"dequantize_4bit: quant_state.blocksize is {quant_state.blocksize}; "
                         f"expected one of {BLOCKSIZES}")
    n = _num_elements(quant_state)
    if weight_data.numel() != (n + 1) // 2:
        raise ValueError(f"dequantize_4bit: weight_data has {weight_data.numel()} bytes but quant_state.shape "
                         f"{tuple(quant_state.shape)} needs {(n + 1) // 2} (two 4-bit codes a byte)")
    blocks = cdiv(n, quant_state.blocksize)
    device = weight_data.device
    _check_same_device("quant_state.absmax", quant_state.absmax, device)
    if quant_state.absmax.numel() < blocks:
        raise ValueError(f"dequantize_4bit: quant_state.absmax has {quant_state.absmax.numel()} entries, "
                         f"{blocks} blocks need one each")
    if quant_state.nested:
        _check_nested(quant_state, blocks, device)


def _check_nested(quant_state, blocks: int, device: torch.device) -> None:
    s2 = quant_state.state2
    if s2 is None or quant_state.offset is None:
        raise ValueError("dequantize_4bit: nested quant_state without state2/offset")
    if quant_state.absmax.dtype != torch.uint8:
        raise ValueError(f"dequantize_4bit: nested quant_state.absmax must be uint8 codes, "
                         f"got {quant_state.absmax.dtype}")
    _check_same_device("quant_state.state2.absmax", s2.absmax, device)
    _check_same_device("quant_state.state2.code", s2.code, device)
    if isinstance(quant_state.offset, torch.Tensor):
        _check_same_device("quant_state.offset", quant_state.offset, device)
    if s2.absmax.numel() < cdiv(blocks, s2.blocksize) or s2.code.numel() < 256:
        raise ValueError("dequantize_4bit: quant_state.state2 is too small for quant_state.absmax")


def _resolve_out(quant_state, out: torch.Tensor | None, dtype: torch.dtype | None, device,
                 shape: tuple[int, ...] | None = None) -> torch.dtype:
    """The output dtype; checks ``out`` (dtype, device, ``shape``: default ``quant_state.shape``)."""
    dtype = dtype or (out.dtype if out is not None else quant_state.dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dequantize_4bit: output dtype must be a floating dtype, got {dtype}")
    if out is not None:
        if out.dtype != dtype:
            raise ValueError(f"dequantize_4bit: out has dtype {out.dtype} but dtype={dtype} was asked for")
        expected = tuple(quant_state.shape) if shape is None else shape
        if tuple(out.shape) != expected:
            raise ValueError(f"dequantize_4bit: out has shape {tuple(out.shape)}, expected {expected}")
        if out.device != device:
            raise ValueError(f"dequantize_4bit: out is on {out.device} but weight_data is on {device}")
    return dtype


# --------------------------------------------------------------------------------------------- reference


def _offset_tensor(quant_state, device: torch.device) -> torch.Tensor:
    offset = quant_state.offset
    if isinstance(offset, torch.Tensor):
        return offset
    return torch.tensor(float(offset), dtype=torch.float32, device=device)


def effective_absmax(quant_state) -> torch.Tensor:
    """The float32 per-block scales; for a nested state exactly bitsandbytes' ``dequantize_blockwise(absmax_q,
    state2) + offset`` (the product rounded to ``state2.dtype``, the offset added in place, then float32)."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    s2 = quant_state.state2
    q = quant_state.absmax.reshape(-1)
    scale_idx = torch.arange(q.numel(), device=q.device) // s2.blocksize
    absmax = (s2.code.float()[q.long()] * s2.absmax.float().reshape(-1)[scale_idx]).to(s2.dtype or torch.float32)
    absmax += _offset_tensor(quant_state, q.device)
    return absmax.float()


def dequantize_4bit_reference(weight_data: torch.Tensor, quant_state, dtype: torch.dtype | None = None) -> torch.Tensor:
    """bitsandbytes' ``dequantize_4bit(weight_data, quant_state)`` in plain torch, bit for bit: float32
    ``table[q] * absmax[block]``, rounded once to ``dtype`` (default ``quant_state.dtype``). Returns shape
    ``quant_state.shape`` (bitsandbytes transposes its result when handed a ``[1, k]`` packed tensor; this does
    not)."""
    _check_inputs(weight_data, quant_state)
    dtype = _resolve_out(quant_state, None, dtype, weight_data.device)
    n, bs = _num_elements(quant_state), quant_state.blocksize
    packed = weight_data.reshape(-1)
    codes = torch.stack((packed >> 4, packed & 0xF), dim=-1).reshape(-1)[:n]
    values = code_table(quant_state.quant_type, weight_data.device)[codes.long()]
    blocks = cdiv(n, bs)
    values = torch.nn.functional.pad(values, (0, blocks * bs - n)).view(blocks, bs)
    scaled = (values * effective_absmax(quant_state)[:blocks, None]).reshape(-1)[:n]
    return scaled.to(dtype).reshape(quant_state.shape)


# --------------------------------------------------------------------------------------------- kernel


@triton.jit
def _block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, blk_mask,
                  NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr, EVEN: tl.constexpr):
    """float32 scale of each quantization block ``blk``; nested: ``code2[q] * absmax2[blk // B2] + offset``
    (two roundings: the kernel is compiled without FMA contraction)."""
    if NESTED:
        if EVEN:
            q = tl.load(absmax_ptr + blk)
            s2 = tl.load(absmax2_ptr + blk // BLOCKSIZE2)
        else:
            q = tl.load(absmax_ptr + blk, mask=blk_mask, other=0)
            s2 = tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=blk_mask, other=0.0)
        scale = tl.load(code2_ptr + q.to(tl.int32)) * s2
        scale = scale + tl.load(offset_ptr)
    elif EVEN:
        scale = tl.load(absmax_ptr + blk)
    else:
        scale = tl.load(absmax_ptr + blk, mask=blk_mask, other=0.0)
    return scale


@triton.jit
def _dequant_4bit_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, table_ptr, out_ptr,
                         n_elements, n_bytes, n_blocks, first_block,
                         HALF_BLOCK: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr, NESTED: tl.constexpr,
                         BLOCKSIZE2: tl.constexpr, EVEN: tl.constexpr, INT64: tl.constexpr):
    """A program dequantizes ``BLOCKS_PER_PROGRAM`` whole quantization blocks: a contiguous
    ``[BLOCKS_PER_PROGRAM, HALF_BLOCK]`` tile of packed bytes -> ``[BLOCKS_PER_PROGRAM, 2 * HALF_BLOCK]`` outputs.
    The nibbles are split along a trailing axis of 2 (already in output order: the reshape to the output tile
    moves no data) and looked up in the 16-entry table (64 bytes: every lane of a gather hits one L1 line).
    The launch covers ``n_blocks`` blocks from block ``first_block`` (a row range of the weight); ``out`` holds
    that range only (``n_elements`` outputs); ``n_bytes`` bounds the packed bytes of the whole weight."""
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    local = pid * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    blk_mask = local < n_blocks
    blk = first_block + local
    scale = _block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, blk_mask, NESTED, BLOCKSIZE2, EVEN)

    byte = blk[:, None] * HALF_BLOCK + tl.arange(0, HALF_BLOCK)[None, :]
    if EVEN:
        packed = tl.load(packed_ptr + byte)
    else:
        packed = tl.load(packed_ptr + byte, mask=byte < n_bytes, other=0)
    shift = 4 - 4 * tl.arange(0, 2)  # output 2j: high nibble of byte j; 2j + 1: low nibble
    codes = (packed.to(tl.int32)[:, :, None] >> shift[None, None, :]) & 0xF
    values = tl.load(table_ptr + codes) * scale[:, None, None]
    values = tl.reshape(values, (BLOCKS_PER_PROGRAM, 2 * HALF_BLOCK)).to(out_ptr.dtype.element_ty)

    elem = local[:, None] * (2 * HALF_BLOCK) + tl.arange(0, 2 * HALF_BLOCK)[None, :]
    if EVEN:
        tl.store(out_ptr + elem, values)
    else:
        tl.store(out_ptr + elem, values, mask=elem < n_elements)


@register_heuristic("dequantize_4bit")
def dequantize_4bit_heuristic(blocksize: int, n_elements: int, dtype: torch.dtype | None = None) -> dict:
    """``TILE_BYTES`` packed bytes a program (rounded up to whole quantization blocks), ``num_warps``.

    GPU: 2 KiB of packed bytes (4096 outputs) and 4 warps: 16 bytes loaded and 32 values stored a thread, enough
    programs (>= 4096 for a 4096 x 4096 weight) to fill an H100/H200. Interpreter: few, large programs."""
    if interpreting():
        return {"TILE_BYTES": 1 << 16, "num_warps": 1}
    return {"TILE_BYTES": 2048, "num_warps": 4}


def _launch_config(quant_state, n: int, dtype: torch.dtype, first_block: int = 0) -> tuple[tuple[int], dict]:
    cfg = dict(config_for("dequantize_4bit", blocksize=quant_state.blocksize, n_elements=n, dtype=dtype))
    half = quant_state.blocksize // 2
    blocks = cdiv(n, quant_state.blocksize)
    per_program = min(max(1, next_power_of_2(cfg.pop("TILE_BYTES")) // half), next_power_of_2(blocks))
    even = n == blocks * quant_state.blocksize and blocks % per_program == 0
    cfg.update(HALF_BLOCK=half, BLOCKS_PER_PROGRAM=per_program, EVEN=even,
               INT64=(first_block + blocks + per_program) * quant_state.blocksize > _INT32_LIMIT)
    return (cdiv(blocks, per_program),), cfg


def _scale_operands(quant_state, device: torch.device):
    """``(absmax, absmax2, code2, offset, NESTED, BLOCKSIZE2)`` for the kernel; a nested state whose second level
    is not float32 gets its scales computed by torch (one small tensor) and runs as non-nested."""
    s2 = quant_state.state2 if quant_state.nested else None
    if s2 is not None and (s2.dtype in (None, torch.float32)) and s2.absmax.dtype == torch.float32 \
            and s2.code.dtype == torch.float32:
        offset = _offset_tensor(quant_state, device).reshape(1)
        if offset.dtype != torch.float32:
            offset = offset.float()
        return (quant_state.absmax.contiguous(), s2.absmax.contiguous(), s2.code.contiguous(), offset, True,
                s2.blocksize)
    absmax = effective_absmax(quant_state).contiguous()
    return absmax, absmax, absmax, absmax, False, 1


def _kernel_args(weight_data: torch.Tensor, quant_state, n: int, dtype: torch.dtype, device: torch.device,
                 first_block: int = 0):
    """``(grid, args, kwargs)`` of a launch of :func:`_dequant_4bit_kernel` writing ``n`` outputs in ``dtype``;
    ``args[_OUT]`` (the output) is ``None``, for the caller to fill."""
    grid, cfg = _launch_config(quant_state, n, dtype, first_block)
    absmax, absmax2, code2, offset, nested, bs2 = _scale_operands(quant_state, device)
    table = code_table(quant_state.quant_type, device)
    args = [weight_data.reshape(-1), absmax, absmax2, code2, offset, table, None,
            n, weight_data.numel(), cdiv(n, quant_state.blocksize), first_block]
    return grid, args, dict(NESTED=nested, BLOCKSIZE2=bs2, enable_fp_fusion=False, **cfg)


_PACKED, _OUT = 0, 6  # positions of the packed codes and of the output among the kernel's arguments


def _launch(weight_data: torch.Tensor, quant_state, out: torch.Tensor, first_block: int = 0) -> None:
    """Launch the kernel into contiguous ``out``."""
    grid, args, kwargs = _kernel_args(weight_data, quant_state, out.numel(), out.dtype, out.device, first_block)
    args[_OUT] = out
    _dequant_4bit_kernel[grid](*args, **kwargs)


def _kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernel writes for a ``dtype`` result: float32 for bf16 under the interpreter (which casts
    float32 -> bf16 by truncation; torch then rounds), else ``dtype``."""
    return torch.float32 if dtype == torch.bfloat16 and interpreting() else dtype


def _kernel_into(weight_data: torch.Tensor, quant_state, out: torch.Tensor, first_block: int = 0) -> None:
    """Run the kernel into contiguous ``out`` (the elements from block ``first_block`` on), through a float32
    temporary where :func:`_kernel_dtype` says so."""
    if _kernel_dtype(out.dtype) != out.dtype:
        tmp = new_empty(out.shape, torch.float32, out.device)
        _launch(weight_data, quant_state, tmp, first_block)
        out.copy_(tmp)
    else:
        _launch(weight_data, quant_state, out, first_block)


def _kernel_into_target(weight_data: torch.Tensor, quant_state, target: torch.Tensor,
                        first_block: int = 0) -> torch.Tensor:
    """:func:`_kernel_into` ``target`` of any layout (through a contiguous temporary when it is not contiguous)."""
    dense = target if target.is_contiguous() else new_empty(target.shape, target.dtype, target.device)
    _kernel_into(weight_data.contiguous(), quant_state, dense, first_block)
    if dense is not target:
        target.copy_(dense)
    return target


def dequantize_4bit(weight_data: torch.Tensor, quant_state, out: torch.Tensor | None = None,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize a bitsandbytes 4-bit weight; bit-identical to ``bitsandbytes.functional.dequantize_4bit``.

    ``weight_data``: the packed uint8 ``Params4bit`` data (any shape with ``ceil(n/2)`` bytes); ``quant_state``:
    its ``QuantState``. Returns a tensor of ``quant_state.shape`` in ``dtype`` (default ``out.dtype`` when ``out``
    is given, else ``quant_state.dtype``), written into ``out`` when given (a fresh tensor otherwise). Runs the
    Triton kernel when possible, else :func:`dequantize_4bit_reference` (e.g. float64, or CPU without the
    interpreter)."""
    _check_inputs(weight_data, quant_state)
    dtype = _resolve_out(quant_state, out, dtype, weight_data.device)
    target = out if out is not None else new_empty(tuple(quant_state.shape), dtype, weight_data.device)
    if target.numel() == 0:
        return target
    if not (triton_ok(target) and dtype in OUT_DTYPES):
        target.copy_(dequantize_4bit_reference(weight_data, quant_state, dtype))
        return target
    return _kernel_into_target(weight_data, quant_state, target)


def dequantize_4bit_rows(weight_data: torch.Tensor, quant_state, start: int, stop: int,
                         out: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows ``start:stop`` of a 2-D 4-bit weight: bit-identical to ``dequantize_4bit(...)[start:stop]``.

    When row ``start`` begins a quantization block (``start * cols`` a multiple of the blocksize, as for every
    row of a weight whose ``cols`` is) only those rows are dequantized (elements ``start * cols`` ..
    ``stop * cols - 1``, blocks indexed over the whole weight); otherwise the whole weight is dequantized into a
    temporary and the rows are copied out. Dtype, ``out`` and fallbacks as :func:`dequantize_4bit`."""
    _check_inputs(weight_data, quant_state)
    if len(quant_state.shape) != 2:
        raise ValueError(f"dequantize_4bit_rows: the weight must be 2-D, quant_state.shape is "
                         f"{tuple(quant_state.shape)}")
    rows, cols = (int(d) for d in quant_state.shape)
    if not 0 <= start <= stop <= rows:
        raise ValueError(f"dequantize_4bit_rows: rows {start}:{stop} are not within the weight's {rows} rows")
    shape = (stop - start, cols)
    dtype = _resolve_out(quant_state, out, dtype, weight_data.device, shape)
    target = out if out is not None else new_empty(shape, dtype, weight_data.device)
    if target.numel() == 0:
        return target
    if not (triton_ok(target) and dtype in OUT_DTYPES) or (start * cols) % quant_state.blocksize:
        target.copy_(dequantize_4bit(weight_data, quant_state, dtype=dtype)[start:stop])
        return target
    return _kernel_into_target(weight_data, quant_state, target, first_block=start * cols // quant_state.blocksize)


# --------------------------------------------------------------------------------------------- modules


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


class _LaunchPlan:
    """One checked dequantization of a ``Params4bit`` (a row range, an output dtype), ready to launch again.

    Made after the inputs passed :func:`_check_inputs`, it holds the launch configuration, the scale operands
    and -- on a GPU, after its first launch -- the compiled kernel's launcher (:func:`compiled_launcher`): a call
    then costs an allocation and a launch (H200 host: ~30 us against ~85-100 us through the checked path).
    It serves a call only while the weight's packed codes are at the same address with the same size and dtype
    and its ``QuantState`` is the same object holding the same objects (absmax, offset, the nested state and its
    tensors, type, blocksize, shape) -- compared by identity, never with ``==`` (a ``QuantState``'s ``==``
    compares tensors, a device synchronization); anything else makes a new plan. The codes are read through their
    address, which the plan does not keep alive: the caller's ``Params4bit`` does. Only the direct kernel path is
    planned: the paths that compute the scales or copy rows out in torch (a second level that is not float32, a
    row range that does not start a block) run in full every time."""

    __slots__ = ("parts", "ptr", "numel", "shape", "kernel_dtype", "dtype", "device", "interp", "grid", "args",
                 "kwargs", "launcher", "replay_tail")

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
        plan.parts = _plan_parts(param, state)
        plan.ptr, plan.numel = param.data_ptr(), param.numel()
        plan.shape, plan.dtype, plan.kernel_dtype, plan.device = shape, dtype, kernel_dtype, data.device
        plan.interp = interpreting()
        plan.grid, plan.args, plan.kwargs = grid, args, kwargs
        plan.args[_PACKED] = None  # read from the Params4bit at each JIT launch: not kept alive here
        plan.launcher = plan.replay_tail = None
        return plan

    def serves(self, param, state) -> bool:
        if param.data_ptr() != self.ptr or param.numel() != self.numel or self.interp != interpreting():
            return False
        return all(a is b for a, b in zip(self.parts, _plan_parts(param, state)))

    def run(self, param) -> torch.Tensor:
        out = new_empty(self.shape, self.kernel_dtype, self.device)
        if self.launcher is not None and out.data_ptr() % 16 == 0:  # aligned as the compiled launch's output
            self.launcher(self.ptr, *self.args[1:_OUT], out, *self.replay_tail)
        else:
            args = list(self.args)
            args[_PACKED], args[_OUT] = _packed_codes(param).reshape(-1), out
            compiled = _dequant_4bit_kernel[self.grid](*args, **self.kwargs)
            if self.launcher is None and out.data_ptr() % 16 == 0:
                self._keep_launcher(compiled)
        if self.kernel_dtype != self.dtype:
            out = new_empty(self.shape, self.dtype, self.device).copy_(out)
        return out

    def _keep_launcher(self, compiled) -> None:
        launcher = compiled_launcher(compiled, self.grid)
        names = getattr(_dequant_4bit_kernel, "arg_names", None)
        if launcher is None or names is None or tuple(names[:len(self.args)]) != _ARG_NAMES \
                or any(name not in self.kwargs for name in names[len(self.args):]):
            return
        self.replay_tail = tuple(self.args[_OUT + 1:]) + tuple(self.kwargs[name] for name in names[len(self.args):])
        self.launcher = launcher


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
