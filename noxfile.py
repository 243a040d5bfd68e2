"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s simulate`, `nox -s chaos`,
`nox -s bench`, `nox -s deploy_lab`."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole test suite, including the 1,000-seed Raft cluster harness."""
    session.install("-e", ".[dev,containers]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff (lint + format check) and mypy --strict."""
    session.install("-e", ".[dev]")
    session.run("ruff", "check", "goml", "tests", "bench", "pyinfra", "noxfile.py")
    session.run("ruff", "format", "--check", "goml", "tests", "bench", "pyinfra", "noxfile.py")
    session.run("mypy")
    session.run(_actionlint(session), ".github/workflows/ci.yml", external=True)


ACTIONLINT = "github.com/rhysd/actionlint/cmd/actionlint@v1.7.7"


def _actionlint(session: nox.Session) -> str:
    """actionlint from PATH or goml's cache, else built with Go into the cache. Fails the
    session (never skips) when it cannot be had."""
    import os
    import shutil
    from pathlib import Path

    found = shutil.which("actionlint")
    if found:
        return found
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "goml" / "bin"
    cached = cache / "actionlint"
    if cached.is_file():
        return str(cached)
    if shutil.which("go") is None:
        session.error(
            f"actionlint is needed to check .github/workflows and Go is missing: install Go "
            f"and rerun (it runs `go install {ACTIONLINT}`), or put actionlint on PATH"
        )
    cache.mkdir(parents=True, exist_ok=True)
    try:
        session.run("go", "install", ACTIONLINT, env={"GOBIN": str(cache)}, external=True)
    except nox.command.CommandFailed:
        session.error(f"`go install {ACTIONLINT}` failed: actionlint could not be installed")
    return str(cached)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks that print numbers (not pass/fail): goml's Raft vs PySyncObj, the agent
    (idle CPU; tiny-task throughput vs Dask distributed, which only this session installs),
    the simulator, then bench/peers.py: goml's Raft beside hashicorp/raft and etcd (built
    with Go into ~/.cache/goml/bench once; each skipped with a line saying why when Go is
    missing) and goml's API over TLS (bench_control.py), in one table with the ratios
    goml/peer. Arguments after `--` go to bench_raft.py."""
    session.install("-e", ".[dev]", "dask[distributed]")
    session.run("python", "bench/bench_raft.py", *session.posargs)
    session.run("python", "bench/bench_agent.py")
    session.run("python", "bench/bench_sim.py")
    session.run("python", "bench/peers.py")


@nox.session(python=PYTHON)
def simulate(session: nox.Session) -> None:
    """Every scenario under scenarios/ in the simulator, a sweep of seeds each (default
    1-2; `nox -s simulate -- 1-50` for more); fails when any expectation fails."""
    import glob

    session.install("-e", ".")
    seeds = session.posargs[0] if session.posargs else "1-2"
    failed = []
    for scenario in sorted(glob.glob("scenarios/*.yaml")):
        try:
            session.run("goml", "sim", "sweep", scenario, "--seeds", seeds, "-j", "2")
        except nox.command.CommandFailed:
            failed.append(scenario)
    if failed:
        session.error(f"expectations failed in: {', '.join(failed)}")


@nox.session(python=PYTHON)
def chaos(session: nox.Session) -> None:
    """Every scenario under scenarios/chaos/ on real processes behind Toxiproxy
    (`goml chaos run`), each judged against its expectations (failover < 5 s, steady
    submits < 500 ms, nothing lost, nothing twice). Installs toxiproxy-server with Go
    when it is missing. `nox -s chaos -- SEED` picks another seed."""
    import glob

    session.install("-e", ".")
    session.run("python", "-m", "goml.chaos.server")  # finds or builds toxiproxy-server
    session.run("python", "-m", "goml.chaos.node_faults")  # libfaketime (apt) for clock faults
    seed = ["--seed", session.posargs[0]] if session.posargs else []
    failed = []
    for scenario in sorted(glob.glob("scenarios/chaos/*.yaml")):
        name = scenario.rsplit("/", 1)[-1].removesuffix(".yaml")
        try:
            session.run("goml", "chaos", "run", scenario, *seed, "--out", f"reports/chaos/{name}")
        except nox.command.CommandFailed:
            failed.append(scenario)
    if failed:
        session.error(f"expectations failed in: {', '.join(failed)}")


@nox.session(python=PYTHON)
def fidelity(session: nox.Session) -> None:
    """The simulator against the real runs (issue 14): calibrates this machine (`goml
    chaos calibrate`), runs every scenario under scenarios/chaos/ for real, and prints
    real / simulated / calibrated figures with the tolerances (bench/fidelity.py; a
    quiet machine gives the figures worth quoting). `nox -s fidelity -- --seeds 1,2,3`."""
    session.install("-e", ".")
    session.run("python", "-m", "goml.chaos.server")  # finds or builds toxiproxy-server
    session.run("python", "bench/fidelity.py", *session.posargs)


@nox.session(python=PYTHON)
def deploy_lab(session: nox.Session) -> None:
    """The real pyinfra deploy (pyinfra/deploy.py) over SSH to a local lab of five
    systemd-nspawn hosts, then its checks: health, idempotence, kill -9, reboot, a host
    cut off, a rolling upgrade, a host replaced under load and a sixth one added from the
    inventory. Needs root; installs debootstrap and systemd-container
    with apt when missing and caches the Debian root file system in /var/cache/goml-lab.
    Skipped, with the reason, where it cannot run."""
    session.install("-e", ".[dev]", "pyinfra==3.10.0")
    session.run(
        "pytest",
        "-m",
        "lab",
        "-s",
        "tests/test_deploy_lab.py",
        *session.posargs,
        env={"GOML_LAB": "1"},
    )


def _build_images(session: nox.Session) -> None:
    """The deploy lab's Debian root file system (debootstrapped once into
    /var/cache/goml-lab; root), then the container runtime's images from it."""
    session.run("python", "pyinfra/lab.py", "rootfs")
    session.run("python", "-m", "goml.chaos.image")


@nox.session(python=PYTHON)
def image(session: nox.Session) -> None:
    """The images of `goml chaos run --runtime containers`, built offline (nothing is
    pulled): goml-base:bookworm (`docker import` of the lab's root file system),
    goml:VERSION (goml from a wheelhouse built here), goml-toxiproxy:2.12.0 (built from
    its Go sources). Needs root and a running Docker engine. Cached at every step: with
    no change it takes seconds."""
    session.install("-e", ".[containers]")
    _build_images(session)


@nox.session(python=PYTHON)
def chaos_containers(session: nox.Session) -> None:
    """Every scenario under scenarios/chaos/ with each node and agent in its own
    container (`goml chaos run --runtime containers`), judged against its expectations
    like `nox -s chaos` (those with disk or clock faults, which act on host processes,
    are skipped with a line saying so), then tests/test_chaos_containers.py (the runtime's cleanup and
    its errors in bad environments). Builds the images first (`nox -s image`). Needs root
    and a running Docker engine. `nox -s chaos_containers -- SEED` picks another seed."""
    import glob

    session.install("-e", ".[dev,containers]")
    _build_images(session)
    seed = ["--seed", session.posargs[0]] if session.posargs else []
    listing = session.run(
        "python", "-m", "goml.chaos.containers", "runnable",
        *sorted(glob.glob("scenarios/chaos/*.yaml")), silent=True,
    )  # fmt: skip
    scenarios = []
    for line in str(listing).splitlines():
        if line.startswith("skip "):
            session.log(line)  # e.g. disk and clock faults: processes only
        elif line.startswith("run "):
            scenarios.append(line.split()[1])
    failed = []
    for scenario in scenarios:
        name = scenario.rsplit("/", 1)[-1].removesuffix(".yaml")
        out = f"reports/chaos-containers/{name}"
        try:
            session.run(
                "goml", "chaos", "run", scenario, "--runtime", "containers", *seed, "--out", out
            )
        except nox.command.CommandFailed:
            failed.append(scenario)
    session.run("pytest", "-p", "no:cacheprovider", "tests/test_chaos_containers.py")
    if failed:
        session.error(f"expectations failed in: {', '.join(failed)}")
