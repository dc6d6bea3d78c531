"""What a declared architecture expects ``optimize`` to replace (:attr:`Architecture.expects`) against what it
got: each expected pattern group that no module got, or that some matching module was left without, with one
module and one readable reason. ``optimize`` warns with these lines; ``demo`` prints them and fails."""
from __future__ import annotations

from dataclasses import dataclass

from .registry.architecture import Architecture
from .reporting import ReportRow


@dataclass(frozen=True)
class Missing:
    pattern: str   # the group's names, "gated_mlp / lora_mlp"
    module: str    # a module left without it ("" when no module matched)
    reason: str    # one readable line
    count: int = 0  # modules left without it (0: none matched at all)

    def line(self) -> str:
        if not self.count:
            return f"{self.pattern}: not applied ({self.reason})"
        where = self.module or "<root>"
        more = f" and {self.count - 1} more" if self.count > 1 else ""
        return f"{self.pattern}: not applied to {where}{more}: {self.reason}"


def _first_line(text: str, limit: int = 240) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "no reason given"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def missing(arch: Architecture, rows: list[ReportRow], wanted: set[str] | None = None) -> list[Missing]:
    """The groups of ``arch.expects`` not met by ``rows`` (``wanted``: the pattern names the caller asked for;
    a group none of whose patterns was asked for is not expected)."""
    out = []
    for group in arch.expects:
        names = [n for n in group if wanted is None or n in wanted]
        if not names:
            continue
        mine = [r for r in rows if r.pattern in names]
        done = {r.module for r in mine if r.status == "replaced"}
        left = [r for r in mine if r.status != "replaced" and r.module not in done]
        modules = list(dict.fromkeys(r.module for r in left))
        label = " / ".join(dict.fromkeys(r.pattern for r in left)) or " / ".join(names)
        if modules:
            out.append(Missing(label, modules[0], _first_line(left[0].detail), len(modules)))
        elif not done:
            out.append(Missing(label, "", "no module of the model matched it"))
    return out
