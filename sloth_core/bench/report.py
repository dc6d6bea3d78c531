"""Benchmark results: JSON files, a terminal table, a Markdown report, PNG charts, and the change between two runs.

A results dict::

    {"env": {...environment()...},
     "ceilings": {"hbm_gbps": 4800, "bf16_tflops": 989},          # what pct_of_ceiling is relative to
     "rows": [{"kind": "kernel", "kernel": "rms_norm", "model": "llama-3-8b", "tokens": 8192, "mode": "fwd_bwd",
               "provider": "sloth_core", "median_ms": 0.21, "gbps": 3100.0, "pct_of_ceiling": 64.6,
               "peak_extra_gib": 0.5, "speedup_vs": {"hf_eager": 3.2}},
              {"kind": "train", "setup": "lora_bf16", ..., "tflops": 410.0, ...}]}

Kernel rows name a ``kernel`` and give ``gbps`` (memory-bound kernels) or ``tflops``; training rows name a
``setup``. Every field but ``kind``, the name and ``provider`` may be missing (shown blank). Rows are identified
across files by (kind, kernel/setup, model, tokens, mode, provider).
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

from tabulate import tabulate

KEY_FIELDS = ("kind", "name", "model", "tokens", "mode", "provider")
_HEADERS = ["kind", "kernel/setup", "model", "tokens", "mode", "provider", "median ms", "throughput",
            "% of ceiling", "peak extra GiB", "speedup vs"]
_KIND_TITLES = {"kernel": "Kernels", "train": "Training"}
_ENV_IGNORED_IN_COMPARE = ("date", "command")

Results = Mapping[str, Any]


# ---------------------------------------------------------------------------------------------- files


def write_json(results: Results, path: str | Path) -> Path:
    """Write ``results`` as indented JSON (parent folders are created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    return path


def read_json(path: str | Path) -> dict:
    """A results dict from ``path``; ``ValueError`` naming the file when it is not a results file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path}: not a sloth-core bench results file (no 'rows' list)")
    return data


# ---------------------------------------------------------------------------------------------- rows


def row_name(row: Mapping[str, Any]) -> str:
    """The kernel (kernel rows) or setup (training rows) a row measures."""
    return str(row.get("kernel") or row.get("setup") or "")


def row_key(row: Mapping[str, Any]) -> tuple:
    """What identifies a row across result files: (kind, kernel/setup, model, tokens, mode, provider)."""
    return (row.get("kind"), row_name(row), row.get("model"), row.get("tokens"), row.get("mode"), row.get("provider"))


def _num(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return ""
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def _throughput(row: Mapping[str, Any]) -> str:
    if row.get("gbps") is not None:
        return f"{row['gbps']:.0f} GB/s"
    if row.get("tflops") is not None:
        return f"{row['tflops']:.1f} TFLOP/s"
    return ""


def _speedups(row: Mapping[str, Any]) -> str:
    return ", ".join(f"{p} x{x:.2f}" for p, x in (row.get("speedup_vs") or {}).items() if x is not None)


def _cells(row: Mapping[str, Any]) -> list:
    return [row.get("kind", ""), row_name(row), row.get("model", ""), _num(row.get("tokens"), "d"),
            row.get("mode", ""), row.get("provider", ""), _num(row.get("median_ms")), _throughput(row),
            _num(row.get("pct_of_ceiling"), ".1f"), _num(row.get("peak_extra_gib"), ".3g"), _speedups(row)]


def _by_kind(rows: Iterable[Mapping[str, Any]]) -> dict[str, list]:
    groups: dict[str, list] = {}
    for row in rows:
        groups.setdefault(str(row.get("kind", "")), []).append(row)
    return groups


# ---------------------------------------------------------------------------------------------- views


def terminal_table(results: Results) -> str:
    """All rows as one plain-text table (one line a row)."""
    rows = results.get("rows") or []
    if not rows:
        return "(no results)"
    return tabulate([_cells(r) for r in rows], headers=_HEADERS, tablefmt="simple", disable_numparse=True)


def _key_value_table(mapping: Mapping[str, Any]) -> str:
    return tabulate([[k, v] for k, v in mapping.items()], headers=["", ""], tablefmt="github",
                    disable_numparse=True)


def markdown_report(results: Results) -> str:
    """A Markdown report: environment, ceilings, then one results table per kind (kernels, training)."""
    env = results.get("env") or {}
    lines = ["# sloth-core bench report", ""]
    if env:
        lines += ["## Environment", "", _key_value_table(env), ""]
    if results.get("ceilings"):
        lines += ["## Ceilings", "", "`% of ceiling` is relative to these.", "",
                  _key_value_table(results["ceilings"]), ""]
    groups = _by_kind(results.get("rows") or [])
    if not groups:
        lines += ["(no results)", ""]
    for kind, rows in groups.items():
        lines += [f"## {_KIND_TITLES.get(kind, kind)}", "",
                  tabulate([_cells(r) for r in rows], headers=_HEADERS, tablefmt="github", disable_numparse=True),
                  ""]
    return "\n".join(lines)


def _slug(*parts: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(str(p) for p in parts if p not in (None, ""))).strip("_")


def png_charts(results: Results, out_dir: str | Path) -> list[Path]:
    """One bar chart of median ms by provider per (kind, kernel/setup, mode), over (model, tokens); the PNG paths.

    matplotlib is optional (not a dependency of sloth_core): without it a note goes to stderr and nothing is
    written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("sloth-core bench: matplotlib is not importable; no charts written (pip install matplotlib)",
              file=sys.stderr)
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple, list] = {}
    for row in results.get("rows") or []:
        if row.get("median_ms") is not None:
            groups.setdefault((row.get("kind"), row_name(row), row.get("mode")), []).append(row)
    paths = []
    for (kind, name, mode), rows in groups.items():
        paths.append(_bar_chart(plt, rows, f"{name} {mode or ''}".strip(), out_dir / f"{_slug(kind, name, mode)}.png"))
    return paths


def _bar_chart(plt, rows: list, title: str, path: Path) -> Path:
    cases = list(dict.fromkeys((r.get("model"), r.get("tokens")) for r in rows))
    providers = list(dict.fromkeys(r.get("provider") for r in rows))
    ms = {(r.get("model"), r.get("tokens"), r.get("provider")): r["median_ms"] for r in rows}
    width = 0.8 / max(1, len(providers))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(cases) * max(1, len(providers)) * 0.5), 4.0))
    try:
        for i, provider in enumerate(providers):
            xs = [c + (i - (len(providers) - 1) / 2) * width for c in range(len(cases))]
            ys = [ms.get((model, tokens, provider), math.nan) for model, tokens in cases]
            ax.bar(xs, ys, width=width, label=str(provider))
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{m}\n{t}" for m, t in cases], fontsize=8)
        ax.set_ylabel("median ms (lower is better)")
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- compare


def _load(results: Results | str | Path) -> Results:
    return read_json(results) if isinstance(results, (str, Path)) else results


def _env_changes(a: Results, b: Results) -> list[str]:
    ea, eb = a.get("env") or {}, b.get("env") or {}
    return [f"  {k}: {ea.get(k)} -> {eb.get(k)}" for k in dict.fromkeys([*ea, *eb])
            if k not in _ENV_IGNORED_IN_COMPARE and ea.get(k) != eb.get(k)]


def compare(a: Results | str | Path, b: Results | str | Path) -> str:
    """The change from run ``a`` to run ``b`` (results dicts or JSON paths): one line per row key with the old
    and new median ms and new/old (below 1: ``b`` is faster); rows present in one run only are listed as such;
    environment differences (GPU, versions, commit) and the geometric mean of the ratios come first."""
    ra, rb = _load(a), _load(b)
    old = {row_key(r): r for r in ra.get("rows") or []}
    new = {row_key(r): r for r in rb.get("rows") or []}
    table, ratios = [], []
    for key in dict.fromkeys([*old, *new]):
        o, n = old.get(key, {}).get("median_ms"), new.get(key, {}).get("median_ms")
        if key not in new:
            change = "only in A"
        elif key not in old:
            change = "only in B"
        elif o and n is not None:
            ratios.append(n / o)
            change = f"{n / o:.3f}"
        else:
            change = "no time"
        kind, name, model, tokens, mode, provider = key
        table.append([kind, name, model, _num(tokens, "d"), mode, provider, _num(o), _num(n), change])
    lines = []
    changes = _env_changes(ra, rb)
    if changes:
        lines += ["environment changes (A -> B):", *changes]
    if ratios:
        geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        lines.append(f"{len(ratios)} rows in both; geometric mean of new/old: {geo:.3f} (below 1: B is faster)")
    else:
        lines.append("no rows in both runs")
    headers = ["kind", "kernel/setup", "model", "tokens", "mode", "provider", "old ms", "new ms", "new/old"]
    lines.append(tabulate(table, headers=headers, tablefmt="simple", disable_numparse=True) if table
                 else "(no results)")
    return "\n".join(lines)
