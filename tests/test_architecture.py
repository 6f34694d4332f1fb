"""The import structure ARCHITECTURE.md draws: every module in one layer, imports only downwards or within
a layer, no import circle (imports inside functions count: they hide circles, they do not remove them), and no
module longer than the stated bound. The layer table is read from ARCHITECTURE.md itself, so the prose and
the code cannot drift apart."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "kdtune"
MAX_LINES = 500


def layers() -> list[tuple[str, list[str]]]:
    """(layer, module prefixes) from the fenced `layers` block of ARCHITECTURE.md, lowest first."""
    text = (REPO / "ARCHITECTURE.md").read_text()
    block = re.search(r"```layers\n(.*?)```", text, flags=re.S)
    assert block, "ARCHITECTURE.md has no ```layers block"
    table = []
    for line in block.group(1).splitlines():
        if line.strip() and not line.startswith("#"):
            name, *prefixes = line.split()
            table.append((name.rstrip(":"), prefixes))
    return table


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The kdtune modules `name` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and ast.unparse(block.test).endswith("TYPE_CHECKING") for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # `if TYPE_CHECKING:` imports never run
            continue
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    resolved = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target.startswith("kdtune") and target != name:
            resolved.add(target)
    return resolved


def layer_of(module: str, table) -> int | None:
    """The layer of the longest prefix naming the module (a folder's layer holds for all of it)."""
    best = None
    for index, (_, prefixes) in enumerate(table):
        for prefix in prefixes:
            inside = module.startswith(prefix + ".") and prefix != "kdtune"  # the package itself is one module here
            if (module == prefix or inside) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    return best[0] if best else None


@pytest.fixture(scope="module")
def drawing():
    known = modules()
    return known, {name: imports(name, path, known) for name, path in known.items()}, layers()


def test_every_module_is_in_a_layer(drawing):
    known, _, table = drawing
    assert [m for m in sorted(known) if layer_of(m, table) is None] == []


def test_no_module_imports_from_a_layer_above_its_own(drawing):
    _, edges, table = drawing
    upward = [f"{a} ({table[layer_of(a, table)][0]}) imports {b} ({table[layer_of(b, table)][0]})"
              for a, targets in sorted(edges.items()) for b in sorted(targets)
              if layer_of(b, table) > layer_of(a, table)]
    assert upward == []


def test_there_is_no_import_circle(drawing):
    _, edges, _ = drawing
    circles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert circles == []


def test_the_core_imports_no_framework(drawing):
    """config, records, results, tags: what a study is, with no torch, Ray or MLflow behind it."""
    known, _, table = drawing
    core = [m for m in known if layer_of(m, table) == 0]
    heavy = {}
    for module in core:
        tree = ast.parse(known[module].read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        found = names & {"torch", "ray", "mlflow", "optuna", "numpy"}
        if found:
            heavy[module] = sorted(found)
    assert heavy == {}


def test_no_module_is_longer_than_the_bound(drawing):
    known, _, _ = drawing
    long = {m: n for m, p in known.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
