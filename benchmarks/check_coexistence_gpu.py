"""GPU check of issue 18, item 5: sloth_core in a process where Liger-Kernel patched transformers first.

In one process, each case builds a random Llama-3-8B-shaped model (``sloth_core.presets``; ``--layers`` fewer),
PEFT LoRA r=16 on every projection, ``sloth_core.optimize(model, gradient_checkpointing="offload")``, trains
``--steps`` steps of ``--batch`` x ``--seq`` tokens (AdamW), then deletes the model:

* ``liger-first``: ``apply_liger_kernel_to_llama()`` (its defaults: RoPE, RMSNorm, SwiGLU, fused linear
  cross-entropy; what TRL's ``use_liger_kernel=True`` leaves behind for the next model) before the model is built;
  the patches are undone after the case (``tests/liger_patches.py``);
* ``plain``: the same without Liger, afterwards in the same process;
* ``liger-instance`` (``--instance``): Liger's ``apply_liger_kernel_to_llama(model=...)`` on the built model.

Per case it prints what ``optimize`` replaced / left (the report's rows grouped by pattern and status, with the
reasons of what was left), tokens/s (median of the steps after the first two), the peak memory, and
``torch.cuda.memory_allocated()`` before the build, after ``del`` alone and after ``gc.collect()`` (an optimized
model's bindings are bound methods of its modules: reference cycles, freed by ``gc.collect()``, not by ``del``
alone); where the memory is not back to its starting value (within ``--slack-mib``: cuBLAS workspaces) after
``gc.collect()``, the chain of objects holding the model's largest parameter. Exit status 1 when a case's memory
did not come back or its tokens/s are under ``--min-ratio`` (default 0.9) of ``plain``'s.

    SLOTH_CORE_AUTOTUNE=0 python benchmarks/check_coexistence_gpu.py            # ~2 minutes on an H100
    SLOTH_CORE_AUTOTUNE=0 python benchmarks/check_coexistence_gpu.py --instance --layers 16
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import os
import statistics
import sys
import time
import warnings
import weakref

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # tests.liger_patches

import sloth_core  # noqa: E402
from sloth_core.bench.train_models import add_lora, build, make_batches  # noqa: E402
from sloth_core.warning import SlothCoreWarning  # noqa: E402

GiB = 2 ** 30


def _report_lines(model) -> list[str]:
    """The report grouped: ``pattern status: count`` and each distinct reason of what was not replaced."""
    counts = collections.Counter((r.pattern, r.status) for r in sloth_core.report(model))
    lines = [f"    {p} {s}: {n}" for (p, s), n in sorted(counts.items())]
    reasons = collections.Counter(f"{r.pattern} {r.status}: {r.detail}" for r in sloth_core.report(model)
                                  if r.status != "replaced")
    lines += [f"    ! {why} (x{n})" for why, n in reasons.items()]
    serves = sorted({r.detail.split("; serves ", 1)[1] for r in sloth_core.report(model) if "; serves " in r.detail})
    lines += [f"    serves {s}" for s in serves]
    return lines


def _holders(obj, depth: int = 8) -> list[str]:
    """A chain of referrers of ``obj`` (the first one of each, frames and this function's own lists left out), as
    lines: where it ends is what holds the model."""
    lines, mine = [], set()
    for _ in range(depth):
        refs = gc.get_referrers(obj)
        mine.add(id(refs))
        refs = [r for r in refs if id(r) not in mine and not isinstance(r, type(sys._getframe()))]
        if not refs:
            break
        obj = refs[0]
        mine.add(id(obj))
        text = repr(obj).replace("\n", " ")[:160]
        lines.append(f"      <- {type(obj).__module__}.{type(obj).__qualname__}: {text}")
    return lines


def _cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


def _allocated(device: str) -> int:
    """``torch.cuda.memory_allocated()`` after the queued work (0 on the CPU: a smoke run of the script itself)."""
    if not _cuda(device):
        return 0
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def _steps(model, batches, device: str) -> tuple[float, float]:
    """(tokens/s over the steps after the first two, peak GiB)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if _cuda(device):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for ids in batches:
        t = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del out
        _allocated(device)
        times.append(time.perf_counter() - t)
    warm = times[2:] or times
    peak = torch.cuda.max_memory_allocated() / GiB if _cuda(device) else 0.0
    return batches[0].numel() / statistics.median(warm), peak


def run_case(name: str, args, liger: str | None) -> dict:
    from tests.liger_patches import liger_patches

    gc.collect()
    if _cuda(args.device):
        torch.cuda.empty_cache()
    start = _allocated(args.device)
    print(f"== {name}", flush=True)
    process_wide = liger_patches() if liger == "process" else contextlib.nullcontext()
    with process_wide:
        model = add_lora(build(args.preset, args.layers, "none", device=args.device), rank=16)
        instance = liger_patches(model=model.get_base_model()) if liger == "instance" else contextlib.nullcontext()
        with instance, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SlothCoreWarning)
            sloth_core.optimize(model, gradient_checkpointing="offload")
            print("\n".join(_report_lines(model)))
            for w in caught:
                print(f"    warning: {str(w.message).splitlines()[0][:200]}")
            batches = make_batches(model.config.vocab_size, args.steps, args.batch, args.seq, args.device)
            tokens_s, peak = _steps(model, batches, args.device)
    params = sorted((p for p in model.parameters()), key=torch.Tensor.numel, reverse=True)
    biggest = weakref.ref(params[0])
    del params, model, batches
    after_del = _allocated(args.device)
    gc.collect()
    after_gc = _allocated(args.device)
    print(f"    {tokens_s:,.0f} tokens/s, peak {peak:.2f} GiB; allocated: start {start / GiB:.3f} GiB, after del "
          f"{after_del / GiB:.3f}, after gc.collect() {after_gc / GiB:.3f}", flush=True)
    leaked = biggest()
    if after_gc - start > args.slack_mib * 2**20 or leaked is not None:
        print(f"    NOT FREED: {(after_gc - start) / GiB:.3f} GiB; largest parameter alive: {leaked is not None}")
        if leaked is not None:
            print("\n".join(_holders(leaked)))
        del leaked
    return {"case": name, "tokens_s": tokens_s, "peak": peak, "start": start, "after_del": after_del,
            "after_gc": after_gc}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3-8b", help="a sloth_core.presets model (tiny-llama: a smoke run)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script (Triton's interpreter)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--instance", action="store_true", help="also Liger's per-instance patching")
    ap.add_argument("--min-ratio", type=float, default=0.9)
    ap.add_argument("--slack-mib", type=float, default=256,
                    help="memory over the starting value still counted as freed (cuBLAS workspaces, RNG states)")
    args = ap.parse_args(argv)
    if _cuda(args.device) and not torch.cuda.is_available():
        print("needs a CUDA GPU (--device cpu --preset tiny-llama: a smoke run of the script)")
        return 2
    import liger_kernel.transformers  # noqa: F401  (fails here, before any model is built, when not installed)

    t0 = time.perf_counter()
    cases = [("liger-first", "process"), ("plain", None)] + ([("liger-instance", "instance")] if args.instance else [])
    results = [run_case(name, args, liger) for name, liger in cases]
    plain = next(r for r in results if r["case"] == "plain")
    print("\n| case | tokens/s | vs plain | peak GiB | allocated start / after del / after gc (GiB) |")
    print("|---|---|---|---|---|")
    bad = False
    for r in results:
        ratio = r["tokens_s"] / plain["tokens_s"]
        freed = r["after_gc"] - r["start"] <= args.slack_mib * 2**20
        bad |= not freed or ratio < args.min_ratio
        print(f"| {r['case']} | {r['tokens_s']:,.0f} | {ratio:.2f}x | {r['peak']:.2f} | {r['start'] / GiB:.3f} / "
              f"{r['after_del'] / GiB:.3f} / {r['after_gc'] / GiB:.3f}{'' if freed else ' NOT FREED'} |")
    where = torch.cuda.get_device_name() if _cuda(args.device) else "CPU"
    print(f"\n{where}, preset {args.preset}, {args.batch} x {args.seq} tokens, torch {torch.__version__}, "
          f"transformers {__import__('transformers').__version__}, liger-kernel "
          f"{__import__('importlib.metadata').metadata.version('liger-kernel')}, {time.perf_counter() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
