"""Tests for the task manifest state machine and its command codec (no I/O)."""

from __future__ import annotations

import ast
import dataclasses
import json
import pickle
import random
from pathlib import Path

import pytest

import goml.cluster.commands as commands_module
import goml.cluster.manifest as manifest_module
from goml.cluster.commands import (
    CancelTask,
    Command,
    CommandError,
    ExpireLeases,
    LeaseTasks,
    MarkAgentDown,
    RegisterAgent,
    RenewLeases,
    ReportResult,
    Resources,
    StartTask,
    SubmitTasks,
    TaskSpec,
    command_type,
    decode_command,
    encode_command,
)
from goml.cluster.manifest import (
    AGENT_TRANSITIONS,
    TASK_TRANSITIONS,
    AgentEvent,
    AgentState,
    ApplyResult,
    Code,
    Manifest,
    ManifestLimits,
    SnapshotError,
    Task,
    TaskEvent,
    TaskState,
)

LIMITS = ManifestLimits(
    command_bytes_max=64_000,
    batch_tasks_max=8,
    tasks_max=60,
    agents_max=6,
    args_bytes_max=200,
    result_bytes_max=200,
    error_bytes_max=200,
    name_bytes_max=40,
    lease_tasks_max=8,
    renew_tasks_max=8,
)
BIG = Resources(cpu=16.0, memory_mb=65536, gpu=4)
SMALL = Resources(cpu=1.0, memory_mb=512, gpu=0)


def spec(key: str, **changes: object) -> TaskSpec:
    base = TaskSpec(
        idempotency_key=key,
        function="matmul",
        args_json='{"n":4}',
        resources=SMALL,
        priority=0,
        max_attempts=3,
        timeout_ms=10_000,
        cloud=None,
        region=None,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


class Harness:
    """A manifest plus the Raft index the log would give each entry."""

    def __init__(self, limits: ManifestLimits = LIMITS) -> None:
        self.m = Manifest(limits)
        self.index = 0

    def run(self, command: Command) -> ApplyResult:
        self.index += 1
        return self.m.apply(self.index, encode_command(command))

    def ok(self, command: Command) -> ApplyResult:
        result = self.run(command)
        assert result.ok, result
        return result

    def task(self, task_id: str) -> Task:
        task = self.m.get_task(task_id)
        assert task is not None
        return task

    def agent(
        self,
        agent_id: str = "a1",
        capacity: Resources = BIG,
        cloud: str = "aws",
        region: str = "us-east-1",
    ) -> None:
        self.ok(RegisterAgent(0, agent_id, cloud, region, "amd64", capacity))

    def submit(self, *specs: TaskSpec, now_ms: int = 0) -> list[str]:
        return list(self.ok(SubmitTasks(now_ms, specs)).task_ids)

    def lease(
        self,
        agent_id: str = "a1",
        now_ms: int = 0,
        max_count: int = 8,
        free: Resources = BIG,
        lease_ms: int = 1000,
    ) -> list[str]:
        return list(self.ok(LeaseTasks(now_ms, agent_id, lease_ms, max_count, free)).task_ids)

    def state(self) -> tuple[tuple[Task, ...], tuple[object, ...], int]:
        return (self.m.list_tasks(limit=10_000), self.m.list_agents(), self.m.stale_reports_refused)


def succeed(task: Task, agent_id: str = "a1", now_ms: int = 5) -> ReportResult:
    return ReportResult(now_ms, agent_id, task.id, task.epoch, True, '{"v":1}', None)


def fail(task: Task, agent_id: str = "a1", now_ms: int = 5) -> ReportResult:
    return ReportResult(now_ms, agent_id, task.id, task.epoch, False, None, "boom")


# ---- codec


ALL_COMMANDS: list[Command] = [
    SubmitTasks(1, (spec("k1"), spec("k2", cloud="gcp", region="us-central1", priority=-3))),
    CancelTask(2, "t-1-0"),
    RegisterAgent(3, "a1", "aws", "us-east-1", "arm64", Resources(2.5, 1024, 1)),
    RegisterAgent(3, "a1", "aws", "us-east-1", "arm64", Resources(2.5, 1024, 1), 4),
    MarkAgentDown(4, "a1"),
    LeaseTasks(5, "a1", 30_000, 4, Resources(1.0, 10, 0)),
    StartTask(6, "a1", "t-1-0", 1),
    ReportResult(7, "a1", "t-1-0", 1, True, "[1,2]", None),
    ReportResult(7, "a1", "t-1-0", 1, False, None, "Traceback..."),
    ExpireLeases(8),
    RenewLeases(9, "a1", ("t-1-0", "t-1-1"), 40_000),
]


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: type(c).__name__)
def test_codec_round_trip(command: Command) -> None:
    data = encode_command(command)
    assert decode_command(data) == command
    assert encode_command(decode_command(data)) == data
    body = json.loads(data)
    assert data == json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: type(c).__name__)
def test_command_type_names_the_decoded_type(command: Command) -> None:
    # The summary counts committed commands by command_type, not by a full decode.
    assert (
        command_type(encode_command(command))
        == type(decode_command(encode_command(command))).__name__
    )


@pytest.mark.parametrize(
    "data", [b"\xff\xfe", b"not json", b"[]", b"{}", b'{"type":"Nope"}', b'{"type":1}']
)
def test_command_type_refuses_what_is_no_command(data: bytes) -> None:
    with pytest.raises(CommandError):
        command_type(data)


def test_codec_canonicalises_json_payloads() -> None:
    submit = SubmitTasks(0, (spec("k", args_json='{ "b":1, "a":[1, 2]}'),))
    a = decode_command(encode_command(submit))
    assert isinstance(a, SubmitTasks)
    assert a.tasks[0].args_json == '{"a":[1,2],"b":1}'


GOOD = json.loads(encode_command(StartTask(6, "a1", "t-1-0", 1)))


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xfe",
        b"not json",
        b"[]",
        b"null",
        b'{"type":"Nope"}',
        b"{}",
        pickle.dumps(StartTask(6, "a1", "t-1-0", 1)),
        json.dumps({**GOOD, "extra": 1}).encode(),
        json.dumps({**GOOD, "epoch": True}).encode(),
        json.dumps({**GOOD, "epoch": 0}).encode(),
        json.dumps({**GOOD, "epoch": 1.0}).encode(),
        json.dumps({**GOOD, "epoch": 2**64}).encode(),
        json.dumps({**GOOD, "now_ms": -1}).encode(),
        json.dumps({**GOOD, "task_id": ""}).encode(),
        json.dumps({k: v for k, v in GOOD.items() if k != "agent_id"}).encode(),
        b'{"type":"ExpireLeases","now_ms":NaN}',
        b'{"type":"SubmitTasks","now_ms":0,"tasks":[]}',
    ],
)
def test_decode_refuses_bad_bytes(data: bytes) -> None:
    with pytest.raises(CommandError):
        decode_command(data)


@pytest.mark.parametrize(
    "command",
    [
        SubmitTasks(0, (spec("k", args_json="{not json"),)),
        SubmitTasks(0, (spec("k", args_json="NaN"),)),
        SubmitTasks(0, (spec("k", resources=Resources(float("nan"), 1, 0)),)),
        SubmitTasks(0, (spec("k", max_attempts=0),)),
        SubmitTasks(0, (spec("k", cloud=""),)),
        ReportResult(1, "a1", "t", 1, True, None, None),
        ReportResult(1, "a1", "t", 1, True, "1", "also an error"),
        ReportResult(1, "a1", "t", 1, False, None, None),
        RenewLeases(5, "a1", ("t", "t"), 10),
        RenewLeases(5, "a1", ("t",), 5),
        LeaseTasks(0, "a1", 0, 1, BIG),
    ],
)
def test_encode_refuses_what_replicas_would_refuse(command: Command) -> None:
    with pytest.raises(CommandError):
        encode_command(command)


def test_bad_entry_is_refused_at_apply_without_change() -> None:
    h = Harness()
    h.agent()
    before = h.state()
    for index, data in enumerate([b"garbage", pickle.dumps(1), b"x" * 70_000], start=10):
        result = h.m.apply(index, data)
        assert not result.ok
        assert result.code in (Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED)
        assert h.m.applied_index == index
    assert h.state() == before


def test_apply_asserts_increasing_index() -> None:
    h = Harness()
    h.agent()
    with pytest.raises(AssertionError):
        h.m.apply(1, encode_command(ExpireLeases(0)))


def test_core_modules_import_only_allowed_stdlib() -> None:
    forbidden = {
        "asyncio",
        "grpc",
        "simpy",
        "time",
        "os",
        "socket",
        "random",
        "pickle",
        "datetime",
        "threading",
    }
    allowed = {
        "__future__",
        "enum",
        "hashlib",
        "dataclasses",
        "typing",
        "json",
        "math",
        "functools",
        "goml",
        # Retention: bisection over the finish order, islice, abstract iterator types.
        "bisect",
        "itertools",
        "collections",
    }
    for module in (commands_module, manifest_module):
        assert module.__file__ is not None
        tree = ast.parse(Path(module.__file__).read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                root = name.split(".")[0]
                assert root not in forbidden, (module.__name__, name)
                assert root in allowed, (module.__name__, name)


# ---- the transition tables, every pair


def task_in(state: TaskState, max_attempts: int = 3) -> tuple[Harness, str]:
    h = Harness()
    h.agent()
    if state is TaskState.DEAD:
        max_attempts = 1  # one failure kills it
    (tid,) = h.submit(spec("k", max_attempts=max_attempts))
    if state is TaskState.PENDING:
        return h, tid
    if state is TaskState.CANCELLED:
        h.ok(CancelTask(1, tid))
        return h, tid
    h.lease()
    if state is TaskState.LEASED:
        return h, tid
    if state is TaskState.DEAD:
        h.ok(fail(h.task(tid)))
        return h, tid
    h.ok(StartTask(1, "a1", tid, h.task(tid).epoch))
    if state is TaskState.RUNNING:
        return h, tid
    assert state is TaskState.SUCCEEDED
    h.ok(succeed(h.task(tid)))
    return h, tid


def fire(h: Harness, tid: str, event: TaskEvent) -> ApplyResult:
    task = h.task(tid)
    epoch = max(task.epoch, 1)
    match event:
        case TaskEvent.LEASE:
            return h.run(LeaseTasks(10, "a1", 1000, 8, BIG))
        case TaskEvent.START:
            return h.run(StartTask(10, "a1", tid, epoch))
        case TaskEvent.SUCCEED:
            return h.run(ReportResult(10, "a1", tid, epoch, True, "1", None))
        case TaskEvent.FAIL:
            return h.run(ReportResult(10, "a1", tid, epoch, False, None, "x"))
        case TaskEvent.EXPIRE:
            return h.run(ExpireLeases(10_000))
        case TaskEvent.CANCEL:
            return h.run(CancelTask(10, tid))
        case TaskEvent.RENEW:
            return h.run(RenewLeases(10, "a1", (tid,), 5000))
    raise AssertionError(event)


@pytest.mark.parametrize("state", list(TaskState))
@pytest.mark.parametrize("event", list(TaskEvent))
def test_every_task_transition_pair(state: TaskState, event: TaskEvent) -> None:
    h, tid = task_in(state)
    assert h.task(tid).state is state
    before = h.state()
    result = fire(h, tid, event)
    target = TASK_TRANSITIONS.get((state, event))
    after = h.task(tid)
    if target is None:
        assert after == before[0][0], "an illegal event changes nothing"
        assert h.state()[:2] == before[:2]
        # Sweeps (LEASE, EXPIRE) and RENEW skip what they do not apply to; direct
        # commands refuse with a code.
        if event in (TaskEvent.SUCCEED, TaskEvent.FAIL, TaskEvent.START):
            assert not result.ok
            assert result.code in (Code.STALE_EPOCH, Code.FAILED_PRECONDITION)
        elif event is TaskEvent.CANCEL:
            assert result.code is Code.FAILED_PRECONDITION
        else:
            assert result.ok
            assert tid not in result.task_ids
    else:
        assert result.ok, result
        assert after.state is target
        assert tid in result.task_ids


@pytest.mark.parametrize("event", [TaskEvent.FAIL, TaskEvent.EXPIRE])
def test_retry_becomes_dead_when_attempts_are_used_up(event: TaskEvent) -> None:
    h, tid = task_in(TaskState.RUNNING, max_attempts=1)
    assert fire(h, tid, event).ok
    task = h.task(tid)
    assert task.state is TaskState.DEAD
    assert task.finished_ms is not None
    assert task.lease is None


def test_transition_table_names_only_known_pairs() -> None:
    for (state, event), target in TASK_TRANSITIONS.items():
        assert isinstance(state, TaskState) and isinstance(event, TaskEvent)
        assert state not in (TaskState.SUCCEEDED, TaskState.DEAD, TaskState.CANCELLED)
        assert isinstance(target, TaskState)


def agent_in(state: AgentState) -> Harness:
    h = Harness()
    h.agent()
    if state is AgentState.DOWN:
        h.ok(MarkAgentDown(1, "a1"))
    return h


@pytest.mark.parametrize("state", list(AgentState))
@pytest.mark.parametrize("event", list(AgentEvent))
def test_every_agent_transition_pair(state: AgentState, event: AgentEvent) -> None:
    h = agent_in(state)
    h.submit(spec("k"))
    before = h.state()
    commands: dict[AgentEvent, Command] = {
        AgentEvent.REGISTER: RegisterAgent(5, "a1", "gcp", "us-central1", "arm64", SMALL),
        AgentEvent.DOWN: MarkAgentDown(5, "a1"),
        AgentEvent.LEASE: LeaseTasks(5, "a1", 100, 1, BIG),
    }
    result = h.run(commands[event])
    target = AGENT_TRANSITIONS.get((state, event))
    agent = h.m.get_agent("a1")
    assert agent is not None
    if target is None:
        assert result.code is Code.FAILED_PRECONDITION
        assert h.state() == before
    else:
        assert result.ok
        assert agent.state is target


def test_unknown_agent_and_task_are_not_found() -> None:
    h = Harness()
    assert h.run(LeaseTasks(0, "ghost", 10, 1, BIG)).code is Code.NOT_FOUND
    assert h.run(MarkAgentDown(0, "ghost")).code is Code.NOT_FOUND
    assert h.run(CancelTask(0, "t-9-9")).code is Code.NOT_FOUND
    assert h.run(StartTask(0, "a1", "t-9-9", 1)).code is Code.NOT_FOUND


def test_re_register_updates_labels_and_capacity() -> None:
    h = Harness()
    h.agent()
    h.ok(MarkAgentDown(1, "a1"))
    h.ok(RegisterAgent(7, "a1", "gcp", "us-central1", "arm64", SMALL))
    agent = h.m.get_agent("a1")
    assert agent is not None
    assert (agent.cloud, agent.arch, agent.capacity, agent.state, agent.registered_ms) == (
        "gcp",
        "arm64",
        SMALL,
        AgentState.ALIVE,
        7,
    )
    assert len(h.m.list_agents()) == 1


# ---- leases, epochs, fencing


def test_lease_depth_lets_an_agent_hold_leases_beyond_its_capacity_and_is_optional() -> None:
    plain = encode_command(RegisterAgent(0, "a1", "aws", "us-east-1", "amd64", SMALL))
    assert b"lease_depth" not in plain  # depth 1 is written as nothing: as before
    h = Harness()
    h.ok(RegisterAgent(0, "a1", "aws", "us-east-1", "amd64", Resources(2.0, 1024, 0), 3))
    h.submit(*(spec(f"k{i}", resources=Resources(1.0, 64, 0)) for i in range(8)))
    h.submit(spec("big", resources=Resources(3.0, 64, 0)))  # fits 3x capacity, not capacity
    assert len(h.lease(max_count=8)) == 6  # 3 x 2 cpu of one-cpu tasks
    assert h.lease(max_count=8) == []  # full, and the big one never fits this agent
    restored = Manifest.restore(h.m.snapshot())
    agent = restored.get_agent("a1")
    assert agent is not None and agent.lease_depth == 3
    assert b'"lease_depth":3' in h.m.snapshot()
    with pytest.raises(CommandError, match="lease_depth"):
        decode_command(plain.replace(b'"now_ms"', b'"lease_depth":99,"now_ms"'))


def test_lease_expiry_requeues_and_bumps_epoch() -> None:
    h = Harness()
    h.agent()
    (tid,) = h.submit(spec("k"))
    h.lease(now_ms=100, lease_ms=50)
    assert h.task(tid).lease is not None
    assert h.ok(ExpireLeases(149)).task_ids == ()
    assert h.ok(ExpireLeases(150)).task_ids == (tid,)
    task = h.task(tid)
    assert (task.state, task.epoch, task.attempts, task.lease) == (TaskState.PENDING, 2, 1, None)
    assert task.error == "lease expired"


def test_renew_extends_only_live_leases_of_the_holder() -> None:
    h = Harness()
    h.agent()
    h.agent("a2")
    t1, t2 = h.submit(spec("k1"), spec("k2"))
    h.lease(now_ms=0, lease_ms=100, max_count=1)
    h.lease("a2", now_ms=0, lease_ms=100, max_count=1)
    result = h.ok(RenewLeases(50, "a1", (t1, t2, "t-9-9"), 500))
    assert result.task_ids == (t1,)
    assert h.ok(ExpireLeases(200)).task_ids == (t2,)
    assert h.ok(RenewLeases(600, "a1", (t1,), 900)).task_ids == ()  # already past deadline


def test_old_epoch_report_refused_after_requeue_and_re_lease() -> None:
    h = Harness()
    h.agent()
    h.agent("a2")
    (tid,) = h.submit(spec("k"))
    h.lease("a1", now_ms=0, lease_ms=10)
    old = h.task(tid)
    h.ok(ExpireLeases(10))
    assert h.lease("a2", now_ms=11) == [tid]
    new = h.task(tid)
    assert new.epoch == old.epoch + 2
    # The first holder finishes late: refused, counted, nothing recorded.
    result = h.run(succeed(old, "a1"))
    assert result.code is Code.STALE_EPOCH
    assert h.m.stale_reports_refused == 1
    assert h.task(tid) == new
    # The right agent with the old epoch is refused too.
    assert h.run(succeed(old, "a2")).code is Code.STALE_EPOCH
    h.ok(succeed(new, "a2"))
    # A duplicate of the accepted report is refused: at most one result.
    assert h.run(succeed(new, "a2")).code is Code.STALE_EPOCH
    final = h.task(tid)
    assert (final.state, final.results_recorded, final.result_json) == (
        TaskState.SUCCEEDED,
        1,
        '{"v":1}',
    )
    assert h.m.stale_reports_refused == 3


def test_mark_down_requeues_that_agents_tasks_only() -> None:
    h = Harness()
    h.agent()
    h.agent("a2")
    t1, t2, t3 = h.submit(spec("k1"), spec("k2"), spec("k3", max_attempts=1))
    assert h.lease("a1", max_count=1) == [t1]
    assert h.lease("a2", max_count=1) == [t2]
    assert h.lease("a1", max_count=1) == [t3]
    h.ok(StartTask(1, "a1", t1, 1))
    old = h.task(t1)
    result = h.ok(MarkAgentDown(2, "a1"))
    assert result.task_ids == (t1, t3)
    assert h.task(t1).state is TaskState.PENDING
    assert h.task(t1).epoch == old.epoch + 1
    assert h.task(t3).state is TaskState.DEAD  # its only attempt is spent
    assert h.task(t2).state is TaskState.LEASED
    assert h.run(succeed(old)).code is Code.STALE_EPOCH
    assert h.run(LeaseTasks(3, "a1", 10, 1, BIG)).code is Code.FAILED_PRECONDITION


def test_cancel_of_running_task_fences_its_report() -> None:
    h, tid = task_in(TaskState.RUNNING)
    old = h.task(tid)
    h.ok(CancelTask(5, tid))
    assert h.task(tid).epoch == old.epoch + 1
    assert h.run(succeed(old)).code is Code.STALE_EPOCH
    assert h.task(tid).state is TaskState.CANCELLED


def test_failure_retries_until_attempts_exhausted() -> None:
    h = Harness()
    h.agent()
    (tid,) = h.submit(spec("k", max_attempts=3))
    for attempt in (1, 2, 3):
        assert h.lease() == [tid]
        assert h.task(tid).attempts == attempt
        h.ok(fail(h.task(tid), now_ms=attempt))
    task = h.task(tid)
    assert (task.state, task.attempts, task.error, task.finished_ms) == (
        TaskState.DEAD,
        3,
        "boom",
        3,
    )
    assert h.lease() == []


# ---- submit


def test_idempotent_submit_same_content_same_id() -> None:
    h = Harness()
    (tid,) = h.submit(spec("k"), now_ms=1)
    # A retry after failover, args spelled differently: the same task, not a new one.
    again = h.ok(SubmitTasks(9, (spec("k", args_json='{ "n" : 4 }'),)))
    assert again.task_ids == (tid,)
    assert h.m.counts_by_state()[TaskState.PENDING] == 1
    assert h.task(tid).submitted_ms == 1
    assert h.m.task_id_for_key("k") == tid
    # Also once the task is finished.
    h.agent()
    h.lease()
    h.ok(succeed(h.task(tid)))
    assert h.ok(SubmitTasks(20, (spec("k"),))).task_ids == (tid,)


def test_idempotent_submit_different_content_refused() -> None:
    h = Harness()
    h.submit(spec("k"))
    before = h.state()
    result = h.run(SubmitTasks(2, (spec("k2"), spec("k", priority=5))))
    assert result.code is Code.ALREADY_EXISTS
    assert "'k'" in result.message
    assert h.state() == before
    assert h.m.task_id_for_key("k2") is None


def test_isolation_is_part_of_the_task_and_absent_when_not_asked() -> None:
    h = Harness()
    (plain_id, isolated_id) = h.submit(spec("plain"), spec("alone", isolated=True))
    assert h.task(isolated_id).isolated and not h.task(plain_id).isolated
    # Written only when asked: commands and snapshots of other tasks read as before.
    assert b"isolated" not in encode_command(SubmitTasks(1, (spec("plain"),)))
    command = SubmitTasks(1, (spec("alone", isolated=True),))
    assert decode_command(encode_command(command)) == command
    data = h.m.snapshot()
    assert data.count(b'"isolated"') == 1
    restored = Manifest.restore(data)
    assert restored.get_task(isolated_id).isolated  # type: ignore[union-attr]
    assert not restored.get_task(plain_id).isolated  # type: ignore[union-attr]
    # Same key, isolation changed: another content, so not taken as a retry.
    assert h.run(SubmitTasks(2, (spec("plain", isolated=True),))).code is Code.ALREADY_EXISTS


def test_same_key_twice_in_one_batch() -> None:
    h = Harness()
    a, b = h.submit(spec("k"), spec("k"))
    assert a == b
    assert h.run(SubmitTasks(0, (spec("x"), spec("x", priority=1)))).code is Code.ALREADY_EXISTS
    assert len(h.m.list_tasks(limit=100)) == 1


@pytest.mark.parametrize(
    ("specs", "needle"),
    [
        ([spec(f"k{i}") for i in range(9)], "batch_tasks_max=8"),
        ([spec("k"), spec("big", args_json=json.dumps("x" * 300))], "args_bytes_max=200"),
        ([spec("k"), spec("n" * 41)], "name_bytes_max=40"),
        ([spec("k"), spec("f", function="f" * 41)], "name_bytes_max=40"),
    ],
)
def test_batch_limits_all_or_nothing(specs: list[TaskSpec], needle: str) -> None:
    h = Harness()
    h.submit(spec("first"))
    before = h.state()
    result = h.run(SubmitTasks(1, tuple(specs)))
    assert result.code is Code.RESOURCE_EXHAUSTED
    assert needle in result.message
    assert h.state() == before


def test_tasks_max_and_agents_max() -> None:
    h = Harness(dataclasses.replace(LIMITS, tasks_max=3, agents_max=1))
    h.submit(spec("a"), spec("b"))
    result = h.run(SubmitTasks(0, (spec("c"), spec("d"))))
    assert (result.code, "tasks_max=3" in result.message) == (Code.RESOURCE_EXHAUSTED, True)
    assert len(h.m.list_tasks(limit=10)) == 2
    h.submit(spec("a"), spec("c"))  # a retry of "a" costs nothing
    h.agent("a1")
    assert h.run(RegisterAgent(0, "a2", "aws", "r", "x", BIG)).code is Code.RESOURCE_EXHAUSTED
    h.agent("a1")  # re-register is not a new agent


def test_result_and_lease_limits() -> None:
    h, tid = task_in(TaskState.RUNNING)
    task = h.task(tid)
    big = ReportResult(5, "a1", tid, task.epoch, True, json.dumps("x" * 300), None)
    assert h.run(big).code is Code.RESOURCE_EXHAUSTED
    assert h.task(tid) == task
    assert h.run(LeaseTasks(0, "a1", 10, 9, BIG)).code is Code.RESOURCE_EXHAUSTED
    assert h.run(RenewLeases(0, "a1", tuple(f"t{i}" for i in range(9)), 9)).code is (
        Code.RESOURCE_EXHAUSTED
    )


def test_task_ids_come_from_the_raft_index() -> None:
    h = Harness()
    h.index = 41
    assert h.submit(spec("a"), spec("b")) == ["t-42-0", "t-42-1"]


# ---- scheduling


def test_priority_then_submit_order() -> None:
    h = Harness()
    h.agent()
    ids = h.submit(spec("low", priority=-1), spec("mid1"), spec("high", priority=5), spec("mid2"))
    assert h.lease(max_count=3) == [ids[2], ids[1], ids[3]]
    assert h.lease() == [ids[0]]


def test_capacity_fitting_with_backfill() -> None:
    h = Harness()
    h.agent(capacity=Resources(4.0, 4096, 1))
    ids = h.submit(
        spec("gpu", resources=Resources(1.0, 512, 1), priority=9),
        spec("huge", resources=Resources(8.0, 512, 0), priority=8),
        spec("gpu2", resources=Resources(1.0, 512, 1), priority=7),
        spec("a", resources=Resources(0.1, 100, 0)),
        spec("b", resources=Resources(0.2, 100, 0)),
        spec("c", resources=Resources(2.7, 100, 0)),
        spec("d", resources=Resources(0.1, 100, 0)),
    )
    # 1 + 0.1 + 0.2 + 2.7 = 4.0 exactly-ish: float tolerance must let "c" fit.
    assert h.lease() == [ids[0], ids[3], ids[4], ids[5]]
    # The log knows what is in use: a generous proposed `free` cannot overbook.
    assert h.lease() == []
    h.ok(succeed(h.task(ids[5])))
    assert h.lease(free=Resources(0.05, 100, 0)) == []  # the proposal limits too
    assert h.lease() == [ids[6]]


def test_affinity() -> None:
    h = Harness()
    h.agent("aws1", cloud="aws", region="us-east-1")
    h.agent("gcp1", cloud="gcp", region="us-central1")
    ids = h.submit(
        spec("g", cloud="gcp"),
        spec("r", region="us-east-1"),
        spec("gr", cloud="gcp", region="europe-west1"),
        spec("any"),
    )
    assert h.lease("aws1") == [ids[1], ids[3]]
    assert h.lease("gcp1") == [ids[0]]
    assert h.task(ids[2]).state is TaskState.PENDING


def test_queries() -> None:
    h = Harness()
    h.agent()
    h.agent("a2")
    ids = h.submit(spec("a"), spec("b", function="fft"), spec("c"))
    h.lease(max_count=1)
    h.lease("a2", max_count=1)
    assert [t.id for t in h.m.list_tasks(limit=10, agent_id="a2")] == [ids[1]]
    assert [t.id for t in h.m.list_tasks(limit=10, function="matmul")] == [ids[0], ids[2]]
    assert [t.id for t in h.m.list_tasks(limit=10, state=TaskState.PENDING)] == [ids[2]]
    page = h.m.list_tasks(limit=2)
    assert [t.id for t in h.m.list_tasks(limit=2, after_seq=page[-1].seq)] == [ids[2]]
    counts = h.m.counts_by_state()
    assert counts[TaskState.LEASED] == 2
    assert counts[TaskState.PENDING] == 1
    assert sum(counts.values()) == 3
    assert [a.id for a in h.m.list_agents()] == ["a1", "a2"]


# ---- random command streams: invariants, snapshots, determinism


def random_command(rng: random.Random, m: Manifest, now_ms: int) -> Command:
    tasks = m.list_tasks(limit=10_000)
    agents = [f"a{i}" for i in range(4)]
    roll = rng.random()
    if roll < 0.18 or not tasks:
        batch = tuple(
            spec(
                f"k{rng.randrange(80)}",
                priority=rng.randrange(3),
                max_attempts=rng.randrange(1, 4),
                cloud=rng.choice([None, None, "aws", "gcp"]),
                resources=Resources(rng.choice([0.5, 1.0, 2.0]), 256, rng.choice([0, 0, 1])),
                args_json=json.dumps({"n": rng.randrange(2)}),
            )
            for _ in range(rng.randrange(1, 4))
        )
        return SubmitTasks(now_ms, batch)
    held = [t for t in tasks if t.lease is not None]
    # Mostly aim at held tasks, or reports would almost never be current.
    task = rng.choice(held if held and rng.random() < 0.8 else tasks)
    agent = task.lease.agent_id if task.lease and rng.random() < 0.8 else rng.choice(agents)
    epoch = max(1, task.epoch - (1 if rng.random() < 0.15 else 0))
    if roll < 0.26:
        return RegisterAgent(
            now_ms,
            rng.choice(agents),
            rng.choice(["aws", "gcp"]),
            "r1",
            "amd64",
            Resources(rng.choice([2.0, 4.0]), 2048, rng.randrange(2)),
        )
    if roll < 0.30:
        return MarkAgentDown(now_ms, rng.choice(agents))
    if roll < 0.48:
        return LeaseTasks(
            now_ms,
            rng.choice(agents),
            rng.randrange(50, 500),
            rng.randrange(1, 4),
            Resources(4.0, 4096, 1),
        )
    if roll < 0.58:
        return StartTask(now_ms, agent, task.id, epoch)
    if roll < 0.78:
        ok = rng.random() < 0.6
        return ReportResult(
            now_ms, agent, task.id, epoch, ok, "1" if ok else None, None if ok else "err"
        )
    if roll < 0.86:
        return ExpireLeases(now_ms)
    if roll < 0.93:
        return RenewLeases(now_ms, agent, (task.id,), now_ms + rng.randrange(1, 300))
    return CancelTask(now_ms, task.id)


def check_invariants(m: Manifest, recorded: dict[str, str]) -> None:
    tasks = m.list_tasks(limit=10_000)
    for task in tasks:
        assert (task.lease is not None) == (task.state in (TaskState.LEASED, TaskState.RUNNING))
        assert task.results_recorded <= 1
        assert task.attempts <= task.max_attempts
        if task.lease is not None:
            assert m.get_agent(task.lease.agent_id) is not None
        if task.state is TaskState.SUCCEEDED:
            assert task.result_json is not None
            # Once recorded, a result never changes.
            assert recorded.setdefault(task.id, task.result_json) == task.result_json
        else:
            assert task.id not in recorded
    assert sum(m.counts_by_state().values()) == len(tasks)
    assert [t.seq for t in tasks] == sorted(t.seq for t in tasks)


def run_stream(seed: int, steps: int) -> tuple[list[bytes], Manifest]:
    rng = random.Random(seed)
    m = Manifest(LIMITS)
    entries: list[bytes] = []
    recorded: dict[str, str] = {}
    now_ms = 0
    index = 0
    for _ in range(steps):
        now_ms += rng.randrange(0, 60)
        index += rng.choice([1, 1, 1, 2])  # no-op entries leave gaps in the index
        data = encode_command(random_command(rng, m, now_ms))
        entries.append(data)
        result = m.apply(index, data)
        assert result.index == index
        check_invariants(m, recorded)
    return entries, m


@pytest.mark.parametrize("seed", range(12))
def test_random_stream_invariants_and_snapshots(seed: int) -> None:
    rng = random.Random(seed)
    m = Manifest(LIMITS)
    recorded: dict[str, str] = {}
    now_ms = 0
    checkpoints = 0
    codes: set[Code] = set()
    for step in range(400):
        now_ms += rng.randrange(0, 60)
        result = m.apply(step + 1, encode_command(random_command(rng, m, now_ms)))
        codes.add(result.code)
        check_invariants(m, recorded)
        if step % 37 == 0:
            data = m.snapshot()
            restored = Manifest.restore(data)
            assert restored.snapshot() == data
            assert restored.applied_index == m.applied_index
            assert restored.list_tasks(limit=10_000) == m.list_tasks(limit=10_000)
            m = restored  # carry on from the restored copy: it must behave identically
            checkpoints += 1
    assert checkpoints >= 10
    assert {Code.OK, Code.STALE_EPOCH} <= codes, "the stream must exercise fencing"
    assert m.counts_by_state()[TaskState.SUCCEEDED] > 0


@pytest.mark.parametrize("seed", [3, 17])
def test_same_entries_same_state(seed: int) -> None:
    entries, first = run_stream(seed, 300)
    again_entries, again = run_stream(seed, 300)
    assert again_entries == entries
    assert again.snapshot() == first.snapshot()
    # Replayed from the bytes alone (contiguous indices this time), once straight through
    # and once restored from a snapshot half-way: identical.
    second = Manifest(LIMITS)
    for i, data in enumerate(entries, start=1):
        second.apply(i, data)
    half = Manifest(LIMITS)
    for i, data in enumerate(entries[:150], start=1):
        half.apply(i, data)
    resumed = Manifest.restore(half.snapshot())
    for i, data in enumerate(entries[150:], start=151):
        resumed.apply(i, data)
    assert resumed.snapshot() == second.snapshot()


def test_restore_refuses_bad_snapshots() -> None:
    _, m = run_stream(5, 80)
    data = m.snapshot()
    body = json.loads(data)
    for bad in [
        b"",
        b"[]",
        b"\xff",
        data + b" ",
        json.dumps(body, indent=1).encode(),
        json.dumps({**body, "format": 99}, sort_keys=True, separators=(",", ":")).encode(),
        json.dumps({**body, "extra": 1}, sort_keys=True, separators=(",", ":")).encode(),
    ]:
        with pytest.raises(SnapshotError):
            Manifest.restore(bad)


def test_empty_manifest_snapshot() -> None:
    m = Manifest(LIMITS)
    assert Manifest.restore(m.snapshot()).snapshot() == m.snapshot()
    assert Manifest.restore(m.snapshot()).limits == LIMITS


def reference_lease(
    m: Manifest, agent_id: str, free: Resources, max_count: int, excluded: frozenset[str]
) -> tuple[str, ...] | None:
    """The lease rule as it was written before the manifest kept an index for it: every
    open task, sorted at each call. The index must choose exactly what this chooses."""
    agent = m.get_agent(agent_id)
    if agent is None or agent.state is not AgentState.ALIVE:
        return None
    open_tasks = [t for t in m.list_tasks(limit=10_000) if t.state not in manifest_module.TERMINAL]
    in_use = Resources(0.0, 0, 0)
    for task in open_tasks:  # seq order
        if task.lease is not None and task.lease.agent_id == agent_id:
            in_use = in_use.plus(task.resources)
    free = free.least(agent.capacity.minus(in_use))
    count = max(1, min(max_count, m.limits.lease_tasks_max))
    pending = sorted(
        (t for t in open_tasks if t.state is TaskState.PENDING), key=lambda t: (-t.priority, t.seq)
    )
    chosen: list[str] = []
    for task in pending:
        if len(chosen) == count:
            break
        if task.id in excluded:
            continue
        if task.cloud is not None and task.cloud != agent.cloud:
            continue
        if task.region is not None and task.region != agent.region:
            continue
        if not task.resources.fits_in(free):
            continue
        chosen.append(task.id)
        free = free.minus(task.resources)
    return tuple(chosen)


@pytest.mark.parametrize("seed", range(8))
def test_lease_index_chooses_what_a_full_scan_chooses(seed: int) -> None:
    """Random streams (priorities, clouds, gpu and cpu shapes, requeues, cancels, agents
    going down); after every command, every agent's prediction with random free capacity
    and exclusions equals the full scan's, and the lease index holds every PENDING task."""
    rng = random.Random(1000 + seed)
    m = Manifest(LIMITS)
    now_ms = 0
    compared = chosen_some = 0
    for step in range(300):
        now_ms += rng.randrange(0, 60)
        m.apply(step + 1, encode_command(random_command(rng, m, now_ms)))
        pending = [t for t in m.list_tasks(limit=10_000) if t.state is TaskState.PENDING]
        assert [key[2] for key in m._pending_order] == [
            t.id for t in sorted(pending, key=lambda t: (-t.priority, t.seq))
        ]
        for agent_id in ("a0", "a1", "a2", "a3"):
            free = Resources(rng.choice([0.0, 0.5, 1.0, 2.0, 4.0]), 4096, rng.randrange(2))
            excluded = frozenset(t.id for t in pending if rng.random() < 0.2)
            max_count = rng.randrange(1, 5)
            expected = reference_lease(m, agent_id, free, max_count, excluded)
            assert m.leasable_tasks(agent_id, free, max_count, excluded) == expected
            compared += 1
            chosen_some += bool(expected)
    assert compared == 1200 and chosen_some > 50, chosen_some
