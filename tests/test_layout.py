"""The package's layout holds: dependencies point down, no import cycle, small modules, a short top level.

The import graph is read from the source with `ast`, imports inside functions included (a lazy import
is still a dependency). Layers, top to bottom:

    the package itself, __main__
    cli                           flags, commands, errors translated once
    pipeline                      chooses an engine
    engines.inline|local|ray      the engines (no engine imports another)
    engines.job                   what the engines share
    reranker                      the one scoring path
    memory, rank                  batching and budgets; ranking and evaluation
    model, io                     loading and forward passes; file formats
    config, progress              what the user asked for; what the user sees
    errors                        the typed errors
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "rerank_cli"
LAYERS = [
    ("rerank_cli", "rerank_cli.__main__"),
    ("rerank_cli.cli",),
    ("rerank_cli.pipeline",),
    ("rerank_cli.engines", "rerank_cli.engines.inline", "rerank_cli.engines.local", "rerank_cli.engines.ray"),
    ("rerank_cli.engines.job",),
    ("rerank_cli.reranker",),
    ("rerank_cli.memory", "rerank_cli.rank"),
    ("rerank_cli.model", "rerank_cli.io"),
    ("rerank_cli.config", "rerank_cli.progress"),
    ("rerank_cli.errors",),
]
MAX_LINES = 400
MAX_TOP_LEVEL = 10


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The rerank_cli modules that `path` imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known}
    return found - {name}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(path, name, set(found)) for name, path in found.items()}


def layer_of(name: str) -> tuple[int, str]:
    """(depth, group): the layer a module belongs to, and the package or module that is its group."""
    best = None
    for depth, groups in enumerate(LAYERS):
        for group in groups:
            matches = name == group or (group != "rerank_cli" and name.startswith(group + "."))
            if matches and (best is None or len(group) > len(best[1])):
                best = (depth, group)
    assert best is not None, f"{name} is in no layer of tests/test_layout.py; add it where it belongs"
    return best


def cycle_in(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_reader_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "rerank_cli" / "sub"
    pkg.mkdir(parents=True)
    source = pkg / "mod.py"
    source.write_text("from .other import x\n\n\ndef f():\n    from rerank_cli.errors import E\n"
                      "    import rerank_cli.io.readers\n")
    known = {"rerank_cli.sub.other", "rerank_cli.errors", "rerank_cli.io.readers", "rerank_cli.sub.mod"}
    assert imported(source, "rerank_cli.sub.mod", known) == {"rerank_cli.sub.other", "rerank_cli.errors",
                                                             "rerank_cli.io.readers"}


def test_cycle_finder_finds_a_cycle_through_three_modules():
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    cycle = cycle_in(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_dependencies_point_down():
    wrong = []
    for name, targets in graph().items():
        depth, group = layer_of(name)
        for target in sorted(targets):
            t_depth, t_group = layer_of(target)
            if t_group != group and t_depth <= depth:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports that point up or sideways: " + "; ".join(wrong)


def test_modules_are_small_and_the_top_level_is_short():
    found = modules()
    long = {name: n for name, path in found.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= MAX_TOP_LEVEL, f"{len(top)} modules at the top of rerank_cli/: {sorted(top)}"
