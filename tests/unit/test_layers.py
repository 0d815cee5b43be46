"""The package's house rules, read from its source: floors, no circles, no import hidden in a function
without a reason, no oversized file or class without one.

Floors, lowest first: an arrow may point to its own floor or below, never up.
- base: ``config`` (and ``cgroups``), ``errors``, ``serde`` (and ``segments``, ``skim``), ``metrics`` (import nothing of ours above them)
- core: ``core/`` (pure: planning, imaging, the join's logic; no I/O)
- adapters: ``adapters/`` (Kafka, S3, HTTP: thin)
- agents: ``agents/``, ``join/`` (the roles)
- shell: the rest (the worker process, the API, the CLI, the demo, the client, the local stack)

``python tests/unit/test_layers.py`` prints the import graph by floor.
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "streams"
FLOORS = ("base", "core", "adapters", "agents", "shell")
BASE = {"streams.cgroups", "streams.config", "streams.errors", "streams.serde", "streams.segments", "streams.skim", "streams.metrics"}
MAX_FILE_LINES, MAX_CLASS_LINES = 500, 200


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def floor(module: str) -> int:
    if module in BASE:
        return 0
    part = module.split(".")[1] if "." in module else ""
    return {"core": 1, "adapters": 2, "agents": 3, "join": 3}.get(part, 4)


class Import:
    def __init__(self, source: str, target: str, line: int, inner: bool):
        self.source, self.target, self.line, self.inner = source, target, line, inner


def imports(known: dict[str, Path]) -> list[Import]:
    """Every import of one of our modules, at the top or inside a function (the target is the module
    itself, not the package, when a name imported is a module)."""
    found = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        inner_lines = {node.lineno for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "streams"]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                if base.split(".")[0] == "streams":
                    targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            for target in dict.fromkeys(targets):
                if target != name and target in known:
                    found.append(Import(name, target, node.lineno, node.lineno in inner_lines))
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def graph() -> tuple[dict[str, Path], list[Import], dict[str, set[str]]]:
    known = modules()
    found = imports(known)
    edges: dict[str, set[str]] = defaultdict(set)
    for imp in found:
        edges[imp.source].add(imp.target)
    return known, found, edges


def short(module: str) -> str:
    return module.removeprefix("streams.") or "streams"


def test_no_import_circles():
    _known, _found, edges = graph()
    assert cycles(edges) == [], "import cycles (an import inside a function counts too)"


def test_no_arrow_points_up():
    _known, found, _edges = graph()
    up = sorted({f"{short(i.source)} ({FLOORS[floor(i.source)]}) -> {short(i.target)} ({FLOORS[floor(i.target)]})"
                 for i in found if floor(i.target) > floor(i.source)})
    assert up == []


def test_an_import_inside_a_function_says_why():
    """Allowed for start-up cost (``imagefork --help`` should not load confluent-kafka, boto3 and Pillow) and said
    beside it: a comment on the import's line or on the line just above its group of imports."""
    known, found, _edges = graph()
    silent = []
    for imp in found:
        if not imp.inner:
            continue
        lines = known[imp.source].read_text().splitlines()
        line = imp.line - 1
        while line > 0 and lines[line - 1].strip().startswith(("from ", "import ")) and "#" not in lines[line]:
            line -= 1  # the first of a group of imports
        beside = lines[imp.line - 1] + " " + lines[line] + " " + (lines[line - 1] if line else "")
        if "#" not in beside:
            silent.append(f"{known[imp.source].relative_to(ROOT)}:{imp.line} imports {short(imp.target)}")
    assert silent == []


def sizes() -> list[str]:
    """Files over MAX_FILE_LINES and classes over MAX_CLASS_LINES whose first lines do not say why."""
    oversized = []
    for _name, path in modules().items():
        text = path.read_text()
        lines = text.splitlines()
        head = "\n".join(lines[:12])
        if len(lines) > MAX_FILE_LINES and "Longer than" not in head:
            oversized.append(f"{path.relative_to(ROOT)}: {len(lines)} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                doc = ast.get_docstring(node) or ""
                if "Longer than" not in doc:
                    oversized.append(f"{path.relative_to(ROOT)}: class {node.name} "
                                     f"{node.end_lineno - node.lineno + 1} lines")
    return oversized


def test_no_oversized_file_or_class_without_a_reason():
    """A file over 500 lines or a class over 200 says why at its top ("Longer than ... because ...")."""
    assert sizes() == []


def main() -> int:
    known, found, edges = graph()
    for level, label in enumerate(FLOORS):
        print(f"{label}:")
        for name in sorted(m for m in known if floor(m) == level):
            arrows = sorted(short(t) for t in edges.get(name, ()))
            print(f"  {short(name)}" + (f" -> {', '.join(arrows)}" if arrows else ""))
    problems = cycles(edges)
    print(f"cycles: {problems or 'none'}")
    print(f"oversized without a reason: {sizes() or 'none'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
