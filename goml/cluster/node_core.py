"""The control-plane node core: one node's every decision, sans-IO.

It owns the replica (Raft core + manifest, `goml.raft.replica`), the leader duties, the
parked lease long-polls, the proposal and read waiters, the watches and the leadership
edges, and it answers every API request of both services (client: submit, get, list,
cancel, status, watch; agent: register, heartbeat, lease, report). The gRPC runtime
(`goml.cluster.service`) and the simulator (`goml.sim.node`) drive this same code; each
only moves bytes, time and files.

Inputs (every one carries the node's monotonic `now_ms` and its wall clock `wall_ms`,
which the leader stamps into commands; apply never reads a clock):
- `step(message)`: a Raft message from a peer;
- `tick()`: time passed (call it no later than `next_deadline_ms()`);
- `request(request_id, request)`: an API request (`goml.api.types`); `forget(id)` when
  its caller went away (deadline, closed stream).

Output: `ready()` -> `NodeReady`: what to store and fsync, the Raft messages to send,
the replies to hand out, log lines; then `advance(ready)`. Order for the runtime:
replies (they depend on nothing this Ready stores) may go first; then store, send,
advance (STYLE.md "Order of effects"). Every request gets exactly one final reply
(watches: events that are not final, until forgotten), within `request_timeout_ms`
unless it is a parked lease poll, which ends at its own wait.

Decisions made here, once for both worlds:
- Followers answer NOT_LEADER naming the leader and its address.
- Submits are validated before proposing (idempotency key required, argument size and
  schema, canonical JSON); commands every replica would refuse are refused up front.
- Lease policy: a LeaseTasks is proposed only when the manifest, minus the tasks that
  lease proposals already in flight will take, has a task that fits the agent; otherwise
  the poll parks until work that could fit is applied or its wait ends. Wake-ups go to
  parked polls in arrival order, only as many as there are tasks that fit them. A poll's
  room is its `free` and `max_tasks` plus what the reports of its agent that arrive while
  it is parked free (a full agent's poll waits for them; the lease goes in the same
  commit as the report); the manifest caps it at what the log knows is free.
- Reports: recorded, or `recorded=false` when fenced (stale epoch, task gone, task not
  leased any more); other refusals are errors.
- Reads (get, list) are linearizable through ReadIndex on the leader.
"""

from __future__ import annotations

import enum
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from goml.api.types import (
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
    MembershipChangeKind,
    MembershipRequest,
    MembershipResponse,
    MemberView,
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
    TaskResult,
    TaskState,
    TaskView,
    WatchRequest,
)
from goml.cluster.clock import ClusterClock
from goml.cluster.commands import (
    LEASE_DEPTH_MAX,
    AckExport,
    CancelTask,
    Command,
    CommandError,
    LeaseTasks,
    RegisterAgent,
    Report,
    ReportResults,
    SubmitTasks,
    TaskSpec,
    canonical_json,
    encode_command,
)
from goml.cluster.duties import DutiesConfig, LeaderDuties
from goml.cluster.manifest import (
    DEFAULT_LIMITS,
    AgentState,
    ApplyResult,
    Code,
    ItemResult,
    Manifest,
    ManifestLimits,
    Task,
    quote,
)
from goml.cluster.paging import PageTokenError, list_page
from goml.raft.replica import (
    PROPOSAL_BYTES_MAX,
    Applied,
    Lost,
    Outcome,
    PeerAddresses,
    ProposalTooLarge,
    ReadFailed,
    ReadReady,
    ReplicaConfig,
    ReplicaCore,
    ReplicaReady,
    Unknown,
)
from goml.raft.types import (
    ADDRESS_CHARS_MAX,
    NODE_ID_CHARS_MAX,
    ChangeKind,
    Config,
    Entry,
    HardState,
    MembershipChange,
    MembershipRefused,
    Message,
    NodeId,
    NotLeader,
    PersistedState,
    ProposalDropped,
    Role,
    Snapshot,
)

# Commands whose success can make a PENDING task fit some agent: new tasks, requeues,
# capacity coming back (a cancel or a finished task frees its agent), new agents.
WAKING_COMMANDS = frozenset(
    {
        "SubmitTasks",
        "ExpireLeases",
        "MarkAgentDown",
        "ReportResult",
        "ReportResults",
        "CancelTask",
        "RegisterAgent",
    }
)
# Reports refused because a newer attempt owns the task (or it ended): fenced, not errors.
_FENCED = (Code.STALE_EPOCH, Code.NOT_FOUND, Code.FAILED_PRECONDITION)
_REFUSAL_CODES = {
    Code.INVALID_ARGUMENT: ErrorCode.INVALID_ARGUMENT,
    Code.NOT_FOUND: ErrorCode.NOT_FOUND,
    Code.ALREADY_EXISTS: ErrorCode.ALREADY_EXISTS,
    Code.FAILED_PRECONDITION: ErrorCode.FAILED_PRECONDITION,
    Code.STALE_EPOCH: ErrorCode.FAILED_PRECONDITION,
    Code.RESOURCE_EXHAUSTED: ErrorCode.RESOURCE_EXHAUSTED,
}

ArgsValidator = Callable[[str, str], object]  # (function, args_json); raises ValueError

# What every goml node runs with (the daemon and the simulator alike).
DUTIES_INTERVAL_MS = 200
LEASE_WAIT_MS_MAX = 30_000
LIST_LIMIT_DEFAULT = 1000
LIST_LIMIT_MAX = 10_000
MAX_ATTEMPTS_DEFAULT = 3
TASK_TIMEOUT_MS_DEFAULT = 60_000
REQUESTS_MAX = 16_384
REQUEST_TIMEOUT_MS_DEFAULT = 5000
PROMOTE_WAIT_MS_MAX = 600_000  # the longest a promotion waits for its learner to catch up
APPLY_LAG_ENTRIES_MAX = 10_000  # unhealthy beyond: this node is far behind what it knows  # a node file's request_timeout_s, unless it says otherwise


@dataclass(frozen=True, slots=True)
class NodeCoreConfig:
    """Every option explicit (STYLE.md): the daemon and the simulator build one each."""

    replica: ReplicaConfig
    # Node id -> address of the peers the config file names (the bootstrap voters, or the
    # cluster a joining node joins); a configuration's own addresses take precedence.
    addresses: tuple[tuple[str, str], ...]
    duties: DutiesConfig
    limits: ManifestLimits
    duties_interval_ms: int
    request_timeout_ms: int  # a request not answered by then is answered UNAVAILABLE
    lease_wait_ms_max: int  # the longest a lease long-poll is held
    agent_heartbeat_interval_ms: int  # told to agents when they register
    list_limit_default: int
    list_limit_max: int
    max_attempts_default: int
    task_timeout_ms_default: int
    requests_max: int  # requests waiting here at once (proposals, reads, polls, watches)
    # A follower that knows a live leader forwards leader-only requests to it (as etcd
    # does) instead of answering NOT_LEADER: a client that reaches this node but not
    # the leader (a one-way partition) is still served.
    forward_requests: bool
    # The most lease depth this node, as leader, grants an agent (RegisterAgent): 1 keeps
    # every RegisterAgent as an earlier version writes it. More only once every node of
    # the cluster runs a version that reads lease_depth (earlier replicas refuse it).
    agent_lease_depth_max: int

    def __post_init__(self) -> None:
        names = [name for name, _ in self.addresses]
        assert set(self.replica.raft.voters) <= set(names), (names, self.replica.raft)
        assert self.replica.raft.node_id in names, (names, self.replica.raft)
        for name in (
            "duties_interval_ms",
            "request_timeout_ms",
            "agent_heartbeat_interval_ms",
            "list_limit_default",
            "list_limit_max",
            "max_attempts_default",
            "task_timeout_ms_default",
            "requests_max",
        ):
            assert getattr(self, name) >= 1, name
        assert self.lease_wait_ms_max >= 0
        assert self.list_limit_default <= self.list_limit_max
        assert 1 <= self.agent_lease_depth_max <= LEASE_DEPTH_MAX, self.agent_lease_depth_max


class RaftKnobs(Protocol):
    """The Raft core's settings beyond its timing, as a scenario's `raft:` and a node's
    config file give them (defaults: goml.raft.replica's standards)."""

    @property
    def pre_vote(self) -> bool: ...
    @property
    def check_quorum(self) -> bool: ...
    @property
    def inflight_messages_max(self) -> int: ...
    @property
    def entries_per_message_max(self) -> int: ...
    @property
    def uncommitted_entries_max(self) -> int: ...
    @property
    def message_bytes_max(self) -> int: ...


def tuned_raft(raft: Config, knobs: RaftKnobs) -> Config:
    """`raft` with the knobs given: the one place both the simulator and a real node
    apply them, so that both run the same core."""
    return replace(
        raft,
        pre_vote=knobs.pre_vote,
        check_quorum=knobs.check_quorum,
        inflight_messages_max=knobs.inflight_messages_max,
        entries_per_message_max=knobs.entries_per_message_max,
        uncommitted_entries_max=knobs.uncommitted_entries_max,
        message_bytes_max=knobs.message_bytes_max,
    )


# The agent lease depth the node configs this version writes for a new cluster allow
# (`goml cluster local`, the chaos runner's clusters, the simulator): every node of such a
# cluster reads lease_depth. A hand-written or older config has 1 (agent_lease_depth_max).
AGENT_LEASE_DEPTH_NEW_CLUSTER = 8


def standard_config(
    raft: Config,
    addresses: tuple[tuple[str, str], ...],
    duties: DutiesConfig,
    request_timeout_ms: int,
    compact_every_entries: int,
    agent_lease_depth_max: int,
) -> NodeCoreConfig:
    """The node core configuration of a goml node: the settings an operator chooses,
    the rest standard. Agents heartbeat five times per `agent_timeout_ms`."""
    return NodeCoreConfig(
        replica=ReplicaConfig(
            raft=raft,
            compact_every_entries=compact_every_entries,
            proposal_bytes_max=PROPOSAL_BYTES_MAX,
            defer_commit_only_writes=True,
        ),
        addresses=addresses,
        duties=duties,
        limits=DEFAULT_LIMITS,
        duties_interval_ms=DUTIES_INTERVAL_MS,
        request_timeout_ms=request_timeout_ms,
        lease_wait_ms_max=LEASE_WAIT_MS_MAX,
        agent_heartbeat_interval_ms=max(1, duties.agent_timeout_ms // 5),
        list_limit_default=LIST_LIMIT_DEFAULT,
        list_limit_max=LIST_LIMIT_MAX,
        max_attempts_default=MAX_ATTEMPTS_DEFAULT,
        task_timeout_ms_default=TASK_TIMEOUT_MS_DEFAULT,
        requests_max=REQUESTS_MAX,
        forward_requests=True,
        agent_lease_depth_max=agent_lease_depth_max,
    )


@dataclass(frozen=True, slots=True)
class Reply:
    request_id: int
    response: ApiResponse | None
    error: ApiError | None
    final: bool  # False: a watch event; the stream goes on
    leader_hint: str = ""  # a forwarded request's answer: the leader that served it

    def __post_init__(self) -> None:
        assert (self.response is None) != (self.error is None), self
        assert self.final or isinstance(self.response, TaskEvent), self


class LogLevel(enum.StrEnum):
    INFO = "INFO"
    WARNING = "WARNING"


@dataclass(frozen=True, slots=True)
class NodeLog:
    level: LogLevel
    text: str


@dataclass(frozen=True, slots=True)
class Forward:
    """Send `request` to node `leader` as a forwarded request; answer with `forwarded`."""

    request_id: int
    leader: str
    request: ApiRequest
    timeout_ms: int


@dataclass(frozen=True, slots=True)
class NodeReady:
    replica: ReplicaReady
    replies: tuple[Reply, ...]
    logs: tuple[NodeLog, ...]
    forwards: tuple[Forward, ...] = ()

    @property
    def compacted(self) -> Snapshot | None:
        return self.replica.compacted

    @property
    def snapshot(self) -> Snapshot | None:
        return self.replica.snapshot

    @property
    def entries(self) -> tuple[Entry, ...]:
        return self.replica.entries

    @property
    def hard_state(self) -> HardState | None:
        return self.replica.hard_state

    @property
    def must_sync(self) -> bool:
        return self.replica.must_sync

    @property
    def messages(self) -> tuple[Message, ...]:
        return self.replica.messages

    @property
    def send_before_persist(self) -> bool:
        return self.replica.send_before_persist

    @property
    def committed(self) -> tuple[Entry, ...]:
        return self.replica.committed

    def writes(self) -> bool:
        return self.replica.writes()


@dataclass
class NodeStats:
    """Counters for metrics, summaries and parity checks (never used to decide)."""

    proposed: dict[str, int] = field(default_factory=dict)  # by command type
    applied: dict[str, int] = field(default_factory=dict)  # by command type, every entry
    leases_empty: int = 0  # LeaseTasks applied that leased nothing
    polls_parked: int = 0
    polls_woken: int = 0
    requests_expired: int = 0
    requests_refused_busy: int = 0
    forwarded: int = 0
    forwards_refused: int = 0  # answered at once: a forward to that leader failed lately


class ManifestMachine:
    """The replica's state machine: the manifest, with every apply result kept until
    the node core has looked at it (watches, wake-ups, counters)."""

    def __init__(self, limits: ManifestLimits) -> None:
        self.manifest = Manifest(limits)
        self.results: list[ApplyResult] = []

    def apply(self, index: int, data: bytes) -> ApplyResult:
        result = self.manifest.apply(index, data)
        self.results.append(result)
        return result

    def snapshot(self) -> bytes:
        return self.manifest.snapshot()

    def restore(self, data: bytes) -> None:
        self.manifest = Manifest.restore(data)


class _Stage(enum.Enum):
    PROPOSED = "proposed"  # waits for its command to apply
    QUEUED = "queued"  # a report waiting for the next batch
    READING = "reading"  # waits for a read point
    PARKED = "parked"  # a lease poll waiting for work
    PROMOTING = "promoting"  # a promotion waiting for its learner to catch up
    WATCHING = "watching"  # a watch stream
    CARRYING = "carrying"  # a report applied, its answer waiting for the lease it carries
    FORWARDED = "forwarded"  # sent on to the leader; its answer is this request's


@dataclass(slots=True)
class _Pending:
    request: ApiRequest
    stage: _Stage
    deadline_ms: int  # answered when it passes (never for a watch)
    poll_deadline_ms: int = 0  # lease polls: when the poll ends with an empty answer
    claim: tuple[str, ...] = ()  # lease proposals: the tasks it is expected to take
    forwarded_to: str = ""  # the leader a forwarded request went to
    # Parked lease polls: the room the reports of its agent that arrived after it free
    # (resources, task slots), added to the poll's own `free` and `max_tasks`
    # (`_release_room`).
    released: Resources = field(default_factory=lambda: Resources(0.0, 0, 0))
    released_slots: int = 0
    # Reports with `lease_into_answer`: the LeaseTasks proposed into the room they free
    # (token; 0 once its outcome is in), its tasks, and the report's own answer while it
    # waits for that outcome (`_lease_into_answer`).
    lease_token: int = 0
    leased: tuple[LeasedTask, ...] = ()
    answer: ReportResponse | None = None


@dataclass(frozen=True, slots=True)
class _AnswerLease:
    """A LeaseTasks proposed into the answer of report `carrier`."""

    carrier: int  # request id of the report whose answer carries the tasks
    agent_id: str
    claim: tuple[str, ...]
    room: Resources  # what the reports freed, and their task slots
    slots: int


def task_view(task: Task) -> TaskView:
    return TaskView(
        id=task.id,
        function=task.function,
        args_json=task.args_json,
        resources=task.resources,
        priority=task.priority,
        max_attempts=task.max_attempts,
        timeout_ms=task.timeout_ms,
        idempotency_key=task.idempotency_key,
        cloud=task.cloud or "",
        region=task.region or "",
        state=task.state,
        attempts=task.attempts,
        # Who holds it, or (lease ended: finished, failed, requeued) who last ran it.
        agent_id=task.lease.agent_id if task.lease else (task.last_agent_id or ""),
        epoch=task.epoch,
        result_json=task.result_json or "",
        error=task.error or "",
        submitted_ms=task.submitted_ms,
        finished_ms=task.finished_ms or 0,
        lease_deadline_ms=task.lease.deadline_ms if task.lease else 0,
        finished_seq=task.finished_seq or 0,
        isolated=task.isolated,
    )


def _leased(task: Task) -> LeasedTask:
    return LeasedTask(
        task.id,
        task.function,
        task.args_json,
        task.resources,
        task.epoch,
        task.timeout_ms,
        task.lease.deadline_ms if task.lease else 0,
        task.isolated,
    )


class NodeCore:
    def __init__(
        self,
        config: NodeCoreConfig,
        persisted: PersistedState,
        rng: random.Random,
        validate_args: ArgsValidator,
        now_ms: int,
        wall_ms: int,
    ) -> None:
        self.config = config
        self.id = config.replica.raft.node_id
        self._peer_addresses = PeerAddresses(self.id, dict(config.addresses))
        self._validate_args = validate_args
        # Every replica starts from the same limits; the configured ones come through the
        # log (SetLimits, proposed by the leader's duties), so apply agrees everywhere.
        self.machine = ManifestMachine(DEFAULT_LIMITS)
        self.replica = ReplicaCore(config.replica, persisted, self.machine, rng, now_ms)
        self.duties = LeaderDuties(config.duties)
        self.stats = NodeStats()
        self._now_ms = now_ms
        self._wall_ms = wall_ms
        # What this node stamps into commands and compares leases with (leader only).
        self._cluster_clock = ClusterClock(self.manifest.latest_command_ms, now_ms)
        self._cluster_ms = self._cluster_clock.now_ms(now_ms, wall_ms)
        self._was_leader = False
        self._next_duties_ms = 0
        self._pending: dict[int, _Pending] = {}
        self._deadlines: list[tuple[int, int]] = []  # (deadline_ms, request id), lazy
        self._parked: dict[int, None] = {}  # lease polls in arrival order
        self._promotions: dict[int, MembershipChange] = {}  # waiting for a learner
        self._claimed: set[str] = set()  # tasks lease proposals in flight will take
        # Agent -> its polls with a lease proposal in flight: an agent's next lease is
        # predicted only once that one applied (`_lease_claim`: the log does not count a
        # lease in flight, and two would lease into the same room, one leasing nothing).
        self._leasing: dict[str, dict[int, None]] = {}
        # Tasks whose results are proposed and not yet applied, by agent: a lease proposed
        # behind them counts their capacity as free (applied in log order, the report
        # frees it first), so a freed slot is refilled in the same commit, not the next.
        self._releasing: dict[str, dict[str, None]] = {}
        self._releasing_batches: dict[int, tuple[tuple[str, str], ...]] = {}  # token -> ids
        # Submits proposed and not yet applied (log index -> specs): a lease proposed
        # behind one may take its tasks (applied in log order, they exist by then), so a
        # parked poll is woken by the proposal, not one commit later.
        self._incoming: dict[int, tuple[TaskSpec, ...]] = {}
        self._watches: dict[int, frozenset[str]] = {}
        # Negative tokens: proposals of the node itself (duties, report batches).
        self._internal_tokens = 0
        self._duty_commands: dict[int, str] = {}
        self._report_queue: list[int] = []  # report requests waiting for the next batch
        # token -> (request id, how many of the batch's reports are its own)
        self._report_batches: dict[int, tuple[tuple[int, int], ...]] = {}
        self._answer_leases: dict[int, _AnswerLease] = {}  # token -> its carrier report
        self._replies: list[Reply] = []
        self._logs: list[NodeLog] = []
        self._forwards: list[Forward] = []
        # Leader -> when a forward to it last failed (no answer in time, or unreachable),
        # until one is answered again: see `_forward_refusal`.
        self._forward_failed_ms: dict[str, int] = {}
        self._outstanding: NodeReady | None = None
        # Apply results of the latest advance, for observers (simulator checks, metrics).
        self.last_applied: tuple[ApplyResult, ...] = ()

    # --------------------------------------------------------------- queries

    @property
    def manifest(self) -> Manifest:
        return self.machine.manifest

    @property
    def raft(self) -> ReplicaCore:
        return self.replica

    @property
    def is_leader(self) -> bool:
        return self.replica.raft.role is Role.LEADER

    @property
    def leader(self) -> str:
        return self.replica.raft.leader

    @property
    def pending_requests(self) -> int:
        return len(self._pending)

    def peer_addresses(self) -> dict[NodeId, str]:
        """The peers to keep streams to: the members (the same dict until it changes)."""
        return self._peer_addresses.current(self.replica.raft.membership)

    def address_of(self, node: NodeId) -> str:
        """Where `node` listens, as far as this node knows ("" if it does not)."""
        self._peer_addresses.current(self.replica.raft.membership)
        return self._peer_addresses.address(node)

    # ---------------------------------------------------------------- inputs

    def step(self, message: Message, now_ms: int, wall_ms: int) -> None:
        self._clock(now_ms, wall_ms)
        self.replica.step(message, now_ms)
        self._after_input()

    def tick(self, now_ms: int, wall_ms: int) -> None:
        self._clock(now_ms, wall_ms)
        self.replica.tick(now_ms)
        self._after_input()
        self._expire()
        if self.is_leader and now_ms >= self._next_duties_ms:
            self._next_duties_ms = now_ms + self.config.duties_interval_ms
            self._run_duties()
            self._after_input()

    def request(
        self,
        request_id: int,
        request: ApiRequest,
        now_ms: int,
        wall_ms: int,
        forwarded: bool = False,
    ) -> None:
        """An API request; exactly one final reply comes back under `request_id`.
        `forwarded`: it came from a follower; it is never forwarded again."""
        assert request_id > 0, "request ids are positive (negative ones are the duties')"
        assert request_id not in self._pending, f"request id {request_id} reused"
        self._clock(now_ms, wall_ms)
        self._after_input()
        if len(self._pending) >= self.config.requests_max:
            self.stats.requests_refused_busy += 1
            self._error(
                request_id,
                ErrorCode.UNAVAILABLE,
                f"{self.id} has {len(self._pending)} requests waiting; retry",
            )
            return
        if not forwarded and self._forwarding(request):
            refusal = self._forward_refusal()
            if refusal:
                self.stats.forwards_refused += 1
                self._error(request_id, ErrorCode.UNAVAILABLE, refusal)
            else:
                self._forward(request_id, request)
        else:
            self._dispatch(request_id, request)
        self._after_input()

    def forwarded(
        self, request_id: int, outcome: ApiResponse | ApiError, now_ms: int, wall_ms: int
    ) -> None:
        """The leader's answer to a request this node forwarded (or the failure to get
        one, as an ApiError)."""
        self._clock(now_ms, wall_ms)
        pending = self._pending.get(request_id)
        if pending is None or pending.stage is not _Stage.FORWARDED:
            return  # answered already (its deadline passed) or forgotten
        del self._pending[request_id]
        leader = pending.forwarded_to
        failed = isinstance(outcome, ApiError) and outcome.code in (
            ErrorCode.UNAVAILABLE,
            ErrorCode.DEADLINE_EXCEEDED,
        )
        if failed:
            self._forward_failed_ms[leader] = self._now_ms
        else:
            self._forward_failed_ms.pop(leader, None)  # the leader answered: it is reachable
        if isinstance(outcome, ApiError):
            if failed:
                # Not the transport's words: this node answered, the leader is what it
                # could not reach (a caller must not take this node for down).
                outcome = ApiError(
                    ErrorCode.UNAVAILABLE,
                    f"{self.id} could not forward to leader {leader} ({outcome.code}); "
                    "try another node",
                )
            self._replies.append(Reply(request_id, None, outcome, True))
        else:
            self._replies.append(Reply(request_id, outcome, None, True, leader))
        self._after_input()

    def _forwarding(self, request: ApiRequest) -> bool:
        """Forward a leader-only request when a live leader is known here."""
        if not self.config.forward_requests or self.is_leader:
            return False
        if isinstance(request, WatchRequest):
            return False
        if isinstance(request, StatusRequest) and request.local:
            return False
        raft = self.replica.raft
        heard = raft.leader_heard_ms
        return bool(
            raft.leader
            and heard is not None
            and self._now_ms - heard < raft.config.election_timeout_ms_min
        )

    def _forward_refusal(self) -> str:
        """Why a request is answered at once instead of forwarded ("" to forward it).

        A forward to the leader that failed (held until its deadline: a one-way cut, the
        leader's replies still reach this node, so it still counts the leader live) says
        this node cannot reach it. Until a forward is answered again, one request at a
        time goes on to the leader as a probe; the others are answered UNAVAILABLE at
        once, naming why, so that their callers ask another node now instead of waiting
        for their deadline here."""
        leader = self.leader
        failed_ms = self._forward_failed_ms.get(leader)
        if failed_ms is None:
            return ""
        probing = any(
            p.stage is _Stage.FORWARDED and p.forwarded_to == leader for p in self._pending.values()
        )
        if not probing:
            return ""
        return (
            f"{self.id} cannot reach leader {leader}: a forward to it failed "
            f"{self._now_ms - failed_ms} ms ago and the one sent since is unanswered; "
            "try another node"
        )

    def _forward(self, request_id: int, request: ApiRequest) -> None:
        leader = self.leader
        timeout_ms = self.config.request_timeout_ms
        if isinstance(request, LeaseRequest):
            timeout_ms += min(max(request.wait_ms, 0), self.config.lease_wait_ms_max)
        if isinstance(request, MembershipRequest):
            timeout_ms += min(max(request.wait_ms, 0), PROMOTE_WAIT_MS_MAX)
        pending = _Pending(
            request, _Stage.FORWARDED, self._now_ms + timeout_ms, forwarded_to=leader
        )
        self._wait(request_id, pending)
        self._forwards.append(Forward(request_id, leader, request, timeout_ms))
        self.stats.forwarded += 1

    def _dispatch(self, request_id: int, request: ApiRequest) -> None:
        wall_ms = self._cluster_ms  # commands carry cluster time, not this node's wall clock
        match request:
            case SubmitRequest():
                self._submit(request_id, request)
            case GetRequest() | ListRequest():
                self._read(request_id, request)
            case CancelRequest():
                if self._leading_or_refuse(request_id):
                    self._propose(request_id, request, CancelTask(wall_ms, request.task_id))
            case StatusRequest():
                leader = self.leader
                if not request.local and leader and leader != self.id:
                    self._not_leader(request_id)  # the leader's view has every member's lag
                else:
                    self._reply(request_id, self.status())
            case WatchRequest():
                self._watch(request_id, request)
            case AckExportRequest():
                if self._leading_or_refuse(request_id):
                    ack = AckExport(wall_ms, request.through_seq)
                    self._propose(request_id, request, ack)
            case RegisterRequest():
                if self._leading_or_refuse(request_id):
                    command = RegisterAgent(
                        wall_ms,
                        request.agent_id,
                        request.cloud,
                        request.region,
                        request.arch,
                        request.capacity,
                        max(1, min(request.lease_depth, self.config.agent_lease_depth_max)),
                    )
                    self._propose(request_id, request, command)
            case HeartbeatRequest():
                self._heartbeat(request_id, request)
            case LeaseRequest():
                self._lease(request_id, request)
            case ReportRequest():
                self._report(request_id, request)
            case MembershipRequest():
                self._change_membership(request_id, request)

    def forget(self, request_id: int) -> None:
        """The caller went away: drop the request (a proposal may still apply)."""
        self._no_ready_outstanding()
        pending = self._pending.pop(request_id, None)
        if pending is None:
            return
        self._parked.pop(request_id, None)
        self._promotions.pop(request_id, None)
        self._watches.pop(request_id, None)
        self._unclaim(request_id, pending)
        self._hand_off_leased(pending)

    # --------------------------------------------------------------- outputs

    def next_deadline_ms(self) -> int:
        deadline = self.replica.next_deadline_ms()
        if self.is_leader:
            deadline = min(deadline, self._next_duties_ms)
        while self._deadlines:
            at, request_id = self._deadlines[0]
            pending = self._pending.get(request_id)
            if pending is not None and pending.deadline_ms == at:
                return min(deadline, at)
            heapq.heappop(self._deadlines)  # answered or moved on: a stale entry
        return deadline

    def has_ready(self) -> bool:
        return bool(self._replies or self._logs or self._forwards) or self.replica.has_ready()

    def ready(self) -> NodeReady:
        self._no_ready_outstanding()
        replica = self.replica.ready()
        assert not replica.outcomes, "outcomes are taken as they happen (_after_input)"
        # Answers that hand tasks to agents leave first: a runtime resumes its callers in
        # this order, and one commit often answers a submit and the poll that leased its
        # task. The agent's start is on the task's path; the client's acknowledgement is
        # not (bench/bench_agent.py's lone task: ~0.2 ms). Stable: the rest keep their
        # order, and a watch's events never overtake each other.
        replies = sorted(self._replies, key=_hands_out_no_tasks)
        ready = NodeReady(replica, tuple(replies), tuple(self._logs), tuple(self._forwards))
        self._replies.clear()
        self._logs.clear()
        self._forwards.clear()
        self._outstanding = ready
        return ready

    def advance(self, ready: NodeReady) -> None:
        assert self._outstanding is ready, "advance the Ready last handed out"
        self._outstanding = None
        self.replica.advance(ready.replica)
        results, self.machine.results = tuple(self.machine.results), []
        self.last_applied = results
        self._cluster_clock.applied(self.manifest.latest_command_ms, self._now_ms)
        applied = self.replica.raft.applied
        for index in [i for i in self._incoming if i <= applied]:
            del self._incoming[index]  # applied (or replaced by another term's entry)
        # Outcomes first (a lease poll that leased nothing parks), then the wake-ups of
        # what was applied (which may be work for that very poll).
        self._after_input()
        self._on_applied(results)
        self._after_input()

    def take_deferred_hard_state(self) -> HardState | None:
        return self.replica.take_deferred_hard_state()

    def health(self) -> tuple[bool, str]:
        """Whether this node is a working member of a working cluster (for the gRPC
        health service and probes): it knows a leader it heard from within an election
        timeout (or leads with a quorum), is not restoring a lost store, and has applied
        close to what it knows is committed."""
        raft = self.replica.raft
        timeout_ms = raft.config.election_timeout_ms_min
        if raft.restoring:
            return False, "restoring: this node's store is new and a leader has not caught it up"
        if raft.role is Role.LEADER:
            if not raft.quorum_active():
                return False, "leader without a quorum in the last election timeout"
        elif not raft.leader:
            return False, f"no leader known ({raft.role.value})"
        elif raft.leader_heard_ms is None or self._now_ms - raft.leader_heard_ms > timeout_ms:
            return False, f"leader {raft.leader} not heard from for over {timeout_ms} ms"
        lag = raft.commit - raft.applied
        if lag > APPLY_LAG_ENTRIES_MAX:
            return False, f"{lag} committed entries not applied yet"
        return True, "serving"

    def replication_lag(self) -> dict[str, int]:
        """The leader's view: entries each follower lacks ({} on a follower)."""
        raft = self.replica.raft
        if raft.role is not Role.LEADER:
            return {}
        last = raft.log.last_index
        return {peer: last - progress.match for peer, progress in sorted(raft.progress.items())}

    def status(self) -> StatusResponse:
        raft = self.replica.raft
        leader = raft.leader
        membership = raft.membership
        # The configuration's members; while it knows none (it joins), the peers named.
        names = membership.members if membership.voters else tuple(sorted(self._configured()))
        members = []
        for member_id in names:
            address = self.address_of(member_id)
            voter = member_id in membership.voters or not membership.voters
            if member_id == self.id:
                members.append(
                    MemberView(
                        member_id,
                        address,
                        raft.role.value if voter else "learner",
                        raft.term,
                        raft.commit,
                        raft.applied,
                        True,
                        0.0,
                        voter,
                        raft.role is Role.LEADER,
                    )
                )
                continue
            progress = raft.progress.get(member_id) if raft.role is Role.LEADER else None
            if progress is not None:
                heard = self._now_ms - progress.last_heard_ms
                reachable = heard < raft.config.election_timeout_ms_min
            else:
                heard_leader = raft.leader_heard_ms
                reachable = (
                    member_id == leader
                    and heard_leader is not None
                    and self._now_ms - heard_leader < raft.config.election_timeout_ms_min
                )
            role = "leader" if member_id == leader else "follower" if voter else "learner"
            members.append(
                MemberView(
                    member_id,
                    address,
                    role,
                    0,
                    progress.match if progress is not None else 0,
                    0,
                    reachable,
                    0.0,
                    voter,
                    raft.caught_up(member_id),
                )
            )
        agents = []
        for agent in self.manifest.list_agents():
            seen = self.duties.last_seen_ms(agent.id)
            agents.append(
                AgentView(
                    agent.id,
                    agent.cloud,
                    agent.region,
                    agent.arch,
                    agent.capacity,
                    agent.state.value,
                    self._cluster_ms - seen if seen is not None else -1,
                )
            )
        counts = self.manifest.status_counts()  # every state, FAILED included
        return StatusResponse(
            node_id=self.id,
            leader_id=leader,
            leader_address=self.address_of(leader) if leader else "",
            term=raft.term,
            commit_index=raft.commit,
            members=tuple(members),
            agents=tuple(agents),
            tasks_by_state=tuple(sorted(counts.items())),
            voters=membership.voters,
            learners=membership.learners,
            membership_index=max(0, raft.membership_index),
        )

    def _configured(self) -> dict[NodeId, str]:
        return dict(self.config.addresses)

    # -------------------------------------------------------------- requests

    def _submit(self, request_id: int, request: SubmitRequest) -> None:
        if not self._leading_or_refuse(request_id):
            return
        if not request.tasks:
            self._error(
                request_id, ErrorCode.INVALID_ARGUMENT, "empty submit: give at least one task"
            )
            return
        limits = self.config.limits
        specs = []
        unplaceable: dict[tuple[Resources, str, str], str] = {}  # batches repeat shapes
        for position, task in enumerate(request.tasks):
            where = f"tasks[{position}]"
            if not task.idempotency_key:
                self._error(
                    request_id, ErrorCode.INVALID_ARGUMENT, f"{where}.idempotency_key: required"
                )
                return
            # Names checked first, as every replica would: later messages quote them.
            for label, name in (
                ("idempotency_key", task.idempotency_key),
                ("function", task.function),
                ("cloud", task.cloud),
                ("region", task.region),
            ):
                size = len(name.encode("utf-8", "surrogatepass"))
                if size > limits.name_bytes_max:
                    self._error(
                        request_id,
                        ErrorCode.RESOURCE_EXHAUSTED,
                        f"{where}.{label} {quote(name)} is {size} bytes; limit "
                        f"name_bytes_max={limits.name_bytes_max}",
                    )
                    return
            # A task no agent could ever run would wait PENDING for ever without a
            # word: refused, saying what it needs and what the agents have.
            shape = (task.resources, task.cloud, task.region)
            if shape not in unplaceable:
                unplaceable[shape] = self.manifest.unplaceable(
                    task.resources, task.cloud or None, task.region or None
                )
            if unplaceable[shape]:
                self._error(
                    request_id,
                    ErrorCode.FAILED_PRECONDITION,
                    f"{where}: no agent can ever run it: {unplaceable[shape]}; register an "
                    "agent that big (or ask for less) and submit again",
                )
                return
            args_json = task.args_json or "{}"
            # The limit applies to what the client sent: the manifest only sees the
            # canonical form, so whitespace padding would otherwise slip past it.
            size = len(args_json.encode())
            if size > limits.args_bytes_max:
                self._error(
                    request_id,
                    ErrorCode.RESOURCE_EXHAUSTED,
                    f"{where}: args_json is {size} bytes; limit "
                    f"args_bytes_max={limits.args_bytes_max}",
                )
                return
            try:
                self._validate_args(task.function, args_json)
                # Logged canonical (as every replica stores it): no padding in the log.
                args_json = canonical_json(args_json, f"{where}.args_json")
            except ValueError as error:  # TaskArgsError and CommandError both are
                self._error(request_id, ErrorCode.INVALID_ARGUMENT, f"{where}: {error}")
                return
            specs.append(
                TaskSpec(
                    idempotency_key=task.idempotency_key,
                    function=task.function,
                    args_json=args_json,
                    resources=task.resources,
                    priority=task.priority,
                    max_attempts=task.max_attempts or self.config.max_attempts_default,
                    timeout_ms=task.timeout_ms or self.config.task_timeout_ms_default,
                    cloud=task.cloud or None,
                    region=task.region or None,
                    isolated=task.isolated,
                )
            )
        index = self._propose(request_id, request, SubmitTasks(self._cluster_ms, tuple(specs)))
        if index is not None:
            self._incoming[index] = tuple(specs)
            if self._parked:
                self._wake_parked()  # a poll these tasks fit goes right behind the submit

    def _read(self, request_id: int, request: GetRequest | ListRequest) -> None:
        if not self._leading_or_refuse(request_id):
            return
        try:
            self.replica.read(request_id)
        except NotLeader:
            self._not_leader(request_id)
            return
        self._wait(request_id, _Pending(request, _Stage.READING, self._request_deadline()))

    def _watch(self, request_id: int, request: WatchRequest) -> None:
        """Register the watch and send each known task's current state, in the same
        step: a change applied after this step is an event, one before it is in the
        current state, so nothing falls between (a waiter needs no Get first)."""
        wanted = frozenset(request.task_ids)
        if request.known_only:
            unknown = sorted(t for t in wanted if self.manifest.get_task(t) is None)
            if unknown:
                # Not "no such task" for sure on a follower that lags: the caller asks
                # the leader (a Get) before it believes it.
                names = ", ".join(quote(t) for t in unknown[:3])
                more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
                where = f" at applied index {self.manifest.applied_index} of {self.id}"
                self._error(request_id, ErrorCode.NOT_FOUND, f"no task {names}{more}{where}")
                return
        self._pending[request_id] = _Pending(request, _Stage.WATCHING, 0)
        self._watches[request_id] = wanted
        applied = self.manifest.applied_index
        for task_id in sorted(wanted):
            task = self.manifest.get_task(task_id)
            if task is not None:
                self._event(request_id, TaskEvent(task_view(task), applied))

    def _heartbeat(self, request_id: int, request: HeartbeatRequest) -> None:
        if not self._leading_or_refuse(request_id):
            return
        agent = self.manifest.get_agent(request.agent_id)
        known = agent is not None and agent.state is AgentState.ALIVE
        revoked: tuple[str, ...] = ()
        if known and self.duties.leading_since_ms is not None:
            self.duties.heartbeat(
                request.agent_id,
                request.free,
                tuple(sorted(request.running_task_ids)),
                self._cluster_ms,
                tuple(sorted(request.queued_task_ids)),
            )
            revoked = self._revoked(
                request.agent_id, (*request.running_task_ids, *request.queued_task_ids)
            )
        self._reply(request_id, HeartbeatResponse(known=known, revoked_task_ids=revoked))

    def _report(self, request_id: int, request: ReportRequest) -> None:
        """Reports wait while one batch of them is being committed, then go together
        as one ReportResults: a lone report on an idle cluster goes at once."""
        if not self._leading_or_refuse(request_id):
            return
        # Checked alone (as every replica checks it), so one bad request cannot sink a
        # batch of good ones.
        if self._encode(request_id, ReportResults(self._cluster_ms, _reports_of(request))) is None:
            return
        self._wait(request_id, _Pending(request, _Stage.QUEUED, self._request_deadline()))
        self._report_queue.append(request_id)
        if not self._report_batches:
            self._flush_reports()

    def _flush_reports(self) -> None:
        limits = self.config.limits
        budget = min(self.config.replica.proposal_bytes_max, limits.command_bytes_max) // 2
        batch: list[tuple[int, int]] = []
        reports: list[Report] = []
        queue, self._report_queue = self._report_queue, []
        for position, request_id in enumerate(queue):
            pending = self._pending.get(request_id)
            if pending is None or pending.stage is not _Stage.QUEUED:
                continue  # answered meanwhile (deadline) or forgotten
            request = pending.request
            assert isinstance(request, ReportRequest)
            mine = _reports_of(request)
            size = sum(len(r.result_json or "") + len(r.error or "") + 256 for r in mine)
            if reports and (len(reports) + len(mine) > limits.batch_tasks_max or size > budget):
                self._report_queue = queue[position:]  # the next batch
                break
            budget -= size
            batch.append((request_id, len(mine)))
            reports.extend(mine)
        if not batch:
            return
        self._internal_tokens -= 1
        token = self._internal_tokens
        try:
            self.replica.propose(
                encode_command(ReportResults(self._cluster_ms, tuple(reports))), token
            )
        except (NotLeader, ProposalDropped) as error:
            for request_id, _ in batch:
                self._pending.pop(request_id)
                if isinstance(error, NotLeader):
                    self._not_leader(request_id)
                else:
                    self._error(request_id, ErrorCode.UNAVAILABLE, f"not proposed: {error}; retry")
            return
        self.stats.proposed["ReportResults"] = self.stats.proposed.get("ReportResults", 0) + 1
        for request_id, _ in batch:
            self._pending[request_id].stage = _Stage.PROPOSED
        self._report_batches[token] = tuple(batch)
        released = tuple((report.agent_id, report.task_id) for report in reports)
        self._releasing_batches[token] = released
        for agent_id, task_id in released:
            self._releasing.setdefault(agent_id, {})[task_id] = None
        self._release_room(batch, reports)
        if self._parked:
            self._wake_parked()  # a poll waiting for this capacity goes right behind

    def _release_room(self, batch: list[tuple[int, int]], reports: list[Report]) -> None:
        """The room these reports free, per agent (only a report of the attempt that
        holds its lease frees anything; others are fenced), goes to one place, since two
        would both lease into it: leased at once into the answer of the agent's last
        report here that asks for it (`lease_into_answer`), when a task fits; else to the
        agent's first parked poll (its standing poll, goml.agent.core: sent before these
        reports, the agent left their room out of its other poll). Into the answer, a
        freed slot is refilled with one call per task (the report), not three (the
        report, the standing poll's answer and its successor)."""
        freed: dict[str, tuple[Resources, int, int]] = {}  # agent -> room, slots, carrier
        owners = [request_id for request_id, count in batch for _ in range(count)]
        for request_id, report in zip(owners, reports, strict=True):
            task = self.manifest.get_task(report.task_id)
            if (
                task is None
                or task.lease is None
                or task.lease.agent_id != report.agent_id
                or task.epoch != report.epoch
            ):
                continue
            room, slots, carrier = freed.get(report.agent_id, (Resources(0.0, 0, 0), 0, 0))
            request = self._pending[request_id].request
            assert isinstance(request, ReportRequest)
            if request.lease_into_answer:
                carrier = request_id
            freed[report.agent_id] = (room.plus(task.resources), slots + 1, carrier)
        if not freed:
            return
        polls: dict[str, _Pending] = {}
        for request_id in self._parked:
            pending = self._pending.get(request_id)
            if pending is not None and isinstance(pending.request, LeaseRequest):
                polls.setdefault(pending.request.agent_id, pending)
        for agent_id, (room, slots, carrier) in freed.items():
            if carrier and self._lease_into_answer(agent_id, room, slots, carrier):
                continue
            poll = polls.get(agent_id)
            if poll is not None:
                poll.released = poll.released.plus(room)
                poll.released_slots += slots

    def _lease_into_answer(self, agent_id: str, room: Resources, slots: int, carrier: int) -> bool:
        """Propose a LeaseTasks into `room` whose tasks go in report `carrier`'s answer,
        right behind the reports that free it (same rule and claims as a poll's lease).
        False when nothing would be leased now (nothing fits, the agent is down, or a
        lease of it is in flight: that one applies first) or the proposal was dropped."""
        probe = LeaseRequest(agent_id, Resources(0.0, 0, 0), 0, 0)
        lease = _Pending(
            probe, _Stage.PROPOSED, self._request_deadline(), released=room, released_slots=slots
        )
        claim = self._lease_claim(probe, lease)
        if not claim:
            return False
        free, max_tasks = _poll_room(probe, lease)
        command = LeaseTasks(
            self._cluster_ms,
            agent_id,
            self.config.duties.lease_ms,
            max(1, min(max_tasks, self.config.limits.lease_tasks_max)),
            free,
        )
        self._internal_tokens -= 1
        token = self._internal_tokens
        try:
            self.replica.propose(encode_command(command), token)
        except (NotLeader, ProposalDropped):
            return False
        self.stats.proposed["LeaseTasks"] = self.stats.proposed.get("LeaseTasks", 0) + 1
        self._claimed.update(claim)
        self._leasing.setdefault(agent_id, {})[token] = None
        self._answer_leases[token] = _AnswerLease(carrier, agent_id, claim, room, slots)
        self._pending[carrier].lease_token = token
        return True

    def _answer_lease_outcome(self, token: int, outcome: Outcome) -> None:
        lease = self._answer_leases.pop(token)
        self._claimed.difference_update(lease.claim)
        leasing = self._leasing.get(lease.agent_id)
        if leasing is not None:
            leasing.pop(token, None)
            if not leasing:
                del self._leasing[lease.agent_id]
        tasks: tuple[LeasedTask, ...] = ()
        if isinstance(outcome, Applied):
            result = outcome.result
            assert isinstance(result, ApplyResult)
            if result.ok:
                tasks = tuple(_leased(t) for t in result.tasks)
                if not tasks:
                    self.stats.leases_empty += 1
        # What the lease left of the room (fewer tasks fitted, or none: not applied) is
        # the standing poll's, as if the reports had freed it for that poll.
        room, slots = lease.room, lease.slots - len(tasks)
        for task in tasks:
            room = room.minus(task.resources)
        poll = self._first_parked_poll(lease.agent_id)
        if poll is not None:
            standing = self._pending[poll]
            standing.released = standing.released.plus(room)
            standing.released_slots += max(0, slots)
            self._wake_parked()  # it waited for this lease to apply
        pending = self._pending.get(lease.carrier)
        if pending is None or pending.lease_token != token:
            self._hand_to_poll(lease.agent_id, tasks)
            return
        pending.lease_token = 0
        pending.leased = tasks
        if pending.stage is _Stage.CARRYING:
            assert pending.answer is not None
            del self._pending[lease.carrier]
            self._reply(lease.carrier, replace(pending.answer, tasks=tasks))

    def _hand_off_leased(self, pending: _Pending) -> None:
        """A report answered without the tasks already leased into its answer."""
        if pending.leased:
            request = pending.request
            assert isinstance(request, ReportRequest)
            self._hand_to_poll(request.agent_id, pending.leased)
            pending.leased = ()

    def _hand_to_poll(self, agent_id: str, tasks: tuple[LeasedTask, ...]) -> None:
        """Tasks leased into a report's answer that was given without them (its caller
        went away, its deadline passed, or the report failed): they go in the answer of
        the agent's first parked poll, else they wait for their lease to expire."""
        if not tasks:
            return
        poll = self._first_parked_poll(agent_id)
        if poll is not None:
            del self._parked[poll]
            del self._pending[poll]
            self._reply(poll, LeaseResponse(tasks, lease_poll_is_heartbeat=True))
            return
        ids = ", ".join(t.task_id for t in tasks)
        self._log(
            LogLevel.WARNING,
            f"tasks {ids} leased to agent {agent_id} into an answer that went without them: "
            "they are requeued when their lease expires",
        )

    def _reports_outcome(self, token: int, outcome: Outcome) -> None:
        batch = self._report_batches.pop(token)
        for agent_id, task_id in self._releasing_batches.pop(token, ()):
            releasing = self._releasing.get(agent_id, {})
            releasing.pop(task_id, None)
            if not releasing:
                self._releasing.pop(agent_id, None)
        items: tuple[ItemResult, ...] = ()
        if isinstance(outcome, Applied):
            result = outcome.result
            assert isinstance(result, ApplyResult)
            if result.ok:
                items = result.items
                assert len(items) == sum(count for _, count in batch), (items, batch)
        offset = 0
        for request_id, count in batch:
            mine, offset = items[offset : offset + count], offset + count
            pending = self._pending.pop(request_id, None)
            if pending is None:
                continue  # answered meanwhile (deadline) or forgotten
            if items:
                self._report_answer(request_id, pending, mine)
            elif isinstance(outcome, Applied):
                result = outcome.result
                assert isinstance(result, ApplyResult)
                self._refused(request_id, result)
                self._hand_off_leased(pending)
            else:
                why = outcome.why if isinstance(outcome, Lost | Unknown) else "not applied"
                self._error(request_id, ErrorCode.UNAVAILABLE, f"not committed: {why}; retry")
                self._hand_off_leased(pending)
        if self._report_queue and self.is_leader:
            self._flush_reports()

    def _report_answer(
        self, request_id: int, pending: _Pending, items: tuple[ItemResult, ...]
    ) -> None:
        answers = []
        for item in items:
            if item.code is Code.OK:
                answers.append(ResultAnswer(recorded=True, reason=""))
            elif item.code in _FENCED:
                # A newer attempt owns the task (or it ended): the agent drops its result.
                answers.append(ResultAnswer(recorded=False, reason=item.message))
            else:
                # The whole call is refused; its recorded results come back fenced if sent again.
                self._error(request_id, _REFUSAL_CODES[item.code], item.message)
                self._hand_off_leased(pending)
                return
        first, more = answers[0], tuple(answers[1:])
        answer = ReportResponse(first.recorded, first.reason, pending.leased, more)
        if pending.lease_token:
            # The lease proposed behind it has no outcome yet: the answer waits for it.
            pending.stage = _Stage.CARRYING
            pending.answer = answer
            self._wait(request_id, pending)
            return
        self._reply(request_id, answer)

    def _revoked(self, agent_id: str, task_ids: tuple[str, ...]) -> tuple[str, ...]:
        """Of the tasks an agent lists, those it holds no lease for any more. Only once
        this leader has applied everything before its own term (a leader still catching
        up could see a fresh lease as missing and stop a task for nothing)."""
        raft = self.replica.raft
        if raft.log.term_at(raft.applied) != raft.term:
            return ()
        revoked = []
        for task_id in sorted(set(task_ids)):
            task = self.manifest.get_task(task_id)
            if task is None or task.lease is None or task.lease.agent_id != agent_id:
                revoked.append(task_id)
        return tuple(revoked)

    def _lease(self, request_id: int, request: LeaseRequest) -> None:
        if not self._leading_or_refuse(request_id):
            return
        self._polled(request)
        wait_ms = min(max(request.wait_ms, 0), self.config.lease_wait_ms_max)
        pending = _Pending(
            request, _Stage.PROPOSED, self._request_deadline(), self._now_ms + wait_ms
        )
        self._try_lease(request_id, pending)

    def _polled(self, request: LeaseRequest) -> None:
        """A lease poll of a live agent counts as its heartbeat, on arrival and at each
        duties round while it is parked (LeaderDuties.polled)."""
        agent = self.manifest.get_agent(request.agent_id)
        if agent is None or agent.state is not AgentState.ALIVE:
            return  # unknown or down: its heartbeat answers known=false
        if self.duties.leading_since_ms is not None:
            self.duties.polled(request.agent_id, request.free, self._cluster_ms)

    def _try_lease(self, request_id: int, pending: _Pending) -> bool:
        """Propose a LeaseTasks if one would lease something, else park or answer
        empty. True when it proposed."""
        request = pending.request
        assert isinstance(request, LeaseRequest)
        claim = self._lease_claim(request, pending)
        if claim == ():
            if self._now_ms < pending.poll_deadline_ms:
                self._park(request_id, pending)
            else:
                self._pending.pop(request_id, None)
                self._reply(request_id, LeaseResponse((), lease_poll_is_heartbeat=True))
            return False
        # claim is None for an unknown or down agent: the command gives the refusal.
        limits = self.config.limits
        free, max_tasks = _poll_room(request, pending)
        command = LeaseTasks(
            self._cluster_ms,
            request.agent_id,
            self.config.duties.lease_ms,
            max(1, min(max_tasks, limits.lease_tasks_max)),
            free,
        )
        pending.stage = _Stage.PROPOSED
        pending.deadline_ms = self._request_deadline()
        pending.claim = claim or ()
        if self._propose(request_id, request, command, pending) is None:
            return False
        self._claimed.update(pending.claim)
        self._leasing.setdefault(request.agent_id, {})[request_id] = None
        return True

    def _unclaim(self, request_id: int, pending: _Pending) -> None:
        """A lease proposal is over (applied, lost, answered, forgotten)."""
        self._claimed.difference_update(pending.claim)
        if isinstance(pending.request, LeaseRequest):
            leasing = self._leasing.get(pending.request.agent_id)
            if leasing is not None:
                leasing.pop(request_id, None)
                if not leasing:
                    del self._leasing[pending.request.agent_id]

    def _first_parked_poll(self, agent_id: str) -> int | None:
        """The agent's longest-parked lease poll still waiting here, if any."""
        for request_id in self._parked:
            if self._parked_agent(request_id) == agent_id:  # "" for one gone meanwhile
                return request_id
        return None

    def _parked_agent(self, request_id: int) -> str:
        pending = self._pending.get(request_id)
        if pending is None or not isinstance(pending.request, LeaseRequest):
            return ""
        return pending.request.agent_id

    def _lease_claim(self, request: LeaseRequest, pending: _Pending) -> tuple[str, ...] | None:
        """The tasks a LeaseTasks proposed now for `request` would take: of those that
        exist, else of those that proposed submits will create. None: the agent is
        unknown or down (the command gives the refusal)."""
        free, max_tasks = _poll_room(request, pending)
        if max_tasks < 1 or request.agent_id in self._leasing:  # wait: reports, that lease
            agent = self.manifest.get_agent(request.agent_id)
            return None if agent is None or agent.state is not AgentState.ALIVE else ()
        claimed = frozenset(self._claimed)
        releasing = frozenset(self._releasing.get(request.agent_id, ()))
        claim = self.manifest.leasable_tasks(request.agent_id, free, max_tasks, claimed, releasing)
        if claim == () and self._incoming:
            claim = self.manifest.leasable_incoming(
                request.agent_id,
                free,
                max_tasks,
                claimed,
                releasing,
                sorted(self._incoming.items()),
            )
        return claim

    def _park(self, request_id: int, pending: _Pending) -> None:
        pending.stage = _Stage.PARKED
        pending.claim = ()
        self._parked[request_id] = None
        self.stats.polls_parked += 1
        self._wait(request_id, pending, pending.poll_deadline_ms)

    def _wake_parked(self) -> None:
        """Work that could fit was applied: wake parked polls in arrival order; each
        proposes only if a task not already claimed fits it, so no more polls wake
        than there are tasks for them."""
        for request_id in list(self._parked):
            pending = self._pending.get(request_id)
            if pending is None:
                self._parked.pop(request_id)
                continue
            request = pending.request
            assert isinstance(request, LeaseRequest)
            if self._lease_claim(request, pending) == ():
                continue
            del self._parked[request_id]
            self.stats.polls_woken += 1
            self._try_lease(request_id, pending)

    # -------------------------------------------------------------- proposing

    def _propose(
        self,
        request_id: int,
        request: ApiRequest,
        command: Command,
        pending: _Pending | None = None,
    ) -> int | None:
        """Propose `command` for a request: its log index, or None when refused (the
        request is answered here)."""
        data = self._encode(request_id, command)
        if data is None:
            self._pending.pop(request_id, None)
            return None
        try:
            index, _ = self.replica.propose(data, request_id)
        except NotLeader:
            self._pending.pop(request_id, None)
            self._not_leader(request_id)
            return None
        except ProposalDropped as error:
            self._pending.pop(request_id, None)
            self._error(request_id, ErrorCode.UNAVAILABLE, f"not proposed: {error}; retry")
            return None
        kind = type(command).__name__
        self.stats.proposed[kind] = self.stats.proposed.get(kind, 0) + 1
        self._wait(
            request_id, pending or _Pending(request, _Stage.PROPOSED, self._request_deadline())
        )
        return index

    def _encode(self, request_id: int, command: Command) -> bytes | None:
        try:
            data = encode_command(command)
        except CommandError as error:
            self._error(request_id, ErrorCode.INVALID_ARGUMENT, str(error))
            return None
        limit = min(self.config.replica.proposal_bytes_max, self.config.limits.command_bytes_max)
        if len(data) > limit:
            hint = ": split the batch" if isinstance(command, SubmitTasks) else ""
            self._error(
                request_id,
                ErrorCode.RESOURCE_EXHAUSTED,
                f"{type(command).__name__} is {len(data)} bytes encoded; "
                f"limit {limit} bytes per proposal{hint}",
            )
            return None
        return data

    def _run_duties(self) -> None:
        for request_id in self._parked:  # a parked poll's agent is alive until it goes
            pending = self._pending.get(request_id)
            if pending is not None and isinstance(pending.request, LeaseRequest):
                self._polled(pending.request)
        due = self.duties.due(self.manifest, self._cluster_ms)
        due += self.duties.limits_due(self.manifest, self.config.limits, self._cluster_ms)
        for command in due:
            kind = type(command).__name__
            try:
                data = encode_command(command)
                self._internal_tokens -= 1
                self.replica.propose(data, self._internal_tokens)
            except (CommandError, ProposalTooLarge) as error:
                self._log(LogLevel.WARNING, f"leader duty {kind} not proposed: {error}")
                continue
            except (NotLeader, ProposalDropped) as error:
                self._log(LogLevel.WARNING, f"leader duty {kind} not proposed: {error}")
                break
            self._duty_commands[self._internal_tokens] = kind
            self.stats.proposed[kind] = self.stats.proposed.get(kind, 0) + 1

    # ------------------------------------------------------------- membership

    def _change_membership(self, request_id: int, request: MembershipRequest) -> None:
        """`goml node add/remove/replace`: one single-server change (goml.raft.core).
        A promotion may wait for its learner to catch up; every other refusal of the
        Raft core (a change pending, not yet committed in this term, a quorum it would
        break) is answered FAILED_PRECONDITION with the core's reason."""
        if not self._leading_or_refuse(request_id):
            return
        kinds = {k.value for k in MembershipChangeKind}
        if request.kind not in kinds:
            self._error(
                request_id,
                ErrorCode.INVALID_ARGUMENT,
                f"unknown membership change {request.kind!r:.40}: one of {sorted(kinds)}",
            )
            return
        kind = ChangeKind(request.kind)
        node = request.node_id
        problem = ""
        if not node or len(node) > NODE_ID_CHARS_MAX:
            problem = f"a node id of 1 to {NODE_ID_CHARS_MAX} characters, not {node!r:.80}"
        elif kind is ChangeKind.ADD_LEARNER and not request.address:
            problem = f"add-learner {node}: give the address it listens on (host:port)"
        elif kind is not ChangeKind.ADD_LEARNER and request.address:
            problem = f"{kind.value} {node}: an address is only given to add-learner"
        elif len(request.address) > ADDRESS_CHARS_MAX:
            problem = f"an address of at most {ADDRESS_CHARS_MAX} characters"
        elif request.wait_ms < 0:
            problem = f"wait_ms {request.wait_ms} is negative"
        if problem:
            self._error(request_id, ErrorCode.INVALID_ARGUMENT, problem)
            return
        change = MembershipChange(kind, node, request.address)
        raft = self.replica.raft
        if (
            kind is ChangeKind.PROMOTE
            and request.wait_ms > 0
            and node in raft.membership.learners
            and not raft.caught_up(node)
        ):
            wait_ms = min(request.wait_ms, PROMOTE_WAIT_MS_MAX)
            self._wait(request_id, _Pending(request, _Stage.PROMOTING, self._now_ms + wait_ms))
            self._promotions[request_id] = change
            return
        self._propose_change(request_id, request, change)

    def _propose_change(
        self, request_id: int, request: MembershipRequest, change: MembershipChange
    ) -> None:
        try:
            self.replica.propose_membership(change, request_id)
        except NotLeader:
            self._not_leader(request_id)
            return
        except ProposalDropped as error:
            self._error(request_id, ErrorCode.UNAVAILABLE, f"not proposed: {error}; retry")
            return
        except MembershipRefused as error:
            self._error(request_id, ErrorCode.FAILED_PRECONDITION, str(error))
            return
        kind = f"Membership.{change.kind.value}"
        self.stats.proposed[kind] = self.stats.proposed.get(kind, 0) + 1
        self._log(LogLevel.INFO, f"proposed membership change: {change.kind.value} {change.node}")
        self._wait(request_id, _Pending(request, _Stage.PROPOSED, self._request_deadline()))

    def _promote_caught_up(self) -> None:
        raft = self.replica.raft
        for request_id, change in list(self._promotions.items()):
            if raft.caught_up(change.node) or change.node not in raft.membership.learners:
                del self._promotions[request_id]
                pending = self._pending.pop(request_id)
                assert isinstance(pending.request, MembershipRequest)
                self._propose_change(request_id, pending.request, change)

    def _membership_outcome(self, request_id: int, outcome: Outcome) -> None:
        self._pending.pop(request_id)
        if isinstance(outcome, Applied):
            membership = self.replica.raft.membership
            index = outcome.index
            self._log(LogLevel.INFO, f"membership change at {index} committed: {membership}")
            self._reply(
                request_id, MembershipResponse(index, membership.voters, membership.learners)
            )
        else:
            assert isinstance(outcome, Lost | Unknown), outcome
            self._error(request_id, ErrorCode.UNAVAILABLE, f"not committed: {outcome.why}; retry")

    # --------------------------------------------------------------- outcomes

    def _on_outcome(self, outcome: Outcome) -> None:
        token = outcome.token
        if token in self._report_batches:
            self._reports_outcome(token, outcome)
            return
        if token in self._answer_leases:
            self._answer_lease_outcome(token, outcome)
            return
        if token < 0:
            kind = self._duty_commands.pop(token, "duty")
            if isinstance(outcome, Applied):
                result = outcome.result
                assert isinstance(result, ApplyResult)
                if not result.ok:
                    self._log(LogLevel.INFO, f"leader duty {kind} refused: {result.message}")
            elif isinstance(outcome, Lost | Unknown):
                self._log(LogLevel.WARNING, f"leader duty {kind} not committed: {outcome.why}")
            return
        pending = self._pending.get(token)
        if pending is None:
            return  # answered already (deadline) or forgotten: nobody waits
        if isinstance(pending.request, MembershipRequest) and pending.stage is _Stage.PROPOSED:
            self._membership_outcome(token, outcome)
            return
        match outcome:
            case Applied():
                if pending.stage is _Stage.PROPOSED:
                    result = outcome.result
                    assert isinstance(result, ApplyResult)
                    self._applied(token, pending, result)
            case Lost() | Unknown():
                if pending.stage is _Stage.PROPOSED:
                    self._unclaim(token, pending)
                    self._pending.pop(token)
                    self._error(
                        token, ErrorCode.UNAVAILABLE, f"not committed: {outcome.why}; retry"
                    )
            case ReadReady():
                assert pending.stage is _Stage.READING
                self._pending.pop(token)
                self._answer_read(token, pending.request)
            case ReadFailed():
                assert pending.stage is _Stage.READING
                self._pending.pop(token)
                self._not_leader(token)

    def _applied(self, request_id: int, pending: _Pending, result: ApplyResult) -> None:
        request = pending.request
        if isinstance(request, LeaseRequest):
            self._unclaim(request_id, pending)
            pending.claim = ()
            if any(self._parked_agent(r) == request.agent_id for r in self._parked):
                self._wake_parked()  # its other poll waited for this lease to apply
            if result.ok and not result.tasks:
                self.stats.leases_empty += 1
            if result.ok and not result.tasks and self._now_ms < pending.poll_deadline_ms:
                if self.is_leader:
                    self._park(request_id, pending)
                    return
                self._pending.pop(request_id)
                self._not_leader(request_id)
                return
        self._pending.pop(request_id)
        if not result.ok:
            task = (
                self.manifest.get_task(request.task_id)
                if isinstance(request, CancelRequest)
                else None
            )
            if task is not None and task.state is TaskState.CANCELLED:
                # Cancel is idempotent: a retry after a lost reply finds the task cancelled.
                self._reply(request_id, CancelResponse(task_view(task)))
                return
            self._refused(request_id, result)
            return
        match request:
            case SubmitRequest():
                self._reply(request_id, SubmitResponse(result.task_ids, result.index))
            case CancelRequest():
                task = self.manifest.get_task(request.task_id)
                assert task is not None, "a cancelled task stays in the manifest"
                self._reply(request_id, CancelResponse(task_view(task)))
            case RegisterRequest():
                if self.duties.leading_since_ms is not None:
                    self.duties.heartbeat(request.agent_id, None, (), self._cluster_ms)
                interval = self.config.agent_heartbeat_interval_ms
                agent = self.manifest.get_agent(request.agent_id)
                depth = agent.lease_depth if agent is not None else 1
                self._reply(
                    request_id,
                    RegisterResponse(
                        heartbeat_interval_ms=interval,
                        lease_poll_is_heartbeat=True,
                        lease_depth=depth,
                    ),
                )
            case LeaseRequest():
                self._reply(
                    request_id,
                    LeaseResponse(
                        tuple(_leased(t) for t in result.tasks), lease_poll_is_heartbeat=True
                    ),
                )
            case AckExportRequest():
                watermark = self.manifest.export_watermark_seq
                self._reply(request_id, AckExportResponse(export_watermark_seq=watermark))
            case _:
                raise AssertionError(f"no proposal is made for {type(request).__name__}")

    def _answer_read(self, request_id: int, request: ApiRequest) -> None:
        if isinstance(request, GetRequest):
            task = self.manifest.get_task(request.task_id)
            if task is None:
                pruned = self.manifest.pruned_through_seq
                why = f" (finished tasks through #{pruned} are pruned)" if pruned else ""
                self._error(
                    request_id, ErrorCode.NOT_FOUND, f"no task {quote(request.task_id)}{why}"
                )
            else:
                self._reply(request_id, GetResponse(task_view(task)))
            return
        assert isinstance(request, ListRequest)
        limit = min(request.limit or self.config.list_limit_default, self.config.list_limit_max)
        try:
            tasks, next_token = list_page(self.manifest, request, max(1, limit))
        except PageTokenError as error:
            self._error(request_id, ErrorCode.INVALID_ARGUMENT, str(error))
            return
        manifest = self.manifest
        response = ListResponse(
            tuple(task_view(t) for t in tasks),
            next_page_token=next_token,
            finished_seq_last=manifest.finished_seq_last,
            pruned_through_seq=manifest.pruned_through_seq,
            export_watermark_seq=manifest.export_watermark_seq,
            tasks_kept=manifest.task_count,
            tasks_max=manifest.limits.tasks_max,
        )
        self._reply(request_id, response)

    def _on_applied(self, results: tuple[ApplyResult, ...]) -> None:
        wake = False
        for result in results:
            self.stats.applied[result.command] = self.stats.applied.get(result.command, 0) + 1
            if result.ok and result.command in WAKING_COMMANDS:
                wake = True
            if self._watches and result.task_ids:
                self._notify_watches(result)
        if wake and self._parked and self.is_leader:
            self._wake_parked()

    def _notify_watches(self, result: ApplyResult) -> None:
        for request_id, wanted in self._watches.items():
            for task_id in result.task_ids:
                if wanted and task_id not in wanted:
                    continue
                task = self.manifest.get_task(task_id)
                if task is not None:
                    self._event(request_id, TaskEvent(task_view(task), result.index))

    # ---------------------------------------------------------- time, leaders

    def _clock(self, now_ms: int, wall_ms: int) -> None:
        self._no_ready_outstanding()
        assert now_ms >= self._now_ms, "monotonic time never goes back"
        self._now_ms = now_ms
        self._wall_ms = wall_ms
        self._cluster_ms = self._cluster_clock.now_ms(now_ms, wall_ms)

    @property
    def cluster_ms(self) -> int:
        """Cluster time as of the last input (goml.cluster.clock): what a leader stamps."""
        return self._cluster_ms

    def _after_input(self) -> None:
        """After anything reached the replica: take its outcomes, follow leadership."""
        for outcome in self.replica.take_outcomes():
            self._on_outcome(outcome)
        leader = self.is_leader
        if leader and not self._was_leader:
            self._cluster_clock.start_leading(self._now_ms, self._wall_ms)
            self._cluster_ms = self._cluster_clock.now_ms(self._now_ms, self._wall_ms)
            # Heartbeats went to the old leader: the grace period starts now.
            self.duties.became_leader(self._cluster_ms)
            self._next_duties_ms = self._now_ms + self.config.duties_interval_ms
        elif not leader and self._was_leader:
            self._cluster_clock.stop_leading()
            self._incoming.clear()
            self.duties.lost_leadership()
            queued, self._report_queue = self._report_queue, []
            for request_id in queued:
                pending = self._pending.get(request_id)
                if pending is not None and pending.stage is _Stage.QUEUED:
                    del self._pending[request_id]
                    self._not_leader(request_id)
            for request_id in list(self._parked):
                self._parked.pop(request_id)
                if self._pending.pop(request_id, None) is not None:
                    self._not_leader(request_id)
            for request_id in list(self._promotions):
                self._promotions.pop(request_id)
                if self._pending.pop(request_id, None) is not None:
                    self._not_leader(request_id)
            for request_id, pending in list(self._pending.items()):
                if pending.stage is _Stage.CARRYING:
                    # Recorded; whether the lease behind it commits is for the next leader.
                    assert pending.answer is not None
                    del self._pending[request_id]
                    self._reply(request_id, pending.answer)
        self._was_leader = leader
        if self._promotions and leader:
            self._promote_caught_up()

    def _expire(self) -> None:
        while self._deadlines and self._deadlines[0][0] <= self._now_ms:
            at, request_id = heapq.heappop(self._deadlines)
            pending = self._pending.get(request_id)
            if pending is None or pending.deadline_ms != at:
                continue  # answered already, or its deadline moved
            del self._pending[request_id]
            if pending.stage is _Stage.PARKED:
                self._parked.pop(request_id, None)
                self._reply(request_id, LeaseResponse((), lease_poll_is_heartbeat=True))
                continue
            if pending.stage is _Stage.CARRYING:
                assert pending.answer is not None
                self._reply(request_id, pending.answer)  # its lease's tasks: _hand_to_poll
                continue
            if pending.stage is _Stage.PROMOTING:
                change = self._promotions.pop(request_id)
                self._error(
                    request_id,
                    ErrorCode.FAILED_PRECONDITION,
                    f"learner {change.node} did not catch up in time: is it running, and "
                    "can the leader reach it?",
                )
                continue
            self.stats.requests_expired += 1
            if pending.stage is _Stage.FORWARDED:
                self._forward_failed_ms[pending.forwarded_to] = self._now_ms
                self._error(
                    request_id,
                    ErrorCode.UNAVAILABLE,
                    f"forwarded to leader {pending.forwarded_to}: no answer in time; retry",
                )
                continue
            self._unclaim(request_id, pending)
            self._error(
                request_id,
                ErrorCode.UNAVAILABLE,
                f"not answered within {self.config.request_timeout_ms} ms (no quorum?); "
                "retry (with the same idempotency key, a retry is safe)",
            )
            self._hand_off_leased(pending)

    def _request_deadline(self) -> int:
        return self._now_ms + self.config.request_timeout_ms

    def _wait(self, request_id: int, pending: _Pending, deadline_ms: int | None = None) -> None:
        if deadline_ms is not None:
            pending.deadline_ms = deadline_ms
        self._pending[request_id] = pending
        heapq.heappush(self._deadlines, (pending.deadline_ms, request_id))

    # ---------------------------------------------------------------- replies

    def _leading_or_refuse(self, request_id: int) -> bool:
        if self.is_leader:
            return True
        self._not_leader(request_id)
        return False

    def _not_leader(self, request_id: int) -> None:
        leader = self.leader
        self._replies.append(
            Reply(
                request_id,
                None,
                ApiError(
                    ErrorCode.NOT_LEADER,
                    f"NOT_LEADER: {self.id} is not the leader (leader: {leader or 'unknown'})",
                    leader,
                    self.address_of(leader) if leader else "",
                ),
                True,
            )
        )

    def _refused(self, request_id: int, result: ApplyResult) -> None:
        self._error(request_id, _REFUSAL_CODES[result.code], result.message)

    def _error(self, request_id: int, code: ErrorCode, message: str) -> None:
        assert request_id not in self._pending, "answered requests wait no more"
        self._replies.append(Reply(request_id, None, ApiError(code, message), True))
        self._log(LogLevel.INFO, f"refused: {code} {message}")

    def _reply(self, request_id: int, response: ApiResponse) -> None:
        assert request_id not in self._pending, "answered requests wait no more"
        self._replies.append(Reply(request_id, response, None, True))

    def _event(self, request_id: int, event: TaskEvent) -> None:
        self._replies.append(Reply(request_id, event, None, False))

    def _log(self, level: LogLevel, text: str) -> None:
        self._logs.append(NodeLog(level, text))

    def _no_ready_outstanding(self) -> None:
        assert self._outstanding is None, "input between ready() and advance()"


def _hands_out_no_tasks(reply: Reply) -> bool:
    """The sort key of NodeCore.ready: False for answers that carry leased tasks."""
    return not (isinstance(reply.response, LeaseResponse | ReportResponse) and reply.response.tasks)


def _poll_room(request: LeaseRequest, pending: _Pending) -> tuple[Resources, int]:
    """A lease poll's room: what it says is free plus what reports freed since it came."""
    assert pending.released_slots >= 0, pending.released_slots
    return request.free.plus(pending.released), request.max_tasks + pending.released_slots


def _reports_of(request: ReportRequest) -> tuple[Report, ...]:
    """A report request's results (its first, then `more`), as ReportResults has them."""
    results = (
        TaskResult(
            request.task_id, request.epoch, request.success, request.result_json, request.error
        ),
        *request.more,
    )
    return tuple(
        Report(
            request.agent_id,
            r.task_id,
            r.epoch,
            r.success,
            r.result_json if r.success else None,
            None if r.success else (r.error or "failed"),
        )
        for r in results
    )
