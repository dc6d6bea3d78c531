"""Report rows: what was replaced, and what matched structurally but was skipped, with the reason."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ReportRow:
    module: str      # path inside the model (``named_modules`` name; "" is the root)
    pattern: str
    kernel: str
    status: str      # "replaced" | "skipped"
    detail: str = ""  # parameters used, or the reason for skipping (readable, one line per candidate)
    error: str = ""   # the full text of the exception behind a skip, where one was raised

    def as_dict(self) -> dict:
        return asdict(self)


def format_table(rows: list[ReportRow], max_detail: int = 100) -> str:
    """The rows as a Markdown table; a detail longer than ``max_detail`` is shortened in the table, with a numbered
    note under it giving it in full (a skip reason is never lost)."""
    from tabulate import tabulate

    if not rows:
        return "(nothing matched)"
    body, notes = [], []
    for r in rows:
        detail = r.detail
        if len(detail) > max_detail:
            notes.append(detail)
            detail = f"{detail[: max_detail - 10].rstrip()}... [{len(notes)}]"
        body.append((r.module or "<root>", r.pattern, r.kernel, r.status, detail))
    table = tabulate(body, headers=("module", "pattern", "kernel", "status", "detail"), tablefmt="github")
    return table + "".join(f"\n[{i}] {note}" for i, note in enumerate(notes, 1))


def summary(rows: list[ReportRow]) -> str:
    counts: dict[tuple[str, str], int] = {}
    for r in rows:
        counts[(r.pattern, r.status)] = counts.get((r.pattern, r.status), 0) + 1
    parts = [f"{p} {s}: {n}" for (p, s), n in sorted(counts.items())]
    return "; ".join(parts) if parts else "nothing matched"
