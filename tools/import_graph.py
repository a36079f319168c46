"""The package's internal import graph, read from the source with ``ast``: the layer test uses it.

    python tools/import_graph.py        # counts, cycles, upward and function-local imports

A module's layer is the first entry of ``LAYERS`` whose prefix matches its dotted name; a module
may import only from its own layer or lower ones. Function-local imports are listed apart, since
they hide the graph from a reader of the file's first lines; each one left must carry a comment
on its line or the line above naming the optional or heavy dependency it defers.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "scalelab"

# Lowest first. Modules in one entry may import each other (acyclically).
LAYERS: list[tuple[str, ...]] = [
    ("scalelab.errors", "scalelab.runtime"),
    ("scalelab.tokenizer", "scalelab.model"),
    ("scalelab.tasks", "scalelab.data"),
    ("scalelab.config",),
    ("scalelab.parallel",),
    ("scalelab.checkpoint",),
    ("scalelab.train",),
    ("scalelab.run",),
    ("scalelab.infer", "scalelab.evals"),
    ("scalelab.pipeline", "scalelab.posttrain", "scalelab.adapt", "scalelab.report"),
    ("scalelab.scaling", "scalelab.experiments", "scalelab.serve"),
    ("scalelab.cli", "scalelab.__main__", "scalelab"),
]


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    line: int
    local: bool  # inside a function body
    comment: str  # text of a trailing comment on the line or the line above (function-local only)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1] if len(parts) > 1 else parts
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _resolve(target: str, known: dict[str, Path]) -> str | None:
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def edges() -> list[Edge]:
    """One edge per import statement and module it names."""
    known = modules()
    out = set()
    for name, path in known.items():
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        tree = ast.parse(source)
        local_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(f)}
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] if base else [a.name for a in node.names]
            for t in targets:
                if not t.startswith(PACKAGE):
                    continue
                dst = _resolve(t, known)
                if dst is None or dst == name:
                    continue
                local = id(node) in local_nodes
                comment = ""
                if local:
                    here = lines[node.lineno - 1]
                    above = lines[node.lineno - 2].strip() if node.lineno >= 2 else ""
                    comment = here.split("#", 1)[1] if "#" in here else (above[1:] if above.startswith("#") else "")
                out.add(Edge(name, dst, node.lineno, local, comment.strip()))
    return sorted(out, key=lambda e: (e.src, e.line, e.dst))


def layer_of(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or (p != PACKAGE and module.startswith(p + ".")) for p in prefixes):
            return i
    raise KeyError(f"{module} is in no layer of tools/import_graph.py LAYERS")


def upward(all_edges: list[Edge]) -> list[Edge]:
    return [e for e in all_edges if layer_of(e.dst) > layer_of(e.src)]


def cycles(all_edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for e in all_edges:
        graph.setdefault(e.src, set()).add(e.dst)
        graph.setdefault(e.dst, set())
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def line_count() -> int:
    return sum(len(p.read_text(encoding="utf-8").splitlines()) for p in modules().values())


def main() -> int:
    all_edges = edges()
    local = [e for e in all_edges if e.local]
    up = upward(all_edges)
    print(f"lines in {PACKAGE}/: {line_count()}")
    print(f"internal imports: {len(all_edges)}, function-local: {len(local)}, upward: {len(up)}")
    for c in cycles(all_edges):
        print("cycle:", " <-> ".join(c))
    for e in up:
        print(f"upward: {e.src}:{e.line} -> {e.dst}{' (local)' if e.local else ''}")
    if "-v" in sys.argv:
        for e in local:
            print(f"local: {e.src}:{e.line} -> {e.dst}  # {e.comment}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
