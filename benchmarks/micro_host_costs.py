"""Host time of the per-call paths a QLoRA step repeats most (H200 diagnosis): microseconds a call, no device
synchronization inside the loop (the device work of each call is far shorter than its host time).

    python benchmarks/micro_host_costs.py

Rows: ``interpreting()``; ``dequantize_weight`` of a 256 x 256 NF4 ``Linear4bit`` (a launch plan after the first
call) against the checked ``dequantize_4bit`` path; a host copy (``memory.host.HostCopy``) of a 1 MiB tensor,
alone and three at once; and, for scale, a small cast, a small GEMM, ``torch.empty`` and the public stream helpers.
"""
import time

import bitsandbytes as bnb
import torch

from sloth_core import checkpointing as ck
from sloth_core.memory import host
from sloth_core.kernels import dequant as dq
from sloth_core.kernels import dequant_plan as dqp
from sloth_core.kernels._runtime import interpreting


def bench(name, fn, n=3000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    print(f"{name:55s} {host:7.2f} us/call", flush=True)


def main() -> None:
    lin = bnb.nn.Linear4bit(256, 256, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                            compress_statistics=True).cuda()
    bench("interpreting()", interpreting)
    bench("dequantize_weight (planned)", lambda: dqp.dequantize_weight(lin, torch.bfloat16))
    bench("dequantize_4bit (checked path)", lambda: dq.dequantize_4bit(lin.weight.data, lin.weight.quant_state))
    x = torch.randn(1024, 512, dtype=torch.bfloat16, device="cuda")
    bench("HostCopy(x 1MB) create+drop", lambda: host.HostCopy(x, pinned=True, kind="qkv"))
    xs = [x, x[:256], x[:256]]
    bench("HostCopy.many(3) create+drop", lambda: host.HostCopy.many(xs, pinned=True, kind="qkv"))
    A = torch.randn(16, 4096, device="cuda")
    bench("A.to(bf16) (16x4096 fp32)", lambda: A.to(torch.bfloat16))
    a = torch.randn(64, 64, dtype=torch.bfloat16, device="cuda")
    bench("torch.mm small", lambda: torch.mm(a, a))
    bench("torch.empty", lambda: torch.empty(64, 64, dtype=torch.bfloat16, device="cuda"))
    side = torch.cuda.Stream()

    def ctx():
        with torch.cuda.stream(side):
            pass

    bench("with torch.cuda.stream(side)", ctx)
    bench("torch.cuda.current_stream()", torch.cuda.current_stream)
    cur = torch.cuda.current_stream()
    bench("side.wait_stream(cur)", lambda: side.wait_stream(cur))


if __name__ == "__main__":
    main()
