"""The control-plane API as plain values: requests, responses and errors of both services
(client: submit, get, list, cancel, status, watch; agent: register, heartbeat, lease,
report), mirroring `proto/goml/proto/api.proto` field for field.

The node core (`goml.cluster.node_core`) takes these and answers with these; the gRPC
runtime converts them to and from protobuf (`goml.api.wire`); the simulator passes them
as they are. Standard library only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# Trailing metadata of a NOT_LEADER answer (FAILED_PRECONDITION on the wire).
LEADER_ID_KEY = "goml-leader-id"
LEADER_ADDRESS_KEY = "goml-leader-address"


class TaskState(enum.StrEnum):
    PENDING = "PENDING"
    LEASED = "LEASED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    DEAD = "DEAD"
    CANCELLED = "CANCELLED"


TERMINAL_STATES = frozenset({TaskState.SUCCEEDED, TaskState.DEAD, TaskState.CANCELLED})


# The most lease depth an agent may ask or a node grant (RegisterRequest.lease_depth).
LEASE_DEPTH_MAX = 64


@dataclass(frozen=True, slots=True)
class Resources:
    cpu: float  # cores
    memory_mb: int
    gpu: int

    # No asserts here: requests build these from client input, and the ranges are
    # checked where every replica checks them, in goml.cluster.commands.decode_command.

    def fits_in(self, free: Resources) -> bool:
        # Tolerance: 0.1 + 0.2 cores must fit in 0.3. Same arithmetic on every replica.
        return (
            self.cpu <= free.cpu + 1e-9
            and self.memory_mb <= free.memory_mb
            and self.gpu <= free.gpu
        )

    def minus(self, other: Resources) -> Resources:
        return Resources(
            max(0.0, self.cpu - other.cpu),
            max(0, self.memory_mb - other.memory_mb),
            max(0, self.gpu - other.gpu),
        )

    def plus(self, other: Resources) -> Resources:
        return Resources(
            self.cpu + other.cpu, self.memory_mb + other.memory_mb, self.gpu + other.gpu
        )

    def least(self, other: Resources) -> Resources:
        return Resources(
            min(self.cpu, other.cpu),
            min(self.memory_mb, other.memory_mb),
            min(self.gpu, other.gpu),
        )


NO_RESOURCES = Resources(0.0, 0, 0)


class Method(enum.StrEnum):
    """Every RPC of both services; values are the gRPC method names."""

    SUBMIT = "Submit"
    GET = "Get"
    LIST = "List"
    CANCEL = "Cancel"
    STATUS = "Status"
    WATCH = "Watch"
    ACK_EXPORT = "AckExport"
    REGISTER = "Register"
    HEARTBEAT = "Heartbeat"
    LEASE = "Lease"
    REPORT = "Report"
    # Membership changes (goml node add/remove/replace): an admin's call (goml.api.auth).
    CHANGE_MEMBERSHIP = "ChangeMembership"


# ------------------------------------------------------------------------------ errors


class ErrorCode(enum.StrEnum):
    """Why a node refused or could not answer a request (the server's view)."""

    NOT_LEADER = "NOT_LEADER"  # ask the leader: `leader_id`/`leader_address` name it if known
    UNAVAILABLE = "UNAVAILABLE"  # not committed (leadership changed, busy, timed out): retry
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"


@dataclass(frozen=True, slots=True)
class ApiError:
    code: ErrorCode
    message: str
    leader_id: str = ""  # NOT_LEADER only: "" while the node knows no leader
    leader_address: str = ""

    def __post_init__(self) -> None:
        assert self.message, "an error says why"
        assert self.code is ErrorCode.NOT_LEADER or not (self.leader_id or self.leader_address)


class ErrorKind(enum.StrEnum):
    """A failed call as a caller's retry policy sees it (`goml.api.retry`).

    - UNAVAILABLE: node unreachable or transient failure; rotate to the next node, back off.
    - NOT_LEADER: the node is a follower; the hint names the leader when it knows one.
    - UNAUTHENTICATED: credentials refused; retrying the same call cannot help by itself.
    - INVALID: the request itself was refused (bad argument, over a size limit, not
      found); retrying the same request cannot help.
    - DEADLINE: no answer within the call's deadline; treated like UNAVAILABLE.
    """

    UNAVAILABLE = "unavailable"
    NOT_LEADER = "not_leader"
    UNAUTHENTICATED = "unauthenticated"
    INVALID = "invalid"
    DEADLINE = "deadline"


_KIND_OF_CODE = {
    ErrorCode.NOT_LEADER: ErrorKind.NOT_LEADER,
    ErrorCode.UNAVAILABLE: ErrorKind.UNAVAILABLE,
    ErrorCode.DEADLINE_EXCEEDED: ErrorKind.DEADLINE,
    ErrorCode.INVALID_ARGUMENT: ErrorKind.INVALID,
    ErrorCode.NOT_FOUND: ErrorKind.INVALID,
    ErrorCode.ALREADY_EXISTS: ErrorKind.INVALID,
    ErrorCode.FAILED_PRECONDITION: ErrorKind.INVALID,
    ErrorCode.RESOURCE_EXHAUSTED: ErrorKind.INVALID,
    ErrorCode.UNAUTHENTICATED: ErrorKind.UNAUTHENTICATED,
    ErrorCode.PERMISSION_DENIED: ErrorKind.UNAUTHENTICATED,
}
assert set(_KIND_OF_CODE) == set(ErrorCode)


def error_kind(code: ErrorCode) -> ErrorKind:
    """The one classification of server codes into retry classes, for every caller."""
    return _KIND_OF_CODE[code]


# ------------------------------------------------------------------------------ agent API


@dataclass(frozen=True, slots=True)
class RegisterRequest:
    agent_id: str
    cloud: str
    region: str
    arch: str
    capacity: Resources
    lease_depth: int = 1  # leases it would hold, in multiples of capacity (1: no queue)


@dataclass(frozen=True, slots=True)
class RegisterResponse:
    heartbeat_interval_ms: int  # 0: keep the agent's configured interval
    # The node counts a parked lease poll as a heartbeat. This version's nodes do; the
    # wire decodes an older node's answer, which lacks the field, as False, and the
    # agent then heartbeats every interval, idle or not.
    lease_poll_is_heartbeat: bool = True
    lease_depth: int = 1  # granted; an older node's answer decodes as 1 (no queue)


@dataclass(frozen=True, slots=True)
class HeartbeatRequest:
    agent_id: str
    free: Resources
    # Every task the agent holds a lease for and has not had acknowledged: running ones
    # and finished ones whose report is still pending (so the leader keeps renewing them).
    running_task_ids: tuple[str, ...]
    # Leased tasks in the agent's queue, not started yet: renewed, not marked RUNNING.
    queued_task_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HeartbeatResponse:
    known: bool  # False: register again
    # Listed tasks this agent holds no lease for any more (cancelled, requeued, finished):
    # the agent stops running them and drops their results.
    revoked_task_ids: tuple[str, ...] = ()


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
    isolated: bool = False  # run it in a fresh process, not on a warm worker


@dataclass(frozen=True, slots=True)
class LeaseResponse:
    tasks: tuple[LeasedTask, ...]
    lease_poll_is_heartbeat: bool = True  # as RegisterResponse's


@dataclass(frozen=True, slots=True)
class TaskResult:
    """A further result of a ReportRequest (`more`): as its first one's fields."""

    task_id: str
    epoch: int
    success: bool
    result_json: str
    error: str


@dataclass(frozen=True, slots=True)
class ResultAnswer:
    recorded: bool
    reason: str


@dataclass(frozen=True, slots=True)
class ReportRequest:
    """`result_json` is set (non-empty) on success, `error` (non-empty) on failure."""

    agent_id: str
    task_id: str
    epoch: int
    success: bool
    result_json: str
    error: str
    # The agent takes leases in the answer (ReportResponse.tasks); False: an older agent,
    # whose freed room goes to its parked standing poll.
    lease_into_answer: bool = False
    # Further results in the same call; an older node ignores them (its answer has no
    # `more`: only the first result is acknowledged).
    more: tuple[TaskResult, ...] = ()


@dataclass(frozen=True, slots=True)
class ReportResponse:
    recorded: bool  # False: refused (stale epoch, task gone); the agent drops the result
    reason: str
    tasks: tuple[LeasedTask, ...] = ()  # leased into the room the report freed
    more: tuple[ResultAnswer, ...] = ()  # one per ReportRequest.more, same order


# ------------------------------------------------------------------------------ client API


@dataclass(frozen=True, slots=True)
class TaskRequest:
    """One task of a submit as a client sends it; zero values ask for the defaults."""

    function: str
    args_json: str  # "" means {}
    resources: Resources
    priority: int
    max_attempts: int  # 0: the server's default
    timeout_ms: int  # 0: the server's default
    idempotency_key: str  # required: it is what makes a retry safe
    cloud: str  # "": any
    region: str  # "": any
    isolated: bool = False  # a fresh process of its own instead of a warm worker


@dataclass(frozen=True, slots=True)
class SubmitRequest:
    tasks: tuple[TaskRequest, ...]


@dataclass(frozen=True, slots=True)
class SubmitResponse:
    task_ids: tuple[str, ...]
    raft_index: int


@dataclass(frozen=True, slots=True)
class TaskView:
    """A task as the API shows it (the proto's `Task`)."""

    id: str
    function: str
    args_json: str
    resources: Resources
    priority: int
    max_attempts: int
    timeout_ms: int
    idempotency_key: str
    cloud: str
    region: str
    state: TaskState
    attempts: int
    agent_id: str  # the lease holder; "" when none
    epoch: int
    result_json: str
    error: str
    submitted_ms: int
    finished_ms: int  # 0 until terminal
    lease_deadline_ms: int  # 0 without a lease
    finished_seq: int = 0  # its place in the order tasks finished in; 0 until terminal
    isolated: bool = False


@dataclass(frozen=True, slots=True)
class GetRequest:
    task_id: str


@dataclass(frozen=True, slots=True)
class GetResponse:
    task: TaskView


@dataclass(frozen=True, slots=True)
class ListRequest:
    state: TaskState | None  # None: any
    function: str  # "": any
    agent_id: str  # "": any
    limit: int  # 0: the server's default page size; above its maximum: the maximum
    page_token: str = ""  # ListResponse.next_page_token of the previous page; "": first
    newest_first: bool = False  # submit order, newest first
    finished: bool = False  # terminal tasks only, in finish order (not with newest_first)
    finished_after_seq: int = 0  # with finished: finished_seq > this


@dataclass(frozen=True, slots=True)
class ListResponse:
    tasks: tuple[TaskView, ...]
    next_page_token: str = ""  # "": the last page
    finished_seq_last: int = 0  # retention as of this read (see the proto)
    pruned_through_seq: int = 0
    export_watermark_seq: int = 0
    tasks_kept: int = 0  # tasks in the manifest, of every state
    tasks_max: int = 0  # the manifest's limit on tasks_kept


@dataclass(frozen=True, slots=True)
class AckExportRequest:
    through_seq: int  # every finished task up to this finished_seq is archived


@dataclass(frozen=True, slots=True)
class AckExportResponse:
    export_watermark_seq: int


@dataclass(frozen=True, slots=True)
class CancelRequest:
    task_id: str


@dataclass(frozen=True, slots=True)
class CancelResponse:
    task: TaskView


@dataclass(frozen=True, slots=True)
class WatchRequest:
    task_ids: tuple[str, ...]  # empty: every task
    # True: a task named that the node does not know ends the watch with NOT_FOUND at
    # once, instead of a silence a waiting caller cannot tell from "not finished yet".
    known_only: bool = False


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """One message of a watch stream (never final)."""

    task: TaskView
    raft_index: int


@dataclass(frozen=True, slots=True)
class StatusRequest:
    local: bool  # answer from this node's view; otherwise followers redirect to the leader


@dataclass(frozen=True, slots=True)
class MemberView:
    id: str
    address: str
    role: str
    term: int
    commit_index: int  # the leader's match index for other members
    applied_index: int
    reachable: bool
    rtt_ms: float  # 0: unknown
    voter: bool = True  # False: a learner (replicates, never votes or counts)
    caught_up: bool = False  # the leader's view: holds every committed entry, steadily


@dataclass(frozen=True, slots=True)
class AgentView:
    id: str
    cloud: str
    region: str
    arch: str
    capacity: Resources
    state: str
    last_heartbeat_age_ms: int  # as seen by the leader; -1 if unknown


@dataclass(frozen=True, slots=True)
class StatusResponse:
    node_id: str
    leader_id: str
    leader_address: str
    term: int
    commit_index: int
    members: tuple[MemberView, ...]
    agents: tuple[AgentView, ...]
    tasks_by_state: tuple[tuple[str, int], ...]
    voters: tuple[str, ...] = ()
    learners: tuple[str, ...] = ()
    membership_index: int = 0  # the log index of the configuration in force (0: bootstrap)


class MembershipChangeKind(enum.StrEnum):
    ADD_LEARNER = "add-learner"
    PROMOTE = "promote"
    REMOVE = "remove"


@dataclass(frozen=True, slots=True)
class MembershipRequest:
    """One single-server change, on the leader. ADD_LEARNER needs `address`; PROMOTE
    waits up to `wait_ms` for the learner to catch up (then FAILED_PRECONDITION)."""

    kind: str  # a MembershipChangeKind value (checked by the node: it comes off the wire)
    node_id: str
    address: str = ""
    wait_ms: int = 0


@dataclass(frozen=True, slots=True)
class MembershipResponse:
    """The configuration once the change committed."""

    index: int
    voters: tuple[str, ...]
    learners: tuple[str, ...]


AgentRequest = RegisterRequest | HeartbeatRequest | LeaseRequest | ReportRequest
AgentResponse = RegisterResponse | HeartbeatResponse | LeaseResponse | ReportResponse
ClientRequest = (
    SubmitRequest
    | GetRequest
    | ListRequest
    | CancelRequest
    | StatusRequest
    | WatchRequest
    | AckExportRequest
    | MembershipRequest
)
ClientResponse = (
    SubmitResponse
    | GetResponse
    | ListResponse
    | CancelResponse
    | StatusResponse
    | TaskEvent
    | AckExportResponse
    | MembershipResponse
)
ApiRequest = AgentRequest | ClientRequest
ApiResponse = AgentResponse | ClientResponse

METHOD_OF_REQUEST: dict[type[ApiRequest], Method] = {
    SubmitRequest: Method.SUBMIT,
    GetRequest: Method.GET,
    ListRequest: Method.LIST,
    CancelRequest: Method.CANCEL,
    StatusRequest: Method.STATUS,
    WatchRequest: Method.WATCH,
    AckExportRequest: Method.ACK_EXPORT,
    RegisterRequest: Method.REGISTER,
    HeartbeatRequest: Method.HEARTBEAT,
    LeaseRequest: Method.LEASE,
    ReportRequest: Method.REPORT,
    MembershipRequest: Method.CHANGE_MEMBERSHIP,
}
RESPONSE_TYPES: dict[Method, type[ApiResponse]] = {
    Method.SUBMIT: SubmitResponse,
    Method.GET: GetResponse,
    Method.LIST: ListResponse,
    Method.CANCEL: CancelResponse,
    Method.STATUS: StatusResponse,
    Method.WATCH: TaskEvent,
    Method.ACK_EXPORT: AckExportResponse,
    Method.REGISTER: RegisterResponse,
    Method.HEARTBEAT: HeartbeatResponse,
    Method.LEASE: LeaseResponse,
    Method.REPORT: ReportResponse,
    Method.CHANGE_MEMBERSHIP: MembershipResponse,
}
assert set(METHOD_OF_REQUEST.values()) == set(Method) == set(RESPONSE_TYPES)
