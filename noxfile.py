"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s bench`."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole test suite, including the 1,000-seed Raft cluster harness."""
    session.install("-e", ".[dev]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff (lint + format check) and mypy --strict."""
    session.install("-e", ".[dev]")
    session.run("ruff", "check", "goml", "tests", "bench", "noxfile.py")
    session.run("ruff", "format", "--check", "goml", "tests", "bench", "noxfile.py")
    session.run("mypy")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks that print numbers (not pass/fail): goml's Raft vs PySyncObj, then the
    agent (idle CPU; tiny-task throughput vs Dask distributed, which only this session
    installs). Arguments after `--` go to bench_raft.py."""
    session.install("-e", ".[dev]", "dask[distributed]")
    session.run("python", "bench/bench_raft.py", *session.posargs)
    session.run("python", "bench/bench_agent.py")
