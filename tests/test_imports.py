"""No import circle anywhere in ``sloth_core``: every ``import`` statement of the package, at module level or inside a
function (a lazy import is still a dependency a reader must chase), read from the source; a circle fails the test
and is named."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "sloth_core"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _targets(module: str, is_package: bool, node: ast.AST, mods: dict) -> list[str]:
    """The package modules an import statement depends on (``from pkg import submodule`` names the submodule, not
    ``pkg``; the parent packages Python initializes on the way are not counted)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in mods]
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level:
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
    found = subs if len(subs) == len(node.names) else [target, *subs]
    return [t for t in found if t in mods]


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for module, path in mods.items():
        is_package = path.name == "__init__.py"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps.update(t for t in _targets(module, is_package, node, mods) if t != module)
        graph[module] = deps
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    graph = import_graph()
    assert len(graph) > 40 and "sloth_core.kernels.rms_norm" in graph["sloth_core.registry.patterns.rms_norm"]
    found = circles(graph)
    assert not found, "\n".join(f"{c}: " + "; ".join(f"{v} -> {sorted(graph[v] & set(c))}" for v in c)
                                for c in found)


def test_a_circle_is_found():
    """The check itself: a lazy import back from a module its importer depends on is a circle."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]


def test_kernels_know_the_memory_code_only_through_their_seam():
    """The kernels import nothing from checkpointing, the memory package, the rewriter or the API: they ask
    ``sloth_core.recompute`` for a stash typed by ``sloth_core.kernels.stash``, which the memory package's stash
    implements."""
    import torch

    from sloth_core.kernels.stash import LayerStash as Seam
    from sloth_core.memory.host import Group
    from sloth_core.memory.stash import LayerStash

    graph = import_graph()
    kernels = [m for m in graph if m.startswith("sloth_core.kernels")]
    banned = ("sloth_core.checkpointing", "sloth_core.memory", "sloth_core.rewriter", "sloth_core.api",
              "sloth_core.registry", "sloth_core.attention_offload")
    assert kernels and not {(k, d) for k in kernels for d in graph[k] if d.startswith(banned)}
    assert isinstance(LayerStash("host", Group(torch.device("cpu"))), Seam)
