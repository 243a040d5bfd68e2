"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s simulate`, `nox -s bench`."""

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
    session.run("python", "bench/bench_sim.py")


@nox.session(python=PYTHON)
def simulate(session: nox.Session) -> None:
    """Every scenario under scenarios/ in the simulator, a sweep of seeds each (default
    1-3; `nox -s simulate -- 1-50` for more); fails when any expectation fails."""
    import glob

    session.install("-e", ".")
    seeds = session.posargs[0] if session.posargs else "1-3"
    failed = []
    for scenario in sorted(glob.glob("scenarios/*.yaml")):
        try:
            session.run("goml", "sim", "sweep", scenario, "--seeds", seeds, "-j", "2")
        except nox.command.CommandFailed:
            failed.append(scenario)
    if failed:
        session.error(f"expectations failed in: {', '.join(failed)}")
