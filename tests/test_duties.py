"""Unit tests of the leader's duties (`goml.cluster.duties.LeaderDuties`): which commands
time and heartbeats make due, against a real manifest.

The manifest is fed as Raft would feed it: encoded commands applied at increasing
indexes. Time is a plain `now_ms` argument; every command `due` returns is applied too,
so each is also checked to be one the manifest accepts.
"""

from __future__ import annotations

import dataclasses

import pytest

from goml.cluster.commands import (
    Command,
    ExpireLeases,
    LeaseTasks,
    MarkAgentDown,
    RegisterAgent,
    RenewLeases,
    ReportResult,
    Resources,
    StartTask,
    StartTasks,
    SubmitTasks,
    TaskSpec,
    encode_command,
)
from goml.cluster.duties import DutiesConfig, LeaderDuties
from goml.cluster.manifest import DEFAULT_LIMITS, ApplyResult, Manifest, Task, TaskState

# Grace and timeout differ, so a test can tell which one decided.
CONFIG = DutiesConfig(
    agent_timeout_ms=5_000, election_grace_ms=3_000, lease_ms=15_000, renew_before_ms=7_500
)
CAPACITY = Resources(cpu=64.0, memory_mb=65_536, gpu=0)
TINY = Resources(cpu=0.01, memory_mb=1, gpu=0)


class Leader:
    """A manifest fed with encoded commands at increasing Raft indexes, and the duties
    of the node that leads it."""

    def __init__(self, config: DutiesConfig = CONFIG) -> None:
        self.manifest = Manifest(DEFAULT_LIMITS)
        self.duties = LeaderDuties(config)
        self._index = 0
        self._keys = 0

    def run(self, command: Command) -> ApplyResult:
        self._index += 1
        return self.manifest.apply(self._index, encode_command(command))

    def apply(self, command: Command) -> ApplyResult:
        result = self.run(command)
        assert result.ok, result
        return result

    def register(self, agent_id: str, now_ms: int = 0) -> None:
        self.apply(RegisterAgent(now_ms, agent_id, "aws", "us-east-1", "amd64", CAPACITY))

    def submit(self, count: int, now_ms: int = 0) -> list[str]:
        specs = []
        for _ in range(count):
            self._keys += 1
            specs.append(
                TaskSpec(
                    idempotency_key=f"k{self._keys}",
                    function="matmul",
                    args_json="{}",
                    resources=TINY,
                    priority=0,
                    max_attempts=5,
                    timeout_ms=60_000,
                    cloud=None,
                    region=None,
                )
            )
        return list(self.apply(SubmitTasks(now_ms, tuple(specs))).task_ids)

    def lease(self, agent_id: str, now_ms: int, count: int, lease_ms: int) -> list[str]:
        """Lease `count` pending tasks (oldest first) to `agent_id`."""
        leased = self.apply(LeaseTasks(now_ms, agent_id, lease_ms, count, CAPACITY)).task_ids
        assert len(leased) == count, leased
        return list(leased)

    def start(self, agent_id: str, task_id: str, now_ms: int) -> None:
        self.apply(StartTask(now_ms, agent_id, task_id, self.task(task_id).epoch))

    def task(self, task_id: str) -> Task:
        task = self.manifest.get_task(task_id)
        assert task is not None, task_id
        return task

    def due(self, now_ms: int) -> list[Command]:
        return self.duties.due(self.manifest, now_ms)

    def apply_due(self, now_ms: int) -> list[Command]:
        commands = self.due(now_ms)
        for command in commands:
            self.apply(command)
        return commands


# ---------------------------------------------------------------- agents going down


@pytest.mark.parametrize(
    ("grace_ms", "timeout_ms"),
    [(8_000, 5_000), (5_000, 5_000), (2_000, 5_000), (0, 5_000)],
)
def test_silent_agent_is_down_after_the_grace_and_its_timeout(
    grace_ms: int, timeout_ms: int
) -> None:
    """An agent the new leader never heard from: never down during the election grace,
    and down once agent_timeout_ms has passed since the election (the leader counts
    from when it could first have been heard)."""
    config = dataclasses.replace(CONFIG, election_grace_ms=grace_ms, agent_timeout_ms=timeout_ms)
    leader = Leader(config)
    leader.register("a1")
    elected_ms = 10_000
    leader.duties.became_leader(elected_ms)
    down_ms = elected_ms + max(grace_ms, timeout_ms)

    for now_ms in (elected_ms, max(elected_ms, elected_ms + grace_ms - 1), down_ms - 1):
        assert leader.due(now_ms) == [], now_ms
    assert leader.apply_due(down_ms) == [MarkAgentDown(down_ms, "a1")]
    # Down now: not declared again.
    assert leader.due(down_ms + timeout_ms) == []


def test_agent_is_down_once_its_timeout_passed_after_its_last_heartbeat() -> None:
    leader = Leader()
    leader.register("a1")
    leader.register("a2")
    leader.duties.became_leader(0)
    leader.duties.heartbeat("a1", CAPACITY, (), 4_000)
    leader.duties.heartbeat("a2", CAPACITY, (), 6_000)

    assert leader.due(8_999) == []
    assert leader.apply_due(9_000) == [MarkAgentDown(9_000, "a1")]
    assert leader.due(10_999) == []
    assert leader.apply_due(11_000) == [MarkAgentDown(11_000, "a2")]


def test_a_lease_poll_counts_as_a_heartbeat_and_keeps_the_listed_tasks() -> None:
    leader = Leader()
    leader.register("a1")
    (task_id,) = leader.submit(1)
    leader.lease("a1", 0, 1, CONFIG.lease_ms)  # deadline 15 000
    leader.start("a1", task_id, 0)
    leader.duties.became_leader(0)
    leader.duties.heartbeat("a1", CAPACITY, (task_id,), 1_000)
    # A poll that went on being held: alive past the timeout after the last heartbeat.
    leader.duties.polled("a1", CAPACITY, 4_000)
    leader.duties.polled("a1", CAPACITY, 7_000)
    assert leader.duties.last_seen_ms("a1") == 7_000
    assert leader.due(7_499) == []  # 6.5 s after the heartbeat, and not down
    # A poll lists no tasks: the task the heartbeat listed is still renewed.
    renew_ms = 15_000 - CONFIG.renew_before_ms
    leader.duties.polled("a1", CAPACITY, renew_ms)
    expected = RenewLeases(renew_ms, "a1", (task_id,), renew_ms + CONFIG.lease_ms)
    assert leader.apply_due(renew_ms) == [expected]
    # Nothing more from it: down once the timeout passed after the last poll.
    assert leader.apply_due(renew_ms + CONFIG.agent_timeout_ms) == [
        MarkAgentDown(renew_ms + CONFIG.agent_timeout_ms, "a1")
    ]


# ------------------------------------------------------------------- task leases


def test_heartbeat_listing_a_leased_task_starts_it_with_its_epoch() -> None:
    leader = Leader()
    leader.register("a1")
    (task_id,) = leader.submit(1)
    # Leased, expired, leased again: epoch 3, so a StartTask of the first lease would
    # be stale.
    leader.lease("a1", 0, 1, lease_ms=1_000)
    leader.apply(ExpireLeases(1_000))
    leader.lease("a1", 1_000, 1, lease_ms=CONFIG.lease_ms)
    assert leader.task(task_id).epoch == 3
    leader.duties.became_leader(1_000)

    leader.duties.heartbeat("a1", CAPACITY, (task_id,), 2_000)
    assert leader.apply_due(2_000) == [StartTasks(2_000, "a1", ((task_id, 3),))]
    assert leader.task(task_id).state is TaskState.RUNNING
    # Running now: the same heartbeat starts nothing more.
    assert leader.due(2_000) == []


def test_running_task_near_its_deadline_is_renewed_and_a_far_one_is_not() -> None:
    leader = Leader()
    leader.register("a1")
    near, far = leader.submit(2)
    leader.lease("a1", 0, 1, CONFIG.lease_ms)  # deadline 15 000
    leader.lease("a1", 5_000, 1, CONFIG.lease_ms)  # deadline 20 000
    leader.start("a1", near, 0)
    leader.start("a1", far, 5_000)
    leader.duties.became_leader(0)

    renew_ms = 15_000 - CONFIG.renew_before_ms
    leader.duties.heartbeat("a1", CAPACITY, (near, far), renew_ms - 1)
    assert leader.due(renew_ms - 1) == []
    leader.duties.heartbeat("a1", CAPACITY, (near, far), renew_ms)
    expected = RenewLeases(renew_ms, "a1", (near,), renew_ms + CONFIG.lease_ms)
    assert leader.apply_due(renew_ms) == [expected]

    near_lease, far_lease = leader.task(near).lease, leader.task(far).lease
    assert near_lease is not None and near_lease.deadline_ms == renew_ms + CONFIG.lease_ms
    assert far_lease is not None and far_lease.deadline_ms == 20_000
    assert leader.task(near).state is TaskState.RUNNING


def test_expired_lease_yields_expire_leases() -> None:
    leader = Leader()
    leader.register("a1")
    (task_id,) = leader.submit(1)
    leader.lease("a1", 0, 1, CONFIG.lease_ms)
    leader.duties.became_leader(0)

    # The agent lost the task (it no longer lists it): nothing renews the lease.
    leader.duties.heartbeat("a1", CAPACITY, (), 14_999)
    assert leader.due(14_999) == []
    leader.duties.heartbeat("a1", CAPACITY, (), 15_000)
    assert leader.apply_due(15_000) == [ExpireLeases(15_000)]

    task = leader.task(task_id)
    assert task.state is TaskState.PENDING and task.lease is None and task.epoch == 2
    assert leader.due(15_000) == []


def test_tasks_the_agent_does_not_hold_are_ignored() -> None:
    """Listed by a1 but leased to a2, unknown, or finished: nothing for a1."""
    leader = Leader()
    leader.register("a1")
    leader.register("a2")
    others, done = leader.submit(2)
    leader.lease("a2", 0, 1, CONFIG.lease_ms)
    leader.lease("a1", 0, 1, CONFIG.lease_ms)
    leader.start("a1", done, 0)
    leader.apply(ReportResult(1, "a1", done, leader.task(done).epoch, True, "{}", None))
    assert leader.task(done).state is TaskState.SUCCEEDED
    leader.duties.became_leader(0)

    now_ms = 15_000 - CONFIG.renew_before_ms  # close enough to renew a held lease
    leader.duties.heartbeat("a1", CAPACITY, (others, "t-999-0", done), now_ms)
    leader.duties.heartbeat("a2", CAPACITY, (), now_ms)
    assert leader.due(now_ms) == []
    # The holder listing it does get it started and renewed.
    leader.duties.heartbeat("a2", CAPACITY, (others,), now_ms)
    assert leader.due(now_ms) == [
        StartTasks(now_ms, "a2", ((others, 1),)),
        RenewLeases(now_ms, "a2", (others,), now_ms + CONFIG.lease_ms),
    ]


def test_more_near_deadline_tasks_than_one_renew_may_carry_are_all_renewed() -> None:
    leader = Leader()
    leader.register("a1")
    count = DEFAULT_LIMITS.renew_tasks_max + 4
    task_ids = leader.submit(count)
    for start in range(0, count, DEFAULT_LIMITS.lease_tasks_max):
        leader.lease("a1", 0, min(DEFAULT_LIMITS.lease_tasks_max, count - start), CONFIG.lease_ms)
    leader.duties.became_leader(0)

    renew_ms = 15_000 - CONFIG.renew_before_ms
    leader.duties.heartbeat("a1", CAPACITY, tuple(sorted(task_ids)), renew_ms)
    for command in leader.due(renew_ms):
        result = leader.run(command)
        assert result.ok, (type(command).__name__, result.code, result.message)
    for task_id in task_ids:
        lease = leader.task(task_id).lease
        assert lease is not None and lease.deadline_ms == renew_ms + CONFIG.lease_ms, task_id


# ------------------------------------------------------------------- leadership


def test_due_is_empty_when_not_leading() -> None:
    leader = Leader()
    leader.register("a1")
    leader.submit(1)
    leader.lease("a1", 0, 1, lease_ms=1_000)
    late_ms = 100_000  # a1 silent for long, its lease long expired
    assert leader.due(late_ms) == []  # never led

    leader.duties.became_leader(late_ms)
    after_grace_ms = late_ms + CONFIG.agent_timeout_ms
    assert leader.due(after_grace_ms) == [
        MarkAgentDown(after_grace_ms, "a1"),
        ExpireLeases(after_grace_ms),
    ]
    leader.duties.lost_leadership()
    assert leader.duties.leading_since_ms is None
    assert leader.due(after_grace_ms) == []


def test_lost_leadership_forgets_heartbeats() -> None:
    leader = Leader()
    leader.register("a1")
    (task_id,) = leader.submit(1)
    leader.lease("a1", 0, 1, CONFIG.lease_ms)
    leader.duties.became_leader(0)
    free = Resources(cpu=3.0, memory_mb=100, gpu=0)
    leader.duties.heartbeat("a1", free, (task_id,), 1_000)
    assert leader.duties.free("a1") == free
    assert leader.duties.last_seen_ms("a1") == 1_000

    leader.duties.lost_leadership()
    assert leader.duties.free("a1") is None
    assert leader.duties.last_seen_ms("a1") is None
    # Leading again: the old heartbeat starts nothing; a1 must be heard again.
    leader.duties.became_leader(2_000)
    assert leader.due(2_000) == []
    assert leader.due(2_000 + CONFIG.agent_timeout_ms) == [
        MarkAgentDown(2_000 + CONFIG.agent_timeout_ms, "a1")
    ]


def test_order_of_commands_is_deterministic() -> None:
    """Agents in id order (each: down, or its starts then its renewal), then the expiry;
    the same whatever order agents registered and heartbeats arrived in."""
    now_ms = 8_000  # after the grace; 7 000 ms before the 15 000 ms deadlines

    def run(heartbeat_order: tuple[str, ...]) -> tuple[list[Command], dict[str, list[str]]]:
        leader = Leader()
        for agent_id in ("a3", "a1", "a2"):
            leader.register(agent_id)
        held = {agent_id: leader.submit(2) for agent_id in ("a1", "a2", "a3")}
        leader.lease("a1", 0, 2, CONFIG.lease_ms)  # a1: two LEASED tasks
        leader.lease("a2", 0, 2, lease_ms=1_000)  # a2: silent, its leases expired
        leader.lease("a3", 0, 2, CONFIG.lease_ms)  # a3: two RUNNING tasks
        for task_id in held["a3"]:
            leader.start("a3", task_id, 0)
        leader.duties.became_leader(0)
        running = {"a1": tuple(held["a1"]), "a3": tuple(reversed(held["a3"]))}
        for agent_id in heartbeat_order:
            leader.duties.heartbeat(agent_id, CAPACITY, running[agent_id], now_ms)
        first = leader.due(now_ms)
        assert leader.due(now_ms) == first  # asking twice changes nothing
        return first, held

    commands, held = run(("a1", "a3"))
    a1, a3 = held["a1"], held["a3"]
    deadline_ms = now_ms + CONFIG.lease_ms
    assert commands == [
        StartTasks(now_ms, "a1", tuple(sorted((t, 1) for t in a1))),  # one per agent
        RenewLeases(now_ms, "a1", tuple(sorted(a1)), deadline_ms),
        MarkAgentDown(now_ms, "a2"),
        RenewLeases(now_ms, "a3", tuple(sorted(a3)), deadline_ms),  # sorted, as listed or not
        ExpireLeases(now_ms),
    ]
    assert run(("a3", "a1"))[0] == commands
