#!/usr/bin/env python
"""Benchmark 4-bit dequantization on one CUDA GPU: bitsandbytes' ``dequantize_4bit`` vs sloth_core's Triton kernel.

For each weight shape (default: 4096x4096, 14336x4096, 4096x14336, 128256x4096; NF4, double-quantized absmax,
blocksize 64, bf16 output) it reports

* the median time (``triton.testing.do_bench``, ``return_mode="median"``) of ``F.dequantize_4bit(q, state,
  out=buf)`` (bnb) and ``dequantize_4bit(q, state, out=buf)`` (sloth), both writing into a preallocated buffer;
  ``graph_ms``: the same under ``do_bench_cudagraph`` (device time without Python/launch overhead, which
  dominates the smallest shapes);
* the bandwidth: bytes read (packed codes + absmax codes + second-level scales/code book) + bytes written
  (the output), divided by the time; and its percentage of a device-to-device copy measured in the same run
  (a 1 GiB ``copy_``, counting 2 GiB moved);
* whether sloth's output is bit-identical to bnb's (``.view(int16)``).

``--sweep`` also times every (TILE_BYTES, num_warps) launch config for the sweep shape (default 14336x4096) to
check the heuristic. Prints tables and writes JSON (results + environment) to ``--out``.

    python benchmarks/bench_dequant.py
    python benchmarks/bench_dequant.py --shapes 14336x4096 --sweep
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_SHAPES = ["4096x4096", "14336x4096", "4096x14336", "128256x4096"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GIB = 1024 ** 3
TARGET_SHAPE, TARGET_FRACTION = (14336, 4096), 0.80
SWEEP_TILES = (512, 1024, 2048, 4096, 8192, 16384)
SWEEP_WARPS = (1, 2, 4, 8)


# --------------------------------------------------------------------------------------------- measuring
def bench(fn, args) -> dict:
    import triton.testing

    fn()  # warm-up: compilation, config resolution
    torch.cuda.synchronize()
    row = {"ms": triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")}
    try:
        row["graph_ms"] = triton.testing.do_bench_cudagraph(fn, rep=args.rep_ms, return_mode="median")
    except Exception as exc:  # noqa: BLE001 - a capture failure only loses the extra column
        row["graph_error"] = f"{type(exc).__name__}: {exc}"
    return row


def copy_bandwidth(args) -> float:
    """GB/s of a 1 GiB device-to-device copy (2 GiB moved: read + write)."""
    src = torch.empty(GIB, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    row = bench(lambda: dst.copy_(src), args)
    return 2 * GIB / (row["ms"] * 1e-3) / 1e9


def bytes_moved(q, state, out) -> int:
    n = q.numel() * q.element_size() + state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        s2 = state.state2
        n += s2.absmax.numel() * s2.absmax.element_size() + s2.code.numel() * s2.code.element_size() + 4
    return n + out.numel() * out.element_size()


def free_memory():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def quantized_weight(shape, args):
    import bitsandbytes.functional as F

    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    w = (torch.randn(shape, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    q, state = F.quantize_4bit(w, blocksize=args.blocksize, quant_type=args.quant_type,
                               compress_statistics=not args.no_nested)
    del w
    return q, state


def bitwise_equal(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_int_view(a), _int_view(b))


def _int_view(t):
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def run_shape(shape, copy_gbps, args) -> list[dict]:
    import bitsandbytes.functional as F

    from sloth_core.kernels.dequant import dequantize_4bit

    dtype = DTYPES[args.dtype]
    q, state = quantized_weight(shape, args)
    state.dtype = dtype  # bnb dequantizes into quant_state.dtype
    out_bnb = torch.empty(shape, dtype=dtype, device="cuda")
    out_sloth = torch.empty(shape, dtype=dtype, device="cuda")
    nbytes = bytes_moved(q, state, out_sloth)
    case = dict(shape=f"{shape[0]}x{shape[1]}", quant_type=args.quant_type, blocksize=args.blocksize,
                nested=not args.no_nested, dtype=args.dtype, bytes=nbytes)
    methods = [("bnb", lambda: F.dequantize_4bit(q, state, out=out_bnb)),
               ("sloth", lambda: dequantize_4bit(q, state, out=out_sloth))]
    rows = []
    for name, fn in methods:
        row = {**case, "method": name, **bench(fn, args)}
        for key, gb_key in (("ms", "gbps"), ("graph_ms", "graph_gbps")):
            if row.get(key):
                row[gb_key] = nbytes / (row[key] * 1e-3) / 1e9
                row[gb_key.replace("gbps", "pct_copy")] = 100.0 * row[gb_key] / copy_gbps
        rows.append(row)
    rows[1]["bitwise_equal_bnb"] = bitwise_equal(out_sloth, out_bnb)
    rows[1]["speedup_vs_bnb"] = rows[0]["ms"] / rows[1]["ms"]
    return rows


def run_sweep(shape, copy_gbps, args) -> list[dict]:
    import bitsandbytes.functional as F

    from sloth_core.autotune import override
    from sloth_core.kernels.dequant import dequantize_4bit, dequantize_4bit_heuristic

    dtype = DTYPES[args.dtype]
    q, state = quantized_weight(shape, args)
    state.dtype = dtype
    expected = F.dequantize_4bit(q, state)
    out = torch.empty(shape, dtype=dtype, device="cuda")
    nbytes = bytes_moved(q, state, out)
    heuristic = dequantize_4bit_heuristic(blocksize=args.blocksize, n_elements=out.numel(), dtype=dtype)
    rows = []
    for tile in SWEEP_TILES:
        for warps in SWEEP_WARPS:
            with override("dequantize_4bit", TILE_BYTES=tile, num_warps=warps):
                out.fill_(float("nan"))
                row = dict(shape=f"{shape[0]}x{shape[1]}", TILE_BYTES=tile, num_warps=warps,
                           heuristic=(tile == heuristic["TILE_BYTES"] and warps == heuristic["num_warps"]))
                row.update(bench(lambda: dequantize_4bit(q, state, out=out), args))
                row["bitwise_equal_bnb"] = bitwise_equal(out, expected)
            row["gbps"] = nbytes / (row["ms"] * 1e-3) / 1e9
            row["pct_copy"] = 100.0 * row["gbps"] / copy_gbps
            rows.append(row)
            print(f"sweep {row['shape']} TILE_BYTES={tile} num_warps={warps}: {row['ms'] * 1e3:.1f} us, "
                  f"{row['pct_copy']:.1f}% of copy", file=sys.stderr, flush=True)
    return rows


# --------------------------------------------------------------------------------------------- reporting
def env_info(copy_gbps):
    from sloth_core.bench.env import environment

    return {**environment(), "copy_gbps": copy_gbps}


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def _us(ms):
    return None if ms is None else ms * 1e3


def print_table(header, table):
    try:
        from tabulate import tabulate
    except ImportError:  # pragma: no cover
        print("\t".join(header))
        for line in table:
            print("\t".join(str(c) for c in line))
        return
    print(tabulate(table, headers=header, tablefmt="github", disable_numparse=True))


def print_results(rows):
    header = ["shape", "method", "time_us", "GB/s", "% copy", "graph_us", "graph % copy", "x bnb", "bitwise"]
    table = [[r["shape"], r["method"], _fmt(_us(r.get("ms")), ".1f"), _fmt(r.get("gbps"), ".0f"),
              _fmt(r.get("pct_copy"), ".1f"), _fmt(_us(r.get("graph_ms")), ".1f"),
              _fmt(r.get("graph_pct_copy"), ".1f"), _fmt(r.get("speedup_vs_bnb"), ".2f"),
              {True: "yes", False: "NO"}.get(r.get("bitwise_equal_bnb"), "")] for r in rows]
    print_table(header, table)


def print_sweep(rows):
    header = ["shape", "TILE_BYTES", "num_warps", "time_us", "% copy", "graph_us", "bitwise", "heuristic"]
    table = [[r["shape"], r["TILE_BYTES"], r["num_warps"], _fmt(_us(r["ms"]), ".1f"), _fmt(r["pct_copy"], ".1f"),
              _fmt(_us(r.get("graph_ms")), ".1f"), "yes" if r["bitwise_equal_bnb"] else "NO",
              "*" if r["heuristic"] else ""] for r in sorted(rows, key=lambda r: r["ms"])]
    print_table(header, table)


def goal_lines(rows):
    lines = []
    target = f"{TARGET_SHAPE[0]}x{TARGET_SHAPE[1]}"
    for r in rows:
        if r["method"] == "sloth" and r["shape"] == target:
            frac = r["pct_copy"] / 100.0
            lines.append(f"goal bandwidth {target}: {r['pct_copy']:.1f}% of copy (target >= "
                         f"{TARGET_FRACTION:.0%}) {'PASS' if frac >= TARGET_FRACTION else 'MISS'}")
    bad = [r["shape"] for r in rows if r.get("bitwise_equal_bnb") is False]
    lines.append("bitwise vs bnb: " + (f"MISMATCH for {', '.join(bad)}" if bad else "all identical"))
    return lines


def parse_shape(text):
    try:
        rows, cols = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not ROWSxCOLS") from None
    return rows, cols


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in DEFAULT_SHAPES])
    p.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4")
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--no-nested", action="store_true", help="plain float32 absmax (compress_statistics=False)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="output dtype")
    p.add_argument("--sweep", action="store_true", help="also time every launch config on --sweep-shape")
    p.add_argument("--sweep-shape", type=parse_shape, default=TARGET_SHAPE)
    p.add_argument("--warmup-ms", type=int, default=25)
    p.add_argument("--rep-ms", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (default benchmarks/results/dequant_<date>.json)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_dequant: no CUDA device available; this benchmark needs a GPU. Nothing was run.")
        return 0
    if importlib.util.find_spec("bitsandbytes") is None:
        print("bench_dequant: bitsandbytes is not installed; it is the baseline and the ground truth.")
        return 2
    out = args.out or Path(__file__).resolve().parent / "results" / \
        f"dequant_{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    copy_gbps = copy_bandwidth(args)
    free_memory()
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s", file=sys.stderr, flush=True)
    env = env_info(copy_gbps)
    rows, sweep = [], []
    for shape in args.shapes:
        shape_rows = run_shape(shape, copy_gbps, args)
        free_memory()  # the weight and buffers of this shape died with run_shape's frame
        rows.extend(shape_rows)
        for r in shape_rows:  # progress, and a partial record if the run is cut short
            print(f"{r['shape']} {r['method']}: {r['ms'] * 1e3:.1f} us, {r['pct_copy']:.1f}% of copy",
                  file=sys.stderr, flush=True)
        out.write_text(json.dumps(dict(env=env, results=rows), indent=2))
    if args.sweep:
        sweep = run_sweep(args.sweep_shape, copy_gbps, args)
        free_memory()
    print(f"device-to-device copy (1 GiB): {copy_gbps:.0f} GB/s")
    print_results(rows)
    if sweep:
        print()
        print_sweep(sweep)
    goals = goal_lines(rows)
    for line in goals:
        print(line)
    out.write_text(json.dumps(dict(env=env, goals=goals, results=rows, sweep=sweep), indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
