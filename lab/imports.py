"""The project's import graph, read from the source (every ``import`` statement, at any depth,
and every ``importlib.import_module`` / ``__import__`` call), not from what a run happened to load.

``python -m lab.imports [ROOT]`` prints the package-level edges and any import cycles between
modules; ``tests/lab/test_layering.py`` asserts the layers and the absence of cycles with it.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

#: Each package may import only itself and the packages before it.
LAYERS = ("detector", "components", "pipelines", "lab", "backdoor_gate")
#: Third-party packages the pure library must never import.
FORBIDDEN_IN_LIBRARY = ("kfp", "mlflow", "fastapi", "uvicorn", "facenet_pytorch", "torchvision", "PIL")


@dataclass
class Graph:
    modules: set[str] = field(default_factory=set)
    #: importer -> {(imported module, line)}; imported may be third-party
    edges: dict[str, set[tuple[str, int]]] = field(default_factory=lambda: defaultdict(set))
    #: (module, line, source) of imports whose target is not a string literal
    unresolved: list[tuple[str, int, str]] = field(default_factory=list)


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_dynamic_import(call: ast.Call) -> bool:
    f = call.func
    if isinstance(f, ast.Name):
        return f.id in ("__import__", "import_module")
    return isinstance(f, ast.Attribute) and f.attr == "import_module"


def build(root: str | Path, packages: tuple[str, ...] = LAYERS) -> Graph:
    root = Path(root)
    g = Graph()
    files = [p for pkg in packages if (root / pkg).is_dir() for p in sorted((root / pkg).rglob("*.py"))]
    g.modules = {_module_name(root, p) for p in files}
    for path in files:
        me = _module_name(root, path)
        package = me if path.name == "__init__.py" else me.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    g.edges[me].add((a.name, node.lineno))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    g.edges[me].add((sub if sub in g.modules else base, node.lineno))
            elif isinstance(node, ast.Call) and _is_dynamic_import(node):
                arg = node.args[0] if node.args else None
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    g.edges[me].add((arg.value, node.lineno))
                else:
                    g.unresolved.append((me, node.lineno, ast.unparse(node)))
    return g


def top(module: str) -> str:
    return module.split(".", 1)[0]


def layer_violations(g: Graph) -> list[str]:
    """Imports of a later layer, and third-party packages the library must not import."""
    rank = {p: i for i, p in enumerate(LAYERS)}
    out = []
    for me, targets in sorted(g.edges.items()):
        for target, line in sorted(targets):
            t = top(target)
            if t in rank and rank[t] > rank[top(me)]:
                out.append(f"{me}:{line} imports {target} (layer {t} is above {top(me)})")
            if top(me) == "detector" and t in FORBIDDEN_IN_LIBRARY:
                out.append(f"{me}:{line} imports {target} (the library never imports {t})")
    return out


def cycles(g: Graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), over project modules only."""
    adj = {m: sorted({t for t, _ in g.edges.get(m, ()) if t in g.modules and t != m}) for m in g.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in adj[v]:
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

    for m in sorted(g.modules):
        if m not in index:
            visit(m)
    return sorted(out)


def package_edges(g: Graph) -> dict[str, dict[str, int]]:
    """Between top-level packages: how many import statements go from one to another."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for me, targets in g.edges.items():
        for target, _ in targets:
            if top(target) in LAYERS and top(target) != top(me):
                out[top(me)][top(target)] += 1
    return {k: dict(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0] if args else ".")
    g = build(root)
    print(f"{len(g.modules)} modules under {root.resolve()}")
    for src, dsts in sorted(package_edges(g).items()):
        print(f"  {src:14s} -> " + ", ".join(f"{d} ({n})" for d, n in sorted(dsts.items())))
    cyc = cycles(g)
    print(f"import cycles: {len(cyc)}")
    for c in cyc:
        print("  " + " <-> ".join(c))
    bad = layer_violations(g)
    print(f"layer violations: {len(bad)}")
    for b in bad:
        print("  " + b)
    for m, line, src in g.unresolved:
        print(f"  unresolved dynamic import {m}:{line}: {src}")
    return 1 if (cyc or bad or g.unresolved) else 0


if __name__ == "__main__":
    sys.exit(main())
