"""Host time against GPU time per phase of a training step (H200 diagnosis): is the forward or the backward host-bound?

    python benchmarks/diag_host_phases.py nf4|none [steps]

Per step, the forward, the backward and the optimizer step each start from a synchronized device: the host's
time to enqueue the phase (until its call returns) and the phase's wall time (until the device is done). A phase
whose wall time is about its host time is bound by the host; the gap between the two is how far the host ran ahead.
Synchronizing between phases costs each phase its overlap with the next, so the step is slower than unsynchronized.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _diag_setup import optimized_model  # noqa: E402


def timed(fn):
    """``(result, host ms, wall ms)`` of ``fn()`` from a synchronized device."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    host = time.perf_counter() - t
    torch.cuda.synchronize()
    return out, host * 1e3, (time.perf_counter() - t) * 1e3


def main() -> None:
    quant = sys.argv[1] if len(sys.argv) > 1 else "nf4"
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    model, opt, ids = optimized_model(quant)
    print(f"{quant}: per phase, host enqueue / wall (ms)")
    print("  forward           backward          optimizer")
    for _ in range(steps):
        out, fh, fw = timed(lambda: model(input_ids=ids, labels=ids))
        _, bh, bw = timed(out.loss.backward)
        _, oh, ow = timed(lambda: (opt.step(), opt.zero_grad(set_to_none=True)))
        out = None  # the graph's host buffers go back to the pool before the next forward
        print(f"  {fh:6.1f} / {fw:6.1f}   {bh:6.1f} / {bw:6.1f}   {oh:6.1f} / {ow:6.1f}", flush=True)


if __name__ == "__main__":
    main()
