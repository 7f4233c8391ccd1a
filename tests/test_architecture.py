"""The package's shape, read from its source: imports flow one way (no cycle, lazy and
TYPE_CHECKING imports included) and the ground floor stays on the ground (docs/ARCHITECTURE.md)."""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PKG = Path(__file__).resolve().parents[1] / "fdlora_cluster"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module -> the package modules it imports, at the top or inside a function."""
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            for c in candidates:
                while c and c not in modules:
                    c = c.rpartition(".")[0]
                if c and c != name and c.startswith("fdlora_cluster"):
                    found.add(c)
        graph[name] = found
    return graph


def test_no_import_cycle():
    graph = imports()
    # a package's __init__ re-exporting its own modules is not a cycle of concerns
    edges = {m: {t for t in ts if not (m == t.rpartition(".")[0] or t == m.rpartition(".")[0])} for m, ts in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module, allowed", [
    ("fdlora_cluster.state", set()),
    ("fdlora_cluster.strategies.plan", set()),
    ("fdlora_cluster.strategies.aggregate", {"fdlora_cluster.state"}),
    ("fdlora_cluster.strategies.combine", {"fdlora_cluster.state", "fdlora_cluster.strategies.aggregate"}),
    ("fdlora_cluster.strategies.methods", {"fdlora_cluster.state", "fdlora_cluster.strategies.aggregate",
                                           "fdlora_cluster.strategies.combine", "fdlora_cluster.strategies.plan"}),
    ("fdlora_cluster.compress", {"fdlora_cluster.state"}),
    ("fdlora_cluster.dp", {"fdlora_cluster.state"}),
    ("fdlora_cluster.watchdog", set()),
    ("fdlora_cluster.waits", {"fdlora_cluster.watchdog"}),
])
def test_the_ground_floor_imports_only_what_is_below_it(module, allowed):
    assert imports()[module] <= allowed, imports()[module] - allowed


def test_the_server_side_never_imports_the_model_side():
    graph = imports()
    model_side = {"fdlora_cluster.engine", "fdlora_cluster.model", "fdlora_cluster.client", "fdlora_cluster.evaluation"}
    for module in ("fdlora_cluster.server", "fdlora_cluster.transport", "fdlora_cluster.strategies.methods"):
        assert not graph[module] & model_side, (module, graph[module] & model_side)


def test_the_server_rank_imports_no_model_library():
    """What the server rank imports to run its schedule (cli, train, server) pulls in neither
    transformers, PEFT nor DeepSpeed: those load on client ranks only, when the model is built."""
    import subprocess
    import sys

    code = ("import sys, fdlora_cluster.cli, fdlora_cluster.train, fdlora_cluster.server; "
            "print([m for m in ('transformers', 'peft', 'deepspeed', 'nevergrad') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PKG.parent)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
