"""What only the leader does, sans-IO: agent heartbeats kept in memory (never logged),
a grace period after each election, and the commands that time makes necessary.

The real node and the simulator both feed it heartbeats and `now_ms` and propose the
commands `due()` returns. Only state *changes* reach the log (as Nomad does): an agent
going down, leases expiring, leased tasks seen running, leases renewed.
"""

from __future__ import annotations

from dataclasses import dataclass

from goml.cluster.commands import (
    Command,
    ExpireLeases,
    MarkAgentDown,
    RenewLeases,
    Resources,
    StartTasks,
)
from goml.cluster.manifest import AgentState, Manifest, TaskState


@dataclass(frozen=True)
class DutiesConfig:
    agent_timeout_ms: int  # no heartbeat for this long: the agent is declared down
    election_grace_ms: int  # a new leader waits this long before declaring anyone down
    lease_ms: int  # lease length granted at lease time and at each renewal
    renew_before_ms: int  # renew a running task's lease when this close to its deadline

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
        self, agent_id: str, free: Resources | None, running: tuple[str, ...], now_ms: int
    ) -> None:
        assert self.leading_since_ms is not None, "heartbeats are handled by the leader only"
        self._seen[agent_id] = _Seen(now_ms, free, running)

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
            for task_id in seen.running:
                task = manifest.get_task(task_id)
                if task is None or task.lease is None or task.lease.agent_id != agent.id:
                    continue
                if task.state is TaskState.LEASED:
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
        return commands

    @staticmethod
    def _any_lease_expired(manifest: Manifest, now_ms: int) -> bool:
        return any(
            task.lease is not None and task.lease.deadline_ms <= now_ms
            for task in manifest.open_tasks()
        )
