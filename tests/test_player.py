"""The scenario player against a fake backend with a fake clock: what a fault does, when a
failover starts and ends, which submits are steady, and that the workload is the seed's."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import pytest

from goml.api.types import TaskRequest
from goml.scenario.faults import Pair
from goml.scenario.loader import load_scenario_text
from goml.scenario.player import (
    COMMAND_TYPES,
    FinalState,
    ScenarioPlayer,
    SubmitDone,
    SubmitOutcome,
    commands_per_task,
)
from goml.scenario.schema import AnyLink, Scenario

TOPOLOGY = """
topology:
  nodes:
    - {name: a1, cloud: aws, region: r1, roles: [control]}
    - {name: a2, cloud: aws, region: r1, roles: [control]}
    - {name: g1, cloud: gcp, region: r2, roles: [control]}
    - {name: w1, cloud: gcp, region: r2, roles: [agent]}
"""
WORKLOAD = """
workload:
  clients: [{name: ca, node: a1}, {name: cg, node: g1}]
  rate_per_s: 20
  stop_s: 5
  mix:
    matmul: {weight: 3, args: {n: 8}}
    fft: {weight: 1, args: {n_samples: 64}}
"""


def scenario(body: str, duration_s: int = 10) -> Scenario:
    return load_scenario_text(f"name: t\nduration_s: {duration_s}\n{TOPOLOGY}{body}").scenario


@dataclass
class Submitted:
    client: str
    request: TaskRequest
    done: SubmitDone
    at_s: float


@dataclass
class FakeBackend:
    """Timers on a fake clock; records what the player asks for; submits end when the
    test says so."""

    leading: tuple[str, int] | None = ("a1", 1)
    clock_s: float = 0.0
    lag_s: float = 0.0  # how late every timer runs (a busy real main loop)
    actions: list[tuple[float, str, str]] = field(default_factory=list)
    blocked: frozenset[Pair] = frozenset()
    clogged: frozenset[Pair] = frozenset()
    latency: dict[Pair, AnyLink] = field(default_factory=dict)
    submits: list[Submitted] = field(default_factory=list)
    notes: list[tuple[str, str, str]] = field(default_factory=list)
    _timers: list[tuple[float, int, Callable[[], None]]] = field(default_factory=list)
    _sequence: itertools.count[int] = field(default_factory=itertools.count)

    def run_until(self, until_s: float) -> None:
        while self._timers and self._timers[0][0] <= until_s:
            due_s, _, action = heapq.heappop(self._timers)
            self.clock_s = max(self.clock_s, due_s + self.lag_s)
            action()
        self.clock_s = until_s

    def now_s(self) -> float:
        return self.clock_s

    def schedule(self, delay_s: float, action: Callable[[], None]) -> None:
        assert delay_s >= 0
        heapq.heappush(self._timers, (self.clock_s + delay_s, next(self._sequence), action))

    def _did(self, what: str, name: str) -> None:
        self.actions.append((self.clock_s, what, name))

    def crash_node(self, name: str) -> None:
        self._did("crash_node", name)

    def start_node(self, name: str) -> None:
        self._did("start_node", name)

    def pause_node(self, name: str, duration_s: float) -> None:
        self._did("pause_node", f"{name} {duration_s:g}")

    def crash_agent(self, name: str) -> None:
        self._did("crash_agent", name)

    def start_agent(self, name: str) -> None:
        self._did("start_agent", name)

    def pause_agent(self, name: str, duration_s: float) -> None:
        self._did("pause_agent", f"{name} {duration_s:g}")

    def disk_stall(self, name: str, stall_ms: float | None) -> None:
        self._did("disk_stall", f"{name} {stall_ms}")

    def disk_full(self, name: str, full: bool) -> None:
        self._did("disk_full", f"{name} {full}")

    def wipe_node(self, name: str) -> None:
        self._did("wipe_node", name)

    def set_clock(self, name: str, offset_ms: int) -> None:
        self._did("set_clock", f"{name} {offset_ms}")

    def set_links(
        self, blocked: frozenset[Pair], clogged: frozenset[Pair], latency: Mapping[Pair, AnyLink]
    ) -> None:
        self.blocked, self.clogged, self.latency = blocked, clogged, dict(latency)

    def leader(self) -> tuple[str, int] | None:
        return self.leading

    def submit(self, client: str, request: TaskRequest, done: SubmitDone) -> None:
        self.submits.append(Submitted(client, request, done, self.clock_s))

    def task_counts(self) -> Mapping[str, int] | None:
        return {"PENDING": len(self.submits)}

    def note(self, kind: str, subject: str, detail: str) -> None:
        self.notes.append((kind, subject, detail))

    # the test's side: end a submit
    def ack(self, submit: Submitted, task_id: str, started_s: float | None = None) -> None:
        start = submit.at_s if started_s is None else started_s
        submit.done(SubmitOutcome(start, self.clock_s, task_id, ""))


def played(body: str, **backend: object) -> tuple[ScenarioPlayer, FakeBackend]:
    fake = FakeBackend(**backend)  # type: ignore[arg-type]
    player = ScenarioPlayer(scenario(body), 7, fake)
    if fake.leading is not None:
        player.leader_seen(*fake.leading)  # both backends start playing once a leader leads
    player.start()
    return player, fake


SCHEDULED = """
workload:
  clients: [{name: ca, node: a1}, {name: cg, node: g1}]
  schedule:
    - {at_s: 1, client: ca}
    - {at_s: 3, client: ca}
    - {at_s: 3.5, client: cg}
    - {at_s: 6, client: ca}
  mix: {matmul: {args: {n: 8}}}
"""


# ----------------------------------------------------------------------- failover


def test_a_crash_of_the_leader_opens_a_failover_the_first_later_submit_closes() -> None:
    player, fake = played(
        SCHEDULED + "faults: [{at_s: 2, kind: crash, target: leader, restart_after_s: 4}]\n"
    )
    fake.run_until(1.0)
    before = fake.submits[0]  # started before the crash, answered after it
    fake.run_until(2.0)
    assert fake.actions == [(2.0, "crash_node", "a1")]
    assert player.failover_started_s == 2.0
    fake.run_until(3.0)
    during = fake.submits[1]
    fake.run_until(3.2)
    fake.ack(before, "t-before")  # answered after the crash but started before it
    assert player.failover_started_s == 2.0
    assert player.obs.failovers_s == []
    fake.run_until(3.7)
    fake.ack(during, "t-during")
    assert player.obs.failovers_s == [pytest.approx(1.7)]
    assert player.failover_started_s is None
    fake.run_until(6.5)
    assert (6.0, "start_node", "a1") in fake.actions
    fake.ack(fake.submits[3], "t-after")  # no failover under way, reaches a quorum
    assert player.obs.submit_ms == [pytest.approx(x) for x in (2200.0, 700.0, 500.0)]
    # `before` started steady; `during` started in the window; `after` is steady again.
    assert player.obs.submit_ms_steady == [pytest.approx(2200.0), pytest.approx(500.0)]
    assert ("failover-start", "", "crash of leader a1") in fake.notes


def test_a_fault_on_a_follower_is_no_failover() -> None:
    player, fake = played("faults: [{at_s: 1, kind: pause, target: g1, duration_s: 2}]\n")
    fake.run_until(1.0)
    assert fake.actions == [(1.0, "pause_node", "g1 2")]
    assert player.failover_started_s is None


def test_a_submit_waiting_for_a_thread_is_judged_when_its_call_started() -> None:
    """A chaos submit may start after it was issued: steady is decided at its start."""
    player, fake = played(SCHEDULED + "faults: [{at_s: 1.5, kind: pause, target: leader, duration_s: 1}]\n")  # fmt: skip
    fake.run_until(1.0)
    issued = fake.submits[0]  # issued at 1.0 (steady then); its call starts at 1.6
    fake.run_until(2.0)
    assert player.failover_started_s == 1.5
    fake.ack(issued, "t1", started_s=1.6)
    assert player.obs.submit_ms == [pytest.approx(400.0)]
    assert player.obs.submit_ms_steady == []
    assert player.obs.failovers_s == [pytest.approx(0.5)]  # started after the fault


# -------------------------------------------------------------------------- links


def test_a_one_way_partition_cuts_only_its_direction() -> None:
    _, fake = played(
        "faults: [{at_s: 1, kind: partition, direction: one_way, from: [a1], to: [g1, w1]}]\n"
    )
    fake.run_until(1.0)
    assert fake.blocked == {("a1", "g1"), ("a1", "w1")}
    assert ("g1", "a1") not in fake.blocked


def test_heal_after_of_one_partition_leaves_another_in_place() -> None:
    player, fake = played(
        "faults:\n"
        "  - {at_s: 1, kind: partition, groups: [[g1]], heal_after_s: 2}\n"
        "  - {at_s: 2, kind: partition, direction: one_way, from: [a1], to: [a2]}\n"
    )
    fake.run_until(2.0)
    cut_g1 = {(x, y) for x in ("g1",) for y in ("a1", "a2", "w1")}
    cut_g1 |= {(y, x) for x, y in cut_g1}
    assert fake.blocked == cut_g1 | {("a1", "a2")}
    fake.run_until(3.0)  # the first one heals: the one-way cut stays
    assert fake.blocked == {("a1", "a2")}
    player.heal()  # a `heal` fault: every partition
    assert fake.blocked == frozenset()


def test_a_partition_cutting_the_leader_off_opens_a_failover() -> None:
    player, fake = played("faults: [{at_s: 1, kind: partition, groups: [[leader]]}]\n")
    fake.run_until(1.0)
    assert player.failover_started_s == 1.0
    assert ("a1", "a2") in fake.blocked and ("a2", "a1") in fake.blocked
    assert ("a2", "g1") not in fake.blocked


def test_clogs_and_latency_end_on_their_own_and_count_as_cut_links() -> None:
    player, fake = played(
        "faults:\n"
        "  - {at_s: 1, kind: clog, between: [[a1], [a2, g1]], duration_s: 2}\n"
        "  - {at_s: 1, kind: link_latency, between: [[a2], [g1]],"
        " latency: {kind: constant, value_ms: 300}, duration_s: 1}\n"
    )
    fake.run_until(1.0)
    assert fake.clogged == {("a1", "a2"), ("a2", "a1"), ("a1", "g1"), ("g1", "a1")}
    assert player.failover_started_s == 1.0  # the leader a1 reaches only itself
    assert set(fake.latency) == {("a2", "g1"), ("g1", "a2")}
    fake.run_until(2.0)
    assert fake.latency == {}
    assert fake.clogged != frozenset()
    fake.run_until(3.0)
    assert fake.clogged == frozenset()


def test_end_faults_restores_every_link_and_cancels_what_was_scheduled() -> None:
    player, fake = played(
        "faults:\n"
        "  - {at_s: 1, kind: partition, groups: [[g1]]}\n"
        "  - {at_s: 1, kind: crash, target: a2, restart_after_s: 5}\n"
        "  - {at_s: 8, kind: crash, target: g1}\n"
    )
    fake.run_until(2.0)
    player.end_faults()
    assert fake.blocked == frozenset()
    fake.run_until(20.0)
    assert fake.actions == [(1.0, "crash_node", "a2")]


# ---------------------------------------------------------------- processes


def test_an_agent_only_nodes_restart_waits_down_s() -> None:
    _, fake = played("faults: [{at_s: 1, kind: restart, target: w1, down_s: 3}]\n")
    fake.run_until(10.0)
    assert fake.actions == [(1.0, "crash_agent", "w1"), (4.0, "start_agent", "w1")]


def test_a_restart_of_a_control_node_waits_down_s_and_a_pause_of_an_agent_only_node() -> None:
    _, fake = played(
        "faults:\n"
        "  - {at_s: 1, kind: restart, target: g1, down_s: 2}\n"
        "  - {at_s: 2, kind: pause, target: w1, duration_s: 4}\n"
    )
    fake.run_until(10.0)
    assert fake.actions == [
        (1.0, "crash_node", "g1"),
        (2.0, "pause_agent", "w1 4"),
        (3.0, "start_node", "g1"),
    ]


def test_a_crash_of_the_leader_when_there_is_none_does_nothing() -> None:
    player, fake = played("faults: [{at_s: 1, kind: crash, target: leader}]\n", leading=None)
    fake.run_until(2.0)
    assert fake.actions == []
    assert player.failover_started_s is None
    assert len(player.obs.faults) == 1  # it is still in the fault timeline


# ------------------------------------------------------------------- workload


def workload_of(seed: int, lag_s: float = 0.0) -> list[tuple[float, str, str, str, str]]:
    fake = FakeBackend(lag_s=lag_s)
    ScenarioPlayer(scenario(WORKLOAD), seed, fake).start()
    fake.run_until(20.0)
    return [
        (s.at_s, s.client, s.request.idempotency_key, s.request.function, s.request.args_json)
        for s in fake.submits
    ]


def test_the_workload_is_the_seeds() -> None:
    first, again, other = workload_of(5), workload_of(5), workload_of(6)
    assert first == again
    assert first != other
    assert 50 < len(first) < 150  # 20/s for 5 s
    assert all(0 < at_s < 5 for at_s, *_ in first)
    keys = [key for _, _, key, _, _ in first]
    assert len(set(keys)) == len(keys)
    assert keys[:2] == ["s5-1", "s5-2"]
    assert {fn for *_, fn, _ in first} == {"matmul", "fft"}
    assert {args for *_, args in first} == {'{"n":8}', '{"n_samples":64}'}


def test_late_timers_neither_drop_nor_add_arrivals() -> None:
    """The chaos runner's timers run late; the submits offered must still be the seed's."""
    on_time, late = workload_of(5), workload_of(5, lag_s=0.1)
    assert [row[1:] for row in late] == [row[1:] for row in on_time]
    assert late[-1][0] > on_time[-1][0]  # the lag did act


def test_scheduled_submits_and_the_request_they_carry() -> None:
    _, fake = played(SCHEDULED)
    fake.run_until(10.0)
    assert [(s.at_s, s.client) for s in fake.submits] == [
        (1.0, "ca"),
        (3.0, "ca"),
        (3.5, "cg"),
        (6.0, "ca"),
    ]
    request = fake.submits[0].request
    assert (request.priority, request.max_attempts, request.timeout_ms) == (0, 3, 30_000)
    assert (request.cloud, request.region, request.resources.cpu) == ("", "", 1.0)


def test_a_submit_ended_twice_is_a_bug() -> None:
    _, fake = played(SCHEDULED)
    fake.run_until(1.0)
    fake.ack(fake.submits[0], "t1")
    with pytest.raises(AssertionError, match="ended twice"):
        fake.ack(fake.submits[0], "t1")


# -------------------------------------------------------------------- summary


def test_the_summary_counts_what_happened() -> None:
    player, fake = played(SCHEDULED + "faults: [{at_s: 2, kind: crash, target: leader}]\n")
    fake.run_until(1.0)
    player.leader_seen("a1", 1)
    fake.ack(fake.submits[0], "t1")
    fake.run_until(3.0)
    fake.leading = ("a2", 2)
    player.leader_seen("a2", 2)
    player.leader_seen("a2", 2)  # seen again: no change
    fake.submits[1].done(SubmitOutcome(3.0, 3.0, None, "gave up after 30000 ms"))
    counts = dict.fromkeys(COMMAND_TYPES, 0) | {"SubmitTasks": 1, "LeaseTasks": 3}
    summary = player.summary(FinalState(True, {"SUCCEEDED": 1}, 0, 0, counts, 3))
    assert summary["tasks_retried"] == 3
    assert summary["tasks_submitted"] == 2
    assert summary["tasks_acknowledged"] == 1
    assert summary["submits_given_up"] == 1
    assert summary["submit_errors"] == ["ca: gave up after 30000 ms"]
    assert summary["tasks_succeeded"] == 1 and summary["tasks_dead"] == 0
    assert summary["leader_changes"] == 1
    assert summary["commands_per_task"] == commands_per_task(counts, 1)
    timeline = summary["timeline"]
    assert isinstance(timeline, dict)
    assert timeline["leaders"] == [(0.0, "a1", 1), (3.0, "a2", 2)]  # a1 seen as it started
    # Every second from the start; the submit due at 1 s was scheduled before that sample.
    assert timeline["tasks_by_state"][:3] == [
        (0.0, {"PENDING": 0}),
        (1.0, {"PENDING": 1}),
        (2.0, {"PENDING": 1}),
    ]


def test_commands_per_task() -> None:
    figures = commands_per_task({"SubmitTasks": 3, "ReportResult": 2}, 3)
    assert figures["SubmitTasks"] == 1.0
    assert figures["ReportResult"] == 0.667
    assert figures["CancelTask"] == 0.0
    assert figures["total"] == 1.667
    assert set(figures) == {*COMMAND_TYPES, "total"}
    assert set(commands_per_task({}, 0).values()) == {None}


def test_submits_before_any_leader_is_seen_are_not_steady() -> None:
    player, fake = played(SCHEDULED, leading=None)
    fake.run_until(1.0)
    first = fake.submits[0]
    fake.ack(first, "t-1")
    fake.leading = ("a1", 1)
    player.leader_seen("a1", 1)
    fake.run_until(3.0)
    fake.ack(fake.submits[1], "t-2")
    assert player.obs.submit_ms == [pytest.approx(0.0), pytest.approx(0.0)]
    assert player.obs.submit_ms_steady == [pytest.approx(0.0)]  # only the one after it
