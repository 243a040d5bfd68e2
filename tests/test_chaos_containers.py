"""The chaos runner's container runtime on a real Docker engine: real images (built
offline by `goml.chaos.image`, or reused from its caches), real containers started through
testcontainers, a real Docker network, Toxiproxy in a container. No mocks.

Skipped, with the reason, when no Docker engine answers (start one: see
`goml.chaos.containers.HOW_TO_START_ENGINE`) or testcontainers is not installed; the test
of the "no engine" error itself runs everywhere.

Everything a test starts is removed, also on failure: `goml chaos run` subprocesses get
SIGINT then SIGKILL, and whatever still carries the label org.goml.chaos afterwards is
removed by label (and makes the test fail: nothing may be left). Waits poll the engine or
the files the run writes, against deadlines; nothing sleeps to synchronise.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from goml.chaos.containers import (
    HOST_PROXY_PORT_BASE,
    LABEL,
    LABEL_RUN,
    PROXY_PORT_BASE,
    ContainerAddressing,
    ContainerError,
    container_runtime,
    engine_problem,
)
from goml.scenario.loader import load_scenario_text

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")
ENGINE_PROBLEM = engine_problem()
RUN_TIMEOUT_S = 300.0

TINY = """
name: tiny-containers
duration_s: 60
topology:
  nodes:
    - {name: a, cloud: aws, region: r1, roles: [control, agent]}
    - {name: b, cloud: aws, region: r1, roles: [control]}
    - {name: c, cloud: gcp, region: r2, roles: [control]}
workload:
  clients: [{name: cl, node: a}]
  rate_per_s: 2
  stop_s: 55
  mix:
    matmul: {weight: 1, args: {n: 8, m: 8, k: 8}}
"""


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float, every_s: float = 0.1) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(every_s)  # polling the engine or another process's files


def docker_client() -> Any:
    """The docker SDK's client (imported by name at run time: see goml.chaos.containers)."""
    return importlib.import_module("docker").from_env(timeout=30)


def ours(label: str = LABEL) -> dict[str, list[str]]:
    """Containers, networks and volumes carrying `label`."""
    client = docker_client()
    try:
        return {
            "containers": [
                c.name for c in client.containers.list(all=True, filters={"label": label})
            ],
            "networks": [n.name for n in client.networks.list(filters={"label": label})],
            "volumes": [v.name for v in client.volumes.list(filters={"label": label})],
        }
    finally:
        client.close()


def nothing(left: dict[str, list[str]]) -> bool:
    return not any(left.values())


@pytest.fixture(scope="module")
def engine() -> Iterator[None]:
    if ENGINE_PROBLEM is not None:
        pytest.skip(f"no Docker engine for the container runtime: {ENGINE_PROBLEM}")
    pytest.importorskip(
        "testcontainers", reason="testcontainers missing: pip install 'goml[containers]'"
    )
    before = ours()
    assert nothing(before), f"left by someone before these tests: {before}"
    yield
    left = ours()
    if not nothing(left):  # remove it, then fail: nothing may be left behind
        from goml.chaos.containers import remove_labelled

        client = docker_client()
        try:
            remove_labelled(client, LABEL)
        finally:
            client.close()
        pytest.fail(f"the tests left containers, networks or volumes: {left}")


@pytest.fixture
def images(engine: None) -> None:
    """The images, built or refreshed from the caches before each test (seconds when
    nothing changed; a goml image built from other sources is refused by the runtime),
    from the deploy lab's debootstrapped root file system (made once by pyinfra/lab.py)."""
    from goml.chaos.image import DEFAULT_ROOTFS, ROOTFS_READY, build_images

    if not (DEFAULT_ROOTFS / ROOTFS_READY).is_file():
        made = subprocess.run(
            [sys.executable, str(REPO / "pyinfra" / "lab.py"), "rootfs"],
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        assert made.returncode == 0, f"the lab's root file system:\n{made.stderr[-3000:]}"
    started = time.monotonic()
    built = build_images(log=lambda line: print(f"image: {line}"))
    print(f"images {', '.join(built.images)} ready in {time.monotonic() - started:.1f} s")


@contextlib.contextmanager
def chaos_process(
    args: list[str], out: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    """`goml chaos run ... --out OUT` as a subprocess, stopped whatever happens."""
    process = subprocess.Popen(
        [sys.executable, "-m", "goml", "chaos", "run", *args, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def containers_file(out: Path) -> Path:
    return out / "work" / "containers.json"


def run_label(out: Path) -> str:
    return f"{LABEL_RUN}={json.loads(containers_file(out).read_text())['run']}"


def members_up(out: Path) -> str:
    """Wait until the run's 5 containers (Toxiproxy, 3 nodes, 1 agent) run; its label."""
    wait_for("the run's containers file", lambda: containers_file(out).is_file(), 120, 0.2)
    label = run_label(out)
    client = docker_client()
    try:
        wait_for(
            "Toxiproxy, 3 nodes and 1 agent running",
            lambda: len(client.containers.list(filters={"label": label, "status": "running"})) == 5,
            120,
            0.2,
        )
    finally:
        client.close()
    return label


# ------------------------------------------------------------------- the proof


def test_leader_crash_in_containers_loses_nothing_and_leaves_nothing(
    images: None, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    scenario = "scenarios/chaos/leader-crash.yaml"
    with chaos_process([scenario, "--runtime", "containers", "--json"], out) as process:
        stdout, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    assert process.returncode == 0, stdout[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runtime"] == "containers"
    assert all(e["passed"] for e in summary["expectations"]), summary["expectations"]
    assert summary["failover_s"]["count"] == 2
    assert summary["tasks_lost"] == 0 and summary["duplicate_results"] == 0
    assert summary["tasks_acknowledged"] == summary["tasks_submitted"] > 100
    assert summary["tasks_succeeded"] == summary["tasks_acknowledged"]
    assert summary["simulator"]["tasks_lost"] == 0  # the prediction sits beside it
    assert "Side by side" in (out / "report.html").read_text()
    # A crashed node came back as the same container with the same volume: its log (the
    # container's whole output) shows a second start that found its store.
    logs = {p.name: p.read_text() for p in (out / "work" / "logs").glob("*.log")}
    restarts = [
        name
        for name, text in logs.items()
        if text.count(" starting: term 0, commit 0,") == 1 and text.count(" starting: term ") >= 2
    ]
    assert len(restarts) >= 1, {name: text[:300] for name, text in logs.items()}
    made = json.loads(containers_file(out).read_text())
    assert made["removed"] is True and len(made["containers"]) == 6  # Toxiproxy, 3 nodes, 2 agents
    assert nothing(ours(run_label(out)))
    assert nothing(ours())


def test_ctrl_c_removes_every_container_network_and_volume(images: None, tmp_path: Path) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    out = tmp_path / "out"
    with chaos_process([str(path), "--runtime", "containers"], out) as process:
        label = members_up(out)
        left = ours(label)
        assert len(left["volumes"]) == 4 and len(left["networks"]) == 1, left
        process.send_signal(signal.SIGINT)
        stdout, _ = process.communicate(timeout=90)
        assert process.returncode == 130, stdout[-3000:]
    assert "every container, network, volume and proxy this run made is removed" in stdout
    assert "Traceback" not in stdout
    assert nothing(ours(label)), ours(label)


def test_what_a_killed_harness_left_is_removed_by_the_next_run(
    images: None, tmp_path: Path
) -> None:
    """SIGKILL leaves no chance to clean up; the next container run removes what is
    labelled with a harness PID that no longer exists, and says so."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    out = tmp_path / "out"
    with chaos_process([str(path), "--runtime", "containers"], out) as process:
        label = members_up(out)
        process.kill()
        process.wait(timeout=30)
    left = ours(label)
    assert len(left["containers"]) == 5, left
    notes: list[str] = []
    s = load_scenario_text(TINY).scenario
    with container_runtime(s, [], tmp_path / "next", notes):
        pass
    assert any(
        label.split("=")[1] in note and "removed what chaos run" in note for note in notes
    ), notes
    assert nothing(ours(label)), ours(label)


# ------------------------------------------------------------ bad environments


def test_no_engine_names_how_to_start_one(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {"DOCKER_HOST": f"unix://{tmp_path / 'no-such.sock'}"}
    with chaos_process(
        ["scenarios/chaos/leader-crash.yaml", "--runtime", "containers"], out, env
    ) as process:
        stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 2, stdout[-3000:]
    assert "no Docker engine reachable at unix://" in stdout and "dockerd" in stdout, stdout
    assert "Traceback" not in stdout


def test_a_missing_image_names_the_command_that_builds_it(images: None, tmp_path: Path) -> None:
    from goml.chaos.image import goml_image

    tag = goml_image()
    keep = f"goml-test-keep:{os.getpid()}"
    client = docker_client()
    try:
        client.images.get(tag).tag(keep)
        client.images.remove(tag)  # the tag only: the image stays under `keep`
        out = tmp_path / "out"
        with chaos_process(
            ["scenarios/chaos/leader-crash.yaml", "--runtime", "containers"], out
        ) as process:
            stdout, _ = process.communicate(timeout=120)
    finally:
        client.images.get(keep).tag(tag)
        client.images.remove(keep)
        client.close()
    assert process.returncode == 2, stdout[-3000:]
    assert f"image {tag} not found in the Docker engine" in stdout and "nox -s image" in stdout, (
        stdout
    )
    assert "Traceback" not in stdout


def test_a_port_in_use_is_named_and_nothing_is_left(images: None, tmp_path: Path) -> None:
    s = load_scenario_text(TINY).scenario
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        free = [p for p in range(41000, 41200) if p != port]
        with (
            pytest.raises(ContainerError) as raised,
            container_runtime(s, ["a"], tmp_path, [], host_ports=[port, *free]),
        ):
            pytest.fail("Toxiproxy's port is taken: the runtime must not start")
    message = str(raised.value)
    assert f"127.0.0.1:{port}" in message and "in use" in message, message
    assert nothing(ours())


def test_the_addressing_maps_each_party_to_its_own_view() -> None:
    net = ContainerAddressing([20001, 20002], {"aws-1": 21000})
    assert net.node_listen("aws-1") == "0.0.0.0:7000"
    assert net.node_upstream("aws-1") == "node-aws-1:7000"
    assert net.node_observed("aws-1") == "127.0.0.1:21000"
    assert net.proxy_listen(5, host_side=False) == f"0.0.0.0:{PROXY_PORT_BASE + 5}"
    assert (
        net.proxy_for_members(f"[::]:{PROXY_PORT_BASE + 5}") == f"toxiproxy:{PROXY_PORT_BASE + 5}"
    )
    # Client proxies, in order, each on its own published port.
    assert net.proxy_listen(6, host_side=True) == f"0.0.0.0:{HOST_PROXY_PORT_BASE}"
    assert net.proxy_listen(7, host_side=True) == f"0.0.0.0:{HOST_PROXY_PORT_BASE + 1}"
    assert net.proxy_for_host(f"[::]:{HOST_PROXY_PORT_BASE + 1}") == "127.0.0.1:20002"
    assert "toxiproxy" in net.cert_hosts and "127.0.0.1" in net.cert_hosts
    with pytest.raises(ContainerError, match="only 2 proxy ports"):
        net.proxy_listen(8, host_side=True)
