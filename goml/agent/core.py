"""The sans-IO agent core: register, heartbeat, lease, run, report.

A plain object (STYLE.md): inputs are method calls carrying `now_ms`, outputs are
immutable effects taken with `take_effects()`. No sockets, threads, clocks, asyncio or
global randomness: the real runtime (`goml.agent.runtime`) and the SimPy simulator drive
this very same code. `now_ms` is the agent's own monotonic clock; the core only ever
subtracts its values from each other and never compares them with control-plane time
(`LeasedTask.lease_deadline_ms`).

Runtime contract:

- Carry out effects in the order given. `Call`: send `request` to control-plane node
  `node_id` and answer with exactly one `on_response` or `on_call_failed` (answers after
  the call's `timeout_ms` are ignored: the core expires calls itself in `tick`, so a
  simulator may simply drop messages). `RunTask`: start the task and answer with
  `on_task_finished` (same `task_id` and `epoch`). `CancelTask`: stop the run (the core
  ignores any later `on_task_finished` for it). `Log`: log it.
- Call `tick(now_ms)` no later than `next_deadline_ms()` (it can change after any input).

Decisions made here:

- Registration: at `start`, and again whenever a heartbeat answer says `known=false`.
- Heartbeats every `heartbeat_interval_ms` (the value of the latest `RegisterResponse`
  when it is non-zero) while registered. They list every task whose lease the agent
  holds and whose result is not acknowledged yet, so the leader keeps renewing them.
  An agent holding nothing sends none while a lease poll is in flight: the leader
  counts the poll as its heartbeat for as long as it holds it (`_poll_stands_in`).
- Leases: while registered and holding fewer than `results_pending_max` unacknowledged
  results, at most two long-polls, each at most one call start every
  `lease_interval_ms_min`: a room poll, only with room (a free task slot, free cpu and
  memory), asking for that room; and, while the agent holds a run or a result, a
  standing poll asking for nothing (`free` 0, `max_tasks` 0). The room each report
  frees is leased in the same commit as the report (`NodeCore._release_room`): into the
  report's own answer (`lease_into_answer`) when a task fits at once, else into the
  parked standing poll (nothing fits yet, or a leader too old to answer so). A freed
  slot is refilled one report round trip after its task ends, not after the room poll
  in flight for another slot answers and a new one makes the round trip (with tasks far
  shorter than a lease round trip, an agent ran one task at a time); into the answer it
  takes one call per task instead of three (report, poll answer, next poll). Hence the
  room poll's `free` and `max_tasks` leave out what unacknowledged results hold: the
  leader gives that room to the report's answer or the standing poll.
- Results are kept per (task id, epoch) and re-reported until acknowledged: recorded, or
  refused (stale epoch), which drops them with a log. An unreachable control plane never
  drops them. A result is reported only under the epoch its task was leased with.
- A task whose control-plane lease deadline passes keeps running and is reported: the
  control plane's epoch check decides. A task a heartbeat answer says is revoked
  (cancelled, requeued, finished) is stopped at once (`CancelTask`) and its pending
  results dropped: the leader would refuse them. A task running past its `timeout_ms` is
  cancelled (`CancelTask`) and reported as failed ("timed out after N ms").
- Leader and retries: the shared policy of every caller (`goml.api.retry`), one attempt
  per lane: the node that last answered leads; NOT_LEADER hints are followed at once at
  most once per node in a row; an unreachable node moves the belief to the next one;
  backoff with jitter from the `rng` passed in. The agent never gives up: a lane whose
  request was refused as invalid or unauthenticated is tried again after its backoff.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import Protocol

from goml.api.retry import UNREACHABLE_MS, Attempt, RetryConfig, RetryPolicy
from goml.api.types import (
    LEASE_DEPTH_MAX,
    RESPONSE_TYPES,
    AgentRequest,
    AgentResponse,
    ErrorKind,
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
    Resources,
    TaskResult,
)

__all__ = [
    "TRANSITIONS",
    "AgentCore",
    "AgentCoreConfig",
    "AgentEvent",
    "AgentState",
    "Call",
    "CancelTask",
    "Effect",
    "IllegalEvent",
    "Log",
    "LogLevel",
    "Rng",
    "RunTask",
    "transition",
]

CPU_EPSILON = 1e-9  # same tolerance as Resources.fits_in
# After a node answered a report of several results for the first only (an older node),
# reports to it carry one result per call this long; then several are tried again (it
# may have been upgraded): one call's worth of results is sent twice at most.
MANY_RETRY_MS = 60_000
# A lease queue pays only for tasks shorter than a report's round trip (it hides that
# trip): the agent queues (asks for room beyond its slots) only after this many runs in
# a row each shorter than QUEUE_RUN_MS_MAX; one longer run stops it. Long tasks then lease
# as without a queue, so a few of them are never held back on one agent while another
# idles (no work stealing here).
QUEUE_RUN_MS_MAX = 50
QUEUE_SHORT_RUNS_MIN = 4


# --------------------------------------------------------------------------- state table


class AgentState(enum.StrEnum):
    INIT = "INIT"  # constructed, not started
    REGISTERING = "REGISTERING"  # no registration acknowledged (or the leader forgot us)
    ACTIVE = "ACTIVE"  # registered: heartbeats and leases go out
    STOPPED = "STOPPED"  # stopped: no more calls or tasks; late answers are ignored


class AgentEvent(enum.StrEnum):
    START = "START"
    STOP = "STOP"
    TICK = "TICK"
    REGISTERED = "REGISTERED"  # RegisterResponse
    HEARTBEAT_KNOWN = "HEARTBEAT_KNOWN"  # HeartbeatResponse(known=True)
    HEARTBEAT_UNKNOWN = "HEARTBEAT_UNKNOWN"  # HeartbeatResponse(known=False)
    LEASE_ANSWERED = "LEASE_ANSWERED"  # LeaseResponse (possibly empty)
    REPORT_ANSWERED = "REPORT_ANSWERED"  # ReportResponse
    CALL_FAILED = "CALL_FAILED"  # on_call_failed, or a call expired in tick
    TASK_FINISHED = "TASK_FINISHED"


_S, _E = AgentState, AgentEvent
# Every legal (state, event) pair and its target; anything absent is a runtime bug.
# Why some pairs are absent: in INIT nothing has been sent or started; a Register call is
# in flight only while REGISTERING, and a heartbeat only while ACTIVE (the answer that
# moves ACTIVE -> REGISTERING is the one heartbeat in flight); START happens once.
# Answers to unknown or expired request ids never reach the table (they are ignored).
TRANSITIONS: dict[tuple[AgentState, AgentEvent], AgentState] = {
    (_S.INIT, _E.START): _S.REGISTERING,
    (_S.INIT, _E.STOP): _S.STOPPED,
    (_S.REGISTERING, _E.STOP): _S.STOPPED,
    (_S.REGISTERING, _E.TICK): _S.REGISTERING,
    (_S.REGISTERING, _E.REGISTERED): _S.ACTIVE,
    # A lease long-poll or a report sent while ACTIVE may answer after the fall back.
    (_S.REGISTERING, _E.LEASE_ANSWERED): _S.REGISTERING,
    (_S.REGISTERING, _E.REPORT_ANSWERED): _S.REGISTERING,
    (_S.REGISTERING, _E.CALL_FAILED): _S.REGISTERING,
    (_S.REGISTERING, _E.TASK_FINISHED): _S.REGISTERING,
    (_S.ACTIVE, _E.STOP): _S.STOPPED,
    (_S.ACTIVE, _E.TICK): _S.ACTIVE,
    (_S.ACTIVE, _E.HEARTBEAT_KNOWN): _S.ACTIVE,
    (_S.ACTIVE, _E.HEARTBEAT_UNKNOWN): _S.REGISTERING,
    (_S.ACTIVE, _E.LEASE_ANSWERED): _S.ACTIVE,
    (_S.ACTIVE, _E.REPORT_ANSWERED): _S.ACTIVE,
    (_S.ACTIVE, _E.CALL_FAILED): _S.ACTIVE,
    (_S.ACTIVE, _E.TASK_FINISHED): _S.ACTIVE,
    # Stopped: everything still in flight is ignored.
    (_S.STOPPED, _E.STOP): _S.STOPPED,
    (_S.STOPPED, _E.TICK): _S.STOPPED,
    (_S.STOPPED, _E.REGISTERED): _S.STOPPED,
    (_S.STOPPED, _E.HEARTBEAT_KNOWN): _S.STOPPED,
    (_S.STOPPED, _E.HEARTBEAT_UNKNOWN): _S.STOPPED,
    (_S.STOPPED, _E.LEASE_ANSWERED): _S.STOPPED,
    (_S.STOPPED, _E.REPORT_ANSWERED): _S.STOPPED,
    (_S.STOPPED, _E.CALL_FAILED): _S.STOPPED,
    (_S.STOPPED, _E.TASK_FINISHED): _S.STOPPED,
}


class IllegalEvent(AssertionError):
    """An input the core cannot receive in its state: a bug in the runtime driving it."""


def transition(state: AgentState, event: AgentEvent) -> AgentState:
    target = TRANSITIONS.get((state, event))
    if target is None:
        raise IllegalEvent(f"agent core: event {event} is illegal in state {state}")
    return target


# --------------------------------------------------------------------------- effects


class LogLevel(enum.StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


@dataclass(frozen=True, slots=True)
class Call:
    request_id: int
    node_id: str
    method: Method
    request: AgentRequest
    timeout_ms: int  # the call's deadline; the core expires it at sent + timeout_ms


@dataclass(frozen=True, slots=True)
class RunTask:
    task: LeasedTask


@dataclass(frozen=True, slots=True)
class CancelTask:
    task_id: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Log:
    level: LogLevel
    text: str


Effect = Call | RunTask | CancelTask | Log


class Rng(Protocol):
    """What the core needs of `random.Random` (pass a seeded instance)."""

    def random(self) -> float: ...


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class AgentCoreConfig:
    """Every option explicit: no defaults here (the file format has documented ones)."""

    agent_id: str
    cloud: str
    region: str
    arch: str
    capacity: Resources
    control_nodes: tuple[str, ...]  # control-plane node ids, in rotation order
    heartbeat_interval_ms: int  # until a RegisterResponse says otherwise
    call_timeout_ms: int  # deadline of Register, Heartbeat and Report calls
    lease_wait_ms: int  # long-poll hold asked of the server; Lease deadline adds call_timeout_ms
    lease_interval_ms_min: int  # at most one Lease call start per this long
    lease_tasks_max: int  # max_tasks of one Lease call
    tasks_running_max: int
    # Leases to hold, in multiples of capacity and of tasks_running_max: what does not
    # fit runs from a queue as slots free (the leader grants at most its own maximum).
    lease_depth: int
    results_pending_max: int  # leasing pauses while this many results await acknowledgement
    reports_inflight_max: int  # report calls in flight, each with one result (older leaders)
    report_results_max: int  # results one report call carries (leaders that take several)
    report_bytes_max: int  # and their result and error bytes (the first result always goes)
    retry_backoff_ms_min: int
    retry_backoff_ms_max: int
    result_bytes_max: int
    error_bytes_max: int

    def __post_init__(self) -> None:
        # Configuration comes from an operator's file: bad values are ValueErrors.
        for name in ("agent_id", "cloud", "region", "arch"):
            if not getattr(self, name):
                raise ValueError(f"agent config: {name} must not be empty")
        if not self.control_nodes:
            raise ValueError("agent config: control_nodes must name at least one node")
        if len(set(self.control_nodes)) != len(self.control_nodes) or not all(self.control_nodes):
            nodes = self.control_nodes
            raise ValueError(f"agent config: control_nodes repeat or are empty: {nodes}")
        if not (self.capacity.cpu > 0 and self.capacity.memory_mb > 0 and self.capacity.gpu >= 0):
            raise ValueError(f"agent config: capacity must be positive, got {self.capacity}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith(("_ms", "_max", "_ms_min", "_ms_max")) and (
                type(value) is not int or value < 1
            ):
                raise ValueError(f"agent config: {f.name} must be an integer >= 1, got {value!r}")
        if self.retry_backoff_ms_min > self.retry_backoff_ms_max:
            raise ValueError("agent config: retry_backoff_ms_min > retry_backoff_ms_max")
        if type(self.lease_depth) is not int or not 1 <= self.lease_depth <= LEASE_DEPTH_MAX:
            raise ValueError(
                f"agent config: lease_depth must be an integer in 1..{LEASE_DEPTH_MAX}, "
                f"got {self.lease_depth!r}"
            )


# --------------------------------------------------------------------------- internals

ResultKey = tuple[str, int]  # (task id, epoch)


class _Lane:
    """One stream of calls: at most one in flight, a due time, a failure streak."""

    __slots__ = ("attempt", "due_ms", "in_flight")

    def __init__(self, due_ms: int) -> None:
        self.in_flight: int | None = None
        self.due_ms = due_ms
        self.attempt = Attempt(due_ms)  # failure streak, for the retry policy


@dataclass(frozen=True, slots=True)
class _Outstanding:
    request_id: int
    node_id: str
    method: Method
    sent_ms: int
    deadline_ms: int
    result_key: ResultKey | None  # REPORT only: its first result
    more_keys: tuple[ResultKey, ...] = ()  # REPORT only: the results in `more`


@dataclass(frozen=True, slots=True)
class _Running:
    task: LeasedTask
    started_ms: int


class _Result:
    __slots__ = ("alone", "error", "lane", "resources", "result_json", "success")

    def __init__(
        self, success: bool, result_json: str, error: str, due_ms: int, resources: Resources
    ) -> None:
        assert success == (result_json != ""), "success carries a result, failure does not"
        assert success != (error != ""), "failure carries an error, success does not"
        self.success = success
        self.result_json = result_json
        self.error = error
        self.lane = _Lane(due_ms)
        self.resources = resources  # what its run held: the leader frees it on the report
        self.alone = False  # a call carrying it with others was refused: it goes alone


def _truncate_utf8(text: str, limit_bytes: int) -> str:
    data = text.encode("utf-8")
    if len(data) <= limit_bytes:
        return text
    marker = " [truncated]"
    keep = max(0, limit_bytes - len(marker))
    return data[:keep].decode("utf-8", errors="ignore") + marker[: limit_bytes - keep]


# --------------------------------------------------------------------------- the core


class AgentCore:
    def __init__(self, config: AgentCoreConfig, rng: Rng) -> None:
        self._config = config
        self._rng = rng
        self._state = AgentState.INIT
        self._now_ms = 0
        self._effects: list[Effect] = []
        self._next_request_id = 1
        self._heartbeat_interval_ms = config.heartbeat_interval_ms
        # Whether the leader counts a parked lease poll as a heartbeat: its latest
        # register or lease answer says (older nodes never do).
        self._poll_is_heartbeat = False
        nodes = config.control_nodes
        # Agents start on different nodes so a dead first node is not everyone's first try.
        start = nodes[min(len(nodes) - 1, int(rng.random() * len(nodes)))]
        retry = RetryConfig(
            nodes=nodes,
            call_timeout_ms=config.call_timeout_ms,
            redirects_max=len(nodes),
            backoff_ms_min=config.retry_backoff_ms_min,
            backoff_ms_max=config.retry_backoff_ms_max,
            give_up_after_ms=None,  # a daemon: results are never dropped for want of a leader
            retry_unauthenticated=True,  # the token may be rotated under a running agent
            unreachable_ms=UNREACHABLE_MS,
            hedge_after_ms=None,  # heartbeats and leases are not idempotent copies
        )
        self._policy = RetryPolicy(retry, rng, start)
        self._outstanding: dict[int, _Outstanding] = {}
        self._register = _Lane(0)
        self._heartbeat = _Lane(0)
        self._lease = _Lane(0)  # the room poll
        self._standing = _Lane(0)  # the standing poll (see the module docstring)
        self._running: dict[str, _Running] = {}  # task id -> run (one run per task id)
        # Leased, waiting for a slot, in lease order (never also in _running).
        self._queued: dict[str, LeasedTask] = {}
        self._lease_depth = 1  # granted by the latest RegisterResponse
        self._short_runs = 0  # runs in a row shorter than QUEUE_RUN_MS_MAX
        self._results: dict[ResultKey, _Result] = {}  # insertion order = report order
        # Node -> when it answered a report of several results for the first only (an
        # older node): reports to it go one result per call for a while (MANY_RETRY_MS).
        self._many_ignored_ms: dict[str, int] = {}
        self._used = Resources(0.0, 0, 0)

    # ---- read-only views (tests, the simulator's checkers, logs)

    @property
    def state(self) -> AgentState:
        return self._state

    @property
    def leader_id(self) -> str:
        """The node the agent currently believes leads (and sends its calls to)."""
        return self._policy.leader

    @property
    def heartbeat_interval_ms(self) -> int:
        return self._heartbeat_interval_ms

    @property
    def free(self) -> Resources:
        return self._config.capacity.minus(self._used)

    @property
    def running_task_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._running))

    @property
    def queued_task_ids(self) -> tuple[str, ...]:
        return tuple(self._queued)

    @property
    def lease_depth(self) -> int:
        """The depth the agent leases to now: the granted one while its tasks are short."""
        return self._lease_depth if self._short_runs >= QUEUE_SHORT_RUNS_MIN else 1

    def _queueing(self) -> bool:
        return self.lease_depth > 1

    @property
    def pending_results(self) -> tuple[ResultKey, ...]:
        return tuple(self._results)

    @property
    def calls_in_flight(self) -> int:
        return len(self._outstanding)

    def take_effects(self) -> tuple[Effect, ...]:
        """Everything the runtime must do, in order; each effect is handed out once."""
        effects = tuple(self._effects)
        self._effects.clear()
        return effects

    # ---- inputs

    def start(self, now_ms: int) -> None:
        self._enter(AgentEvent.START, now_ms)
        self._register.due_ms = now_ms
        self._log(LogLevel.INFO, f"agent {self._config.agent_id} starting")
        self._pump()

    def stop(self, now_ms: int) -> None:
        """Stop for good: running tasks are cancelled, nothing more is sent."""
        self._enter(AgentEvent.STOP, now_ms)
        for task_id in sorted(self._running):
            self._cancel_run(task_id)
        if self._queued:
            self._log(
                LogLevel.WARNING,
                f"stopped with {len(self._queued)} queued task(s) not started: "
                f"{list(self._queued)} (their leases expire)",
            )
            self._queued.clear()
        if self._results:
            self._log(
                LogLevel.WARNING,
                f"stopped with {len(self._results)} unacknowledged result(s): "
                f"{sorted(self._results)}",
            )
        self._check()

    def tick(self, now_ms: int) -> None:
        self._enter(AgentEvent.TICK, now_ms)
        if self._state is AgentState.STOPPED:
            return
        for out in sorted(self._outstanding.values(), key=lambda o: o.request_id):
            if out.deadline_ms <= now_ms:
                del self._outstanding[out.request_id]
                self._failed(
                    out,
                    ErrorKind.DEADLINE,
                    "",
                    f"no answer within {out.deadline_ms - out.sent_ms} ms (expired by the agent)",
                )
        for task_id in sorted(self._running):
            run = self._running[task_id]
            if now_ms >= run.started_ms + run.task.timeout_ms:
                self._cancel_run(task_id)
                error = f"timed out after {run.task.timeout_ms} ms"
                self._log(LogLevel.WARNING, f"task {task_id} epoch {run.task.epoch}: {error}")
                self._add_result(run.task, False, "", error)
        self._pump()

    def on_response(
        self, request_id: int, response: AgentResponse, now_ms: int, served_by: str = ""
    ) -> None:
        """`served_by`: the leader a forwarding follower named ("" if `node_id` served)."""
        out = self._outstanding.pop(request_id, None)
        if out is None:
            self._advance_clock(now_ms)
            self._log(LogLevel.DEBUG, f"ignored answer to unknown or expired call {request_id}")
            return
        expected = RESPONSE_TYPES[out.method]
        assert isinstance(response, expected), (out.method, type(response).__name__)
        event = {
            RegisterResponse: AgentEvent.REGISTERED,
            LeaseResponse: AgentEvent.LEASE_ANSWERED,
            ReportResponse: AgentEvent.REPORT_ANSWERED,
        }.get(type(response))
        if isinstance(response, HeartbeatResponse):
            event = AgentEvent.HEARTBEAT_KNOWN if response.known else AgentEvent.HEARTBEAT_UNKNOWN
        assert event is not None
        before = self._state
        self._enter(event, now_ms)
        if before is AgentState.STOPPED:
            return
        lane = self._lane_of(out)
        if lane is not None:
            assert lane.in_flight == request_id, (lane.in_flight, request_id)
            lane.in_flight = None
        if out.node_id != self._policy.leader:
            self._log(LogLevel.INFO, f"leader is {out.node_id} (it answered)")
        self._policy.succeeded(
            lane.attempt if lane is not None else None, out.node_id, now_ms, served_by
        )
        match response:
            case RegisterResponse():
                self._registered(response)
            case HeartbeatResponse():
                if not response.known:
                    self._log(LogLevel.WARNING, "leader does not know this agent: registering")
                    self._register.due_ms = self._now_ms
                    self._register.attempt = Attempt(self._now_ms)
                self._revoke(response.revoked_task_ids)
            case LeaseResponse():
                self._leased(response)
            case ReportResponse():
                self._reported(out, response)
        self._pump()

    def on_call_failed(
        self,
        request_id: int,
        error_kind: ErrorKind,
        leader_hint: str,
        detail: str,
        now_ms: int,
    ) -> None:
        """`leader_hint`: the leader id a NOT_LEADER answer names ("" if none); `detail`:
        the status message, for logs and for a refused result's failure report."""
        out = self._outstanding.pop(request_id, None)
        if out is None:
            self._advance_clock(now_ms)
            self._log(LogLevel.DEBUG, f"ignored failure of unknown or expired call {request_id}")
            return
        before = self._state
        self._enter(AgentEvent.CALL_FAILED, now_ms)
        if before is AgentState.STOPPED:
            return
        self._failed(out, error_kind, leader_hint, detail)
        self._pump()

    def on_task_finished(
        self, task_id: str, epoch: int, ok: bool, result_json_or_error: str, now_ms: int
    ) -> None:
        self._enter(AgentEvent.TASK_FINISHED, now_ms)
        run = self._running.get(task_id)
        if run is None or run.task.epoch != epoch:
            self._log(LogLevel.DEBUG, f"ignored end of task {task_id} epoch {epoch} (not running)")
            return
        del self._running[task_id]
        self._used = self._used_now()
        short = now_ms - run.started_ms < QUEUE_RUN_MS_MAX
        self._short_runs = min(self._short_runs + 1, QUEUE_SHORT_RUNS_MIN) if short else 0
        self._start_queued()
        if ok and not result_json_or_error:
            ok, result_json_or_error = False, "task returned an empty result"
        if ok and len(result_json_or_error.encode("utf-8")) > self._config.result_bytes_max:
            size = len(result_json_or_error.encode("utf-8"))
            ok, result_json_or_error = (
                False,
                f"result is {size} bytes, over the limit of {self._config.result_bytes_max} bytes",
            )
        if not ok and not result_json_or_error:
            result_json_or_error = "task failed without a message"
        if ok:
            self._add_result(run.task, True, result_json_or_error, "")
        else:
            self._add_result(run.task, False, "", result_json_or_error)
        self._pump()

    def next_deadline_ms(self) -> int | None:
        """When `tick` must run next (possibly already past); None: only inputs matter."""
        if self._state in (AgentState.INIT, AgentState.STOPPED):
            return None
        times = [o.deadline_ms for o in self._outstanding.values()]
        times += [r.started_ms + r.task.timeout_ms for r in self._running.values()]
        if self._state is AgentState.REGISTERING and self._register.in_flight is None:
            times.append(self._register.due_ms)
        if self._state is AgentState.ACTIVE:
            if self._heartbeat.in_flight is None and not self._poll_stands_in():
                times.append(self._heartbeat.due_ms)
            if self._lease.in_flight is None and self._room_poll_due():
                times.append(self._lease.due_ms)
            if self._standing.in_flight is None and self._standing_poll_due():
                times.append(self._standing.due_ms)
        if self._reports_in_flight() < self._report_calls_max():
            times += [r.lane.due_ms for r in self._results.values() if r.lane.in_flight is None]
        return min(times) if times else None

    # ---- transitions and bookkeeping

    def _advance_clock(self, now_ms: int) -> None:
        assert now_ms >= self._now_ms, f"time went backwards: {now_ms} < {self._now_ms}"
        self._now_ms = now_ms

    def _enter(self, event: AgentEvent, now_ms: int) -> None:
        self._advance_clock(now_ms)
        target = transition(self._state, event)
        if target is not self._state:
            self._log(LogLevel.INFO, f"agent {self._state} -> {target} on {event}")
        self._state = target

    def _log(self, level: LogLevel, text: str) -> None:
        self._effects.append(Log(level, text))

    def _used_now(self) -> Resources:
        used = Resources(0.0, 0, 0)
        for task_id in sorted(self._running):  # one order: float sums add up alike
            used = used.plus(self._running[task_id].task.resources)
        return used

    def _lease_free(self) -> Resources:
        """What more may be leased: capacity times the lease depth, less what runs and
        what is queued."""
        capacity, depth = self._config.capacity, self.lease_depth
        free = Resources(capacity.cpu * depth, capacity.memory_mb * depth, capacity.gpu * depth)
        free = free.minus(self._used)
        for task in self._queued.values():
            free = free.minus(task.resources)
        return free

    def _slots_max(self) -> int:
        return self._config.tasks_running_max * self.lease_depth

    def _has_room(self) -> bool:
        free = self._lease_free()
        return (
            len(self._running) + len(self._queued) < self._slots_max()
            and len(self._results) < self._config.results_pending_max
            and free.cpu > CPU_EPSILON
            and free.memory_mb > 0
        )

    def _room_poll_due(self) -> bool:
        """A room poll may go out: room now that no unreported result holds."""
        if not self._has_room():
            return False
        free, slots = self._lease_room()
        return slots > 0 and free.cpu > CPU_EPSILON and free.memory_mb > 0

    def _standing_poll_due(self) -> bool:
        """A standing poll may go out: the agent holds something whose report will free
        room (not at `results_pending_max`)."""
        if len(self._results) >= self._config.results_pending_max:
            return False
        if self._draining():
            return False  # the leader would refill what reports free: let the queue drain
        return bool(self._running or self._queued or self._results)

    def _draining(self) -> bool:
        """Holding queued tasks beyond what the depth leased to now allows (tasks got
        long): no refills until the queue is down to it."""
        return len(self._running) + len(self._queued) >= self._slots_max() and bool(self._queued)

    def _lease_room(self) -> tuple[Resources, int]:
        """`free` and task slots of a room poll sent now: what is free, less what the
        unacknowledged results hold. Their room is the standing poll's: the leader gives
        it to the agent's parked poll as each report arrives; asked for here too, two
        polls would lease into it (one lease proposal leasing nothing)."""
        held = list(self._results.values())
        free = self._lease_free()
        for result in held:
            free = free.minus(result.resources)
        taken = len(self._running) + len(self._queued) + len(held)
        slots = max(0, self._slots_max() - taken)
        assert free.fits_in(self._lease_free()), (free, self._lease_free())
        assert 0 <= slots <= self._slots_max(), slots
        return free, slots

    def _poll_stands_in(self) -> bool:
        """True: no heartbeat is due, a lease poll stands in for it. An agent holding
        nothing (no run, no unacknowledged result) sends none while its lease poll is in
        flight or goes out now: the leader counts a poll as a heartbeat on arrival and for
        as long as it holds it (LeaderDuties.polled). An idle agent then makes one call
        per lease_wait_ms instead of one per heartbeat interval; that is what keeps its
        CPU near grpc's own idle floor. An agent holding anything heartbeats as before:
        heartbeats list its tasks, and their answers name the revoked ones. Only while
        the leader's latest register or lease answer said it counts polls so: a node of
        an older version does not, and would mark a silent idle agent down."""
        if self._running or self._queued or self._results or not self._poll_is_heartbeat:
            return False
        lease = self._lease
        if lease.in_flight is not None:
            return True
        return lease.due_ms <= self._now_ms and self._has_room()

    def _reports_in_flight(self) -> int:
        """Report calls in flight."""
        return sum(1 for o in self._outstanding.values() if o.method is Method.REPORT)

    def _reports_many(self) -> bool:
        """Whether report calls to the believed leader carry several results. Then one
        is in flight at a time and the results that end meanwhile go together in the
        next: under load one call and one commit per batch, not per task; a lone result
        goes at once."""
        ignored_ms = self._many_ignored_ms.get(self._policy.leader)
        return ignored_ms is None or self._now_ms - ignored_ms >= MANY_RETRY_MS

    def _report_calls_max(self) -> int:
        """With a lease queue, one report call in flight: results that end meanwhile go
        together in the next (its answer refills the queue). Without one, each slot's
        result goes at once, up to reports_inflight_max calls."""
        if self._reports_many() and self._queueing():
            return 1
        return self._config.reports_inflight_max

    def _held_task_ids(self) -> tuple[str, ...]:
        return tuple(sorted(set(self._running) | {key[0] for key in self._results}))

    def _lane_of(self, out: _Outstanding) -> _Lane | None:
        if out.method is Method.REPORT:
            assert out.result_key is not None
            result = self._results.get(out.result_key)
            return None if result is None else result.lane
        if out.method is Method.LEASE and self._standing.in_flight == out.request_id:
            return self._standing
        return {
            Method.REGISTER: self._register,
            Method.HEARTBEAT: self._heartbeat,
            Method.LEASE: self._lease,
        }[out.method]

    def _check(self) -> None:
        config = self._config
        assert len(self._running) <= config.tasks_running_max, self._running
        held_max = config.tasks_running_max * config.lease_depth
        assert len(self._running) + len(self._queued) <= held_max, self._queued
        assert not set(self._running) & set(self._queued), (self._running, self._queued)
        # Leasing pauses at results_pending_max; what runs and is queued then still ends.
        assert len(self._results) <= config.results_pending_max + held_max
        assert self._reports_in_flight() <= config.reports_inflight_max
        in_flight = {o.request_id for o in self._outstanding.values() if o.method is Method.REPORT}
        for result in self._results.values():
            assert result.lane.in_flight is None or result.lane.in_flight in in_flight
        assert len(self._outstanding) <= 4 + config.reports_inflight_max, self._outstanding
        assert self._used == self._used_now(), (self._used, self._used_now())
        assert self._policy.leader in config.control_nodes, self._policy.leader
        if self._state is not AgentState.STOPPED:
            in_flight = {o.request_id for o in self._outstanding.values()}
            for lane in (self._register, self._heartbeat, self._lease, self._standing):
                assert lane.in_flight is None or lane.in_flight in in_flight
        else:
            assert not self._running and not self._queued, "stop cancels every run"

    # ---- sending

    def _send(
        self,
        lane: _Lane,
        method: Method,
        request: AgentRequest,
        timeout_ms: int,
        result_key: ResultKey | None = None,
        more_keys: tuple[ResultKey, ...] = (),
    ) -> None:
        assert lane.in_flight is None, method
        assert timeout_ms >= 1, timeout_ms
        request_id = self._next_request_id
        self._next_request_id += 1
        lane.in_flight = request_id
        now = self._now_ms
        self._outstanding[request_id] = _Outstanding(
            request_id, self._policy.leader, method, now, now + timeout_ms, result_key, more_keys
        )
        self._effects.append(Call(request_id, self._policy.leader, method, request, timeout_ms))

    def _pump(self) -> None:
        """Send every call that is due and allowed."""
        config, now = self._config, self._now_ms
        if self._state is AgentState.REGISTERING:
            lane = self._register
            if lane.in_flight is None and lane.due_ms <= now:
                request = RegisterRequest(
                    config.agent_id,
                    config.cloud,
                    config.region,
                    config.arch,
                    config.capacity,
                    config.lease_depth,
                )
                self._send(lane, Method.REGISTER, request, config.call_timeout_ms)
        if self._state is AgentState.ACTIVE:
            lane = self._heartbeat
            if lane.in_flight is None and lane.due_ms <= now and not self._poll_stands_in():
                lane.due_ms = now + self._heartbeat_interval_ms
                request_hb = HeartbeatRequest(
                    config.agent_id, self.free, self._held_task_ids(), tuple(self._queued)
                )
                self._send(lane, Method.HEARTBEAT, request_hb, config.call_timeout_ms)
            timeout_ms = config.lease_wait_ms + config.call_timeout_ms
            lane = self._lease
            if lane.in_flight is None and lane.due_ms <= now and self._room_poll_due():
                lane.due_ms = now + config.lease_interval_ms_min
                free, slots = self._lease_room()
                request_lease = LeaseRequest(
                    config.agent_id, free, min(config.lease_tasks_max, slots), config.lease_wait_ms
                )
                self._send(lane, Method.LEASE, request_lease, timeout_ms)
            lane = self._standing
            if lane.in_flight is None and lane.due_ms <= now and self._standing_poll_due():
                lane.due_ms = now + config.lease_interval_ms_min
                nothing = Resources(0.0, 0, 0)
                request_lease = LeaseRequest(config.agent_id, nothing, 0, config.lease_wait_ms)
                self._send(lane, Method.LEASE, request_lease, timeout_ms)
        if self._state in (AgentState.REGISTERING, AgentState.ACTIVE):
            in_flight, calls_max = self._reports_in_flight(), self._report_calls_max()
            due = [
                key
                for key, result in self._results.items()
                if result.lane.in_flight is None and result.lane.due_ms <= now
            ]
            while due and in_flight < calls_max:
                keys = self._report_group(due) if self._reports_many() else [due[0]]
                due = [key for key in due if key not in keys]
                self._send_report(keys)
                in_flight += 1
        self._check()

    def _report_group(self, due: list[ResultKey]) -> list[ResultKey]:
        """The results of the next report call: the first due one, and after it (unless
        it must go alone) those that fit `report_results_max` and `report_bytes_max`."""
        config = self._config
        first = self._results[due[0]]
        keys = [due[0]]
        if first.alone:
            return keys
        size = len(first.result_json) + len(first.error)
        for key in due[1:]:
            result = self._results[key]
            if len(keys) >= config.report_results_max:
                break
            if result.alone:
                continue
            size += len(result.result_json) + len(result.error)
            if size > config.report_bytes_max:
                break
            keys.append(key)
        return keys

    def _send_report(self, keys: list[ResultKey]) -> None:
        config = self._config
        (task_id, epoch), first = keys[0], self._results[keys[0]]
        more = tuple(
            TaskResult(key[0], key[1], r.success, r.result_json, r.error)
            for key, r in ((key, self._results[key]) for key in keys[1:])
        )
        request = ReportRequest(
            config.agent_id,
            task_id,
            epoch,
            first.success,
            first.result_json,
            first.error,
            lease_into_answer=not self._draining(),
            more=more,
        )
        more_keys = tuple(keys[1:])
        self._send(first.lane, Method.REPORT, request, config.call_timeout_ms, keys[0], more_keys)
        for key in more_keys:
            self._results[key].lane.in_flight = first.lane.in_flight

    # ---- answers

    def _registered(self, response: RegisterResponse) -> None:
        self._poll_is_heartbeat = response.lease_poll_is_heartbeat
        depth = max(1, min(self._config.lease_depth, response.lease_depth))
        if depth != self._lease_depth:
            self._log(LogLevel.INFO, f"lease depth {depth} (asked {self._config.lease_depth})")
        self._lease_depth = depth
        if response.heartbeat_interval_ms > 0:
            self._heartbeat_interval_ms = response.heartbeat_interval_ms
        elif response.heartbeat_interval_ms < 0:
            self._log(
                LogLevel.WARNING,
                f"ignored heartbeat_interval_ms={response.heartbeat_interval_ms} from the leader",
            )
        self._log(
            LogLevel.INFO,
            f"registered with {self._policy.leader}; heartbeat every {self._heartbeat_interval_ms} ms",
        )
        # The registration counts as a heartbeat; a lease may go out at once.
        self._heartbeat.due_ms = self._now_ms + self._heartbeat_interval_ms
        self._heartbeat.attempt = Attempt(self._now_ms)
        self._lease.due_ms = min(self._lease.due_ms, self._now_ms)

    def _lease_problem(self, task: LeasedTask) -> str | None:
        if not task.task_id:
            return "empty task id"
        if task.epoch < 1:
            return f"epoch {task.epoch} < 1"
        if task.timeout_ms < 1:
            return f"timeout_ms {task.timeout_ms} < 1"
        r = task.resources
        if not (r.cpu >= 0 and r.memory_mb >= 0 and r.gpu >= 0):
            return f"negative resources {r}"
        return None

    def _leased(self, response: LeaseResponse) -> None:
        self._poll_is_heartbeat = response.lease_poll_is_heartbeat
        self._take_leases(response.tasks)

    def _take_leases(self, tasks: tuple[LeasedTask, ...]) -> None:
        """Start tasks leased to this agent, in a lease poll's answer or a report's."""
        for task in tasks:
            problem = self._lease_problem(task)
            if problem is not None:
                self._log(LogLevel.ERROR, f"ignored leased task {task.task_id!r}: {problem}")
                continue
            old = self._running.get(task.task_id)
            if old is not None and old.task.epoch == task.epoch:
                self._log(LogLevel.WARNING, f"task {task.task_id} epoch {task.epoch} leased twice")
                continue
            if (task.task_id, task.epoch) in self._results:
                self._log(LogLevel.WARNING, f"task {task.task_id} epoch {task.epoch} already ran")
                continue
            waiting = self._queued.get(task.task_id)
            if waiting is not None and waiting.epoch >= task.epoch:
                self._log(
                    LogLevel.WARNING,
                    f"ignored lease of task {task.task_id} at epoch {task.epoch}: "
                    f"queued at epoch {waiting.epoch}",
                )
                continue
            if waiting is not None:
                self._log(LogLevel.WARNING, f"task {task.task_id} re-leased at {task.epoch}")
                del self._queued[task.task_id]
            if old is not None and old.task.epoch > task.epoch:
                self._log(
                    LogLevel.WARNING,
                    f"ignored lease of task {task.task_id} at epoch {task.epoch}: "
                    f"running it at the newer epoch {old.task.epoch}",
                )
                continue
            if old is not None:
                # Our old lease was taken away and the task leased to us again: the old
                # run's result could never be recorded (its epoch is stale). Start over.
                self._log(
                    LogLevel.WARNING,
                    f"task {task.task_id} re-leased at epoch {task.epoch}: "
                    f"cancelling the run of epoch {old.task.epoch}",
                )
                self._cancel_run(task.task_id)
            held_max = self._config.tasks_running_max * self._lease_depth  # what may come
            if len(self._running) + len(self._queued) >= held_max:
                self._log(
                    LogLevel.ERROR,
                    f"ignored leased task {task.task_id}: all {self._config.tasks_running_max} "
                    f"task slots are busy and {len(self._queued)} tasks queued",
                )
                continue
            # With a lease depth, leases beyond what is free are the point: they wait.
            # Without one, a task the leader leased into room the agent thinks taken
            # runs anyway (the leader's view of capacity is the log's).
            beyond = self._lease_depth > 1 and not task.resources.fits_in(self.free)
            if self._queued or len(self._running) >= self._config.tasks_running_max or beyond:
                self._queued[task.task_id] = task  # runs when a slot frees (_start_queued)
                continue
            if not task.resources.fits_in(self.free):
                self._log(
                    LogLevel.WARNING,
                    f"task {task.task_id} needs {task.resources}, free is {self.free}: "
                    "running it anyway",
                )
            self._start(task)
        self._start_queued()
        if tasks:
            self._lease.due_ms = self._now_ms  # more may fit: poll again at once
            self._standing.due_ms = self._now_ms

    def _start(self, task: LeasedTask) -> None:
        self._running[task.task_id] = _Running(task, self._now_ms)
        self._used = self._used_now()
        self._effects.append(RunTask(task))

    def _start_queued(self) -> None:
        """Start queued tasks in lease order while a slot is free and the next one
        fits what is free (or nothing runs: a task larger than the agent runs alone)."""
        while self._queued and len(self._running) < self._config.tasks_running_max:
            task = next(iter(self._queued.values()))
            if self._running and not task.resources.fits_in(self.free):
                return
            del self._queued[task.task_id]
            self._start(task)

    def _revoke(self, task_ids: tuple[str, ...]) -> None:
        """The leader says these leases are gone (cancelled, requeued, finished): stop
        the runs at once, freeing their slots, and drop results it would refuse (a
        report already in flight gets its own answer)."""
        for task_id in task_ids:
            queued = self._queued.pop(task_id, None)
            if queued is not None:
                self._log(
                    LogLevel.WARNING,
                    f"task {task_id} epoch {queued.epoch}: lease revoked by the leader; "
                    "dropped from the queue",
                )
            if task_id in self._running:
                epoch = self._running[task_id].task.epoch
                self._log(
                    LogLevel.WARNING,
                    f"task {task_id} epoch {epoch}: lease revoked by the leader; stopping it",
                )
                self._cancel_run(task_id)
            for key in [k for k in self._results if k[0] == task_id]:
                if self._results[key].lane.in_flight is None:
                    self._log(LogLevel.INFO, f"result of task {task_id} epoch {key[1]} dropped")
                    del self._results[key]

    def _reported(self, out: _Outstanding, response: ReportResponse) -> None:
        assert out.result_key is not None
        answers: tuple[tuple[ResultKey, bool, str], ...] = (
            (out.result_key, response.recorded, response.reason),
        )
        if len(response.more) == len(out.more_keys):
            answers += tuple(
                (key, a.recorded, a.reason)
                for key, a in zip(out.more_keys, response.more, strict=True)
            )
        else:
            # An older node: it took the first result only. The rest go again, one per call.
            self._many_ignored_ms[out.node_id] = self._now_ms
            self._log(LogLevel.INFO, f"{out.node_id} takes one result per report call")
            for key in out.more_keys:
                lane = self._results[key].lane
                assert lane.in_flight == out.request_id, (lane.in_flight, out.request_id)
                lane.in_flight = None
                lane.due_ms = self._now_ms
        for key, recorded, reason in answers:
            result = self._results.pop(key, None)
            assert result is not None, "a result leaves only when its report is answered"
            task_id, epoch = key
            if recorded:
                self._log(LogLevel.INFO, f"result of task {task_id} epoch {epoch} recorded")
            else:
                self._log(
                    LogLevel.WARNING,
                    f"result of task {task_id} epoch {epoch} refused, dropped: {reason}",
                )
        self._take_leases(response.tasks)

    def _failed(self, out: _Outstanding, kind: ErrorKind, hint: str, detail: str) -> None:
        lane = self._lane_of(out)
        assert lane is not None, "a report in flight keeps its result"
        assert lane.in_flight == out.request_id, (lane.in_flight, out.request_id)
        lane.in_flight = None
        if out.more_keys:
            self._failed_many(out, lane, kind, hint, detail)
            return
        what = f"{out.method} to {out.node_id} failed ({kind})"
        if detail:
            what += f": {detail}"
        before = self._policy.leader
        decision = self._policy.failed(lane.attempt, out.node_id, kind, hint, self._now_ms)
        if decision.retry:
            if kind is ErrorKind.UNAUTHENTICATED:
                self._log(LogLevel.ERROR, f"{what}; check the agent's token")
            else:
                # A redirect followed at once is routine; one that backs off is worth a look.
                backs_off = kind is ErrorKind.NOT_LEADER and decision.delay_ms > 0
                self._log(
                    LogLevel.WARNING if backs_off else LogLevel.INFO, f"{what}; {decision.why}"
                )
            if self._policy.leader != before:
                self._log(LogLevel.INFO, f"next calls go to {self._policy.leader}")
            lane.due_ms = self._now_ms + decision.delay_ms
            return
        self._log(LogLevel.ERROR, what)
        if kind is ErrorKind.INVALID and out.method is Method.REPORT:
            self._refused_report(out, detail)
            return
        # A periodic call (register, heartbeat, lease) refused: the agent keeps trying.
        lane.due_ms = self._now_ms + self._policy.backoff_ms(lane.attempt)

    def _failed_many(
        self, out: _Outstanding, lane: _Lane, kind: ErrorKind, hint: str, detail: str
    ) -> None:
        """A report call of several results failed: one retry decision (the first
        result's lane), which every result of the call follows. Refused as invalid, each
        goes alone, so that the one at fault is refused alone (`_refused_report`)."""
        assert out.result_key is not None
        keys = (out.result_key, *out.more_keys)
        for key in out.more_keys:
            other = self._results[key].lane
            assert other.in_flight == out.request_id, (other.in_flight, out.request_id)
            other.in_flight = None
        if kind is ErrorKind.INVALID:
            self._log(LogLevel.WARNING, f"report of {len(keys)} results refused: {detail}")
            for key in keys:
                self._results[key].alone = True
                self._results[key].lane.due_ms = self._now_ms
            return
        self._log(LogLevel.INFO, f"report of {len(keys)} results to {out.node_id} failed ({kind})")
        decision = self._policy.failed(lane.attempt, out.node_id, kind, hint, self._now_ms)
        delay_ms = decision.delay_ms if decision.retry else self._policy.backoff_ms(lane.attempt)
        for key in keys:
            self._results[key].lane.due_ms = self._now_ms + delay_ms

    def _refused_report(self, out: _Outstanding, detail: str) -> None:
        """The control plane refused the report itself (e.g. over its size limit)."""
        assert out.result_key is not None
        result = self._results.pop(out.result_key)
        task_id, epoch = out.result_key
        if not result.success:
            self._log(LogLevel.ERROR, f"failure report of task {task_id} epoch {epoch} dropped")
            return
        # Tell the control plane the attempt failed rather than let its lease run out.
        error = _truncate_utf8(
            f"control plane refused the result: {detail or 'invalid report'}",
            self._config.error_bytes_max,
        )
        self._results[out.result_key] = _Result(False, "", error, self._now_ms, result.resources)

    # ---- tasks

    def _cancel_run(self, task_id: str) -> None:
        run = self._running.pop(task_id)
        self._used = self._used_now()
        self._effects.append(CancelTask(task_id, run.task.epoch))
        if self._state is not AgentState.STOPPED:
            self._start_queued()

    def _add_result(self, task: LeasedTask, success: bool, result_json: str, error: str) -> None:
        key = (task.task_id, task.epoch)
        assert key not in self._results, key
        assert task.task_id not in self._running, "a result is added once its run is over"
        error = _truncate_utf8(error, self._config.error_bytes_max) if error else ""
        self._results[key] = _Result(success, result_json, error, self._now_ms, task.resources)
