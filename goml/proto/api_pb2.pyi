from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATE_UNSPECIFIED: _ClassVar[TaskState]
    PENDING: _ClassVar[TaskState]
    LEASED: _ClassVar[TaskState]
    RUNNING: _ClassVar[TaskState]
    SUCCEEDED: _ClassVar[TaskState]
    FAILED: _ClassVar[TaskState]
    DEAD: _ClassVar[TaskState]
    CANCELLED: _ClassVar[TaskState]
TASK_STATE_UNSPECIFIED: TaskState
PENDING: TaskState
LEASED: TaskState
RUNNING: TaskState
SUCCEEDED: TaskState
FAILED: TaskState
DEAD: TaskState
CANCELLED: TaskState

class Resources(_message.Message):
    __slots__ = ("cpu", "memory_mb", "gpu")
    CPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    cpu: float
    memory_mb: int
    gpu: int
    def __init__(self, cpu: _Optional[float] = ..., memory_mb: _Optional[int] = ..., gpu: _Optional[int] = ...) -> None: ...

class TaskSpec(_message.Message):
    __slots__ = ("function", "args_json", "resources", "priority", "max_attempts", "timeout_ms", "idempotency_key", "cloud", "region", "isolated")
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    ARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    CLOUD_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    ISOLATED_FIELD_NUMBER: _ClassVar[int]
    function: str
    args_json: str
    resources: Resources
    priority: int
    max_attempts: int
    timeout_ms: int
    idempotency_key: str
    cloud: str
    region: str
    isolated: bool
    def __init__(self, function: _Optional[str] = ..., args_json: _Optional[str] = ..., resources: _Optional[_Union[Resources, _Mapping]] = ..., priority: _Optional[int] = ..., max_attempts: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., cloud: _Optional[str] = ..., region: _Optional[str] = ..., isolated: _Optional[bool] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("id", "spec", "state", "attempts", "agent_id", "epoch", "result_json", "error", "submitted_ms", "finished_ms", "lease_deadline_ms", "finished_seq")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_MS_FIELD_NUMBER: _ClassVar[int]
    LEASE_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_SEQ_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec: TaskSpec
    state: TaskState
    attempts: int
    agent_id: str
    epoch: int
    result_json: str
    error: str
    submitted_ms: int
    finished_ms: int
    lease_deadline_ms: int
    finished_seq: int
    def __init__(self, id: _Optional[str] = ..., spec: _Optional[_Union[TaskSpec, _Mapping]] = ..., state: _Optional[_Union[TaskState, str]] = ..., attempts: _Optional[int] = ..., agent_id: _Optional[str] = ..., epoch: _Optional[int] = ..., result_json: _Optional[str] = ..., error: _Optional[str] = ..., submitted_ms: _Optional[int] = ..., finished_ms: _Optional[int] = ..., lease_deadline_ms: _Optional[int] = ..., finished_seq: _Optional[int] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[TaskSpec]
    def __init__(self, tasks: _Optional[_Iterable[_Union[TaskSpec, _Mapping]]] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("task_ids", "raft_index")
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    RAFT_INDEX_FIELD_NUMBER: _ClassVar[int]
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    raft_index: int
    def __init__(self, task_ids: _Optional[_Iterable[str]] = ..., raft_index: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("state", "function", "agent_id", "limit", "page_token", "newest_first", "finished", "finished_after_seq")
    STATE_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NEWEST_FIRST_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    state: TaskState
    function: str
    agent_id: str
    limit: int
    page_token: str
    newest_first: bool
    finished: bool
    finished_after_seq: int
    def __init__(self, state: _Optional[_Union[TaskState, str]] = ..., function: _Optional[str] = ..., agent_id: _Optional[str] = ..., limit: _Optional[int] = ..., page_token: _Optional[str] = ..., newest_first: _Optional[bool] = ..., finished: _Optional[bool] = ..., finished_after_seq: _Optional[int] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("tasks", "next_page_token", "finished_seq_last", "pruned_through_seq", "export_watermark_seq", "tasks_kept", "tasks_max")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINISHED_SEQ_LAST_FIELD_NUMBER: _ClassVar[int]
    PRUNED_THROUGH_SEQ_FIELD_NUMBER: _ClassVar[int]
    EXPORT_WATERMARK_SEQ_FIELD_NUMBER: _ClassVar[int]
    TASKS_KEPT_FIELD_NUMBER: _ClassVar[int]
    TASKS_MAX_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    next_page_token: str
    finished_seq_last: int
    pruned_through_seq: int
    export_watermark_seq: int
    tasks_kept: int
    tasks_max: int
    def __init__(self, tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., finished_seq_last: _Optional[int] = ..., pruned_through_seq: _Optional[int] = ..., export_watermark_seq: _Optional[int] = ..., tasks_kept: _Optional[int] = ..., tasks_max: _Optional[int] = ...) -> None: ...

class AckExportRequest(_message.Message):
    __slots__ = ("through_seq",)
    THROUGH_SEQ_FIELD_NUMBER: _ClassVar[int]
    through_seq: int
    def __init__(self, through_seq: _Optional[int] = ...) -> None: ...

class AckExportResponse(_message.Message):
    __slots__ = ("export_watermark_seq",)
    EXPORT_WATERMARK_SEQ_FIELD_NUMBER: _ClassVar[int]
    export_watermark_seq: int
    def __init__(self, export_watermark_seq: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("task_ids", "known_only")
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    KNOWN_ONLY_FIELD_NUMBER: _ClassVar[int]
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    known_only: bool
    def __init__(self, task_ids: _Optional[_Iterable[str]] = ..., known_only: _Optional[bool] = ...) -> None: ...

class TaskEvent(_message.Message):
    __slots__ = ("task", "raft_index")
    TASK_FIELD_NUMBER: _ClassVar[int]
    RAFT_INDEX_FIELD_NUMBER: _ClassVar[int]
    task: Task
    raft_index: int
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ..., raft_index: _Optional[int] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: Task
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("id", "address", "role", "term", "commit_index", "applied_index", "reachable", "rtt_ms", "learner", "caught_up")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    APPLIED_INDEX_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    RTT_MS_FIELD_NUMBER: _ClassVar[int]
    LEARNER_FIELD_NUMBER: _ClassVar[int]
    CAUGHT_UP_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    role: str
    term: int
    commit_index: int
    applied_index: int
    reachable: bool
    rtt_ms: float
    learner: bool
    caught_up: bool
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., role: _Optional[str] = ..., term: _Optional[int] = ..., commit_index: _Optional[int] = ..., applied_index: _Optional[int] = ..., reachable: _Optional[bool] = ..., rtt_ms: _Optional[float] = ..., learner: _Optional[bool] = ..., caught_up: _Optional[bool] = ...) -> None: ...

class Agent(_message.Message):
    __slots__ = ("id", "cloud", "region", "arch", "capacity", "state", "last_heartbeat_age_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    CLOUD_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_AGE_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    cloud: str
    region: str
    arch: str
    capacity: Resources
    state: str
    last_heartbeat_age_ms: int
    def __init__(self, id: _Optional[str] = ..., cloud: _Optional[str] = ..., region: _Optional[str] = ..., arch: _Optional[str] = ..., capacity: _Optional[_Union[Resources, _Mapping]] = ..., state: _Optional[str] = ..., last_heartbeat_age_ms: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("local",)
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    local: bool
    def __init__(self, local: _Optional[bool] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("node_id", "leader_id", "leader_address", "term", "commit_index", "members", "agents", "tasks_by_state", "voters", "learners", "membership_index")
    class TasksByStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    LEADER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    TASKS_BY_STATE_FIELD_NUMBER: _ClassVar[int]
    VOTERS_FIELD_NUMBER: _ClassVar[int]
    LEARNERS_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_INDEX_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    leader_id: str
    leader_address: str
    term: int
    commit_index: int
    members: _containers.RepeatedCompositeFieldContainer[Member]
    agents: _containers.RepeatedCompositeFieldContainer[Agent]
    tasks_by_state: _containers.ScalarMap[str, int]
    voters: _containers.RepeatedScalarFieldContainer[str]
    learners: _containers.RepeatedScalarFieldContainer[str]
    membership_index: int
    def __init__(self, node_id: _Optional[str] = ..., leader_id: _Optional[str] = ..., leader_address: _Optional[str] = ..., term: _Optional[int] = ..., commit_index: _Optional[int] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., agents: _Optional[_Iterable[_Union[Agent, _Mapping]]] = ..., tasks_by_state: _Optional[_Mapping[str, int]] = ..., voters: _Optional[_Iterable[str]] = ..., learners: _Optional[_Iterable[str]] = ..., membership_index: _Optional[int] = ...) -> None: ...

class MembershipChangeRequest(_message.Message):
    __slots__ = ("kind", "node_id", "address", "wait_ms")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    node_id: str
    address: str
    wait_ms: int
    def __init__(self, kind: _Optional[str] = ..., node_id: _Optional[str] = ..., address: _Optional[str] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class MembershipChangeResponse(_message.Message):
    __slots__ = ("index", "voters", "learners")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    VOTERS_FIELD_NUMBER: _ClassVar[int]
    LEARNERS_FIELD_NUMBER: _ClassVar[int]
    index: int
    voters: _containers.RepeatedScalarFieldContainer[str]
    learners: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, index: _Optional[int] = ..., voters: _Optional[_Iterable[str]] = ..., learners: _Optional[_Iterable[str]] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("agent_id", "cloud", "region", "arch", "capacity", "lease_depth")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CLOUD_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    LEASE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    cloud: str
    region: str
    arch: str
    capacity: Resources
    lease_depth: int
    def __init__(self, agent_id: _Optional[str] = ..., cloud: _Optional[str] = ..., region: _Optional[str] = ..., arch: _Optional[str] = ..., capacity: _Optional[_Union[Resources, _Mapping]] = ..., lease_depth: _Optional[int] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("heartbeat_interval_ms", "lease_poll_is_heartbeat", "lease_depth")
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    LEASE_POLL_IS_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    LEASE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_ms: int
    lease_poll_is_heartbeat: bool
    lease_depth: int
    def __init__(self, heartbeat_interval_ms: _Optional[int] = ..., lease_poll_is_heartbeat: _Optional[bool] = ..., lease_depth: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("agent_id", "free", "running_task_ids", "queued_task_ids")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    FREE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    free: Resources
    running_task_ids: _containers.RepeatedScalarFieldContainer[str]
    queued_task_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, agent_id: _Optional[str] = ..., free: _Optional[_Union[Resources, _Mapping]] = ..., running_task_ids: _Optional[_Iterable[str]] = ..., queued_task_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known", "revoked_task_ids")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    REVOKED_TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    known: bool
    revoked_task_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, known: _Optional[bool] = ..., revoked_task_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("agent_id", "free", "max_tasks", "wait_ms")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    FREE_FIELD_NUMBER: _ClassVar[int]
    MAX_TASKS_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    free: Resources
    max_tasks: int
    wait_ms: int
    def __init__(self, agent_id: _Optional[str] = ..., free: _Optional[_Union[Resources, _Mapping]] = ..., max_tasks: _Optional[int] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class LeasedTask(_message.Message):
    __slots__ = ("task_id", "function", "args_json", "resources", "epoch", "timeout_ms", "lease_deadline_ms", "isolated")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    ARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    LEASE_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    ISOLATED_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    function: str
    args_json: str
    resources: Resources
    epoch: int
    timeout_ms: int
    lease_deadline_ms: int
    isolated: bool
    def __init__(self, task_id: _Optional[str] = ..., function: _Optional[str] = ..., args_json: _Optional[str] = ..., resources: _Optional[_Union[Resources, _Mapping]] = ..., epoch: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., lease_deadline_ms: _Optional[int] = ..., isolated: _Optional[bool] = ...) -> None: ...

class LeaseResponse(_message.Message):
    __slots__ = ("tasks", "lease_poll_is_heartbeat")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    LEASE_POLL_IS_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[LeasedTask]
    lease_poll_is_heartbeat: bool
    def __init__(self, tasks: _Optional[_Iterable[_Union[LeasedTask, _Mapping]]] = ..., lease_poll_is_heartbeat: _Optional[bool] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("agent_id", "task_id", "epoch", "success", "result_json", "error", "lease_into_answer", "more")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LEASE_INTO_ANSWER_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    task_id: str
    epoch: int
    success: bool
    result_json: str
    error: str
    lease_into_answer: bool
    more: _containers.RepeatedCompositeFieldContainer[TaskResult]
    def __init__(self, agent_id: _Optional[str] = ..., task_id: _Optional[str] = ..., epoch: _Optional[int] = ..., success: _Optional[bool] = ..., result_json: _Optional[str] = ..., error: _Optional[str] = ..., lease_into_answer: _Optional[bool] = ..., more: _Optional[_Iterable[_Union[TaskResult, _Mapping]]] = ...) -> None: ...

class TaskResult(_message.Message):
    __slots__ = ("task_id", "epoch", "success", "result_json", "error")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    epoch: int
    success: bool
    result_json: str
    error: str
    def __init__(self, task_id: _Optional[str] = ..., epoch: _Optional[int] = ..., success: _Optional[bool] = ..., result_json: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class ResultAnswer(_message.Message):
    __slots__ = ("recorded", "reason")
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    recorded: bool
    reason: str
    def __init__(self, recorded: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("recorded", "reason", "tasks", "more")
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    recorded: bool
    reason: str
    tasks: _containers.RepeatedCompositeFieldContainer[LeasedTask]
    more: _containers.RepeatedCompositeFieldContainer[ResultAnswer]
    def __init__(self, recorded: _Optional[bool] = ..., reason: _Optional[str] = ..., tasks: _Optional[_Iterable[_Union[LeasedTask, _Mapping]]] = ..., more: _Optional[_Iterable[_Union[ResultAnswer, _Mapping]]] = ...) -> None: ...
