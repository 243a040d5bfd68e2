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
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import simpy

from goml.agent.core import AgentCore, Call, CancelTask, Log, RunTask
from goml.agent.messages import (
    ErrorKind,
    HeartbeatRequest,
    HeartbeatResponse,
    LeasedTask,
    LeaseRequest,
    LeaseResponse,
    RegisterRequest,
    RegisterResponse,
    ReportRequest,
    ReportResponse,
    Response,
)
from goml.agent.runtime import AgentConfig, CapacityConfig
from goml.cluster.commands import (
    Command,
    CommandError,
    LeaseTasks,
    RegisterAgent,
    ReportResult,
    Resources,
    SubmitTasks,
    TaskSpec,
    encode_command,
)
from goml.cluster.duties import DEFAULT_DUTIES, LeaderDuties
from goml.cluster.manifest import (
    DEFAULT_LIMITS,
    AgentState,
    ApplyResult,
    Code,
    Manifest,
    TaskState,
)
from goml.raft.checker import SafetyChecker, SafetyViolation
from goml.raft.core import RaftCore
from goml.raft.storage import MemoryStorage
from goml.raft.types import Config, EntryKind, Message, NotLeader, ProposalDropped, Ready, Role
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
from goml.sim.network import Network

CLIENT_CALL_TIMEOUT_MS = 1000  # the real client's per-call deadline in chaos runs too
CLIENT_GIVE_UP_MS = 30_000
DUTIES_INTERVAL_MS = 200  # as the real node's duties loop
COMPACT_EVERY_ENTRIES = 4000
SETTLE_MS_MAX = 120_000
SAMPLE_EVERY_MS = 1000
_REPORT_MARK = b'"type":"ReportResult"'
_REQUEUE_MARKS = (b'"type":"SubmitTasks"', b'"type":"ExpireLeases"', b'"type":"MarkAgentDown"')


@dataclass(frozen=True, slots=True)
class ApiCall:
    request_id: int
    method: str  # Submit | Register | Heartbeat | Lease | Report
    request: object
    caller: Endpoint


@dataclass(frozen=True, slots=True)
class ApiReply:
    request_id: int
    response: object | None  # None: failed
    error: ErrorKind | None = None
    leader_hint: str = ""
    detail: str = ""


class Endpoint:
    name: str
    location: str  # the topology node it runs on

    def on_reply(self, reply: ApiReply) -> None:
        raise NotImplementedError


Outcome = Callable[[ApplyResult | None, ErrorKind | None, str], None]


class SimNode:
    """A control-plane node: Raft core + manifest + leader duties, crash-prone."""

    def __init__(self, sim: Simulation, name: str) -> None:
        self.sim = sim
        self.name = name
        self.location = name
        self.storage = MemoryStorage()
        self.generation = 0
        self.alive = False
        self.paused = False
        self.busy = False
        self.core: RaftCore | None = None
        self.manifest = Manifest(DEFAULT_LIMITS)
        self.duties = LeaderDuties(DEFAULT_DUTIES)
        self.was_leader = False
        self.inbox: deque[object] = deque()
        self.pending: dict[int, tuple[int, Outcome]] = {}
        self.parked: list[tuple[ApiCall, float]] = []
        self.retry_parked = False
        self.reports_recorded: dict[str, int] = {}
        self.tick_at = -1.0
        self.applied_since_compact = 0
        self.start()

    # ------------------------------------------------------------- lifecycle

    def start(self) -> None:
        assert not self.alive
        self.generation += 1
        self.alive = True
        self.paused = False
        self.busy = False
        persisted = self.storage.load()
        rng = random.Random(f"{self.sim.seed}:node:{self.name}:{self.generation}")
        self.core = RaftCore(self.sim.raft_config(self.name), persisted, rng, self.sim.now_ms())
        self.manifest = (
            Manifest.restore(persisted.snapshot.data)
            if persisted.snapshot
            else Manifest(DEFAULT_LIMITS)
        )
        self.reports_recorded = {}
        self.duties = LeaderDuties(DEFAULT_DUTIES)
        self.was_leader = False
        self.inbox.clear()
        self.pending = {}
        self.parked = []
        self.tick_at = -1.0
        self.sim.record("start", self.name, "")
        self._schedule_duties()
        self.run()

    def crash(self) -> None:
        if not self.alive:
            return
        self.alive = False
        self.generation += 1  # orphans every timer and fsync of the old incarnation
        self.core = None
        self.inbox.clear()
        self.pending = {}
        self.parked = []
        self.sim.record("crash", self.name, "")

    def pause(self, duration_ms: float) -> None:
        if not self.alive:
            return
        self.paused = True
        generation = self.generation
        self.sim.after(duration_ms, lambda: self._resume(generation))
        self.sim.record("pause", self.name, f"{duration_ms:.0f}")

    def _resume(self, generation: int) -> None:
        if generation == self.generation and self.alive:
            self.paused = False
            self.run()

    # ------------------------------------------------------------------ input

    def receive(self, payload: object) -> None:
        if not self.alive:
            # The host is up but the process is gone: a caller's connection is refused at
            # once (as TCP answers a killed process), so clients move on without waiting.
            if isinstance(payload, ApiCall):
                self._reply(payload, None, ErrorKind.UNAVAILABLE, "connection refused")
            return
        self.inbox.append(payload)
        self.run()

    def run(self) -> None:
        """Feed queued inputs, tick, and drain the core; returns while an fsync runs."""
        if not self.alive or self.paused or self.busy:
            return
        core = self.core
        assert core is not None
        now = self.sim.now_ms()
        while self.inbox:
            payload = self.inbox.popleft()
            if isinstance(payload, Message):
                core.step(payload, now)
            else:
                assert isinstance(payload, ApiCall)
                self._handle(payload)
        core.tick(now)
        self._watch_leadership()
        if self.retry_parked and self.parked and core.role is Role.LEADER:
            self.retry_parked = False
            self._wake_parked()
        while core.has_ready():
            ready = core.ready()
            if ready.must_sync:
                # The disk: nothing that depends on this write happens before it is done.
                self.busy = True
                generation = self.generation
                delay = self.sim.scenario.disk.fsync_ms.sample_ms(self.sim.disk_rng(self.name))
                self.sim.after(delay, functools.partial(self._persisted, ready, generation))
                return
            self._finish(ready)
        self._schedule_tick()

    def _persisted(self, ready: Ready, generation: int) -> None:
        if generation != self.generation:
            return  # crashed during the fsync: the write never happened
        self.busy = False
        self._finish(ready)
        self.run()

    def _finish(self, ready: Ready) -> None:
        core = self.core
        assert core is not None
        self.storage.persist(ready.snapshot, ready.entries, ready.hard_state, ready.must_sync)
        for message in ready.messages:
            self.sim.send_raft(message)
        if ready.snapshot is not None:
            self.manifest = Manifest.restore(ready.snapshot.data)
            for index in [i for i in self.pending if i <= ready.snapshot.index]:
                _, outcome = self.pending.pop(index)
                outcome(None, ErrorKind.UNAVAILABLE, "outcome unknown: log replaced by a snapshot")
        for entry in ready.committed:
            self.sim.checker.applied_entry(self.name, entry.index, entry.term, entry.data)
            result: ApplyResult | None = None
            if entry.kind is EntryKind.NORMAL:
                result = self.manifest.apply(entry.index, entry.data)
                self.sim.on_applied(self, entry.data, result)
            waiter = self.pending.pop(entry.index, None)
            if waiter is not None:
                term, outcome = waiter
                if term == entry.term and result is not None:
                    outcome(result, None, "")
                else:
                    outcome(None, ErrorKind.UNAVAILABLE, "proposal lost to a new leader")
        core.advance(ready)
        self.sim.checker.observe(self.name, core)
        self.applied_since_compact += len(ready.committed)
        if (
            self.applied_since_compact >= COMPACT_EVERY_ENTRIES
            and core.applied > core.log.snapshot_index
        ):
            self.applied_since_compact = 0
            snapshot = core.compact(core.applied, self.manifest.snapshot())
            self.storage.compact(snapshot)

    def _schedule_tick(self) -> None:
        core = self.core
        assert core is not None
        deadline = float(core.next_deadline_ms())
        if self.tick_at >= self.sim.env.now and self.tick_at <= deadline:
            return  # an earlier wake-up is already scheduled
        self.tick_at = max(deadline, self.sim.env.now)
        generation = self.generation
        self.sim.after(self.tick_at - self.sim.env.now, lambda: self._tick(generation))

    def _tick(self, generation: int) -> None:
        if generation == self.generation:
            self.tick_at = -1.0
            self.run()

    def _schedule_duties(self) -> None:
        generation = self.generation
        self.sim.after(DUTIES_INTERVAL_MS, lambda: self._duties(generation))

    def _duties(self, generation: int) -> None:
        if generation != self.generation:
            return
        self._schedule_duties()
        if self.paused or self.busy or self.core is None or self.core.role is not Role.LEADER:
            return
        for command in self.duties.due(self.manifest, self.sim.now_ms()):
            self._propose(command, lambda result, error, detail: None)
        self.run()

    def _watch_leadership(self) -> None:
        core = self.core
        assert core is not None
        leader = core.role is Role.LEADER
        if leader and not self.was_leader:
            self.duties.became_leader(self.sim.now_ms())
            self.sim.on_leader(self.name, core.term)
        elif not leader and self.was_leader:
            self.duties.lost_leadership()
            parked, self.parked = self.parked, []
            for call, _ in parked:
                self._refuse(call)
        self.was_leader = leader

    # ------------------------------------------------------------------- API

    def _propose(self, command: Command, outcome: Outcome) -> None:
        core = self.core
        assert core is not None
        try:
            data = encode_command(command)
            index, term = core.propose(data)
        except CommandError as error:
            outcome(None, ErrorKind.INVALID, str(error))
            return
        except NotLeader as error:
            outcome(None, ErrorKind.NOT_LEADER, str(error))
            return
        except ProposalDropped as error:
            outcome(None, ErrorKind.UNAVAILABLE, str(error))
            return
        self.pending[index] = (term, outcome)

    def _reply(
        self,
        call: ApiCall,
        response: object | None,
        error: ErrorKind | None = None,
        detail: str = "",
    ) -> None:
        hint = self.core.leader if self.core is not None and error is ErrorKind.NOT_LEADER else ""
        reply = ApiReply(call.request_id, response, error, hint, detail)
        caller = call.caller
        self.sim.network.send(
            self.name, self.location, caller.name, caller.location, lambda: caller.on_reply(reply)
        )

    def _refuse(self, call: ApiCall) -> None:
        self._reply(call, None, ErrorKind.NOT_LEADER, "not the leader")

    def _answer_with(self, call: ApiCall, make: Callable[[ApplyResult], object]) -> Outcome:
        def outcome(result: ApplyResult | None, error: ErrorKind | None, detail: str) -> None:
            if result is None:
                self._reply(call, None, error, detail)
            elif not result.ok and result.code is not Code.STALE_EPOCH and call.method != "Report":
                self._reply(call, None, ErrorKind.INVALID, result.message)
            else:
                self._reply(call, make(result))

        return outcome

    def _handle(self, call: ApiCall) -> None:
        core = self.core
        assert core is not None
        if core.role is not Role.LEADER:
            self._refuse(call)
            return
        now = self.sim.now_ms()
        request = call.request
        if isinstance(request, SubmitTasks):
            command = SubmitTasks(now, request.tasks)
            self._propose(command, self._answer_with(call, lambda r: r.task_ids))
        elif isinstance(request, RegisterRequest):
            command_r = RegisterAgent(
                now, request.agent_id, request.cloud, request.region, request.arch, request.capacity
            )
            self.duties.heartbeat(request.agent_id, None, (), now)
            self._propose(
                command_r,
                self._answer_with(call, lambda r: RegisterResponse(heartbeat_interval_ms=0)),
            )
        elif isinstance(request, HeartbeatRequest):
            agent = self.manifest.get_agent(request.agent_id)
            known = agent is not None and agent.state is AgentState.ALIVE
            if known:
                self.duties.heartbeat(
                    request.agent_id, request.free, tuple(sorted(request.running_task_ids)), now
                )
            self._reply(call, HeartbeatResponse(known=known))
        elif isinstance(request, LeaseRequest):
            self._lease(call, self.sim.env.now + request.wait_ms)
        elif isinstance(request, ReportRequest):
            command_p = ReportResult(
                now,
                request.agent_id,
                request.task_id,
                request.epoch,
                request.success,
                request.result_json if request.success else None,
                None if request.success else request.error,
            )
            self._propose(
                command_p,
                self._answer_with(call, lambda r: ReportResponse(recorded=r.ok, reason=r.message)),
            )
        else:
            raise AssertionError(f"unknown request {request!r}")

    def _wake_parked(self) -> None:
        """New work: wake parked long polls in arrival order, no more of them than there
        are tasks that could fit (the rest keep waiting instead of each logging an entry
        that leases nothing)."""
        parked, self.parked = self.parked, []
        woken = 0
        for call, deadline in parked:
            request = call.request
            assert isinstance(request, LeaseRequest)
            if woken < self.manifest.leasable(request.agent_id, request.free):
                woken += 1
                self._lease(call, deadline, parked_already=True)
            else:
                self.parked.append((call, deadline))

    def _lease(self, call: ApiCall, deadline: float, parked_already: bool = False) -> None:
        request = call.request
        assert isinstance(request, LeaseRequest)
        if (
            not self.manifest.leasable(request.agent_id, request.free)
            and deadline > self.sim.env.now
        ):
            self._park(call, deadline, parked_already)
            return
        command = LeaseTasks(
            self.sim.now_ms(),
            request.agent_id,
            DEFAULT_DUTIES.lease_ms,
            max(1, min(request.max_tasks, DEFAULT_LIMITS.lease_tasks_max)),
            request.free,
        )

        def outcome(result: ApplyResult | None, error: ErrorKind | None, detail: str) -> None:
            if result is None or not result.ok:
                self._reply(
                    call,
                    None,
                    error or ErrorKind.INVALID,
                    detail or (result.message if result else ""),
                )
                return
            if result.tasks or deadline <= self.sim.env.now:
                tasks = tuple(
                    LeasedTask(
                        t.id,
                        t.function,
                        t.args_json,
                        t.resources,
                        t.epoch,
                        t.timeout_ms,
                        t.lease.deadline_ms if t.lease else 0,
                    )
                    for t in result.tasks
                )
                self._reply(call, LeaseResponse(tasks))
                return
            self._park(call, deadline, parked_already)

        self._propose(command, outcome)

    def _park(self, call: ApiCall, deadline: float, parked_already: bool) -> None:
        """Long poll: hold the call until new work is applied or the wait ends."""
        self.parked.append((call, deadline))
        if not parked_already:
            generation = self.generation
            self.sim.after(deadline - self.sim.env.now, lambda: self._unpark(call, generation))

    def _unpark(self, call: ApiCall, generation: int) -> None:
        if generation != self.generation:
            return
        for position, (parked, _) in enumerate(self.parked):
            if parked is call:
                del self.parked[position]
                self._reply(call, LeaseResponse(()))
                return


class SimAgent(Endpoint):
    """The production agent core, with tasks that take a modeled time."""

    def __init__(self, sim: Simulation, node: str, capacity: Resources) -> None:
        self.sim = sim
        self.name = f"agent@{node}"
        self.location = node
        self.capacity = capacity
        self.generation = 0
        self.alive = False
        self.core: AgentCore | None = None
        self.tick_at = -1.0
        self.cancelled: set[tuple[str, int]] = set()
        self.start()

    def start(self) -> None:
        self.generation += 1
        self.alive = True
        node = self.sim.scenario.topology.node(self.location)
        config = AgentConfig(
            agent_id=self.name,
            cloud=node.cloud,
            region=node.region,
            capacity=CapacityConfig(
                cpu=self.capacity.cpu, memory_mb=self.capacity.memory_mb, gpu=self.capacity.gpu
            ),
            control_plane={name: name for name in self.sim.control_names},
            token_file=Path("unused-in-simulation"),
            insecure=True,
        )
        rng = random.Random(f"{self.sim.seed}:agent:{self.name}:{self.generation}")
        self.core = AgentCore(config.core_config("sim", self.capacity.gpu), rng)
        self.cancelled = set()
        self.tick_at = -1.0
        self.core.start(self.sim.now_ms())
        self.sim.record("agent-start", self.name, "")
        self._effects()

    def crash(self) -> None:
        if not self.alive:
            return
        self.alive = False
        self.generation += 1
        self.core = None
        self.sim.record("agent-crash", self.name, "")

    def on_reply(self, reply: ApiReply) -> None:
        if not self.alive or self.core is None:
            return
        now = self.sim.now_ms()
        if reply.response is not None:
            assert isinstance(
                reply.response,
                RegisterResponse | HeartbeatResponse | LeaseResponse | ReportResponse,
            )
            response: Response = reply.response
            self.core.on_response(reply.request_id, response, now)
        else:
            assert reply.error is not None
            self.core.on_call_failed(
                reply.request_id, reply.error, reply.leader_hint, reply.detail, now
            )
        self._effects()

    def _effects(self) -> None:
        core = self.core
        assert core is not None
        for effect in core.take_effects():
            if isinstance(effect, Call):
                self._call(effect)
            elif isinstance(effect, RunTask):
                self._run(effect.task)
            elif isinstance(effect, CancelTask):
                self.cancelled.add((effect.task_id, effect.epoch))
            else:
                assert isinstance(effect, Log)
        deadline = core.next_deadline_ms()
        if deadline is None:
            return
        if self.tick_at >= self.sim.env.now and self.tick_at <= deadline:
            return
        self.tick_at = max(float(deadline), self.sim.env.now)
        generation = self.generation
        self.sim.after(self.tick_at - self.sim.env.now, lambda: self._tick(generation))

    def _tick(self, generation: int) -> None:
        if generation != self.generation or self.core is None:
            return
        self.tick_at = -1.0
        self.core.tick(self.sim.now_ms())
        self._effects()

    def _call(self, call: Call) -> None:
        method = call.method.value
        api_call = ApiCall(call.request_id, method, call.request, self)
        target = self.sim.nodes[call.node_id]
        self.sim.network.send(
            self.name, self.location, target.name, target.location, lambda: target.receive(api_call)
        )

    def _run(self, task: LeasedTask) -> None:
        duration = self.sim.task_duration_ms(task.function, self.name)
        generation = self.generation

        def finish() -> None:
            if generation != self.generation or self.core is None:
                return
            if (task.task_id, task.epoch) in self.cancelled:
                return
            self.core.on_task_finished(
                task.task_id, task.epoch, True, '{"simulated":true}', self.sim.now_ms()
            )
            self._effects()

        self.sim.after(duration, finish)


@dataclass
class _Submit:
    key: str
    spec: TaskSpec
    started_ms: float
    steady: bool  # started outside a failover window, able to reach a quorum
    attempt_started_ms: float = 0.0
    request_id: int = 0
    node: str = ""  # where the current attempt went
    done: bool = False
    backoff_ms: float = 20.0


class SimClient(Endpoint):
    """The client library's behaviour: leader guess, NOT_LEADER hints, rotation on
    timeouts, retries with the same idempotency key."""

    def __init__(self, sim: Simulation, name: str, node: str) -> None:
        self.sim = sim
        self.name = name
        self.location = node
        self.rng = random.Random(f"{sim.seed}:client:{name}")
        self.leader_guess = sim.control_names[0]
        self.in_flight: dict[int, _Submit] = {}
        self.counter = 0

    def submit(self, spec: TaskSpec) -> None:
        op = _Submit(
            spec.idempotency_key, spec, self.sim.env.now, self.sim.steady_for(self.location)
        )
        self.sim.submitted += 1
        self._attempt(op)

    def _attempt(self, op: _Submit) -> None:
        if self.sim.env.now - op.started_ms > CLIENT_GIVE_UP_MS:
            op.done = True
            self.sim.record("give-up", self.name, op.key)
            return
        self.counter += 1
        op.request_id = self.counter
        op.attempt_started_ms = self.sim.env.now
        op.node = self.leader_guess
        self.in_flight[op.request_id] = op
        call = ApiCall(op.request_id, "Submit", SubmitTasks(0, (op.spec,)), self)
        target = self.sim.nodes[self.leader_guess]
        self.sim.network.send(
            self.name, self.location, target.name, target.location, lambda: target.receive(call)
        )
        request_id = op.request_id
        self.sim.after(CLIENT_CALL_TIMEOUT_MS, lambda: self._timeout(request_id))

    def _timeout(self, request_id: int) -> None:
        op = self.in_flight.pop(request_id, None)
        if op is None or op.done:
            return
        self._rotate(op.node)
        self._attempt(op)

    def on_reply(self, reply: ApiReply) -> None:
        op = self.in_flight.pop(reply.request_id, None)
        if op is None or op.done:
            return
        if reply.response is not None:
            op.done = True
            task_ids = reply.response
            assert isinstance(task_ids, tuple)
            self.sim.on_acknowledged(op, task_ids[0])
            return
        if reply.error is ErrorKind.INVALID:
            op.done = True
            self.sim.record("refused", self.name, reply.detail[:80])
            return
        if (
            reply.error is ErrorKind.NOT_LEADER
            and reply.leader_hint
            and reply.leader_hint != self.leader_guess
        ):
            self.leader_guess = reply.leader_hint
            self._attempt(op)
            return
        self._rotate(op.node)
        delay = op.backoff_ms * (1 + self.rng.random())
        op.backoff_ms = min(op.backoff_ms * 2, 500.0)
        self.sim.after(delay, lambda: self._attempt(op))

    def _rotate(self, failed: str) -> None:
        # Only if no other call has moved the guess on already: with many submits in
        # flight, each timing-out call would otherwise rotate the guess off the leader.
        if self.leader_guess == failed:
            names = self.sim.control_names
            self.leader_guess = names[(names.index(failed) + 1) % len(names)]


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
