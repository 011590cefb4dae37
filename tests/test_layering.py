"""The arrows run one way: no import circles in `kerasft/`, and only the CLI reaches up.

Imports are read with `ast`, at module level and inside functions alike, so an import hidden in a
function body cannot close a circle unseen.
"""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "kerasft"
UPPER = ("kerasft.exporters", "kerasft.benchmarks")  # what only `kerasft/cli.py` may import


def imports_of(path: Path) -> set[str]:
    """The `kerasft...` modules `path` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("kerasft"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "kerasft":  # `from kerasft import lora, recipe`
                found.update(f"kerasft.{a.name}" for a in node.names)
            elif node.module.startswith("kerasft."):
                found.add(node.module)
    return found


def core_graph() -> dict[str, set[str]]:
    """`{module: core modules it imports}` for every `kerasft/*.py`."""
    modules = {f"kerasft.{p.stem}": p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {name: imports_of(path) & set(modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as `[a, b, ..., a]`, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_imports_of_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "from kerasft import lora\n"
        "def f():\n"
        "    from kerasft.tuner import TwoStageFineTuner\n"
        "    import kerasft.exporters.runtime\n"
    )
    assert imports_of(source) == {"kerasft.lora", "kerasft.tuner", "kerasft.exporters.runtime"}


def test_no_import_circle_in_the_core():
    graph = core_graph()
    assert "kerasft.tuner" in graph and graph["kerasft.tuner"]  # the scan sees the package
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_only_the_cli_imports_exporters_and_benchmarks():
    offenders = {
        f"kerasft/{path.name}": sorted(m for m in imports_of(path) if m.startswith(UPPER))
        for path in PACKAGE.glob("*.py")
        if path.name != "cli.py"
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    assert any(m.startswith(UPPER) for m in imports_of(PACKAGE / "cli.py"))  # the scan works


def test_exporters_and_benchmarks_point_down():
    """`exporters/` never imports `benchmarks/` (benchmarks -> exporters -> kerasft core)."""
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            m for m in imports_of(path) if m.startswith("kerasft.benchmarks")
        )
        for path in (ROOT / "exporters").glob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}
