"""Every core module is sans-IO (STYLE.md): no clock, socket, thread, asyncio, file or
global randomness, and it imports only other cores and a few pure standard modules.

A core that reads the time or the disk would make the simulator predict a system that
does not exist, and a seed would no longer replay a run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORES = (
    "goml/api/types.py",
    "goml/api/retry.py",
    "goml/api/auth.py",
    "goml/raft/types.py",
    "goml/raft/log.py",
    "goml/raft/core.py",
    "goml/raft/storage.py",
    "goml/raft/replica.py",
    "goml/raft/checker.py",
    "goml/cluster/commands.py",
    "goml/cluster/manifest.py",
    "goml/cluster/clock.py",
    "goml/cluster/duties.py",
    "goml/cluster/paging.py",
    "goml/cluster/node_core.py",
    "goml/cluster/membership_plan.py",
    "goml/cluster/supervise.py",
    "goml/agent/core.py",
    "goml/scenario/faults.py",
)
# Pure standard modules a core may use. `random` only for the type of the seeded RNG a
# caller passes in (checked below: no module-level random function is called).
ALLOWED_STDLIB = frozenset(
    {
        "__future__",
        "bisect",
        "collections",
        "dataclasses",
        "enum",
        "functools",
        "hashlib",
        "heapq",
        "itertools",
        "json",
        "math",
        "random",
        "typing",
    }
)
# goml modules that are not cores but are pure data a core may read: the scenario
# schema (pydantic models; `faults` resolves their names).
ALLOWED_GOML = frozenset({"goml.scenario.schema"})
FORBIDDEN_CALLS = frozenset({"open", "print", "input", "eval", "exec", "__import__", "breakpoint"})


def _module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


CORE_MODULES = frozenset(_module_name(p) for p in CORES)


def _imports(tree: ast.Module) -> list[str]:
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "cores import absolutely"
            names.append(node.module or "")
    return names


@pytest.mark.parametrize("path", CORES)
def test_core_imports_only_cores_and_pure_stdlib(path: str) -> None:
    tree = ast.parse((ROOT / path).read_text())
    for name in _imports(tree):
        top = name.split(".")[0]
        if top == "goml":
            assert name in CORE_MODULES or name in ALLOWED_GOML, f"{path} imports {name}"
        else:
            assert top in ALLOWED_STDLIB, f"{path} imports {name}: not a pure core import"


@pytest.mark.parametrize("path", CORES)
def test_core_uses_no_global_randomness_and_no_io_builtins(path: str) -> None:
    tree = ast.parse((ROOT / path).read_text())
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "random"
        ):
            assert node.attr == "Random", f"{path}:{node.lineno}: random.{node.attr} is global"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in FORBIDDEN_CALLS, f"{path}:{node.lineno}: {node.func.id}()"


def test_the_list_of_cores_names_real_files() -> None:
    for path in CORES:
        assert (ROOT / path).is_file(), path
