"""Where the time and the memory of an optimized LoRA training step go (diagnosis, H200).

One model (random weights, real shapes), PEFT LoRA on all linear layers, ``sloth_core.optimize`` with our
checkpointing; then, in one process:

1. variants, each a few warm steps (median step time, peak GiB): checkpointing on/offload, the recompute's MLP
   down projection skipped or not, and every SDPA backend that runs these shapes;
2. ``torch.profiler`` of one step of the default variant: GPU time by kernel, grouped (GEMM, attention, Triton,
   copies, elementwise, other);
3. a CUDA memory snapshot of one step: what is alive at the peak, by allocation site.

    python benchmarks/profile_train_step.py [--quant nf4] [--layers 32] [--batch 4 --seq 2048] [--exclude lora_qkv]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _step(model, ids, opt):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.detach()


def timed(model, ids, opt, steps: int, context=None):
    import contextlib

    times = []
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        t = time.perf_counter()
        with (context() if context else contextlib.nullcontext()):
            loss = _step(model, ids, opt)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    warm = sorted(times[2:])
    return {"step_s": warm[len(warm) // 2], "peak_GiB": torch.cuda.max_memory_allocated() / 2**30,
            "loss": loss.item()}


def variants(model, ids, opt, steps, backends=()):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import sloth_core
    from sloth_core import checkpointing

    rows = []
    tokens = ids.numel()
    states = [layer.__dict__[checkpointing.STATE_ATTR] for _, layer in checkpointing.decoder_layers(model)]
    declared = [s.mlp_output_unused for s in states]
    for mode in ("offload", "on"):
        sloth_core.optimize(model, gradient_checkpointing=mode)
        for skip in (True, False):
            for s, d in zip(states, declared):
                s.mlp_output_unused = d and skip
            r = timed(model, ids, opt, steps)
            rows.append({"mode": mode, "skip_mlp_output": skip, "sdpa": "default", **r,
                         "tokens_per_s": tokens / r["step_s"]})
            print(rows[-1], flush=True)
    for s, d in zip(states, declared):
        s.mlp_output_unused = d
    sloth_core.optimize(model, gradient_checkpointing="offload")
    for name in backends:
        backend = getattr(SDPBackend, name)
        try:
            r = timed(model, ids, opt, steps, context=lambda: sdpa_kernel([backend]))
        except Exception as exc:  # a backend that cannot run these shapes
            print(f"sdpa {name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            continue
        rows.append({"mode": "offload", "skip_mlp_output": True, "sdpa": name, **r,
                     "tokens_per_s": tokens / r["step_s"]})
        print(rows[-1], flush=True)
    return rows


_GROUPS = (("attention", ("flash", "fmha", "attention", "cudnn", "sdpa")),
           ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas")),
           ("copy", ("memcpy", "memset", "copy_")),
           ("triton", ("_kernel",)),
           ("elementwise", ("elementwise", "vectorized", "reduce")))


def _group(name: str) -> str:
    low = name.lower()
    for group, keys in _GROUPS:
        if any(k in low for k in keys):
            return group
    return "other"


def profile(model, ids, opt):
    from torch.profiler import ProfilerActivity, profile as prof_ctx

    with prof_ctx(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        t = time.perf_counter()
        _step(model, ids, opt)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t) * 1e3
    kernels = collections.Counter()
    counts = collections.Counter()
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        us = e.device_time if hasattr(e, "device_time") else e.cuda_time
        kernels[e.name] += us
        counts[e.name] += 1
    total = sum(kernels.values())
    groups = collections.Counter()
    for name, us in kernels.items():
        groups[_group(name)] += us
    print(f"\nGPU time in one step: {total / 1e3:.1f} ms")
    for g, us in groups.most_common():
        print(f"  {g:12s} {us / 1e3:8.1f} ms  {100 * us / total:5.1f}%")
    print("top kernels:")
    for name, us in kernels.most_common(30):
        print(f"  {us / 1e3:8.2f} ms {counts[name]:5d}x  {name[:110]}")
    result = {"total_ms": total / 1e3, "wall_ms": wall_ms, "groups_ms": {g: us / 1e3 for g, us in groups.items()},
              "top": [(n[:200], us / 1e3, counts[n]) for n, us in kernels.most_common(40)]}
    try:
        result["streams"] = stream_gaps(prof, wall_ms)
    except Exception as exc:  # the kineto event API differs between torch versions: keep the rest
        print(f"(no per-stream timeline: {type(exc).__name__}: {exc})")
    return result


def stream_gaps(prof, wall_ms: float, min_gap_us: float = 5.0, top: int = 12) -> dict:
    """Per CUDA stream of the profiled step: busy time (the union of its kernels and copies) and where the stream
    sat idle: the gaps between consecutive operations longer than ``min_gap_us``, the largest named by the
    operations on either side -- where the step waits for the host (launch latency, Python) or for a copy."""
    by_stream = collections.defaultdict(list)
    for e in prof.profiler.kineto_results.events():
        if e.device_type().name != "CUDA":
            continue
        start = e.start_ns() / 1e3
        by_stream[e.device_resource_id()].append((start, start + e.duration_ns() / 1e3, e.name()))
    out = {}
    print(f"\nstep wall time {wall_ms:.1f} ms; per CUDA stream: busy, idle between its first and last operation")
    for stream, evs in sorted(by_stream.items(), key=lambda kv: -sum(b - a for a, b, _ in kv[1])):
        evs.sort()
        busy, gaps, end, prev = 0.0, [], evs[0][0], None
        for a, b, name in evs:
            if a > end:
                if a - end > min_gap_us:
                    gaps.append((a - end, prev, name))
            busy += max(0.0, b - max(a, end))
            if b > end:
                end, prev = b, name
        idle = sum(g for g, _, _ in gaps)
        span = end - evs[0][0]
        print(f"  stream {stream}: {len(evs)} ops, span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms, idle "
              f"{idle / 1e3:.1f} ms in {len(gaps)} gaps > {min_gap_us:g} us")
        gaps.sort(key=lambda g: -g[0])
        if len(out) == 0:  # the compute stream (the busiest): its largest gaps, and the gaps by what ends them
            for g, before, after in gaps[:top]:
                print(f"      {g / 1e3:7.2f} ms  after {before[:60]}  before {after[:60]}")
            ended = collections.defaultdict(lambda: [0, 0.0])
            for g, _, after in gaps:
                ended[after[:60]][0] += 1
                ended[after[:60]][1] += g
            print("    by the operation after the gap: count, idle ms")
            for name, (n, g) in sorted(ended.items(), key=lambda kv: -kv[1][1])[:top]:
                print(f"      {n:5d} {g / 1e3:7.2f} ms  {name}")
        out[str(stream)] = {"ops": len(evs), "span_ms": span / 1e3, "busy_ms": busy / 1e3, "idle_ms": idle / 1e3,
                            "gaps": len(gaps), "largest": [(g / 1e3, b[:120], a[:120]) for g, b, a in gaps[:top]]}
    return out


def _site(frames) -> str:
    keep = [f for f in frames if any(k in f["filename"] for k in ("sloth_core", "transformers", "peft", "checkpoint",
                                                                   "optim", "bitsandbytes"))]
    keep = keep or frames
    return " < ".join(f"{os.path.basename(f['filename'])}:{f['line']}:{f['name']}" for f in keep[:3])


def memory_peak(model, ids, opt):
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python", max_entries=2_000_000)
    try:  # without early stop: the recompute's stop exception and the recorder's Python stacks do not mix
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            _step(model, ids, opt)
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    trace = snap["device_traces"][torch.cuda.current_device()]
    live, cur, peak, peak_live, peak_at = {}, start, start, {}, 0
    segments = 10  # the step's trace in equal slices of events: the highest point of each, and what it held
    seg_len = max(1, -(-len(trace) // segments))
    seg_peaks = [(start, {}, 0)] * segments
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], _site(ev.get("frames", [])))
            cur += ev["size"]
            if cur > peak:
                peak, peak_live, peak_at = cur, dict(live), i
            k = min(segments - 1, i // seg_len)
            if cur > seg_peaks[k][0]:
                seg_peaks[k] = (cur, dict(live), i)
        elif ev["action"] == "free_requested" and ev["addr"] in live:
            cur -= live.pop(ev["addr"])[0]

    def by_site(alive):
        sites = collections.Counter()
        for size, site in alive.values():
            sites[site] += size
        return sites

    at_peak = by_site(peak_live)
    print(f"\nmemory: {start / 2**30:.2f} GiB allocated before the step; peak {peak / 2**30:.2f} GiB at event "
          f"{peak_at}/{len(trace)}; alive at the peak from this step: {sum(at_peak.values()) / 2**30:.2f} GiB")
    for site, size in at_peak.most_common(25):
        print(f"  {size / 2**20:9.1f} MiB  {site[:150]}")
    print("highest point of each tenth of the step's allocation events (GiB): "
          + " ".join(f"{p / 2**30:.2f}" for p, _, _ in seg_peaks))
    others = sorted((p for p in seg_peaks if abs(p[2] - peak_at) > seg_len), key=lambda p: -p[0])
    if others:  # the next highest point away from the peak: where the peak would move to
        p, alive, at = others[0]
        print(f"next highest point away from the peak: {p / 2**30:.2f} GiB at event {at}; alive there:")
        for site, size in by_site(alive).most_common(12):
            print(f"  {size / 2**20:9.1f} MiB  {site[:150]}")
    return {"start_GiB": start / 2**30, "peak_GiB": peak / 2**30,
            "alive_at_peak": [(s, b / 2**20) for s, b in at_peak.most_common(40)],
            "segment_peaks_GiB": [p / 2**30 for p, _, _ in seg_peaks]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--quant", choices=("none", "nf4"), default="none")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--skip-variants", action="store_true")
    ap.add_argument("--sdpa", nargs="*", default=[], help="also time these SDPBackend names (FLASH_ATTENTION, ...)")
    ap.add_argument("--opt-in", nargs="*", default=[], help="patterns in no default list to apply too")
    ap.add_argument("--exclude", nargs="*", default=[], help="default patterns to leave out (e.g. lora_qkv)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_train_step: needs a CUDA GPU", file=sys.stderr)
        return 2
    from peft import LoraConfig, get_peft_model

    import sloth_core
    from sloth_core.bench.train_models import TARGETS, build
    from sloth_core.bench.env import environment

    model = build(args.preset, args.layers, args.quant)
    model.train()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    sloth_core.optimize(model, gradient_checkpointing="offload", opt_in=args.opt_in, exclude=args.exclude)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    ids = ids.cuda()
    result = {"env": environment(), "args": vars(args)}
    phases = [("variants", lambda: [] if args.skip_variants else variants(model, ids, opt, args.steps, args.sdpa)),
              ("warm", lambda: timed(model, ids, opt, 3)),
              ("profile", lambda: profile(model, ids, opt)),
              ("memory", lambda: memory_peak(model, ids, opt))]
    for name, phase in phases:
        try:
            result[name] = phase()
        except Exception:  # keep the other phases' figures
            import traceback

            traceback.print_exc()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
