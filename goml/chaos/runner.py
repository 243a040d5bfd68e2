"""`goml chaos run`: a scenario on real processes behind Toxiproxy, measured with the
simulator's definitions and reported side by side with the simulator's prediction.

Definitions (as in goml/sim/simulation.py):
- failover: from a fault that hits the leader (crash, pause or restart of the leader; a
  partition or clog that cuts the leader off from a majority) until the first
  acknowledgement of a submit STARTED after that moment;
- submit_ms: from the client call to its acknowledgement (retries across a failover
  included); submit_ms_steady: only submits that started with no failover under way and
  with their client's location able to reach a quorum of control nodes;
- tasks_lost: acknowledged tasks missing (or with another id) on any replica, read from
  every stopped node's store with `replay_cluster`; duplicate_results: the extra results
  of tasks recorded more than once; leader_changes: distinct (leader, term) seen, minus 1.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import json
import queue
import random
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from goml.chaos.cluster import ChaosCluster, ProxyState, record_pids
from goml.chaos.server import ToxiproxyUnavailable, toxiproxy_server
from goml.chaos.toxiproxy import Stream, ToxiproxyError
from goml.client import Client, ClientError
from goml.cluster.config import Duties
from goml.cluster.inspect import replay_cluster
from goml.cluster.manifest import TaskState
from goml.proto import api_pb2
from goml.report.html import write_report
from goml.report.summary import distribution
from goml.scenario.faults import (
    describe_fault,
    pairs_between,
    partition_pairs,
    resolve_members,
    resolve_target,
)
from goml.scenario.loader import ScenarioError, load_scenario
from goml.scenario.schema import (
    AgentCrashFault,
    AnyFault,
    ClogFault,
    CrashFault,
    HealFault,
    LinkLatencyFault,
    PartitionFault,
    PauseFault,
    RestartFault,
    Scenario,
    UnclogFault,
)
from goml.sim.runner import judge, simulate

CLIENT_CALL_TIMEOUT_S = 1.0  # as the simulator's client (CLIENT_CALL_TIMEOUT_MS)
CLIENT_GIVE_UP_S = 30.0  # CLIENT_GIVE_UP_MS
SUBMIT_THREADS = 6
STARTUP_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 120.0
MONITOR_EVERY_S = 0.1
SAMPLE_EVERY_S = 1.0
UNFINISHED = ("PENDING", "LEASED", "RUNNING")
# Agents are noticed dead after agent_timeout_ms: the defaults (as the simulator's).
CHAOS_DUTIES = Duties()


class ChaosError(RuntimeError):
    pass


@dataclass
class Observations:
    submit_ms: list[float] = field(default_factory=list)
    submit_ms_steady: list[float] = field(default_factory=list)
    failovers_s: list[float] = field(default_factory=list)
    leaders: list[tuple[float, str, int]] = field(default_factory=list)
    faults: list[tuple[float, str]] = field(default_factory=list)
    tasks_by_state: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    acknowledged: dict[str, str] = field(default_factory=dict)  # idempotency key -> task id
    submitted: int = 0
    gave_up: int = 0
    errors: list[str] = field(default_factory=list)


class ChaosRun:
    def __init__(self, scenario: Scenario, seed: int, cluster: ChaosCluster) -> None:
        self.scenario = scenario
        self.seed = seed
        self.cluster = cluster
        self.obs = Observations()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.failover_started: float | None = None
        self.blocked: set[tuple[str, str]] = set()
        self.clogged: set[tuple[str, str]] = set()
        self.fault_rng = random.Random(f"{seed}:faults")
        self.workload_rng = random.Random(f"{seed}:workload")
        self.t0 = time.monotonic()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._counter = itertools.count()
        self._observer = cluster.observer_client()
        self._threads: list[threading.Thread] = []
        self._in_flight = 0
        self._leader_seen: tuple[str, int] | None = None

    # ----------------------------------------------------------------- clock

    def now(self) -> float:
        return time.monotonic() - self.t0

    def after(self, delay_s: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (self.now() + delay_s, next(self._counter), action))

    # ------------------------------------------------------------ measuring

    def steady_for(self, location: str) -> bool:
        if self.failover_started is not None:
            return False
        cut = self.blocked | self.clogged
        reachable = sum(
            1
            for name in self.cluster.control
            if name == location or ((location, name) not in cut and (name, location) not in cut)
        )
        return reachable > len(self.cluster.control) // 2

    def steady_for_cut(self, name: str) -> bool:
        cut = self.blocked | self.clogged
        reachable = sum(
            1
            for other in self.cluster.control
            if other == name or ((name, other) not in cut and (other, name) not in cut)
        )
        return reachable > len(self.cluster.control) // 2

    def _leader_lost(self, description: str) -> None:
        with self.lock:
            if self.failover_started is None:
                self.failover_started = time.monotonic()

    def _acknowledged(self, key: str, task_id: str, started: float, steady: bool) -> None:
        done = time.monotonic()
        with self.lock:
            latency_ms = (done - started) * 1000
            self.obs.submit_ms.append(latency_ms)
            if steady:
                self.obs.submit_ms_steady.append(latency_ms)
            self.obs.acknowledged[key] = task_id
            if self.failover_started is not None and started >= self.failover_started:
                self.obs.failovers_s.append(done - self.failover_started)
                self.failover_started = None

    # ------------------------------------------------------------- workload

    def start_workload(self) -> None:
        workload = self.scenario.workload
        if workload is None:
            return
        clients = {
            c.name: Client(
                self.cluster.profiles[c.node],
                call_timeout_s=CLIENT_CALL_TIMEOUT_S,
                retry_s=CLIENT_GIVE_UP_S,
                rng=random.Random(f"{self.seed}:client:{c.name}"),
            )
            for c in workload.clients
        }
        locations = {c.name: c.node for c in workload.clients}
        names = sorted(workload.mix)
        weights = [workload.mix[n].weight for n in names]
        work: queue.Queue[tuple[str, api_pb2.TaskSpec] | None] = queue.Queue()
        counter = itertools.count(1)
        run_id = uuid.uuid4().hex[:8]

        def make_spec(function: str | None) -> api_pb2.TaskSpec:
            chosen = function or self.workload_rng.choices(names, weights)[0]
            mix = workload.mix[chosen]
            return api_pb2.TaskSpec(
                function=chosen,
                args_json=json.dumps(mix.args, sort_keys=True),
                resources=api_pb2.Resources(
                    cpu=mix.resources.cpu,
                    memory_mb=mix.resources.memory_mb,
                    gpu=mix.resources.gpu,
                ),
                max_attempts=workload.max_attempts,
                timeout_ms=workload.timeout_ms,
                idempotency_key=f"chaos-{run_id}-s{self.seed}-{next(counter)}",
            )

        def worker() -> None:
            while True:
                item = work.get()
                if item is None:
                    return
                client_name, spec = item
                location = locations[client_name]
                with self.lock:
                    steady = self.steady_for(location)
                    self.obs.submitted += 1
                    self._in_flight += 1
                started = time.monotonic()
                try:
                    ids = clients[client_name].submit_specs([spec])
                    self._acknowledged(spec.idempotency_key, ids[0], started, steady)
                except ClientError as error:
                    with self.lock:
                        self.obs.gave_up += 1
                        if len(self.obs.errors) < 20:
                            self.obs.errors.append(f"{client_name}: {error}")
                finally:
                    with self.lock:
                        self._in_flight -= 1

        for i in range(SUBMIT_THREADS):
            thread = threading.Thread(target=worker, name=f"chaos-submit-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        client_names = [c.name for c in workload.clients]
        stop_s = workload.stop_s if workload.stop_s is not None else self.scenario.duration_s

        def enqueue(function: str | None, client: str | None) -> None:
            if not self.stop.is_set():
                work.put((client or self.workload_rng.choice(client_names), make_spec(function)))

        if workload.rate_per_s is not None:
            rate = workload.rate_per_s

            def arrival() -> None:
                if self.now() >= stop_s or self.stop.is_set():
                    return
                enqueue(None, None)
                self.after(self.workload_rng.expovariate(rate), arrival)

            self.after(workload.start_s + self.workload_rng.expovariate(rate), arrival)
        for item in workload.schedule or []:

            def scheduled(count: int = item.count, fn: str | None = item.function,
                          client: str | None = item.client) -> None:  # fmt: skip
                for _ in range(count):
                    enqueue(fn, client)

            self.after(item.at_s, scheduled)
        self._work = work
        self._clients = clients

    def stop_workload(self, timeout_s: float) -> None:
        """No new submits; wait (bounded) for the ones in flight to end."""
        self.stop.set()
        work = getattr(self, "_work", None)
        if work is None:
            return
        while True:  # drop what never started
            try:
                work.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            work.put(None)
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for client in self._clients.values():
            client.close()

    # -------------------------------------------------------------- monitor

    def start_monitor(self) -> None:
        def loop() -> None:
            next_sample = 0.0
            while not self.stop.wait(MONITOR_EVERY_S):
                self.poll_leader()
                if self.now() >= next_sample:
                    next_sample = self.now() + SAMPLE_EVERY_S
                    self.sample_tasks()

        thread = threading.Thread(target=loop, name="chaos-monitor", daemon=True)
        thread.start()
        self._monitor = thread

    def poll_leader(self) -> tuple[str, int] | None:
        leader = self.cluster.leader(self._observer)
        if leader is not None and leader != self._leader_seen:
            with self.lock:
                self._leader_seen = leader
                self.obs.leaders.append((round(self.now(), 3), leader[0], leader[1]))
        return leader

    def sample_tasks(self) -> None:
        leader = self._leader_seen
        if leader is None:
            return
        try:
            status = self._observer.status(leader[0])
        except ClientError:
            return
        with self.lock:
            self.obs.tasks_by_state.append(
                (round(self.now(), 3), {k: int(v) for k, v in status.tasks_by_state.items()})
            )

    # --------------------------------------------------------------- faults

    def _leader_name(self) -> str | None:
        leader = self.poll_leader()
        return leader[0] if leader else None

    def _resolve_target(self, target: str, agents: bool = False) -> str | None:
        pool = sorted(self.cluster.agents) if agents else list(self.cluster.control)
        return resolve_target(target, self._leader_name, pool, self.fault_rng)

    def _pairs(self, side_a: list[str], side_b: list[str]) -> set[tuple[str, str]]:
        topology = self.scenario.topology
        return pairs_between(
            resolve_members(topology, side_a, self._leader_name),
            resolve_members(topology, side_b, self._leader_name),
        )

    def fire(self, fault: AnyFault) -> None:
        with self.lock:
            self.obs.faults.append((round(self.now(), 3), describe_fault(fault)))
        cluster = self.cluster
        leader = self.poll_leader()
        leader_name = leader[0] if leader else None
        if isinstance(fault, CrashFault | RestartFault | PauseFault):
            name = self._resolve_target(fault.target)
            if name is None:
                return
            if name not in cluster.nodes:  # an agent-only node: its process is the agent
                agent = cluster.agent_processes[name]
                cluster.kill(agent)
                delay = getattr(fault, "restart_after_s", None) or getattr(fault, "down_s", 0.0)
                self.after(delay or 0.001, functools.partial(cluster.start, agent))
                return
            node = cluster.nodes[name]
            if leader_name == name:
                self._leader_lost(f"{fault.kind} of leader {name}")
            if isinstance(fault, PauseFault):
                cluster.pause(node)
                self.after(fault.duration_s, functools.partial(cluster.resume, node))
            elif isinstance(fault, CrashFault):
                cluster.kill(node)
                if fault.restart_after_s is not None:
                    self.after(fault.restart_after_s, functools.partial(cluster.start, node))
            else:
                if node.running:
                    cluster.kill(node)
                self.after(fault.down_s, functools.partial(cluster.start, node))
        elif isinstance(fault, PartitionFault):
            self._partition(fault)
            if leader_name is not None and not self.steady_for_cut(leader_name):
                self._leader_lost(f"partition cuts leader {leader_name} off")
            if fault.heal_after_s is not None:
                self.after(fault.heal_after_s, self._heal)
        elif isinstance(fault, HealFault):
            self._heal()
        elif isinstance(fault, LinkLatencyFault):
            pairs = self._pairs(fault.between[0], fault.between[1])
            latency = fault.latency

            def override(state: ProxyState, stream: Stream) -> None:
                state.override = latency

            cluster.update_pairs(pairs, override)
            if fault.duration_s is not None:

                def restore(state: ProxyState, stream: Stream) -> None:
                    state.override = None

                self.after(fault.duration_s, lambda: cluster.update_pairs(pairs, restore))
        elif isinstance(fault, ClogFault):
            pairs = self._pairs(fault.between[0], fault.between[1])
            self._clog(pairs)
            if leader_name is not None and not self.steady_for_cut(leader_name):
                self._leader_lost(f"clog cuts leader {leader_name} off")
            if fault.duration_s is not None:
                self.after(fault.duration_s, lambda: self._unclog(pairs))
        elif isinstance(fault, UnclogFault):
            pairs = (
                self._pairs(fault.between[0], fault.between[1])
                if fault.between is not None
                else set(self.clogged)
            )
            self._unclog(pairs)
        elif isinstance(fault, AgentCrashFault):
            name = self._resolve_target(fault.target, agents=True)
            if name is None or name not in cluster.agent_processes:
                return
            agent = cluster.agent_processes[name]
            cluster.kill(agent)
            if fault.restart_after_s is not None:
                self.after(fault.restart_after_s, functools.partial(cluster.start, agent))

    def _block(self, pairs: set[tuple[str, str]]) -> None:
        with self.lock:
            self.blocked |= pairs

        def block(state: ProxyState, stream: Stream) -> None:
            state.blocked.add(stream)

        self.cluster.update_pairs(pairs, block)

    def _partition(self, fault: PartitionFault) -> None:
        self._block(partition_pairs(self.scenario.topology, fault, self._leader_name))

    def _heal(self) -> None:
        with self.lock:
            pairs = set(self.blocked)
            self.blocked.clear()

        def unblock(state: ProxyState, stream: Stream) -> None:
            state.blocked.discard(stream)

        self.cluster.update_pairs(pairs, unblock)

    def _clog(self, pairs: set[tuple[str, str]]) -> None:
        with self.lock:
            self.clogged |= pairs

        def clog(state: ProxyState, stream: Stream) -> None:
            state.clogged.add(stream)

        self.cluster.update_pairs(pairs, clog)

    def _unclog(self, pairs: set[tuple[str, str]]) -> None:
        with self.lock:
            self.clogged -= pairs

        def unclog(state: ProxyState, stream: Stream) -> None:
            state.clogged.discard(stream)

        self.cluster.update_pairs(pairs, unclog)

    # ------------------------------------------------------------------ run

    def play(self) -> None:
        """Run the timeline and the workload until duration_s (main thread)."""
        self.t0 = time.monotonic()
        for fault in self.scenario.timeline():
            self.after(fault.at_s, functools.partial(self.fire, fault))
        self.start_workload()
        self.start_monitor()
        end = self.scenario.duration_s
        while True:
            due = self._timers[0][0] if self._timers else end
            if self.now() >= end and due >= end:
                break
            wait = min(due, end) - self.now()
            if wait > 0:
                self.stop.wait(min(wait, 0.5))  # pacing the timeline, not synchronising
                continue
            if self._timers and self._timers[0][0] <= self.now():
                _, _, action = heapq.heappop(self._timers)
                action()

    def settle(self, timeout_s: float) -> bool:
        """Faults end: stop the workload, heal, restart what is down, wait until the
        tasks are done and every node has applied the leader's commit (bounded)."""
        self._timers.clear()
        self.stop_workload(CLIENT_GIVE_UP_S + 5)
        cluster = self.cluster
        self.blocked.clear()
        self.clogged.clear()
        cluster.heal_all(latency_too=True)
        for process in cluster.all_processes():
            if process.paused:
                cluster.resume(process)
            if not process.running:
                cluster.start(process)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._converged():
                return True
            time.sleep(0.25)  # polling other processes, bounded by the deadline
        return False

    def _converged(self) -> bool:
        leader = self.poll_leader()
        if leader is None:
            return False
        try:
            status = self._observer.status(leader[0])
        except ClientError:
            return False
        if any(int(status.tasks_by_state.get(state, 0)) for state in UNFINISHED):
            return False
        commit = int(status.commit_index)
        for name in self.cluster.control:
            try:
                seen = self._observer.status(name)
            except ClientError:
                return False
            mine = next((m for m in seen.members if m.id == name), None)
            if mine is None or int(mine.applied_index) < commit:
                return False
        return True

    def close(self) -> None:
        self.stop.set()
        self._observer.close()


def check_stores(
    cluster: ChaosCluster, acknowledged: dict[str, str]
) -> tuple[int, int, dict[str, int]]:
    """(tasks lost, extra results, task counts by state) from every stopped node's store."""
    manifests = replay_cluster(cluster.data_dirs)
    lost: set[str] = set()
    for manifest in manifests.values():
        for key, task_id in acknowledged.items():
            if manifest.task_id_for_key(key) != task_id:
                lost.add(task_id)
    duplicate = 0
    for task_id in acknowledged.values():
        recorded = [
            task.results_recorded
            for manifest in manifests.values()
            if (task := manifest.get_task(task_id)) is not None
        ]
        duplicate += max(0, max(recorded, default=0) - 1)
    reference = max(manifests.values(), key=lambda m: sum(m.counts_by_state().values()))
    counts = {state.value: count for state, count in reference.counts_by_state().items()}
    return len(lost), duplicate, counts


# --------------------------------------------------------------------------- entry


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread, so every `finally`
    below runs (processes stopped by PID, proxies deleted, the server stopped)."""

    interrupted = [False]

    def handler(signum: int, frame: FrameType | None) -> None:
        if interrupted[0]:  # already cleaning up: a second Ctrl-C must not cut that short
            print("still cleaning up (stopping processes, deleting proxies)", file=sys.stderr)
            return
        interrupted[0] = True
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run_chaos(
    scenario: Scenario,
    seed: int,
    work_dir: Path,
    toxiproxy_url: str | None = None,
    toxiproxy_bin: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """One real run; returns the summary (without expectations judged)."""
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    pids: list[int] = []
    pid_file = work_dir / "pids.json"

    def on_spawn(pid: int) -> None:
        pids.append(pid)
        record_pids(pid_file, pids)

    notes: list[str] = []
    started = time.monotonic()
    client_locations = [c.node for c in (scenario.workload.clients if scenario.workload else [])]
    with toxiproxy_server(
        toxiproxy_url, toxiproxy_bin, work_dir / "logs" / "toxiproxy.log", notes, pids
    ) as toxiproxy:
        record_pids(pid_file, pids)
        (work_dir / "toxiproxy_url").write_text(toxiproxy.url + "\n")
        for note in notes:
            log(note)
        cluster = ChaosCluster(scenario, work_dir, toxiproxy, CHAOS_DUTIES, on_spawn)
        run: ChaosRun | None = None
        try:
            cluster.create(client_locations)
            (work_dir / "cluster.json").write_text(json.dumps(cluster.describe(), indent=2))
            for process in cluster.all_processes():
                cluster.start(process)
            _wait_ready(cluster, STARTUP_TIMEOUT_S)
            log(f"cluster up: {len(cluster.control)} nodes, {len(cluster.agents)} agents, "
                f"{len(cluster.proxies)} proxies; playing {scenario.duration_s:g} s")  # fmt: skip
            run = ChaosRun(scenario, seed, cluster)
            run.play()
            settled = run.settle(SETTLE_TIMEOUT_S)
            # As the simulator's sim_seconds: the scenario plus the settling after it.
            played_s = run.now()
            run.stop.set()
        finally:
            if run is not None:
                run.close()
            cluster.stop_all()
            errors = cluster.delete_proxies()
            for error in errors:
                log(f"cleanup: {error}")
        assert run is not None
        lost, duplicate, counts = check_stores(cluster, run.obs.acknowledged)
    obs = run.obs
    terms = {(name, term) for _, name, term in obs.leaders}
    return {
        "scenario": scenario.name,
        "seed": seed,
        "kind": "chaos (real processes behind Toxiproxy)",
        "trace_digest": "",
        "sim_seconds": round(played_s, 3),
        "wall_seconds": round(time.monotonic() - started, 3),
        "failover_s": distribution(obs.failovers_s, digits=3, with_values=True),
        "submit_ms": distribution(obs.submit_ms, digits=2),
        "submit_ms_steady": distribution(obs.submit_ms_steady, digits=2),
        "tasks_submitted": obs.submitted,
        "tasks_acknowledged": len(obs.acknowledged),
        "tasks_succeeded": counts.get(TaskState.SUCCEEDED.value, 0),
        "tasks_dead": counts.get(TaskState.DEAD.value, 0),
        "tasks_lost": lost,
        "duplicate_results": duplicate,
        "leader_changes": max(0, len(terms) - 1),
        "settled": settled,
        "submits_given_up": obs.gave_up,
        "submit_errors": obs.errors,
        "timeline": {
            "leaders": obs.leaders,
            "faults": obs.faults,
            "tasks_by_state": obs.tasks_by_state,
            "submit_ms": [round(x, 2) for x in obs.submit_ms],
        },
        "work_dir": str(work_dir),
    }


def _wait_ready(cluster: ChaosCluster, timeout_s: float) -> None:
    """A leader is elected, every node answers, every agent is registered and alive."""
    deadline = time.monotonic() + timeout_s
    with cluster.observer_client() as client:
        while True:
            problem = _not_ready(cluster, client)
            if problem is None:
                return
            dead = [p.name for p in cluster.all_processes() if not p.running]
            if dead:
                raise ChaosError(f"{', '.join(dead)} exited at start: see {cluster.work_dir}/logs")
            if time.monotonic() > deadline:
                raise ChaosError(f"cluster not ready after {timeout_s:.0f} s: {problem}")
            time.sleep(0.2)  # polling other processes, bounded by the deadline


def _not_ready(cluster: ChaosCluster, client: Client) -> str | None:
    leader = cluster.leader(client)
    if leader is None:
        return "no leader"
    for name in cluster.control:
        if cluster.node_status(name, client) is None:
            return f"node {name} does not answer"
    try:
        status = client.status(leader[0])
    except ClientError as error:
        return f"leader {leader[0]}: {error}"
    alive = {a.id for a in status.agents if a.state == "ALIVE"}
    missing = sorted(set(cluster.agents) - alive)
    return f"agents not registered yet: {', '.join(missing)}" if missing else None


def prediction(scenario: Scenario, seed: int) -> dict[str, Any]:
    """The simulator's summary for the same scenario and seed. A simulator failure must
    not cost the real run: it is reported in the comparison instead."""
    try:
        summary, _ = simulate(scenario, seed)
    except Exception as error:  # a bug in the simulator: say so next to the real figures
        return {
            "scenario": scenario.name,
            "seed": seed,
            "kind": "simulator prediction (FAILED)",
            "error": f"{type(error).__name__}: {error}",
        }
    summary["kind"] = "simulator prediction"
    return summary


KEY_FIGURES = (
    "failover_s", "submit_ms", "submit_ms_steady", "tasks_submitted", "tasks_acknowledged",
    "tasks_succeeded", "tasks_dead", "tasks_lost", "duplicate_results", "leader_changes",
    "settled",
)  # fmt: skip


def _readable(summary: dict[str, Any]) -> str:
    sim = summary.get("simulator", {})

    def row(label: str, key: str, fields: tuple[str, ...] = ()) -> str:
        real, predicted = summary.get(key), sim.get(key)
        if fields:
            real = ", ".join(f"{f} {real.get(f) if real else None}" for f in fields)
            predicted = ", ".join(f"{f} {predicted.get(f) if predicted else None}" for f in fields)
        return f"  {label:<22} {real!s:<40} sim: {predicted}"

    stats = ("count", "p50", "p99", "max")
    lines = [
        f"chaos {summary['scenario']}  seed {summary['seed']}  "
        f"({summary['sim_seconds']} s played and settled, {summary['wall_seconds']} s wall)",
        row("failover s", "failover_s", stats),
        row("submit ms", "submit_ms", stats),
        row("submit ms (steady)", "submit_ms_steady", stats),
        row("submitted", "tasks_submitted"),
        row("acknowledged", "tasks_acknowledged"),
        row("succeeded", "tasks_succeeded"),
        row("lost", "tasks_lost"),
        row("results twice", "duplicate_results"),
        row("leader changes", "leader_changes"),
        row("settled", "settled"),
    ]
    lines += [f"  {e['text']}" for e in summary.get("expectations", [])]
    return "\n".join(lines)


def run_command(
    path: Path,
    seed: int | None,
    out_dir: Path | None,
    as_json: bool,
    toxiproxy_bin: Path | None = None,
    toxiproxy_url: str | None = None,
) -> int:
    try:
        loaded = load_scenario(path)
    except ScenarioError as error:
        print(error, file=sys.stderr)
        return 2
    scenario = loaded.scenario
    for warning in loaded.warnings:
        print(warning, file=sys.stderr)
    chosen = seed if seed is not None else scenario.seed
    target = out_dir or Path("reports") / f"chaos-{scenario.name}-seed{chosen}"

    def say(message: str) -> None:
        print(message, file=sys.stderr if as_json else sys.stdout, flush=True)

    try:
        with _signals_raise():
            predicted = prediction(scenario, chosen)
            summary = run_chaos(
                scenario, chosen, target / "work", toxiproxy_url, toxiproxy_bin, log=say
            )
    except KeyboardInterrupt:
        print("interrupted: every process and proxy this run started is stopped", file=sys.stderr)
        return 130
    except (ToxiproxyUnavailable, ToxiproxyError, ChaosError, ValueError) as error:
        print(f"goml chaos run: {error}", file=sys.stderr)
        return 2
    summary["simulator"] = {k: predicted.get(k) for k in (*KEY_FIGURES, "error") if k in predicted}
    if "error" in predicted:
        say(f"the simulator failed on this scenario and seed: {predicted['error']}")
    passed = judge(scenario, summary)
    report = write_report(summary, target, comparison=predicted)
    if as_json:
        shown = {k: v for k, v in summary.items() if k != "timeline"}
        print(json.dumps(shown, indent=2, sort_keys=True))
    else:
        print(_readable(summary))
        print(f"report: {report}  (summary: {target / 'summary.json'})")
    if not passed:
        print(
            f"FAILED; rerun: goml chaos run {path} --seed {chosen}  "
            f"(logs: {target / 'work' / 'logs'})",
            file=sys.stderr,
        )
    return 0 if passed else 1
