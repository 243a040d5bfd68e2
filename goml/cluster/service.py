"""A control-plane node: the Raft node, the manifest it replicates, and the gRPC services
(client, agent, peer, health, reflection) on one server, plus Prometheus metrics.

Followers answer FAILED_PRECONDITION with the leader's id and address in trailing
metadata (NOT_LEADER); the client library follows them. Writes go through the log;
reads (get, list) are linearizable through ReadIndex on the leader; status and watch
are served by any node from what it has applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from goml.agent.tasks import TaskArgsError, validate_args
from goml.cluster.commands import (
    CancelTask,
    Command,
    CommandError,
    LeaseTasks,
    RegisterAgent,
    ReportResult,
    Resources,
    SubmitTasks,
    TaskSpec,
    canonical_json,
    encode_command,
)
from goml.cluster.config import NodeFileConfig
from goml.cluster.duties import DutiesConfig, LeaderDuties
from goml.cluster.manifest import (
    DEFAULT_LIMITS,
    AgentState,
    ApplyResult,
    Code,
    Manifest,
    ManifestLimits,
    Task,
    TaskState,
)
from goml.cluster.metrics import Metrics
from goml.proto import api_pb2, api_pb2_grpc
from goml.raft.node import NodeStopped, ProposalLost, ProposalOutcomeUnknown, RaftNode
from goml.raft.types import NotLeader, ProposalDropped

log = logging.getLogger(__name__)

LEADER_ID_KEY = "goml-leader-id"
LEADER_ADDRESS_KEY = "goml-leader-address"
WATCH_QUEUE_MAX = 1024
LEASE_WAIT_MS_MAX = 30_000
DUTIES_INTERVAL_S = 0.2


_CODE_TO_STATUS = {
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Code.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Code.STALE_EPOCH: grpc.StatusCode.FAILED_PRECONDITION,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
_STATE_TO_PB = {
    TaskState.PENDING: api_pb2.PENDING,
    TaskState.LEASED: api_pb2.LEASED,
    TaskState.RUNNING: api_pb2.RUNNING,
    TaskState.SUCCEEDED: api_pb2.SUCCEEDED,
    TaskState.DEAD: api_pb2.DEAD,
    TaskState.CANCELLED: api_pb2.CANCELLED,
}
_PB_TO_STATE = {v: k for k, v in _STATE_TO_PB.items()}


def wall_ms() -> int:
    """The leader stamps wall-clock time into commands; apply never reads a clock."""
    return time.time_ns() // 1_000_000


class ManifestMachine:
    """The Raft StateMachine: the manifest, plus listeners told of every applied change."""

    def __init__(self, limits: ManifestLimits) -> None:
        self.manifest = Manifest(limits)
        self._limits = limits
        self.listeners: list[Callable[[ApplyResult], None]] = []

    def apply(self, index: int, data: bytes) -> ApplyResult:
        result = self.manifest.apply(index, data)
        for listener in list(self.listeners):
            listener(result)
        return result

    def snapshot(self) -> bytes:
        return self.manifest.snapshot()

    def restore(self, data: bytes) -> None:
        self.manifest = Manifest.restore(data)


def task_to_pb(task: Task) -> api_pb2.Task:
    return api_pb2.Task(
        id=task.id,
        spec=api_pb2.TaskSpec(
            function=task.function,
            args_json=task.args_json,
            resources=resources_to_pb(task.resources),
            priority=task.priority,
            max_attempts=task.max_attempts,
            timeout_ms=task.timeout_ms,
            idempotency_key=task.idempotency_key,
            cloud=task.cloud or "",
            region=task.region or "",
        ),
        state=_STATE_TO_PB[task.state],
        attempts=task.attempts,
        agent_id=task.lease.agent_id if task.lease else "",
        epoch=task.epoch,
        result_json=task.result_json or "",
        error=task.error or "",
        submitted_ms=task.submitted_ms,
        finished_ms=task.finished_ms or 0,
        lease_deadline_ms=task.lease.deadline_ms if task.lease else 0,
    )


def resources_to_pb(resources: Resources) -> api_pb2.Resources:
    return api_pb2.Resources(cpu=resources.cpu, memory_mb=resources.memory_mb, gpu=resources.gpu)


def resources_from_pb(resources: api_pb2.Resources) -> Resources:
    return Resources(cpu=resources.cpu, memory_mb=resources.memory_mb, gpu=resources.gpu)


class _Abort(Exception):
    def __init__(
        self, code: grpc.StatusCode, message: str, trailing: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailing = trailing


@dataclass
class ControlPlane:
    """Everything one node serves. `raft` is started and stopped by the daemon."""

    config: NodeFileConfig
    raft: RaftNode
    machine: ManifestMachine
    token: str
    metrics: Metrics

    def __post_init__(self) -> None:
        d = self.config.duties
        self.duties = LeaderDuties(
            DutiesConfig(d.agent_timeout_ms, d.election_grace_ms, d.lease_ms, d.renew_before_ms)
        )
        self._was_leader = False
        self._pending_changed = asyncio.Event()
        self.machine.listeners.append(self._on_applied)
        self._watchers: list[tuple[frozenset[str], asyncio.Queue[tuple[int, Task]]]] = []
        self._duties_task: asyncio.Task[None] | None = None

    # --------------------------------------------------------------- plumbing

    @property
    def manifest(self) -> Manifest:
        return self.machine.manifest

    def check_token(self, metadata: tuple[tuple[str, Any], ...] | None) -> None:
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str):
                presented = value.removeprefix("Bearer ").strip()
                if hmac.compare_digest(presented.encode(), self.token.encode()):
                    return
                raise _Abort(grpc.StatusCode.UNAUTHENTICATED, "wrong token")
        raise _Abort(
            grpc.StatusCode.UNAUTHENTICATED, "missing token: send 'authorization: Bearer <token>'"
        )

    def require_leader(self) -> None:
        if self.raft.is_leader:
            return
        leader = self.raft.leader
        address = self.config.peers.get(leader, "") if leader else ""
        raise _Abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"NOT_LEADER: {self.config.node_id} is not the leader (leader: {leader or 'unknown'})",
            ((LEADER_ID_KEY, leader), (LEADER_ADDRESS_KEY, address)),
        )

    async def propose(self, command: Command) -> ApplyResult:
        try:
            data = encode_command(command)
        except CommandError as error:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        # RaftNode.propose raises ValueError beyond its size limit, which gRPC turned into
        # UNKNOWN "Unexpected ValueError" (e.g. a batch of tasks each under args_bytes_max).
        limit = min(
            self.raft.config.proposal_size_bytes_max, self.manifest.limits.command_bytes_max
        )
        if len(data) > limit:
            hint = ": split the batch" if isinstance(command, SubmitTasks) else ""
            raise _Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{type(command).__name__} is {len(data)} bytes encoded; "
                f"limit {limit} bytes per proposal{hint}",
            )
        timeout_s = self.config.request_timeout_s
        try:
            result = await self.raft.propose(data, timeout_s)
        except NotLeader:
            self.require_leader()
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "leadership changed; retry") from None
        except (
            ProposalLost,
            ProposalOutcomeUnknown,
            ProposalDropped,
            TimeoutError,
            NodeStopped,
        ) as error:
            # The client retries with the same idempotency key: safe whatever happened.
            raise _Abort(grpc.StatusCode.UNAVAILABLE, f"not committed: {error!r}; retry") from None
        assert isinstance(result, ApplyResult)
        return result

    @staticmethod
    def refuse_unless_ok(result: ApplyResult) -> None:
        if not result.ok:
            raise _Abort(_CODE_TO_STATUS.get(result.code, grpc.StatusCode.UNKNOWN), result.message)

    async def linearizable(self) -> None:
        self.require_leader()
        try:
            await self.raft.read_index(self.config.request_timeout_s)
        except (TimeoutError, NodeStopped, NotLeader, ProposalDropped) as error:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, f"read not confirmed: {error!r}") from None

    def _on_applied(self, result: ApplyResult) -> None:
        if result.ok:
            self.metrics.applied(result)
        if not result.task_ids:
            return
        self._pending_changed.set()
        for task_ids, queue in list(self._watchers):
            for task_id in result.task_ids:
                if task_ids and task_id not in task_ids:
                    continue
                task = self.manifest.get_task(task_id)
                if task is None:
                    continue
                # On overflow the stream notices and ends; the client watches again.
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait((result.index, task))

    # ----------------------------------------------------------------- duties

    def start_duties(self) -> None:
        self._duties_task = asyncio.create_task(self._run_duties(), name="leader-duties")

    async def stop_duties(self) -> None:
        if self._duties_task is not None:
            self._duties_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._duties_task

    async def _run_duties(self) -> None:
        while True:
            await asyncio.sleep(DUTIES_INTERVAL_S)  # a periodic timer, not synchronisation
            self.metrics.observe_node(self.raft, self.manifest)
            leader = self.raft.is_leader
            if leader and not self._was_leader:
                self.duties.became_leader(wall_ms())
            elif not leader and self._was_leader:
                self.duties.lost_leadership()
            self._was_leader = leader
            if not leader:
                continue
            for command in self.duties.due(self.manifest, wall_ms()):
                try:
                    result = await self.propose(command)
                except _Abort as error:
                    log.warning(
                        "leader duty %s not committed: %s", type(command).__name__, error.message
                    )
                    break
                if not result.ok:
                    log.info("leader duty %s refused: %s", type(command).__name__, result.message)

    # ------------------------------------------------------------- operations

    async def submit(self, request: api_pb2.SubmitRequest) -> api_pb2.SubmitResponse:
        self.require_leader()
        if not request.tasks:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "empty submit: give at least one task")
        specs = []
        for position, spec in enumerate(request.tasks):
            where = f"tasks[{position}]"
            if not spec.idempotency_key:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{where}.idempotency_key: required")
            args_json = spec.args_json or "{}"
            # The limit applies to what the client sent: the manifest only sees the
            # canonical form, so whitespace padding would otherwise slip past it.
            args_bytes, args_limit = len(args_json.encode()), self.manifest.limits.args_bytes_max
            if args_bytes > args_limit:
                raise _Abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{where}: args_json is {args_bytes} bytes; limit args_bytes_max={args_limit}",
                )
            try:
                validate_args(spec.function, args_json)
                # Logged canonical (as every replica stores it): no padding in the log.
                args_json = canonical_json(args_json, f"{where}.args_json")
            except (TaskArgsError, CommandError) as error:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: {error}") from None
            specs.append(
                TaskSpec(
                    idempotency_key=spec.idempotency_key,
                    function=spec.function,
                    args_json=args_json,
                    resources=resources_from_pb(spec.resources),
                    priority=spec.priority,
                    max_attempts=spec.max_attempts or 3,
                    timeout_ms=spec.timeout_ms or 60_000,
                    cloud=spec.cloud or None,
                    region=spec.region or None,
                )
            )
        started = time.monotonic()
        result = await self.propose(SubmitTasks(wall_ms(), tuple(specs)))
        self.refuse_unless_ok(result)
        self.metrics.submit_seconds.observe(time.monotonic() - started)
        return api_pb2.SubmitResponse(task_ids=list(result.task_ids), raft_index=result.index)

    async def get(self, request: api_pb2.GetRequest) -> api_pb2.Task:
        await self.linearizable()
        task = self.manifest.get_task(request.task_id)
        if task is None:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"no task {request.task_id!r}")
        return task_to_pb(task)

    async def list(self, request: api_pb2.ListRequest) -> api_pb2.ListResponse:
        await self.linearizable()
        limit = min(request.limit or 1000, 10_000)
        tasks = self.manifest.list_tasks(
            limit=limit,
            state=_PB_TO_STATE.get(request.state) if request.state else None,
            function=request.function or None,
            agent_id=request.agent_id or None,
        )
        return api_pb2.ListResponse(tasks=[task_to_pb(t) for t in tasks])

    async def cancel(self, request: api_pb2.CancelRequest) -> api_pb2.CancelResponse:
        self.require_leader()
        result = await self.propose(CancelTask(wall_ms(), request.task_id))
        self.refuse_unless_ok(result)
        task = self.manifest.get_task(request.task_id)
        assert task is not None
        return api_pb2.CancelResponse(task=task_to_pb(task))

    async def watch(self, request: api_pb2.WatchRequest) -> AsyncIterator[api_pb2.TaskEvent]:
        wanted = frozenset(request.task_ids)
        queue: asyncio.Queue[tuple[int, Task]] = asyncio.Queue(maxsize=WATCH_QUEUE_MAX)
        entry = (wanted, queue)
        self._watchers.append(entry)
        try:
            applied = self.manifest.applied_index
            for task_id in sorted(wanted):
                task = self.manifest.get_task(task_id)
                if task is not None:
                    yield api_pb2.TaskEvent(task=task_to_pb(task), raft_index=applied)
            while True:
                if queue.full():
                    raise _Abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED, "watcher too slow: watch again"
                    )
                index, task = await queue.get()
                yield api_pb2.TaskEvent(task=task_to_pb(task), raft_index=index)
        finally:
            self._watchers.remove(entry)

    def status(self) -> api_pb2.StatusResponse:
        raft_status = self.raft.status()
        leader = self.raft.leader
        members = []
        peers_status = raft_status.get("peers", {})
        assert isinstance(peers_status, dict)
        for member_id, address in sorted(self.config.peers.items()):
            if member_id == self.config.node_id:
                members.append(
                    api_pb2.Member(
                        id=member_id,
                        address=address,
                        role=self.raft.role.value,
                        term=self.raft.term,
                        commit_index=self.raft.commit,
                        applied_index=self.raft.applied,
                        reachable=True,
                    )
                )
            else:
                peer = peers_status.get(member_id, {})
                members.append(
                    api_pb2.Member(
                        id=member_id,
                        address=address,
                        role="leader" if member_id == leader else "follower",
                        commit_index=int(self.raft.match_index(member_id)),
                        reachable=bool(peer.get("connected", False)),
                        rtt_ms=float(peer.get("rtt_ms") or 0.0),
                    )
                )
        agents = []
        now = wall_ms()
        for agent in self.manifest.list_agents():
            seen = self.duties.last_seen_ms(agent.id)
            agents.append(
                api_pb2.Agent(
                    id=agent.id,
                    cloud=agent.cloud,
                    region=agent.region,
                    arch=agent.arch,
                    capacity=resources_to_pb(agent.capacity),
                    state=agent.state.value,
                    last_heartbeat_age_ms=now - seen if seen is not None else -1,
                )
            )
        return api_pb2.StatusResponse(
            node_id=self.config.node_id,
            leader_id=leader,
            leader_address=self.config.peers.get(leader, "") if leader else "",
            term=self.raft.term,
            commit_index=self.raft.commit,
            members=members,
            agents=agents,
            tasks_by_state={str(k): v for k, v in self.manifest.counts_by_state().items()},
        )

    # ------------------------------------------------------------------ agent

    async def register(self, request: api_pb2.RegisterRequest) -> api_pb2.RegisterResponse:
        self.require_leader()
        result = await self.propose(
            RegisterAgent(
                wall_ms(),
                request.agent_id,
                request.cloud,
                request.region,
                request.arch,
                resources_from_pb(request.capacity),
            )
        )
        self.refuse_unless_ok(result)
        if self.duties.leading_since_ms is not None:
            self.duties.heartbeat(request.agent_id, None, (), wall_ms())
        return api_pb2.RegisterResponse(
            heartbeat_interval_ms=self.config.duties.agent_timeout_ms // 5
        )

    async def heartbeat(self, request: api_pb2.HeartbeatRequest) -> api_pb2.HeartbeatResponse:
        self.require_leader()
        agent = self.manifest.get_agent(request.agent_id)
        known = agent is not None and agent.state is AgentState.ALIVE
        if known and self.duties.leading_since_ms is not None:
            self.duties.heartbeat(
                request.agent_id,
                resources_from_pb(request.free),
                tuple(sorted(request.running_task_ids)),
                wall_ms(),
            )
        return api_pb2.HeartbeatResponse(known=known)

    async def lease(self, request: api_pb2.LeaseRequest) -> api_pb2.LeaseResponse:
        self.require_leader()
        wait_s = min(max(request.wait_ms, 0), LEASE_WAIT_MS_MAX) / 1000
        deadline = time.monotonic() + wait_s
        while True:
            self._pending_changed.clear()
            result = await self.propose(
                LeaseTasks(
                    wall_ms(),
                    request.agent_id,
                    self.config.duties.lease_ms,
                    max(1, min(request.max_tasks or 1, DEFAULT_LIMITS.lease_tasks_max)),
                    resources_from_pb(request.free),
                )
            )
            self.refuse_unless_ok(result)
            remaining = deadline - time.monotonic()
            if result.tasks or remaining <= 0:
                break
            # Long poll: wait for the manifest to change (a submit, a requeue) or the end.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._pending_changed.wait()
            self.require_leader()
        return api_pb2.LeaseResponse(
            tasks=[
                api_pb2.LeasedTask(
                    task_id=t.id,
                    function=t.function,
                    args_json=t.args_json,
                    resources=resources_to_pb(t.resources),
                    epoch=t.epoch,
                    timeout_ms=t.timeout_ms,
                    lease_deadline_ms=t.lease.deadline_ms if t.lease else 0,
                )
                for t in result.tasks
            ]
        )

    async def report(self, request: api_pb2.ReportRequest) -> api_pb2.ReportResponse:
        self.require_leader()
        result = await self.propose(
            ReportResult(
                wall_ms(),
                request.agent_id,
                request.task_id,
                request.epoch,
                request.success,
                request.result_json if request.success else None,
                None if request.success else (request.error or "failed"),
            )
        )
        if result.ok:
            return api_pb2.ReportResponse(recorded=True)
        if result.code in (Code.STALE_EPOCH, Code.NOT_FOUND, Code.FAILED_PRECONDITION):
            # Fenced: a newer attempt owns the task (or it ended). The agent drops it.
            return api_pb2.ReportResponse(recorded=False, reason=result.message)
        self.refuse_unless_ok(result)
        raise AssertionError("unreachable")


async def _guard(
    plane: ControlPlane, context: grpc.aio.ServicerContext, body: Callable[[], Awaitable[Any]]
) -> Any:
    try:
        plane.check_token(context.invocation_metadata())
        return await body()
    except _Abort as error:
        await _abort(context, error)


async def _abort(context: grpc.aio.ServicerContext, error: _Abort) -> NoReturn:
    if error.code is not grpc.StatusCode.FAILED_PRECONDITION:
        log.info("refused: %s %s", error.code.name, error.message)
    if error.trailing:
        context.set_trailing_metadata(error.trailing)
    await context.abort(error.code, error.message)
    raise AssertionError("abort returned")


class ClientServicer(api_pb2_grpc.ClientServicer):
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    async def Submit(self, request: Any, context: Any) -> Any:
        return await _guard(self.plane, context, lambda: self.plane.submit(request))

    async def Get(self, request: Any, context: Any) -> Any:
        return await _guard(self.plane, context, lambda: self.plane.get(request))

    async def List(self, request: Any, context: Any) -> Any:
        return await _guard(self.plane, context, lambda: self.plane.list(request))

    async def Cancel(self, request: Any, context: Any) -> Any:
        return await _guard(self.plane, context, lambda: self.plane.cancel(request))

    async def Status(self, request: Any, context: Any) -> Any:
        async def body() -> api_pb2.StatusResponse:
            if not request.local and self.plane.raft.leader:
                self.plane.require_leader()  # the leader's view has every member's lag
            return self.plane.status()

        return await _guard(self.plane, context, body)

    async def Watch(self, request: Any, context: Any) -> AsyncIterator[Any]:
        try:
            self.plane.check_token(context.invocation_metadata())
            async for event in self.plane.watch(request):
                yield event
        except _Abort as error:
            await _abort(context, error)


class AgentServicer(api_pb2_grpc.AgentServiceServicer):
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    async def Register(self, request: Any, context: Any) -> Any:
        return await _guard(self.plane, context, lambda: self.plane.register(request))

    async def Heartbeat(self, request: Any, context: Any) -> Any:
        return await _guard(self.plane, context, lambda: self.plane.heartbeat(request))

    async def Lease(self, request: Any, context: Any) -> Any:
        return await _guard(self.plane, context, lambda: self.plane.lease(request))

    async def Report(self, request: Any, context: Any) -> Any:
        return await _guard(self.plane, context, lambda: self.plane.report(request))


async def add_services(server: grpc.aio.Server, plane: ControlPlane) -> health.aio.HealthServicer:
    api_pb2_grpc.add_ClientServicer_to_server(ClientServicer(plane), server)  # type: ignore[no-untyped-call]
    api_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(plane), server)  # type: ignore[no-untyped-call]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    names = (
        api_pb2.DESCRIPTOR.services_by_name["Client"].full_name,
        api_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    return health_servicer
