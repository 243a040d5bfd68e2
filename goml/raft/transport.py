"""Raft peer transport over gRPC (grpc.aio): protobuf only, nothing is ever unpickled.

Outbound, `PeerTransport` keeps ONE long-lived client stream per peer
(`RaftPeer.Stream`) and writes messages to it in order. Each peer has a bounded
queue; `send` never blocks: when a queue is full the message is dropped and counted
(Raft tolerates loss; a blocked core would be worse). A broken stream is reopened
with jittered exponential backoff. Every await has a deadline: connecting, each
write, and the idle wait for the next message.

Inbound, `RaftPeerServicer` can be added to any `grpc.aio.Server` (the control plane
hosts its client and agent services on the same one). It authenticates each stream
from its metadata (cluster id, sender node id, and an HMAC of those under the shared
cluster secret), rejects a wrong one with UNAUTHENTICATED and an error log line
naming the peer address, validates every message (goml.raft.convert) and hands the
good ones to a callback.

Credentials are passed in: `grpc.ChannelCredentials` / `grpc.ServerCredentials`, or
None for plaintext, which is only accepted together with an explicit `insecure=True`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from goml.api.channels import reconnect_options
from goml.proto import raft_pb2, raft_pb2_grpc
from goml.raft.convert import InvalidMessage, Limits, message_from_proto, message_to_proto
from goml.raft.types import NODE_ID_CHARS_MAX, Message, NodeId

log = logging.getLogger(__name__)

METADATA_CLUSTER = "x-goml-cluster"
METADATA_SENDER = "x-goml-sender"
METADATA_TOKEN = "x-goml-token"

MESSAGE_SIZE_BYTES_MAX = 64 * 1024 * 1024


def grpc_options(message_size_bytes_max: int = MESSAGE_SIZE_BYTES_MAX) -> list[tuple[str, Any]]:
    """Options for channels and servers that carry Raft traffic (pass to both)."""
    return [
        ("grpc.max_send_message_length", message_size_bytes_max),
        ("grpc.max_receive_message_length", message_size_bytes_max),
        # Find a dead TCP connection (a partitioned peer) within ~30 s even when idle;
        # the server side must tolerate pings that often.
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        *reconnect_options(),  # a restarted peer is reached within 0.5 s, not minutes
    ]


def stream_token(secret: bytes, cluster_id: str, sender: NodeId) -> str:
    """HMAC-SHA256 binding a stream to its cluster and sender, keyed by the cluster secret."""
    assert secret, "the cluster secret must not be empty"
    mac = hmac.new(secret, f"goml-raft-stream\0{cluster_id}\0{sender}".encode(), hashlib.sha256)
    return mac.hexdigest()


@dataclass(frozen=True, slots=True)
class TransportConfig:
    node_id: NodeId
    cluster_id: str
    secret: bytes
    queue_messages_max: int  # per peer; beyond it messages are dropped and counted
    batch_messages_max: int  # messages per envelope (one write)
    connect_timeout_s: float
    write_timeout_s: float
    idle_wait_s: float  # how long the sender waits for a message before looking around
    backoff_s_min: float
    backoff_s_max: float

    def __post_init__(self) -> None:
        assert self.secret, "a cluster secret is required"
        assert self.queue_messages_max >= 1
        assert self.batch_messages_max >= 1
        assert 0 < self.backoff_s_min <= self.backoff_s_max
        assert self.connect_timeout_s > 0
        assert self.write_timeout_s > 0
        assert self.idle_wait_s > 0


def default_transport_config(node_id: NodeId, cluster_id: str, secret: bytes) -> TransportConfig:
    return TransportConfig(
        node_id=node_id,
        cluster_id=cluster_id,
        secret=secret,
        queue_messages_max=4096,
        batch_messages_max=256,
        connect_timeout_s=2.0,
        write_timeout_s=2.0,
        idle_wait_s=1.0,
        backoff_s_min=0.05,
        backoff_s_max=2.0,
    )


@dataclass(slots=True)
class PeerStats:
    sent: int = 0
    dropped_queue_full: int = 0
    dropped_disconnected: int = 0
    connects: int = 0
    failures: int = 0
    unauthenticated: int = 0
    last_error: str = ""
    connected: bool = False


@dataclass(slots=True)
class _Peer:
    node_id: NodeId
    address: str
    queue: asyncio.Queue[Message]
    stats: PeerStats = field(default_factory=PeerStats)
    task: asyncio.Task[None] | None = None


class PeerTransport:
    """Outbound side: one stream per peer, bounded queues, reconnect with backoff."""

    def __init__(
        self,
        config: TransportConfig,
        peers: dict[NodeId, str],
        credentials: grpc.ChannelCredentials | None,
        insecure: bool,
        rng: random.Random,
    ) -> None:
        assert config.node_id not in peers, "a node does not send to itself"
        if credentials is None and not insecure:
            raise ValueError("no channel credentials given: pass insecure=True for plaintext")
        if credentials is not None and insecure:
            raise ValueError("insecure=True contradicts the channel credentials given")
        self.config = config
        self._credentials = credentials
        self._rng = rng
        self._peers = {
            node_id: _Peer(node_id, address, asyncio.Queue(maxsize=config.queue_messages_max))
            for node_id, address in sorted(peers.items())
        }
        self._token = stream_token(config.secret, config.cluster_id, config.node_id)
        # Every address ever given (membership changes add some): a message to a node
        # outside the current peers (a leader this node does not know as a member yet)
        # still finds its way; `dropped_unknown` counts those with no address at all.
        self._addresses = dict(peers)
        self.dropped_unknown = 0
        self._started = False
        self._stopping = False

    def start(self) -> None:
        assert not self._started, "started twice"
        self._started = True
        for peer in self._peers.values():
            peer.task = asyncio.create_task(self._run_peer(peer), name=f"raft-send-{peer.node_id}")

    async def stop(self, timeout_s: float) -> None:
        self._stopping = True
        tasks = [p.task for p in self._peers.values() if p.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        for peer in self._peers.values():
            peer.task = None

    def set_peers(self, peers: dict[NodeId, str]) -> None:
        """Keep streams to exactly these peers (the members, after a membership change):
        new ones are started, gone ones stopped, a changed address reconnects."""
        assert self.config.node_id not in peers, "a node does not send to itself"
        self._addresses.update(peers)
        for node_id in sorted(set(self._peers) - set(peers)):
            self._drop_peer(node_id)
        for node_id, address in sorted(peers.items()):
            known = self._peers.get(node_id)
            if known is not None and known.address != address:
                self._drop_peer(node_id)
            if node_id not in self._peers:
                self._add_peer(node_id, address)

    def _add_peer(self, node_id: NodeId, address: str) -> _Peer:
        peer = _Peer(node_id, address, asyncio.Queue(maxsize=self.config.queue_messages_max))
        self._peers[node_id] = peer
        if self._started and not self._stopping:
            peer.task = asyncio.create_task(self._run_peer(peer), name=f"raft-send-{node_id}")
        return peer

    def _drop_peer(self, node_id: NodeId) -> None:
        peer = self._peers.pop(node_id)
        if peer.task is not None:
            peer.task.cancel()  # its stream closes; nothing waits for it

    def send(self, message: Message) -> bool:
        """Queue a message for its target; never blocks. False when dropped."""
        assert message.source == self.config.node_id
        assert message.target != self.config.node_id
        peer = self._peers.get(message.target)
        if peer is None:
            address = self._addresses.get(message.target)
            if address is None or self._stopping:
                self.dropped_unknown += 1
                return False
            peer = self._add_peer(message.target, address)
        if self._stopping:
            return False
        try:
            peer.queue.put_nowait(message)
        except asyncio.QueueFull:
            peer.stats.dropped_queue_full += 1
            return False
        return True

    def stats(self) -> dict[NodeId, PeerStats]:
        return {node_id: peer.stats for node_id, peer in self._peers.items()}

    def addresses(self) -> dict[NodeId, str]:
        """Every peer address this transport was given."""
        return dict(self._addresses)

    # ------------------------------------------------------------- internals

    def _channel(self, address: str) -> grpc.aio.Channel:
        if self._credentials is None:
            return grpc.aio.insecure_channel(address, options=grpc_options())
        return grpc.aio.secure_channel(address, self._credentials, options=grpc_options())

    async def _run_peer(self, peer: _Peer) -> None:
        backoff_s = self.config.backoff_s_min
        while not self._stopping:
            healthy = False
            try:
                healthy = await self._stream_once(peer)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # an operating error: log, back off, retry
                self._note_failure(peer, error)
            finally:
                peer.stats.connected = False
            if healthy:
                backoff_s = self.config.backoff_s_min
            # While disconnected the queue holds stale messages (old heartbeats, appends
            # the leader will resend): drop them rather than flood the peer on return.
            dropped = 0
            while not peer.queue.empty():
                peer.queue.get_nowait()
                dropped += 1
            peer.stats.dropped_disconnected += dropped
            await asyncio.sleep(backoff_s * (0.5 + self._rng.random()))
            backoff_s = min(backoff_s * 2, self.config.backoff_s_max)

    async def _stream_once(self, peer: _Peer) -> bool:
        """Open one stream and write to it until it fails. True if it carried anything."""
        config = self.config
        metadata = (
            (METADATA_CLUSTER, config.cluster_id),
            (METADATA_SENDER, config.node_id),
            (METADATA_TOKEN, self._token),
        )
        wrote = False
        channel = self._channel(peer.address)
        try:
            async with asyncio.timeout(config.connect_timeout_s):
                await channel.channel_ready()
            stub = raft_pb2_grpc.RaftPeerStub(channel)  # type: ignore[no-untyped-call]
            call = stub.Stream(metadata=metadata)
            peer.stats.connects += 1
            peer.stats.connected = True
            try:
                while not self._stopping:
                    if call.done():
                        await self._raise_for_call(peer, call)
                        return wrote
                    try:
                        async with asyncio.timeout(config.idle_wait_s):
                            first = await peer.queue.get()
                    except TimeoutError:
                        continue
                    batch = [first]
                    while len(batch) < config.batch_messages_max and not peer.queue.empty():
                        batch.append(peer.queue.get_nowait())
                    envelope = raft_pb2.Envelope(
                        cluster_id=config.cluster_id,
                        sender=config.node_id,
                        messages=[message_to_proto(m) for m in batch],
                    )
                    try:
                        async with asyncio.timeout(config.write_timeout_s):
                            await call.write(envelope)
                    except asyncio.InvalidStateError:
                        await self._raise_for_call(peer, call)
                        return wrote
                    peer.stats.sent += len(batch)
                    wrote = True
                    if peer.stats.failures:
                        log.info("raft stream to %s (%s) is back", peer.node_id, peer.address)
                        peer.stats.failures = 0
            finally:
                call.cancel()
        finally:
            await channel.close(grace=None)
        return wrote

    async def _raise_for_call(self, peer: _Peer, call: Any) -> None:
        async with asyncio.timeout(self.config.write_timeout_s):
            code = await call.code()
            details = await call.details()
        raise _StreamEnded(code, details)

    def _note_failure(self, peer: _Peer, error: Exception) -> None:
        peer.stats.failures += 1
        code: grpc.StatusCode | None = None
        details = str(error) or type(error).__name__
        if isinstance(error, _StreamEnded):
            code, details = error.code, error.details
        elif isinstance(error, grpc.aio.AioRpcError):
            code, details = error.code(), error.details() or ""
        peer.stats.last_error = f"{code.name if code else type(error).__name__}: {details}"
        if code is grpc.StatusCode.UNAUTHENTICATED:
            peer.stats.unauthenticated += 1
            log.error(
                "raft peer %s (%s) rejected our stream: %s (check the cluster secret and id)",
                peer.node_id,
                peer.address,
                details,
            )
        elif peer.stats.failures in (1, 10) or peer.stats.failures % 100 == 0:
            # Rate-limited: a dead peer is retried many times; say so, not every time.
            log.warning(
                "raft stream to %s (%s) failed (%d in a row): %s",
                peer.node_id,
                peer.address,
                peer.stats.failures,
                peer.stats.last_error,
            )


class _StreamEnded(Exception):
    def __init__(self, code: grpc.StatusCode, details: str | None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details or ""


@dataclass(slots=True)
class ServicerStats:
    streams: int = 0
    rejected_streams: int = 0
    received: int = 0
    invalid: int = 0


class RaftPeerServicer(raft_pb2_grpc.RaftPeerServicer):
    """Inbound side: authenticate streams, validate messages, hand them to `on_messages`.

    `on_messages` must not block (the node enqueues them into a bounded queue).
    """

    def __init__(
        self,
        node_id: NodeId,
        cluster_id: str,
        secret: bytes,
        voters: Sequence[NodeId],
        limits: Limits,
        on_messages: Callable[[list[Message]], None],
    ) -> None:
        assert secret, "a cluster secret is required"
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.voters = tuple(voters)
        self.limits = limits
        self._secret = secret
        self._on_messages = on_messages
        self.stats = ServicerStats()
        self._streams: set[asyncio.Task[Any]] = set()  # the handlers of open inbound streams
        self._closed = False

    def add_to_server(self, server: grpc.aio.Server) -> None:
        raft_pb2_grpc.add_RaftPeerServicer_to_server(self, server)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        """End every inbound stream now and refuse new ones (the node is stopping).

        Each open stream then ends UNAVAILABLE ("stopping") for its peer. Left open,
        the server's shutdown cancels their handlers once its grace period is over, and
        gRPC logs each as an unhandled error with a traceback: noise on every clean stop."""
        self._closed = True
        for task in sorted(self._streams, key=lambda t: t.get_name()):
            task.cancel()

    async def Stream(
        self, request_iterator: AsyncIterator[raft_pb2.Envelope], context: Any
    ) -> raft_pb2.Ack:
        if self._closed:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"node {self.node_id} is stopping")
        task = asyncio.current_task()
        assert task is not None, "a gRPC aio handler runs in a task"
        self._streams.add(task)
        try:
            return await self._stream(request_iterator, context)
        except asyncio.CancelledError:
            if not self._closed:
                raise  # not ours (the server or the loop): let it through
            task.uncancel()  # ours (close): the peer hears why its stream ended
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"node {self.node_id} is stopping")
            raise AssertionError("abort returned") from None
        finally:
            self._streams.discard(task)

    async def _stream(
        self, request_iterator: AsyncIterator[raft_pb2.Envelope], context: Any
    ) -> raft_pb2.Ack:
        metadata = {key: value for key, value in context.invocation_metadata()}
        sender = str(metadata.get(METADATA_SENDER, ""))
        problem = self._authenticate(metadata, sender)
        if problem:
            self.stats.rejected_streams += 1
            log.error(
                "rejected raft stream from %s (claims node %r, cluster %r): %s",
                context.peer(),
                sender,
                metadata.get(METADATA_CLUSTER, ""),
                problem,
            )
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
        self.stats.streams += 1
        async for envelope in request_iterator:
            if envelope.cluster_id != self.cluster_id or envelope.sender != sender:
                self.stats.invalid += 1
                log.error(
                    "raft stream from %s (%s): envelope claims cluster %r, sender %r",
                    context.peer(),
                    sender,
                    envelope.cluster_id,
                    envelope.sender,
                )
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "envelope mismatch")
            messages: list[Message] = []
            for proto in envelope.messages:
                try:
                    messages.append(message_from_proto(proto, self.node_id, sender, self.limits))
                except InvalidMessage as error:
                    self.stats.invalid += 1
                    log.error(
                        "dropped invalid raft message from %s (%s): %s",
                        sender,
                        context.peer(),
                        error,
                    )
            self.stats.received += len(messages)
            if messages:
                self._on_messages(messages)
        return raft_pb2.Ack()

    def _authenticate(self, metadata: dict[str, Any], sender: str) -> str:
        cluster = metadata.get(METADATA_CLUSTER, "")
        token = metadata.get(METADATA_TOKEN, "")
        if cluster != self.cluster_id:
            return f"wrong cluster id {cluster!r} (this is {self.cluster_id!r})"
        # Any node of the cluster (it holds the secret) may write, member or not yet: a
        # leader writes to a joining node first, a removed one to its old peers. The
        # Raft core decides who counts.
        if not sender or sender == self.node_id or len(sender) > NODE_ID_CHARS_MAX:
            return f"sender {sender!r} is not a peer"
        expected = stream_token(self._secret, self.cluster_id, sender)
        if not isinstance(token, str) or not hmac.compare_digest(token, expected):
            return "wrong cluster secret"
        return ""


def add_insecure_or_secure_port(
    server: grpc.aio.Server,
    address: str,
    credentials: grpc.ServerCredentials | None,
    insecure: bool,
) -> int:
    """Bind `address` ("host:port", port 0 picks a free one); returns the port."""
    if credentials is None:
        if not insecure:
            raise ValueError("no server credentials given: pass insecure=True for plaintext")
        port = server.add_insecure_port(address)
    else:
        if insecure:
            raise ValueError("insecure=True contradicts the server credentials given")
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot bind raft server to {address}")
    assert isinstance(port, int)
    return port


@contextlib.asynccontextmanager
async def serving(server: grpc.aio.Server, grace_s: float) -> AsyncIterator[grpc.aio.Server]:
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace_s)
