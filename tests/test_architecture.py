"""The import graph keeps its shape: one namespace, no circle, layers that import only downward,
and Ray started in one place. Read from the source with ``ast`` (function-level imports count:
a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

#: repository folder -> the package it installs as
PACKAGES = {"pipeline": "blinkflow", "stages": "blinkflow.stages", "models": "blinkflow.models"}

#: bottom to top; a module may import its own layer and the layers below (the longest prefix decides)
LAYERS = [
    ("core", ["blinkflow.version", "blinkflow.errors", "blinkflow.files", "blinkflow.frame", "blinkflow.schema",
              "blinkflow.registry", "blinkflow.resources", "blinkflow.devices", "blinkflow.ray_session",
              "blinkflow.redact", "blinkflow.hwdecode", "blinkflow.lanes"]),
    ("models", ["blinkflow.models"]),
    ("config", ["blinkflow.config"]),
    ("gate", ["blinkflow.gate"]),  # the gate's policy, signal, motion and carry-over: below the stages that use them
    ("stages", ["blinkflow.stages"]),
    ("training", ["blinkflow.models.training"]),
    ("engine", ["blinkflow.graph", "blinkflow.sources", "blinkflow.streams", "blinkflow.sinks", "blinkflow.metrics", "blinkflow.http_service", "blinkflow.runners",
                "blinkflow.depth_parallel"]),
    ("apps", ["blinkflow.cli", "blinkflow.label", "blinkflow.control", "blinkflow.control_guard", "blinkflow.api",
              "blinkflow.bench"]),
    ("facade", ["blinkflow"]),  # the package itself: `import blinkflow` gives the API (lazily); nothing imports it
]

#: the only modules that may import Ray (runners, depth-parallel stages, distributed training, the
#: one session helper, and the benchmarks and labelling that drive Ray work)
RAY_MODULES = {"blinkflow.ray_session", "blinkflow.runners.ray", "blinkflow.depth_parallel", "blinkflow.label",
               "blinkflow.models.training.distributed", "blinkflow.models.training.sideways",
               "blinkflow.bench.depth", "blinkflow.bench.overhead", "blinkflow.bench.pipeline"}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in (REPO_ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(REPO_ROOT / folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


MODULES = modules()


def imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def module_of(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def graph() -> dict[str, set[str]]:
    edges = {}
    for module, path in MODULES.items():
        targets = {module_of(n) for n in imported_names(path) if n.startswith("blinkflow")}
        edges[module] = {t for t in targets if t and t != module and not module.startswith(t + ".")}
    return edges


def layer(module: str) -> tuple[int, str]:
    ranked = [(len(p), rank, name) for rank, (name, prefixes) in enumerate(LAYERS)
              for p in prefixes if module == p or module.startswith(p + ".")]
    assert ranked, f"{module} belongs to no layer: add it to LAYERS"
    _, rank, name = max(ranked)
    return rank, name


def test_nothing_imports_the_generic_top_level_names():
    offenders = [f"{m}: {n}" for m, p in MODULES.items() for n in imported_names(p)
                 if n.split(".")[0] in PACKAGES]
    offenders += [f"{p.name}: {n}" for p in (REPO_ROOT / "tests").glob("*.py") for n in imported_names(p)
                  if n.split(".")[0] in PACKAGES]
    assert not offenders, offenders


def test_the_import_graph_has_no_circle():
    edges, state, stack, circles = graph(), {}, [], []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                circles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not circles, " | ".join(" -> ".join(c) for c in circles)


def test_layers_import_only_downward():
    upward = []
    for module, targets in graph().items():
        for target in targets:
            if layer(target)[0] > layer(module)[0]:
                upward.append(f"{module} ({layer(module)[1]}) -> {target} ({layer(target)[1]})")
    assert not upward, upward


def test_ray_is_imported_only_where_it_runs_and_started_in_one_place():
    importers = {m for m, p in MODULES.items() if any(n == "ray" or n.startswith("ray.") for n in imported_names(p))}
    assert importers <= RAY_MODULES, sorted(importers - RAY_MODULES)
    starters = sorted(m for m, p in MODULES.items() if "ray.init(" in p.read_text())
    assert starters == ["blinkflow.ray_session"]
    # the runners, labelling and the benches own Ray through ray_session(); only training's long-lived
    # actors (started with start_ray, closed by their owner) shut it down themselves
    stoppers = {m for m, p in MODULES.items() if "ray.shutdown(" in p.read_text()}
    assert stoppers <= {"blinkflow.ray_session", "blinkflow.models.training.sideways"}, sorted(stoppers)


@pytest.mark.parametrize("module", ["blinkflow.stages.detect", "blinkflow.stages.base", "blinkflow.stages.gate"])
def test_stages_do_not_import_ray(module):
    assert not any(n.startswith("ray") for n in imported_names(MODULES[module]))


def test_a_registry_looked_up_from_threads_at_once_is_whole_for_each(tmp_path, monkeypatch):
    """Two pipelines started in threads: the second thread saw the registry marked loaded while the first was still
    importing its modules, and failed with "'synthetic' is not one of " (an empty list)."""
    import sys
    import threading

    from blinkflow.registry import Registry

    registry = Registry("thing", ("slow_things",))
    (tmp_path / "slow_things.py").write_text(
        "import time, builtins\n"
        "registry = builtins._blinkflow_test_registry\n"
        "time.sleep(0.3)  # a heavy import\n"
        "registry.register('a')(1)\n"
        "registry.register('b')(2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("builtins._blinkflow_test_registry", registry, raising=False)
    monkeypatch.delitem(sys.modules, "slow_things", raising=False)
    seen: list[list[str]] = []
    threads = [threading.Thread(target=lambda: seen.append(registry.names())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == [["a", "b"]] * 4
