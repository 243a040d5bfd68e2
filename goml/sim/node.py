"""A simulated control-plane node."""

from __future__ import annotations

import functools
import random
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from goml.api.types import (
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
)
from goml.cluster.commands import (
    Command,
    CommandError,
    LeaseTasks,
    RegisterAgent,
    ReportResult,
    SubmitTasks,
    encode_command,
)
from goml.cluster.duties import DEFAULT_DUTIES, LeaderDuties
from goml.cluster.manifest import (
    DEFAULT_LIMITS,
    AgentState,
    ApplyResult,
    Code,
    Manifest,
)
from goml.raft.core import RaftCore
from goml.raft.storage import MemoryStorage
from goml.raft.types import EntryKind, Message, NotLeader, ProposalDropped, Ready, Role

if TYPE_CHECKING:
    from goml.sim.simulation import Simulation

from goml.sim.rpc import ApiCall, ApiReply, Outcome

DUTIES_INTERVAL_MS = 200  # as the real node's duties loop
COMPACT_EVERY_ENTRIES = 4000
_REPORT_MARK = b'"type":"ReportResult"'
_REQUEUE_MARKS = (b'"type":"SubmitTasks"', b'"type":"ExpireLeases"', b'"type":"MarkAgentDown"')


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
