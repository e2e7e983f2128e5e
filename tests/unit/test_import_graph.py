"""The layout stays true (DESIGN.md section 2): imports run one way and there are no cycles.

Every import in every module (at the top or inside a function) is an edge. Allowed:
``jobs`` (entry points) -> ``jobs.runtime`` -> ``serving`` -> ``inference`` -> ``lightning_modules``,
and ``jobs.runtime`` -> ``datamodules``; each layer may also import itself and anything further
down that chain. Entry points never import each other. Inside ``jobs.runtime`` the groups run one
way too: ``stages`` -> ``training`` -> ``config`` -> ``tracking``, and ``service`` -> ``config``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("jobs", "serving", "inference", "lightning_modules", "datamodules")
# what each layer may import, besides itself
ALLOWED = {
    "jobs": {"jobs.runtime", "serving", "inference", "lightning_modules", "datamodules"},
    "jobs.runtime": {"serving", "inference", "lightning_modules", "datamodules"},
    "serving": {"inference", "lightning_modules"},
    "inference": {"lightning_modules"},
    "lightning_modules": set(),
    "datamodules": set(),
}

# what each group of jobs/runtime/ may import, besides itself
RUNTIME_GROUPS = {
    "tracking": set(),
    "config": {"tracking"},
    "training": {"config", "tracking"},
    "stages": {"training", "config", "tracking"},
    "service": {"config", "tracking"},
}


def layer_of(module: str) -> str:
    if module == "jobs.runtime" or module.startswith("jobs.runtime."):
        return "jobs.runtime"
    return module.split(".")[0]


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages under ``root``."""
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")) if (root / package).is_dir() else []:
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that ``path`` imports anywhere in its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:  # 'pkg.mod.func' -> 'pkg.mod'
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def graph(root: Path) -> dict[str, set[str]]:
    modules = module_files(root)
    return {m: imports_of(p, modules) - {m} for m, p in modules.items()}


def back_edges(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in edges.items():
        for dst in targets:
            a, b = layer_of(src), layer_of(dst)
            if dst.rpartition(".")[0] == src or (a == b and a != "jobs") or b in ALLOWED[a]:
                continue  # a package's own modules, the same layer, or an allowed edge
            bad.append(f"{src} -> {dst}")
    return sorted(bad)


def group_of(module: str) -> str | None:
    """``jobs.runtime.<group>.<module>`` -> ``<group>``; None outside jobs/runtime/."""
    parts = module.split(".")
    return parts[2] if parts[:2] == ["jobs", "runtime"] and len(parts) > 2 else None


def runtime_back_edges(edges: dict[str, set[str]]) -> list[str]:
    """Imports between groups of jobs/runtime/ that RUNTIME_GROUPS does not allow (an unknown
    group is reported too: each new group takes its place in the rule)."""
    bad = []
    for src, targets in edges.items():
        a = group_of(src)
        if a is None:
            continue
        if a not in RUNTIME_GROUPS:
            bad.append(f"{src}: group {a!r} is not in RUNTIME_GROUPS")
            continue
        for dst in targets:
            b = group_of(dst)
            if b is not None and b != a and b not in RUNTIME_GROUPS[a]:
                bad.append(f"{src} -> {dst}")
    return sorted(bad)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by depth-first search (each reported once, from where it was entered)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    return found


def test_imports_run_one_way():
    edges = graph(ROOT)
    assert "jobs.runtime.config.schema" in edges and "inference.bundle" in edges  # the walk sees the tree
    assert back_edges(edges) == []


def test_runtime_groups_import_one_way():
    edges = graph(ROOT)
    assert {group_of(m) for m in edges} >= set(RUNTIME_GROUPS)  # the walk sees every group
    assert runtime_back_edges(edges) == []


def test_runtime_has_no_flat_modules():
    """jobs/runtime/ holds subpackages only: a module dropped at its top level has no group."""
    flat = sorted(p.name for p in (ROOT / "jobs" / "runtime").glob("*.py") if p.name != "__init__.py")
    assert flat == []


def test_there_is_no_import_cycle():
    assert cycles(graph(ROOT)) == []


def test_entry_points_are_thin():
    """``jobs/`` holds entry points only: each under 40 lines, importing only the runtime."""
    edges = graph(ROOT)
    for module, targets in edges.items():
        if layer_of(module) != "jobs" or module == "jobs":
            continue
        assert all(layer_of(t) == "jobs.runtime" for t in targets), f"{module} imports {targets}"
        lines = (ROOT / Path(*module.split("."))).with_suffix(".py").read_text().count("\n")
        assert lines < 40, f"{module} has {lines} lines: machinery belongs in jobs/runtime/"


@pytest.mark.parametrize(
    "files,problem",
    [
        ({"inference/a.py": "from jobs.runtime import b", "jobs/runtime/b.py": ""}, "back"),
        ({"lightning_modules/a.py": "import inference.b", "inference/b.py": ""}, "back"),
        ({"datamodules/a.py": "from lightning_modules.b import f", "lightning_modules/b.py": "def f(): pass"}, "back"),
        ({"jobs/a.py": "from jobs import b", "jobs/b.py": ""}, "back"),
        ({"inference/a.py": "def f():\n    import inference.b", "inference/b.py": "from inference import a"}, "cycle"),
        ({"jobs/runtime/config/a.py": "from jobs.runtime.training import b", "jobs/runtime/training/b.py": ""}, "runtime"),
        ({"jobs/runtime/service/a.py": "import jobs.runtime.stages.b", "jobs/runtime/stages/b.py": ""}, "runtime"),
        ({"jobs/runtime/misc/a.py": "", "jobs/runtime/config/b.py": ""}, "runtime"),
    ],
)
def test_the_checks_catch_a_bad_tree(files, problem, tmp_path):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    edges = graph(tmp_path)
    if problem == "runtime":
        assert runtime_back_edges(edges), edges
        assert back_edges(edges) == []  # the layer rule alone would let it through
    elif problem == "back":
        assert back_edges(edges), edges
    else:
        assert cycles(edges), edges
