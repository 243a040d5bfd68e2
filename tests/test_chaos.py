"""Chaos on real processes: a real `toxiproxy-server`, real node and agent processes with
TLS, every link behind its own proxy. No mocks.

Everything a test starts is stopped by PID in a `finally` (also on failure and Ctrl-C):
the Toxiproxy server by its fixture, node processes by `ChaosCluster.stop_all`, a
`goml chaos run` subprocess with SIGINT then SIGKILL, and whatever PIDs it recorded.
Waits poll the remote processes against deadlines; nothing sleeps to synchronise.

Toxiproxy comes from PATH, goml's cache, or is built with Go (`go install`, as the chaos
runner does); without any of them these tests fail with the message saying how to get it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from goml.chaos.cluster import ChaosCluster, ProxyState
from goml.chaos.runner import ChaosRun
from goml.chaos.server import toxiproxy_server
from goml.chaos.toxiproxy import Stream, Toxiproxy, ToxiproxyError
from goml.client import Client
from goml.scenario.loader import load_scenario_text
from goml.scenario.schema import ConstantLink, PartitionFault, Scenario

pytestmark = pytest.mark.slow

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float, every_s: float = 0.1) -> T:
    """Poll `probe` until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(every_s)  # polling other processes


@pytest.fixture(scope="module")
def toxiproxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Toxiproxy]:
    log = tmp_path_factory.mktemp("toxiproxy") / "toxiproxy.log"
    with toxiproxy_server(log_path=log) as server:  # stopped by PID on exit
        yield server


def scenario(text: str) -> Scenario:
    return load_scenario_text(text).scenario


THREE_CLOUDS = """
name: t
duration_s: 10
topology:
  nodes:
    - {name: a, cloud: c1, region: r1, roles: [control]}
    - {name: b, cloud: c2, region: r2, roles: [control]}
    - {name: c, cloud: c3, region: r3, roles: [control]}
network:
  same_region: {kind: constant, value_ms: 0}
  same_cloud: {kind: constant, value_ms: 0}
  cross_cloud: {kind: constant, value_ms: 0}
"""


@contextlib.contextmanager
def running(s: Scenario, work: Path, toxiproxy: Toxiproxy) -> Iterator[ChaosCluster]:
    cluster = ChaosCluster(s, work, toxiproxy)
    try:
        cluster.create([])
        for process in cluster.all_processes():
            cluster.start(process)
        yield cluster
    finally:
        cluster.stop_all()
        cluster.delete_proxies()


def leader_of(cluster: ChaosCluster, client: Client) -> tuple[str, int] | None:
    return cluster.leader(client)


def rtt_ms(client: Client, leader: str, peer: str) -> float | None:
    status = client.status(leader)
    member = next(m for m in status.members if m.id == peer)
    return member.rtt_ms or None


def rtt_samples(client: Client, leader: str, peer: str, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        value = rtt_ms(client, leader, peer)
        if value is not None:
            samples.append(value)
        time.sleep(0.1)  # pacing the sampling of a running process
    return samples


# ------------------------------------------------------------- client, mapping


def test_toxiproxy_errors_name_the_proxy_and_carry_the_servers_message(
    toxiproxy: Toxiproxy,
) -> None:
    with pytest.raises(ToxiproxyError, match=r"proxy 'no-such->proxy'.*404.*proxy not found"):
        toxiproxy.delete_proxy("no-such->proxy")
    with pytest.raises(ValueError, match="expected http://HOST:PORT"):
        Toxiproxy("localhost:8474")
    with pytest.raises(ToxiproxyError, match="failed"):
        Toxiproxy("http://127.0.0.1:1", timeout_s=1).proxies()


def test_a_proxy_state_maps_faults_to_toxics() -> None:
    link = ConstantLink(value_ms=17.5, jitter_ms=1.5)
    state = ProxyState("a->b", "a", "b", "127.0.0.1:1", "127.0.0.1:2", link)
    enabled, toxics = state.wanted()
    assert enabled
    assert toxics["latency-up"] == ("upstream", "latency", {"latency": 18, "jitter": 2})
    assert toxics["latency-down"][0] == "downstream"
    state.blocked = {"upstream"}  # one way: a black hole on that stream only
    enabled, toxics = state.wanted()
    assert enabled and toxics["hole-upstream"] == ("upstream", "timeout", {"timeout": 0})
    assert "hole-downstream" not in toxics
    state.blocked = {"upstream", "downstream"}  # both ways: the proxy is disabled
    assert state.wanted()[0] is False
    co_located = ProxyState("agent@a->a", "a", "a", "127.0.0.1:1", "127.0.0.1:2", None)
    assert co_located.wanted() == (True, {})


# --------------------------------------------------------------------- toxics act


def test_latency_toxic_raises_the_raft_round_trip_on_that_link_only(
    tmp_path: Path, toxiproxy: Toxiproxy
) -> None:
    """100 ms each way on leader<->follower F: the heartbeat goes out through proxy
    "L->F" (upstream +100 ms) and its answer comes back through "F->L" (upstream +100 ms),
    so the RTT the leader measures should rise by ~200 ms. Bounds +150..+350 ms: below,
    the toxic did not act on both directions; above, more than a 50 % scheduling and
    TCP error on a loaded 2-core machine. The other follower's link must not change
    (< +50 ms): the toxic acts on exactly the link it names."""
    s = scenario(THREE_CLOUDS)
    with running(s, tmp_path, toxiproxy) as cluster, cluster.observer_client() as client:
        leader = wait_for("a leader", lambda: leader_of(cluster, client), 30)[0]
        slow, other = [n for n in cluster.control if n != leader]
        wait_for("RTT samples", lambda: rtt_ms(client, leader, slow), 10)
        wait_for("RTT samples", lambda: rtt_ms(client, leader, other), 10)
        base_slow = statistics.median(rtt_samples(client, leader, slow, 10))
        base_other = statistics.median(rtt_samples(client, leader, other, 10))

        def slow_down(state: ProxyState, stream: Stream) -> None:
            state.override = ConstantLink(value_ms=100)

        cluster.update_pairs({(leader, slow), (slow, leader)}, slow_down)
        toxics = {t["name"]: t for t in toxiproxy.toxics(f"{leader}->{slow}")}
        assert toxics["latency-up"]["attributes"]["latency"] == 100
        assert toxics["latency-down"]["stream"] == "downstream"
        wait_for(
            "the RTT to rise",
            lambda: (rtt_ms(client, leader, slow) or 0) > base_slow + 150,
            10,
        )
        current = leader_of(cluster, client)
        assert current is not None and current[0] == leader  # 200 ms RTT: no election
        slowed = statistics.median(rtt_samples(client, leader, slow, 10))
        unaffected = statistics.median(rtt_samples(client, leader, other, 10))
        print(f"RTT {leader}->{slow}: {base_slow:.1f} ms -> {slowed:.1f} ms with 100 ms each way; "
              f"{leader}->{other}: {base_other:.1f} -> {unaffected:.1f} ms")  # fmt: skip
        assert 150 <= slowed - base_slow <= 350, (base_slow, slowed)
        assert unaffected - base_other < 50, (base_other, unaffected)

        def restore(state: ProxyState, stream: Stream) -> None:
            state.override = None

        cluster.update_pairs({(leader, slow), (slow, leader)}, restore)
        assert toxiproxy.toxics(f"{leader}->{slow}") == []
        wait_for(
            "the RTT to fall back",
            lambda: (rtt_ms(client, leader, slow) or 1e9) < base_slow + 50,
            10,
        )


# ---------------------------------------------------------------- partition


def test_partition_of_the_leaders_cloud_elects_a_new_leader_and_the_old_one_steps_down(
    tmp_path: Path, toxiproxy: Toxiproxy
) -> None:
    """Each node sits in its own cloud, so the leader's cloud is always a minority."""
    s = scenario(THREE_CLOUDS)
    with running(s, tmp_path, toxiproxy) as cluster, cluster.observer_client() as client:
        old, old_term = wait_for("a leader", lambda: leader_of(cluster, client), 30)
        cloud = s.topology.node(old).cloud
        run = ChaosRun(s, 1, cluster)
        try:
            run.player.fire(
                PartitionFault.model_validate(
                    {"at_s": 0, "kind": "partition", "groups": [[f"cloud:{cloud}"]]}
                )
            )
            assert run.player.failover_started_s is not None  # the fault hit the leader
            assert not toxiproxy.proxies()[
                f"{old}->{next(n for n in cluster.control if n != old)}"
            ].enabled

            def new_leader() -> tuple[str, int] | None:
                for name in cluster.control:
                    seen = cluster.node_status(name, client)
                    if seen and name != old and seen[0] == name and seen[1] > old_term:
                        return name, seen[1]
                return None

            new, new_term = wait_for("the majority to elect a new leader", new_leader, 15)

            def stepped_down() -> bool:
                seen = cluster.node_status(old, client)
                return seen is not None and seen[0] != old and seen[2] != "leader"

            wait_for(f"{old} to step down (CheckQuorum)", stepped_down, 15)
            run.player.heal()
            assert all(p.enabled for p in toxiproxy.proxies().values())

            def rejoined() -> bool:
                seen = cluster.node_status(old, client)
                return seen is not None and seen[0] == new and seen[1] == new_term

            # PreVote: the old leader rejoins under the new one without a new election.
            wait_for(f"{old} to follow {new} in term {new_term}", rejoined, 15)
        finally:
            run.close()


# ------------------------------------------------------------------ cleanup

TINY = """
name: tiny
duration_s: 8
topology:
  nodes:
    - {name: a, cloud: aws, region: r1, roles: [control, agent]}
    - {name: b, cloud: aws, region: r1, roles: [control]}
    - {name: c, cloud: gcp, region: r2, roles: [control]}
workload:
  clients: [{name: cl, node: a}]
  rate_per_s: 4
  stop_s: 6
  mix: {matmul: {args: {n: 16, m: 16, k: 16}}}
faults:
  - {at_s: 3, kind: crash, target: leader, restart_after_s: 2}
expectations:
  - tasks_lost == 0
  - duplicate_results == 0
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return stat.read_text().split(") ", 1)[1][0] != "Z"
    return False


def recorded_pids(out: Path) -> list[int]:
    path = out / "work" / "pids.json"
    return list(json.loads(path.read_text())) if path.is_file() else []


@contextlib.contextmanager
def chaos_process(args: list[str], out: Path) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "goml", "chaos", "run", *args, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        for pid in recorded_pids(out):  # never leak what it started, even if it failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_run_reports_and_leaves_no_process_and_no_proxy(
    tmp_path: Path, toxiproxy: Toxiproxy
) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    out = tmp_path / "out"
    with chaos_process([str(path), "--json", "--toxiproxy-url", toxiproxy.url], out) as process:
        stdout, _ = process.communicate(timeout=240)
        assert process.returncode == 0, stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks_acknowledged"] > 0
    assert summary["tasks_lost"] == 0 and summary["duplicate_results"] == 0
    assert summary["simulator"]["tasks_lost"] == 0
    assert "Side by side" in (out / "report.html").read_text()
    pids = recorded_pids(out)
    assert len(pids) >= 4  # 3 nodes + 1 agent (+ the restarted leader)
    assert [pid for pid in pids if alive(pid)] == []
    assert toxiproxy.proxies() == {}


def test_a_run_interrupted_with_sigint_stops_everything_it_started(tmp_path: Path) -> None:
    """This run starts its own Toxiproxy server too: it must be gone afterwards."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.replace("duration_s: 8", "duration_s: 60"))
    out = tmp_path / "out"
    with chaos_process([str(path)], out) as process:
        cluster_file = out / "work" / "cluster.json"
        wait_for("the cluster to be up", lambda: cluster_file.is_file(), 120, 0.2)
        toxiproxy_pid = recorded_pids(out)[0]
        server = Toxiproxy((out / "work" / "toxiproxy_url").read_text().strip())
        wait_for("the proxies", lambda: len(server.proxies()) == 12, 30)
        wait_for("4 processes running", lambda: len(recorded_pids(out)) >= 5, 60, 0.2)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=90)
        assert process.returncode == 130
    pids = recorded_pids(out)
    assert toxiproxy_pid in pids
    assert [pid for pid in pids if alive(pid)] == []
    with pytest.raises(ToxiproxyError):
        server.proxies()  # the server it started is gone
