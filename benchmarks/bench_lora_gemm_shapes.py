"""GEMM shapes of the LoRA MLP on the H200 (Llama-3-8B: T=8192, H=4096, I=14336, r=16): ways to add the LoRA term
in the gate/up projection, and the cost of splitting the chunked backward's GEMMs into 4 column chunks.

    python benchmarks/bench_lora_gemm_shapes.py      (CUDA; medians of 20 CUDA-event timings after 3 warm-ups)
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _diag_setup import cuda_median_ms  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_lora_gemm_shapes: needs a CUDA GPU", file=sys.stderr)
        return 2
    T, H, I, r, s = 8192, 4096, 14336, 16, 2.0
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(T, H, device=dev, dtype=dt, generator=g)
    W = torch.randn(I, H, device=dev, dtype=dt, generator=g) * 0.02
    A = torch.randn(r, H, device=dev, dtype=dt, generator=g) * 0.02
    B = torch.randn(I, r, device=dev, dtype=dt, generator=g) * 0.02
    xa = x @ A.t()
    x_aug = torch.empty(T, H + r, device=dev, dtype=dt)
    W_aug = torch.empty(I, H + r, device=dev, dtype=dt)
    t = cuda_median_ms
    def base(): return x @ W.t()
    def current():
        y = x @ W.t(); return y.addmm_(xa, B.t(), alpha=s)
    def addonly(y=x @ W.t()): return y.addmm_(xa, B.t(), alpha=s)
    def kcat_copy():
        x_aug[:, :H].copy_(x); x_aug[:, H:].copy_(xa); W_aug[:, :H].copy_(W); W_aug[:, H:].copy_(B).mul_(s)
        return x_aug @ W_aug.t()
    def kcat_w_persist():
        x_aug[:, :H].copy_(x); x_aug[:, H:].copy_(xa); W_aug[:, H:].copy_(B).mul_(s)
        return x_aug @ W_aug.t()
    def kcat_mm(): return x_aug @ W_aug.t()
    def addmm_c():  # C = s xa B^T materialized, then addmm
        c = torch.mm(xa, B.t()); return torch.addmm(c, x, W.t())
    ref = current().float()
    kcat_copy()
    print("kcat max rel err vs current", ((kcat_copy().float() - ref).abs().max() / ref.abs().max()).item())
    for name, fn in [("base mm", base), ("current mm+addmm_", current), ("addmm_ alone", addonly),
                     ("kcat (copy x, W)", kcat_copy), ("kcat (copy x, W persistent)", kcat_w_persist),
                     ("kcat mm only", kcat_mm), ("C then addmm", addmm_c)]:
        print(f"{name:32s} {t(fn):.3f} ms")
    # chunk shapes of the chunked backward (I/4)
    Ic = I // 4
    Wc, Bc = W[:Ic], B[:Ic]
    print(f"{'chunk mm':32s} {t(lambda: x @ Wc.t()):.3f} ms")
    print(f"{'chunk mm+addmm_':32s} {t(lambda: (x @ Wc.t()).addmm_(xa, Bc.t(), alpha=s)):.3f} ms")
    dh = torch.randn(T, H, device=dev, dtype=dt, generator=g)
    Wd = torch.randn(H, I, device=dev, dtype=dt, generator=g)
    print(f"{'dm full (dh Wd)':32s} {t(lambda: dh @ Wd):.3f} ms")
    print(f"{'dm chunk (dh Wd[:, c]) x4':32s} {4 * t(lambda: dh @ Wd[:, :Ic]):.3f} ms")
    dg = torch.randn(T, I, device=dev, dtype=dt, generator=g)
    print(f"{'dx full (dg W)':32s} {t(lambda: dg @ W):.3f} ms")
    dgc = dg[:, :Ic].contiguous(); acc = torch.zeros(T, H, device=dev, dtype=dt)
    print(f"{'dx chunk accumulate x4':32s} {4 * t(lambda: acc.addmm_(dgc, Wc)):.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
