"""Host time of one launch: the dequantization of a 4-bit weight, its bare Triton launch, a torch GEMM. (H200)

    python benchmarks/diag_launch_overhead.py

A GPU sleep is queued first, so the host never waits for the GPU: the wall time of N calls over N is what the
host spends on each (Python, argument checks, Triton's launcher, the driver call).
"""
import time

import torch

from sloth_core.kernels import dequant as D
from sloth_core.kernels import dequant_plan as P


def _layer(rows: int, cols: int):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(cols, rows, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(torch.randn(rows, cols, dtype=torch.bfloat16) * 0.02, requires_grad=False,
                                     quant_type="nf4", compress_statistics=True)
    return layer.cuda()


def host_us(fn, n: int = 300) -> float:
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # ~1 s of GPU time: the host runs ahead
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    us = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return us


def main() -> None:
    layer = _layer(4096, 4096)
    param, state = P._param_and_state(layer)
    data = param.data
    out = torch.empty(4096, 4096, dtype=torch.bfloat16, device="cuda")
    n = out.numel()
    grid, cfg = D._launch_config(state, n, out.dtype)
    absmax, absmax2, code2, offset, nested, bs2 = D._scale_operands(state, out.device)
    table = D.code_table(state.quant_type, out.device)
    flat = data.reshape(-1)
    args = (flat, absmax, absmax2, code2, offset, table, out, n, data.numel(), D.cdiv(n, state.blocksize), 0)

    def bare():
        D._dequant_4bit_kernel[grid](*args, NESTED=nested, BLOCKSIZE2=bs2, enable_fp_fusion=False, **cfg)

    x = torch.randn(16, 4096, dtype=torch.bfloat16, device="cuda")
    rows = [("dequantize_weight(layer)", lambda: P.dequantize_weight(layer)),
            ("dequantize_weight(layer, rows)", lambda: P.dequantize_weight(layer, rows=(0, 2048))),
            ("bare Triton launch (JITFunction.run)", bare),
            ("torch.mm [16,4096]x[4096,4096]", lambda: torch.mm(x, out.t())),
            ("torch.empty 32 MiB", lambda: torch.empty(4096, 4096, dtype=torch.bfloat16, device="cuda")),
            ("tensor.to(bf16) of fp32 [16,4096]", lambda: x.float().to(torch.bfloat16))]
    print(f"{'call':40s} host us / call (GPU kept busy by a sleep)")
    for name, fn in rows:
        print(f"{name:40s} {host_us(fn):8.1f}", flush=True)


if __name__ == "__main__":
    main()
