"""A control-plane node in the simulator: the production node core
(`goml.cluster.node_core`) driven by SimPy, with a simulated disk and network.

The node core decides everything (requests, leases, duties, replies); this driver only
moves what the core hands out: Raft messages and replies onto the simulated network,
writes into a `MemoryStorage` that survives crashes, and time, as the production
runtime does (`goml.raft.node.NodeRuntime`). Event-driven: it runs when a message or a
call arrives, an fsync completes, or the core's next deadline comes.

A write that must be durable (`must_sync`) takes the scenario's fsync latency, and
nothing that depends on it happens before it completes; a crash during it loses it.

Disk faults (decided by the scenario player, carried out here): a stalled disk makes
every write wait `stall_ms` longer (the real store commits, and fsyncs, every write); a
full disk refuses the next write, and the node then fails as the production runtime does
(`goml.raft.node`: a failed store stops the loop; the process stays up): it sends
nothing, answers every call UNAVAILABLE saying why, and acknowledges nothing the refused
write carried, until it is restarted; a wipe gives the stopped node an empty store with
a new incarnation (amnesia).
"""

from __future__ import annotations

import functools
import itertools
import random
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from goml.api.task_args import validate_args
from goml.api.types import ApiError, ApiRequest, ApiResponse, ErrorCode
from goml.cluster.manifest import Manifest
from goml.cluster.node_core import NodeCore, NodeReady
from goml.raft.core import RaftCore
from goml.raft.storage import MemoryStorage
from goml.raft.types import Message
from goml.scenario.schema import AnyDistribution
from goml.sim.rpc import ApiCall, ApiReply, Endpoint

if TYPE_CHECKING:
    from goml.sim.simulation import Simulation


@dataclass(frozen=True, slots=True)
class _Forwarded:
    request_id: int
    outcome: ApiResponse | ApiError


@dataclass(frozen=True, slots=True)
class _Gone:
    """A caller's connection closed (its process died): its requests are forgotten,
    every one (`request_id` None) or the one it names (a forward cancelled)."""

    caller: Endpoint
    request_id: int | None = None


class SimNode(Endpoint):
    def __init__(self, sim: Simulation, name: str, start: bool = True) -> None:
        """`start`: False for a spare, which runs nothing until it joins."""
        self.sim = sim
        self.name = name
        self.location = name
        self.storage = MemoryStorage()
        self.generation = 0  # bumped by every start and crash: orphans old timers
        self.alive = False
        self.paused = False
        self.busy = False  # an fsync is under way
        self.stall_ms: float | None = None  # a disk fault: every write waits this much more
        self.disk_full = False  # a disk fault: the next write is refused
        self.failed: str | None = None  # why the node stopped serving (a refused write)
        self.node: NodeCore | None = None
        self.was_leader = False
        self.inbox: deque[Message | ApiCall | _Forwarded | _Gone] = deque()
        self._ids = itertools.count(1)
        self._callers: dict[int, tuple[Endpoint, int]] = {}  # our request id -> (caller, its id)
        self._forwards: dict[int, SimNode] = {}  # our request id -> the leader it went to
        self.reports_recorded: dict[str, int] = {}
        self.tick_at = -1.0
        self._tick_token = 0
        # Membership: the members it was told to join (None: an initial voter), and
        # whether it was removed and stopped for good.
        self.join_peers: tuple[str, ...] | None = None
        self.retired = False
        self._spare = not start
        if start:
            self.start()

    @property
    def in_service(self) -> bool:
        """An initial voter or a spare that joined, not removed and stopped since."""
        return not self.retired and (not self._spare or self.join_peers is not None)

    # --------------------------------------------------------------- views

    @property
    def core(self) -> RaftCore | None:
        """The Raft core (None while crashed), for the checkers and the summary."""
        return self.node.replica.raft if self.node is not None else None

    @property
    def manifest(self) -> Manifest:
        assert self.node is not None, f"{self.name} is down"
        return self.node.manifest

    # ----------------------------------------------------------- lifecycle

    def start(self) -> None:
        assert not self.alive
        assert self.in_service, f"{self.name} is a spare not joined, or was removed"
        self.generation += 1
        self.alive = True
        self.paused = False
        self.busy = False
        self.failed = None
        rng = random.Random(f"{self.sim.seed}:node:{self.name}:{self.generation}")
        now = self.sim.now_ms()
        self.node = NodeCore(
            self.sim.node_config(self.name, self.join_peers),
            self.storage.load(),
            rng,
            validate_args,
            now,
            self.sim.wall_ms(self.name),
        )
        self.was_leader = False
        self.inbox.clear()
        self._callers = {}
        self._forwards = {}
        self.reports_recorded = {}
        self.tick_at = -1.0
        self._tick_token += 1  # orphans the wake-ups of the previous incarnation
        if self.sim.cpu is not None:
            self.sim.cpu.restart(self.name)
        self.sim.record("start", self.name, "")
        self.run()

    def crash(self) -> None:
        if not self.alive:
            return
        self.alive = False
        self.failed = None
        self.generation += 1
        self.node = None
        self.inbox.clear()
        self._callers = {}
        self._forwards = {}
        self.sim.record("crash", self.name, "")

    def wipe(self) -> None:
        """The data directory deleted while the node is down: its next start finds an
        empty store, with a new incarnation (as a new SQLite store has)."""
        assert not self.alive, f"{self.name} is wiped only while it is down"
        self.storage = MemoryStorage(incarnation=self.storage.incarnation + 1)
        self.sim.record("wipe", self.name, str(self.storage.incarnation))

    def _fail(self, why: str) -> None:
        """A write was refused: stop serving, as the production runtime does (every
        caller waiting on this node is told, nothing more is sent or acknowledged)."""
        self.failed = why
        self.inbox.clear()
        callers, self._callers = self._callers, {}
        for caller, caller_id in sorted(callers.values(), key=lambda c: c[1]):
            refused = ApiError(ErrorCode.UNAVAILABLE, f"{self.name} failed: {why}")
            self._send_reply(caller, ApiReply(caller_id, None, refused))
        self.sim.record("fail", self.name, why)

    def pause(self, duration_ms: float) -> None:
        if not self.alive:
            return
        self.paused = True
        generation = self.generation
        self.sim.after(duration_ms, lambda: self._resume(generation))
        self.sim.record("pause", self.name, f"{duration_ms:.0f}")

    def resume(self) -> None:
        if self.alive and self.paused:
            self.paused = False
            self.run()

    def _resume(self, generation: int) -> None:
        if generation == self.generation:
            self.resume()

    # --------------------------------------------------------------- input

    def receive(self, payload: Message | ApiCall) -> None:
        cpu = self.sim.cpu
        if cpu is not None and self.alive and self.failed is None:
            # The CPU model: the process spends the calibrated time on it first.
            delay = cpu.charge(self.name, self.location, self._cost(payload), self.sim.env.now)
            if delay > 0:
                generation = self.generation
                self.sim.after(delay, functools.partial(self._processed, payload, generation))
                return
        self._accept(payload)

    def _cost(self, payload: Message | ApiCall | _Forwarded) -> AnyDistribution | None:
        costs = self.sim.scenario.costs
        assert costs is not None, "charged only with costs"
        if not isinstance(payload, Message):
            return costs.api_call_ms
        if payload.carries_data:
            return costs.append_ms
        return costs.message_ms

    def _processed(self, payload: Message | ApiCall, generation: int) -> None:
        if generation == self.generation:
            self._accept(payload)
        elif isinstance(payload, ApiCall):
            # The process it reached died meanwhile: its connection was reset.
            refused = ApiError(ErrorCode.UNAVAILABLE, f"{self.name}: connection reset")
            self._send_reply(payload.caller, ApiReply(payload.request_id, None, refused))

    def _accept(self, payload: Message | ApiCall) -> None:
        if not self.alive:
            # The host is up but the process is gone: a caller's connection is refused at
            # once (as TCP answers a killed process), so callers move on without waiting.
            if isinstance(payload, ApiCall):
                refused = ApiError(ErrorCode.UNAVAILABLE, f"{self.name}: connection refused")
                self._send_reply(payload.caller, ApiReply(payload.request_id, None, refused))
            return
        if self.failed is not None:
            # The process is up, its node stopped: calls are answered, messages ignored.
            if isinstance(payload, ApiCall):
                refused = ApiError(ErrorCode.UNAVAILABLE, f"{self.name} failed: {self.failed}")
                self._send_reply(payload.caller, ApiReply(payload.request_id, None, refused))
            return
        self.inbox.append(payload)
        self.run()

    def run(self) -> None:
        """Feed queued inputs, tick when due, drain the core; returns during an fsync."""
        if not self.alive or self.paused or self.busy or self.failed is not None:
            return
        node = self.node
        assert node is not None
        now, wall = self.sim.now_ms(), self.sim.wall_ms(self.name)
        while self.inbox:
            payload = self.inbox.popleft()
            if isinstance(payload, Message):
                node.step(payload, now, wall)
            elif isinstance(payload, _Forwarded):
                self._forwards.pop(payload.request_id, None)
                node.forwarded(payload.request_id, payload.outcome, now, wall)
            elif isinstance(payload, _Gone):
                self._forget(node, payload)
            else:
                request_id = next(self._ids)
                self._callers[request_id] = (payload.caller, payload.request_id)
                node.request(request_id, payload.request, now, wall, forwarded=payload.forwarded)
        if node.next_deadline_ms() <= now:
            node.tick(now, wall)
        self._watch_leadership(node)
        while node.has_ready():
            ready = node.ready()
            self._hand_out(ready)
            if ready.send_before_persist:
                # As goml.raft.node does: a leader's appends travel during its write.
                for message in ready.messages:
                    self.sim.send_raft(message)
            if self.disk_full and ready.writes():
                self._fail("disk full: the store's write was refused (no space left)")
                return
            stalled = self.stall_ms is not None and ready.writes()
            if ready.must_sync or stalled:
                # The disk: nothing that depends on this write happens before it is done.
                self.busy = True
                generation = self.generation
                delay = self.sim.fsync_ms(self.name) if ready.must_sync else 0.0
                delay += self.stall_ms if stalled and self.stall_ms is not None else 0.0
                self.sim.after(delay, functools.partial(self._persisted, ready, generation))
                return
            self._finish(node, ready)
        self._schedule_tick(node)

    def _persisted(self, ready: NodeReady, generation: int) -> None:
        if generation != self.generation:
            return  # crashed during the fsync: the write never happened
        self.busy = False
        assert self.node is not None
        self._finish(self.node, ready)
        self.run()

    def _hand_out(self, ready: NodeReady) -> None:
        for reply in ready.replies:
            if not reply.final:
                continue  # watch events: nobody watches in the simulator
            caller, caller_id = self._callers.pop(reply.request_id)
            response: ApiResponse | None = reply.response
            answer = ApiReply(caller_id, response, reply.error, reply.leader_hint)
            self._send_reply(caller, answer)

    def _finish(self, node: NodeCore, ready: NodeReady) -> None:
        if ready.compacted is not None:
            self.storage.compact(ready.compacted)
        self.storage.persist(ready.snapshot, ready.entries, ready.hard_state, ready.must_sync)
        if not ready.send_before_persist:  # else sent already (_drain)
            for message in ready.messages:
                self.sim.send_raft(message)
        node.advance(ready)
        for forward in ready.forwards:  # after advance: their answers are inputs
            self._forward(forward.request_id, forward.request, self.sim.nodes[forward.leader])
        checker = self.sim.checker
        for entry in ready.committed:
            checker.applied_entry(self.name, entry)
        for result in node.last_applied:
            self.sim.on_applied(self, result)
        checker.observe(self.name, node.replica.raft)
        self._watch_leadership(node)

    def caller_gone(self, caller: Endpoint, request_id: int | None = None) -> None:
        """`caller`'s connection to this node closed: as the real service does when a
        call's context ends, the node core forgets its requests (a dead agent's parked
        lease poll no longer counts as its heartbeat) and their forwards are cancelled.
        Cheap: no CPU charged."""
        if self.alive and self.failed is None:
            self.inbox.append(_Gone(caller, request_id))
            self.run()

    def _forget(self, node: NodeCore, gone: _Gone) -> None:
        for ours, (caller, theirs) in list(self._callers.items()):
            if caller is not gone.caller or gone.request_id not in (None, theirs):
                continue
            del self._callers[ours]
            node.forget(ours)
            leader = self._forwards.pop(ours, None)
            if leader is not None:  # the forward's own call is cancelled too
                self.sim.network.send(
                    self.name,
                    self.location,
                    leader.name,
                    leader.location,
                    functools.partial(leader.caller_gone, self, ours),
                    api=True,
                )

    def _forward(self, request_id: int, request: ApiRequest, leader: SimNode) -> None:
        self._forwards[request_id] = leader
        call = ApiCall(request_id, request, self, forwarded=True)
        self.sim.network.send(
            self.name,
            self.location,
            leader.name,
            leader.location,
            lambda: leader.receive(call),
            api=True,
        )

    def on_reply(self, reply: ApiReply) -> None:
        """The leader's answer to a request this node forwarded."""
        if not self.alive or self.node is None or self.failed is not None:
            return
        outcome = reply.error if reply.error is not None else reply.response
        assert outcome is not None
        forwarded = _Forwarded(reply.request_id, outcome)
        cpu = self.sim.cpu
        if cpu is not None:
            delay = cpu.charge(self.name, self.location, self._cost(forwarded), self.sim.env.now)
            if delay > 0:
                generation = self.generation
                self.sim.after(delay, functools.partial(self._answered, forwarded, generation))
                return
        self.inbox.append(forwarded)
        self.run()

    def _answered(self, forwarded: _Forwarded, generation: int) -> None:
        if generation == self.generation and self.failed is None:
            self.inbox.append(forwarded)
            self.run()

    def transfer_leadership(self, target: str) -> None:
        """Hand leadership to `target` (Raft's transfer: TIMEOUT_NOW once it is caught up)."""
        assert self.node is not None and not self.busy
        self.node.replica.raft.transfer_leadership(target, self.sim.now_ms())
        self.sim.record("transfer", self.name, target)
        self.run()

    def _watch_leadership(self, node: NodeCore) -> None:
        leader = node.is_leader
        if leader and not self.was_leader:
            self.sim.on_leader(self.name, node.replica.raft.term)
        self.was_leader = leader

    def _send_reply(self, caller: Endpoint, reply: ApiReply) -> None:
        self.sim.network.send(
            self.name,
            self.location,
            caller.name,
            caller.location,
            lambda: caller.on_reply(reply),
            api=True,
        )

    # ---------------------------------------------------------------- time

    def _schedule_tick(self, node: NodeCore) -> None:
        now = self.sim.env.now
        deadline = float(node.next_deadline_ms())
        if now <= self.tick_at <= deadline:
            return  # an earlier wake-up is pending: it reschedules when it fires
        self.tick_at = max(deadline, now)
        self._tick_token += 1
        token = self._tick_token
        self.sim.after(self.tick_at - now, lambda: self._tick(token))

    def _tick(self, token: int) -> None:
        # Only the latest wake-up counts: one superseded by an earlier one does nothing
        # (stale wake-ups that reset `tick_at` respawned every timer, quadratically).
        if token != self._tick_token or not self.alive:
            return
        self.tick_at = -1.0
        self.run()
