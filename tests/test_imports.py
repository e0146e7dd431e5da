"""jaxmm's import graph (read with ast, nothing imported): no module imports another module's
private (``_x``) names, and no two modules import each other, directly or through others
(function-level imports included)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "jaxmm"

# (module, private name) pairs allowed to cross modules: none.
KNOWN: set = set()


def _modules() -> dict:
    mods = {}
    for p in ROOT.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def _resolve(name: str, mods: dict) -> str:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name


def test_no_private_names_across_modules():
    mods = _modules()
    bad = []
    for name, p in mods.items():
        rel = str(p.relative_to(ROOT.parent))
        tree = ast.parse(p.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxmm"):
                for a in node.names:
                    aliases[a.asname or a.name] = node.module
                    if a.name.startswith("_") and not a.name.startswith("__") and (rel, a.name) not in KNOWN:
                        bad.append(f"{rel}:{node.lineno}: from {node.module} import {a.name}")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
            ):
                bad.append(f"{rel}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    mods = _modules()
    graph = {}
    for name, p in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxmm"):
                deps |= {_resolve(f"{node.module}.{a.name}", mods) for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {_resolve(a.name, mods) for a in node.names if a.name.startswith("jaxmm")}
        # a module reading its own package's __init__ is not a circle of two modules
        graph[name] = {d for d in deps if d and d != name and not name.startswith(d + ".")}
    circles = []
    state = {}

    def visit(n, path):
        state[n] = "open"
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                circles.append(" -> ".join(path[path.index(m) :] + [m]))
            elif m not in state:
                visit(m, path + [m])
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not circles, "\n".join(circles)
