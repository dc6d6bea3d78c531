"""Where a training step's host (Python) time goes: cProfile over optimized Llama-3-8B-shaped steps (H200).

    python benchmarks/profile_host.py none|nf4 [steps]

Builds the model of ``benchmarks/_diag_setup.py`` (``gradient_checkpointing="offload"``), runs 3 warm steps,
then profiles ``steps`` more (default 2) and prints the functions with the most own time and the most cumulative
time, per step. cProfile slows Python down (roughly 1.5-2x), so the figures rank the host costs rather than
measure them; the step times printed before profiling are the unprofiled ones.
"""
import cProfile
import io
import os
import pstats
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _diag_setup import optimized_model, timed_steps  # noqa: E402

quant = sys.argv[1]
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 2
model, opt, ids = optimized_model(quant)
print(f"{quant}: unprofiled steps (ms):", " ".join(f"{t:.0f}" for t in timed_steps(model, opt, ids, 3)))
prof = cProfile.Profile()
prof.enable()
ts = timed_steps(model, opt, ids, steps)
prof.disable()
print(f"{quant}: profiled steps (ms):", " ".join(f"{t:.0f}" for t in ts))
for key, n in (("tottime", 45), ("cumtime", 45)):
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.strip_dirs().sort_stats(key).print_stats(n)
    text = buf.getvalue()
    print(f"\n==== by {key} (totals over {steps} steps)\n" + text[text.find("ncalls"):])
