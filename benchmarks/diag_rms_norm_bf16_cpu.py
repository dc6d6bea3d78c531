"""RMSNorm in bf16 against a float64 reference: Hugging Face's bf16 computation vs sloth_core's kernel, on the CPU
under Triton's interpreter (whose fp32 -> bf16 casts truncate instead of rounding, unlike the GPU).

    TRITON_INTERPRET=1 python benchmarks/diag_rms_norm_bf16_cpu.py

Prints the relative error (||a - ref|| / ||ref||) of the output and of the input / weight gradients, 64 x 256 rows,
inputs ~ N(0, 3^2), for Llama's and Gemma's casting. Output: benchmarks/results/rms_norm_bf16_cpu_20261206.txt.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SLOTH_CORE_AUTOTUNE", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sloth_core.kernels.rms_norm import rms_norm, rms_norm_reference  # noqa: E402


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


torch.manual_seed(0)
print(f"torch {torch.__version__}, TRITON_INTERPRET={os.environ['TRITON_INTERPRET']}")
print("casting | output: HF bf16, sloth_core | dx: HF, sloth_core | dw: HF, sloth_core")
for cast, offset in (("llama", 0.0), ("gemma", 1.0)):
    x, w, g = (torch.randn(64, 256) * 3).bfloat16(), (torch.randn(256) * 0.3 + 1 - offset).bfloat16(), \
        torch.randn(64, 256).bfloat16()

    def run(fn, dtype):
        xi, wi = x.to(dtype).clone().requires_grad_(), w.to(dtype).clone().requires_grad_()
        y = fn(xi, wi, 1e-6, offset, cast)
        y.backward(g.to(dtype))
        return y.detach(), xi.grad, wi.grad

    truth, hf, ours = run(rms_norm_reference, torch.float64), run(rms_norm_reference, torch.bfloat16), \
        run(rms_norm, torch.bfloat16)
    print(cast, " | ".join(f"{rel(h, t):.2e}, {rel(o, t):.2e}" for h, o, t in zip(hf, ours, truth)))
