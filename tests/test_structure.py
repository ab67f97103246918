"""The code's shape, kept as it was designed: no import circles between the project's modules (at any
depth, function-level imports included), the dependency direction machines -> crm_states, and small modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The project's rule is "about 400 lines at most"; this is where "about" ends.
MAX_LINES = 420


def _modules() -> dict[str, Path]:
    found = {}
    for path in [*ROOT.glob("crm_states/**/*.py"), *ROOT.glob("machines/**/*.py")]:
        rel = path.relative_to(ROOT).with_suffix("")
        found[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports, by any import statement, children importing parents excluded."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            candidates = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in candidates:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                targets.add(target)
    return targets


def test_no_import_circles() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    cycles = []
    done: set[str] = set()

    def visit(node: str, trail: list[str]) -> None:
        if node in trail:
            cycles.append(trail[trail.index(node):] + [node])
            return
        if node in done:
            return
        for target in sorted(graph[node]):
            visit(target, [*trail, node])
        done.add(node)

    for name in sorted(graph):
        visit(name, [])
    assert cycles == [], cycles[:5]


def test_the_library_never_imports_the_machines_or_the_servers() -> None:
    """machines -> crm_states, never back: the core (engine, store, records, journal, CRM clients, test
    servers...) imports no machine; the application layer that wires machines to the core does. And
    neither database server is ever imported (they run as processes)."""
    modules = _modules()
    core = ("crm_states.engine", "crm_states.spec", "crm_states.store", "crm_states.records", "crm_states.mermaid",
            "crm_states.journal", "crm_states.owners", "crm_states.leases", "crm_states.crm", "crm_states.testing",
            "crm_states.metrics", "crm_states.logs", "crm_states.progress", "crm_states.protocols")
    for name, path in modules.items():
        source = path.read_text(encoding="utf-8")
        assert "import secantus" not in source and "import fiftyone" not in source and "from fiftyone" not in source, name
        if any(name == c or name.startswith(c + ".") for c in core):
            assert not any(t.startswith("machines") for t in _imports(name, path, modules)), name
    engine = _imports("crm_states.engine", modules["crm_states.engine"], modules)
    assert not any(t.startswith("crm_states.crm") for t in engine), "the engine knows no CRM"
    for name in (n for n in modules if n.startswith("crm_states.crm")):
        assert not any(t.startswith(("machines", "crm_states.engine", "crm_states.store"))
                       for t in _imports(name, modules[name], modules)), f"{name}: CRM clients know no machines"


def test_modules_stay_small() -> None:
    big = {name: n for name, path in _modules().items()
           if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert big == {}, big
