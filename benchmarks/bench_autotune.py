#!/usr/bin/env python
"""Tuned vs heuristic launch configs, per kernel and shape, on one CUDA GPU -- and what the tuning cost.

For every launch key of a LoRA step of the model (default Llama-3-8B, bf16) at each token count (default 4096
and 8192): rms_norm, gated_activation, rope, fused_linear_cross_entropy, and cross_entropy on the chunks the
fused loss walks through. Each key is

1. tuned with :func:`sloth_core.autotune.tuner.tune` (every candidate compiled, checked against the heuristic's
   outputs and timed); ``tuning_s`` is the wall time of that, compilation included. By default Triton's
   compile cache is a fresh temporary directory (``--warm-compile-cache`` keeps the user's), so the cost is
   what tuning on first use costs on a new machine (later keys reuse the kernels compiled for earlier ones
   in this process, as a training run tuning several shapes would);
2. re-timed: the heuristic's config and the winner, alternately, ``--rounds`` rounds of a longer CUDA-event
   timing (median of medians), so the reported speedup is not the tuner's own (optimistic) pick.

Nothing is written to the user's tuning cache (unless ``--store``). Prints a table; ``--out`` writes JSON
(rows + environment).

    python benchmarks/bench_autotune.py --out benchmarks/results/autotune_h200.json
    python benchmarks/bench_autotune.py --model qwen3-8b --tokens 4096 --kernels rms_norm rope
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KERNELS = ("rms_norm", "gated_activation", "rope", "fused_linear_cross_entropy", "cross_entropy")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b", help="preset or config.json path (default: llama-3-8b)")
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    p.add_argument("--rounds", type=int, default=3, help="re-timing rounds (default: 3)")
    p.add_argument("--warm-compile-cache", action="store_true",
                   help="keep Triton's compile cache (tuning_s then leaves out compilation already cached)")
    p.add_argument("--store", action="store_true", help="also store the winners in the user's tuning cache")
    p.add_argument("--out", type=Path, default=None, help="write JSON results here")
    return p.parse_args(argv)


def plan(shape, tokens: list[int], dtype, kernels, chunk_for) -> list[tuple[str, dict]]:
    """Distinct (kernel, bucket) pairs, in order; loss chunks from ``chunk_for(tokens)``."""
    import torch

    from sloth_core.autotune import get_space
    from sloth_core.autotune.presets import launch_keys, loss_chunk_keys
    from sloth_core.autotune.space import format_key

    num_sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    keys = [k for t in tokens for k in launch_keys(shape, t, dtype, num_sms)]
    if "cross_entropy" in kernels:
        keys += [k for t in tokens for k in loss_chunk_keys(shape, t, chunk_for(t), dtype)]
    out = {}
    for kernel, key in keys:
        if kernel in kernels:
            bucket = get_space(kernel).bucket(key)
            out.setdefault((kernel, format_key(bucket)), (kernel, bucket))
    return list(out.values())


def retime(kernel: str, bucket: dict, configs: list[dict], rounds: int) -> list[float]:
    """Median over rounds of each config's median time, the configs alternating within a round."""
    import torch

    from sloth_core.autotune import get_space, override
    from sloth_core.autotune.tuner import CudaTimer

    spec = get_space(kernel)
    device = torch.device("cuda", torch.cuda.current_device())
    with torch.no_grad():
        inputs = spec.make_inputs(bucket, device, torch.Generator(device=device).manual_seed(1))
        timer = CudaTimer(rep_ms=100.0, warmup_ms=25.0, min_reps=10, max_reps=500)
        times: list[list[float]] = [[] for _ in configs]
        for _ in range(rounds):
            for i, cfg in enumerate(configs):
                with override(kernel, **cfg):
                    times[i].append(timer(lambda: spec.run(inputs), cfg))
    return [statistics.median(t) for t in times]


def bench_one(kernel: str, bucket: dict, rounds: int) -> dict:
    from sloth_core.autotune.space import format_key
    from sloth_core.autotune.tuner import tune

    started = time.perf_counter()
    result = tune(kernel, bucket)
    heuristic_ms, tuned_ms = retime(kernel, bucket, [result.heuristic_config, result.config], rounds)
    return dict(kernel=kernel, key=format_key(bucket), heuristic_config=result.heuristic_config,
                tuned_config=result.config, heuristic_ms=heuristic_ms, tuned_ms=tuned_ms,
                speedup=heuristic_ms / tuned_ms, tuning_s=result.tuning_s,
                candidates=len(result.trials), discarded=len(result.discarded),
                discarded_reasons=sorted({t.error.split(":")[0] for t in result.discarded}),
                tuner_heuristic_ms=result.heuristic_ms, tuner_best_ms=result.ms,
                bench_s=time.perf_counter() - started, _result=result)


def print_table(rows: list[dict]) -> None:
    from tabulate import tabulate

    def cfg(c):
        return " ".join(f"{k}={v}" for k, v in c.items())

    table = [[r["kernel"], r["key"], cfg(r["heuristic_config"]), cfg(r["tuned_config"]), f"{r['heuristic_ms']:.4f}",
              f"{r['tuned_ms']:.4f}", f"x{r['speedup']:.3f}", f"{r['tuning_s']:.1f}",
              f"{r['discarded']}/{r['candidates']}"] for r in rows]
    print(tabulate(table, headers=["kernel", "key", "heuristic config", "tuned config", "heuristic ms", "tuned ms",
                                   "speedup", "tuning s", "discarded"]))
    total = sum(r["tuning_s"] for r in rows)
    print(f"\ntotal tuning time: {total:.1f} s for {len(rows)} keys")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_autotune: no CUDA GPU; nothing to benchmark")
        return 0
    if not args.warm_compile_cache:  # before Triton compiles anything (read when it compiles): a cold cache
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="sloth_core_bench_triton_")
    from sloth_core import autotune
    from sloth_core.autotune import runtime
    from sloth_core.autotune.presets import model_shape
    from sloth_core.autotune.space import load_builtin_spaces

    load_builtin_spaces()

    autotune.set_tuning("off")  # launches inside a tuning run (the fused loss's cross-entropy): heuristics
    shape = model_shape(args.model)
    dtype = getattr(torch, DTYPES[args.dtype])
    from sloth_core.bench.env import environment

    env = environment()
    print(f"{shape.describe()}\n{env}")
    rows, flce_chunks = [], {}

    def chunk_for(tokens: int) -> int:  # the fused loss's chunk: tuned in this run if it was, else heuristic
        from sloth_core.autotune import get_space

        key = dict(n_tokens=tokens, vocab=shape.vocab, hidden=shape.hidden, dtype=dtype)
        bucket = get_space("fused_linear_cross_entropy").bucket(key)
        return flce_chunks.get(json.dumps(bucket, sort_keys=True),
                               autotune.heuristic_config("fused_linear_cross_entropy", **key)["chunk_tokens"])

    first = [k for k in args.kernels if k != "cross_entropy"]
    for phase_kernels in (first, ["cross_entropy"] if "cross_entropy" in args.kernels else []):
        for kernel, bucket in plan(shape, args.tokens, dtype, phase_kernels, chunk_for):
            try:
                row = bench_one(kernel, bucket, args.rounds)
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"{kernel} {bucket}: failed: {type(exc).__name__}: {exc}", flush=True)
                rows.append(dict(kernel=kernel, key=str(bucket), error=f"{type(exc).__name__}: {exc}"))
                continue
            result = row.pop("_result")
            if kernel == "fused_linear_cross_entropy":
                flce_chunks[json.dumps(bucket, sort_keys=True)] = result.config["chunk_tokens"]
            if args.store:
                runtime.default_cache().store(runtime.current_environment(), kernel, result.key, result.entry())
            print(f"{kernel:28s} {row['key']:50s} heuristic {row['heuristic_ms']:.4f} ms, tuned "
                  f"{row['tuned_ms']:.4f} ms (x{row['speedup']:.3f}), tuning {row['tuning_s']:.1f} s", flush=True)
            rows.append(row)
    ok = [r for r in rows if "error" not in r]
    print()
    print_table(ok)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(environment=env, model=shape.describe(), dtype=args.dtype,
                                            tokens=args.tokens, cold_compile_cache=not args.warm_compile_cache,
                                            rows=rows), indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
