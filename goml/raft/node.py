"""`RaftNode`: the asyncio runtime that runs a `RaftCore` as a real process.

One loop task owns the core. It sleeps until there is input (a peer message, a
proposal, a read or transfer request) or until the core's `next_deadline_ms()`, with
no fixed polling; then it feeds every queued input, ticks, and drains `ready()`
exactly as the harness does (STYLE.md "Order of effects"):

    persist (fsync, in a worker thread) -> send -> apply -> advance

While the store's fsync runs in its thread, new proposals and messages queue up and
join the next batch: that is the batching. Nothing else touches the core.

Every queue is bounded (full -> the input is refused or dropped and counted) and every
await has a deadline.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from goml.raft.convert import Limits
from goml.raft.core import RaftCore
from goml.raft.storage import Storage
from goml.raft.transport import PeerTransport, RaftPeerServicer
from goml.raft.types import (
    Config,
    Entry,
    EntryKind,
    HardState,
    Message,
    MessageType,
    NodeId,
    NotLeader,
    ProposalDropped,
    Ready,
    Role,
    Snapshot,
)

log = logging.getLogger(__name__)


class StateMachine(Protocol):
    def apply(self, index: int, data: bytes) -> object: ...

    def snapshot(self) -> bytes: ...

    def restore(self, data: bytes) -> None: ...


class ProposalLost(Exception):
    """An entry of another term was committed at the proposal's index: it will never apply."""


class ProposalOutcomeUnknown(Exception):
    """A snapshot from the leader replaced the log around the proposal: it may or may not
    have been applied. Retry with the same idempotency key."""


class NodeStopped(Exception):
    """The node stopped (or failed) before the request completed."""


@dataclass(frozen=True, slots=True)
class NodeConfig:
    core: Config
    compact_every_entries: int  # take a snapshot after this many applied entries
    inbound_messages_max: int  # queued peer messages; beyond: dropped and counted
    proposals_max: int  # queued proposals; beyond: ProposalDropped
    requests_max: int  # queued reads / transfers; beyond: ProposalDropped
    inputs_per_iteration_max: int  # inputs fed to the core per loop iteration
    proposal_size_bytes_max: int
    snapshot_size_bytes_max: int
    persist_timeout_s: float  # an fsync slower than this is fatal: the node stops
    stop_timeout_s: float
    # Write a hard state that only moves the commit index with the next write instead of
    # fsyncing it alone (see RaftNode._persist).
    defer_commit_only_writes: bool

    def __post_init__(self) -> None:
        assert self.compact_every_entries >= 1
        assert self.inbound_messages_max >= 1
        assert self.proposals_max >= 1
        assert self.requests_max >= 1
        assert self.inputs_per_iteration_max >= 1
        assert self.proposal_size_bytes_max >= 1
        assert self.persist_timeout_s > 0
        assert self.stop_timeout_s > 0


def default_core_config(node_id: NodeId, voters: tuple[NodeId, ...]) -> Config:
    return Config(
        node_id=node_id,
        voters=voters,
        election_timeout_ms_min=300,
        election_timeout_ms_max=600,
        heartbeat_interval_ms=50,
        inflight_messages_max=64,
        entries_per_message_max=512,
        uncommitted_entries_max=8192,
    )


def default_node_config(core: Config) -> NodeConfig:
    return NodeConfig(
        core=core,
        compact_every_entries=10_000,
        inbound_messages_max=16_384,
        proposals_max=8192,
        requests_max=1024,
        inputs_per_iteration_max=4096,
        proposal_size_bytes_max=1024 * 1024,
        snapshot_size_bytes_max=48 * 1024 * 1024,
        persist_timeout_s=10.0,
        stop_timeout_s=5.0,
        defer_commit_only_writes=True,
    )


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


@dataclass(slots=True)
class _Proposal:
    data: bytes
    future: asyncio.Future[object]


@dataclass(slots=True)
class _Request:
    kind: str  # "read" | "transfer"
    future: asyncio.Future[int]
    context: bytes = b""
    target: NodeId = ""


@dataclass(slots=True)
class _Watcher:
    predicate: Callable[[], bool]
    future: asyncio.Future[None]


@dataclass(slots=True)
class NodeStats:
    inbound_dropped: int = 0
    inbound_refused: int = 0
    proposals: int = 0
    proposals_dropped: int = 0
    persist_calls: int = 0
    persist_ms_total: float = 0.0
    loop_iterations: int = 0
    compactions: int = 0


# Heartbeat round-trip measurement (per peer): at most this many heartbeats in flight are
# remembered, none older than this, and the moving average weighs a new sample this much.
RTT_INFLIGHT_MAX = 64
RTT_STALE_S = 10.0
RTT_EWMA_WEIGHT = 0.2


@dataclass(slots=True)
class PeerRtt:
    """Heartbeat round trips to one peer, measured by the leader's loop.

    Each peer has ONE ordered stream each way, so the k-th HEARTBEAT_RESPONSE from a peer
    answers the k-th HEARTBEAT sent to it: the send times wait in a FIFO. A heartbeat the
    transport refused (queue full) clears the FIFO and the responses still due for the
    earlier ones are skipped, so a loss never pairs a response with the wrong send."""

    sent: collections.deque[float]
    skip: int = 0
    disconnect_drops: int = 0  # the transport's count when last looked at
    latest_ms: float | None = None
    average_ms: float | None = None
    samples: int = 0


class RaftNode:
    def __init__(
        self,
        config: NodeConfig,
        storage: Storage,
        state_machine: StateMachine,
        transport: PeerTransport,
        rng: random.Random,
        clock_ms: Callable[[], int] = monotonic_ms,
    ) -> None:
        assert transport.config.node_id == config.core.node_id
        self.config = config
        self.id = config.core.node_id
        self._storage = storage
        self._sm = state_machine
        self._transport = transport
        self._rng = rng
        self._clock_ms = clock_ms
        self._core: RaftCore | None = None
        self._inbound: asyncio.Queue[Message] = asyncio.Queue(maxsize=config.inbound_messages_max)
        self._proposals: asyncio.Queue[_Proposal] = asyncio.Queue(maxsize=config.proposals_max)
        self._requests: asyncio.Queue[_Request] = asyncio.Queue(maxsize=config.requests_max)
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._failure: BaseException | None = None
        # index -> (term, future): resolved when an entry at that index is applied.
        self._waiters: dict[int, tuple[int, asyncio.Future[object]]] = {}
        self._read_waiters: dict[bytes, asyncio.Future[int]] = {}
        self._applied_waiters: list[tuple[int, asyncio.Future[int]]] = []
        self._watchers: list[_Watcher] = []
        self._read_counter = itertools.count(1)
        self._last_now_ms = 0
        self._deferred_hard_state: HardState | None = None
        self._rtt: dict[NodeId, PeerRtt] = {}
        self.stats = NodeStats()
        self.limits = Limits(
            entries_per_message_max=config.core.entries_per_message_max,
            entry_size_bytes_max=config.proposal_size_bytes_max,
            snapshot_size_bytes_max=config.snapshot_size_bytes_max,
            context_size_bytes_max=256,
        )

    # ------------------------------------------------------------- lifecycle

    def servicer(self) -> RaftPeerServicer:
        """The inbound gRPC servicer for this node: add it to a `grpc.aio.Server`."""
        t = self._transport.config
        return RaftPeerServicer(
            node_id=self.id,
            cluster_id=t.cluster_id,
            secret=t.secret,
            voters=self.config.core.voters,
            limits=self.limits,
            on_messages=self.receive,
        )

    async def start(self) -> None:
        assert self._core is None, "started twice"
        async with asyncio.timeout(self.config.persist_timeout_s):
            persisted = await asyncio.to_thread(self._storage.load)
        if persisted.snapshot is not None:
            self._sm.restore(persisted.snapshot.data)
        self._core = RaftCore(self.config.core, persisted, self._rng, self._now_ms())
        log.info(
            "raft node %s starting: term %d, commit %d, log %d..%d",
            self.id,
            self._core.term,
            self._core.commit,
            self._core.log.first_index,
            self._core.log.last_index,
        )
        self._transport.start()
        self._task = asyncio.create_task(self._run(), name=f"raft-node-{self.id}")

    async def stop(self) -> None:
        """Stop the loop and the transport, fail pending requests, close the store."""
        if self._stopping:
            return
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            try:
                async with asyncio.timeout(self.config.stop_timeout_s):
                    await asyncio.shield(self._task)
            except TimeoutError:
                log.error("raft node %s: loop did not stop in time; cancelling", self.id)
                self._task.cancel()
            except Exception:
                pass  # already logged by the loop
        await self._transport.stop(self.config.stop_timeout_s)
        self._fail_all(NodeStopped(f"raft node {self.id} stopped"))
        if self._deferred_hard_state is not None and self._failure is None:
            try:
                await self._write(None, (), self._deferred_hard_state, True)
            except Exception as error:  # stopping anyway; the stored commit is just older
                log.error("raft node %s: final commit write failed: %r", self.id, error)
            self._deferred_hard_state = None
        self._storage.close()

    # ---------------------------------------------------------------- inputs

    def receive(self, messages: list[Message]) -> None:
        """Inbound peer messages (called by the servicer); never blocks."""
        if self._stopping or self._core is None:
            self.stats.inbound_refused += len(messages)
            return
        for message in messages:
            if message.type is MessageType.HEARTBEAT_RESPONSE:
                self._heartbeat_answered(message.source)
            try:
                self._inbound.put_nowait(message)
            except asyncio.QueueFull:
                self.stats.inbound_dropped += 1
        self._wakeup.set()

    async def propose(self, data: bytes, timeout_s: float) -> object:
        """Replicate `data`; returns the state machine's result for it once applied.

        Raises NotLeader (with the leader hint), ProposalDropped (busy), TimeoutError,
        ProposalLost (another term's entry took its index), ProposalOutcomeUnknown,
        NodeStopped."""
        assert timeout_s > 0
        self._check_running()
        if len(data) > self.config.proposal_size_bytes_max:
            raise ValueError(
                f"proposal of {len(data)} bytes (max {self.config.proposal_size_bytes_max})"
            )
        core = self._core
        assert core is not None
        if core.role is not Role.LEADER:
            raise NotLeader(core.leader)  # fast path; the loop checks again
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        try:
            self._proposals.put_nowait(_Proposal(data, future))
        except asyncio.QueueFull:
            self.stats.proposals_dropped += 1
            raise ProposalDropped(f"{self.config.proposals_max} proposals queued") from None
        self._wakeup.set()
        async with asyncio.timeout(timeout_s):
            return await future

    async def read_index(self, timeout_s: float) -> int:
        """A linearizable read point: returns once the state machine has applied it."""
        assert timeout_s > 0
        self._check_running()
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout_s):
            future: asyncio.Future[int] = loop.create_future()
            context = f"{self.id}/{next(self._read_counter)}".encode()
            self._submit(_Request("read", future, context=context))
            index = await future
            core = self._core
            assert core is not None
            if core.applied < index:
                applied: asyncio.Future[int] = loop.create_future()
                self._applied_waiters.append((index, applied))
                await applied
            return index

    async def transfer_leadership(self, target: NodeId, timeout_s: float) -> None:
        """Hand leadership to `target` and wait until it leads (TimeoutError if not)."""
        assert timeout_s > 0
        self._check_running()
        async with asyncio.timeout(timeout_s):
            future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._submit(_Request("transfer", future, target=target))
            await future
            await self.wait_for(lambda: self.leader == target, timeout_s)

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> None:
        """Wait until `predicate()` holds; checked after every loop iteration."""
        assert timeout_s > 0
        if predicate():
            return
        self._check_running()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        watcher = _Watcher(predicate, future)
        self._watchers.append(watcher)
        try:
            async with asyncio.timeout(timeout_s):
                await future
        finally:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

    async def campaign(self, timeout_s: float) -> None:
        """Start an election now (tests and demos; production waits for the timer)."""
        assert timeout_s > 0
        self._check_running()
        async with asyncio.timeout(timeout_s):
            future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._submit(_Request("campaign", future))
            await future

    # --------------------------------------------------------------- queries

    @property
    def role(self) -> Role:
        return self._core.role if self._core is not None else Role.FOLLOWER

    @property
    def leader(self) -> NodeId:
        return self._core.leader if self._core is not None else ""

    @property
    def term(self) -> int:
        return self._core.term if self._core is not None else 0

    @property
    def applied(self) -> int:
        return self._core.applied if self._core is not None else 0

    @property
    def commit(self) -> int:
        return self._core.commit if self._core is not None else 0

    def match_index(self, peer: NodeId) -> int:
        """The leader's view of how far `peer`'s log matches its own (0 if not leader)."""
        core = self._core
        if core is None or core.role is not Role.LEADER or peer not in core.progress:
            return 0
        return core.progress[peer].match

    @property
    def is_leader(self) -> bool:
        return self.role is Role.LEADER

    @property
    def running(self) -> bool:
        return self._core is not None and not self._stopping and self._failure is None

    def status(self) -> dict[str, object]:
        status: dict[str, object] = (
            dict(self._core.status()) if self._core is not None else {"id": self.id}
        )
        status["running"] = self.running
        status["failure"] = repr(self._failure) if self._failure else ""
        status["inbound_queued"] = self._inbound.qsize()
        status["proposals_queued"] = self._proposals.qsize()
        status["stats"] = {
            "inbound_dropped": self.stats.inbound_dropped,
            "proposals": self.stats.proposals,
            "proposals_dropped": self.stats.proposals_dropped,
            "persist_calls": self.stats.persist_calls,
            "persist_ms_total": round(self.stats.persist_ms_total, 3),
            "loop_iterations": self.stats.loop_iterations,
            "compactions": self.stats.compactions,
        }
        status["peers"] = {
            peer: {
                "rtt_ms": self._rtt_ms(peer),
                "rtt_ms_avg": self._rtt_ms(peer, average=True),
                "rtt_samples": self._rtt[peer].samples if peer in self._rtt else 0,
                "connected": s.connected,
                "sent": s.sent,
                "dropped_queue_full": s.dropped_queue_full,
                "dropped_disconnected": s.dropped_disconnected,
                "unauthenticated": s.unauthenticated,
                "last_error": s.last_error,
            }
            for peer, s in self._transport.stats().items()
        }
        return status

    # ------------------------------------------------------------ heartbeat rtt

    def _heartbeat_sent(self, peer: NodeId, queued: bool) -> None:
        rtt = self._rtt.get(peer)
        if rtt is None:
            rtt = self._rtt[peer] = PeerRtt(collections.deque(maxlen=RTT_INFLIGHT_MAX))
        if not queued:
            rtt.skip += len(rtt.sent)
            rtt.sent.clear()
            return
        stats = self._transport.stats().get(peer)
        if stats is not None and stats.dropped_disconnected != rtt.disconnect_drops:
            # The stream broke and queued messages were thrown away: whatever is still
            # due will never be answered in order. Start over.
            rtt.disconnect_drops = stats.dropped_disconnected
            rtt.sent.clear()
            rtt.skip = 0
        now = time.monotonic()
        while rtt.sent and now - rtt.sent[0] > RTT_STALE_S:  # never answered: lost
            rtt.sent.popleft()
            rtt.skip = 0
        if len(rtt.sent) == rtt.sent.maxlen:
            rtt.skip += 1  # the oldest falls out; its response must not pair with another
        rtt.sent.append(now)

    def _heartbeat_answered(self, peer: NodeId) -> None:
        rtt = self._rtt.get(peer)
        if rtt is None or not rtt.sent:
            return
        if rtt.skip > 0:
            rtt.skip -= 1
            return
        sample_ms = (time.monotonic() - rtt.sent.popleft()) * 1000
        rtt.latest_ms = sample_ms
        rtt.average_ms = (
            sample_ms
            if rtt.average_ms is None
            else rtt.average_ms + RTT_EWMA_WEIGHT * (sample_ms - rtt.average_ms)
        )
        rtt.samples += 1

    def _rtt_ms(self, peer: NodeId, average: bool = False) -> float | None:
        """The latest (or moving-average) heartbeat round trip to `peer`, in ms; None
        before the first sample (only a leader sends heartbeats)."""
        rtt = self._rtt.get(peer)
        if rtt is None:
            return None
        value = rtt.average_ms if average else rtt.latest_ms
        return round(value, 3) if value is not None else None

    # -------------------------------------------------------------- the loop

    def _now_ms(self) -> int:
        # The core asserts time never goes back; a monotonic clock guarantees it, and
        # this guards an injected clock too.
        self._last_now_ms = max(self._last_now_ms, self._clock_ms())
        return self._last_now_ms

    def _check_running(self) -> None:
        if self._failure is not None:
            raise NodeStopped(f"raft node {self.id} failed: {self._failure!r}")
        if self._core is None or self._stopping:
            raise NodeStopped(f"raft node {self.id} is not running")

    def _submit(self, request: _Request) -> None:
        try:
            self._requests.put_nowait(request)
        except asyncio.QueueFull:
            raise ProposalDropped(f"{self.config.requests_max} requests queued") from None
        self._wakeup.set()

    def _has_input(self) -> bool:
        return not (self._inbound.empty() and self._proposals.empty() and self._requests.empty())

    async def _run(self) -> None:
        core = self._core
        assert core is not None
        try:
            await self._drain(core)
            while not self._stopping:
                if not self._has_input():
                    wait_s = max(0, core.next_deadline_ms() - self._now_ms()) / 1000
                    try:
                        async with asyncio.timeout(wait_s):
                            await self._wakeup.wait()
                    except TimeoutError:
                        pass
                self._wakeup.clear()
                if self._stopping:
                    break
                self.stats.loop_iterations += 1
                self._feed(core)
                core.tick(self._now_ms())
                await self._drain(core)
                await self._maybe_compact(core)
                self._check_watchers()
        except Exception as error:
            # A failed store or a broken invariant: this node must not go on. Fail
            # every caller; the process supervisor restarts from the store.
            self._failure = error
            log.critical("raft node %s failed: %r", self.id, error, exc_info=True)
            self._fail_all(NodeStopped(f"raft node {self.id} failed: {error!r}"))
            raise

    def _feed(self, core: RaftCore) -> None:
        budget = self.config.inputs_per_iteration_max
        now_ms = self._now_ms()
        while budget > 0 and not self._inbound.empty():
            budget -= 1
            message = self._inbound.get_nowait()
            if self._is_impossible(core, message):
                continue
            core.step(message, now_ms)
        while budget > 0 and not self._requests.empty():
            budget -= 1
            self._handle_request(core, self._requests.get_nowait(), now_ms)
        while budget > 0 and not self._proposals.empty():
            budget -= 1
            proposal = self._proposals.get_nowait()
            if proposal.future.done():
                continue  # its caller gave up before it was proposed: do not propose it
            try:
                index, term = core.propose(proposal.data)
            except (NotLeader, ProposalDropped) as error:
                proposal.future.set_exception(error)
                continue
            self.stats.proposals += 1
            previous = self._waiters.get(index)
            if previous is not None and not previous[1].done():
                # A lower-term entry at this index was truncated: that proposal is lost.
                previous[1].set_exception(ProposalLost(f"index {index} reused in term {term}"))
            self._waiters[index] = (term, proposal.future)

    def _is_impossible(self, core: RaftCore, message: Message) -> bool:
        """Peer input the core would assert on (a peer bug): drop it with a log line."""
        if (
            message.type is MessageType.APPEND_RESPONSE
            and core.role is Role.LEADER
            and message.term == core.term
            and not message.reject
            and message.index > core.log.last_index
        ):
            log.error(
                "raft node %s: dropped APPEND_RESPONSE from %s acknowledging index %d beyond"
                " our last index %d",
                self.id,
                message.source,
                message.index,
                core.log.last_index,
            )
            return True
        return False

    def _handle_request(self, core: RaftCore, request: _Request, now_ms: int) -> None:
        if request.future.done():
            return
        try:
            if request.kind == "read":
                core.read_index(request.context)
                self._read_waiters[request.context] = request.future
            elif request.kind == "transfer":
                core.transfer_leadership(request.target, now_ms)
                request.future.set_result(0)
            elif request.kind == "campaign":
                core.campaign(now_ms)
                request.future.set_result(0)
            else:
                raise AssertionError(f"unknown request {request.kind!r}")
        except (NotLeader, ProposalDropped, ValueError) as error:
            request.future.set_exception(error)

    async def _drain(self, core: RaftCore) -> None:
        for _ in range(1000):  # bounded: a core that never runs dry is a bug
            if not core.has_ready():
                return
            ready = core.ready()
            await self._persist(ready)
            for message in ready.messages:
                sent = self._transport.send(message)
                if message.type is MessageType.HEARTBEAT:
                    self._heartbeat_sent(message.target, sent)
            self._apply(ready)
            core.advance(ready)
        raise AssertionError(f"raft node {self.id}: ready() never ran dry")

    async def _persist(self, ready: Ready) -> None:
        hard_state = ready.hard_state
        if (
            self.config.defer_commit_only_writes
            and hard_state is not None
            and not ready.must_sync
            and ready.snapshot is None
            and not ready.entries
        ):
            # Only the commit index moved (term and vote did not: must_sync is False).
            # It need not be durable (a lower stored commit is safe: entries are applied
            # again after a restart and the leader re-commits), so instead of an fsync of
            # its own it rides along with the next write (or `stop`). SqliteStorage
            # fsyncs every commit whatever `sync` says, so this saves a whole fsync on
            # the critical path of every proposal.
            assert self._deferred_hard_state is None or (
                self._deferred_hard_state.commit <= hard_state.commit
            )
            self._deferred_hard_state = hard_state
            return
        if hard_state is None and self._deferred_hard_state is not None:
            hard_state = self._deferred_hard_state
        self._deferred_hard_state = None
        if ready.snapshot is None and not ready.entries and hard_state is None:
            return
        await self._write(ready.snapshot, ready.entries, hard_state, ready.must_sync)

    async def _write(
        self,
        snapshot: Snapshot | None,
        entries: tuple[Entry, ...],
        hard_state: HardState | None,
        sync: bool,
    ) -> None:
        started = time.perf_counter()
        async with asyncio.timeout(self.config.persist_timeout_s):
            await asyncio.to_thread(self._storage.persist, snapshot, entries, hard_state, sync)
        self.stats.persist_calls += 1
        self.stats.persist_ms_total += (time.perf_counter() - started) * 1000

    def _apply(self, ready: Ready) -> None:
        if ready.snapshot is not None:
            self._sm.restore(ready.snapshot.data)
            for index in [i for i in self._waiters if i <= ready.snapshot.index]:
                _, future = self._waiters.pop(index)
                if not future.done():
                    future.set_exception(
                        ProposalOutcomeUnknown(f"index {index} was replaced by a snapshot")
                    )
        for entry in ready.committed:
            result: object = None
            if entry.kind is EntryKind.NORMAL:
                result = self._sm.apply(entry.index, entry.data)
            waiter = self._waiters.pop(entry.index, None)
            if waiter is not None and not waiter[1].done():
                term, future = waiter
                if term == entry.term:
                    future.set_result(result)
                else:
                    future.set_exception(
                        ProposalLost(
                            f"index {entry.index} committed in term {entry.term},"
                            f" proposed in term {term}"
                        )
                    )
        for read in ready.read_states:
            read_future = self._read_waiters.pop(read.context, None)
            if read_future is not None and not read_future.done():
                read_future.set_result(read.index)
        if ready.committed and self._applied_waiters:
            applied = ready.committed[-1].index
            still: list[tuple[int, asyncio.Future[int]]] = []
            for index, applied_future in self._applied_waiters:
                if applied_future.done():
                    continue
                if index <= applied:
                    applied_future.set_result(index)
                else:
                    still.append((index, applied_future))
            self._applied_waiters = still

    async def _maybe_compact(self, core: RaftCore) -> None:
        if core.applied - core.log.snapshot_index < self.config.compact_every_entries:
            return
        data = self._sm.snapshot()
        snapshot = core.compact(core.applied, data)
        async with asyncio.timeout(self.config.persist_timeout_s):
            await asyncio.to_thread(self._storage.compact, snapshot)
        self.stats.compactions += 1
        log.info("raft node %s: compacted the log up to %d", self.id, snapshot.index)

    def _check_watchers(self) -> None:
        if self._read_waiters and self._core is not None and self._core.role is not Role.LEADER:
            # The core drops pending reads when it loses leadership: tell the callers.
            leader = self._core.leader
            for future in self._read_waiters.values():
                if not future.done():
                    future.set_exception(NotLeader(leader))
            self._read_waiters.clear()
        if not self._watchers:
            return
        for watcher in list(self._watchers):
            if watcher.future.done():
                self._watchers.remove(watcher)
            elif watcher.predicate():
                watcher.future.set_result(None)
                self._watchers.remove(watcher)

    def _fail_all(self, error: Exception) -> None:
        futures: list[asyncio.Future[object] | asyncio.Future[int] | asyncio.Future[None]] = []
        futures.extend(f for _, f in self._waiters.values())
        futures.extend(self._read_waiters.values())
        futures.extend(f for _, f in self._applied_waiters)
        futures.extend(w.future for w in self._watchers)
        while not self._proposals.empty():
            futures.append(self._proposals.get_nowait().future)
        while not self._requests.empty():
            futures.append(self._requests.get_nowait().future)
        for future in futures:
            if not future.done():
                future.set_exception(error)
        self._waiters.clear()
        self._read_waiters.clear()
        self._applied_waiters.clear()
        self._watchers.clear()
