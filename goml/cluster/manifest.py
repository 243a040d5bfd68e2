"""The task manifest: the replicated state machine that committed Raft entries drive.

Sans-IO and deterministic: `apply(index, data)` depends only on the entry and the
current state. Time comes inside each command (`now_ms`, stamped by the leader), task
ids come from the Raft index, and nothing iterates in hash order: tasks live in a dict
whose insertion order is submit order, agents are always walked sorted by id.

Refusals (bad input, stale epochs, illegal transitions, limits) are operating errors:
they come back as `ApplyResult(ok=False, code=...)` and change nothing except the
applied index (and the stale-report counter). Broken invariants are bugs and assert.

FAILED is an event here, not a resting state: a failed attempt sends the task straight
back to PENDING while attempts remain, else to DEAD (DESIGN.md "FAILED -> retry | DEAD").
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import TypeVar

from goml.api.types import TaskState as TaskState  # re-exported: the API's task states
from goml.cluster.commands import (
    INT_MAX,
    OMITTED_AT_DEFAULT,
    AckExport,
    CancelTask,
    Command,
    CommandError,
    ExpireLeases,
    Fields,
    LeaseTasks,
    MarkAgentDown,
    PruneTasks,
    RegisterAgent,
    RenewLeases,
    Report,
    ReportResult,
    ReportResults,
    Resources,
    SetLimits,
    StartTask,
    StartTasks,
    SubmitTasks,
    TaskSpec,
    decode_command,
    dumps,
    loads,
    plain,
    read_resources,
)
from goml.cluster.commands import (
    ManifestLimits as ManifestLimits,  # re-exported: defined with SetLimits, which carries one
)

# 2 adds `latest_command_ms` (goml.cluster.clock); 3 adds retention (each task's
# `finished_seq`, the `retention` section with tombstones); older formats are still read.
SNAPSHOT_FORMAT = 3
SNAPSHOT_FORMATS_READ = (1, 2, 3)


class TaskEvent(enum.StrEnum):
    LEASE = "LEASE"
    START = "START"
    SUCCEED = "SUCCEED"
    FAIL = "FAIL"
    EXPIRE = "EXPIRE"  # lease deadline passed, or the holder was marked down
    CANCEL = "CANCEL"
    RENEW = "RENEW"


_S, _E = TaskState, TaskEvent
# Every legal (state, event) pair; anything absent is refused. A PENDING target of FAIL
# or EXPIRE becomes DEAD once the attempts are used up (see `_target`).
TASK_TRANSITIONS: dict[tuple[TaskState, TaskEvent], TaskState] = {
    (_S.PENDING, _E.LEASE): _S.LEASED,
    (_S.PENDING, _E.CANCEL): _S.CANCELLED,
    (_S.LEASED, _E.START): _S.RUNNING,
    # A fast task may report before its StartTask is committed.
    (_S.LEASED, _E.SUCCEED): _S.SUCCEEDED,
    (_S.LEASED, _E.FAIL): _S.PENDING,
    (_S.LEASED, _E.EXPIRE): _S.PENDING,
    (_S.LEASED, _E.CANCEL): _S.CANCELLED,
    (_S.LEASED, _E.RENEW): _S.LEASED,
    (_S.RUNNING, _E.SUCCEED): _S.SUCCEEDED,
    (_S.RUNNING, _E.FAIL): _S.PENDING,
    (_S.RUNNING, _E.EXPIRE): _S.PENDING,
    (_S.RUNNING, _E.CANCEL): _S.CANCELLED,
    (_S.RUNNING, _E.RENEW): _S.RUNNING,
}
LEASE_HOLDING = frozenset({TaskState.LEASED, TaskState.RUNNING})
# What `status` counts tasks by: the API's states (proto TaskState) in lifecycle order,
# FAILED included (see `Manifest.status_counts`).
STATUS_FAILED = "FAILED"
STATUS_STATES = ("PENDING", "LEASED", "RUNNING", "SUCCEEDED", STATUS_FAILED, "DEAD", "CANCELLED")
TERMINAL = frozenset({TaskState.SUCCEEDED, TaskState.DEAD, TaskState.CANCELLED})


class AgentState(enum.StrEnum):
    ALIVE = "ALIVE"
    DOWN = "DOWN"


class AgentEvent(enum.StrEnum):
    REGISTER = "REGISTER"
    DOWN = "DOWN"
    LEASE = "LEASE"


AGENT_TRANSITIONS: dict[tuple[AgentState, AgentEvent], AgentState] = {
    (AgentState.ALIVE, AgentEvent.REGISTER): AgentState.ALIVE,
    (AgentState.DOWN, AgentEvent.REGISTER): AgentState.ALIVE,
    (AgentState.ALIVE, AgentEvent.DOWN): AgentState.DOWN,
    (AgentState.ALIVE, AgentEvent.LEASE): AgentState.ALIVE,
}


class Code(enum.StrEnum):
    OK = "OK"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    STALE_EPOCH = "STALE_EPOCH"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"


# The most of a user-supplied name an error message quotes (see `quote`).
QUOTE_CHARS_MAX = 64


def quote(name: str) -> str:
    """A user-supplied name (task id, agent id, key, function) as every node-side error
    quotes it: its repr, cut to QUOTE_CHARS_MAX characters with its length said. A
    message travels back as the gRPC status details (a header): a 100 KB id echoed in
    full breaks the call instead of answering it."""
    if len(name) <= QUOTE_CHARS_MAX:
        return repr(name)
    return f"{name[:QUOTE_CHARS_MAX]!r}... ({len(name)} characters)"


class SnapshotError(ValueError):
    """Snapshot bytes that do not describe a manifest (or not in canonical form)."""


@dataclass(frozen=True, slots=True)
class Lease:
    agent_id: str
    leased_ms: int
    deadline_ms: int

    def __post_init__(self) -> None:
        assert self.agent_id, self
        assert self.leased_ms >= 0, self
        assert self.deadline_ms >= 0, self


@dataclass(frozen=True, slots=True)
class Task:
    id: str
    seq: int  # submit order, the tie-break after priority
    idempotency_key: str
    content_digest: str  # sha256 of the canonical TaskSpec
    function: str
    args_json: str
    resources: Resources
    cloud: str | None
    region: str | None
    priority: int
    max_attempts: int
    timeout_ms: int
    state: TaskState
    attempts: int  # leases granted so far
    epoch: int  # bumped on every lease and every lease taken away; fences late reports
    lease: Lease | None
    submitted_ms: int
    finished_ms: int | None
    result_json: str | None
    error: str | None  # the latest failure, kept across retries
    results_recorded: int
    # Its place in the order tasks finished in (1, 2, ...), given by `Manifest._store`
    # when it turns terminal; retention prunes and exports page in this order.
    finished_seq: int | None = None
    # The agent of the latest lease, kept when the lease ends: who ran (or last tried)
    # the task. None until its first lease. Left out of snapshots while None, so the
    # snapshots of earlier versions read back byte for byte.
    last_agent_id: str | None = None
    # Runs in a fresh process of its own (TaskSpec.isolated). Left out of snapshots
    # while false, as `last_agent_id` while None.
    isolated: bool = False

    def __post_init__(self) -> None:
        # Invariants, checked on every change since every change builds a new Task.
        assert (self.lease is not None) == (self.state in LEASE_HOLDING), self
        # None with a lease only in a task restored from an earlier version's snapshot.
        assert self.lease is None or self.last_agent_id in (None, self.lease.agent_id), self
        assert self.last_agent_id is None or self.attempts >= 1, self
        assert 0 <= self.attempts <= self.max_attempts, self
        assert self.state is not TaskState.PENDING or self.attempts < self.max_attempts, self
        assert self.results_recorded == (1 if self.state is TaskState.SUCCEEDED else 0), self
        assert (self.result_json is not None) == (self.state is TaskState.SUCCEEDED), self
        assert (self.finished_ms is not None) == (self.state in TERMINAL), self
        assert self.epoch >= self.attempts, self
        assert self.finished_seq is None or self.state in TERMINAL, self
        assert self.finished_seq is None or self.finished_seq >= 1, self


def retained_bytes(task: Task) -> int:
    """What a task costs the Raft state beyond its fixed fields: its args, result and
    error (what retention's `finished_bytes_max` counts)."""
    return (
        len(task.args_json)
        + (len(task.result_json) if task.result_json is not None else 0)
        + (len(task.error) if task.error is not None else 0)
    )


@dataclass(frozen=True, slots=True)
class Tombstone:
    """What is left of a pruned task: enough for a resubmit of its idempotency key to
    get its id back (same content) or be refused (other content), not to run it again."""

    idempotency_key: str
    task_id: str
    content_digest: str
    finished_seq: int
    pruned_ms: int


@dataclass(frozen=True, slots=True)
class Agent:
    id: str
    cloud: str
    region: str
    arch: str
    capacity: Resources
    state: AgentState
    registered_ms: int  # latest registration
    # Leases it may hold, in multiples of its capacity (RegisterAgent.lease_depth); left
    # out of snapshots while 1, so earlier snapshots read back byte for byte.
    lease_depth: int = field(default=1, metadata={OMITTED_AT_DEFAULT: True})


@dataclass(frozen=True, slots=True)
class ItemResult:
    """The outcome of one item of a batch command (ReportResults, StartTasks)."""

    task_id: str
    code: Code
    message: str


@dataclass(frozen=True, slots=True)
class ApplyResult:
    index: int
    ok: bool
    code: Code
    message: str
    task_ids: tuple[str, ...] = ()  # submit: one per spec, in order; others: tasks touched
    tasks: tuple[Task, ...] = ()  # LeaseTasks: the leased tasks as leased
    command: str = ""  # the applied command's type name; "" when it did not decode
    items: tuple[ItemResult, ...] = ()  # batch commands: one per item, in order


class _Refusal(Exception):
    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        assert code is not Code.OK
        self.code = code
        self.message = message


# Digests of recent specs by identity, each beside its spec (so an id is never reused
# while its entry lives): every replica digests every spec it applies, and replicas in
# one process (the simulator, tests) apply the same decoded spec objects (decode_command
# is cached). By identity, not equality: 0.0 == -0.0 but they spell, and digest,
# differently, and a digest must never depend on what a cache saw before.
_DIGESTS: dict[int, tuple[TaskSpec, str]] = {}
_DIGESTS_MAX = 4096


def content_digest(spec: TaskSpec) -> str:
    """Digest of everything a submit says, so a retry can be told from a key collision."""
    cached = _DIGESTS.get(id(spec))
    if cached is not None and cached[0] is spec:
        return cached[1]
    digest = hashlib.sha256(dumps(plain(spec)).encode("ascii")).hexdigest()
    if len(_DIGESTS) >= _DIGESTS_MAX:
        del _DIGESTS[next(iter(_DIGESTS))]  # the oldest
    _DIGESTS[id(spec)] = (spec, digest)
    return digest


_Shape = tuple[Resources, str | None, str | None]


def _shape(task: Task) -> _Shape:
    """What the lease rule looks at to place a task: two tasks of one shape fit alike."""
    return (task.resources, task.cloud, task.region)


def _target(task: Task, event: TaskEvent) -> TaskState | None:
    target = TASK_TRANSITIONS.get((task.state, event))
    if target is TaskState.PENDING and task.attempts >= task.max_attempts:
        return TaskState.DEAD
    return target


def _illegal(task: Task, event: TaskEvent) -> _Refusal:
    legal = sorted(s.value for (s, e) in TASK_TRANSITIONS if e is event)
    return _Refusal(
        Code.FAILED_PRECONDITION,
        f"task {task.id} is {task.state}; {event} is legal only from {', '.join(legal)}",
    )


class Manifest:
    def __init__(self, limits: ManifestLimits) -> None:
        self._limits = limits
        self._applied_index = 0
        self._next_seq = 0
        self._tasks: dict[str, Task] = {}  # insertion order == seq order
        # Ids of tasks not yet terminal, in seq order: leasing, expiry and requeues look
        # only here, so their cost follows the open work, not the whole history.
        self._open: dict[str, None] = {}
        # The lease rule's view, kept by `_count` so a lease costs what it leases, not a
        # sort of every open task (at 10,000 queued tasks that was most of each node's
        # CPU): PENDING tasks in lease order (-priority, seq, id); how many PENDING tasks
        # there are of each shape (resources, cloud, region); and, by agent, the open
        # tasks that hold its leases.
        self._pending_order: list[tuple[int, int, str]] = []
        self._pending_shapes: dict[_Shape, int] = {}
        self._leased_by_agent: dict[str, dict[str, None]] = {}
        self._by_key: dict[str, str] = {}  # idempotency key -> task id
        self._agents: dict[str, Agent] = {}  # iterate sorted only
        self._stale_reports_refused = 0
        # The latest `now_ms` of any command applied: where cluster time stands.
        self._latest_command_ms: int | None = None
        # Retention. Terminal tasks in the order they finished (ids); entries before
        # `_finished_head` are pruned ones not yet cut off the list (pruning only ever
        # removes from the front, so what is left is always a suffix of that order).
        self._finished: list[str] = []
        self._finished_head = 0
        self._finished_seq_last = 0  # the finished_seq last given
        self._finished_bytes = 0  # retained_bytes of the terminal tasks kept
        self._pruned_through_seq = 0  # every finished task up to here is gone
        self._tasks_pruned = 0
        self._export_watermark_seq = 0  # every finished task up to here was archived
        # Keys of pruned tasks, in the order they were pruned (== finished_seq order).
        self._tombstones: dict[str, Tombstone] = {}
        # Running totals of the tasks kept, kept by `_store` and pruning, so that status
        # and metrics cost the same at 100 tasks as at 100,000 (they were scans).
        self._status_totals: dict[str, int] = dict.fromkeys(STATUS_STATES, 0)
        self._state_totals: dict[TaskState, int] = dict.fromkeys(TaskState, 0)
        # Each terminal task's JSON as the current snapshot format spells it: terminal is
        # final, so it is spelled once, not at every compaction (the snapshot was a
        # scan that re-encoded every task, the cost growing with the run's length).
        self._terminal_json: dict[str, str] = {}

    @property
    def latest_command_ms(self) -> int | None:
        """The latest time stamped into an applied command (None: none yet)."""
        return self._latest_command_ms

    def _count(self, task: Task, delta: int) -> None:
        assert delta in (1, -1), delta
        self._state_totals[task.state] += delta
        self._status_totals[_status_of(task)] += delta
        if task.state is TaskState.PENDING:
            key = (-task.priority, task.seq, task.id)
            shape = _shape(task)
            if delta > 0:
                bisect.insort(self._pending_order, key)
                self._pending_shapes[shape] = self._pending_shapes.get(shape, 0) + 1
            else:
                at = bisect.bisect_left(self._pending_order, key)
                assert self._pending_order[at] == key, (key, at)
                del self._pending_order[at]
                left = self._pending_shapes[shape] - 1
                if left:
                    self._pending_shapes[shape] = left
                else:
                    del self._pending_shapes[shape]
        if task.lease is not None and task.state not in TERMINAL:
            agent_id = task.lease.agent_id
            if delta > 0:
                self._leased_by_agent.setdefault(agent_id, {})[task.id] = None
            else:
                held = self._leased_by_agent[agent_id]
                del held[task.id]
                if not held:
                    del self._leased_by_agent[agent_id]

    def _leased(self, agent_id: str | None = None) -> list[Task]:
        """Open tasks holding a lease (of `agent_id`, or of any agent), in seq order:
        the order the scans of every open task they replace went in."""
        if agent_id is not None:
            ids: Iterable[str] = self._leased_by_agent.get(agent_id, ())
        else:
            ids = itertools.chain.from_iterable(self._leased_by_agent.values())
        return sorted((self._tasks[task_id] for task_id in ids), key=lambda t: t.seq)

    def leased_tasks(self) -> list[Task]:
        """Open tasks holding a lease, in submit order."""
        return self._leased()

    def _store(self, task: Task) -> Task:
        old = self._tasks.get(task.id)
        assert old is None or old.seq == task.seq
        assert old is None or old.state not in TERMINAL, "terminal is final"
        if old is not None:
            self._count(old, -1)
        if task.state in TERMINAL and task.finished_seq is None:
            self._finished_seq_last += 1
            task = replace(task, finished_seq=self._finished_seq_last)
            self._finished.append(task.id)
            self._finished_bytes += retained_bytes(task)
        self._tasks[task.id] = task
        self._count(task, 1)
        if task.state in TERMINAL:
            assert task.finished_seq is not None
            self._open.pop(task.id, None)
        else:
            self._open[task.id] = None
        return task

    def open_tasks(self) -> list[Task]:
        """Tasks not yet terminal (PENDING, LEASED, RUNNING), in submit order."""
        return [self._tasks[task_id] for task_id in self._open]

    # ---- applying entries

    def apply(self, index: int, data: bytes) -> ApplyResult:
        assert index > self._applied_index, (index, self._applied_index)
        result = self._apply(index, data)
        self._applied_index = index
        assert result.index == index
        assert result.ok == (result.code is Code.OK), result
        assert len(self._tasks) <= self._limits.tasks_max
        return result

    def _apply(self, index: int, data: bytes) -> ApplyResult:
        # A malformed entry is committed on every replica alike: refuse it the same way
        # everywhere rather than crash the whole cluster on it.
        if len(data) > self._limits.command_bytes_max:
            return ApplyResult(
                index,
                False,
                Code.RESOURCE_EXHAUSTED,
                f"command is {len(data)} bytes; limit command_bytes_max="
                f"{self._limits.command_bytes_max}",
            )
        try:
            command = decode_command(data)
        except CommandError as exc:
            return ApplyResult(index, False, Code.INVALID_ARGUMENT, str(exc))
        kind = type(command).__name__
        # Even a refused command moves cluster time: its leader stamped it.
        self._latest_command_ms = max(self._latest_command_ms or 0, command.now_ms)
        try:
            result = self._dispatch(index, command)
        except _Refusal as refusal:
            return ApplyResult(index, False, refusal.code, refusal.message, command=kind)
        # Built, not `replace`d: this runs for every entry on every replica.
        return ApplyResult(
            result.index,
            result.ok,
            result.code,
            result.message,
            result.task_ids,
            result.tasks,
            kind,
            result.items,
        )

    def _dispatch(self, index: int, command: Command) -> ApplyResult:
        # Every handler checks everything before changing anything: all-or-nothing.
        match command:
            case SubmitTasks():
                return self._submit(index, command)
            case CancelTask():
                return self._cancel(index, command)
            case RegisterAgent():
                return self._register(index, command)
            case MarkAgentDown():
                return self._mark_down(index, command)
            case LeaseTasks():
                return self._lease(index, command)
            case StartTask():
                return self._start(index, command)
            case ReportResult():
                return self._report(index, command)
            case ExpireLeases():
                return self._expire(index, command)
            case RenewLeases():
                return self._renew(index, command)
            case ReportResults():
                return self._report_results(index, command)
            case StartTasks():
                return self._start_tasks(index, command)
            case PruneTasks():
                return self._prune(index, command)
            case AckExport():
                return self._ack_export(index, command)
            case SetLimits():
                return self._set_limits(index, command)

    def _check_size(self, what: str, value: str | None, limit_name: str) -> None:
        limit: int = getattr(self._limits, limit_name)
        size = 0 if value is None else len(value.encode("utf-8"))
        if size > limit:
            raise _Refusal(
                Code.RESOURCE_EXHAUSTED, f"{what} is {size} bytes; limit {limit_name}={limit}"
            )

    def _task(self, task_id: str) -> Task:
        task = self._tasks.get(task_id)
        if task is None:
            raise _Refusal(Code.NOT_FOUND, f"no task {quote(task_id)}")
        return task

    def _agent(self, agent_id: str, event: AgentEvent) -> Agent:
        agent = self._agents.get(agent_id)
        if agent is None:
            raise _Refusal(Code.NOT_FOUND, f"no agent {quote(agent_id)}")
        if (agent.state, event) not in AGENT_TRANSITIONS:
            raise _Refusal(Code.FAILED_PRECONDITION, f"agent {agent_id} is {agent.state}")
        return agent

    def _submit(self, index: int, cmd: SubmitTasks) -> ApplyResult:
        lim = self._limits
        if len(cmd.tasks) > lim.batch_tasks_max:
            raise _Refusal(
                Code.RESOURCE_EXHAUSTED,
                f"batch of {len(cmd.tasks)} tasks; limit batch_tasks_max={lim.batch_tasks_max}",
            )
        created: list[Task] = []
        in_batch: dict[str, Task] = {}
        ids: list[str] = []
        for n, spec in enumerate(cmd.tasks):
            where = f"tasks[{n}]"
            for name in (spec.idempotency_key, spec.function, spec.cloud, spec.region):
                self._check_size(f"{where}: name {quote(name or '')}", name, "name_bytes_max")
            self._check_size(f"{where}: args_json", spec.args_json, "args_bytes_max")
            digest = content_digest(spec)
            existing_id = self._by_key.get(spec.idempotency_key)
            existing = (
                self._tasks[existing_id]
                if existing_id is not None
                else in_batch.get(spec.idempotency_key)
            )
            tombstone = self._tombstones.get(spec.idempotency_key)
            if existing is None and tombstone is not None:
                # The task ran to its end and retention pruned it: a retry within the
                # tombstone window gets its id back and never runs it a second time.
                if tombstone.content_digest != digest:
                    raise _Refusal(
                        Code.ALREADY_EXISTS,
                        f"{where}: idempotency key {spec.idempotency_key!r} already "
                        f"named task {tombstone.task_id} (finished, pruned) with "
                        "different content",
                    )
                ids.append(tombstone.task_id)
                continue
            if existing is not None:
                if existing.content_digest != digest:
                    raise _Refusal(
                        Code.ALREADY_EXISTS,
                        f"{where}: idempotency key {spec.idempotency_key!r} already "
                        f"names task {existing.id} with different content",
                    )
                ids.append(existing.id)  # a retry: same task, never a second one
                continue
            task = Task(
                id=f"t-{index}-{n}",
                seq=self._next_seq + len(created),
                idempotency_key=spec.idempotency_key,
                content_digest=digest,
                function=spec.function,
                args_json=spec.args_json,
                resources=spec.resources,
                cloud=spec.cloud,
                region=spec.region,
                priority=spec.priority,
                max_attempts=spec.max_attempts,
                timeout_ms=spec.timeout_ms,
                isolated=spec.isolated,
                state=TaskState.PENDING,
                attempts=0,
                epoch=0,
                lease=None,
                submitted_ms=cmd.now_ms,
                finished_ms=None,
                result_json=None,
                error=None,
                results_recorded=0,
            )
            created.append(task)
            in_batch[spec.idempotency_key] = task
            ids.append(task.id)
        if len(self._tasks) + len(created) > lim.tasks_max:
            finished = self.finished_count
            unexported = self._finished_seq_last - max(
                self._export_watermark_seq, self._pruned_through_seq
            )
            raise _Refusal(
                Code.RESOURCE_EXHAUSTED,
                f"manifest holds {len(self._tasks)} tasks ({finished} finished, "
                f"{min(finished, unexported)} of them not exported), batch adds "
                f"{len(created)}; limit tasks_max={lim.tasks_max} (retention prunes "
                "finished tasks; with retention.require_export only exported ones: "
                "goml task export --ack)",
            )
        for task in created:
            assert task.id not in self._tasks
            self._store(task)
            self._by_key[task.idempotency_key] = task.id
        self._next_seq += len(created)
        return ApplyResult(
            index,
            True,
            Code.OK,
            f"{len(created)} created, {len(ids) - len(created)} already present",
            task_ids=tuple(ids),
        )

    def _cancel(self, index: int, cmd: CancelTask) -> ApplyResult:
        task = self._task(cmd.task_id)
        target = _target(task, TaskEvent.CANCEL)
        if target is None:
            raise _illegal(task, TaskEvent.CANCEL)
        # Taking a lease away bumps the epoch, so the holder's late report is stale.
        epoch = task.epoch + 1 if task.lease is not None else task.epoch
        self._store(replace(task, state=target, lease=None, epoch=epoch, finished_ms=cmd.now_ms))
        return ApplyResult(index, True, Code.OK, f"task {task.id} cancelled", task_ids=(task.id,))

    def _register(self, index: int, cmd: RegisterAgent) -> ApplyResult:
        for name in (cmd.agent_id, cmd.cloud, cmd.region, cmd.arch):
            self._check_size(f"name {quote(name)}", name, "name_bytes_max")
        old = self._agents.get(cmd.agent_id)
        if old is None and len(self._agents) >= self._limits.agents_max:
            raise _Refusal(
                Code.RESOURCE_EXHAUSTED,
                f"{len(self._agents)} agents registered; "
                f"limit agents_max={self._limits.agents_max}",
            )
        state = AgentState.ALIVE
        if old is not None:
            state = AGENT_TRANSITIONS[(old.state, AgentEvent.REGISTER)]
        # Tasks still leased to a re-registering agent keep their leases: they either
        # get reported or expire. Only MarkAgentDown takes them away.
        self._agents[cmd.agent_id] = Agent(
            cmd.agent_id,
            cmd.cloud,
            cmd.region,
            cmd.arch,
            cmd.capacity,
            state,
            cmd.now_ms,
            cmd.lease_depth,
        )
        verb = "registered" if old is None else "re-registered"
        return ApplyResult(index, True, Code.OK, f"agent {cmd.agent_id} {verb}")

    def _requeue(self, task: Task, now_ms: int, reason: str) -> Task:
        target = _target(task, TaskEvent.EXPIRE)
        assert target in (TaskState.PENDING, TaskState.DEAD), task
        return replace(
            task,
            state=target,
            lease=None,
            epoch=task.epoch + 1,
            error=reason,
            finished_ms=now_ms if target is TaskState.DEAD else None,
        )

    def _mark_down(self, index: int, cmd: MarkAgentDown) -> ApplyResult:
        agent = self._agent(cmd.agent_id, AgentEvent.DOWN)
        self._agents[agent.id] = replace(agent, state=AgentState.DOWN)
        requeued = []
        for task in self._leased(agent.id):
            assert task.lease is not None and task.lease.agent_id == agent.id, task
            self._store(self._requeue(task, cmd.now_ms, f"agent {agent.id} marked down"))
            requeued.append(task.id)
        return ApplyResult(
            index,
            True,
            Code.OK,
            f"agent {agent.id} down, {len(requeued)} task(s) requeued",
            task_ids=tuple(requeued),
        )

    def _lease_room(self, agent: Agent, releasing: frozenset[str]) -> Resources:
        """What an agent may still lease: its capacity times its lease depth (the
        leases it runs, and those queued behind them), less what it holds."""
        cap, depth = agent.capacity, agent.lease_depth
        limit = (
            cap
            if depth == 1
            else Resources(cap.cpu * depth, cap.memory_mb * depth, cap.gpu * depth)
        )
        return limit.minus(self._in_use(agent.id, releasing))

    def _in_use(self, agent_id: str, releasing: frozenset[str] = frozenset()) -> Resources:
        total = Resources(0.0, 0, 0)
        for task in self._leased(agent_id):  # seq order: float sums add up alike everywhere
            if task.id not in releasing:
                total = total.plus(task.resources)
        return total

    def _lease(self, index: int, cmd: LeaseTasks) -> ApplyResult:
        agent = self._agent(cmd.agent_id, AgentEvent.LEASE)
        if cmd.max_count > self._limits.lease_tasks_max:
            raise _Refusal(
                Code.RESOURCE_EXHAUSTED,
                f"max_count={cmd.max_count}; limit lease_tasks_max={self._limits.lease_tasks_max}",
            )
        # Clamped so every stored integer still fits the int64 the snapshot reader accepts.
        deadline_ms = min(INT_MAX, cmd.now_ms + cmd.lease_ms)
        leased: list[Task] = []
        for task in self._select_for_lease(agent, cmd.free, cmd.max_count, frozenset()):
            assert _target(task, TaskEvent.LEASE) is TaskState.LEASED
            new = replace(
                task,
                state=TaskState.LEASED,
                attempts=task.attempts + 1,
                epoch=task.epoch + 1,
                lease=Lease(agent.id, cmd.now_ms, deadline_ms),
                last_agent_id=agent.id,
            )
            self._store(new)
            leased.append(new)
        return ApplyResult(
            index,
            True,
            Code.OK,
            f"{len(leased)} task(s) leased to {agent.id}",
            task_ids=tuple(t.id for t in leased),
            tasks=tuple(leased),
        )

    def _select_for_lease(
        self,
        agent: Agent,
        free: Resources,
        max_count: int,
        excluded: frozenset[str],
        releasing: frozenset[str] = frozenset(),
    ) -> list[Task]:
        """The one lease rule: PENDING tasks by priority then submit order, that match the
        agent's cloud and region and fit in what is free (smaller tasks behind one that
        does not fit may still fit: backfill), at most `max_count`, none in `excluded`."""
        if self._state_totals[TaskState.PENDING] == 0:
            # Nothing waits: the common case of a leader asked again and again (every
            # parked poll on every apply), answered without the capacity sums below.
            return []
        # Never trust the proposed free capacity beyond what the log itself knows is free.
        free = free.least(self._lease_room(agent, releasing))
        chosen: list[Task] = []
        # Shapes found not to fit (or not to match the agent). `free` only shrinks as
        # the walk goes on, so such a shape never fits further on: once every shape
        # that waits is one, no task left can be chosen and the walk stops, where it
        # went through every PENDING task (a full agent asked again and again).
        unfit: set[_Shape] = set()
        shapes = len(self._pending_shapes)
        for _, _, task_id in self._pending_order:
            if len(chosen) == max_count:
                break
            if task_id in excluded:
                continue
            task = self._tasks[task_id]
            assert task.state is TaskState.PENDING, task
            shape = _shape(task)
            if shape in unfit:
                continue
            if (
                (task.cloud is not None and task.cloud != agent.cloud)
                or (task.region is not None and task.region != agent.region)
                or not task.resources.fits_in(free)
                or not task.resources.fits_in(agent.capacity)  # with a lease queue
            ):
                unfit.add(shape)
                if len(unfit) == shapes:
                    break
                continue
            chosen.append(task)
            free = free.minus(task.resources)
        return chosen

    def _holds(self, task: Task, agent_id: str, epoch: int) -> bool:
        return (
            task.state in LEASE_HOLDING
            and task.lease is not None
            and task.lease.agent_id == agent_id
            and task.epoch == epoch
        )

    def _stale(self, task: Task, agent_id: str, epoch: int) -> _Refusal:
        holder = task.lease.agent_id if task.lease is not None else "nobody"
        return _Refusal(
            Code.STALE_EPOCH,
            f"task {task.id} is {task.state} at epoch {task.epoch} held by "
            f"{holder}; report from {quote(agent_id)} at epoch {epoch} refused",
        )

    def _start(self, index: int, cmd: StartTask) -> ApplyResult:
        task = self._start_one(cmd.agent_id, cmd.task_id, cmd.epoch)
        return ApplyResult(index, True, Code.OK, f"task {task.id} running", task_ids=(task.id,))

    def _start_one(self, agent_id: str, task_id: str, epoch: int) -> Task:
        task = self._task(task_id)
        if not self._holds(task, agent_id, epoch):
            raise self._stale(task, agent_id, epoch)
        target = _target(task, TaskEvent.START)
        if target is None:
            raise _illegal(task, TaskEvent.START)
        self._store(replace(task, state=target))
        return task

    def _start_tasks(self, index: int, cmd: StartTasks) -> ApplyResult:
        if len(cmd.tasks) > self._limits.renew_tasks_max:
            raise _Refusal(
                Code.RESOURCE_EXHAUSTED,
                f"{len(cmd.tasks)} tasks; limit renew_tasks_max={self._limits.renew_tasks_max}",
            )
        items = []
        for task_id, epoch in cmd.tasks:
            try:
                self._start_one(cmd.agent_id, task_id, epoch)
            except _Refusal as refusal:
                items.append(ItemResult(task_id, refusal.code, refusal.message))
                continue
            items.append(ItemResult(task_id, Code.OK, f"task {task_id} running"))
        return self._batch_result(index, items)

    def _report(self, index: int, cmd: ReportResult) -> ApplyResult:
        report = Report(
            cmd.agent_id, cmd.task_id, cmd.epoch, cmd.success, cmd.result_json, cmd.error
        )
        new = self._report_one(cmd.now_ms, report)
        return ApplyResult(index, True, Code.OK, f"task {new.id} {new.state}", task_ids=(new.id,))

    def _report_results(self, index: int, cmd: ReportResults) -> ApplyResult:
        if len(cmd.reports) > self._limits.batch_tasks_max:
            raise _Refusal(
                Code.RESOURCE_EXHAUSTED,
                f"{len(cmd.reports)} reports; limit batch_tasks_max={self._limits.batch_tasks_max}",
            )
        items = []
        for report in cmd.reports:
            try:
                new = self._report_one(cmd.now_ms, report)
            except _Refusal as refusal:
                items.append(ItemResult(report.task_id, refusal.code, refusal.message))
                continue
            items.append(ItemResult(new.id, Code.OK, f"task {new.id} {new.state}"))
        return self._batch_result(index, items)

    @staticmethod
    def _batch_result(index: int, items: list[ItemResult]) -> ApplyResult:
        done = tuple(item.task_id for item in items if item.code is Code.OK)
        return ApplyResult(
            index,
            True,
            Code.OK,
            f"{len(done)} of {len(items)} applied",
            task_ids=done,
            items=tuple(items),
        )

    def _report_one(self, now_ms: int, cmd: Report) -> Task:
        task = self._task(cmd.task_id)
        if not self._holds(task, cmd.agent_id, cmd.epoch):
            # The fence behind "no result recorded twice"; counted so checkers can see it.
            self._stale_reports_refused += 1
            raise self._stale(task, cmd.agent_id, cmd.epoch)
        self._check_size("result_json", cmd.result_json, "result_bytes_max")
        self._check_size("error", cmd.error, "error_bytes_max")
        event = TaskEvent.SUCCEED if cmd.success else TaskEvent.FAIL
        target = _target(task, event)
        assert target is not None, task  # _holds means LEASED or RUNNING: both legal
        if cmd.success:
            new = replace(
                task,
                state=target,
                lease=None,
                result_json=cmd.result_json,
                error=None,
                finished_ms=now_ms,
                results_recorded=task.results_recorded + 1,
            )
        else:
            new = replace(
                task,
                state=target,
                lease=None,
                error=cmd.error,
                finished_ms=now_ms if target is TaskState.DEAD else None,
            )
        return self._store(new)

    def _expire(self, index: int, cmd: ExpireLeases) -> ApplyResult:
        expired = []
        for task in self._leased():
            assert task.lease is not None, task
            if cmd.now_ms >= task.lease.deadline_ms:
                self._store(self._requeue(task, cmd.now_ms, "lease expired"))
                expired.append(task.id)
        return ApplyResult(
            index, True, Code.OK, f"{len(expired)} lease(s) expired", task_ids=tuple(expired)
        )

    def _renew(self, index: int, cmd: RenewLeases) -> ApplyResult:
        if len(cmd.task_ids) > self._limits.renew_tasks_max:
            raise _Refusal(
                Code.RESOURCE_EXHAUSTED,
                f"{len(cmd.task_ids)} task ids; "
                f"limit renew_tasks_max={self._limits.renew_tasks_max}",
            )
        renewed, skipped = [], []
        for task_id in cmd.task_ids:
            task = self._tasks.get(task_id)
            # A lease already past its deadline is not revived: ExpireLeases may be
            # on its way and the leader has stopped counting on this agent.
            if (
                task is None
                or task.lease is None
                or task.lease.agent_id != cmd.agent_id
                or cmd.now_ms >= task.lease.deadline_ms
                or _target(task, TaskEvent.RENEW) is None
            ):
                skipped.append(task_id)
                continue
            self._store(replace(task, lease=replace(task.lease, deadline_ms=cmd.deadline_ms)))
            renewed.append(task_id)
        return ApplyResult(
            index,
            True,
            Code.OK,
            f"{len(renewed)} renewed; not renewed: {skipped}",
            task_ids=tuple(renewed),
        )

    def _prune(self, index: int, cmd: PruneTasks) -> ApplyResult:
        if cmd.tasks_through_seq > self._finished_seq_last:
            raise _Refusal(
                Code.INVALID_ARGUMENT,
                f"prune through finished_seq {cmd.tasks_through_seq}: only "
                f"{self._finished_seq_last} tasks have finished",
            )
        batch_max = self._limits.batch_tasks_max
        pruned: list[str] = []
        while self._finished_head < len(self._finished) and len(pruned) < batch_max:
            task = self._tasks[self._finished[self._finished_head]]
            assert task.finished_seq is not None and task.state in TERMINAL, task
            assert task.finished_seq > self._pruned_through_seq, task
            if task.finished_seq > cmd.tasks_through_seq:
                break
            del self._tasks[task.id]
            self._count(task, -1)
            self._terminal_json.pop(task.id, None)
            del self._by_key[task.idempotency_key]
            assert task.idempotency_key not in self._tombstones
            self._tombstones[task.idempotency_key] = Tombstone(
                task.idempotency_key, task.id, task.content_digest, task.finished_seq, cmd.now_ms
            )
            self._finished_bytes -= retained_bytes(task)
            self._finished_head += 1
            self._pruned_through_seq = task.finished_seq
            pruned.append(task.id)
        # Cut the pruned front off once it is most of the list: amortised O(1) a task.
        if self._finished_head > 1024 and 2 * self._finished_head > len(self._finished):
            self._finished = self._finished[self._finished_head :]
            self._finished_head = 0
        self._tasks_pruned += len(pruned)
        dropped = 0
        # Dicts keep insertion order: the oldest tombstones come first.
        for key in list(itertools.islice(self._tombstones, batch_max)):
            if self._tombstones[key].finished_seq > cmd.tombstones_through_seq:
                break
            del self._tombstones[key]
            dropped += 1
        assert self._finished_bytes >= 0
        assert len(self._finished) - self._finished_head == self.finished_count
        return ApplyResult(
            index,
            True,
            Code.OK,
            f"{len(pruned)} finished task(s) pruned (through finished_seq "
            f"{self._pruned_through_seq}), {dropped} tombstone(s) dropped",
        )

    def _ack_export(self, index: int, cmd: AckExport) -> ApplyResult:
        if cmd.through_seq > self._finished_seq_last:
            raise _Refusal(
                Code.FAILED_PRECONDITION,
                f"export acknowledged through finished_seq {cmd.through_seq}: only "
                f"{self._finished_seq_last} tasks have finished",
            )
        self._export_watermark_seq = max(self._export_watermark_seq, cmd.through_seq)
        return ApplyResult(
            index,
            True,
            Code.OK,
            f"export watermark at finished_seq {self._export_watermark_seq}",
        )

    def _set_limits(self, index: int, cmd: SetLimits) -> ApplyResult:
        limits = cmd.limits
        if len(self._tasks) > limits.tasks_max:
            raise _Refusal(
                Code.FAILED_PRECONDITION,
                f"manifest holds {len(self._tasks)} tasks; tasks_max={limits.tasks_max} "
                "must wait until retention has pruned enough of them",
            )
        if len(self._agents) > limits.agents_max:
            raise _Refusal(
                Code.FAILED_PRECONDITION,
                f"{len(self._agents)} agents registered; agents_max={limits.agents_max} too low",
            )
        changed = sorted(
            f"{f.name}={getattr(limits, f.name)}"
            for f in fields(ManifestLimits)
            if getattr(limits, f.name) != getattr(self._limits, f.name)
        )
        self._limits = limits
        return ApplyResult(
            index, True, Code.OK, f"limits set: {', '.join(changed) or 'as they were'}"
        )

    # ---- read-only queries

    @property
    def applied_index(self) -> int:
        return self._applied_index

    @property
    def limits(self) -> ManifestLimits:
        return self._limits

    @property
    def stale_reports_refused(self) -> int:
        return self._stale_reports_refused

    def get_task(self, task_id: str) -> Task | None:
        return self._tasks.get(task_id)

    def task_id_for_key(self, idempotency_key: str) -> str | None:
        return self._by_key.get(idempotency_key)

    def list_tasks(
        self,
        *,
        limit: int,
        state: TaskState | None = None,
        function: str | None = None,
        agent_id: str | None = None,
        after_seq: int = -1,
        newest_first: bool = False,
        before_seq: int | None = None,
        finished_after_seq: int | None = None,
    ) -> tuple[Task, ...]:
        """At most `limit` tasks that pass the filters, in one of three orders; page on
        with the last one's seq (or finished_seq):
        - submit order, seq > after_seq (the default);
        - `newest_first`: newest submit first, seq < before_seq (None: from the newest);
        - `finished_after_seq` given: terminal tasks only, in the order they finished,
          finished_seq > finished_after_seq (what `goml task export` pages through)."""
        assert limit >= 1
        assert finished_after_seq is None or not newest_first, "finished order runs one way"
        assert after_seq == -1 or not newest_first, "newest first pages with before_seq"
        candidates: Iterable[Task]
        if finished_after_seq is not None:
            candidates = self.finished_tasks(finished_after_seq)
        elif newest_first:
            candidates = reversed(self._tasks.values())
        else:
            candidates = self._tasks.values()
        found: list[Task] = []
        for task in candidates:
            if len(found) == limit:
                break
            if newest_first and before_seq is not None and task.seq >= before_seq:
                continue
            if (
                task.seq <= after_seq
                or (state is not None and task.state is not state)
                or (function is not None and task.function != function)
            ):
                continue
            if agent_id is not None and (task.lease is None or task.lease.agent_id != agent_id):
                continue
            found.append(task)
        return tuple(found)

    def finished_tasks(self, after_seq: int = 0) -> Iterator[Task]:
        """Terminal tasks in the order they finished, finished_seq > after_seq (oldest
        first): found by bisection, so a page costs what it returns."""
        start = bisect.bisect_right(
            self._finished,
            after_seq,
            lo=self._finished_head,
            key=lambda task_id: self._tasks[task_id].finished_seq or 0,
        )
        for position in range(start, len(self._finished)):
            yield self._tasks[self._finished[position]]

    def tombstones(self) -> Iterator[Tombstone]:
        """Tombstones of pruned tasks, oldest first."""
        yield from self._tombstones.values()

    def tombstone(self, idempotency_key: str) -> Tombstone | None:
        return self._tombstones.get(idempotency_key)

    @property
    def task_count(self) -> int:
        return len(self._tasks)

    @property
    def finished_count(self) -> int:
        """Terminal tasks kept (not pruned yet)."""
        return len(self._finished) - self._finished_head

    @property
    def finished_bytes(self) -> int:
        """`retained_bytes` summed over the terminal tasks kept."""
        return self._finished_bytes

    @property
    def finished_seq_last(self) -> int:
        """The finished_seq of the task that finished last (0: none has)."""
        return self._finished_seq_last

    @property
    def pruned_through_seq(self) -> int:
        """Every task with finished_seq up to this one was pruned, none after it."""
        return self._pruned_through_seq

    @property
    def export_watermark_seq(self) -> int:
        """Every task with finished_seq up to this one was archived (AckExport)."""
        return self._export_watermark_seq

    @property
    def tasks_pruned(self) -> int:
        return self._tasks_pruned

    @property
    def tombstone_count(self) -> int:
        return len(self._tombstones)

    def leasable_tasks(
        self,
        agent_id: str,
        free: Resources,
        max_count: int,
        excluded: frozenset[str],
        releasing: frozenset[str] = frozenset(),
    ) -> tuple[str, ...] | None:
        """The ids a LeaseTasks for this agent would lease if applied now, leaving out
        `excluded` (tasks that lease proposals already in flight will take) and counting
        the capacity of `releasing` as free (tasks whose results are proposed ahead of
        this lease: applied first, they free it). None when
        the agent is unknown or down: the command would be refused, not empty. A
        read-only prediction by the same rule the command applies (`_select_for_lease`):
        the leader proposes no LeaseTasks that would lease nothing."""
        agent = self._agents.get(agent_id)
        if agent is None or agent.state is not AgentState.ALIVE:
            return None
        count = max(1, min(max_count, self._limits.lease_tasks_max))
        chosen = self._select_for_lease(agent, free, count, excluded, releasing)
        return tuple(t.id for t in chosen)

    def unplaceable(self, resources: Resources, cloud: str | None, region: str | None) -> str:
        """Why no registered agent could ever run a task of this shape, or "" when one
        could (free or busy) or when no agent has registered yet (nothing to judge by:
        a cluster starting up takes work before its agents). DOWN agents count: they
        may come back. A read-only query; the node core refuses such a submit."""
        agents = self.list_agents()
        if not agents:
            return ""
        placed = [
            a
            for a in agents
            if (cloud is None or a.cloud == cloud) and (region is None or a.region == region)
        ]
        if any(resources.fits_in(a.capacity) for a in placed):
            return ""
        where = "".join(
            f" in {label} {quote(value)}"
            for label, value in (("cloud", cloud), ("region", region))
            if value is not None
        )
        needs = f"needs cpu {resources.cpu:g}, memory {resources.memory_mb} MB, gpu {resources.gpu}"
        if not placed:
            return f"{needs}{where}, and no registered agent is{where}"
        most = (
            f"cpu {max(a.capacity.cpu for a in placed):g}, "
            f"memory {max(a.capacity.memory_mb for a in placed)} MB, "
            f"gpu {max(a.capacity.gpu for a in placed)}"
        )
        return (
            f"{needs}, more than any of the {len(placed)} registered agent(s){where} has "
            f"(the most any has: {most})"
        )

    def leasable_incoming(
        self,
        agent_id: str,
        free: Resources,
        max_count: int,
        excluded: frozenset[str],
        releasing: frozenset[str],
        incoming: list[tuple[int, tuple[TaskSpec, ...]]],
    ) -> tuple[str, ...]:
        """The ids of tasks that submits proposed but not yet applied (`incoming`: log
        index and specs) will create, that a LeaseTasks for this agent proposed behind
        them would lease by the lease rule's fit (cloud, region, free capacity). A
        prediction like `leasable_tasks`: the LeaseTasks decides when it applies."""
        agent = self._agents.get(agent_id)
        if agent is None or agent.state is not AgentState.ALIVE:
            return ()
        free = free.least(self._lease_room(agent, releasing))
        count = max(1, min(max_count, self._limits.lease_tasks_max))
        chosen: list[str] = []
        for index, specs in incoming:
            for n, spec in enumerate(specs):
                task_id = f"t-{index}-{n}"  # as _submit names it
                if len(chosen) == count:
                    return tuple(chosen)
                if task_id in excluded or spec.idempotency_key in self._by_key:
                    continue  # claimed already, or a retry of a task that exists
                if spec.cloud is not None and spec.cloud != agent.cloud:
                    continue
                if spec.region is not None and spec.region != agent.region:
                    continue
                if spec.resources.fits_in(free) and spec.resources.fits_in(agent.capacity):
                    chosen.append(task_id)
                    free = free.minus(spec.resources)
        return tuple(chosen)

    def get_agent(self, agent_id: str) -> Agent | None:
        return self._agents.get(agent_id)

    def list_agents(self) -> tuple[Agent, ...]:
        return tuple(self._agents[a] for a in sorted(self._agents))

    def status_counts(self) -> dict[str, int]:
        """Tasks by the states `goml status` shows (STATUS_STATES), each task once and
        every state present, zeros too. FAILED, not a state the manifest rests in (a
        failed attempt goes straight back to PENDING, or to DEAD), counts the PENDING
        tasks that have had an attempt (it failed, timed out or lost its agent) and
        wait for a retry; PENDING counts the ones never leased yet."""
        counts = dict(self._status_totals)  # kept by `_store` (see `_status_of`)
        assert sum(counts.values()) == len(self._tasks)
        return counts

    def counts_by_state(self) -> dict[TaskState, int]:
        counts = dict(self._state_totals)
        assert sum(counts.values()) == len(self._tasks)
        return counts

    # ---- snapshots

    def snapshot(self) -> bytes:
        return self._snapshot(SNAPSHOT_FORMAT)

    def _snapshot(self, snapshot_format: int) -> bytes:
        clock = {"latest_command_ms": self._latest_command_ms} if snapshot_format >= 2 else {}
        body = {
            "format": snapshot_format,
            **clock,
            "applied_index": self._applied_index,
            "next_seq": self._next_seq,
            "stale_reports_refused": self._stale_reports_refused,
            "limits": plain(self._limits),
            "agents": [plain(a) for a in self.list_agents()],
            "tasks": [],  # spliced in below, each task spelled once (see `_task_json`)
        }
        if snapshot_format >= 3:
            body["retention"] = {
                "finished_seq_last": self._finished_seq_last,
                "pruned_through_seq": self._pruned_through_seq,
                "tasks_pruned": self._tasks_pruned,
                "export_watermark_seq": self._export_watermark_seq,
                # Lists, not objects: there may be 100,000 of them.
                "tombstones": [
                    [t.idempotency_key, t.task_id, t.content_digest, t.finished_seq, t.pruned_ms]
                    for t in self._tombstones.values()
                ],
            }
        # "tasks" sorts last of the keys: the body ends with its (empty) list, where the
        # tasks go, comma-joined as `dumps` joins list items.
        head = dumps(body)
        assert head.endswith(_TASKS_TAIL), head[-40:]
        if snapshot_format >= 3:
            tasks = ",".join(self._task_json(t) for t in self._tasks.values())
        else:  # what an older format knew of a task: no finished_seq
            tasks = ",".join(
                dumps(_plain_task(t, finished_seq=False)) for t in self._tasks.values()
            )
        return f'{head[: -len(_TASKS_TAIL)]}"tasks":[{tasks}]}}'.encode("ascii")

    def _task_json(self, task: Task) -> str:
        """A task as the current snapshot format spells it; a terminal one's spelling is
        kept (it never changes again; pruning drops it)."""
        text = self._terminal_json.get(task.id)
        if text is None:
            text = dumps(_plain_task(task))
            if task.state in TERMINAL:
                self._terminal_json[task.id] = text
        return text

    @classmethod
    def restore(cls, data: bytes) -> Manifest:
        """Inverse of `snapshot`. Bytes that parse but break an invariant assert (a bug)."""
        try:
            manifest, snapshot_format = cls._restore(data)
        except CommandError as exc:
            raise SnapshotError(f"bad snapshot: {exc}") from exc
        # Pair assertion (STYLE.md): what we load must be exactly what we would write.
        if manifest._snapshot(snapshot_format) != data:
            raise SnapshotError("bad snapshot: bytes are not the canonical form of its state")
        return manifest

    @classmethod
    def _restore(cls, data: bytes) -> tuple[Manifest, int]:
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError as exc:
            raise CommandError(f"not ASCII: {exc}") from exc
        f = Fields(loads(text, "snapshot"), "snapshot")
        snapshot_format = f.integer("format")
        if snapshot_format not in SNAPSHOT_FORMATS_READ:
            raise CommandError(f"unsupported format; this code reads {SNAPSHOT_FORMATS_READ}")
        lf = f.sub("limits")
        limits = ManifestLimits(**{x.name: lf.integer(x.name, 1) for x in fields(ManifestLimits)})
        lf.close()
        manifest = cls(limits)
        if snapshot_format >= 2:
            manifest._latest_command_ms = f.optional_integer("latest_command_ms")
        manifest._applied_index = f.integer("applied_index")
        manifest._next_seq = f.integer("next_seq")
        manifest._stale_reports_refused = f.integer("stale_reports_refused")
        for i, raw in enumerate(f.items("agents")):
            agent = _read_agent(Fields(raw, f"snapshot.agents[{i}]"))
            manifest._agents[agent.id] = agent
        retention = snapshot_format >= 3
        if retention:
            rf = f.sub("retention")
            manifest._read_retention(rf)
        for i, raw in enumerate(f.items("tasks")):
            task = _read_task(Fields(raw, f"snapshot.tasks[{i}]"), retention)
            if task.id in manifest._tasks or task.idempotency_key in manifest._by_key:
                raise CommandError(f"task {task.id}: duplicate id or idempotency key")
            if not task.seq < manifest._next_seq:
                raise CommandError(f"task {task.id}: seq {task.seq} >= next_seq")
            if task.idempotency_key in manifest._tombstones:
                raise CommandError(f"task {task.id}: idempotency key of a tombstone")
            if retention and (task.finished_seq is None) != (task.state not in TERMINAL):
                raise CommandError(f"task {task.id}: finished_seq set iff terminal")
            # An older format's terminal tasks get their finished_seq here, in submit order.
            manifest._store(task)
            manifest._by_key[task.idempotency_key] = task.id
        if retention:
            manifest._finish_order_from_tasks()
        f.close()
        if snapshot_format == 1 and (manifest._agents or manifest._tasks):
            # Before cluster time was kept: the latest time the state holds.
            manifest._latest_command_ms = max(
                [
                    *(a.registered_ms for a in manifest._agents.values()),
                    *(t.submitted_ms for t in manifest._tasks.values()),
                    *(t.finished_ms or 0 for t in manifest._tasks.values()),
                    *(t.lease.leased_ms for t in manifest._tasks.values() if t.lease),
                ],
                default=0,
            )
        return manifest, snapshot_format

    def _read_retention(self, f: Fields) -> None:
        self._finished_seq_last = f.integer("finished_seq_last")
        self._pruned_through_seq = f.integer("pruned_through_seq")
        self._tasks_pruned = f.integer("tasks_pruned")
        self._export_watermark_seq = f.integer("export_watermark_seq")
        if not self._pruned_through_seq <= self._finished_seq_last:
            raise CommandError("retention: pruned_through_seq > finished_seq_last")
        if not self._export_watermark_seq <= self._finished_seq_last:
            raise CommandError("retention: export_watermark_seq > finished_seq_last")
        previous = 0
        for i, raw in enumerate(f.items("tombstones")):
            where = f"snapshot.retention.tombstones[{i}]"
            if (
                not isinstance(raw, list)
                or len(raw) != 5
                or not all(isinstance(x, str) and x for x in raw[:3])
                or not all(type(x) is int and 0 <= x <= INT_MAX for x in raw[3:])
            ):
                raise CommandError(f"{where}: expected [key, task id, digest, finished_seq, ms]")
            tombstone = Tombstone(raw[0], raw[1], raw[2], raw[3], raw[4])
            if not previous < tombstone.finished_seq <= self._pruned_through_seq:
                raise CommandError(f"{where}: finished_seq out of order or not pruned")
            if tombstone.idempotency_key in self._tombstones:
                raise CommandError(f"{where}: duplicate idempotency key")
            previous = tombstone.finished_seq
            self._tombstones[tombstone.idempotency_key] = tombstone
        f.close()

    def _finish_order_from_tasks(self) -> None:
        """The finish order of restored tasks (their finished_seq says it)."""
        finished = sorted(
            (t for t in self._tasks.values() if t.state in TERMINAL),
            key=lambda t: t.finished_seq or 0,
        )
        seqs = [t.finished_seq or 0 for t in finished]
        if len(set(seqs)) != len(seqs):
            raise CommandError("tasks: duplicate finished_seq")
        if seqs and not (
            self._pruned_through_seq < seqs[0] and seqs[-1] <= self._finished_seq_last
        ):
            raise CommandError(
                "tasks: finished_seq outside (pruned_through_seq, finished_seq_last]"
            )
        self._finished = [t.id for t in finished]
        self._finished_head = 0
        self._finished_bytes = sum(retained_bytes(t) for t in finished)


_E_co = TypeVar("_E_co", bound=enum.StrEnum)


def _enum(kind: type[_E_co], f: Fields, key: str) -> _E_co:
    value = f.text(key)
    try:
        return kind(value)
    except ValueError as exc:
        raise CommandError(f"{key}: unknown {kind.__name__} {value!r}") from exc


def _read_agent(f: Fields) -> Agent:
    agent = Agent(
        id=f.text("id"),
        cloud=f.text("cloud"),
        region=f.text("region"),
        arch=f.text("arch"),
        capacity=read_resources(f.sub("capacity")),
        state=_enum(AgentState, f, "state"),
        registered_ms=f.integer("registered_ms"),
        lease_depth=f.integer("lease_depth", 2) if f.has("lease_depth") else 1,
    )
    f.close()
    return agent


def _read_task(f: Fields, with_finished_seq: bool) -> Task:
    lease = None
    lf = f.optional_sub("lease")
    if lf is not None:
        lease = Lease(lf.text("agent_id"), lf.integer("leased_ms"), lf.integer("deadline_ms"))
        lf.close()
    task = Task(
        id=f.text("id"),
        seq=f.integer("seq"),
        idempotency_key=f.text("idempotency_key"),
        content_digest=f.text("content_digest"),
        function=f.text("function"),
        args_json=f.text("args_json"),
        resources=read_resources(f.sub("resources")),
        cloud=f.optional_text("cloud", empty=False),
        region=f.optional_text("region", empty=False),
        priority=f.integer("priority", minimum=-INT_MAX),
        max_attempts=f.integer("max_attempts", 1),
        timeout_ms=f.integer("timeout_ms", 1),
        state=_enum(TaskState, f, "state"),
        attempts=f.integer("attempts"),
        epoch=f.integer("epoch"),
        lease=lease,
        submitted_ms=f.integer("submitted_ms"),
        finished_ms=f.optional_integer("finished_ms"),
        result_json=f.optional_text("result_json"),
        error=f.optional_text("error"),
        results_recorded=f.integer("results_recorded"),
        finished_seq=f.optional_integer("finished_seq") if with_finished_seq else None,
        last_agent_id=f.text("last_agent_id") if f.has("last_agent_id") else None,
        isolated=f.flag("isolated") if f.has("isolated") else False,
    )
    f.close()
    return task


_TASKS_TAIL = '"tasks":[]}'


def _plain_task(task: Task, finished_seq: bool = True) -> object:
    """A task as a snapshot stores it (`last_agent_id` only once it has one; formats
    before 3 know no `finished_seq`)."""
    body = plain(task)
    assert isinstance(body, dict)
    if task.last_agent_id is None:
        del body["last_agent_id"]
    if not task.isolated:
        del body["isolated"]
    if not finished_seq:
        del body["finished_seq"]
    return body


def _status_of(task: Task) -> str:
    """The state `goml status` counts a task in (STATUS_STATES): FAILED for a PENDING
    task that has had an attempt and waits for a retry (see `Manifest.status_counts`)."""
    if task.state is TaskState.PENDING and task.attempts > 0:
        return STATUS_FAILED
    return task.state.value


# The limits every goml node runs with (they must agree across replicas: see ManifestLimits).
DEFAULT_LIMITS = ManifestLimits(
    command_bytes_max=4 * 1024 * 1024,
    batch_tasks_max=1000,
    tasks_max=200_000,
    agents_max=1000,
    args_bytes_max=64 * 1024,
    result_bytes_max=256 * 1024,
    error_bytes_max=16 * 1024,
    name_bytes_max=256,
    lease_tasks_max=64,
    renew_tasks_max=256,
)
