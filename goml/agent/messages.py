"""Plain values the agent core exchanges with its runtimes: the agent API's requests and
responses as frozen dataclasses, mirroring `proto/goml/proto/api.proto` field for field.

The real runtime converts them to and from `api_pb2` (`goml.agent.runtime`); the simulator
passes them as they are, so it needs no gRPC. Standard library only (plus the shared
`Resources` value of the manifest, itself a core module).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from goml.cluster.commands import Resources

__all__ = [
    "ErrorKind",
    "HeartbeatRequest",
    "HeartbeatResponse",
    "LeaseRequest",
    "LeaseResponse",
    "LeasedTask",
    "Method",
    "RegisterRequest",
    "RegisterResponse",
    "ReportRequest",
    "ReportResponse",
    "Request",
    "Resources",
    "Response",
]


class Method(enum.StrEnum):
    """The `AgentService` RPCs; values are the gRPC method names."""

    REGISTER = "Register"
    HEARTBEAT = "Heartbeat"
    LEASE = "Lease"
    REPORT = "Report"


class ErrorKind(enum.StrEnum):
    """Why a call failed, as the core needs to know it (the runtime maps status codes).

    - UNAVAILABLE: node unreachable or transient failure; rotate to the next node, back off.
    - NOT_LEADER: the node is a follower; `leader_hint` names the leader when it knows one.
    - UNAUTHENTICATED: token refused; logged as an error, retried with backoff.
    - INVALID: the request itself was refused (bad argument, over a size limit); retrying
      the same request cannot help.
    - DEADLINE: no answer within the call's `timeout_ms`; treated like UNAVAILABLE.
    """

    UNAVAILABLE = "unavailable"
    NOT_LEADER = "not_leader"
    UNAUTHENTICATED = "unauthenticated"
    INVALID = "invalid"
    DEADLINE = "deadline"


@dataclass(frozen=True, slots=True)
class RegisterRequest:
    agent_id: str
    cloud: str
    region: str
    arch: str
    capacity: Resources


@dataclass(frozen=True, slots=True)
class RegisterResponse:
    heartbeat_interval_ms: int  # 0: keep the agent's configured interval


@dataclass(frozen=True, slots=True)
class HeartbeatRequest:
    agent_id: str
    free: Resources
    # Every task the agent holds a lease for and has not had acknowledged: running ones
    # and finished ones whose report is still pending (so the leader keeps renewing them).
    running_task_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class HeartbeatResponse:
    known: bool  # False: register again


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    agent_id: str
    free: Resources
    max_tasks: int
    wait_ms: int  # long-poll: the server may hold the call this long when nothing fits


@dataclass(frozen=True, slots=True)
class LeasedTask:
    task_id: str
    function: str
    args_json: str
    resources: Resources
    epoch: int
    timeout_ms: int
    lease_deadline_ms: int  # control-plane time; the agent never compares it with its clock


@dataclass(frozen=True, slots=True)
class LeaseResponse:
    tasks: tuple[LeasedTask, ...]


@dataclass(frozen=True, slots=True)
class ReportRequest:
    """`result_json` is set (non-empty) on success, `error` (non-empty) on failure."""

    agent_id: str
    task_id: str
    epoch: int
    success: bool
    result_json: str
    error: str


@dataclass(frozen=True, slots=True)
class ReportResponse:
    recorded: bool  # False: refused (stale epoch); the agent drops the result
    reason: str


Request = RegisterRequest | HeartbeatRequest | LeaseRequest | ReportRequest
Response = RegisterResponse | HeartbeatResponse | LeaseResponse | ReportResponse

REQUEST_TYPES: dict[Method, type[Request]] = {
    Method.REGISTER: RegisterRequest,
    Method.HEARTBEAT: HeartbeatRequest,
    Method.LEASE: LeaseRequest,
    Method.REPORT: ReportRequest,
}
RESPONSE_TYPES: dict[Method, type[Response]] = {
    Method.REGISTER: RegisterResponse,
    Method.HEARTBEAT: HeartbeatResponse,
    Method.LEASE: LeaseResponse,
    Method.REPORT: ReportResponse,
}
