"""The simulation: goml's own Raft core, manifest, leader duties and agent core, driven
by SimPy over a simulated cross-cloud network, with the scenario's faults.

Event-driven: a node runs only when a message arrives, an fsync completes or its core's
next deadline comes; nothing polls, so idle simulated time costs nothing. Time is in
milliseconds (`env.now`). One seed decides everything: each node, link, agent, client
and the workload draw from RNGs derived from it, so the same seed and code give the
same trace (digest printed), whatever PYTHONHASHSEED.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import simpy

from goml.cluster.commands import (
    Resources,
    TaskSpec,
)
from goml.cluster.manifest import (
    ApplyResult,
    TaskState,
)
from goml.raft.checker import SafetyChecker, SafetyViolation
from goml.raft.types import Config, Message, Role
from goml.report.summary import distribution
from goml.scenario.faults import (
    describe_fault,
    pairs_between,
    partition_pairs,
    resolve_members,
    resolve_target,
)
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
from goml.sim.agent import SimAgent
from goml.sim.client import SimClient, _Submit
from goml.sim.network import Network
from goml.sim.node import SimNode

SETTLE_MS_MAX = 120_000
SAMPLE_EVERY_MS = 1000
_REPORT_MARK = b'"type":"ReportResult"'
_REQUEUE_MARKS = (b'"type":"SubmitTasks"', b'"type":"ExpireLeases"', b'"type":"MarkAgentDown"')


@dataclass
class Observations:
    submit_ms: list[float] = field(default_factory=list)
    submit_ms_steady: list[float] = field(default_factory=list)
    failovers_s: list[float] = field(default_factory=list)
    leaders: list[tuple[float, str, int]] = field(default_factory=list)  # (t_s, node, term)
    faults: list[tuple[float, str]] = field(default_factory=list)  # (t_s, description)
    tasks_by_state: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    acknowledged: dict[str, str] = field(default_factory=dict)  # idempotency key -> task id


class Simulation:
    def __init__(self, scenario: Scenario, seed: int) -> None:
        self.scenario = scenario
        self.seed = seed
        self.env = simpy.Environment()
        self.network = Network(self.env, scenario, seed)
        self.checker = SafetyChecker()
        self.trace = hashlib.sha256()
        self.obs = Observations()
        self.submitted = 0
        self.events = 0
        self.failover_started_ms: float | None = None
        self.fault_rng = random.Random(f"{seed}:faults")
        self.workload_rng = random.Random(f"{seed}:workload")
        self._disk_rngs: dict[str, random.Random] = {}
        self._duration_rngs: dict[str, random.Random] = {}
        self.control_names = tuple(n.name for n in scenario.topology.control_nodes)
        self.nodes: dict[str, SimNode] = {}
        for name in self.control_names:
            self.nodes[name] = SimNode(self, name)
        self.agents: dict[str, SimAgent] = {}
        for node in scenario.topology.agent_nodes:
            capacity = Resources(node.capacity.cpu, node.capacity.memory_mb, node.capacity.gpu)
            self.agents[node.name] = SimAgent(self, node.name, capacity)
        self.clients: dict[str, SimClient] = {}
        if scenario.workload is not None:
            for client in scenario.workload.clients:
                self.clients[client.name] = SimClient(self, client.name, client.node)

    # ------------------------------------------------------------- plumbing

    def now_ms(self) -> int:
        return int(self.env.now)

    def after(self, delay_ms: float, action: Callable[[], None]) -> None:
        event = self.env.timeout(max(0.0, delay_ms))
        event.callbacks.append(lambda _event: action())

    def record(self, kind: str, node: str, detail: str) -> None:
        self.events += 1
        self.trace.update(f"{self.env.now:.3f} {kind} {node} {detail}\n".encode())

    def disk_rng(self, node: str) -> random.Random:
        rng = self._disk_rngs.get(node)
        if rng is None:
            rng = self._disk_rngs[node] = random.Random(f"{self.seed}:disk:{node}")
        return rng

    def raft_config(self, name: str) -> Config:
        timing = self.scenario.raft
        return Config(
            node_id=name,
            voters=self.control_names,
            election_timeout_ms_min=timing.election_timeout_ms_min,
            election_timeout_ms_max=timing.election_timeout_ms_max,
            heartbeat_interval_ms=timing.heartbeat_interval_ms,
            inflight_messages_max=64,
            entries_per_message_max=512,
            uncommitted_entries_max=8192,
        )

    def send_raft(self, message: Message) -> None:
        target = self.nodes[message.target]
        self.network.send(
            message.source,
            message.source,
            message.target,
            message.target,
            lambda: target.receive(message),
        )

    def task_duration_ms(self, function: str, agent: str) -> float:
        rng = self._duration_rngs.get(agent)
        if rng is None:
            rng = self._duration_rngs[agent] = random.Random(f"{self.seed}:durations:{agent}")
        workload = self.scenario.workload
        if workload is None:
            return 10.0
        mix = workload.mix.get(function)
        distribution = (
            mix.duration_ms
            if mix is not None and mix.duration_ms is not None
            else workload.duration_ms
        )
        return distribution.sample_ms(rng)

    def leader(self) -> SimNode | None:
        """The live node that leads the highest term, if any."""
        best: SimNode | None = None
        for name in self.control_names:
            node = self.nodes[name]
            core = node.core
            if (
                node.alive
                and core is not None
                and core.role is Role.LEADER
                and (best is None or (best.core is not None and core.term > best.core.term))
            ):
                best = node
        return best

    # -------------------------------------------------------------- observers

    def on_leader(self, name: str, term: int) -> None:
        self.obs.leaders.append((self.env.now / 1000, name, term))
        self.record("leader", name, str(term))

    def on_applied(self, node: SimNode, data: bytes, result: ApplyResult) -> None:
        self.record("apply", node.name, f"{result.index} {result.code}")
        if result.ok and _REPORT_MARK in data:
            for task_id in result.task_ids:
                count = node.reports_recorded.get(task_id, 0) + 1
                node.reports_recorded[task_id] = count
                if count > 1:
                    raise SafetyViolation(
                        f"result recorded twice: task {task_id} on {node.name} at index {result.index}"
                    )
        if result.ok and any(mark in data for mark in _REQUEUE_MARKS):
            node.retry_parked = True

    def on_acknowledged(self, op: _Submit, task_id: str) -> None:
        latency = self.env.now - op.started_ms
        self.obs.submit_ms.append(latency)
        if op.steady:
            self.obs.submit_ms_steady.append(latency)
        self.obs.acknowledged[op.key] = task_id
        self.record("ack", op.key, task_id)
        if self.failover_started_ms is not None and op.started_ms >= self.failover_started_ms:
            self.obs.failovers_s.append((self.env.now - self.failover_started_ms) / 1000)
            self.failover_started_ms = None

    def steady_for(self, location: str) -> bool:
        """True when no failover is under way and a client at `location` can reach a
        quorum of control nodes: the submit promise is judged on such submits; the others
        wait for the failover (judged by its own promise) or for the partition to heal."""
        if self.failover_started_ms is not None:
            return False
        reachable = sum(
            1
            for name in self.control_names
            if (location, name) not in self.network.blocked
            and (name, location) not in self.network.blocked
            and (location, name) not in self.network.clogged
            and (name, location) not in self.network.clogged
        )
        return reachable > len(self.control_names) // 2

    def _leader_lost(self, description: str) -> None:
        if self.failover_started_ms is None:
            self.failover_started_ms = self.env.now
            self.record("failover-start", "", description)

    # ---------------------------------------------------------------- workload

    def _start_workload(self) -> None:
        workload = self.scenario.workload
        if workload is None:
            return
        stop_ms = (
            workload.stop_s if workload.stop_s is not None else self.scenario.duration_s
        ) * 1000
        names = sorted(workload.mix)
        weights = [workload.mix[n].weight for n in names]
        clients = [c.name for c in workload.clients]
        counter = [0]

        def make_spec(function: str | None) -> TaskSpec:
            counter[0] += 1
            chosen = function or self.workload_rng.choices(names, weights)[0]
            mix = workload.mix[chosen]
            return TaskSpec(
                idempotency_key=f"s{self.seed}-{counter[0]}",
                function=chosen,
                args_json=json.dumps(mix.args, sort_keys=True, separators=(",", ":")),
                resources=Resources(mix.resources.cpu, mix.resources.memory_mb, mix.resources.gpu),
                priority=0,
                max_attempts=workload.max_attempts,
                timeout_ms=workload.timeout_ms,
                cloud=None,
                region=None,
            )

        if workload.rate_per_s is not None:
            rate_per_ms = workload.rate_per_s / 1000

            def arrival() -> None:
                if self.env.now >= stop_ms:
                    return
                client = self.clients[self.workload_rng.choice(clients)]
                client.submit(make_spec(None))
                self.after(self.workload_rng.expovariate(rate_per_ms), arrival)

            self.after(
                workload.start_s * 1000 + self.workload_rng.expovariate(rate_per_ms), arrival
            )
        for item in workload.schedule or []:

            def scheduled(
                item_count: int = item.count,
                function: str | None = item.function,
                client_name: str | None = item.client,
            ) -> None:
                for _ in range(item_count):
                    client = self.clients[client_name or self.workload_rng.choice(clients)]
                    client.submit(make_spec(function))

            self.after(item.at_s * 1000, scheduled)

    # ------------------------------------------------------------------ faults

    def _leader_name(self) -> str | None:
        leader = self.leader()
        return leader.name if leader else None

    def _resolve_target(self, target: str, agents: bool = False) -> str | None:
        pool = sorted(self.agents) if agents else list(self.control_names)
        return resolve_target(target, self._leader_name, pool, self.fault_rng)

    def _fire(self, fault: AnyFault) -> None:
        self.obs.faults.append((self.env.now / 1000, describe_fault(fault)))
        self.record("fault", "", describe_fault(fault))
        leader = self.leader()
        if isinstance(fault, CrashFault | RestartFault | PauseFault):
            name = self._resolve_target(fault.target)
            if name is None:
                return
            node = self.nodes.get(name)
            if node is None:  # an agent-only node: its process is the agent
                agent = self.agents[name]
                agent.crash()
                self.after(1000 * (getattr(fault, "restart_after_s", None) or 0.001), agent.start)
                return
            if leader is not None and leader.name == name:
                self._leader_lost(f"{fault.kind} of leader {name}")
            if isinstance(fault, PauseFault):
                node.pause(fault.duration_s * 1000)
            elif isinstance(fault, CrashFault):
                node.crash()
                if fault.restart_after_s is not None:
                    self.after(fault.restart_after_s * 1000, functools.partial(self._restart, name))
            else:
                node.crash()
                self.after(fault.down_s * 1000, functools.partial(self._restart, name))
        elif isinstance(fault, PartitionFault):
            self._partition(fault)
            if leader is not None and not self._reaches_majority(leader.name):
                self._leader_lost(f"partition cuts leader {leader.name} off")
            if fault.heal_after_s is not None:
                self.after(fault.heal_after_s * 1000, self._heal)
        elif isinstance(fault, HealFault):
            self._heal()
        elif isinstance(fault, LinkLatencyFault):
            pairs = self._pairs(fault.between[0], fault.between[1])
            for pair in pairs:
                self.network.overrides[pair] = fault.latency
            if fault.duration_s is not None:

                def restore() -> None:
                    for pair in pairs:
                        self.network.overrides.pop(pair, None)

                self.after(fault.duration_s * 1000, restore)
        elif isinstance(fault, ClogFault):
            pairs = self._pairs(fault.between[0], fault.between[1])
            self.network.clogged |= pairs
            if leader is not None and not self._reaches_majority(leader.name):
                self._leader_lost(f"clog cuts leader {leader.name} off")
            if fault.duration_s is not None:
                self.after(fault.duration_s * 1000, lambda: self.network.unclog(pairs))
        elif isinstance(fault, UnclogFault):
            pairs = (
                self._pairs(fault.between[0], fault.between[1])
                if fault.between is not None
                else set(self.network.clogged)
            )
            self.network.unclog(pairs)
        elif isinstance(fault, AgentCrashFault):
            name = self._resolve_target(fault.target, agents=True)
            if name is None or name not in self.agents:
                return
            agent = self.agents[name]
            agent.crash()
            if fault.restart_after_s is not None:
                self.after(fault.restart_after_s * 1000, agent.start)

    def _restart(self, name: str) -> None:
        node = self.nodes[name]
        if not node.alive:
            node.start()

    def _pairs(self, side_a: list[str], side_b: list[str]) -> set[tuple[str, str]]:
        topology = self.scenario.topology
        return pairs_between(
            resolve_members(topology, side_a, self._leader_name),
            resolve_members(topology, side_b, self._leader_name),
        )

    def _partition(self, fault: PartitionFault) -> None:
        self.network.blocked |= partition_pairs(self.scenario.topology, fault, self._leader_name)

    def _heal(self) -> None:
        self.network.blocked.clear()
        self.record("heal", "", "")

    def _reaches_majority(self, name: str) -> bool:
        reachable = sum(
            1
            for other in self.control_names
            if other == name
            or (
                (name, other) not in self.network.blocked
                and (other, name) not in self.network.blocked
                and (name, other) not in self.network.clogged
                and (other, name) not in self.network.clogged
            )
        )
        return reachable > len(self.control_names) // 2

    # --------------------------------------------------------------------- run

    def _sample(self) -> None:
        reference = self.leader() or next((n for n in self.nodes.values() if n.alive), None)
        if reference is not None:
            counts = {
                state.value: count for state, count in reference.manifest.counts_by_state().items()
            }
            self.obs.tasks_by_state.append((self.env.now / 1000, counts))
        self.after(SAMPLE_EVERY_MS, self._sample)

    def run(self) -> dict[str, object]:
        started = time.perf_counter()
        duration_ms = self.scenario.duration_s * 1000
        for fault in self.scenario.timeline():
            self.after(fault.at_s * 1000, functools.partial(self._fire, fault))
        self._start_workload()
        self._sample()
        try:
            self.env.run(until=duration_ms)
            self._settle()
        except SafetyViolation as violation:
            raise SafetyViolation(
                f"seed {self.seed}, t={self.env.now / 1000:.3f} s: {violation}\n"
                f"replay: goml sim run SCENARIO --seed {self.seed}"
            ) from violation
        return self._summary(time.perf_counter() - started)

    def _settle(self) -> None:
        """Faults end: heal, unclog, restart what is down; run until the cluster agrees
        and the work is done (or SETTLE_MS_MAX), then check the promises."""
        self.network.blocked.clear()
        self.network.overrides.clear()
        self.network.unclog(set(self.network.clogged))
        for name in self.control_names:
            node = self.nodes[name]
            if not node.alive:
                node.start()
            node.paused = False
            node.run()
        for agent in self.agents.values():
            if not agent.alive:
                agent.start()
        self.settle_started_s = self.env.now / 1000
        deadline = self.env.now + SETTLE_MS_MAX
        while self.env.now < deadline and not self._converged():
            self.env.run(until=self.env.now + 250)
        self.settled = self._converged()
        cores = {name: node.core for name, node in self.nodes.items() if node.core is not None}
        SafetyChecker.check_log_matching(cores)

    def _converged(self) -> bool:
        leader = self.leader()
        if leader is None or leader.core is None:
            return False
        core = leader.core
        if core.log.term_at(core.commit) != core.term:
            return False
        for node in self.nodes.values():
            if node.core is None or node.core.applied != core.log.last_index:
                return False
        unfinished = sum(
            count
            for state, count in leader.manifest.counts_by_state().items()
            if state in (TaskState.PENDING, TaskState.LEASED, TaskState.RUNNING)
        )
        in_flight = any(c.in_flight for c in self.clients.values())
        return unfinished == 0 and not in_flight

    def _summary(self, wall_s: float) -> dict[str, object]:
        leader = self.leader()
        lost: set[str] = set()
        for node in self.nodes.values():
            for key, task_id in self.obs.acknowledged.items():
                if node.manifest.task_id_for_key(key) != task_id:
                    lost.add(task_id)
        duplicate = sum(
            max(0, max((n.reports_recorded.get(t, 0) for n in self.nodes.values()), default=0) - 1)
            for t in self.obs.acknowledged.values()
        )
        counts = leader.manifest.counts_by_state() if leader else {}
        terms = {(name, term) for _, name, term in self.obs.leaders}
        return {
            "scenario": self.scenario.name,
            "seed": self.seed,
            "trace_digest": self.trace.hexdigest(),
            "sim_seconds": round(self.env.now / 1000, 3),
            "wall_seconds": round(wall_s, 3),
            "speedup": round(self.env.now / 1000 / wall_s, 1) if wall_s > 0 else None,
            "events": self.events,
            "failover_s": distribution(self.obs.failovers_s, digits=3, with_values=True),
            "submit_ms": distribution(self.obs.submit_ms, digits=2),
            "submit_ms_steady": distribution(self.obs.submit_ms_steady, digits=2),
            "tasks_submitted": self.submitted,
            "tasks_acknowledged": len(self.obs.acknowledged),
            "tasks_succeeded": counts.get(TaskState.SUCCEEDED, 0),
            "tasks_dead": counts.get(TaskState.DEAD, 0),
            "tasks_lost": len(lost),
            "duplicate_results": duplicate,
            "leader_changes": max(0, len(terms) - 1),
            "settled": self.settled,
            "messages_sent": self.network.sent,
            "messages_dropped": self.network.dropped,
            "timeline": {
                "leaders": self.obs.leaders,
                "faults": self.obs.faults,
                "tasks_by_state": self.obs.tasks_by_state,
                "submit_ms": [round(x, 2) for x in self.obs.submit_ms],
            },
        }


def run_scenario(scenario: Scenario, seed: int) -> dict[str, object]:
    return Simulation(scenario, seed).run()
