"""The LoRA MLP's gate/up pieces on the H200 at Llama-3-8B shapes (T=8192, H=4096, I=14336, r=16, bf16 base,
fp32 adapters as PEFT keeps them): LoRA terms materialized (``x W^T`` added into ``s xa B^T`` by a beta=1 GEMM,
then the gated kernel) against LoRA terms added inside the gated kernel (``sloth_core.kernels.gated_lora``), for
the first forward and for one column chunk of the recompute-backward; then a sweep of the gated_lora tiles
(low-rank product by outer products, "fma", or by ``tl.dot``), and the other projections' LoRA term added by
a beta=1 GEMM or by ``gated_lora.low_rank_add_``.

    python benchmarks/bench_gated_lora.py      (CUDA; medians of 20 CUDA-event timings after 3 warm-ups)
"""
import statistics
import sys

import torch

from sloth_core.autotune import override
from sloth_core.kernels import gated_activation as ga
from sloth_core.kernels import gated_lora as gl
from sloth_core.kernels import lora as L


def timed(fn, n=20) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_gated_lora: needs a CUDA GPU", file=sys.stderr)
        return 2
    T, H, I, r, s = 8192, 4096, 14336, 16, 2.0
    dev, dt = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)

    def lin(out_f, in_f):
        layer = torch.nn.Linear(in_f, out_f, bias=False, device=dev, dtype=dt)
        layer.weight.requires_grad_(False)
        A = torch.randn(r, in_f, device=dev, generator=gen) / in_f ** 0.5
        B = torch.randn(out_f, r, device=dev, generator=gen) * 0.01
        return L.LoRASpec(layer, A, B, s)

    gate, up, down = lin(I, H), lin(I, H), lin(H, I)
    x = torch.randn(T, H, device=dev, dtype=dt, generator=gen)
    dh = torch.randn(T, H, device=dev, dtype=dt, generator=gen)
    c0, c1 = L.chunk_bounds(I)[0]

    def fwd_materialized():
        g, _ = L._project(x, gate)
        u, _ = L._project(x, up)
        return ga._forward(g, u, "silu", out=g)

    def fwd_fused():
        xa_g, xa_u = L._gate_up_xa(x, gate.A, up.A)
        g, u = L._base_only(x, gate.base_layer), L._base_only(x, up.base_layer)
        return gl.gated_lora_forward(g, u, "silu", *L._gate_up_terms(xa_g, xa_u, gate, up), out=g)

    A_d, B_d = down.A.to(dt), down.B.to(dt)
    w_d = down.base_layer.weight
    xa_g, xa_u = (t.contiguous() for t in L._gate_up_xa(x, gate.A, up.A))
    dyB_d = torch.mm(dh, B_d)
    B_g, B_u = gate.B.to(dt), up.B.to(dt)

    def chunk_materialized():
        dm = L._scaled_mm(dyB_d, A_d[:, c0:c1], s, dt).addmm_(dh, w_d[:, c0:c1])
        g = L._base_plus_lora(x, xa_g, gate.base_layer, B_g, s, (c0, c1))
        u = L._base_plus_lora(x, xa_u, up.base_layer, B_u, s, (c0, c1))
        return ga._backward(dm, g, u, "silu", out=(g, u), h_out=dm)

    def chunk_fused():
        dm = torch.mm(dh, w_d[:, c0:c1])
        g, u = L._base_only(x, gate.base_layer, (c0, c1)), L._base_only(x, up.base_layer, (c0, c1))
        terms = L._gate_up_terms(xa_g, xa_u, gate, up, (c0, c1))
        return gl.gated_lora_backward(dm, g, u, "silu", *terms, gl.LowRank(dyB_d, A_d[:, c0:c1].t(), s),
                                      out=(g, u), h_out=dm)

    ref_h, new_h = fwd_materialized().float(), fwd_fused().float()
    print(f"forward h: max |fused - materialized| / max |h| = {(new_h - ref_h).abs().max() / ref_h.abs().max():.2e}")
    ref, new = chunk_materialized(), chunk_fused()
    for name, a, b in zip(("dg", "du"), new, ref):
        print(f"chunk {name}: max |fused - materialized| / max = {(a.float() - b.float()).abs().max() / b.float().abs().max():.2e}")
    del ref_h, new_h, ref, new
    print(f"\n{'piece (ms)':44s} {'materialized':>12s} {'fused':>8s}")
    print(f"{'first forward (xa, g, u, m)':44s} {timed(fwd_materialized):12.3f} {timed(fwd_fused):8.3f}")
    print(f"{'backward chunk c=I/2 (dm, g, u, dg, du, m)':44s} {timed(chunk_materialized):12.3f} {timed(chunk_fused):8.3f}")
    print(f"{'  base GEMMs alone (dm0, g0, u0)':44s} {'':12s} "
          f"{timed(lambda: (torch.mm(dh, w_d[:, c0:c1]), torch.mm(x, gate.base_layer.weight[c0:c1].t()), torch.mm(x, up.base_layer.weight[c0:c1].t()))):8.3f}")

    g0 = torch.randn(T, I, device=dev, dtype=dt, generator=gen)
    u0 = torch.randn(T, I, device=dev, dtype=dt, generator=gen)
    dm0 = torch.randn(T, I, device=dev, dtype=dt, generator=gen)
    terms = L._gate_up_terms(xa_g, xa_u, gate, up)
    dterm = gl.LowRank(dyB_d, A_d.t(), s)
    nbytes_f, nbytes_b = 3 * T * I * 2, 6 * T * I * 2
    print(f"\ngated kernels on [{T}, {I}]: {'forward ms':>10s} {'GB/s':>6s} {'backward ms':>11s} {'GB/s':>6s}")
    plain_f = timed(lambda: ga._forward(g0, u0, "silu"))
    plain_b = timed(lambda: ga._backward(dm0, g0, u0, "silu", h_out=torch.empty_like(g0)))
    print(f"{'no LoRA terms (gated_activation)':34s} {plain_f:10.3f} {nbytes_f / plain_f / 1e6:6.0f} {plain_b:11.3f} "
          f"{nbytes_b / plain_b / 1e6:6.0f}")
    for bm, bn, warps, dot in [(32, 128, 4, 0), (16, 256, 4, 0), (32, 256, 8, 0), (64, 128, 8, 0), (64, 64, 4, 0),
                               (16, 128, 2, 0), (32, 64, 2, 0), (32, 128, 4, 1), (32, 64, 4, 1)]:
        with override("gated_lora", BLOCK_M=bm, BLOCK_N=bn, USE_DOT=dot, num_warps=warps):
            f = timed(lambda: gl.gated_lora_forward(g0, u0, "silu", *terms))
            b = timed(lambda: gl.gated_lora_backward(dm0, g0, u0, "silu", *terms, dterm, h_out=torch.empty_like(g0)))
        label = f"{'dot' if dot else 'fma'} BLOCK_M={bm} BLOCK_N={bn} warps={warps}"
        print(f"{label:34s} {f:10.3f} {nbytes_f / f / 1e6:6.0f} {b:11.3f} {nbytes_b / b / 1e6:6.0f}")
    del g0, u0, dm0
    projections(T, r, s, dev, dt, gen)
    return 0


def projections(T, r, s, dev, dt, gen):
    """The other LoRA projections: ``y = x W^T + s xa B^T`` (and ``dx = dy W + s dyB A``) as the base GEMM alone,
    the LoRA term first with the base GEMM adding into it (beta=1), and the base GEMM then an in-place Triton
    add of the low-rank term (``gated_lora.low_rank_add_``)."""
    print(f"\n{'projection (ms)':24s} {'base alone':>10s} {'LoRA first':>10s} {'base + add_':>11s}")
    for name, K, N in (("q, o [4096 -> 4096]", 4096, 4096), ("k, v [4096 -> 1024]", 4096, 1024),
                       ("down [14336 -> 4096]", 14336, 4096)):
        layer = torch.nn.Linear(K, N, bias=False, device=dev, dtype=dt).requires_grad_(False)
        W = layer.weight
        A = torch.randn(r, K, device=dev, generator=gen) / K ** 0.5
        B = torch.randn(N, r, device=dev, generator=gen) * 0.01
        spec = L.LoRASpec(layer, A, B, s)
        x = torch.randn(T, K, device=dev, dtype=dt, generator=gen)
        dy = torch.randn(T, N, device=dev, dtype=dt, generator=gen)
        xa, dyB = torch.mm(x, A.to(dt).t()), torch.mm(dy, B.to(dt))
        B_dt = B.to(dt)
        ref = L._base_plus_lora(x, xa, layer, B_dt, s).float()
        got = gl.low_rank_add_(torch.mm(x, W.t()), gl.LowRank(xa, B, s)).float()
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        fwd = (timed(lambda: torch.mm(x, W.t())), timed(lambda: L._base_plus_lora(x, xa, layer, B_dt, s)),
               timed(lambda: gl.low_rank_add_(torch.mm(x, W.t()), gl.LowRank(xa, B, s))))
        bwd = (timed(lambda: torch.mm(dy, W)), timed(lambda: L._input_grad(dy, dyB, spec)),
               timed(lambda: gl.low_rank_add_(torch.mm(dy, W), gl.LowRank(dyB, A.t(), s))))
        print(f"{name + ' y':24s} {fwd[0]:10.3f} {fwd[1]:10.3f} {fwd[2]:11.3f}   (max diff {err:.1e})")
        print(f"{name + ' dx':24s} {bwd[0]:10.3f} {bwd[1]:10.3f} {bwd[2]:11.3f}")


if __name__ == "__main__":
    sys.exit(main())
