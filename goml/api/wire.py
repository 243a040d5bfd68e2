"""Conversions between the API values (`goml.api.types`) and protobuf (`api_pb2`), both
directions and both services, plus the one mapping between API error codes and gRPC
status codes. Imports protobuf and gRPC's status codes, nothing that opens a socket.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.protobuf.message import Message

from goml.api.types import (
    LEADER_ADDRESS_KEY,
    LEADER_ID_KEY,
    AckExportRequest,
    AckExportResponse,
    AgentView,
    ApiError,
    ApiRequest,
    ApiResponse,
    CancelRequest,
    CancelResponse,
    ErrorCode,
    GetRequest,
    GetResponse,
    HeartbeatRequest,
    HeartbeatResponse,
    LeasedTask,
    LeaseRequest,
    LeaseResponse,
    ListRequest,
    ListResponse,
    MembershipRequest,
    MembershipResponse,
    MemberView,
    Method,
    RegisterRequest,
    RegisterResponse,
    ReportRequest,
    ReportResponse,
    Resources,
    ResultAnswer,
    StatusRequest,
    StatusResponse,
    SubmitRequest,
    SubmitResponse,
    TaskEvent,
    TaskRequest,
    TaskResult,
    TaskState,
    TaskView,
    WatchRequest,
)
from goml.proto import api_pb2

__all__ = [
    "error_from_status",
    "request_from_pb",
    "request_to_pb",
    "resources_from_pb",
    "resources_to_pb",
    "response_from_pb",
    "response_to_pb",
    "status_of",
    "task_from_pb",
    "task_to_pb",
    "trailing_metadata",
]

STATE_TO_PB = {
    TaskState.PENDING: api_pb2.PENDING,
    TaskState.LEASED: api_pb2.LEASED,
    TaskState.RUNNING: api_pb2.RUNNING,
    TaskState.SUCCEEDED: api_pb2.SUCCEEDED,
    TaskState.DEAD: api_pb2.DEAD,
    TaskState.CANCELLED: api_pb2.CANCELLED,
}
PB_TO_STATE = {v: k for k, v in STATE_TO_PB.items()}

# NOT_LEADER travels as FAILED_PRECONDITION with the leader in trailing metadata: a
# FAILED_PRECONDITION *with* the goml-leader-id key is NOT_LEADER (see error_from_status).
_CODE_TO_STATUS = {
    ErrorCode.NOT_LEADER: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
}
assert set(_CODE_TO_STATUS) == set(ErrorCode)
_STATUS_TO_CODE = {
    status: code for code, status in _CODE_TO_STATUS.items() if code is not ErrorCode.NOT_LEADER
}


def status_of(error: ApiError) -> grpc.StatusCode:
    return _CODE_TO_STATUS[error.code]


def trailing_metadata(error: ApiError) -> tuple[tuple[str, str], ...]:
    if error.code is not ErrorCode.NOT_LEADER:
        return ()
    return ((LEADER_ID_KEY, error.leader_id), (LEADER_ADDRESS_KEY, error.leader_address))


def error_from_status(code: grpc.StatusCode, trailing: Mapping[str, str], detail: str) -> ApiError:
    """A gRPC failure as an API error. Codes the server never sends (CANCELLED, UNKNOWN,
    INTERNAL, ABORTED, DATA_LOSS, UNIMPLEMENTED, OUT_OF_RANGE) count as UNAVAILABLE or
    INVALID_ARGUMENT: try elsewhere, or give up on this request."""
    message = detail or code.name
    if code is grpc.StatusCode.FAILED_PRECONDITION and LEADER_ID_KEY in trailing:
        return ApiError(
            ErrorCode.NOT_LEADER,
            message,
            trailing.get(LEADER_ID_KEY, ""),
            trailing.get(LEADER_ADDRESS_KEY, ""),
        )
    if code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.OUT_OF_RANGE):
        return ApiError(ErrorCode.INVALID_ARGUMENT, message)
    return ApiError(_STATUS_TO_CODE.get(code, ErrorCode.UNAVAILABLE), message)


# --------------------------------------------------------------------------------- values


def resources_to_pb(r: Resources) -> api_pb2.Resources:
    return api_pb2.Resources(cpu=r.cpu, memory_mb=r.memory_mb, gpu=r.gpu)


def resources_from_pb(pb: api_pb2.Resources) -> Resources:
    return Resources(cpu=float(pb.cpu), memory_mb=int(pb.memory_mb), gpu=int(pb.gpu))


def _leased_to_pb(t: LeasedTask) -> api_pb2.LeasedTask:
    return api_pb2.LeasedTask(
        task_id=t.task_id,
        function=t.function,
        args_json=t.args_json,
        resources=resources_to_pb(t.resources),
        epoch=t.epoch,
        timeout_ms=t.timeout_ms,
        lease_deadline_ms=t.lease_deadline_ms,
        isolated=t.isolated,
    )


def _leased_from_pb(pb: api_pb2.LeasedTask) -> LeasedTask:
    return LeasedTask(
        task_id=pb.task_id,
        function=pb.function,
        args_json=pb.args_json,
        resources=resources_from_pb(pb.resources),
        epoch=int(pb.epoch),
        timeout_ms=int(pb.timeout_ms),
        lease_deadline_ms=int(pb.lease_deadline_ms),
        isolated=bool(pb.isolated),
    )


def _task_request_to_pb(t: TaskRequest) -> api_pb2.TaskSpec:
    return api_pb2.TaskSpec(
        function=t.function,
        args_json=t.args_json,
        resources=resources_to_pb(t.resources),
        priority=t.priority,
        max_attempts=t.max_attempts,
        timeout_ms=t.timeout_ms,
        idempotency_key=t.idempotency_key,
        cloud=t.cloud,
        region=t.region,
        isolated=t.isolated,
    )


def _task_request_from_pb(pb: api_pb2.TaskSpec) -> TaskRequest:
    return TaskRequest(
        function=pb.function,
        args_json=pb.args_json,
        resources=resources_from_pb(pb.resources),
        priority=int(pb.priority),
        max_attempts=int(pb.max_attempts),
        timeout_ms=int(pb.timeout_ms),
        idempotency_key=pb.idempotency_key,
        cloud=pb.cloud,
        region=pb.region,
        isolated=bool(pb.isolated),
    )


def task_to_pb(t: TaskView) -> api_pb2.Task:
    return api_pb2.Task(
        id=t.id,
        spec=api_pb2.TaskSpec(
            function=t.function,
            args_json=t.args_json,
            resources=resources_to_pb(t.resources),
            priority=t.priority,
            max_attempts=t.max_attempts,
            timeout_ms=t.timeout_ms,
            idempotency_key=t.idempotency_key,
            cloud=t.cloud,
            region=t.region,
            isolated=t.isolated,
        ),
        state=STATE_TO_PB[t.state],
        attempts=t.attempts,
        agent_id=t.agent_id,
        epoch=t.epoch,
        result_json=t.result_json,
        error=t.error,
        submitted_ms=t.submitted_ms,
        finished_ms=t.finished_ms,
        lease_deadline_ms=t.lease_deadline_ms,
        finished_seq=t.finished_seq,
    )


def task_from_pb(pb: api_pb2.Task) -> TaskView:
    spec = pb.spec
    return TaskView(
        id=pb.id,
        function=spec.function,
        args_json=spec.args_json,
        resources=resources_from_pb(spec.resources),
        priority=int(spec.priority),
        max_attempts=int(spec.max_attempts),
        timeout_ms=int(spec.timeout_ms),
        idempotency_key=spec.idempotency_key,
        cloud=spec.cloud,
        region=spec.region,
        isolated=bool(spec.isolated),
        state=PB_TO_STATE.get(pb.state, TaskState.PENDING),
        attempts=int(pb.attempts),
        agent_id=pb.agent_id,
        epoch=int(pb.epoch),
        result_json=pb.result_json,
        error=pb.error,
        submitted_ms=int(pb.submitted_ms),
        finished_ms=int(pb.finished_ms),
        lease_deadline_ms=int(pb.lease_deadline_ms),
        finished_seq=int(pb.finished_seq),
    )


def _status_to_pb(s: StatusResponse) -> api_pb2.StatusResponse:
    return api_pb2.StatusResponse(
        node_id=s.node_id,
        leader_id=s.leader_id,
        leader_address=s.leader_address,
        term=s.term,
        commit_index=s.commit_index,
        members=[
            api_pb2.Member(
                id=m.id,
                address=m.address,
                role=m.role,
                term=m.term,
                commit_index=m.commit_index,
                applied_index=m.applied_index,
                reachable=m.reachable,
                rtt_ms=m.rtt_ms,
                learner=not m.voter,
                caught_up=m.caught_up,
            )
            for m in s.members
        ],
        agents=[
            api_pb2.Agent(
                id=a.id,
                cloud=a.cloud,
                region=a.region,
                arch=a.arch,
                capacity=resources_to_pb(a.capacity),
                state=a.state,
                last_heartbeat_age_ms=a.last_heartbeat_age_ms,
            )
            for a in s.agents
        ],
        tasks_by_state=dict(s.tasks_by_state),
        voters=list(s.voters),
        learners=list(s.learners),
        membership_index=s.membership_index,
    )


def _status_from_pb(pb: api_pb2.StatusResponse) -> StatusResponse:
    return StatusResponse(
        node_id=pb.node_id,
        leader_id=pb.leader_id,
        leader_address=pb.leader_address,
        term=int(pb.term),
        commit_index=int(pb.commit_index),
        members=tuple(
            MemberView(
                m.id,
                m.address,
                m.role,
                int(m.term),
                int(m.commit_index),
                int(m.applied_index),
                bool(m.reachable),
                float(m.rtt_ms),
                not m.learner,
                bool(m.caught_up),
            )
            for m in pb.members
        ),
        agents=tuple(
            AgentView(
                a.id,
                a.cloud,
                a.region,
                a.arch,
                resources_from_pb(a.capacity),
                a.state,
                int(a.last_heartbeat_age_ms),
            )
            for a in pb.agents
        ),
        tasks_by_state=tuple(sorted((k, int(v)) for k, v in pb.tasks_by_state.items())),
        voters=tuple(pb.voters),
        learners=tuple(pb.learners),
        membership_index=int(pb.membership_index),
    )


# ------------------------------------------------------------------------------ requests


def request_to_pb(request: ApiRequest) -> Message:
    match request:
        case RegisterRequest():
            return api_pb2.RegisterRequest(
                agent_id=request.agent_id,
                cloud=request.cloud,
                region=request.region,
                arch=request.arch,
                capacity=resources_to_pb(request.capacity),
                lease_depth=request.lease_depth,
            )
        case HeartbeatRequest():
            return api_pb2.HeartbeatRequest(
                agent_id=request.agent_id,
                free=resources_to_pb(request.free),
                running_task_ids=list(request.running_task_ids),
                queued_task_ids=list(request.queued_task_ids),
            )
        case LeaseRequest():
            return api_pb2.LeaseRequest(
                agent_id=request.agent_id,
                free=resources_to_pb(request.free),
                max_tasks=request.max_tasks,
                wait_ms=request.wait_ms,
            )
        case ReportRequest():
            return api_pb2.ReportRequest(
                agent_id=request.agent_id,
                task_id=request.task_id,
                epoch=request.epoch,
                success=request.success,
                result_json=request.result_json,
                error=request.error,
                lease_into_answer=request.lease_into_answer,
                more=[
                    api_pb2.TaskResult(
                        task_id=r.task_id,
                        epoch=r.epoch,
                        success=r.success,
                        result_json=r.result_json,
                        error=r.error,
                    )
                    for r in request.more
                ],
            )
        case SubmitRequest():
            return api_pb2.SubmitRequest(tasks=[_task_request_to_pb(t) for t in request.tasks])
        case GetRequest():
            return api_pb2.GetRequest(task_id=request.task_id)
        case ListRequest():
            return api_pb2.ListRequest(
                state=(
                    STATE_TO_PB[request.state]
                    if request.state is not None
                    else api_pb2.TASK_STATE_UNSPECIFIED
                ),
                function=request.function,
                agent_id=request.agent_id,
                limit=request.limit,
                page_token=request.page_token,
                newest_first=request.newest_first,
                finished=request.finished,
                finished_after_seq=request.finished_after_seq,
            )
        case CancelRequest():
            return api_pb2.CancelRequest(task_id=request.task_id)
        case StatusRequest():
            return api_pb2.StatusRequest(local=request.local)
        case WatchRequest():
            return api_pb2.WatchRequest(
                task_ids=list(request.task_ids), known_only=request.known_only
            )
        case AckExportRequest():
            return api_pb2.AckExportRequest(through_seq=request.through_seq)
        case MembershipRequest():
            return api_pb2.MembershipChangeRequest(
                kind=request.kind,
                node_id=request.node_id,
                address=request.address,
                wait_ms=request.wait_ms,
            )


def request_from_pb(method: Method, pb: Message) -> ApiRequest:
    match method:
        case Method.REGISTER:
            assert isinstance(pb, api_pb2.RegisterRequest)
            return RegisterRequest(
                pb.agent_id,
                pb.cloud,
                pb.region,
                pb.arch,
                resources_from_pb(pb.capacity),
                max(1, int(pb.lease_depth)),
            )
        case Method.HEARTBEAT:
            assert isinstance(pb, api_pb2.HeartbeatRequest)
            return HeartbeatRequest(
                pb.agent_id,
                resources_from_pb(pb.free),
                tuple(pb.running_task_ids),
                tuple(pb.queued_task_ids),
            )
        case Method.LEASE:
            assert isinstance(pb, api_pb2.LeaseRequest)
            return LeaseRequest(
                pb.agent_id, resources_from_pb(pb.free), int(pb.max_tasks), int(pb.wait_ms)
            )
        case Method.REPORT:
            assert isinstance(pb, api_pb2.ReportRequest)
            return ReportRequest(
                pb.agent_id,
                pb.task_id,
                int(pb.epoch),
                pb.success,
                pb.result_json,
                pb.error,
                bool(pb.lease_into_answer),
                tuple(
                    TaskResult(r.task_id, int(r.epoch), r.success, r.result_json, r.error)
                    for r in pb.more
                ),
            )
        case Method.SUBMIT:
            assert isinstance(pb, api_pb2.SubmitRequest)
            return SubmitRequest(tuple(_task_request_from_pb(t) for t in pb.tasks))
        case Method.GET:
            assert isinstance(pb, api_pb2.GetRequest)
            return GetRequest(pb.task_id)
        case Method.LIST:
            assert isinstance(pb, api_pb2.ListRequest)
            return ListRequest(
                PB_TO_STATE.get(pb.state),
                pb.function,
                pb.agent_id,
                int(pb.limit),
                pb.page_token,
                bool(pb.newest_first),
                bool(pb.finished),
                int(pb.finished_after_seq),
            )
        case Method.CANCEL:
            assert isinstance(pb, api_pb2.CancelRequest)
            return CancelRequest(pb.task_id)
        case Method.STATUS:
            assert isinstance(pb, api_pb2.StatusRequest)
            return StatusRequest(bool(pb.local))
        case Method.WATCH:
            assert isinstance(pb, api_pb2.WatchRequest)
            return WatchRequest(tuple(pb.task_ids), bool(pb.known_only))
        case Method.ACK_EXPORT:
            assert isinstance(pb, api_pb2.AckExportRequest)
            return AckExportRequest(int(pb.through_seq))
        case Method.CHANGE_MEMBERSHIP:
            assert isinstance(pb, api_pb2.MembershipChangeRequest)
            return MembershipRequest(pb.kind, pb.node_id, pb.address, int(pb.wait_ms))


# ----------------------------------------------------------------------------- responses


def response_to_pb(response: ApiResponse) -> Message:
    match response:
        case RegisterResponse():
            return api_pb2.RegisterResponse(
                heartbeat_interval_ms=response.heartbeat_interval_ms,
                lease_poll_is_heartbeat=response.lease_poll_is_heartbeat,
                lease_depth=response.lease_depth,
            )
        case HeartbeatResponse():
            return api_pb2.HeartbeatResponse(
                known=response.known, revoked_task_ids=list(response.revoked_task_ids)
            )
        case LeaseResponse():
            return api_pb2.LeaseResponse(
                tasks=[_leased_to_pb(t) for t in response.tasks],
                lease_poll_is_heartbeat=response.lease_poll_is_heartbeat,
            )
        case ReportResponse():
            return api_pb2.ReportResponse(
                recorded=response.recorded,
                reason=response.reason,
                tasks=[_leased_to_pb(t) for t in response.tasks],
                more=[
                    api_pb2.ResultAnswer(recorded=a.recorded, reason=a.reason)
                    for a in response.more
                ],
            )
        case SubmitResponse():
            return api_pb2.SubmitResponse(
                task_ids=list(response.task_ids), raft_index=response.raft_index
            )
        case GetResponse():
            return task_to_pb(response.task)  # Get returns the Task itself
        case ListResponse():
            return api_pb2.ListResponse(
                tasks=[task_to_pb(t) for t in response.tasks],
                next_page_token=response.next_page_token,
                finished_seq_last=response.finished_seq_last,
                pruned_through_seq=response.pruned_through_seq,
                export_watermark_seq=response.export_watermark_seq,
                tasks_kept=response.tasks_kept,
                tasks_max=response.tasks_max,
            )
        case CancelResponse():
            return api_pb2.CancelResponse(task=task_to_pb(response.task))
        case StatusResponse():
            return _status_to_pb(response)
        case TaskEvent():
            return api_pb2.TaskEvent(task=task_to_pb(response.task), raft_index=response.raft_index)
        case AckExportResponse():
            return api_pb2.AckExportResponse(export_watermark_seq=response.export_watermark_seq)
        case MembershipResponse():
            return api_pb2.MembershipChangeResponse(
                index=response.index, voters=list(response.voters), learners=list(response.learners)
            )


def response_from_pb(method: Method, pb: Message) -> ApiResponse:
    match method:
        case Method.REGISTER:
            assert isinstance(pb, api_pb2.RegisterResponse)
            return RegisterResponse(
                int(pb.heartbeat_interval_ms),
                bool(pb.lease_poll_is_heartbeat),
                max(1, int(pb.lease_depth)),
            )
        case Method.HEARTBEAT:
            assert isinstance(pb, api_pb2.HeartbeatResponse)
            return HeartbeatResponse(bool(pb.known), tuple(pb.revoked_task_ids))
        case Method.LEASE:
            assert isinstance(pb, api_pb2.LeaseResponse)
            return LeaseResponse(
                tuple(_leased_from_pb(t) for t in pb.tasks), bool(pb.lease_poll_is_heartbeat)
            )
        case Method.REPORT:
            assert isinstance(pb, api_pb2.ReportResponse)
            return ReportResponse(
                bool(pb.recorded),
                pb.reason,
                tuple(_leased_from_pb(t) for t in pb.tasks),
                tuple(ResultAnswer(bool(a.recorded), a.reason) for a in pb.more),
            )
        case Method.SUBMIT:
            assert isinstance(pb, api_pb2.SubmitResponse)
            return SubmitResponse(tuple(pb.task_ids), int(pb.raft_index))
        case Method.GET:
            assert isinstance(pb, api_pb2.Task)
            return GetResponse(task_from_pb(pb))
        case Method.LIST:
            assert isinstance(pb, api_pb2.ListResponse)
            return ListResponse(
                tuple(task_from_pb(t) for t in pb.tasks),
                pb.next_page_token,
                int(pb.finished_seq_last),
                int(pb.pruned_through_seq),
                int(pb.export_watermark_seq),
                int(pb.tasks_kept),
                int(pb.tasks_max),
            )
        case Method.CANCEL:
            assert isinstance(pb, api_pb2.CancelResponse)
            return CancelResponse(task_from_pb(pb.task))
        case Method.STATUS:
            assert isinstance(pb, api_pb2.StatusResponse)
            return _status_from_pb(pb)
        case Method.WATCH:
            assert isinstance(pb, api_pb2.TaskEvent)
            return TaskEvent(task_from_pb(pb.task), int(pb.raft_index))
        case Method.ACK_EXPORT:
            assert isinstance(pb, api_pb2.AckExportResponse)
            return AckExportResponse(int(pb.export_watermark_seq))
        case Method.CHANGE_MEMBERSHIP:
            assert isinstance(pb, api_pb2.MembershipChangeResponse)
            return MembershipResponse(int(pb.index), tuple(pb.voters), tuple(pb.learners))
