"""Agents end to end: 3 control-plane node processes and 2 agent processes on loopback,
mutual TLS, started with `goml.cluster.local` exactly as `goml cluster up` does.

What is checked:
  * library tasks submitted as one batch all succeed, each result equal to a local run
    of the same seeded task and to an independent NumPy/SciPy computation;
  * kill -9 of the Raft leader while agents run tasks: every task ends SUCCEEDED, its
    result recorded exactly once, on every replica (stores replayed after the stop);
  * kill -9 of the agent running a task: the control plane declares it down and the
    task completes on the other agent;
  * a task that raises ends DEAD after max_attempts with its error text; a task that
    hangs is killed at its timeout (its process is gone) and ends DEAD; agents stay up.

Every process is started through `local.running_cluster` (stopped by PID on exit, also
on failure). Waiting is on conditions with deadlines; the nodes use shorter duty
timeouts than production (`TEST_DUTIES`) so a dead agent is noticed in ~2 s.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml

from goml.agent.tasks import run_task
from goml.client import TERMINAL_STATES, Client, ClientError
from goml.cluster import local
from goml.cluster.config import Duties, load_node_config
from goml.proto import api_pb2

try:  # written concurrently by another change; the test falls back to the client
    from goml.cluster import inspect as cluster_inspect
except ImportError:  # pragma: no cover
    cluster_inspect = None  # type: ignore[assignment]

pytestmark = pytest.mark.slow

# Production: agent_timeout 5 s, grace 5 s, lease 15 s. Here everything is ~3x faster;
# heartbeats follow (the leader tells agents agent_timeout_ms / 5 = 400 ms).
TEST_DUTIES = Duties(
    agent_timeout_ms=2000, election_grace_ms=2000, lease_ms=6000, renew_before_ms=3000
)
START_TIMEOUT_S = 60.0
RESULT_BYTES_MAX = 1 << 20
POLL_S = 0.05  # polling remote processes' state: there is nothing local to wait on


# --------------------------------------------------------------------------- helpers


def wait_until(what: str, predicate: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(POLL_S)


def spec(
    function: str,
    args: dict[str, Any],
    *,
    cpu: float = 0.5,
    max_attempts: int = 3,
    timeout_ms: int = 60_000,
) -> api_pb2.TaskSpec:
    return api_pb2.TaskSpec(
        function=function,
        args_json=json.dumps(args),
        resources=api_pb2.Resources(cpu=cpu, memory_mb=64),
        max_attempts=max_attempts,
        timeout_ms=timeout_ms,
        idempotency_key=str(uuid.uuid4()),
    )


def state_name(task: api_pb2.Task) -> str:
    return api_pb2.TaskState.Name(task.state)


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state is [0], ppid [1],
    pgrp [2], utime [11], stime [12]); None if the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = proc_stat(int(entry))
            if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
                members.append(int(entry))
    return members


def task_processes(agent_pid: int) -> list[int]:
    """An agent's task processes: its grandchildren (the runner forks tasks from a
    forkserver, the agent's child). `local.spawn` gives each agent its own session, so
    they are in the process group named by the agent's PID."""
    found = []
    for pid in group_members(agent_pid):
        fields = proc_stat(pid)
        if pid != agent_pid and fields is not None and int(fields[1]) != agent_pid:
            found.append(pid)
    return found


@dataclass
class LiveCluster:
    layout: local.LocalLayout
    processes: list[local.Process]
    client: Client

    def process(self, name: str) -> local.Process:
        return [p for p in self.processes if p.name == name][-1]

    def node_names(self) -> list[str]:
        return sorted(self.layout.node_configs)

    def data_dirs(self) -> dict[str, Path]:
        return {
            name: load_node_config(path).data_dir
            for name, path in sorted(self.layout.node_configs.items())
        }

    def leader(self) -> str:
        leader = local.wait_for_leader(self.layout.profile, timeout_s=START_TIMEOUT_S)
        return leader

    def alive_agents(self) -> set[str]:
        try:
            status = self.client.status()
        except ClientError:
            return set()
        return {a.id for a in status.agents if a.state == "ALIVE"}

    def kill9(self, name: str) -> None:
        process = self.process(name)
        os.kill(process.popen.pid, signal.SIGKILL)
        process.popen.wait(timeout=10)

    def restart_node(self, name: str) -> None:
        path = self.layout.node_configs[name]
        log = self.layout.data_dir / "logs" / f"{name}.log"
        # Appended to the list `running_cluster` stops on exit.
        self.processes.append(local.spawn(name, local.node_argv(path), log))

    def wait_all(self, task_ids: list[str], timeout_s: float) -> dict[str, api_pb2.Task]:
        """Poll until every task is terminal; returns them by id."""
        done: dict[str, api_pb2.Task] = {}

        def all_terminal() -> bool:
            for task_id in task_ids:
                if task_id not in done:
                    task = self.client.get(task_id)
                    if task.state in TERMINAL_STATES:
                        done[task_id] = task
            return len(done) == len(task_ids)

        try:
            wait_until(f"{len(task_ids)} tasks terminal", all_terminal, timeout_s)
        except TimeoutError:
            late = {t: state_name(self.client.get(t)) for t in task_ids if t not in done}
            raise TimeoutError(f"still not terminal: {late}") from None
        return done

    def wait_replicas_caught_up(self, timeout_s: float) -> None:
        target = self.client.status().commit_index

        def caught_up() -> bool:
            for name in self.node_names():
                try:
                    status = self.client.status(node_id=name)
                except ClientError:
                    return False
                me = [m for m in status.members if m.id == name]
                if not me or me[0].applied_index < target:
                    return False
            return True

        wait_until(f"every replica applied index {target}", caught_up, timeout_s)


@contextlib.contextmanager
def live_cluster(
    data_dir: Path, agents: int = 2, agent_config: Callable[[Path], None] | None = None
) -> Iterator[LiveCluster]:
    """`agent_config`, if given, may change each agent's config file before it starts."""
    layout = local.prepare(data_dir, nodes=3, insecure=False, duties=TEST_DUTIES)
    extra = local.agent_processes(layout, agents)
    if agent_config is not None:
        for name, _ in extra:
            agent_config(layout.data_dir / "config" / f"{name}.yaml")
    with (
        local.running_cluster(layout, extra) as processes,
        Client(layout.profile, call_timeout_s=5.0, retry_s=30.0) as client,
    ):
        cluster = LiveCluster(layout, processes, client)
        try:
            cluster.leader()
            wanted = {name for name, _ in extra}
            wait_until(
                f"agents {sorted(wanted)} registered",
                lambda: cluster.alive_agents() >= wanted,
                START_TIMEOUT_S,
            )
            yield cluster
        finally:
            # Task processes of a SIGKILLed agent outlive it (the forkserver's children,
            # in the agent's process group): end each, by PID, before leaving.
            for process in processes:
                if process.name.startswith("agent-") and process.popen.poll() is not None:
                    for pid in group_members(process.popen.pid):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)


def local_result(function: str, args: dict[str, Any]) -> Any:
    if function == "sleep_ms":
        return {"slept_ms": args["ms"]}  # what running it would give, without the wait
    return json.loads(run_task(function, json.dumps(args), RESULT_BYTES_MAX))


# --------------------------------------------------------------------------- expected values
# Independent computations from the documented generators (as tests/test_tasks.py does).


def check_matmul(args: dict[str, Any], out: Any) -> None:
    rng = np.random.default_rng(args["seed"])
    c = rng.standard_normal((args["n"], args["m"])) @ rng.standard_normal((args["m"], args["k"]))
    assert out["shape"] == [args["n"], args["k"]]
    assert out["frobenius_norm"] == pytest.approx(math.sqrt((c**2).sum()), rel=1e-12)
    assert out["diagonal_sum"] == pytest.approx(np.trace(c), rel=1e-9, abs=1e-12)
    assert out["sum"] == pytest.approx(c.sum(), rel=1e-9, abs=1e-9)


def check_svd(args: dict[str, Any], out: Any) -> None:
    a = np.random.default_rng(args["seed"]).standard_normal((args["rows"], args["cols"]))
    s = np.linalg.svd(a)[1]  # full SVD, with U and V
    assert out["singular_values"] == pytest.approx(s[: args["top_k"]].tolist(), rel=1e-10)
    assert out["frobenius_norm"] == pytest.approx(np.linalg.norm(a), rel=1e-10)


def check_eigh(args: dict[str, Any], out: Any) -> None:
    a = np.random.default_rng(args["seed"]).standard_normal((args["n"], args["n"]))
    expected = np.sort(np.linalg.eigvals((a + a.T) / 2).real)  # the general solver
    assert out["eigenvalues"] == pytest.approx(expected.tolist(), abs=1e-9)


def check_fft(args: dict[str, Any], out: Any) -> None:
    n, rate = args["n_samples"], args["sample_rate"]
    t = np.arange(n) / rate
    x = sum(
        a * np.sin(2 * np.pi * f * t)
        for f, a in zip(args["freqs"], args["amplitudes"], strict=True)
    )
    x = x + args["noise"] * np.random.default_rng(args["seed"]).standard_normal(n)
    spectrum = np.abs(np.fft.fft(x))[: n // 2]  # the full complex FFT
    by_amplitude = sorted(zip(args["amplitudes"], args["freqs"], strict=True), reverse=True)
    assert out["dominant_frequencies"] == [f for _, f in by_amplitude]
    assert np.argmax(spectrum) * rate / n == out["dominant_frequencies"][0]


def check_kmeans(args: dict[str, Any], out: Any) -> None:
    k, n = args["n_clusters"], args["n_samples"]
    rng = np.random.default_rng(args["seed"])
    centers = rng.uniform(-10, 10, size=(k, args["dims"]))
    x = centers[np.arange(n) % k] + args["cluster_std"] * rng.standard_normal((n, args["dims"]))
    got = np.array(out["centroids"])
    for c in centers:
        assert np.min(np.linalg.norm(got - c, axis=1)) < 0.1
    assert out["cluster_sizes"] == [n // k] * k
    inertia = ((x[:, None, :] - got[None, :, :]) ** 2).sum(-1).min(1).sum()
    assert out["inertia"] == pytest.approx(inertia, rel=1e-9)


def check_linreg(args: dict[str, Any], out: Any) -> None:
    n, d = args["n_samples"], args["n_features"]
    rng = np.random.default_rng(args["seed"])
    x = rng.standard_normal((n, d))
    w = rng.standard_normal(d)
    b = rng.standard_normal()
    y = x @ w + b + args["noise"] * rng.standard_normal(n)
    xb = np.hstack([x, np.ones((n, 1))])
    theta = np.linalg.solve(xb.T @ xb, xb.T @ y)  # normal equations, not lstsq
    assert out["coefficients"] == pytest.approx(theta[:-1].tolist(), rel=1e-8, abs=1e-10)
    assert out["intercept"] == pytest.approx(theta[-1], rel=1e-8, abs=1e-10)
    assert out["coefficients"] == pytest.approx(w.tolist(), abs=0.05)


def check_logreg(args: dict[str, Any], out: Any) -> None:
    from scipy.optimize import minimize  # type: ignore[import-untyped, unused-ignore]

    n, d, l2 = args["n_samples"], args["n_features"], args["l2"]
    rng = np.random.default_rng(args["seed"])
    x = rng.standard_normal((n, d))
    w = 2 * rng.standard_normal(d)
    b = rng.standard_normal()
    y = (rng.random(n) < 1 / (1 + np.exp(-(x @ w + b)))).astype(float)
    xb = np.hstack([x, np.ones((n, 1))])

    def loss(theta: Any) -> float:
        z = xb @ theta
        return float(np.mean(np.log1p(np.exp(z)) - y * z) + 0.5 * l2 * theta[:-1] @ theta[:-1])

    best = minimize(loss, np.zeros(d + 1), method="BFGS", options={"gtol": 1e-9})
    assert out["weights"] == pytest.approx(best.x[:-1].tolist(), abs=1e-3)
    assert out["intercept"] == pytest.approx(best.x[-1], abs=1e-3)
    assert out["final_loss"] == pytest.approx(best.fun, abs=1e-6)


def check_minimize(args: dict[str, Any], out: Any) -> None:
    from scipy.optimize import rosen  # type: ignore[import-untyped, unused-ignore]

    assert out["success"] is True
    assert out["x"] == pytest.approx([1.0] * args["dims"], abs=1e-3)
    assert out["fun"] == pytest.approx(rosen(np.array(out["x"])), rel=1e-6, abs=1e-12)


def check_monte_carlo_pi(args: dict[str, Any], out: Any) -> None:
    samples = args["samples"]
    rng = np.random.default_rng(args["seed"])
    x, y = rng.random(samples), rng.random(samples)  # one chunk: samples <= 1e6
    hits = int(np.sum(x**2 + y**2 <= 1))
    assert out["estimate"] == 4 * hits / samples
    assert abs(out["estimate"] - math.pi) < 5 * out["stderr"]


LIBRARY: list[tuple[str, dict[str, Any], Callable[[dict[str, Any], Any], None]]] = [
    ("matmul", {"n": 6, "m": 5, "k": 7, "seed": 1}, check_matmul),
    ("matmul", {"n": 8, "m": 8, "k": 8, "seed": 2}, check_matmul),
    ("svd", {"rows": 12, "cols": 8, "top_k": 3, "seed": 2}, check_svd),
    ("eigh", {"n": 10, "seed": 3}, check_eigh),
    (
        "fft",
        {
            "freqs": [50.0, 120.0],
            "amplitudes": [1.0, 0.5],
            "sample_rate": 1000.0,
            "n_samples": 1000,
            "noise": 0.1,
            "seed": 5,
        },
        check_fft,
    ),
    (
        "kmeans",
        {"n_samples": 300, "n_clusters": 3, "dims": 2, "cluster_std": 0.2, "seed": 21},
        check_kmeans,
    ),
    ("linreg", {"n_samples": 200, "n_features": 3, "noise": 0.05, "seed": 9}, check_linreg),
    (
        "logreg",
        {"n_samples": 400, "n_features": 2, "lr": 1.0, "epochs": 3000, "l2": 0.01, "seed": 4},
        check_logreg,
    ),
    ("minimize", {"dims": 3, "method": "L-BFGS-B", "seed": 0}, check_minimize),
    ("monte_carlo_pi", {"samples": 100_000, "seed": 13}, check_monte_carlo_pi),
]


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    with live_cluster(tmp_path_factory.mktemp("agents")) as live:
        yield live


def test_library_batch_results_match_numpy(cluster: LiveCluster) -> None:
    ids = cluster.client.submit_specs([spec(f, a) for f, a, _ in LIBRARY])
    assert len(set(ids)) == len(LIBRARY)
    done = cluster.wait_all(ids, timeout_s=120)
    for task_id, (function, args, check) in zip(ids, LIBRARY, strict=True):
        task = done[task_id]
        assert state_name(task) == "SUCCEEDED", (function, task.error)
        assert task.attempts == 1, (function, task.error)
        out = json.loads(task.result_json)
        assert out == local_result(function, args), function  # carried intact
        check(args, out)


# Below the 5 s watch window that `Client.wait` renews: a waiter that missed the end, or
# that learned of an unknown id only from a silent window, would take longer.
WAIT_SEEN_AT_ONCE_S = 4.0


def test_wait_sees_an_end_at_once_and_an_unknown_id_is_not_found(cluster: LiveCluster) -> None:
    args = {"n": 4, "m": 4, "k": 4, "seed": 7}
    [task_id] = cluster.client.submit_specs([spec("matmul", args)])
    task = cluster.client.wait(task_id, timeout_s=60)
    assert state_name(task) == "SUCCEEDED", task.error
    assert json.loads(task.result_json) == local_result("matmul", args)
    # Already over before the watch starts (as when it ends between a Get and a watch):
    # the watch's first event says so; nothing is waited for.
    started = time.monotonic()
    again = cluster.client.wait(task_id, timeout_s=60)
    assert (again.id, state_name(again)) == (task_id, "SUCCEEDED")
    assert time.monotonic() - started < WAIT_SEEN_AT_ONCE_S
    started = time.monotonic()
    with pytest.raises(ClientError) as missing:
        cluster.client.wait("t-no-such-task", timeout_s=60)
    assert missing.value.code is grpc.StatusCode.NOT_FOUND, missing.value
    assert time.monotonic() - started < WAIT_SEEN_AT_ONCE_S


def test_failing_task_is_dead_after_max_attempts(cluster: LiveCluster) -> None:
    message = f"boom {uuid.uuid4().hex}: disk on fire"
    [task_id] = cluster.client.submit_specs([spec("fail", {"message": message}, max_attempts=2)])
    task = cluster.wait_all([task_id], timeout_s=60)[task_id]
    assert state_name(task) == "DEAD"
    assert task.attempts == 2
    assert task.error == f"RuntimeError: {message}"
    assert task.result_json == ""


def test_hanging_task_is_killed_at_timeout_and_agents_stay_healthy(
    cluster: LiveCluster,
) -> None:
    agents = {name: cluster.process(name).popen.pid for name in ("agent-1", "agent-2")}
    # Warm workers stay between tasks: remember them, to see which the hung tasks took.
    workers_before = {name: set(task_processes(pid)) for name, pid in agents.items()}
    started = time.monotonic()
    [task_id] = cluster.client.submit_specs(
        [spec("sleep_ms", {"ms": 600_000}, max_attempts=2, timeout_ms=1000)]
    )
    task = cluster.wait_all([task_id], timeout_s=60)[task_id]
    elapsed = time.monotonic() - started
    assert state_name(task) == "DEAD"
    assert task.attempts == 2
    assert task.error == "timed out after 1000 ms"
    assert elapsed < 30, elapsed  # two 1 s attempts, not the 10 min sleep
    # The workers that ran the hung attempts were killed and reaped: the agents' warm
    # workers now are the ones from before, minus the two that ran the hung task, plus
    # the replacements started since (each agent keeps at most its slot count).
    killed = 0
    for name, pid in agents.items():
        assert cluster.process(name).popen.poll() is None, f"{name} died"
        now = set(task_processes(pid))
        killed += len(workers_before[name] - now)
    assert killed >= 2, (workers_before, killed)
    assert cluster.alive_agents() == set(agents)
    args = {"n": 8, "m": 8, "k": 8, "seed": 1}
    [after] = cluster.client.submit_specs([spec("matmul", args)])
    task = cluster.wait_all([after], timeout_s=60)[after]
    assert state_name(task) == "SUCCEEDED"
    assert json.loads(task.result_json) == local_result("matmul", args)


def test_an_isolated_task_runs_in_a_fresh_process_that_is_gone_after(
    cluster: LiveCluster,
) -> None:
    agents = {name: cluster.process(name).popen.pid for name in ("agent-1", "agent-2")}
    args = {"n": 8, "m": 8, "k": 8, "seed": 3}
    isolated = spec("matmul", args)
    isolated.isolated = True
    [task_id] = cluster.client.submit_specs([isolated])
    task = cluster.wait_all([task_id], timeout_s=60)[task_id]
    assert state_name(task) == "SUCCEEDED", task.error
    assert task.spec.isolated  # the manifest kept the option
    assert json.loads(task.result_json) == local_result("matmul", args)
    logs = {name: cluster.layout.data_dir / "logs" / f"{name}.log" for name in sorted(agents)}
    line = f"task {task_id} ran isolated in pid "

    def said() -> str | None:
        for path in logs.values():
            for text in path.read_text().splitlines():
                if line in text:
                    return text
        return None

    wait_until("the agent logs the isolated run", lambda: said() is not None, 10)
    found = said()
    assert found is not None
    pid = int(found.split(line)[1].split()[0])
    # A process of its own: not one of the agents' warm workers, and gone once done.
    assert all(pid not in task_processes(agent) for agent in agents.values())
    wait_until(f"pid {pid} is gone", lambda: proc_stat(pid) is None, 10)


def test_kill_9_leader_while_agents_run_tasks(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    work: list[tuple[str, dict[str, Any]]] = []
    for i in range(30):
        if i % 5 < 2:  # 12 sleeps of 300-800 ms keep tasks in flight
            work.append(("sleep_ms", {"ms": int(rng.integers(300, 801))}))
        else:
            work.append(("matmul", {"n": 4 + i % 4, "m": 5, "k": 6, "seed": i}))
    with live_cluster(tmp_path) as cluster:
        client = cluster.client
        first = client.submit_specs([spec(f, a) for f, a in work[:20]])

        def some_done_some_in_flight() -> bool:
            states = [state_name(client.get(t)) for t in first]
            in_flight = states.count("LEASED") + states.count("RUNNING")
            return states.count("SUCCEEDED") >= 3 and in_flight >= 1

        wait_until("3 tasks done and 1 on an agent", some_done_some_in_flight, 60)
        old_leader = cluster.leader()
        cluster.kill9(old_leader)
        new_leader = cluster.leader()
        assert new_leader != old_leader
        # Submitted through the failover (the client finds the new leader).
        second = client.submit_specs([spec(f, a) for f, a in work[20:]])
        ids = first + second
        done = cluster.wait_all(ids, timeout_s=120)
        for task_id, (function, args) in zip(ids, work, strict=True):
            task = done[task_id]
            assert state_name(task) == "SUCCEEDED", (function, task.error)
            assert json.loads(task.result_json) == local_result(function, args)
        # The old leader comes back and catches up, so every replica has every task.
        cluster.restart_node(old_leader)
        cluster.wait_replicas_caught_up(timeout_s=60)
        results = {t: done[t].result_json for t in ids}
        if cluster_inspect is None:
            for name in cluster.node_names():  # fallback: each replica's applied view
                assert client.status(node_id=name).tasks_by_state.get("SUCCEEDED", 0) == 30
        data_dirs = cluster.data_dirs()
    # Every process is stopped now: replay each node's store.
    if cluster_inspect is not None:
        manifests = cluster_inspect.replay_cluster(data_dirs)
        assert sorted(manifests) == ["n1", "n2", "n3"]
        for name, manifest in manifests.items():
            for task_id, result_json in results.items():
                task = manifest.get_task(task_id)
                assert task is not None, (name, task_id)
                assert task.state.value == "SUCCEEDED", (name, task_id, task.state)
                assert task.results_recorded == 1, (name, task_id)
                assert task.result_json == result_json, (name, task_id)


def test_idle_agents_follow_a_new_leader_and_a_dead_idle_agent_is_marked_down(
    tmp_path: Path,
) -> None:
    """Idle agents send no heartbeats while their lease polls are parked (issue 12): the
    leader counts the polls. They still find a new leader when the old one dies (the
    parked poll fails with the connection), and a SIGKILLed idle agent is still marked
    down within agent_timeout_ms (its poll is forgotten with its connection)."""
    timeout_s = TEST_DUTIES.agent_timeout_ms / 1000
    wait_s = 20.0  # polls held far longer than the timeout: a poll that outlived its
    # caller (here or, forwarded, on the leader) would keep a dead agent up for ~20 s

    def long_polls(path: Path) -> None:
        config = yaml.safe_load(path.read_text())
        config["lease_wait_ms"] = int(wait_s * 1000)
        path.write_text(yaml.safe_dump(config, sort_keys=False))

    with live_cluster(tmp_path, agent_config=long_polls) as cluster:
        old_leader = cluster.leader()
        cluster.kill9(old_leader)
        new_leader = cluster.leader()
        assert new_leader != old_leader
        # Past the new leader's grace and two agent timeouts, both are still ALIVE: their
        # polls reached the new leader.
        window_end = time.monotonic() + (TEST_DUTIES.election_grace_ms / 1000) + 2 * timeout_s
        while time.monotonic() < window_end:
            assert cluster.alive_agents() >= {"agent-1", "agent-2"}, "an idle agent was lost"
            time.sleep(0.1)  # sampling a remote state over a window, not a sync
        status = cluster.client.status()
        ages = {a.id: a.last_heartbeat_age_ms for a in status.agents}
        assert status.leader_id == new_leader
        assert all(0 <= ages[a] < TEST_DUTIES.agent_timeout_ms for a in ("agent-1", "agent-2"))
        cluster.kill9("agent-2")
        killed = time.monotonic()
        wait_until(
            "agent-2 marked down",
            lambda: "agent-2" not in cluster.alive_agents(),
            timeout_s + 10,
        )
        took = time.monotonic() - killed
        # One timeout, plus a duties round and a commit (slow under load), not the
        # poll's 20 s wait.
        assert took < timeout_s + 8.0, took
        assert "agent-1" in cluster.alive_agents()


def test_kill_9_agent_mid_task_moves_task_to_other_agent(tmp_path: Path) -> None:
    with live_cluster(tmp_path) as cluster:
        client = cluster.client
        started = time.monotonic()
        [task_id] = client.submit_specs([spec("sleep_ms", {"ms": 3000})])
        holder: list[api_pb2.Task] = []

        def running() -> bool:
            task = client.get(task_id)
            holder[:] = [task]
            return state_name(task) == "RUNNING"

        wait_until("the task runs", running, 30)
        first = holder[0]
        victim = first.agent_id
        other = {"agent-1": "agent-2", "agent-2": "agent-1"}[victim]
        victim_pid = cluster.process(victim).popen.pid
        # RUNNING is committed when the agent hands the task to its runner; the warm
        # worker that runs it may still be forking from the forkserver (slow under load).
        wait_until("the victim's worker process", lambda: bool(task_processes(victim_pid)), 30)
        cluster.kill9(victim)

        def held_by_other() -> bool:
            task = client.get(task_id)
            holder[:] = [task]
            return task.agent_id == other or task.state in TERMINAL_STATES

        wait_until(f"the task leased to {other}", held_by_other, 30)
        second = holder[0]
        assert second.agent_id == other, state_name(second)
        assert second.epoch > first.epoch
        assert victim not in cluster.alive_agents()
        final = cluster.wait_all([task_id], timeout_s=30)[task_id]
        assert state_name(final) == "SUCCEEDED"
        assert json.loads(final.result_json) == {"slept_ms": 3000}
        assert final.attempts == 2
        assert time.monotonic() - started < 45


def test_cancelling_a_running_task_frees_its_slot_within_two_seconds(tmp_path: Path) -> None:
    with live_cluster(tmp_path, agents=1) as cluster:
        # One agent with 2 cpus: a 60 s task of 2 cpus holds all of it.
        [long] = cluster.client.submit_specs([spec("sleep_ms", {"ms": 60_000}, cpu=2.0)])
        wait_until(
            "the long task runs",
            lambda: state_name(cluster.client.get(long)) in ("LEASED", "RUNNING"),
            30,
        )
        # Nothing is free for it until the long task's run stops.
        [quick] = cluster.client.submit_specs([spec("matmul", {"n": 4, "m": 4, "k": 4}, cpu=2.0)])
        cancelled_at = time.monotonic()
        assert state_name(cluster.client.cancel(long)) == "CANCELLED"
        done = cluster.wait_all([quick], timeout_s=30)[quick]
        freed_s = time.monotonic() - cancelled_at
        assert state_name(done) == "SUCCEEDED", done.error
        # The heartbeat answer revokes the lease (agents heartbeat every 400 ms here):
        # the long task's run is stopped and its slot taken by the quick one.
        assert freed_s < 2.0, freed_s
        assert cluster.process("agent-1").popen.poll() is None
        final = cluster.client.get(long)
        assert state_name(final) == "CANCELLED" and final.result_json == ""
