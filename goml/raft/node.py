"""The asyncio runtime of a replica core, and `RaftNode`, a Raft node with any state
machine built on it (the demo, the benchmark and the Raft tests use it; the control
plane drives its own node core with the same `NodeRuntime`).

`NodeRuntime` is the one real-world Ready loop. One task owns the core. It sleeps until
there is input (a peer message, a request from the owner) or until the core's
`next_deadline_ms()`, with no fixed polling; then it feeds every queued input, ticks, and
drains `ready()` (STYLE.md "Order of effects"):

    hand out outputs -> store (fsync, in a worker thread) -> send -> advance

A Ready's messages leave before its committed entries are applied (the loop yields to
the sender tasks first): nothing in them waits for the apply.

Outputs (proposal outcomes, API replies) depend on nothing the same Ready stores, so
they go first. When the core says a Ready's messages depend on nothing it stores
(`send_before_persist`: a leader's appends), they go before the store and travel to
the followers while the fsync runs (Raft dissertation §10.2.1). While the store's fsync
runs in its thread, new inputs queue up and join the next batch: that is the batching.
The runtime decides nothing: the core does.

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
from typing import Generic, Protocol, TypeVar

from goml.raft.convert import Limits
from goml.raft.replica import (
    PROPOSAL_BYTES_MAX,
    Applied,
    Lost,
    PeerAddresses,
    ReadFailed,
    ReadReady,
    ReplicaConfig,
    ReplicaCore,
    ReplicaReady,
    StateMachine,
    Unknown,
    raft_config,
)
from goml.raft.storage import Storage
from goml.raft.transport import PeerTransport, RaftPeerServicer
from goml.raft.types import (
    Config,
    Entry,
    HardState,
    Message,
    MessageType,
    NodeId,
    NotLeader,
    PersistedState,
    ProposalDropped,
    Role,
    Snapshot,
)

log = logging.getLogger(__name__)

__all__ = [
    "NodeConfig",
    "NodeRuntime",
    "NodeStopped",
    "ProposalLost",
    "ProposalOutcomeUnknown",
    "RaftNode",
    "StateMachine",
    "default_core_config",
    "default_node_config",
    "monotonic_ms",
    "wall_ms",
]


class ProposalLost(Exception):
    """An entry of another term was committed at the proposal's index: it will never apply."""


class ProposalOutcomeUnknown(Exception):
    """A snapshot from the leader replaced the log around the proposal: it may or may not
    have been applied. Retry with the same idempotency key."""


class NodeStopped(Exception):
    """The node stopped (or failed) before the request completed."""


@dataclass(frozen=True, slots=True)
class NodeConfig:
    replica: ReplicaConfig
    inbound_messages_max: int  # queued peer messages; beyond: dropped and counted
    inputs_max: int  # queued owner inputs (proposals, requests); beyond: refused
    inputs_per_iteration_max: int  # inputs fed to the core per loop iteration
    snapshot_size_bytes_max: int
    persist_timeout_s: float  # an fsync slower than this is fatal: the node stops
    stop_timeout_s: float

    def __post_init__(self) -> None:
        assert self.inbound_messages_max >= 1
        assert self.inputs_max >= 1
        assert self.inputs_per_iteration_max >= 1
        assert self.persist_timeout_s > 0
        assert self.stop_timeout_s > 0

    @property
    def core(self) -> Config:
        return self.replica.raft


def default_core_config(node_id: NodeId, voters: tuple[NodeId, ...]) -> Config:
    return raft_config(node_id, voters, 300, 600, 50)


def default_node_config(core: Config) -> NodeConfig:
    return NodeConfig(
        replica=ReplicaConfig(
            raft=core,
            compact_every_entries=10_000,
            proposal_bytes_max=PROPOSAL_BYTES_MAX,
            defer_commit_only_writes=True,
        ),
        inbound_messages_max=16_384,
        inputs_max=8192,
        inputs_per_iteration_max=4096,
        snapshot_size_bytes_max=48 * 1024 * 1024,
        persist_timeout_s=10.0,
        stop_timeout_s=5.0,
    )


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def wall_ms() -> int:
    """The leader stamps wall-clock time into commands; apply never reads a clock."""
    return time.time_ns() // 1_000_000


class DrivenReady(Protocol):
    """What the runtime needs of a Ready (ReplicaReady, the node core's NodeReady)."""

    @property
    def compacted(self) -> Snapshot | None: ...

    @property
    def snapshot(self) -> Snapshot | None: ...

    @property
    def entries(self) -> tuple[Entry, ...]: ...

    @property
    def hard_state(self) -> HardState | None: ...

    @property
    def must_sync(self) -> bool: ...

    @property
    def messages(self) -> tuple[Message, ...]: ...

    @property
    def send_before_persist(self) -> bool: ...

    @property
    def committed(self) -> tuple[Entry, ...]: ...

    def writes(self) -> bool: ...


R = TypeVar("R", bound=DrivenReady)


class Driver(Protocol[R]):
    """A sans-IO core as the runtime drives it (the control plane's node core, or a
    RaftNode's replica core), with `deliver` to hand out a Ready's outputs."""

    def step(self, message: Message, now_ms: int, wall_ms: int) -> None: ...

    def tick(self, now_ms: int, wall_ms: int) -> None: ...

    def next_deadline_ms(self) -> int: ...

    def has_ready(self) -> bool: ...

    def ready(self) -> R: ...

    def deliver(self, ready: R) -> None: ...

    def advance(self, ready: R) -> None: ...

    def take_deferred_hard_state(self) -> HardState | None: ...

    def peer_addresses(self) -> dict[NodeId, str]:
        """The peers to keep streams to (the same dict until membership changes)."""
        ...


Input = Callable[[int, int], None]  # (now_ms, wall_ms): one call into the core


@dataclass(slots=True)
class RuntimeStats:
    inbound_dropped: int = 0
    inbound_refused: int = 0
    inputs_refused: int = 0
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


class NodeRuntime(Generic[R]):
    """Runs one `Driver` (given at `start`, once its store is loaded)."""

    def __init__(
        self,
        config: NodeConfig,
        storage: Storage,
        transport: PeerTransport,
        clock_ms: Callable[[], int] = monotonic_ms,
        wall_clock_ms: Callable[[], int] = wall_ms,
    ) -> None:
        assert transport.config.node_id == config.core.node_id
        self.config = config
        self.id = config.core.node_id
        self._driver: Driver[R] | None = None
        self._storage = storage
        self._transport = transport
        self._clock_ms = clock_ms
        self._wall_clock_ms = wall_clock_ms
        self._inbound: asyncio.Queue[Message] = asyncio.Queue(maxsize=config.inbound_messages_max)
        self._inputs: asyncio.Queue[Input] = asyncio.Queue(maxsize=config.inputs_max)
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._failure: BaseException | None = None
        self._on_iteration: list[Callable[[], None]] = []
        self._on_durable_write: list[Callable[[float], None]] = []
        self._on_stop: list[Callable[[Exception], None]] = []
        self._servicers: list[RaftPeerServicer] = []
        self._last_now_ms = 0
        self._peers_seen: dict[NodeId, str] | None = None
        self._rtt: dict[NodeId, PeerRtt] = {}
        self.stats = RuntimeStats()
        self.limits = Limits(
            entries_per_message_max=config.core.entries_per_message_max,
            entry_size_bytes_max=config.replica.proposal_bytes_max,
            snapshot_size_bytes_max=config.snapshot_size_bytes_max,
            context_size_bytes_max=256,
        )

    # ------------------------------------------------------------- lifecycle

    def servicer(self) -> RaftPeerServicer:
        """The inbound gRPC servicer for this node: add it to a `grpc.aio.Server`."""
        t = self._transport.config
        servicer = RaftPeerServicer(
            node_id=self.id,
            cluster_id=t.cluster_id,
            secret=t.secret,
            voters=self.config.core.voters,
            limits=self.limits,
            on_messages=self.receive,
        )
        self._servicers.append(servicer)  # `stop` ends its inbound streams
        return servicer

    async def load(self) -> PersistedState:
        """What the store holds: the input to build the core that `start` drives."""
        async with asyncio.timeout(self.config.persist_timeout_s):
            persisted: PersistedState = await asyncio.to_thread(self._storage.load)
        return persisted

    def now_ms(self) -> int:
        return self._now_ms()

    def wall_ms(self) -> int:
        return self._wall_clock_ms()

    def start(self, driver: Driver[R]) -> None:
        assert self._task is None, "started twice"
        self._driver = driver
        self._transport.start()
        self._task = asyncio.create_task(self._run(), name=f"node-{self.id}")

    async def stop(self) -> None:
        """Stop the loop and the transport, fail pending callers, close the store."""
        if self._stopping:
            return
        self._stopping = True
        self._wakeup.set()
        # Peers' streams into this node end now with OK, before the server stops (it
        # would cancel them, and gRPC logs every cancelled handler as an ERROR).
        for servicer in self._servicers:
            servicer.close()
        if self._task is not None:
            try:
                async with asyncio.timeout(self.config.stop_timeout_s):
                    await asyncio.shield(self._task)
            except TimeoutError:
                log.error("node %s: loop did not stop in time; cancelling", self.id)
                self._task.cancel()
            except Exception:
                pass  # already logged by the loop
        await self._transport.stop(self.config.stop_timeout_s)
        self._fail_all(NodeStopped(f"node {self.id} stopped"))
        driver = self._driver
        deferred = (
            driver.take_deferred_hard_state()
            if driver is not None and self._failure is None
            else None
        )
        if deferred is not None:
            try:
                await self._write(None, None, (), deferred, True)
            except Exception as error:  # stopping anyway; the stored commit is just older
                log.error("node %s: final commit write failed: %r", self.id, error)
        self._storage.close()

    # ---------------------------------------------------------------- inputs

    def receive(self, messages: list[Message]) -> None:
        """Inbound peer messages (called by the servicer); never blocks."""
        if self._stopping or self._task is None:
            self.stats.inbound_refused += len(messages)  # not started yet, or stopping
            return
        for message in messages:
            if message.type is MessageType.HEARTBEAT_RESPONSE:
                self._heartbeat_answered(message.source)
            try:
                self._inbound.put_nowait(message)
            except asyncio.QueueFull:
                self.stats.inbound_dropped += 1
        self._wakeup.set()

    def submit(self, action: Input) -> None:
        """Queue one call into the core, made by the loop (never between ready and
        advance). Raises NodeStopped, or ProposalDropped when the queue is full."""
        self.check_running()
        try:
            self._inputs.put_nowait(action)
        except asyncio.QueueFull:
            self.stats.inputs_refused += 1
            raise ProposalDropped(f"{self.config.inputs_max} inputs queued") from None
        self._wakeup.set()

    def on_iteration(self, callback: Callable[[], None]) -> None:
        """Called after every loop iteration (watchers check their conditions)."""
        self._on_iteration.append(callback)

    def on_stop(self, callback: Callable[[Exception], None]) -> None:
        """Called once when the node stops or fails: fail whatever still waits."""
        self._on_stop.append(callback)

    def on_durable_write(self, callback: Callable[[float], None]) -> None:
        """Called with the seconds each fsync'd write of the store took, as the loop
        waited for it (the worker-thread hop included): the node's metrics."""
        self._on_durable_write.append(callback)

    # --------------------------------------------------------------- queries

    @property
    def running(self) -> bool:
        return self._task is not None and not self._stopping and self._failure is None

    @property
    def failure(self) -> BaseException | None:
        return self._failure

    def check_running(self) -> None:
        if self._failure is not None:
            raise NodeStopped(f"node {self.id} failed: {self._failure!r}")
        if self._task is None or self._stopping:
            raise NodeStopped(f"node {self.id} is not running")

    def transport_status(self) -> dict[str, dict[str, object]]:
        return {
            peer: {
                "rtt_ms": self.rtt_ms(peer),
                "rtt_ms_avg": self.rtt_ms(peer, average=True),
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

    def runtime_status(self) -> dict[str, object]:
        return {
            "running": self.running,
            "failure": repr(self._failure) if self._failure else "",
            "inbound_queued": self._inbound.qsize(),
            "inputs_queued": self._inputs.qsize(),
            "stats": {
                "inbound_dropped": self.stats.inbound_dropped,
                "inputs_refused": self.stats.inputs_refused,
                "persist_calls": self.stats.persist_calls,
                "persist_ms_total": round(self.stats.persist_ms_total, 3),
                "loop_iterations": self.stats.loop_iterations,
                "compactions": self.stats.compactions,
            },
            "peers": self.transport_status(),
        }

    def rtt_ms(self, peer: NodeId, average: bool = False) -> float | None:
        """The latest (or moving-average) heartbeat round trip to `peer`, in ms; None
        before the first sample (only a leader sends heartbeats)."""
        rtt = self._rtt.get(peer)
        if rtt is None:
            return None
        value = rtt.average_ms if average else rtt.latest_ms
        return round(value, 3) if value is not None else None

    def connected(self, peer: NodeId) -> bool:
        stats = self._transport.stats().get(peer)
        return bool(stats and stats.connected)

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

    # -------------------------------------------------------------- the loop

    def _now_ms(self) -> int:
        # The core asserts time never goes back; a monotonic clock guarantees it, and
        # this guards an injected clock too.
        self._last_now_ms = max(self._last_now_ms, self._clock_ms())
        return self._last_now_ms

    def _has_input(self) -> bool:
        return not (self._inbound.empty() and self._inputs.empty())

    async def _run(self) -> None:
        core = self._driver
        assert core is not None
        try:
            await self._drain()
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
                self._feed()
                core.tick(self._now_ms(), self._wall_clock_ms())
                await self._drain()
                for callback in list(self._on_iteration):
                    callback()
        except Exception as error:
            # A failed store or a broken invariant: this node must not go on. Fail
            # every caller; the process supervisor restarts from the store.
            self._failure = error
            log.critical("node %s failed: %r", self.id, error, exc_info=True)
            self._fail_all(NodeStopped(f"node {self.id} failed: {error!r}"))
            raise

    def _feed(self) -> None:
        core = self._driver
        assert core is not None
        budget = self.config.inputs_per_iteration_max
        now_ms, wall = self._now_ms(), self._wall_clock_ms()
        while budget > 0 and not self._inbound.empty():
            budget -= 1
            core.step(self._inbound.get_nowait(), now_ms, wall)
        while budget > 0 and not self._inputs.empty():
            budget -= 1
            self._inputs.get_nowait()(now_ms, wall)

    async def _drain(self) -> None:
        core = self._driver
        assert core is not None
        for _ in range(1000):  # bounded: a core that never runs dry is a bug
            if not core.has_ready():
                return
            ready = core.ready()
            core.deliver(ready)
            peers = core.peer_addresses()
            if peers is not self._peers_seen:  # the membership changed: follow it first,
                self._peers_seen = peers  # so messages to a new member find their stream
                self._transport.set_peers(peers)
            early = ready.send_before_persist
            if early:
                self._send(ready.messages)
            if ready.writes():
                if early and ready.messages:
                    # Yield once (no wait: the loop runs what is ready, in order) so
                    # each peer's sender task hands its write to gRPC before the store's
                    # thread starts: started after it, the writes queued behind that
                    # thread for the GIL and left ~0.2 ms later (bench/trace_lone_write.py).
                    await asyncio.sleep(0)
                await self._write(
                    ready.compacted,
                    ready.snapshot,
                    ready.entries,
                    ready.hard_state,
                    ready.must_sync,
                )
            if not early:
                self._send(ready.messages)
            if ready.messages and ready.committed and not (early and ready.writes()):
                # Yield once so each peer's sender task hands this Ready's messages to
                # gRPC before `advance` applies the committed entries: a follower's
                # append answer waited ~0.3 ms for the apply of the entry before it
                # (bench/trace_lone_write.py --control-plane). Messages sent before a
                # store left during its await already. Yielding here is as safe as
                # that await: inputs only queue until `_feed`.
                await asyncio.sleep(0)
            core.advance(ready)
        raise AssertionError(f"node {self.id}: ready() never ran dry")

    def _send(self, messages: tuple[Message, ...]) -> None:
        for message in messages:
            sent = self._transport.send(message)
            if message.type is MessageType.HEARTBEAT:
                self._heartbeat_sent(message.target, sent)

    async def _write(
        self,
        compacted: Snapshot | None,
        snapshot: Snapshot | None,
        entries: tuple[Entry, ...],
        hard_state: HardState | None,
        sync: bool,
    ) -> None:
        started = time.perf_counter()
        storage = self._storage

        def write() -> None:
            if compacted is not None:
                storage.compact(compacted)
            if snapshot is not None or entries or hard_state is not None:
                storage.persist(snapshot, entries, hard_state, sync)

        async with asyncio.timeout(self.config.persist_timeout_s):
            await asyncio.to_thread(write)
        if compacted is not None:
            self.stats.compactions += 1
            log.info("node %s: compacted the log up to %d", self.id, compacted.index)
        took_s = time.perf_counter() - started
        self.stats.persist_calls += 1
        self.stats.persist_ms_total += took_s * 1000
        if sync:
            for callback in self._on_durable_write:
                callback(took_s)

    def _fail_all(self, error: Exception) -> None:
        while not self._inputs.empty():
            self._inputs.get_nowait()
        for callback in list(self._on_stop):
            callback(error)
        self._on_stop.clear()


# ------------------------------------------------------------------------- RaftNode


@dataclass(slots=True)
class _Watcher:
    predicate: Callable[[], bool]
    future: asyncio.Future[None]


class RaftNode:
    """A Raft node over any state machine: propose, read, transfer, wait, as coroutines
    with deadlines. The decisions are the replica core's; this keeps futures."""

    def __init__(
        self,
        config: NodeConfig,
        storage: Storage,
        state_machine: StateMachine,
        transport: PeerTransport,
        rng: random.Random,
        clock_ms: Callable[[], int] = monotonic_ms,
    ) -> None:
        self.config = config
        self.id = config.core.node_id
        self._sm = state_machine
        self._rng = rng
        self._core: ReplicaCore | None = None
        self._runtime: NodeRuntime[ReplicaReady] = NodeRuntime(config, storage, transport, clock_ms)
        self._peer_addresses = PeerAddresses(self.id, transport.addresses())
        self._runtime.on_iteration(self._check_watchers)
        self._runtime.on_stop(self._fail_all)
        self._tokens = itertools.count(1)
        self._futures: dict[int, asyncio.Future[object]] = {}
        self._watchers: list[_Watcher] = []

    # ------------------------------------------------------------- lifecycle

    def servicer(self) -> RaftPeerServicer:
        return self._runtime.servicer()

    @property
    def _replica(self) -> ReplicaCore:
        assert self._core is not None, "not started"
        return self._core

    async def start(self) -> None:
        assert self._core is None, "started twice"
        persisted = await self._runtime.load()
        now = self._runtime.now_ms()
        self._core = ReplicaCore(self.config.replica, persisted, self._sm, self._rng, now)
        raft = self._core.raft
        log.info(
            "raft node %s starting: term %d, commit %d, log %d..%d",
            self.id,
            raft.term,
            raft.commit,
            raft.log.first_index,
            raft.log.last_index,
        )
        self._runtime.start(self)

    async def stop(self) -> None:
        await self._runtime.stop()

    # ---------------------------------------------------------------- inputs

    def receive(self, messages: list[Message]) -> None:
        self._runtime.receive(messages)

    async def propose(self, data: bytes, timeout_s: float) -> object:
        """Replicate `data`; returns the state machine's result for it once applied.

        Raises NotLeader (with the leader hint), ProposalDropped (busy, too large),
        TimeoutError, ProposalLost, ProposalOutcomeUnknown, NodeStopped."""
        assert timeout_s > 0
        runtime = self._runtime
        runtime.check_running()
        replica = self._replica
        if replica.raft.role is not Role.LEADER:
            raise NotLeader(replica.raft.leader)  # fast path; the loop checks again
        token = next(self._tokens)
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._futures[token] = future

        def propose(now_ms: int, wall: int) -> None:
            if future.done():
                return  # its caller gave up before it was proposed: do not propose it
            try:
                replica.propose(data, token)
            except (NotLeader, ProposalDropped) as error:
                self._futures.pop(token, None)
                future.set_exception(error)

        try:
            runtime.submit(propose)
            async with asyncio.timeout(timeout_s):
                return await future
        finally:
            self._futures.pop(token, None)

    async def read_index(self, timeout_s: float) -> int:
        """A linearizable read point: returns once the state machine has applied it."""
        assert timeout_s > 0
        runtime = self._runtime
        runtime.check_running()
        token = next(self._tokens)
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._futures[token] = future

        def read(now_ms: int, wall: int) -> None:
            try:
                self._replica.read(token)
            except NotLeader as error:
                self._futures.pop(token, None)
                future.set_exception(error)

        try:
            runtime.submit(read)
            async with asyncio.timeout(timeout_s):
                index = await future
        finally:
            self._futures.pop(token, None)
        assert isinstance(index, int)
        return index

    async def transfer_leadership(self, target: NodeId, timeout_s: float) -> None:
        """Hand leadership to `target` and wait until it leads (TimeoutError if not)."""
        assert timeout_s > 0
        await self._call(lambda now: self._replica.raft.transfer_leadership(target, now), timeout_s)
        await self.wait_for(lambda: self.leader == target, timeout_s)

    async def campaign(self, timeout_s: float) -> None:
        """Start an election now (tests and demos; production waits for the timer)."""
        await self._call(lambda now: self._replica.raft.campaign(now), timeout_s)

    async def _call(self, action: Callable[[int], None], timeout_s: float) -> None:
        runtime = self._runtime
        runtime.check_running()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def call(now_ms: int, wall: int) -> None:
            try:
                action(now_ms)
            except (NotLeader, ValueError) as error:
                future.set_exception(error)
                return
            future.set_result(None)

        runtime.submit(call)
        async with asyncio.timeout(timeout_s):
            await future

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> None:
        """Wait until `predicate()` holds; checked after every loop iteration."""
        assert timeout_s > 0
        if predicate():
            return
        self._runtime.check_running()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        watcher = _Watcher(predicate, future)
        self._watchers.append(watcher)
        try:
            async with asyncio.timeout(timeout_s):
                await future
        finally:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

    # --------------------------------------------------------------- queries

    @property
    def role(self) -> Role:
        return self._core.raft.role if self._core is not None else Role.FOLLOWER

    @property
    def leader(self) -> NodeId:
        return self._core.raft.leader if self._core is not None else ""

    @property
    def term(self) -> int:
        return self._core.raft.term if self._core is not None else 0

    @property
    def applied(self) -> int:
        return self._core.raft.applied if self._core is not None else 0

    @property
    def commit(self) -> int:
        return self._core.raft.commit if self._core is not None else 0

    @property
    def is_leader(self) -> bool:
        return self.role is Role.LEADER

    @property
    def running(self) -> bool:
        return self._core is not None and self._runtime.running

    @property
    def stats(self) -> RuntimeStats:
        return self._runtime.stats

    def match_index(self, peer: NodeId) -> int:
        """The leader's view of how far `peer`'s log matches its own (0 if not leader)."""
        core = self._core
        if core is None or core.raft.role is not Role.LEADER or peer not in core.raft.progress:
            return 0
        return core.raft.progress[peer].match

    def status(self) -> dict[str, object]:
        status: dict[str, object] = (
            dict(self._core.raft.status()) if self._core is not None else {"id": self.id}
        )
        status.update(self._runtime.runtime_status())
        return status

    # ------------------------------------------------------- the Driver protocol

    def step(self, message: Message, now_ms: int, wall_ms: int) -> None:
        self._replica.step(message, now_ms)

    def tick(self, now_ms: int, wall_ms: int) -> None:
        self._replica.tick(now_ms)

    def next_deadline_ms(self) -> int:
        return self._replica.next_deadline_ms()

    def has_ready(self) -> bool:
        return self._replica.has_ready()

    def ready(self) -> ReplicaReady:
        return self._replica.ready()

    def advance(self, ready: ReplicaReady) -> None:
        self._replica.advance(ready)

    def take_deferred_hard_state(self) -> HardState | None:
        return self._core.take_deferred_hard_state() if self._core is not None else None

    def peer_addresses(self) -> dict[NodeId, str]:
        return self._peer_addresses.current(self._replica.raft.membership)

    def deliver(self, ready: ReplicaReady) -> None:
        for outcome in ready.outcomes:
            future = self._futures.pop(outcome.token, None)
            if future is None or future.done():
                continue
            match outcome:
                case Applied():
                    future.set_result(outcome.result)
                case Lost():
                    future.set_exception(ProposalLost(outcome.why))
                case Unknown():
                    future.set_exception(ProposalOutcomeUnknown(outcome.why))
                case ReadReady():
                    future.set_result(outcome.index)
                case ReadFailed():
                    future.set_exception(NotLeader(outcome.leader))

    def _check_watchers(self) -> None:
        for watcher in list(self._watchers):
            if watcher.future.done():
                self._watchers.remove(watcher)
            elif watcher.predicate():
                watcher.future.set_result(None)
                self._watchers.remove(watcher)

    def _fail_all(self, error: Exception) -> None:
        for future in list(self._futures.values()):
            if not future.done():
                future.set_exception(error)
        self._futures.clear()
        for watcher in self._watchers:
            if not watcher.future.done():
                watcher.future.set_exception(error)
        self._watchers.clear()
