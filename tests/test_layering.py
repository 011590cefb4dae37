"""The arrows run one way: kerasft's subpackages are layers, each importing only layers below it.

    cli > training > {labelling, runs} > {data, model} > {devices, tokens} > util

Only the CLI reaches up into `kerasft.exporters` and `kerasft.benchmarks`, exporters never import
benchmarks, and nothing closes an import circle. Imports are read with `ast`, at module level and
inside functions alike, so an import hidden in a function body cannot point up unseen.
"""

import ast
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "kerasft"
UPPER = ("kerasft.exporters", "kerasft.benchmarks")  # what only `kerasft.cli` may import

# Each subpackage's rank: a module may import its own subpackage and any of lower rank only.
LAYERS = {
    "cli": 5,
    "training": 4,
    "labelling": 3,
    "runs": 3,
    "data": 2,
    "model": 2,
    "devices": 1,
    "tokens": 1,
    "util": 0,
}
MAX_MODULES = 8  # per subpackage, `__init__` aside
SOURCES = ("kerasft", "exporters", "benchmarks", "tests", ".ci")


def imports_of(path: Path) -> set[str]:
    """The `kerasft...` modules `path` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("kerasft"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "kerasft" or node.module.count(".") == 1:
                # `from kerasft.model import lora`: a module, or a name of the package
                found.update(f"{node.module}.{a.name}" for a in node.names)
            if node.module.startswith("kerasft."):
                found.add(node.module)
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def core_modules() -> dict[str, Path]:
    """`{dotted name: path}` of every module under `kerasft/`."""
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def core_graph() -> dict[str, set[str]]:
    """`{module: core modules it imports}` for every module under `kerasft/`."""
    modules = core_modules()
    return {name: imports_of(path) & set(modules) - {name} for name, path in modules.items()}


def layer_of(module: str) -> str | None:
    """The subpackage `kerasft.X...` belongs to (None for the package root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "kerasft" else None


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """`"a -> b"` for every import of a layer that is not strictly below the importer's (its
    own subpackage aside). Modules outside any layer (the package root) are not checked."""
    found = []
    for module, deps in sorted(graph.items()):
        own = layer_of(module)
        if own not in layers:
            continue
        for dep in sorted(deps):
            theirs = layer_of(dep)
            if theirs in layers and theirs != own and layers[theirs] >= layers[own]:
                found.append(f"{module} ({own}) -> {dep} ({theirs})")
    return found


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


def test_the_layer_check_catches_an_upward_import():
    """Made-up modules: `low.b` importing `high.a` points up, and so does a sibling import of
    the same rank; imports within a layer and downward ones pass."""
    layers = {"high": 2, "left": 1, "right": 1}
    graph = {
        "kerasft.high.a": {"kerasft.left.b", "kerasft.high.c"},
        "kerasft.high.c": set(),
        "kerasft.left.b": {"kerasft.high.a"},  # up
        "kerasft.right.d": {"kerasft.left.b"},  # sideways
        "kerasft": {"kerasft.high.a"},  # the root is no layer
    }
    assert upward_imports(graph, layers) == [
        "kerasft.left.b (left) -> kerasft.high.a (high)",
        "kerasft.right.d (right) -> kerasft.left.b (left)",
    ]
    del graph["kerasft.left.b"], graph["kerasft.right.d"]
    assert upward_imports(graph, layers) == []


def test_imports_of_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "from kerasft.model import lora\n"
        "def f():\n"
        "    from kerasft.training.tuner import TwoStageFineTuner\n"
        "    import kerasft.exporters.runtime\n"
    )
    assert imports_of(source) >= {
        "kerasft.model.lora",
        "kerasft.training.tuner",
        "kerasft.exporters.runtime",
    }


def test_the_layers_point_down():
    graph = core_graph()
    assert "kerasft.training.tuner" in graph and graph["kerasft.training.tuner"]  # scan works
    assert upward_imports(graph, LAYERS) == []


def test_every_subpackage_is_a_named_layer():
    """The root holds only `__init__` and `__main__`; every subpackage is ranked, has a
    docstring saying what it holds and may import, and at most `MAX_MODULES` modules."""
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "__main__.py"]
    packages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert packages == sorted(LAYERS)
    for name in packages:
        init = PACKAGE / name / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc, f"kerasft/{name}/__init__.py: no docstring on its imports"
        modules = [p for p in (PACKAGE / name).glob("*.py") if p.name != "__init__.py"]
        assert len(modules) <= MAX_MODULES, f"kerasft/{name}: {len(modules)} modules"


def test_no_import_circle_in_the_core():
    graph = core_graph()
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_only_the_cli_imports_exporters_and_benchmarks():
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imports_of(path) if m.startswith(UPPER))
        for path in PACKAGE.rglob("*.py")
        if path.parent.name != "cli"
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    cli = [imports_of(p) for p in (PACKAGE / "cli").glob("*.py")]
    assert any(m.startswith(UPPER) for found in cli for m in found)  # the scan works


def test_no_module_is_over_600_lines():
    paths = [p for folder in SOURCES[:3] for p in (ROOT / folder).rglob("*.py")]
    long = {
        str(p.relative_to(ROOT)): n for p in paths if (n := len(p.read_text().splitlines())) > 600
    }
    assert long == {}


def test_exporters_and_benchmarks_point_down():
    """`exporters/` never imports `benchmarks/` (benchmarks -> exporters -> kerasft core)."""
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            m for m in imports_of(path) if m.startswith("kerasft.benchmarks")
        )
        for path in (ROOT / "exporters").glob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_source_file_is_ignored_by_git():
    """A clean checkout has every module this one has: a `.gitignore` line meant for the
    repository root's run directories once hid `kerasft/runs/__init__.py` from commits."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(
        ["git", "ls-files", "--others", "--ignored", "--exclude-standard", "--", *SOURCES],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert [p for p in listed if p.endswith((".py", ".md", ".json", ".toml"))] == []
