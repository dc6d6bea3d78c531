"""Benchmark results: JSON files, a terminal table, a Markdown report, PNG charts, and the change between two runs.

A results dict::

    {"env": {...environment()...},
     "ceilings": {"hbm_gbps": 4800, "bf16_tflops": 989},          # what pct_of_ceiling is relative to
     "rows": [{"kind": "kernel", "kernel": "rms_norm", "model": "llama-3-8b", "tokens": 8192, "mode": "fwd_bwd",
               "provider": "sloth_core", "median_ms": 0.21, "gbps": 3100.0, "pct_of_ceiling": 64.6,
               "peak_extra_gib": 0.5, "speedup_vs": {"hf_eager": 3.2}},
              {"kind": "train", "setup": "lora_bf16", ..., "tflops": 410.0, ...}]}

Kernel rows name a ``kernel`` and give ``gbps`` (memory-bound kernels) or ``tflops``; training rows name a
``setup`` and may give ``tokens_per_s`` and ``peak_gib``. Every field but ``kind``, the name and ``provider`` may
be missing (shown blank). ``skipped`` / ``error`` (a reason), ``mismatch`` (with ``max_rel_err``: the provider
disagrees with the reference) and ``note`` go to the ``note`` column. Rows are identified across files by
(kind, kernel/setup, model, tokens, mode, provider).
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
            "% of ceiling", "peak extra GiB", "speedup vs", "note"]
_KIND_TITLES = {"kernel": "Kernels", "train": "Training"}
_ENV_IGNORED_IN_COMPARE = ("date", "command")

Results = Mapping[str, Any]


# ---------------------------------------------------------------------------------------------- files


def write_json(results: Results, path: str | Path) -> Path:
    """Write ``results`` as indented JSON (parent folders are created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, sort_keys=False, default=str) + "\n")
    return path


def publish(results: dict, text: str, out: str | Path) -> int:
    """The end of a benchmark script: ``results`` gets the environment, ``text`` (its table) and the total time
    are printed, the JSON is written to ``out``; returns 0, the script's exit status."""
    from .env import environment

    results["environment"] = environment()
    print(text)
    print(f"total {results['total_s']:.1f} s")
    write_json(results, out)
    return 0


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


def write_all(results: Results, out_dir: str | Path, stem: str) -> dict[str, Any]:
    """Every output of a run: ``{out_dir}/{stem}.json`` (environment and every figure), ``{stem}.md`` (the
    Markdown report) and PNG charts under ``{stem}_charts/`` (when matplotlib is importable). Returns the paths
    (``json``, ``markdown``, ``charts``: a list)."""
    out_dir = Path(out_dir)
    paths: dict[str, Any] = {"json": write_json(results, out_dir / f"{stem}.json")}
    md = out_dir / f"{stem}.md"
    md.write_text(markdown_report(results) + "\n")
    paths["markdown"] = md
    charts = out_dir / f"{stem}_charts"
    paths["charts"] = png_charts(results, charts) + summary_charts(results, charts)
    return paths


def write_and_list(results: Results, out_dir: str | Path, stem: str) -> dict[str, Any]:
    """:func:`write_all`, then a ``wrote <path>`` line per file written (what every ``bench`` command prints)."""
    paths = write_all(results, out_dir, stem)
    for path in (paths["json"], paths["markdown"], *paths["charts"]):
        print(f"wrote {path}")
    return paths


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
    if row.get("tokens_per_s") is not None:
        return f"{row['tokens_per_s']:.0f} tokens/s"
    return ""


def _speedups(row: Mapping[str, Any]) -> str:
    return ", ".join(f"{p} x{x:.2f}" for p, x in (row.get("speedup_vs") or {}).items() if x is not None)


def _note(row: Mapping[str, Any]) -> str:
    """Why a row has no time, or that its provider disagrees with the reference (one line)."""
    parts = []
    if row.get("mismatch"):
        parts.append(f"MISMATCH (rel err {_num(row.get('max_rel_err'), '.2g')})")
    for key in ("error", "skipped"):
        if row.get(key):
            parts.append(f"{key}: {row[key]}")
    if row.get("note"):
        parts.append(str(row["note"]))
    return " ".join("; ".join(parts).split())


def _cells(row: Mapping[str, Any]) -> list:
    return [row.get("kind", ""), row_name(row), row.get("model", ""), _num(row.get("tokens"), "d"),
            row.get("mode", ""), row.get("provider", ""), _num(row.get("median_ms")), _throughput(row),
            _num(row.get("pct_of_ceiling"), ".1f"), _num(row.get("peak_extra_gib"), ".3g"), _speedups(row),
            _note(row)]


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


def _pyplot(quiet: bool = False):
    """``matplotlib.pyplot`` on the Agg backend, or ``None`` (with a note on stderr unless ``quiet``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not quiet:
            print("sloth-core bench: matplotlib is not importable; no charts written (pip install matplotlib)",
                  file=sys.stderr)
        return None
    return plt


def png_charts(results: Results, out_dir: str | Path) -> list[Path]:
    """One bar chart of median ms by provider per (kind, kernel/setup, mode), over (model, tokens); the PNG paths.

    matplotlib is optional (not a dependency of sloth_core): without it a note goes to stderr and nothing is
    written.
    """
    plt = _pyplot()
    if plt is None:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (kind, name, mode), rows in _groups(results.get("rows") or [], "median_ms").items():
        paths.append(_bar_chart(plt, rows, f"{name} {mode or ''}".strip(), out_dir / f"{_slug(kind, name, mode)}.png"))
    return paths


def summary_charts(results: Results, out_dir: str | Path) -> list[Path]:
    """The summary charts; the PNG paths (none without matplotlib; :func:`png_charts` says so):

    * ``speedup_vs_hf_eager_<mode>.png``: per kernel, each provider's speedup over ``hf_eager`` (geometric mean
      over models and token counts; above 1 is faster);
    * ``kernel_<kernel>_<mode>_memory.png``: peak extra GiB per provider over (model, tokens);
    * ``train_steps.png``: training rows' tokens/s and peak GiB per provider over (setup, model).
    """
    plt = _pyplot(quiet=True)
    if plt is None:
        return []
    out_dir = Path(out_dir)
    rows = results.get("rows") or []
    charts: list[tuple[Path, Any]] = []
    for mode, series in _speedup_series(rows).items():
        charts.append((out_dir / f"{_slug('speedup_vs_hf_eager', mode)}.png",
                       lambda ax, series=series, mode=mode: _draw_bars(
                           ax, series, f"speedup over hf_eager, {mode} (geometric mean over models, tokens)",
                           "x faster than hf_eager", baseline=1.0)))
    for (kind, name, mode), group in _groups(rows, "peak_extra_gib", kind="kernel").items():
        charts.append((out_dir / f"{_slug(kind, name, mode, 'memory')}.png",
                       lambda ax, group=group, name=name, mode=mode: _draw_bars(
                           ax, _case_series(group, "peak_extra_gib"), f"{name} {mode or ''} peak memory".strip(),
                           "peak extra GiB (lower is better)")))
    train = [r for r in rows if r.get("kind") == "train"]
    panels = [(key, label) for key, label in (("tokens_per_s", "tokens/s (higher is better)"),
                                              ("peak_gib", "peak GiB (lower is better)"))
              if any(r.get(key) is not None for r in train)]
    if panels:
        charts.append((out_dir / "train_steps.png", [
            (lambda ax, key=key, label=label: _draw_bars(
                ax, _case_series(train, key, case=lambda r: (row_name(r), r.get("model"))),
                f"training step: {key}", label)) for key, label in panels]))
    if charts:
        out_dir.mkdir(parents=True, exist_ok=True)
    return [_save(plt, path, draw) for path, draw in charts]


def _groups(rows: Iterable[Mapping[str, Any]], field: str, kind: str | None = None) -> dict[tuple, list]:
    """Rows with ``field`` set (and of ``kind`` when given), by (kind, kernel/setup, mode)."""
    groups: dict[tuple, list] = {}
    for row in rows:
        if row.get(field) is not None and kind in (None, row.get("kind")):
            groups.setdefault((row.get("kind"), row_name(row), row.get("mode")), []).append(row)
    return groups


Series = tuple[list[str], dict[str, list[float]]]  # x labels, {provider: one value per label}


def _case_series(rows: list, field: str, case=lambda r: (r.get("model"), r.get("tokens"))) -> Series:
    """``field`` per provider over the cases (default: (model, tokens)) of ``rows``."""
    cases = list(dict.fromkeys(case(r) for r in rows))
    values = {(case(r), r.get("provider")): r[field] for r in rows if r.get(field) is not None}
    providers = list(dict.fromkeys(r.get("provider") for r in rows))
    labels = ["\n".join(str(p) for p in c if p not in (None, "")) for c in cases]
    return labels, {str(p): [values.get((c, p), math.nan) for c in cases] for p in providers}


def _speedup_series(rows: list) -> dict[str, Series]:
    """Per mode: the geometric mean over (model, tokens) of each provider's speedup over hf_eager, per kernel."""
    ratios: dict[str, dict[tuple, list]] = {}
    for row in rows:
        x = (row.get("speedup_vs") or {}).get("hf_eager")
        if row.get("kind") == "kernel" and x and row.get("provider") != "hf_eager":
            ratios.setdefault(str(row.get("mode")), {}).setdefault((row_name(row), row.get("provider")), []).append(x)
    out = {}
    for mode, by_key in ratios.items():
        kernels = list(dict.fromkeys(k for k, _ in by_key))
        providers = list(dict.fromkeys(p for _, p in by_key))
        geo = {key: math.exp(sum(math.log(v) for v in vs) / len(vs)) for key, vs in by_key.items()}
        out[mode] = (kernels, {str(p): [geo.get((k, p), math.nan) for k in kernels] for p in providers})
    return out


def _draw_bars(ax, series: Series, title: str, ylabel: str, baseline: float | None = None) -> None:
    labels, values = series
    width = 0.8 / max(1, len(values))
    for i, (provider, ys) in enumerate(values.items()):
        xs = [c + (i - (len(values) - 1) / 2) * width for c in range(len(labels))]
        ax.bar(xs, ys, width=width, label=provider)
    if baseline is not None:
        ax.axhline(baseline, color="black", linewidth=0.8)
    long = max((len(line) for label in labels for line in label.splitlines()), default=0) > 12
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8, rotation=30 if long else 0, ha="right" if long else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


def _save(plt, path: Path, draw) -> Path:
    """One figure with a panel per drawing function (``draw``: one function or a list), saved to ``path``."""
    draws = draw if isinstance(draw, list) else [draw]
    fig, axes = plt.subplots(len(draws), 1, figsize=(10.0, 4.0 * len(draws)), squeeze=False)
    try:
        for ax, fn in zip(axes[:, 0], draws):
            fn(ax)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def _bar_chart(plt, rows: list, title: str, path: Path) -> Path:
    labels, values = _case_series(rows, "median_ms")
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(labels) * max(1, len(values)) * 0.5), 4.0))
    try:
        _draw_bars(ax, (labels, values), title, "median ms (lower is better)")
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
