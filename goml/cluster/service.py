"""A control-plane node in the real world: the node core (`goml.cluster.node_core`)
driven by the asyncio runtime (`goml.raft.node.NodeRuntime`), and the gRPC services
(client, agent, peer, health, reflection) on one server, plus Prometheus metrics.

Nothing here decides: a gRPC call is converted to an API request (`goml.api.wire`),
handed to the core, and its reply converted back; a refusal becomes the status code
and trailing metadata of `goml.api.wire.status_of` (NOT_LEADER: FAILED_PRECONDITION
with the leader's id and address, which the client library follows). Every call is
admitted here, before it reaches the core, by `goml.api.auth.admit` (the one table of
which role may call what): the caller's identity from its certificate and its token from
the node's tokens file (`goml.cluster.certs.TokensFile`). A request this node forwards
carries the identity it admitted, and the leader admits it again as that caller's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, NoReturn

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from goml.api.auth import (
    AGENT_METHODS,
    AUTHORIZATION_KEY,
    FORWARDED_BY_KEY,
    FORWARDED_FOR_KEY,
    Admission,
    CallCredentials,
    Identity,
    admit,
    bearer,
)
from goml.api.channels import reconnect_options
from goml.api.task_args import validate_args
from goml.api.types import (
    LEADER_ID_KEY,
    METHOD_OF_REQUEST,
    ApiError,
    ApiRequest,
    ApiResponse,
    ErrorCode,
    LeaseRequest,
    MembershipRequest,
    Method,
    StatusResponse,
    SubmitRequest,
    TaskEvent,
    WatchRequest,
)
from goml.api.wire import (
    error_from_status,
    request_from_pb,
    request_to_pb,
    response_from_pb,
    response_to_pb,
    status_of,
    trailing_metadata,
)
from goml.cluster.certs import TokensFile
from goml.cluster.config import NodeFileConfig
from goml.cluster.metrics import Metrics
from goml.cluster.node_core import (
    LEASE_WAIT_MS_MAX,
    PROMOTE_WAIT_MS_MAX,
    Forward,
    NodeCore,
    NodeCoreConfig,
    NodeReady,
    Reply,
)
from goml.proto import api_pb2, api_pb2_grpc
from goml.raft.node import NodeRuntime, NodeStopped
from goml.raft.types import HardState, Message, NodeId, ProposalDropped

log = logging.getLogger(__name__)

WATCH_QUEUE_MAX = 1024
ERROR_MESSAGE_CHARS_MAX = 2048  # of a refusal's gRPC status details (see _abort)
# Metadata of a request a follower forwards to the leader (it is never forwarded again).
FORWARDED_KEY = FORWARDED_BY_KEY
# The metadata admission reads; each may appear once.
_AUTH_KEYS = (AUTHORIZATION_KEY, FORWARDED_BY_KEY, FORWARDED_FOR_KEY)
METRICS_EVERY_MS = 200
# The core answers every request within request_timeout_ms; this margin only guards
# against a stuck loop, so a caller is never left waiting for ever.
CALL_MARGIN_S = 1.0


class ControlPlane:
    """One node: drives its NodeCore (the runtime's `Driver`) and keeps the callers'
    futures and watch queues. `start` loads the store and builds the core."""

    def __init__(
        self,
        config: NodeFileConfig,
        core_config: NodeCoreConfig,
        runtime: NodeRuntime[NodeReady],
        tokens: TokensFile,
        node_token: str,
        metrics: Metrics,
        seed: bytes,
        channel_credentials: grpc.ChannelCredentials | None,
    ) -> None:
        self.config = config
        self.core_config = core_config
        self.runtime = runtime
        self.tokens = tokens
        self.metrics = metrics
        self._seed = seed
        self._channel_credentials = channel_credentials
        self._forward_channels: dict[str, grpc.aio.Channel] = {}
        # A forwarding node shows its own token (and certificate); FORWARDED_FOR names whom for.
        self._forward_metadata = (
            (AUTHORIZATION_KEY, f"Bearer {node_token}"),
            (FORWARDED_BY_KEY, config.node_id),
        )
        self._acting: dict[int, Identity] = {}  # request id -> the identity it runs as
        self._core: NodeCore | None = None
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future[tuple[ApiResponse | ApiError, str]]] = {}
        self._watches: dict[int, asyncio.Queue[TaskEvent | ApiError]] = {}
        self._metrics_due_ms = 0
        self._health: health.aio.HealthServicer | None = None
        self._serving: bool | None = None
        self._background: set[asyncio.Future[None]] = set()
        self._forwarding: dict[int, asyncio.Future[None]] = {}  # request id -> its forward
        runtime.on_iteration(self._observe)
        runtime.on_stop(self._fail_all)

    async def start(self) -> None:
        persisted = await self.runtime.load()
        self._core = NodeCore(
            self.core_config,
            persisted,
            random.Random(self._seed),
            validate_args,
            self.runtime.now_ms(),
            self.runtime.wall_ms(),
        )
        raft = self._core.replica.raft
        log.info(
            "node %s starting: term %d, commit %d, log %d..%d",
            self.config.node_id,
            raft.term,
            raft.commit,
            raft.log.first_index,
            raft.log.last_index,
        )
        self.runtime.start(self)

    async def stop(self) -> None:
        await self.runtime.stop()
        for channel in self._forward_channels.values():
            await channel.close()
        self._forward_channels.clear()

    @property
    def core(self) -> NodeCore:
        assert self._core is not None, "not started"
        return self._core

    # ------------------------------------------------------------ calls

    def admit(self, method: Method, request: ApiRequest, context: Any) -> Admission | ApiError:
        """Who makes this call and whether they may (`goml.api.auth.admit`): the peer
        certificate from the TLS session, the token and forwarding from the metadata."""
        values: dict[str, list[str]] = {key: [] for key in _AUTH_KEYS}
        for key, value in context.invocation_metadata() or ():
            if key in values:
                values[key].append(value if isinstance(value, str) else "")
        for key, found in values.items():
            if len(found) > 1:
                return ApiError(
                    ErrorCode.UNAUTHENTICATED, f"metadata {key} given {len(found)} times"
                )
        tls = self.config.tls is not None
        uris = context.auth_context().get("peer_uri", []) if tls else []
        authorization = values[AUTHORIZATION_KEY]
        forwarded_by, forwarded_for = values[FORWARDED_BY_KEY], values[FORWARDED_FOR_KEY]
        call = CallCredentials(
            tls=tls,
            peer_uris=tuple(u.decode("utf-8", "replace") for u in uris),
            token=bearer(authorization[0]) if authorization else None,
            forwarded_by=forwarded_by[0] if forwarded_by else None,
            forwarded_for=forwarded_for[0] if forwarded_for else None,
        )
        return admit(call, method, request, self.tokens.table())

    async def call(
        self, request: ApiRequest, admission: Admission
    ) -> tuple[ApiResponse | ApiError, str]:
        """Hand `request` to the core; its one final reply (or UNAVAILABLE), and the
        leader that served it when this node forwarded it ("" otherwise). A request a
        node forwarded here is never forwarded again."""
        forwarded = admission.forwarded
        request_id = next(self._ids)
        self._acting[request_id] = admission.acting
        future: asyncio.Future[tuple[ApiResponse | ApiError, str]] = (
            asyncio.get_running_loop().create_future()
        )
        self._calls[request_id] = future
        started = time.monotonic()
        timeout_s = self.config.request_timeout_s + CALL_MARGIN_S
        if isinstance(request, LeaseRequest):  # a long poll: held up to its wait
            timeout_s += min(max(request.wait_ms, 0), LEASE_WAIT_MS_MAX) / 1000
        if isinstance(request, MembershipRequest):  # a promotion waits for its learner
            timeout_s += min(max(request.wait_ms, 0), PROMOTE_WAIT_MS_MAX) / 1000
        try:
            self.runtime.submit(
                lambda now_ms, wall_ms: self._request(
                    request_id, request, now_ms, wall_ms, forwarded=forwarded
                )
            )
            async with asyncio.timeout(timeout_s):
                outcome, served_by = await future
        except (NodeStopped, ProposalDropped) as error:
            return ApiError(ErrorCode.UNAVAILABLE, f"{self.config.node_id}: {error}"), ""
        except TimeoutError:
            self._forget(request_id)
            return ApiError(ErrorCode.UNAVAILABLE, f"{self.config.node_id}: no answer in time"), ""
        except asyncio.CancelledError:
            # The caller went away (closed connection, deadline): a parked lease poll
            # must stop counting as its agent's heartbeat (LeaderDuties.polled), here
            # and, through its cancelled forward, on the leader.
            self._forget(request_id)
            forward = self._forwarding.get(request_id)
            if forward is not None:
                forward.cancel()
            raise
        finally:
            self._calls.pop(request_id, None)
            self._acting.pop(request_id, None)
        if isinstance(request, SubmitRequest) and not isinstance(outcome, ApiError):
            self.metrics.submit_seconds.observe(time.monotonic() - started)
        if isinstance(outcome, StatusResponse):
            outcome = self._with_transport(outcome)
        return outcome, served_by

    async def watch(self, request: WatchRequest) -> AsyncIterator[TaskEvent | ApiError]:
        """Task events as this node applies them, until the caller goes away."""
        request_id = next(self._ids)
        queue: asyncio.Queue[TaskEvent | ApiError] = asyncio.Queue(maxsize=WATCH_QUEUE_MAX)
        self._watches[request_id] = queue
        try:
            self._submit(request_id, request)
            while True:
                item = await queue.get()
                yield item
                if isinstance(item, ApiError):
                    return
        except (NodeStopped, ProposalDropped) as error:
            yield ApiError(ErrorCode.UNAVAILABLE, f"{self.config.node_id}: {error}")
        finally:
            self._watches.pop(request_id, None)
            self._forget(request_id)

    def _submit(self, request_id: int, request: ApiRequest) -> None:
        self.runtime.submit(
            lambda now_ms, wall_ms: self._request(request_id, request, now_ms, wall_ms)
        )

    def _request(
        self,
        request_id: int,
        request: ApiRequest,
        now_ms: int,
        wall_ms: int,
        forwarded: bool = False,
    ) -> None:
        self.metrics.inputs["api_call"].inc()
        self.core.request(request_id, request, now_ms, wall_ms, forwarded=forwarded)

    def _forget(self, request_id: int) -> None:
        with contextlib.suppress(NodeStopped, ProposalDropped):
            self.runtime.submit(lambda now_ms, wall_ms: self.core.forget(request_id))

    def _with_transport(self, status: StatusResponse) -> StatusResponse:
        """Status with what only the transport knows: connectivity and heartbeat RTT."""
        members = []
        for member in status.members:
            if member.id == self.config.node_id:
                members.append(member)
                continue
            rtt = self.runtime.rtt_ms(member.id)
            members.append(
                replace(
                    member,
                    reachable=member.reachable or self.runtime.connected(member.id),
                    rtt_ms=float(rtt or 0.0),
                )
            )
        return replace(status, members=tuple(members))

    # ------------------------------------------------- the runtime's Driver

    def step(self, message: Message, now_ms: int, wall_ms: int) -> None:
        kind = "append" if message.carries_data else "message"
        self.metrics.inputs[kind].inc()
        self.core.step(message, now_ms, wall_ms)

    def tick(self, now_ms: int, wall_ms: int) -> None:
        self.core.tick(now_ms, wall_ms)

    def next_deadline_ms(self) -> int:
        return self.core.next_deadline_ms()

    def has_ready(self) -> bool:
        return self.core.has_ready()

    def ready(self) -> NodeReady:
        return self.core.ready()

    def advance(self, ready: NodeReady) -> None:
        core = self.core
        core.advance(ready)
        for result in core.last_applied:
            if result.ok:
                self.metrics.applied(result)

    def take_deferred_hard_state(self) -> HardState | None:
        return self._core.take_deferred_hard_state() if self._core is not None else None

    def peer_addresses(self) -> dict[NodeId, str]:
        return self.core.peer_addresses()

    def deliver(self, ready: NodeReady) -> None:
        for reply in ready.replies:
            self._deliver(reply)
        for line in ready.logs:
            log.log(logging.WARNING if line.level == "WARNING" else logging.INFO, "%s", line.text)
        for forward in ready.forwards:
            task = asyncio.ensure_future(self._forward(forward))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            self._forwarding[forward.request_id] = task
            task.add_done_callback(functools.partial(self._forward_done, forward.request_id))
        self._connect_to_leader()

    def _forward_done(self, request_id: int, task: asyncio.Future[None]) -> None:
        if self._forwarding.get(request_id) is task:
            del self._forwarding[request_id]

    async def _forward(self, forward: Forward) -> None:
        """Carry a request the core forwards to the leader's API, and its answer back."""
        method = METHOD_OF_REQUEST[type(forward.request)]
        outcome: ApiResponse | ApiError
        acting = self._acting.get(forward.request_id)
        try:
            if acting is None:  # the caller timed out and went: nobody to act for
                raise _CallerGone
            stub = self._leader_stub(forward.leader, method)
            rpc = getattr(stub, method.value)
            answer = await rpc(
                request_to_pb(forward.request),
                timeout=forward.timeout_ms / 1000,
                metadata=(*self._forward_metadata, (FORWARDED_FOR_KEY, str(acting))),
            )
            outcome = response_from_pb(method, answer)
        except _CallerGone:
            outcome = ApiError(ErrorCode.UNAVAILABLE, "the caller went before it was forwarded")
        except grpc.aio.AioRpcError as error:
            trailing = {
                str(k): v if isinstance(v, str) else v.decode("utf-8", "replace")
                for k, v in (error.trailing_metadata() or ())
            }
            failure = error_from_status(error.code(), trailing, error.details() or "")
            if failure.code in (ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED):
                log.info("forward to %s failed: %s", forward.leader, failure.message)
            outcome = failure
        with contextlib.suppress(NodeStopped, ProposalDropped):
            self.runtime.submit(
                lambda now_ms, wall_ms: self._forwarded(
                    forward.request_id, outcome, now_ms, wall_ms
                )
            )

    def _forwarded(
        self, request_id: int, outcome: ApiResponse | ApiError, now_ms: int, wall_ms: int
    ) -> None:
        self.metrics.inputs["api_call"].inc()  # a forwarded call's answer, as the CPU model
        self.core.forwarded(request_id, outcome, now_ms, wall_ms)

    def _leader_stub(self, leader: str, method: Method) -> Any:
        channel = self._forward_channel(leader)
        if method in AGENT_METHODS:
            return api_pb2_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call]
        return api_pb2_grpc.ClientStub(channel)  # type: ignore[no-untyped-call]

    def _connect_to_leader(self) -> None:
        """Open the forwarding channel to a leader as soon as it is known, not at the
        first forward: a caller cut off from the leader (a one-way partition) hedges to
        this node, and its call would otherwise wait for TCP, TLS and HTTP/2 setup over a
        cross-cloud link (measured: +300 ms on the first submits after a cut)."""
        leader = self.core.leader
        if not leader or leader == self.config.node_id or leader in self._forward_channels:
            return
        if self.core.address_of(leader) or self.config.peers.get(leader):
            self._forward_channel(leader).get_state(try_to_connect=True)

    def _forward_channel(self, leader: str) -> grpc.aio.Channel:
        channel = self._forward_channels.get(leader)
        if channel is None:
            # The leader may have joined after this node's config file was written.
            address = self.core.address_of(leader) or self.config.peers.get(leader, "")
            channel = (
                grpc.aio.secure_channel(
                    address, self._channel_credentials, options=reconnect_options()
                )
                if self._channel_credentials is not None
                else grpc.aio.insecure_channel(address, options=reconnect_options())
            )
            self._forward_channels[leader] = channel
        return channel

    def _deliver(self, reply: Reply) -> None:
        outcome: ApiResponse | ApiError = (
            reply.error if reply.error is not None else _present(reply.response)
        )
        if reply.final:
            future = self._calls.get(reply.request_id)
            if future is not None and not future.done():
                future.set_result((outcome, reply.leader_hint))
            elif isinstance(outcome, ApiError) and reply.request_id in self._watches:
                # A watch refused (NOT_FOUND for known_only, or a busy node): its stream
                # ends with the error, rather than waiting silently for events.
                self._end_watch(reply.request_id, outcome)
            return
        queue = self._watches.get(reply.request_id)
        if queue is None:
            return
        assert isinstance(outcome, TaskEvent)
        try:
            queue.put_nowait(outcome)
        except asyncio.QueueFull:
            # The stream ends with a clear error; the caller watches again.
            self._watches.pop(reply.request_id, None)
            with contextlib.suppress(asyncio.QueueFull):
                queue.get_nowait()
                queue.put_nowait(
                    ApiError(ErrorCode.RESOURCE_EXHAUSTED, "watcher too slow: watch again")
                )
            self._forget(reply.request_id)  # queued: no input between ready and advance

    def _end_watch(self, request_id: int, error: ApiError) -> None:
        queue = self._watches.pop(request_id)
        if queue.full():
            queue.get_nowait()  # room for the error, which ends the stream
        queue.put_nowait(error)

    def serve_health(self, servicer: health.aio.HealthServicer) -> None:
        """The gRPC health service follows the core's `health()` from now on."""
        self._health = servicer

    def _observe(self) -> None:
        core = self._core
        if core is None:
            return
        now = self.runtime.now_ms()
        if now >= self._metrics_due_ms:
            self._metrics_due_ms = now + METRICS_EVERY_MS
            self.metrics.observe_node(core)
        serving, why = core.health()
        if self._health is not None and serving != self._serving:
            log.log(logging.INFO if serving else logging.WARNING, "health: %s", why)
            self._serving = serving
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            update = asyncio.ensure_future(self._health.set("", status))
            self._background.add(update)
            update.add_done_callback(self._background.discard)

    def _fail_all(self, error: Exception) -> None:
        failure = ApiError(ErrorCode.UNAVAILABLE, f"{self.config.node_id}: {error}")
        for future in self._calls.values():
            if not future.done():
                future.set_result((failure, ""))
        for queue in self._watches.values():
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(failure)


class _CallerGone(Exception):
    """A forward whose caller is no longer waiting."""


def _present(response: ApiResponse | None) -> ApiResponse:
    assert response is not None
    return response


# ---------------------------------------------------------------------- gRPC services


async def _abort(context: grpc.aio.ServicerContext, error: ApiError) -> NoReturn:
    # The details travel as a header: messages quote user input bounded already
    # (manifest.quote); this cut only keeps a message nobody bounded from breaking the
    # call instead of answering it.
    message = error.message
    if len(message) > ERROR_MESSAGE_CHARS_MAX:
        message = f"{message[:ERROR_MESSAGE_CHARS_MAX]}... ({len(message)} characters)"
    if error.code is not ErrorCode.NOT_LEADER:
        log.info("refused: %s %s", error.code, message)
    trailing = trailing_metadata(error)
    if trailing:
        context.set_trailing_metadata(trailing)
    await context.abort(status_of(error), message)
    raise AssertionError("abort returned")


async def _unary(plane: ControlPlane, method: Method, request: Any, context: Any) -> Any:
    api_request = request_from_pb(method, request)
    admission = plane.admit(method, api_request, context)
    if isinstance(admission, ApiError):
        await _abort(context, admission)
    outcome, served_by = await plane.call(api_request, admission)
    if isinstance(outcome, ApiError):
        await _abort(context, outcome)
    if served_by:  # forwarded: the caller may go to the leader directly next time
        context.set_trailing_metadata(((LEADER_ID_KEY, served_by),))
    return response_to_pb(outcome)


class ClientServicer(api_pb2_grpc.ClientServicer):
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    async def Submit(self, request: Any, context: Any) -> Any:
        return await _unary(self.plane, Method.SUBMIT, request, context)

    async def Get(self, request: Any, context: Any) -> Any:
        return await _unary(self.plane, Method.GET, request, context)

    async def List(self, request: Any, context: Any) -> Any:
        return await _unary(self.plane, Method.LIST, request, context)

    async def Cancel(self, request: Any, context: Any) -> Any:
        return await _unary(self.plane, Method.CANCEL, request, context)

    async def Status(self, request: Any, context: Any) -> Any:
        return await _unary(self.plane, Method.STATUS, request, context)

    async def AckExport(self, request: Any, context: Any) -> Any:
        return await _unary(self.plane, Method.ACK_EXPORT, request, context)

    async def ChangeMembership(self, request: Any, context: Any) -> Any:
        return await _unary(self.plane, Method.CHANGE_MEMBERSHIP, request, context)

    async def Watch(self, request: Any, context: Any) -> AsyncIterator[Any]:
        watch = request_from_pb(Method.WATCH, request)
        assert isinstance(watch, WatchRequest)
        admission = self.plane.admit(Method.WATCH, watch, context)
        if isinstance(admission, ApiError):
            await _abort(context, admission)
        async for item in self.plane.watch(watch):
            if isinstance(item, ApiError):
                await _abort(context, item)
            yield response_to_pb(item)


class AgentServicer(api_pb2_grpc.AgentServiceServicer):
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    async def Register(self, request: Any, context: Any) -> Any:
        return await _unary(self.plane, Method.REGISTER, request, context)

    async def Heartbeat(self, request: Any, context: Any) -> Any:
        return await _unary(self.plane, Method.HEARTBEAT, request, context)

    async def Lease(self, request: Any, context: Any) -> Any:
        return await _unary(self.plane, Method.LEASE, request, context)

    async def Report(self, request: Any, context: Any) -> Any:
        return await _unary(self.plane, Method.REPORT, request, context)


async def add_services(server: grpc.aio.Server, plane: ControlPlane) -> health.aio.HealthServicer:
    api_pb2_grpc.add_ClientServicer_to_server(ClientServicer(plane), server)  # type: ignore[no-untyped-call]
    api_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(plane), server)  # type: ignore[no-untyped-call]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # NOT_SERVING until the node is a working member (a leader known, caught up).
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    plane.serve_health(health_servicer)
    names = (
        api_pb2.DESCRIPTOR.services_by_name["Client"].full_name,
        api_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    return health_servicer
