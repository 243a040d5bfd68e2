"""What only the leader does, sans-IO: agent heartbeats kept in memory (never logged),
a grace period after each election, and the commands that time makes necessary.

The real node and the simulator both feed it heartbeats and `now_ms` and propose the
commands `due()` returns. Only state *changes* reach the log (as Nomad does): an agent
going down, leases expiring, leased tasks seen running, leases renewed, finished tasks
pruned (retention), the configured limits made the manifest's.

Retention (`RetentionConfig`): finished tasks (SUCCEEDED, DEAD, CANCELLED) leave the
manifest oldest-finished first, once one of these holds for the oldest one kept:
  - it finished `retention_ms` ago or more;
  - more than `finished_tasks_max` finished tasks are kept (and never more than half of
    `tasks_max`, so open work always has room);
  - the finished tasks kept hold more than `finished_bytes_max` of args, results and errors.
With `require_export`, only tasks at or below the export watermark go (`goml task export
--ack` moves it): every task submitted is then in the manifest or in an archive, and a
cluster nobody exports fills up and refuses submits, saying so. Each pruned task leaves a
tombstone of its idempotency key for `tombstone_ms` (at most `tombstones_max` of them): a
retry of its submit within that window gets the same task id back and does not run it
again; after that the key is free, and a resubmit is a new task.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from goml.cluster.commands import (
    Command,
    ExpireLeases,
    ManifestLimits,
    MarkAgentDown,
    PruneTasks,
    RenewLeases,
    Resources,
    SetLimits,
    StartTasks,
)
from goml.cluster.manifest import AgentState, Manifest, TaskState, retained_bytes

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class RetentionConfig:
    """When finished tasks leave the manifest (see the module docstring)."""

    retention_ms: int  # a finished task goes this long after it finished
    finished_tasks_max: int  # finished tasks kept at most (and half of tasks_max at most)
    finished_bytes_max: int  # args + results + errors of the finished tasks kept, at most
    prune_tasks_max: int  # tasks (and tombstones) per PruneTasks
    tombstone_ms: int  # a pruned task's idempotency key is remembered this long
    tombstones_max: int  # and at most this many keys
    require_export: bool  # prune only what `goml task export --ack` archived

    def __post_init__(self) -> None:
        for name in (
            "retention_ms",
            "finished_tasks_max",
            "finished_bytes_max",
            "prune_tasks_max",
            "tombstones_max",
        ):
            assert getattr(self, name) >= 1, name
        assert self.tombstone_ms >= 0


# Months of service whatever the load: the manifest stays bounded by count and bytes, not
# only by age. 7 days is a week to look at (or export) what ran; 50,000 finished tasks
# leave 150,000 of tasks_max (200,000) to open work; 128 MiB of args, results and errors
# keep a snapshot (written every 10,000 entries, sent whole to a follower that fell
# behind) in the low hundreds of MB even when every result is near its 256 KiB limit.
# A day of tombstones covers any client retry (the client gives up after seconds).
DEFAULT_RETENTION = RetentionConfig(
    retention_ms=7 * DAY_MS,
    finished_tasks_max=50_000,
    finished_bytes_max=128 * 1024 * 1024,
    prune_tasks_max=1000,
    tombstone_ms=DAY_MS,
    tombstones_max=100_000,
    require_export=False,
)


@dataclass(frozen=True)
class DutiesConfig:
    agent_timeout_ms: int  # no heartbeat for this long: the agent is declared down
    election_grace_ms: int  # a new leader waits this long before declaring anyone down
    lease_ms: int  # lease length granted at lease time and at each renewal
    renew_before_ms: int  # renew a running task's lease when this close to its deadline
    # A default, unlike the rest: configs built before retention existed keep working.
    retention: RetentionConfig = DEFAULT_RETENTION

    def __post_init__(self) -> None:
        assert self.agent_timeout_ms > 0
        assert self.election_grace_ms >= 0
        assert 0 < self.renew_before_ms < self.lease_ms


# The defaults of a node's `duties:` config section (goml.cluster.config.Duties).
DEFAULT_DUTIES = DutiesConfig(
    agent_timeout_ms=5000, election_grace_ms=5000, lease_ms=15000, renew_before_ms=7500
)


@dataclass
class _Seen:
    at_ms: int
    free: Resources | None
    running: tuple[str, ...]
    queued: tuple[str, ...] = ()  # leased, waiting in the agent's queue: renewed only


class LeaderDuties:
    def __init__(self, config: DutiesConfig) -> None:
        self.config = config
        self.leading_since_ms: int | None = None
        self._seen: dict[str, _Seen] = {}

    def became_leader(self, now_ms: int) -> None:
        # Heartbeats went to the old leader: nobody is declared down before every agent
        # had the time to find us and send one.
        self.leading_since_ms = now_ms
        self._seen = {}

    def lost_leadership(self) -> None:
        self.leading_since_ms = None
        self._seen = {}

    def heartbeat(
        self,
        agent_id: str,
        free: Resources | None,
        running: tuple[str, ...],
        now_ms: int,
        queued: tuple[str, ...] = (),
    ) -> None:
        assert self.leading_since_ms is not None, "heartbeats are handled by the leader only"
        self._seen[agent_id] = _Seen(now_ms, free, running, queued)

    def polled(self, agent_id: str, free: Resources, now_ms: int) -> None:
        """A lease poll from the agent reached this leader, or is still held here: the
        agent is alive now (a poll whose caller went away is forgotten, so it stops
        counting). An idle agent sends no separate heartbeat while its poll is held
        (goml.agent.core). The running tasks stay as the last heartbeat listed them: a
        poll does not list them, and an agent holding any heartbeats as before."""
        assert self.leading_since_ms is not None, "lease polls are handled by the leader only"
        seen = self._seen.get(agent_id)
        self._seen[agent_id] = _Seen(
            now_ms, free, seen.running if seen else (), seen.queued if seen else ()
        )

    def free(self, agent_id: str) -> Resources | None:
        seen = self._seen.get(agent_id)
        return seen.free if seen else None

    def last_seen_ms(self, agent_id: str) -> int | None:
        seen = self._seen.get(agent_id)
        return seen.at_ms if seen else None

    def due(self, manifest: Manifest, now_ms: int) -> list[Command]:
        """The commands to propose now, in a deterministic order."""
        if self.leading_since_ms is None:
            return []
        commands: list[Command] = []
        in_grace = now_ms - self.leading_since_ms < self.config.election_grace_ms
        for agent in manifest.list_agents():
            if agent.state is not AgentState.ALIVE:
                continue
            seen = self._seen.get(agent.id)
            last_ms = seen.at_ms if seen else self.leading_since_ms
            if not in_grace and now_ms - last_ms >= self.config.agent_timeout_ms:
                commands.append(MarkAgentDown(now_ms, agent.id))
                continue
            if seen is None:
                continue
            started: list[tuple[str, int]] = []
            renew: list[str] = []
            queued = frozenset(seen.queued)
            for task_id in (*seen.running, *seen.queued):
                task = manifest.get_task(task_id)
                if task is None or task.lease is None or task.lease.agent_id != agent.id:
                    continue
                if task.state is TaskState.LEASED and task_id not in queued:
                    started.append((task_id, task.epoch))
                if task.lease.deadline_ms - now_ms <= self.config.renew_before_ms:
                    renew.append(task_id)
            # One command per agent, not per task; each carries at most renew_tasks_max
            # ids (the manifest refuses a larger one whole, which would let every one of
            # those leases expire).
            chunk = manifest.limits.renew_tasks_max
            started.sort()
            for start in range(0, len(started), chunk):
                commands.append(StartTasks(now_ms, agent.id, tuple(started[start : start + chunk])))
            renew.sort()
            for start in range(0, len(renew), chunk):
                commands.append(
                    RenewLeases(
                        now_ms,
                        agent.id,
                        tuple(renew[start : start + chunk]),
                        now_ms + self.config.lease_ms,
                    )
                )
        if self._any_lease_expired(manifest, now_ms):
            commands.append(ExpireLeases(now_ms))
        prune = prune_due(manifest, self.config.retention, now_ms)
        if prune is not None:
            commands.append(prune)
        return commands

    def limits_due(self, manifest: Manifest, wanted: ManifestLimits, now_ms: int) -> list[Command]:
        """A SetLimits when the manifest's limits are not the ones this leader was
        configured with, and the manifest would take them (a lower tasks_max waits for
        retention to make room)."""
        if self.leading_since_ms is None or manifest.limits == wanted:
            return []
        if manifest.task_count > wanted.tasks_max:
            return []
        if len(manifest.list_agents()) > wanted.agents_max:
            return []
        return [SetLimits(now_ms, wanted)]

    @staticmethod
    def _any_lease_expired(manifest: Manifest, now_ms: int) -> bool:
        return any(
            task.lease is not None and task.lease.deadline_ms <= now_ms
            for task in manifest.leased_tasks()
        )


def prune_due(manifest: Manifest, retention: RetentionConfig, now_ms: int) -> PruneTasks | None:
    """The PruneTasks retention asks for now (None: nothing to prune). The oldest finished
    tasks go while one of the rules holds; at most `prune_tasks_max` per command."""
    batch_max = min(retention.prune_tasks_max, manifest.limits.batch_tasks_max)
    count_max = min(retention.finished_tasks_max, manifest.limits.tasks_max // 2)
    count, size = manifest.finished_count, manifest.finished_bytes
    tasks_through = 0
    for task in itertools.islice(manifest.finished_tasks(), batch_max):
        assert task.finished_seq is not None and task.finished_ms is not None, task
        if retention.require_export and task.finished_seq > manifest.export_watermark_seq:
            break
        if not (
            count > count_max
            or size > retention.finished_bytes_max
            or now_ms - task.finished_ms >= retention.retention_ms
        ):
            break
        tasks_through = task.finished_seq
        count -= 1
        size -= retained_bytes(task)
    assert count >= 0 and size >= 0
    tombstones_through = 0
    kept = manifest.tombstone_count
    for tombstone in itertools.islice(manifest.tombstones(), batch_max):
        expired = now_ms - tombstone.pruned_ms >= retention.tombstone_ms
        if not (kept > retention.tombstones_max or expired):
            break
        tombstones_through = tombstone.finished_seq
        kept -= 1
    if not tasks_through and not tombstones_through:
        return None
    return PruneTasks(now_ms, tasks_through, tombstones_through)
