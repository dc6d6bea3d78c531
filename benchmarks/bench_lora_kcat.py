"""LoRA term folded into the base GEMM by concatenation along K (``[x | xa | 0] @ [W | s B | 0]^T``, K padded by
16, 64 or 128) against the LoRA term first with the base GEMM adding into it (the default), and the copies the
concatenation needs; then the input gradient likewise along N (H200, Llama-3-8B shapes, T = 8192, r = 16).

    python benchmarks/bench_lora_kcat.py      (CUDA; medians of 20 CUDA-event timings after 3 warm-ups)
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _diag_setup import cuda_median_ms as timed  # noqa: E402

T, r, s = 8192, 16, 2.0
DEV, DT = "cuda", torch.bfloat16


def randn(*shape, gen, scale=1.0):
    return torch.randn(*shape, device=DEV, dtype=DT, generator=gen) * scale


def forward_shapes(gen) -> None:
    """``y = x W^T + s xa B^T``: base alone, LoRA first, K-concatenated (padded to K + 16 / 64 / 128), and the
    copies of ``x`` and ``W`` into the K + 64 buffers."""
    print(f"{'shape':22s} {'base':>7s} {'lorafirst':>9s} {'kcat4112':>8s} {'kcat4160':>8s} {'kcat4224':>8s} "
          f"{'xcopy4160':>9s} {'W4160 fill':>10s}")
    for name, K, N in (("q/o 4096->4096", 4096, 4096), ("kv 4096->1024", 4096, 1024),
                       ("g/u 4096->14336", 4096, 14336), ("g/u chunk ->7168", 4096, 7168),
                       ("down 14336->4096", 14336, 4096)):
        x, W = randn(T, K, gen=gen), randn(N, K, gen=gen, scale=0.02)
        A, B = randn(r, K, gen=gen, scale=0.02), randn(N, r, gen=gen, scale=0.02)
        xa = x @ A.t()

        def lora_first():
            y = torch.empty(T, N, device=DEV, dtype=DT).addmm_(xa, B.t(), beta=0, alpha=s)
            return y.addmm_(x, W.t())

        kcat = {}
        for KP in (K + 16, K + 64, K + 128):
            x_aug = torch.zeros(T, KP, device=DEV, dtype=DT)
            x_aug[:, :K], x_aug[:, K:K + r] = x, xa
            W_aug = torch.zeros(N, KP, device=DEV, dtype=DT)
            W_aug[:, :K], W_aug[:, K:K + r] = W, B * s
            kcat[KP] = timed(lambda: x_aug @ W_aug.t())
            if KP == K + 64:
                ref, got = lora_first().float(), (x_aug @ W_aug.t()).float()
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                x_copy = timed(lambda: x_aug[:, :K].copy_(x))
                w_fill = timed(lambda: W_aug[:, :K].copy_(W))
        print(f"{name:22s} {timed(lambda: x @ W.t()):7.3f} {timed(lora_first):9.3f} {kcat[K + 16]:8.3f} "
              f"{kcat[K + 64]:8.3f} {kcat[K + 128]:8.3f} {x_copy:9.3f} {w_fill:10.3f}  err {err:.1e}")
        del x, W, xa


def input_grad_shapes(gen) -> None:
    """``dx = dy W + s (dy B) A``: base alone, LoRA first, N-concatenated (``[dy | dyB | 0] @ [W; s A; 0]``)."""
    print(f"\n{'dx shape':22s} {'base':>7s} {'lorafirst':>9s} {'ncat+64':>8s}")
    for name, K, N in (("q/o dx", 4096, 4096), ("g/u chunk dx", 4096, 7168), ("down dx (dm)", 14336, 4096)):
        dy, W = randn(T, N, gen=gen), randn(N, K, gen=gen, scale=0.02)
        A, B = randn(r, K, gen=gen, scale=0.02), randn(N, r, gen=gen, scale=0.02)
        dyB = dy @ B

        def lora_first():
            y = torch.empty(T, K, device=DEV, dtype=DT).addmm_(dyB, A, beta=0, alpha=s)
            return y.addmm_(dy, W)

        dy_aug = torch.zeros(T, N + 64, device=DEV, dtype=DT)
        dy_aug[:, :N], dy_aug[:, N:N + r] = dy, dyB
        W_tall = torch.zeros(N + 64, K, device=DEV, dtype=DT)
        W_tall[:N], W_tall[N:N + r] = W, A * s
        print(f"{name:22s} {timed(lambda: dy @ W):7.3f} {timed(lora_first):9.3f} {timed(lambda: dy_aug @ W_tall):8.3f}")


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_lora_kcat: needs a CUDA GPU", file=sys.stderr)
        return 2
    gen = torch.Generator(device=DEV).manual_seed(0)
    forward_shapes(gen)
    input_grad_shapes(gen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
