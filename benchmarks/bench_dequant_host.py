"""Host-side (Python) cost of one ``dequantize_weight`` call, the kernel launch replaced by a no-op.

    TRITON_INTERPRET=1 python benchmarks/bench_dequant_host.py

What a QLoRA step pays on the CPU per dequantization besides the launch itself (validation, launch
configuration, output allocation). Under the interpreter the bf16 path adds a float32 temporary and a copy that a
GPU run does not have. Best of 5 repetitions of 2,000 calls; a small NF4 double-quant weight on the CPU.
"""
import platform
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def main() -> None:
    import bitsandbytes as bnb

    from sloth_core.kernels import dequant, dequant_plan

    layer = bnb.nn.Linear4bit(256, 128, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(128, 256).to(torch.bfloat16), requires_grad=False,
                                     quant_type="nf4", compress_statistics=True, blocksize=64)
    layer = layer.to("cpu")  # Params4bit quantizes on its first move to a device

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    dequant._dequant_4bit_kernel = dequant_plan._dequant_4bit_kernel = NoLaunch()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, python "
          f"{platform.python_version()}")
    for label, call in (("whole weight", lambda: dequant_plan.dequantize_weight(layer)),
                        ("row range", lambda: dequant_plan.dequantize_weight(layer, rows=(0, 64)))):
        for _ in range(50):
            call()
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(2000):
                call()
            best = min(best, (time.perf_counter() - t) / 2000 * 1e6)
        print(f"{label}: {best:.1f} us a call (host side, kernel launch excluded)")


if __name__ == "__main__":
    main()
