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

Output buffers: :func:`dequant_plan.dequantize_weight` returns a tensor of PyTorch's caching allocator, which the
caller drops as soon as its GEMM is queued (the LoRA autograd uses a dequantized weight once, never keeps it). The
allocator hands the same blocks back for the next weight of that size, so dequantizing every layer of a model
reuses the same device memory step after step -- and between two uses that memory is free for everything else
(persistent per-size buffers -- q/o, k/v, gate/up/down and row ranges of a Llama layer -- stayed allocated
through the attention backward, where a QLoRA step's memory peaks). Callers that want a buffer of their own pass
``out=`` to :func:`dequantize_4bit`. The input checks are in :mod:`sloth_core.kernels.dequant_checks`; a module's
weight, with its cached launch plans: :mod:`sloth_core.kernels.dequant_plan`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sloth_core.autotune import config_for, register_heuristic
from sloth_core.kernels._runtime import cdiv, interpreting, launch_kernel, new_empty, next_power_of_2, triton_ok
from sloth_core.kernels.dequant_checks import _check_inputs, _check_quant_type, _num_elements, _resolve_out

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
        1.0)
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)  # codes 0b000..0b111, sign in bit 0b1000

_INT32_LIMIT = 2 ** 31 - 1


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
    launch_kernel(_dequant_4bit_kernel, grid, *args, **kwargs)


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
