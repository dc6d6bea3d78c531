"""The LoRA MLP's backward in a checkpointed layer whose MLP output feeds nothing saved: ``g``, ``u`` recomputed from
``x`` in column chunks of the intermediate dimension (:mod:`sloth_core.kernels.lora_mlp`)."""
from __future__ import annotations

import torch

from sloth_core.kernels import gated_activation as _ga
from sloth_core.kernels._runtime import new_empty
from sloth_core.kernels.lora_base import LoRASpec, base_weight
from sloth_core.kernels.lora_gemm import _base_input_grad, _base_plus_lora, _mm_to, _scaled_mm, _shared_input_xa


# The chunked recompute-backward: the intermediate dimension I is cut into RECOMPUTE_CHUNKS column ranges of a
# multiple of CHUNK_MULTIPLE columns (GEMM tiles; a 4-bit weight's row ranges then start at quantization blocks).
# Two chunks: three [T, I/2] temporaries stay below the forward's peak (g, u: two [T, I]); more chunks cost GEMM
# efficiency (H200, Llama-3-8B shapes: four chunks made the dx GEMMs 17% slower:
# benchmarks/results/lora_gemm_shapes_h200_20261129.txt).
RECOMPUTE_CHUNKS = 2
CHUNK_MULTIPLE = 128


def chunk_bounds(inter: int) -> list[tuple[int, int]]:
    """The column ranges ``[(c0, c1), ...]`` of ``[0, inter)`` the chunked MLP backward works in."""
    width = -(-inter // RECOMPUTE_CHUNKS)
    width = max(CHUNK_MULTIPLE, -(-width // CHUNK_MULTIPLE) * CHUNK_MULTIPLE)
    return [(c0, min(inter, c0 + width)) for c0 in range(0, inter, width)]


def _chunked_recompute_backward(dh, x, gate: LoRASpec, up: LoRASpec, down: LoRASpec, activation: str, need):
    """The MLP's gradients ``(dx, dA_g, dB_g, dA_u, dB_u, dA_d, dB_d)`` from ``x`` alone, the intermediate
    dimension in column chunks ``c`` (:func:`chunk_bounds`); ``None`` where ``need`` says no. Per chunk::

        g_c  = x W_g[c]^T + s_g xa_g B_g[c]^T,   u_c likewise       (recomputed; W rows dequantized per use,
                                                                  W_u[c]'s kept for dx)
        dm_c = dh W_d[:, c] + s_d dyB_d A_d[:, c]
        dg_c, du_c, m_c = one kernel over (dm_c, g_c, u_c), written over (g_c, u_c, dm_c)
        dA_d[:, c] = s_d dyB_d^T m_c;   ma += m_c A_d[:, c]^T;   dB_g[c] = s_g dg_c^T xa_g (u likewise)
        dyB_g += dg_c B_g[c] (u likewise);   dx += du_c W_u[c] + dg_c W_g[c]

    and at the end ``dB_d = s_d dh^T ma``, ``dA_g = s_g dyB_g^T x``, ``dx += s_g dyB_g A_g + s_u dyB_u A_u``
    (u likewise). ``ma`` and ``dyB`` ([T, r]) are summed over the chunks in fp32 and rounded once, as the
    unchunked path rounds them; the column slices of ``dA_d``, ``dB_g``, ``dB_u`` are exactly the unchunked ones;
    ``dx`` is accumulated in its dtype by the GEMMs (two roundings a chunk instead of two in all). Alive at once:
    three [T, |c|] tensors instead of four [T, I]. A 4-bit ``W_d`` is dequantized once a chunk and dropped once
    ``dm_c`` is computed: it is not alive next to ``g_c``, ``u_c``, ``dm_c`` and a weight's rows (the step's memory
    peak): one dequantization more a chunk for 112 MiB less at that peak (Llama-3-8B's ``W_d`` in bf16)."""
    need_dx, need_Ag, need_Bg, need_Au, need_Bu, need_Ad, need_Bd = need
    dtype, tokens = dh.dtype, x.shape[0]
    A_g, B_g, A_u, B_u, A_d, B_d = (t.to(dtype) for t in (gate.A, gate.B, up.A, up.B, down.A, down.B))
    xa_g, xa_u = _shared_input_xa(x, (A_g, A_u))
    dyB_d = torch.mm(dh, B_d)

    def fp32_sum(wanted: bool, rank: int):
        return torch.zeros((tokens, rank), dtype=torch.float32, device=dh.device) if wanted else None

    dyB_g, dyB_u = fp32_sum(need_dx or need_Ag, A_g.shape[0]), fp32_sum(need_dx or need_Au, A_u.shape[0])
    ma = fp32_sum(need_Bd, A_d.shape[0])
    dA_d = new_empty(down.A.shape, down.A.dtype, dh.device) if need_Ad else None
    dB_g = new_empty(gate.B.shape, gate.B.dtype, dh.device) if need_Bg else None
    dB_u = new_empty(up.B.shape, up.B.dtype, dh.device) if need_Bu else None
    dx = None
    for c0, c1 in chunk_bounds(A_d.shape[1]):
        w_d = base_weight(down.base_layer, dtype=dtype).to(dtype)  # a quantized one: dequantized, dropped before g_c
        dm = _scaled_mm(dyB_d, A_d[:, c0:c1], down.scale, dtype).addmm_(dh, w_d[:, c0:c1])
        del w_d
        g = _base_plus_lora(x, xa_g, gate.base_layer, B_g, gate.scale, (c0, c1))
        u, w_u = _base_plus_lora(x, xa_u, up.base_layer, B_u, up.scale, (c0, c1), keep_weight=True)
        dg, du = _ga._backward(dm, g, u, activation, out=(g, u), h_out=dm)
        m = dm
        if need_Ad:
            dA_d[:, c0:c1] = _scaled_mm(dyB_d.t(), m, down.scale, dA_d.dtype)
        if need_Bd:
            ma += _mm_to(m, A_d[:, c0:c1].t(), torch.float32)
        del m, dm
        if need_Bg:
            dB_g[c0:c1] = _scaled_mm(dg.t(), xa_g, gate.scale, dB_g.dtype)
        if need_Bu:
            dB_u[c0:c1] = _scaled_mm(du.t(), xa_u, up.scale, dB_u.dtype)
        if dyB_g is not None:
            dyB_g += _mm_to(dg, B_g[c0:c1], torch.float32)
        if dyB_u is not None:
            dyB_u += _mm_to(du, B_u[c0:c1], torch.float32)
        if need_dx:  # u's weight rows first, while at hand (dropped before W_g's rows are dequantized again)
            dx = _base_input_grad(du, up.base_layer, dx, (c0, c1), weight=w_u)
            w_u = None
            dx = _base_input_grad(dg, gate.base_layer, dx, (c0, c1))
        del dg, du, g, u, w_u
    dB_d = _scaled_mm(dh.t(), ma.to(dtype), down.scale, down.B.dtype) if need_Bd else None
    dA_g = _scaled_mm(dyB_g.to(dtype).t(), x, gate.scale, gate.A.dtype) if need_Ag else None
    dA_u = _scaled_mm(dyB_u.to(dtype).t(), x, up.scale, up.A.dtype) if need_Au else None
    if need_dx:
        dx.addmm_(dyB_g.to(dtype), A_g, alpha=gate.scale).addmm_(dyB_u.to(dtype), A_u, alpha=up.scale)
    return dx, dA_g, dB_g, dA_u, dB_u, dA_d, dB_d
