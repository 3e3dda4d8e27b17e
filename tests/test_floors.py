"""The floor plan holds: each floor imports only from floors below it, and no import cycle exists.

Every import statement counts, function-local ones too (they may defer a heavy library, never dodge a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"llmfeat": "llmfeat", "models": "llmfeat.models", "spark_jobs": "llmfeat.spark_jobs"}
FOLDERS |= {"validation": "llmfeat.validation", "serving": "llmfeat.serving"}
BASE = {
    "config",
    "paths",
    "errors",
    "session",
    "delta_io",
    "delta_jars",
    "feast_repo",
    "feast_delta",
    "training_set",
    "sample",
    "registry",
    "runner",
}
# floor -> floors it may import (its own included)
ALLOWED = {
    "base": {"base"},
    "models": {"base", "models"},
    "validation": {"base", "models", "validation"},
    "jobs": {"base", "models", "validation", "jobs", "serving"},
    "serving": {"base", "models", "validation", "serving"},
    "cli": {"base", "models", "validation", "jobs", "serving", "cli"},
}
# Libraries a pure model module must not reach for: engines and stores belong to the jobs.
NOT_IN_MODELS = ("pyspark", "deltalake", "delta", "feast", "great_expectations", "fastapi", "uvicorn")


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def floor(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in {"__main__"}:
        return "cli"
    second = parts[1]
    if second in BASE:
        return "base"
    return {"models": "models", "validation": "validation", "spark_jobs": "jobs", "serving": "serving"}.get(
        second, "cli"
    )


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def edges() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for name in imports(path):
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name and name != m and name != "llmfeat":
                graph[m].add(name)
    return graph


def test_every_import_says_llmfeat() -> None:
    bare = {"models", "spark_jobs", "validation", "serving"}
    offenders = [
        f"{m}: {name}"
        for m, path in modules().items()
        for name in imports(path)
        if name.split(".")[0] in bare
    ]
    assert not offenders


def test_floors_import_only_downwards() -> None:
    wrong = [
        f"{m} ({floor(m)}) imports {t} ({floor(t)})"
        for m, targets in edges().items()
        for t in targets
        if floor(t) not in ALLOWED[floor(m)]
    ]
    assert not wrong, "\n".join(sorted(wrong))


def test_models_use_no_engine_or_store() -> None:
    wrong = [
        f"{m} imports {name}"
        for m, path in modules().items()
        if floor(m) == "models"
        for name in imports(path)
        if name.split(".")[0] in NOT_IN_MODELS
    ]
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles() -> None:
    graph = edges()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def strong(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            strong(v)
    assert not cycles
