"""The simulation: goml's own Raft core, manifest, leader duties and agent core, driven
by SimPy over a simulated cross-cloud network. It is the simulator backend of the
scenario player (`goml.scenario.player`), which decides when the faults fire, offers the
workload and measures; this module carries that out on simulated processes and links,
settles the cluster and checks the promises.

Event-driven: a node runs only when a message arrives, an fsync completes or its core's
next deadline comes; nothing polls, so idle simulated time costs nothing. Time is in
milliseconds (`env.now`; the player's clock is `now_s`). One seed decides everything:
each node, link, agent, client and the player draw from RNGs derived from it, so the
same seed and code give the same trace (digest printed), whatever PYTHONHASHSEED.

Membership faults: a spare control node exists from the start but runs nothing until the
player joins it (a node whose config says join, the current members as its peers); the
changes go through the leader's node core as `goml node replace` sends them
(`goml.sim.operator`); a removed node is stopped and stays down, also while settling.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Mapping

import simpy

from goml.api.types import TaskRequest
from goml.cluster.commands import Resources
from goml.cluster.duties import DEFAULT_DUTIES
from goml.cluster.manifest import ApplyResult, Code, TaskState
from goml.cluster.membership_plan import Step
from goml.cluster.node_core import (
    AGENT_LEASE_DEPTH_NEW_CLUSTER,
    REQUEST_TIMEOUT_MS_DEFAULT,
    NodeCoreConfig,
    standard_config,
    tuned_raft,
)
from goml.raft.checker import SafetyChecker, SafetyViolation
from goml.raft.replica import raft_config
from goml.raft.types import Message, Role
from goml.scenario.faults import Pair
from goml.scenario.player import (
    ChangeDone,
    FinalState,
    ScenarioPlayer,
    StepStarted,
    SubmitDone,
    SubmitOutcome,
    client_domains,
    client_retry_config,
    count_commands,
    count_retried,
)
from goml.scenario.schema import CLOCK_OFFSET_MS_MAX, AnyLink, ClockFault, Scenario
from goml.sim.agent import SimAgent
from goml.sim.client import SimClient
from goml.sim.cpu import Cpu
from goml.sim.network import Network
from goml.sim.node import SimNode
from goml.sim.operator import SimOperator

SETTLE_MS_MAX = 120_000
# Wall clocks start here when a scenario has clock faults, so that a clock set back by up
# to the largest offset still reads a positive time (without them they start at 0, as
# they always did: the traces of those scenarios do not change).
WALL_EPOCH_MS = CLOCK_OFFSET_MS_MAX
# The scenario's clock starts once the cluster is ready (a leader, every agent
# registered), as the chaos runner starts it after its cluster is up.
READY_MS_MAX = 60_000
SETTLE_STEP_MS = 250
_REPORTS = frozenset({"ReportResult", "ReportResults"})
# Simulated nodes compact more often than production's, so that snapshots travel.
COMPACT_EVERY_ENTRIES = 4000


class Simulation:
    """The simulated cluster, and the player's backend (`goml.scenario.player.Backend`)."""

    def __init__(self, scenario: Scenario, seed: int, first_leader: str | None = None) -> None:
        """`first_leader`: the control node that leads when the scenario's clock starts
        (leadership is handed to it once the cluster is ready), to compare with a real
        run that elected it: who wins the first election is a coin toss in both worlds,
        and where the leader sits decides every submit's latency."""
        self.scenario = scenario
        self.seed = seed
        assert first_leader is None or first_leader in (
            n.name for n in scenario.topology.control_nodes
        ), f"first_leader {first_leader!r} is not a control node"
        self.first_leader = first_leader
        self.env = simpy.Environment()
        self.network = Network(self.env, scenario, seed)
        costs = scenario.costs
        # The CPU model (goml.sim.cpu) only when something costs processing time.
        self.cpu = Cpu(scenario, seed) if costs is not None and costs.charges_cpu else None
        self.checker = SafetyChecker()
        self.trace = hashlib.sha256()
        self.events = 0
        self.settled = False
        self._t0_ms = 0.0  # env.now when the scenario's clock started
        self._playing = False
        self._disk_rngs: dict[str, random.Random] = {}
        self._duration_rngs: dict[str, random.Random] = {}
        self._clock_offsets_ms: dict[str, int] = {}  # clock faults, set by the player
        has_clock_faults = any(isinstance(f, ClockFault) for f in scenario.faults)
        self._wall_epoch_ms = WALL_EPOCH_MS if has_clock_faults else 0
        self.control_names = tuple(n.name for n in scenario.topology.control_nodes)
        # The initial configuration (without spares: every control node, as ever).
        self.voter_names = tuple(n.name for n in scenario.topology.voter_nodes)
        # Before any node starts: a node that wins an election reports it to the player.
        self.player = ScenarioPlayer(scenario, seed, self)
        self.nodes: dict[str, SimNode] = {}
        for name in self.control_names:
            self.nodes[name] = SimNode(self, name, start=name in self.voter_names)
        self.operator = SimOperator(self, self.voter_names[0])
        self.agents: dict[str, SimAgent] = {}
        for node in scenario.topology.agent_nodes:
            capacity = Resources(node.capacity.cpu, node.capacity.memory_mb, node.capacity.gpu)
            self.agents[node.name] = SimAgent(self, node.name, capacity)
        self.clients: dict[str, SimClient] = {}
        if scenario.workload is not None:
            for client in scenario.workload.clients:
                domains, home = client_domains(scenario, client.node)
                retry = client_retry_config(self.control_names, domains, home)
                self.clients[client.name] = SimClient(self, client.name, client.node, retry)

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

    def node_config(self, name: str, join_peers: tuple[str, ...] | None = None) -> NodeCoreConfig:
        """A node's core configuration: the scenario's Raft timing, the production node's
        standards (duties, limits, request timeout), node names as addresses. A node that
        joins (`join_peers`) has no voters of its own and names the members it joins, as
        `goml node add` writes its config."""
        timing = self.scenario.raft
        peers = self.voter_names if join_peers is None else (*join_peers, name)
        raft = tuned_raft(
            raft_config(
                name,
                self.voter_names if join_peers is None else (),
                timing.election_timeout_ms_min,
                timing.election_timeout_ms_max,
                timing.heartbeat_interval_ms,
            ),
            timing,
        )
        addresses = tuple((n, n) for n in peers)
        return standard_config(
            raft,
            addresses,
            DEFAULT_DUTIES,
            REQUEST_TIMEOUT_MS_DEFAULT,
            COMPACT_EVERY_ENTRIES,
            AGENT_LEASE_DEPTH_NEW_CLUSTER,
        )

    def wall_ms(self, node: str) -> int:
        """A node's wall clock: simulated time, plus the offset a clock fault gave it."""
        return self._wall_epoch_ms + int(self.env.now) + self._clock_offsets_ms.get(node, 0)

    def fsync_ms(self, node: str) -> float:
        return self.scenario.fsync_ms.sample_ms(self.disk_rng(node))

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

    def leading_node(self) -> SimNode | None:
        """The live node that leads the highest term, if any."""
        best: SimNode | None = None
        for name in self.control_names:
            node = self.nodes[name]
            core = node.core
            if (
                node.alive
                and node.failed is None  # a node that stopped serving leads nothing
                and core is not None
                and core.role is Role.LEADER
                and (best is None or (best.core is not None and core.term > best.core.term))
            ):
                best = node
        return best

    # -------------------------------------------------------------- observers

    def on_leader(self, name: str, term: int) -> None:
        self.record("leader", name, str(term))
        if self._playing:
            self.player.leader_seen(name, term)

    def on_applied(self, node: SimNode, result: ApplyResult) -> None:
        self.record("apply", node.name, f"{result.index} {result.code}")
        if not result.ok or result.command not in _REPORTS:
            return
        recorded = (
            [i.task_id for i in result.items if i.code is Code.OK]
            if result.items
            else list(result.task_ids)
        )
        for task_id in recorded:
            task = node.manifest.get_task(task_id)
            if task is None or task.state is not TaskState.SUCCEEDED:
                continue  # a failed attempt: requeued or dead, nothing recorded
            count = node.reports_recorded.get(task_id, 0) + 1
            node.reports_recorded[task_id] = count
            if count > 1:
                raise SafetyViolation(
                    f"result recorded twice: task {task_id} on {node.name} at index {result.index}"
                )

    # ------------------------------------------------ the player's backend

    def now_s(self) -> float:
        return (self.env.now - self._t0_ms) / 1000

    def schedule(self, delay_s: float, action: Callable[[], None]) -> None:
        self.after(delay_s * 1000, action)

    def crash_node(self, name: str) -> None:
        self.nodes[name].crash()

    def start_node(self, name: str) -> None:
        node = self.nodes[name]
        if not node.alive and node.in_service:  # a spare starts when it joins
            node.start()

    def pause_node(self, name: str, duration_s: float) -> None:
        self.nodes[name].pause(duration_s * 1000)

    def disk_stall(self, name: str, stall_ms: float | None) -> None:
        self.nodes[name].stall_ms = stall_ms
        self.record("disk-stall", name, "none" if stall_ms is None else f"{stall_ms:g}")

    def disk_full(self, name: str, full: bool) -> None:
        self.nodes[name].disk_full = full
        self.record("disk-full", name, str(full))

    def wipe_node(self, name: str) -> None:
        self.nodes[name].wipe()

    def set_clock(self, name: str, offset_ms: int) -> None:
        self._clock_offsets_ms[name] = offset_ms
        self.record("clock", name, str(offset_ms))

    def crash_agent(self, name: str) -> None:
        self.agents[name].crash()

    def start_agent(self, name: str) -> None:
        agent = self.agents[name]
        if not agent.alive:
            agent.start()

    def pause_agent(self, name: str, duration_s: float) -> None:
        # A simulated agent cannot be frozen: it is down for the pause and comes back
        # with nothing in memory (a real SIGSTOP keeps its memory; its leases expire
        # alike, as no heartbeat leaves either way).
        self.crash_agent(name)
        self.schedule(duration_s, lambda: self.start_agent(name))

    def set_links(
        self,
        blocked: frozenset[Pair],
        clogged: frozenset[Pair],
        latency: Mapping[Pair, AnyLink],
    ) -> None:
        self.network.blocked = set(blocked)
        self.network.overrides = dict(latency)
        released = self.network.clogged - clogged
        self.network.clogged = set(clogged) | released
        if released:
            self.network.unclog(released)
        assert self.network.clogged == clogged

    def leader(self) -> tuple[str, int] | None:
        node = self.leading_node()
        if node is None or node.core is None:
            return None
        return node.name, node.core.term

    def join_node(self, name: str, peers: tuple[str, ...]) -> None:
        node = self.nodes[name]
        assert node.join_peers is None and not node.retired, f"{name} joins once"
        node.join_peers = peers
        self.record("join", name, ",".join(peers))
        if not node.alive:
            node.start()

    def member_address(self, name: str) -> str:
        return name  # simulated nodes are reached by name

    def change_membership(
        self, steps: tuple[Step, ...], started: StepStarted, done: ChangeDone
    ) -> None:
        self.operator.run(steps, started, done)

    def stop_node(self, name: str) -> None:
        node = self.nodes[name]
        node.retired = True
        node.crash()
        self.record("stop", name, "removed")

    def submit(self, client: str, request: TaskRequest, done: SubmitDone) -> None:
        started_s = self.now_s()

        def ended(task_id: str | None, detail: str) -> None:
            done(SubmitOutcome(started_s, self.now_s(), task_id, detail))

        self.clients[client].submit(request, ended)

    def task_counts(self) -> dict[str, int] | None:
        reference = self.leading_node() or next((n for n in self.nodes.values() if n.alive), None)
        if reference is None:
            return None
        return reference.manifest.status_counts()  # as `status` shows them in the real world

    def note(self, kind: str, subject: str, detail: str) -> None:
        self.record(kind, subject, detail)

    # --------------------------------------------------------------------- run

    def run(self) -> dict[str, object]:
        started = time.perf_counter()
        try:
            self._wait_ready()
            self._t0_ms = self.env.now
            self._playing = True
            leader = self.leader()
            if leader is not None:
                self.player.leader_seen(*leader)
            self.player.start()
            self.env.run(until=self._t0_ms + self.scenario.duration_s * 1000)
            self._settle()
        except SafetyViolation as violation:
            raise SafetyViolation(
                f"seed {self.seed}, t={self.env.now / 1000:.3f} s: {violation}\n"
                f"replay: goml sim run SCENARIO --seed {self.seed}"
            ) from violation
        return self._summary(time.perf_counter() - started)

    def _wait_ready(self) -> None:
        """Run until a leader leads and has registered every agent (bounded)."""
        deadline = self.env.now + READY_MS_MAX
        while self.env.now < deadline and not self._ready():
            self.env.run(until=self.env.now + SETTLE_STEP_MS / 5)
        if self.first_leader is not None:
            self._hand_leadership(self.first_leader, deadline)
        self.record("ready", "", f"{self.env.now:.3f}")

    def _hand_leadership(self, name: str, deadline: float) -> None:
        """Transfer leadership to `name` until it leads a ready cluster (bounded)."""
        while self.env.now < deadline:
            leader = self.leading_node()
            if leader is not None and leader.name == name and self._ready():
                return
            if leader is not None and leader.name != name and not leader.busy:
                leader.transfer_leadership(name)
            self.env.run(until=self.env.now + SETTLE_STEP_MS)

    def _ready(self) -> bool:
        leader = self.leading_node()
        if leader is None or leader.node is None:
            return False
        agents = {a.id for a in leader.manifest.list_agents() if a.state.value == "ALIVE"}
        return all(agent.name in agents for agent in self.agents.values())

    def _settle(self) -> None:
        """Faults end: links restored, what is down restarted (a pause ends on its own);
        run until the cluster agrees and the work is done (or SETTLE_MS_MAX), then check
        the logs."""
        self.player.end_faults()
        for name in self.control_names:
            if not self.nodes[name].in_service:
                continue  # a spare never joined, or a node removed and stopped
            self.start_node(name)
            self.nodes[name].run()
        for name in self.agents:
            self.start_agent(name)
        deadline = self.env.now + SETTLE_MS_MAX
        while self.env.now < deadline and not self._converged():
            self.env.run(until=self.env.now + SETTLE_STEP_MS)
        self.settled = self._converged()
        cores = {name: node.core for name, node in self.nodes.items() if node.core is not None}
        SafetyChecker.check_log_matching(cores)

    def _converged(self) -> bool:
        leader = self.leading_node()
        if leader is None or leader.core is None:
            return False
        core = leader.core
        if core.log.term_at(core.commit) != core.term:
            return False
        for node in self._replicas():
            if node.core is None or node.core.applied != core.log.last_index:
                return False
        unfinished = sum(
            count
            for state, count in leader.manifest.counts_by_state().items()
            if state in (TaskState.PENDING, TaskState.LEASED, TaskState.RUNNING)
        )
        return unfinished == 0 and self.player.in_flight == 0 and self.player.changes_in_flight == 0

    def _replicas(self) -> list[SimNode]:
        """The nodes whose stores count: every control node but spares never joined and
        nodes removed and stopped (without membership faults: all of them)."""
        return [node for node in self.nodes.values() if node.in_service]

    def _summary(self, wall_s: float) -> dict[str, object]:
        acknowledged = self.player.obs.acknowledged
        lost: set[str] = set()
        replicas = self._replicas()
        for node in replicas:
            for key, task_id in acknowledged.items():
                if node.manifest.task_id_for_key(key) != task_id:
                    lost.add(task_id)
        # Removed nodes too: a result a node recorded twice before it left is a duplicate.
        duplicate = sum(
            max(0, max((n.reports_recorded.get(t, 0) for n in self.nodes.values()), default=0) - 1)
            for t in acknowledged.values()
        )
        leader = self.leading_node()
        counts = leader.manifest.counts_by_state() if leader else {}
        # Every committed entry, as the checker saw it applied (NOOP entries carry no data).
        applied = self.checker.applied
        commands = count_commands(applied[index][1] for index in sorted(self.checker.commands))
        final = FinalState(
            settled=self.settled,
            tasks_by_state={state.value: count for state, count in counts.items()},
            tasks_lost=len(lost),
            duplicate_results=duplicate,
            commands=commands,
            tasks_retried=count_retried(leader.manifest, acknowledged.values()) if leader else 0,
        )
        return {
            **self.player.summary(final),
            "trace_digest": self.trace.hexdigest(),
            "sim_seconds": round(self.now_s(), 3),
            "wall_seconds": round(wall_s, 3),
            "speedup": round(self.env.now / 1000 / wall_s, 1) if wall_s > 0 else None,
            "ready_s": round(self._t0_ms / 1000, 3),
            "events": self.events,
            "messages_sent": self.network.sent,
            "messages_dropped": self.network.dropped,
            # Only with a CPU model, so that summaries without costs stay as they were.
            **({"cpu_busy_s": round(self.cpu.busy_ms / 1000, 3)} if self.cpu else {}),
        }


def run_scenario(
    scenario: Scenario, seed: int, first_leader: str | None = None
) -> dict[str, object]:
    return Simulation(scenario, seed, first_leader).run()
