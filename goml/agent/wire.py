"""Conversions between the agent core's dataclasses (`goml.agent.messages`) and `api_pb2`.

Both directions, so the control-plane server can use the same functions for its side of
`AgentService` (`request_from_pb`, `response_to_pb`). Imports protobuf, not gRPC.
"""

from __future__ import annotations

from google.protobuf.message import Message

from goml.agent.messages import (
    HeartbeatRequest,
    HeartbeatResponse,
    LeasedTask,
    LeaseRequest,
    LeaseResponse,
    Method,
    RegisterRequest,
    RegisterResponse,
    ReportRequest,
    ReportResponse,
    Request,
    Resources,
    Response,
)
from goml.proto import api_pb2

__all__ = [
    "request_from_pb",
    "request_to_pb",
    "resources_from_pb",
    "resources_to_pb",
    "response_from_pb",
    "response_to_pb",
]


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
    )


def request_to_pb(request: Request) -> Message:
    match request:
        case RegisterRequest():
            return api_pb2.RegisterRequest(
                agent_id=request.agent_id,
                cloud=request.cloud,
                region=request.region,
                arch=request.arch,
                capacity=resources_to_pb(request.capacity),
            )
        case HeartbeatRequest():
            return api_pb2.HeartbeatRequest(
                agent_id=request.agent_id,
                free=resources_to_pb(request.free),
                running_task_ids=list(request.running_task_ids),
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
            )


def request_from_pb(method: Method, pb: Message) -> Request:
    match method:
        case Method.REGISTER:
            assert isinstance(pb, api_pb2.RegisterRequest)
            return RegisterRequest(
                pb.agent_id, pb.cloud, pb.region, pb.arch, resources_from_pb(pb.capacity)
            )
        case Method.HEARTBEAT:
            assert isinstance(pb, api_pb2.HeartbeatRequest)
            return HeartbeatRequest(
                pb.agent_id, resources_from_pb(pb.free), tuple(pb.running_task_ids)
            )
        case Method.LEASE:
            assert isinstance(pb, api_pb2.LeaseRequest)
            return LeaseRequest(
                pb.agent_id, resources_from_pb(pb.free), int(pb.max_tasks), int(pb.wait_ms)
            )
        case Method.REPORT:
            assert isinstance(pb, api_pb2.ReportRequest)
            return ReportRequest(
                pb.agent_id, pb.task_id, int(pb.epoch), pb.success, pb.result_json, pb.error
            )


def response_to_pb(response: Response) -> Message:
    match response:
        case RegisterResponse():
            return api_pb2.RegisterResponse(heartbeat_interval_ms=response.heartbeat_interval_ms)
        case HeartbeatResponse():
            return api_pb2.HeartbeatResponse(known=response.known)
        case LeaseResponse():
            return api_pb2.LeaseResponse(tasks=[_leased_to_pb(t) for t in response.tasks])
        case ReportResponse():
            return api_pb2.ReportResponse(recorded=response.recorded, reason=response.reason)


def response_from_pb(method: Method, pb: Message) -> Response:
    match method:
        case Method.REGISTER:
            assert isinstance(pb, api_pb2.RegisterResponse)
            return RegisterResponse(int(pb.heartbeat_interval_ms))
        case Method.HEARTBEAT:
            assert isinstance(pb, api_pb2.HeartbeatResponse)
            return HeartbeatResponse(bool(pb.known))
        case Method.LEASE:
            assert isinstance(pb, api_pb2.LeaseResponse)
            return LeaseResponse(tuple(_leased_from_pb(t) for t in pb.tasks))
        case Method.REPORT:
            assert isinstance(pb, api_pb2.ReportResponse)
            return ReportResponse(bool(pb.recorded), pb.reason)
