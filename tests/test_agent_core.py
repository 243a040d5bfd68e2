"""Unit tests of the sans-IO agent core, on a fake clock (no sleeps, no I/O)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from goml.agent.core import (
    QUEUE_RUN_MS_MAX,
    QUEUE_SHORT_RUNS_MIN,
    TRANSITIONS,
    AgentCore,
    AgentCoreConfig,
    AgentEvent,
    AgentState,
    Call,
    CancelTask,
    Effect,
    IllegalEvent,
    Log,
    LogLevel,
    Rng,
    RunTask,
    transition,
)
from goml.api.types import (
    AgentResponse as Response,
)
from goml.api.types import (
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
    ResultAnswer,
)

NODES = ("n1", "n2", "n3")


def make_config(**overrides: object) -> AgentCoreConfig:
    base = AgentCoreConfig(
        agent_id="a1",
        cloud="aws",
        region="us-east-1",
        arch="x86_64",
        capacity=Resources(2.0, 4096, 0),
        control_nodes=NODES,
        heartbeat_interval_ms=1000,
        call_timeout_ms=5000,
        lease_wait_ms=2000,
        lease_interval_ms_min=50,
        lease_tasks_max=4,
        tasks_running_max=2,
        lease_depth=1,
        results_pending_max=8,
        reports_inflight_max=2,
        report_results_max=32,
        report_bytes_max=1 << 20,
        retry_backoff_ms_min=100,
        retry_backoff_ms_max=1600,
        result_bytes_max=10_000,
        error_bytes_max=200,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


class FixedRng:
    """random() always returns `value`: 0.0 starts on n1 and makes every backoff d/2."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def leased(task_id: str, epoch: int = 1, cpu: float = 1.0, timeout_ms: int = 60_000) -> LeasedTask:
    return LeasedTask(
        task_id=task_id,
        function="matmul",
        args_json="{}",
        resources=Resources(cpu, 512, 0),
        epoch=epoch,
        timeout_ms=timeout_ms,
        lease_deadline_ms=123_456,
    )


def is_standing(call: Call) -> bool:
    request = call.request
    return isinstance(request, LeaseRequest) and request.max_tasks == 0


class Harness:
    """An AgentCore with a fake clock; remembers the calls it has not answered."""

    def __init__(self, rng: Rng | None = None, **overrides: object) -> None:
        self.core = AgentCore(make_config(**overrides), rng or FixedRng(0.0))
        self.now = 0
        self.effects: list[Effect] = []
        self.open: dict[int, Call] = {}

    def _collect(self) -> list[Effect]:
        new = list(self.core.take_effects())
        self.effects += new
        for e in new:
            if isinstance(e, Call):
                self.open[e.request_id] = e
        return new

    def start(self) -> list[Effect]:
        self.core.start(self.now)
        return self._collect()

    def tick(self, now: int | None = None) -> list[Effect]:
        if now is not None:
            self.now = now
        self.core.tick(self.now)
        return self._collect()

    def run_until(self, end: int) -> None:
        """Tick at every deadline up to `end` (no answers delivered)."""
        for _ in range(10_000):
            deadline = self.core.next_deadline_ms()
            if deadline is None or deadline > end:
                break
            self.tick(max(self.now, deadline))
        self.now = max(self.now, end)

    def respond(self, call: Call, response: Response) -> list[Effect]:
        del self.open[call.request_id]
        self.core.on_response(call.request_id, response, self.now)
        return self._collect()

    def fail(self, call: Call, kind: ErrorKind, hint: str = "", detail: str = "") -> list[Effect]:
        del self.open[call.request_id]
        self.core.on_call_failed(call.request_id, kind, hint, detail, self.now)
        return self._collect()

    def finish(self, task: LeasedTask, ok: bool, text: str) -> list[Effect]:
        self.core.on_task_finished(task.task_id, task.epoch, ok, text, self.now)
        return self._collect()

    def calls(self, method: Method, standing: bool = False) -> list[Call]:
        """Open calls of `method`; for LEASE, the room polls, or with `standing` the
        standing polls (asking for nothing: goml.agent.core)."""
        return sorted(
            (
                c
                for c in self.open.values()
                if c.method is method and (method is not Method.LEASE or is_standing(c) == standing)
            ),
            key=lambda c: c.request_id,
        )

    def call(self, method: Method, standing: bool = False) -> Call:
        found = self.calls(method, standing)
        assert len(found) == 1, (method, found)
        return found[0]

    def register(self, interval_ms: int = 0, lease_depth: int = 1) -> None:
        if not self.open:
            self.start()
        answer = RegisterResponse(interval_ms, lease_depth=lease_depth)
        self.respond(self.call(Method.REGISTER), answer)

    def logs(self, level: LogLevel | None = None) -> list[str]:
        return [
            e.text
            for e in self.effects
            if isinstance(e, Log) and (level is None or e.level is level)
        ]


def warm_up(h: Harness) -> None:
    """Short runs enough that the agent queues from now on (QUEUE_SHORT_RUNS_MIN)."""
    for i in range(QUEUE_SHORT_RUNS_MIN):
        task = leased(f"w{i}")
        h.respond(h.call(Method.LEASE), LeaseResponse((task,)))
        h.finish(task, True, "{}")
        h.respond(h.call(Method.REPORT), ReportResponse(True, ""))
        h.run_until(h.now + 50)  # the room poll's pacing (lease_interval_ms_min)
    for standing in h.calls(Method.LEASE, standing=True):
        h.respond(standing, LeaseResponse(()))
    h.run_until(h.now + 50)


def hold(h: Harness, task_id: str = "H") -> LeasedTask:
    """Answer the open lease poll with one 1-cpu task: an agent holding a task
    heartbeats every interval (an idle one lets its lease poll stand in)."""
    task = leased(task_id)
    h.respond(h.call(Method.LEASE), LeaseResponse((task,)))
    return task


def state_of(h: Harness) -> AgentState:
    return h.core.state  # a call: mypy does not narrow it across inputs


def of_type(effects: list[Effect], kind: type) -> list[Effect]:
    return [e for e in effects if isinstance(e, kind)]


# --------------------------------------------------------------------------- registration


def test_start_registers_with_labels_and_capacity() -> None:
    h = Harness()
    effects = h.start()
    (call,) = of_type(effects, Call)
    assert isinstance(call, Call)
    assert call.node_id == "n1"
    assert call.method is Method.REGISTER
    assert call.request == RegisterRequest(
        "a1", "aws", "us-east-1", "x86_64", Resources(2, 4096, 0)
    )
    assert call.timeout_ms == 5000
    assert h.core.state is AgentState.REGISTERING
    assert h.core.next_deadline_ms() == 5000  # only the call's own deadline


def test_registration_retried_with_backoff_on_the_next_node() -> None:
    h = Harness()
    h.start()
    h.now = 10
    assert of_type(h.fail(h.call(Method.REGISTER), ErrorKind.UNAVAILABLE), Call) == []
    assert h.core.leader_id == "n2"
    assert h.core.next_deadline_ms() == 10 + 50  # d = 100, FixedRng(0) gives d/2
    assert of_type(h.tick(59), Call) == []
    (call,) = of_type(h.tick(60), Call)
    assert isinstance(call, Call) and call.node_id == "n2" and call.method is Method.REGISTER


def test_registered_adopts_the_leaders_heartbeat_interval() -> None:
    h = Harness()
    h.register(interval_ms=300)
    assert h.core.state is AgentState.ACTIVE
    assert h.core.heartbeat_interval_ms == 300
    hold(h)
    assert h.calls(Method.HEARTBEAT) == []
    h.tick(299)
    assert h.calls(Method.HEARTBEAT) == []
    h.tick(300)
    hb = h.call(Method.HEARTBEAT)
    assert hb.request == HeartbeatRequest("a1", Resources(1, 4096 - 512, 0), ("H",))


def test_heartbeat_cadence_every_interval() -> None:
    h = Harness()
    h.register()
    hold(h)
    sent = []
    for t in range(0, 5001, 10):
        h.tick(t)
        for hb in h.calls(Method.HEARTBEAT):
            sent.append(h.now)
            h.respond(hb, HeartbeatResponse(known=True))
    assert sent == [1000, 2000, 3000, 4000, 5000]
    assert h.core.state is AgentState.ACTIVE


def test_heartbeat_unknown_registers_again() -> None:
    h = Harness()
    h.register()
    hold(h)
    h.tick(1000)
    h.respond(h.call(Method.HEARTBEAT), HeartbeatResponse(known=False))
    assert h.core.state is AgentState.REGISTERING
    assert h.call(Method.REGISTER).node_id == "n1"
    h.respond(h.call(Method.REGISTER), RegisterResponse(0))
    assert state_of(h) is AgentState.ACTIVE


def test_an_idle_agent_heartbeats_for_a_leader_that_does_not_count_polls() -> None:
    """An older node's answers lack `lease_poll_is_heartbeat` (decoded False): it would mark
    a silent idle agent down, so the agent heartbeats every interval while it leads; a
    lease answer from a node that counts polls lets the poll stand in again."""
    h = Harness()
    h.start()
    h.respond(h.call(Method.REGISTER), RegisterResponse(0, lease_poll_is_heartbeat=False))
    lease = h.call(Method.LEASE)
    for _ in range(3):  # the poll stays parked; a heartbeat goes every interval
        h.run_until(h.now + 1000)
        h.respond(h.call(Method.HEARTBEAT), HeartbeatResponse(known=True))
    h.respond(lease, LeaseResponse((), lease_poll_is_heartbeat=True))
    h.run_until(h.now + 3000)
    assert h.calls(Method.HEARTBEAT) == []
    # And back: the next answer comes from an older node again.
    h.respond(h.call(Method.LEASE), LeaseResponse((), lease_poll_is_heartbeat=False))
    h.run_until(h.now + 1000)
    assert len(h.calls(Method.HEARTBEAT)) == 1


def test_an_idle_agent_lets_its_lease_poll_stand_in_for_heartbeats() -> None:
    h = Harness()
    h.register()
    lease = h.call(Method.LEASE)
    # Holding nothing, with a poll in flight: no heartbeat, and nothing to wake for but
    # the poll's own deadline.
    assert h.core.next_deadline_ms() == lease.timeout_ms
    h.tick(6000)
    assert h.calls(Method.HEARTBEAT) == []
    h.respond(lease, LeaseResponse(()))  # the poll's wait ended empty: poll again at once
    assert h.calls(Method.HEARTBEAT) == []
    lease = h.call(Method.LEASE)
    # A failed poll backs off: heartbeats go meanwhile (the leader may have forgotten us).
    h.fail(lease, ErrorKind.UNAVAILABLE)
    assert h.calls(Method.LEASE) == []
    hb = h.call(Method.HEARTBEAT)
    assert hb.request == HeartbeatRequest("a1", Resources(2, 4096, 0), ())
    h.respond(hb, HeartbeatResponse(known=True))
    # A poll refused (a leader that marked us down refuses the lease): the heartbeat
    # that learns known=false goes while the poll backs off.
    h.run_until(h.now + 1000)
    h.fail(h.call(Method.LEASE), ErrorKind.INVALID, detail="agent a1 is DOWN")
    h.run_until(h.now + 1000)
    h.respond(h.call(Method.HEARTBEAT), HeartbeatResponse(known=False))
    assert h.core.state is AgentState.REGISTERING
    h.respond(h.call(Method.REGISTER), RegisterResponse(0))
    assert state_of(h) is AgentState.ACTIVE
    # Holding a task, the agent heartbeats every interval again, the poll in flight or not.
    h.run_until(h.now + 50)
    h.respond(h.call(Method.LEASE), LeaseResponse((leased("A"),)))
    assert len(h.calls(Method.LEASE)) == 1
    h.run_until(h.now + 1000)
    hb = h.call(Method.HEARTBEAT)
    assert isinstance(hb.request, HeartbeatRequest) and hb.request.running_task_ids == ("A",)
    # A poll that stood in for longer than an interval: once it brings a task, a
    # heartbeat listing it goes at once.
    h.respond(hb, HeartbeatResponse(known=True))
    h.finish(leased("A"), True, "{}")
    h.respond(h.call(Method.REPORT), ReportResponse(True, ""))
    h.run_until(h.now + 5000)
    assert h.calls(Method.HEARTBEAT) == []
    h.respond(h.call(Method.LEASE), LeaseResponse((leased("B"),)))
    hb = h.call(Method.HEARTBEAT)
    assert isinstance(hb.request, HeartbeatRequest) and hb.request.running_task_ids == ("B",)


# --------------------------------------------------------------------------- leases, capacity


def test_lease_asked_at_once_and_a_busy_agent_keeps_a_standing_poll() -> None:
    h = Harness(reports_inflight_max=1)
    h.register()
    lease = h.call(Method.LEASE)
    assert lease.request == LeaseRequest("a1", Resources(2, 4096, 0), 2, 2000)
    assert lease.timeout_ms == 2000 + 5000
    assert h.calls(Method.LEASE, standing=True) == []  # holding nothing: no standing poll
    a, b = leased("A"), leased("B")
    effects = h.respond(lease, LeaseResponse((a, b)))
    assert [e for e in effects if isinstance(e, RunTask)] == [RunTask(a), RunTask(b)]
    assert h.core.free == Resources(0.0, 4096 - 1024, 0)
    # Full: no room poll, however long we wait (heartbeats still go); one standing poll
    # asking for nothing: the leader leases into the room the next reports free.
    standing = h.call(Method.LEASE, standing=True)
    assert standing.request == LeaseRequest("a1", Resources(0.0, 0, 0), 0, 2000)
    for t in range(0, 6_901, 100):  # within the standing poll's deadline (7 s)
        h.tick(t)
        for hb in h.calls(Method.HEARTBEAT):
            assert isinstance(hb.request, HeartbeatRequest)
            assert hb.request.free.cpu == 0.0
            assert hb.request.running_task_ids == ("A", "B")
            h.respond(hb, HeartbeatResponse(known=True))
        assert h.calls(Method.LEASE) == []
        assert h.calls(Method.LEASE, standing=True) == [standing]
    h.finish(a, True, '{"x":1}')
    report = h.call(Method.REPORT)
    # A's room is the standing poll's (its report goes after that poll): no room poll.
    assert h.calls(Method.LEASE) == []
    h.respond(report, ReportResponse(True, ""))
    room = h.call(Method.LEASE)  # acknowledged: A's room is known free, asked for
    assert room.request == LeaseRequest("a1", Resources(1.0, 4096 - 512, 0), 1, 2000)
    h.finish(b, True, '{"x":2}')
    assert h.calls(Method.LEASE, standing=True) == [standing]  # still one
    h.respond(standing, LeaseResponse(()))  # its wait ended
    h.run_until(h.now + 50)
    assert is_standing(h.call(Method.LEASE, standing=True))  # B's result is still held


def test_a_report_answer_carrying_leases_starts_them_and_the_standing_poll_stays() -> None:
    h = Harness(reports_inflight_max=1)
    h.register()
    a, b = leased("A"), leased("B")
    h.respond(h.call(Method.LEASE), LeaseResponse((a, b)))
    standing = h.call(Method.LEASE, standing=True)
    h.finish(a, True, '{"x":1}')
    report = h.call(Method.REPORT)
    assert isinstance(report.request, ReportRequest)
    assert report.request.lease_into_answer  # the leader may fill A's room in the answer
    c = leased("C")
    effects = h.respond(report, ReportResponse(True, "", (c,)))
    assert [e for e in effects if isinstance(e, RunTask)] == [RunTask(c)]
    assert set(h.core.running_task_ids) == {"B", "C"}
    assert h.core.free == Resources(0.0, 4096 - 1024, 0)
    # Full again: no room poll; the same standing poll waits for the next reports.
    h.run_until(h.now + 50)
    assert h.calls(Method.LEASE) == []
    assert h.calls(Method.LEASE, standing=True) == [standing]
    # A refused report's answer may carry leases too (its own room was freed by another).
    h.finish(b, True, '{"x":2}')
    report = h.call(Method.REPORT)
    d = leased("D")
    h.respond(report, ReportResponse(False, "stale epoch", (d,)))
    assert set(h.core.running_task_ids) == {"C", "D"}
    assert h.core.pending_results == ()


def test_empty_lease_answers_poll_again_no_faster_than_the_minimum_interval() -> None:
    h = Harness()
    h.register()
    starts = []
    for t in range(0, 301):
        h.tick(t)
        for lease in h.calls(Method.LEASE):
            starts.append(t)
            h.respond(lease, LeaseResponse(()))  # a server that does not hold the call
    assert starts == [0, 50, 100, 150, 200, 250, 300]


def test_leasing_pauses_while_too_many_results_are_unacknowledged() -> None:
    h = Harness(results_pending_max=1)
    h.register()
    a = leased("A", cpu=0.5)
    h.respond(h.call(Method.LEASE), LeaseResponse((a,)))
    h.respond(h.call(Method.LEASE), LeaseResponse(()))  # second poll, nothing
    h.finish(a, True, "{}")
    report = h.call(Method.REPORT)
    h.run_until(1000)
    assert h.calls(Method.LEASE) == []  # one pending result is the limit
    h.respond(report, ReportResponse(True, ""))
    assert len(h.calls(Method.LEASE)) == 1


def test_more_tasks_than_slots_are_refused_not_run() -> None:
    h = Harness()
    h.register()
    effects = h.respond(
        h.call(Method.LEASE), LeaseResponse((leased("A"), leased("B"), leased("C")))
    )
    assert [e.task.task_id for e in effects if isinstance(e, RunTask)] == ["A", "B"]
    assert any("task slots are busy" in t for t in h.logs(LogLevel.ERROR))


# --------------------------------------------------------------------------- results


def test_result_reported_under_its_epoch_and_dropped_when_recorded() -> None:
    h = Harness()
    h.register()
    a = leased("A", epoch=7)
    h.respond(h.call(Method.LEASE), LeaseResponse((a,)))
    h.finish(a, True, '{"v":2}')
    report = h.call(Method.REPORT)
    assert report.request == ReportRequest("a1", "A", 7, True, '{"v":2}', "", True)
    h.respond(report, ReportResponse(True, ""))
    assert h.core.pending_results == ()


def test_results_survive_an_outage_and_a_leader_change() -> None:
    h = Harness(rng=random.Random(3))
    h.start()
    first = h.core.leader_id
    h.register()
    a = leased("A", epoch=4)
    h.respond(h.call(Method.LEASE), LeaseResponse((a,)))
    h.finish(a, False, "boom")
    report_nodes = []
    # A 60 s outage: every call fails as unavailable or times out; nothing is dropped.
    for t in range(0, 60_000, 10):
        h.tick(t)
        for call in sorted(h.open.values(), key=lambda c: c.request_id):
            if call.method is Method.REPORT:
                assert call.request == ReportRequest("a1", "A", 4, False, "", "boom", True)
                report_nodes.append(call.node_id)
            kind = ErrorKind.UNAVAILABLE if call.request_id % 2 else ErrorKind.DEADLINE
            h.fail(call, kind)
        assert h.core.pending_results == (("A", 4),)
    assert set(report_nodes) == set(NODES)  # rotated through every node
    assert len(report_nodes) < 200  # backed off, not hammering
    # The control plane comes back with n3 leading: whoever we ask points there.
    for _ in range(10):
        h.tick(h.now + 2000)
        report = h.calls(Method.REPORT)
        if report and report[0].node_id != "n3":
            h.fail(report[0], ErrorKind.NOT_LEADER, hint="n3")
            report = h.calls(Method.REPORT)
        if report:
            break
    assert report[0].node_id == "n3", first
    assert h.core.leader_id == "n3"
    h.respond(report[0], ReportResponse(True, ""))
    assert h.core.pending_results == ()


def test_not_leader_hint_is_followed_at_once() -> None:
    h = Harness()
    h.start()
    effects = h.fail(h.call(Method.REGISTER), ErrorKind.NOT_LEADER, hint="n3")
    (call,) = of_type(effects, Call)
    assert isinstance(call, Call) and call.node_id == "n3"
    assert h.core.leader_id == "n3"


def test_not_leader_ping_pong_falls_back_to_backoff() -> None:
    h = Harness()
    h.start()
    immediate = 0
    for _ in range(6):
        call = h.call(Method.REGISTER)
        hint = "n2" if call.node_id == "n1" else "n1"
        if of_type(h.fail(call, ErrorKind.NOT_LEADER, hint=hint), Call):
            immediate += 1
        else:
            h.run_until(h.now + 5000)
    assert immediate < 6
    assert any("redirected too often" in t for t in h.logs(LogLevel.WARNING))


def test_not_leader_without_hint_or_with_unknown_hint_rotates() -> None:
    h = Harness()
    h.start()
    h.fail(h.call(Method.REGISTER), ErrorKind.NOT_LEADER, hint="")
    assert h.core.leader_id == "n2"
    h.run_until(1000)
    h.fail(h.call(Method.REGISTER), ErrorKind.NOT_LEADER, hint="stranger")
    assert h.core.leader_id == "n3"
    assert any("unknown leader hint" in t for t in h.logs(LogLevel.WARNING))


def test_a_failure_on_a_node_we_no_longer_believe_in_does_not_rotate() -> None:
    h = Harness()
    h.register()
    hold(h)
    h.tick(1000)
    hb, lease = h.call(Method.HEARTBEAT), h.call(Method.LEASE)
    h.fail(hb, ErrorKind.UNAVAILABLE)
    assert h.core.leader_id == "n2"
    h.fail(lease, ErrorKind.UNAVAILABLE)  # also sent to n1: no second rotation
    assert h.core.leader_id == "n2"


def test_stale_epoch_refusal_drops_the_result_with_a_log() -> None:
    h = Harness()
    h.register()
    a = leased("A", epoch=2)
    h.respond(h.call(Method.LEASE), LeaseResponse((a,)))
    h.finish(a, True, "{}")
    h.respond(h.call(Method.REPORT), ReportResponse(False, "stale epoch 2, task at epoch 3"))
    assert h.core.pending_results == ()
    assert any("refused, dropped: stale epoch 2" in t for t in h.logs(LogLevel.WARNING))
    h.run_until(10_000)
    assert h.calls(Method.REPORT) == []


def test_refused_success_report_becomes_a_failure_report() -> None:
    h = Harness()
    h.register()
    a = leased("A")
    h.respond(h.call(Method.LEASE), LeaseResponse((a,)))
    h.finish(a, True, '{"big":1}')
    h.fail(h.call(Method.REPORT), ErrorKind.INVALID, detail="result_json is 9 MB")
    report = h.call(Method.REPORT)
    assert isinstance(report.request, ReportRequest)
    assert not report.request.success and report.request.epoch == 1
    assert report.request.error == "control plane refused the result: result_json is 9 MB"
    h.fail(report, ErrorKind.INVALID)
    assert h.core.pending_results == ()  # a refused failure report is dropped


def test_unauthenticated_keeps_the_result_and_backs_off() -> None:
    h = Harness()
    h.register()
    a = leased("A")
    h.respond(h.call(Method.LEASE), LeaseResponse((a,)))
    h.finish(a, True, "{}")
    h.fail(h.call(Method.REPORT), ErrorKind.UNAUTHENTICATED)
    assert h.core.pending_results == (("A", 1),)
    assert h.core.leader_id == "n1"
    assert any("token" in t for t in h.logs(LogLevel.ERROR))


def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    for seed in range(20):
        h = Harness(rng=random.Random(seed))
        h.start()
        for n in range(1, 12):
            call = h.call(Method.REGISTER)
            h.fail(call, ErrorKind.UNAVAILABLE)
            failed_at = h.now
            deadline = h.core.next_deadline_ms()
            assert deadline is not None
            delay = deadline - failed_at
            d = min(1600, 100 * 2 ** (n - 1))
            assert d // 2 <= delay <= d, (seed, n, delay)
            h.tick(deadline)
    # Jitter: different seeds give different delays.
    delays = set()
    for seed in range(10):
        h = Harness(rng=random.Random(seed))
        h.start()
        h.fail(h.call(Method.REGISTER), ErrorKind.UNAVAILABLE)
        delays.add(h.core.next_deadline_ms())
    assert len(delays) > 1


def test_success_resets_the_backoff() -> None:
    h = Harness()
    h.start()
    for _ in range(5):
        h.fail(h.call(Method.REGISTER), ErrorKind.UNAVAILABLE)
        h.run_until(h.now + 2000)
    h.respond(h.call(Method.REGISTER), RegisterResponse(0))
    hold(h)
    h.tick(h.now + 1000)
    h.fail(h.call(Method.HEARTBEAT), ErrorKind.UNAVAILABLE)
    assert h.core.next_deadline_ms() == h.now + 50


def test_unanswered_call_expires_and_a_late_answer_is_ignored() -> None:
    h = Harness(call_timeout_ms=400)
    h.start()
    register = h.call(Method.REGISTER)
    h.tick(400)  # the core's own deadline
    assert h.core.leader_id == "n2"
    assert any("expired by the agent" in t for t in h.logs(LogLevel.INFO))
    h.core.on_response(register.request_id, RegisterResponse(0), 401)
    h._collect()
    assert h.core.state is AgentState.REGISTERING
    assert any("unknown or expired call" in t for t in h.logs())


# --------------------------------------------------------------------------- tasks


def test_timeout_cancels_and_reports_failure() -> None:
    h = Harness()
    h.register()
    h.now = 100
    a = leased("A", epoch=3, timeout_ms=300)
    h.respond(h.call(Method.LEASE), LeaseResponse((a,)))
    assert h.core.next_deadline_ms() == 100 + 300
    assert of_type(h.tick(399), CancelTask) == []
    effects = h.tick(400)
    assert of_type(effects, CancelTask) == [CancelTask("A", 3)]
    report = h.call(Method.REPORT)
    assert report.request == ReportRequest("a1", "A", 3, False, "", "timed out after 300 ms", True)
    assert h.core.running_task_ids == ()
    h.finish(a, True, "{}")  # the run's late end is ignored
    assert h.core.pending_results == (("A", 3),)


def test_task_keeps_running_past_its_lease_deadline() -> None:
    h = Harness()
    h.register()
    a = replace(leased("A"), lease_deadline_ms=10)  # control-plane time, long past
    h.respond(h.call(Method.LEASE), LeaseResponse((a,)))
    h.run_until(5000)
    assert h.core.running_task_ids == ("A",)
    h.finish(a, True, "{}")
    assert h.call(Method.REPORT).request == ReportRequest("a1", "A", 1, True, "{}", "", True)


def test_releasing_a_running_task_restarts_it_under_the_new_epoch() -> None:
    h = Harness(tasks_running_max=3, capacity=Resources(3.0, 4096, 0))
    h.register()
    a1, a2 = leased("A", epoch=1), leased("A", epoch=2)
    h.respond(h.call(Method.LEASE), LeaseResponse((a1,)))
    effects = h.respond(h.call(Method.LEASE), LeaseResponse((a2,)))
    assert of_type(effects, CancelTask) == [CancelTask("A", 1)]
    assert of_type(effects, RunTask) == [RunTask(a2)]
    h.finish(a1, True, '{"old":1}')  # ignored: that run was cancelled
    assert h.core.pending_results == ()
    h.finish(a2, True, '{"new":1}')
    assert h.call(Method.REPORT).request == ReportRequest("a1", "A", 2, True, '{"new":1}', "", True)
    # An older epoch arriving late is ignored.
    h.respond(h.call(Method.LEASE), LeaseResponse((leased("B", epoch=1),)))
    effects = h.respond(h.call(Method.LEASE), LeaseResponse((leased("B", epoch=0),)))
    assert of_type(effects, RunTask) == []


def test_heartbeat_lists_running_and_unreported_tasks() -> None:
    h = Harness()
    h.register()
    a, b = leased("A"), leased("B")
    h.respond(h.call(Method.LEASE), LeaseResponse((b, a)))
    h.finish(a, False, "")
    h.fail(h.call(Method.REPORT), ErrorKind.UNAVAILABLE)
    h.tick(1000)
    hb = h.call(Method.HEARTBEAT)
    assert isinstance(hb.request, HeartbeatRequest)
    assert hb.request.running_task_ids == ("A", "B")
    assert h.core.pending_results == (("A", 1),)


def test_failure_texts_are_never_empty_and_are_capped() -> None:
    h = Harness(tasks_running_max=3, capacity=Resources(3.0, 4096, 0), reports_inflight_max=3)
    h.register()
    a, b, c = leased("A"), leased("B"), leased("C")
    h.respond(h.call(Method.LEASE), LeaseResponse((a, b, c)))
    h.finish(a, False, "")
    h.finish(b, False, "é" * 1000)
    h.finish(c, True, "x" * 10_001)
    errors = {
        c.request.task_id: c.request.error
        for c in h.calls(Method.REPORT)
        if isinstance(c.request, ReportRequest)
    }
    assert errors["A"] == "task failed without a message"
    assert len(errors["B"].encode()) <= 200 and errors["B"].endswith("[truncated]")
    assert errors["C"] == "result is 10001 bytes, over the limit of 10000 bytes"


def test_results_that_end_while_a_report_is_in_flight_go_together_in_the_next() -> None:
    h = Harness(
        lease_depth=4,
        tasks_running_max=6,
        capacity=Resources(6.0, 4096, 0),
        report_results_max=3,
        report_bytes_max=25,
        results_pending_max=16,
    )
    h.register(lease_depth=4)
    warm_up(h)
    tasks = [leased(t) for t in "ABCDEF"]
    h.respond(h.call(Method.LEASE), LeaseResponse(tuple(tasks)))
    h.finish(tasks[0], True, "{}")
    first = h.call(Method.REPORT)  # a lone result goes at once, alone
    assert isinstance(first.request, ReportRequest) and first.request.more == ()
    results = ('{"b":1}', '{"c":1}', '{"d":1}', '{"e":1}', "{}")
    for t, result in zip(tasks[1:], results, strict=True):
        h.finish(t, True, result)
    assert h.calls(Method.REPORT) == [first]  # one call in flight: the rest wait for it
    h.respond(first, ReportResponse(True, ""))
    [second] = h.calls(Method.REPORT)
    assert isinstance(second.request, ReportRequest)
    # Three results at most, and 25 bytes of results (the first always goes): B, C, D.
    assert second.request.task_id == "B"
    assert [r.task_id for r in second.request.more] == ["C", "D"]
    assert [r.result_json for r in second.request.more] == ['{"c":1}', '{"d":1}']
    h.respond(
        second,
        ReportResponse(True, "", (), (ResultAnswer(True, ""), ResultAnswer(False, "stale"))),
    )
    [third] = h.calls(Method.REPORT)
    assert isinstance(third.request, ReportRequest)
    assert (third.request.task_id, [r.task_id for r in third.request.more]) == ("E", ["F"])
    assert {key[0] for key in h.core.pending_results} == {"E", "F"}


def test_an_older_leader_gets_one_result_per_call_up_to_the_in_flight_cap() -> None:
    h = Harness(lease_depth=4, tasks_running_max=4, capacity=Resources(4.0, 4096, 0))
    h.register(lease_depth=4)
    warm_up(h)
    tasks = [leased(t) for t in "ABCD"]
    h.respond(h.call(Method.LEASE), LeaseResponse(tuple(tasks)))
    h.finish(tasks[0], True, "{}")
    first = h.call(Method.REPORT)
    for t in tasks[1:]:
        h.finish(t, True, "{}")
    h.respond(first, ReportResponse(True, ""))  # alone: nothing to learn from it
    [many] = h.calls(Method.REPORT)
    assert isinstance(many.request, ReportRequest) and len(many.request.more) == 2
    # An answer without `more`: an older leader, which recorded the first result only.
    h.respond(many, ReportResponse(True, ""))
    assert len(h.core.pending_results) == 2
    calls = h.calls(Method.REPORT)
    assert len(calls) == 2  # reports_inflight_max, one result each
    assert all(isinstance(c.request, ReportRequest) and c.request.more == () for c in calls)
    h.respond(calls[0], ReportResponse(True, ""))
    assert h.core.pending_results == ((calls[1].request.task_id, 1),)  # type: ignore[union-attr]


def report_of_b_and_c(h: Harness) -> Call:
    """A queueing agent's report call carrying B and C, which ended while A's was in flight."""
    h.register(lease_depth=4)
    warm_up(h)
    tasks = [leased(t) for t in "ABC"]
    h.respond(h.call(Method.LEASE), LeaseResponse(tuple(tasks)))
    h.finish(tasks[0], True, "{}")
    first = h.call(Method.REPORT)
    h.finish(tasks[1], True, "{}")
    h.finish(tasks[2], True, "{}")
    h.respond(first, ReportResponse(True, ""))
    many = h.call(Method.REPORT)
    assert isinstance(many.request, ReportRequest) and len(many.request.more) == 1
    return many


def test_a_refused_report_of_several_results_sends_each_alone() -> None:
    h = Harness(lease_depth=4, tasks_running_max=3, capacity=Resources(3.0, 4096, 0))
    many = report_of_b_and_c(h)
    h.fail(many, ErrorKind.INVALID, detail="result too large")
    alone = h.call(Method.REPORT)
    assert isinstance(alone.request, ReportRequest)
    assert (alone.request.task_id, alone.request.more) == ("B", ())
    h.respond(alone, ReportResponse(True, ""))
    alone = h.call(Method.REPORT)
    assert isinstance(alone.request, ReportRequest)
    assert (alone.request.task_id, alone.request.more) == ("C", ())


def test_a_failed_report_of_several_results_retries_them_together() -> None:
    h = Harness(lease_depth=4, tasks_running_max=3, capacity=Resources(3.0, 4096, 0))
    many = report_of_b_and_c(h)
    h.fail(many, ErrorKind.UNAVAILABLE)
    assert h.calls(Method.REPORT) == []  # backing off
    h.run_until(h.now + 2000)
    again = h.call(Method.REPORT)
    assert isinstance(again.request, ReportRequest)
    assert (again.request.task_id, [r.task_id for r in again.request.more]) == ("B", ["C"])
    assert again.node_id != many.node_id  # the retry policy moved on, once


def test_stop_cancels_running_tasks_and_sends_nothing_more() -> None:
    h = Harness()
    h.register()
    a = leased("A")
    h.respond(h.call(Method.LEASE), LeaseResponse((a,)))
    h.core.stop(h.now)
    effects = h._collect()
    assert of_type(effects, CancelTask) == [CancelTask("A", 1)]
    assert h.core.next_deadline_ms() is None
    h.tick(100_000)
    assert of_type(h._collect(), Call) == []


def test_same_seed_same_effects() -> None:
    def trace(seed: int) -> list[Effect]:
        h = Harness(rng=random.Random(seed))
        h.start()
        for _ in range(8):
            h.fail(h.call(Method.REGISTER), ErrorKind.UNAVAILABLE)
            h.run_until(h.now + 3000)
        return h.effects

    assert trace(5) == trace(5)
    assert trace(5) != trace(6)


def test_time_must_not_go_backwards() -> None:
    h = Harness()
    h.start()
    h.tick(100)
    with pytest.raises(AssertionError):
        h.core.tick(99)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        make_config(control_nodes=())
    with pytest.raises(ValueError):
        make_config(control_nodes=("n1", "n1"))
    with pytest.raises(ValueError):
        make_config(call_timeout_ms=0)
    with pytest.raises(ValueError):
        make_config(retry_backoff_ms_min=5000)
    with pytest.raises(ValueError):
        make_config(capacity=Resources(0.0, 1, 0))


# --------------------------------------------------------------------------- the state table


@pytest.mark.parametrize("state", list(AgentState))
@pytest.mark.parametrize("event", list(AgentEvent))
def test_transition_table_every_pair(state: AgentState, event: AgentEvent) -> None:
    expected = TRANSITIONS.get((state, event))
    if expected is None:
        with pytest.raises(IllegalEvent):
            transition(state, event)
    else:
        assert transition(state, event) is expected


def _arrange(state: AgentState, event: AgentEvent) -> Harness:
    """A core in `state` with as much as possible in flight: a lease, a report, a
    heartbeat (ACTIVE) or a registration (REGISTERING), and a running task."""
    h = Harness(tasks_running_max=3, capacity=Resources(3.0, 4096, 0))
    if state is AgentState.INIT:
        return h
    h.register()
    a, b = leased("A"), leased("B")
    h.respond(h.call(Method.LEASE), LeaseResponse((a, b)))
    h.finish(a, True, "{}")
    h.tick(1000)
    assert {c.method for c in h.open.values()} == {Method.LEASE, Method.REPORT, Method.HEARTBEAT}
    if state is AgentState.ACTIVE:
        return h
    heartbeat_event = event in (AgentEvent.HEARTBEAT_KNOWN, AgentEvent.HEARTBEAT_UNKNOWN)
    if not (state is AgentState.STOPPED and heartbeat_event):
        h.respond(h.call(Method.HEARTBEAT), HeartbeatResponse(known=False))
        assert {c.method for c in h.open.values()} == {
            Method.LEASE,
            Method.REPORT,
            Method.REGISTER,
        }
    if state is AgentState.STOPPED:
        h.core.stop(h.now)
        h._collect()
    assert h.core.state is state
    return h


def _fire(h: Harness, event: AgentEvent) -> bool:
    """Produce `event` through the public API; False if the core cannot receive it now."""
    method_of: dict[AgentEvent, tuple[Method, Response]] = {
        AgentEvent.REGISTERED: (Method.REGISTER, RegisterResponse(0)),
        AgentEvent.HEARTBEAT_KNOWN: (Method.HEARTBEAT, HeartbeatResponse(True)),
        AgentEvent.HEARTBEAT_UNKNOWN: (Method.HEARTBEAT, HeartbeatResponse(False)),
        AgentEvent.LEASE_ANSWERED: (Method.LEASE, LeaseResponse(())),
        AgentEvent.REPORT_ANSWERED: (Method.REPORT, ReportResponse(True, "")),
    }
    if event is AgentEvent.START:
        h.core.start(h.now)
    elif event is AgentEvent.STOP:
        h.core.stop(h.now)
    elif event is AgentEvent.TICK:
        h.core.tick(h.now)
    elif event in method_of:
        method, response = method_of[event]
        calls = h.calls(method)
        if not calls:
            return False
        h.respond(calls[0], response)
    elif event is AgentEvent.CALL_FAILED:
        if not h.open:
            return False
        h.fail(min(h.open.values(), key=lambda c: c.request_id), ErrorKind.UNAVAILABLE)
    else:
        assert event is AgentEvent.TASK_FINISHED
        if h.core.state is AgentState.INIT:
            return False
        h.finish(leased("B"), True, "{}")
    return True


@pytest.mark.parametrize("state", list(AgentState))
@pytest.mark.parametrize("event", list(AgentEvent))
def test_every_pair_through_the_public_api(state: AgentState, event: AgentEvent) -> None:
    """Legal pairs move the core as the table says; illegal ones raise IllegalEvent or
    cannot be produced at all (no such call in flight)."""
    h = _arrange(state, event)
    expected = TRANSITIONS.get((state, event))
    if expected is None:
        try:
            fired = _fire(h, event)
        except IllegalEvent:
            return
        assert not fired, f"{event} in {state} should be illegal"
        return
    assert _fire(h, event), f"{event} in {state} is legal but could not be produced"
    assert h.core.state is expected


def test_answers_in_stopped_state_change_nothing() -> None:
    h = _arrange(AgentState.STOPPED, AgentEvent.REPORT_ANSWERED)
    pending = h.core.pending_results
    h.respond(h.call(Method.REPORT), ReportResponse(True, ""))
    h.fail(h.call(Method.LEASE), ErrorKind.UNAVAILABLE)
    assert h.core.pending_results == pending
    assert of_type(h._collect(), Call) == []


# --------------------------------------------------------------------------- revocation


@pytest.mark.parametrize("depth", [0, -1, 65, 2.0])
def test_a_lease_depth_out_of_range_is_a_clear_config_error(depth: object) -> None:
    with pytest.raises(ValueError, match=r"lease_depth must be an integer in 1\.\.64"):
        make_config(lease_depth=depth)


def test_with_a_lease_depth_leases_beyond_the_slots_wait_in_a_queue() -> None:
    h = Harness(lease_depth=3)
    start = h.start()
    register = h.call(Method.REGISTER)
    assert isinstance(register.request, RegisterRequest) and register.request.lease_depth == 3
    assert start
    h.respond(register, RegisterResponse(10, lease_depth=2))  # granted: 2 (its maximum)
    assert h.core.lease_depth == 1  # no queue before its tasks are seen to be short
    warm_up(h)
    assert h.core.lease_depth == 2
    for beat in h.calls(Method.HEARTBEAT):
        h.respond(beat, HeartbeatResponse(True))
    h.respond(h.call(Method.LEASE), LeaseResponse(()))  # sent before the last run ended
    h.run_until(h.now + 50)
    poll = h.call(Method.LEASE)
    # Twice the capacity and twice the slots: 4 cpu, 4 tasks (2 cpu, 2 slots to run).
    assert poll.request == LeaseRequest("a1", Resources(4.0, 8192, 0), 4, 2000)
    tasks = [leased(t) for t in "ABCD"]
    effects = h.respond(poll, LeaseResponse(tuple(tasks)))
    assert [e.task.task_id for e in effects if isinstance(e, RunTask)] == ["A", "B"]
    assert h.core.running_task_ids == ("A", "B")
    assert h.core.queued_task_ids == ("C", "D")
    assert h.calls(Method.LEASE) == []  # full: 4 held
    h.run_until(10)
    beat = h.call(Method.HEARTBEAT)
    assert isinstance(beat.request, HeartbeatRequest)
    assert beat.request.running_task_ids == ("A", "B")  # renewed and started
    assert beat.request.queued_task_ids == ("C", "D")  # renewed, not RUNNING
    # A slot frees: the next queued task starts at once, no call needed.
    effects = h.finish(tasks[0], True, "{}")
    assert [e.task.task_id for e in effects if isinstance(e, RunTask)] == ["C"]
    assert h.core.queued_task_ids == ("D",)
    # Revoked while queued: dropped without a run.
    effects = h.respond(beat, HeartbeatResponse(True, ("D",)))
    assert of_type(effects, CancelTask) == []
    assert h.core.queued_task_ids == ()
    assert any("dropped from the queue" in t for t in h.logs(LogLevel.WARNING))


def test_a_long_run_stops_the_queue_and_what_is_queued_drains_without_refills() -> None:
    h = Harness(lease_depth=2)
    h.register(lease_depth=2)
    warm_up(h)
    tasks = [leased(t) for t in "ABCD"]
    h.respond(h.call(Method.LEASE), LeaseResponse(tuple(tasks)))
    assert h.core.queued_task_ids == ("C", "D")
    h.run_until(h.now + QUEUE_RUN_MS_MAX)
    for beat in h.calls(Method.HEARTBEAT):
        h.respond(beat, HeartbeatResponse(True))
    for standing in h.calls(Method.LEASE, standing=True):
        h.respond(standing, LeaseResponse(()))
    h.finish(tasks[0], True, "{}")  # a long run: no queue from now on
    assert h.core.lease_depth == 1
    assert h.core.queued_task_ids == ("D",)  # C took A's slot
    report = h.call(Method.REPORT)
    assert isinstance(report.request, ReportRequest)
    assert not report.request.lease_into_answer  # 3 held for 2 slots: no refill
    h.run_until(h.now + 100)
    assert h.calls(Method.LEASE) == [] and h.calls(Method.LEASE, standing=True) == []
    h.respond(report, ReportResponse(True, ""))
    h.finish(tasks[1], True, "{}")  # D starts: down to the depth of now, refills again
    assert h.core.queued_task_ids == ()
    report = h.call(Method.REPORT)
    assert isinstance(report.request, ReportRequest) and report.request.lease_into_answer


def test_a_queued_task_larger_than_what_is_free_waits_for_room() -> None:
    h = Harness(lease_depth=2)
    h.register(lease_depth=2)
    warm_up(h)
    small, big = leased("S", cpu=1.0), leased("B", cpu=2.0)
    effects = h.respond(h.call(Method.LEASE), LeaseResponse((small, big)))
    assert [e.task.task_id for e in effects if isinstance(e, RunTask)] == ["S"]
    assert h.core.queued_task_ids == ("B",)  # 1 cpu free of 2: it waits, in order
    effects = h.finish(small, True, "{}")
    assert [e.task.task_id for e in effects if isinstance(e, RunTask)] == ["B"]
    h.respond(h.call(Method.REPORT), ReportResponse(True, "", (leased("T"),)))
    assert h.core.queued_task_ids == ("T",)  # B holds both cpus
    h.core.stop(h.now)
    assert of_type(h._collect(), CancelTask) == [CancelTask("B", 1)]  # T never started
    assert h.core.queued_task_ids == ()


def test_a_revoked_lease_stops_the_run_frees_its_slot_and_drops_its_result() -> None:
    h = Harness()
    h.register(interval_ms=10)  # the heartbeat comes before the report's retry (>= 50 ms)
    first, second = leased("t1"), leased("t2")
    h.respond(h.call(Method.LEASE), LeaseResponse((first, second)))
    assert h.core.running_task_ids == ("t1", "t2")
    h.finish(second, True, '{"x":1}')  # t2's result waits for its report
    report = h.call(Method.REPORT)
    h.fail(report, ErrorKind.UNAVAILABLE)  # not acknowledged: the result stays pending
    assert h.core.pending_results == (("t2", 1),)
    h.run_until(10)
    beat = h.call(Method.HEARTBEAT)
    assert isinstance(beat.request, HeartbeatRequest)
    assert set(beat.request.running_task_ids) == {"t1", "t2"}
    effects = h.respond(beat, HeartbeatResponse(True, ("t1", "t2")))
    assert CancelTask("t1", 1) in effects  # the run is stopped at once
    assert h.core.running_task_ids == ()
    assert h.core.free == Resources(2.0, 4096, 0)  # its slot is free for the next lease
    assert h.core.pending_results == ()  # the leader would refuse it: dropped
    assert any("revoked" in t for t in h.logs(LogLevel.WARNING))
    h.finish(first, True, '{"late":1}')  # a run that ends anyway is ignored
    assert h.core.pending_results == ()


def test_a_revoked_task_whose_report_is_in_flight_keeps_its_result_until_answered() -> None:
    h = Harness()
    h.register()
    only = leased("t1")
    h.respond(h.call(Method.LEASE), LeaseResponse((only,)))
    h.finish(only, True, '{"x":1}')
    report = h.call(Method.REPORT)  # in flight
    h.run_until(h.core.heartbeat_interval_ms)
    h.respond(h.call(Method.HEARTBEAT), HeartbeatResponse(True, ("t1",)))
    assert h.core.pending_results == (("t1", 1),)
    h.respond(report, ReportResponse(True, ""))
    assert h.core.pending_results == ()
