"""The scenario player: one reading of a scenario's timeline and workload, and one set of
measurements, for both worlds. The simulator (`goml.sim.simulation`) and the chaos runner
on real processes (`goml.chaos.runner`) are its two backends; what differs between them
is only what `Backend` says, so a figure means the same thing in both reports.

The player owns what decides or measures:
- when each fault of `scenario.timeline()` fires and what it does: targets resolved with
  `goml.scenario.faults` (the leader looked up once per fault), the links cut, clogged and
  slowed, and the restarts, resumes, heals and restores it schedules;
- the workload: Poisson arrivals at `rate_per_s` in [start_s, stop_s), the `schedule`
  items, the task mix drawn by weight, one idempotency key per submit;
- the observations and the common part of the run summary (`summary`).

Disk and clock faults (`kind: disk`, `kind: clock`) are decided here too: which node, how
long a stall or a full disk lasts (the strongest stall in force wins), that a node whose
disk was full is restarted once the space is freed (the node stops serving at its first
failed write; an operator frees space and restarts it), that a wiped node is stopped,
emptied and started `down_s` later, and each node's wall-clock offset (`skew_ms` sets it,
`jump_ms` adds to it). The backends only carry them out.

Definitions:
- failover: a fault that hits the leader (a crash, pause or restart of the leader; a
  partition or clog that cuts the leader off from a majority) opens a failover window;
  the first acknowledgement of a submit STARTED at or after that moment closes it, and
  its length is one `failover_s` value. A fault while a window is open keeps it open.
- submit_ms: from the start of the client call to its acknowledgement (retries across a
  failover included). submit_ms_steady: only the submits that started once a first leader
  was seen, with no failover window open, and with their client's location reaching a quorum of control nodes (no
  cut or clogged link either way to more than half of them): the submit promise is
  judged on those; the others wait for a failover (judged by its own promise) or for a
  partition to heal.
- leader_changes: distinct (leader, term) seen, minus 1.
- tasks_retried: acknowledged tasks the final manifest shows leased more than once (an
  agent lost, a failed attempt, or a lease that expired early, e.g. under a clock fault).

Membership faults (`add_node`, `remove_node`, `replace_node`) are decided here too: the
target (`leader` looked up when the fault fires), the plan (goml.cluster.membership_plan:
a replace adds the new node before it removes the old), one change at a time in firing
order (a change fired while another is under way waits for it; changes fired before the
end of the scenario are carried out while the backend settles), that a spare is started
before it is added (joining, the current members as its peers), that a removed node is
stopped once its removal committed, and that the removal of the leader opens a failover
window (it steps down once the removal commits). The backend drives the plan's steps
with the plan's own driver (`ChangeDriver`), so the steps are the same in both worlds
and in `goml node replace`. Quorums (steadiness, `random` targets) count the members
of the configuration the changes have left.

Randomness: only `random.Random(f"{seed}:faults")` (targets named `random`) and
`random.Random(f"{seed}:workload")` (arrivals, clients, the mix), so a simulator run stays
deterministic by seed.

Threading and time: the player is single-threaded and does no I/O. Everything that calls
it (`start`, `fire`, the actions it schedules, the `done` of a submit, `leader_seen`) must
do so on the one thread that drives it. Time is the backend's clock, in seconds.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from goml.api.retry import UNREACHABLE_MS, RetryConfig
from goml.api.types import Resources, TaskRequest, TaskState
from goml.cluster.commands import COMMAND_TYPE_NAMES, command_type, dumps
from goml.cluster.manifest import Manifest
from goml.cluster.membership_plan import (
    REMOVE,
    Failed,
    Finished,
    Step,
    plan_add,
    plan_remove,
    plan_replace,
)
from goml.report.summary import distribution
from goml.scenario.faults import (
    Pair,
    describe_fault,
    pairs_between,
    partition_pairs,
    resolve_members,
    resolve_target,
)
from goml.scenario.schema import (
    CLOCK_OFFSET_MS_MAX,
    LEADER,
    AddNodeFault,
    AgentCrashFault,
    AnyFault,
    AnyLink,
    ClockFault,
    ClogFault,
    CrashFault,
    DiskFault,
    HealFault,
    LinkLatencyFault,
    Members,
    PartitionFault,
    PauseFault,
    RemoveNodeFault,
    ReplaceNodeFault,
    RestartFault,
    Scenario,
    ScheduledSubmit,
    UnclogFault,
)

# The scenario clients' retry policy, in both worlds: the simulator's client runs
# `client_retry_config` through goml.api.retry; the chaos runner's goml.client.Client
# takes the call timeout and the give-up budget.
CLIENT_CALL_TIMEOUT_MS = 1000
CLIENT_GIVE_UP_MS = 30_000
CLIENT_BACKOFF_MS_MIN = 20
CLIENT_BACKOFF_MS_MAX = 500
# A submit with no answer after this long is sent to a second node too (idempotent):
# above the slowest steady cross-cloud submit, below the submit promise.
CLIENT_HEDGE_AFTER_MS = 300

SAMPLE_EVERY_S = 1.0
SUBMIT_ERRORS_KEPT_MAX = 20  # the first ones say why; the count says how many
# The slowest steady submits, with when they started and whose they were: a p99 over a
# few hundred submits is the fourth or fifth slowest, and whether those came together
# (one stall, a fault's moment) or apart (load) says where to look.
SLOWEST_KEPT = 8
COMMAND_TYPES = COMMAND_TYPE_NAMES  # every command type of goml.cluster.commands


def client_retry_config(
    control_nodes: tuple[str, ...], domains: Mapping[str, str], home_domain: str
) -> RetryConfig:
    """The retry policy of a scenario's client: the control nodes in name order, as
    goml.client.Client orders a profile's (so both worlds start at, rotate and hedge to
    the same nodes), each with its failure domain (`client_domains`)."""
    nodes = tuple(sorted(control_nodes))
    return RetryConfig(
        nodes=nodes,
        call_timeout_ms=CLIENT_CALL_TIMEOUT_MS,
        redirects_max=len(control_nodes),
        backoff_ms_min=CLIENT_BACKOFF_MS_MIN,
        backoff_ms_max=CLIENT_BACKOFF_MS_MAX,
        give_up_after_ms=CLIENT_GIVE_UP_MS,
        retry_unauthenticated=False,  # a scenario's token never changes: a refusal is a bug
        unreachable_ms=UNREACHABLE_MS,
        hedge_after_ms=CLIENT_HEDGE_AFTER_MS,
        domains=tuple(domains[n] for n in nodes),
        home_domain=home_domain,
    )


def client_domains(scenario: Scenario, client_node: str) -> tuple[dict[str, str], str]:
    """Every node's failure domain (its cloud) and that of a client beside
    `client_node`: what a scenario's client hedges by, in both worlds."""
    topology = scenario.topology
    return {n.name: n.cloud for n in topology.nodes}, topology.node(client_node).cloud


@dataclass(frozen=True, slots=True)
class SubmitOutcome:
    """How one submit ended, with the times the backend's client measured."""

    started_s: float  # the client call began (the first attempt)
    finished_s: float  # acknowledged, or given up
    task_id: str | None  # None: not acknowledged
    detail: str  # why not (empty when acknowledged)

    def __post_init__(self) -> None:
        assert self.finished_s >= self.started_s, self
        assert (self.task_id is None) == bool(self.detail), self


SubmitDone = Callable[[SubmitOutcome], None]
ChangeDone = Callable[[Finished | Failed], None]
StepStarted = Callable[[Step, float], None]  # the step, when it was sent (now_s)


class Backend(Protocol):
    """What differs between the simulator and real processes. Process operations on a
    process that is already in the state asked for do nothing. Every call comes from
    the player's thread; `done` and scheduled actions must be called on it too."""

    def now_s(self) -> float:
        """Seconds since the run started."""
        ...

    def schedule(self, delay_s: float, action: Callable[[], None]) -> None:
        """Call `action` once, `delay_s` from now (0: after what is due now)."""
        ...

    def crash_node(self, name: str) -> None:
        """Kill control node `name` (SIGKILL): it keeps only what it persisted."""
        ...

    def start_node(self, name: str) -> None: ...

    def pause_node(self, name: str, duration_s: float) -> None:
        """Freeze control node `name` (SIGSTOP) and thaw it `duration_s` later."""
        ...

    def crash_agent(self, name: str) -> None:
        """Kill the agent process on topology node `name`."""
        ...

    def start_agent(self, name: str) -> None: ...

    def pause_agent(self, name: str, duration_s: float) -> None: ...

    def set_links(
        self,
        blocked: frozenset[Pair],
        clogged: frozenset[Pair],
        latency: Mapping[Pair, AnyLink],
    ) -> None:
        """Make the network look like this: messages (from node, to node) dropped,
        held (clogged) until released, or delayed by another link than the scenario's."""
        ...

    def disk_stall(self, name: str, stall_ms: float | None) -> None:
        """Every write of control node `name`'s store takes `stall_ms` longer before it
        is durable; None: as the scenario's disk again."""
        ...

    def disk_full(self, name: str, full: bool) -> None:
        """Control node `name`'s disk has no space left (True), or has it again (False).
        A node whose write fails on a full disk stops serving (it says why) until it is
        restarted; nothing that write carried is acknowledged."""
        ...

    def wipe_node(self, name: str) -> None:
        """Delete control node `name`'s store (the player has stopped the node): it
        starts next with an empty one."""
        ...

    def set_clock(self, name: str, offset_ms: int) -> None:
        """Control node `name`'s wall clock reads true time plus `offset_ms` from now on
        (its monotonic clock is untouched)."""
        ...

    def leader(self) -> tuple[str, int] | None:
        """(node, term) of the running node that leads the highest term, if any."""
        ...

    def join_node(self, name: str, peers: tuple[str, ...]) -> None:
        """Start spare control node `name` as a node that joins (no configuration of its
        own; `peers` the current members), as `goml node add` prepares one."""
        ...

    def member_address(self, name: str) -> str:
        """The address control node `name` is added with (its peers dial it there)."""
        ...

    def change_membership(
        self, steps: tuple[Step, ...], started: StepStarted, done: ChangeDone
    ) -> None:
        """Carry out `steps` against the leader with a `ChangeDriver` (read the
        configuration back, call, pause, as it says); call `started` when a step is
        first sent (with the time it was sent: the call may reach the player later)
        and `done` exactly once with the driver's outcome. One at a time."""
        ...

    def stop_node(self, name: str) -> None:
        """Stop control node `name` for good (it was removed from the configuration)."""
        ...

    def submit(self, client: str, request: TaskRequest, done: SubmitDone) -> None:
        """Have workload client `client` submit `request` with the scenario clients'
        retry policy; call `done` exactly once."""
        ...

    def task_counts(self) -> Mapping[str, int] | None:
        """Tasks by state (TaskState values) as the leader sees them; None if unknown."""
        ...

    def note(self, kind: str, subject: str, detail: str) -> None:
        """A decision of the player, for the backend's trace (the simulator digests it)."""
        ...


@dataclass
class Observations:
    submit_ms: list[float] = field(default_factory=list)
    submit_ms_steady: list[float] = field(default_factory=list)
    # The same per client: one client cut off can hide in the others' p99.
    submit_ms_steady_by_client: dict[str, list[float]] = field(default_factory=dict)
    # (latency ms, started s, client) of the SLOWEST_KEPT slowest steady submits: a heap
    submit_steady_slowest: list[tuple[float, float, str]] = field(default_factory=list)
    failovers_s: list[float] = field(default_factory=list)
    leaders: list[tuple[float, str, int]] = field(default_factory=list)  # (t_s, node, term)
    faults: list[tuple[float, str]] = field(default_factory=list)  # (t_s, description)
    tasks_by_state: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    acknowledged: dict[str, str] = field(default_factory=dict)  # idempotency key -> task id
    submitted: int = 0
    gave_up: int = 0
    errors: list[str] = field(default_factory=list)  # the first SUBMIT_ERRORS_KEPT_MAX
    # (fired at s, ended at s, fault, outcome, voters after it)
    membership: list[tuple[float, float, str, str, tuple[str, ...]]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class FinalState:
    """What a backend found once the run settled and its checks ran."""

    settled: bool
    tasks_by_state: Mapping[str, int]  # TaskState value -> count
    tasks_lost: int  # acknowledged tasks missing (or with another id) on some replica
    duplicate_results: int  # extra results of tasks recorded more than once
    commands: Mapping[str, int]  # committed Raft commands by type (COMMAND_TYPES)
    # Tasks leased more than once (attempts > 1) in the same replica as tasks_by_state:
    # a lease that expired early, an agent lost or a failed attempt each cost a retry.
    tasks_retried: int


class _Steadiness(NamedTuple):
    """What decides whether a submit starting from `at_s` on is steady."""

    at_s: float
    failing_over: bool
    cut: frozenset[Pair]  # blocked or clogged


@dataclass(frozen=True, slots=True)
class _Change:
    fired_s: float
    description: str
    steps: tuple[Step, ...]
    joins: str  # the spare started before the plan ("" if none)


@dataclass(frozen=True, slots=True)
class _Pending:
    client: str
    location: str
    steadiness_index: int  # the entry of `_steadiness` in force when it was issued


class ScenarioPlayer:
    """Plays one scenario through a backend: `start` at the beginning, `end_faults`
    when the scenario's time is up, `summary` once the backend has settled and checked.
    The backend reports leaders it sees with `leader_seen`."""

    def __init__(self, scenario: Scenario, seed: int, backend: Backend) -> None:
        self.scenario = scenario
        self.seed = seed
        self.backend = backend
        topology = scenario.topology
        self.control_names = tuple(n.name for n in topology.control_nodes)
        # The configuration's members as the membership faults leave it, in topology
        # order (without such faults: the control nodes, as ever).
        self.members = tuple(n.name for n in topology.voter_nodes)
        self._changes: list[_Change] = []  # waiting, in firing order
        self._changing: _Change | None = None
        self.agent_names = sorted(n.name for n in topology.agent_nodes)
        self.obs = Observations()
        self.failover_started_s: float | None = None
        self._fault_rng = random.Random(f"{seed}:faults")
        self._workload_rng = random.Random(f"{seed}:workload")
        self._fault_ids = itertools.count(1)
        # Per fault, so that one fault's heal or restore undoes only what it did.
        self._partitions: dict[int, frozenset[Pair]] = {}
        self._clogs: dict[int, frozenset[Pair]] = {}
        self._latency: dict[Pair, tuple[int, AnyLink]] = {}  # pair -> (fault id, link)
        self._stalls: dict[str, dict[int, float]] = {}  # node -> fault id -> stall ms
        self._full: dict[str, set[int]] = {}  # node -> ids of the disk-full faults under way
        self._clock_ms: dict[str, int] = {}  # node -> wall-clock offset set so far
        # Until a first leader is seen, nothing is steady: submits wait for an election.
        self._leader_ever_seen = False
        self._steadiness = [_Steadiness(float("-inf"), True, frozenset())]
        self._pending: dict[str, _Pending] = {}  # idempotency key -> submit in flight
        self._submit_count = 0
        self._arrival_s = 0.0  # when the next Poisson arrival is due
        self._started = False
        self._faults_ended = False
        workload = scenario.workload
        self._locations = {c.name: c.node for c in workload.clients} if workload else {}
        self._client_names = [c.name for c in workload.clients] if workload else []
        self._mix_names = sorted(workload.mix) if workload else []
        self._mix_weights = [workload.mix[n].weight for n in self._mix_names] if workload else []

    # ------------------------------------------------------------------ driving

    def start(self) -> None:
        """Schedule the timeline, the workload and the samples (once, at the start)."""
        assert not self._started
        self._started = True
        now_s = self.backend.now_s()
        for fault in self.scenario.timeline():
            self.backend.schedule(
                max(0.0, fault.at_s - now_s), functools.partial(self._fire_on_time, fault)
            )
        workload = self.scenario.workload
        if workload is not None:
            if workload.rate_per_s is not None:
                self._arrival_s = workload.start_s + self._workload_rng.expovariate(
                    workload.rate_per_s
                )
                self.backend.schedule(max(0.0, self._arrival_s - now_s), self._arrival)
            for item in workload.schedule or []:
                self.backend.schedule(
                    max(0.0, item.at_s - now_s), functools.partial(self._scheduled, item)
                )
        self._sample()

    def end_faults(self) -> None:
        """The scenario is over: nothing the timeline or the workload scheduled runs any
        more (faults, restarts, heals, submits) and every link is restored. Samples go on
        while the backend settles; submits in flight end as they end."""
        self._faults_ended = True
        self._partitions.clear()
        self._clogs.clear()
        self._latency.clear()
        self._links_changed()
        # Disks as the scenario's again; a node whose disk was full is restarted (the
        # backend starts it as it settles). Clocks stay as the faults left them.
        for name in sorted(self._stalls):
            self.backend.disk_stall(name, None)
        self._stalls.clear()
        for name in sorted(self._full):
            self.backend.disk_full(name, False)
            self.backend.crash_node(name)
            self.backend.note("disk-freed", name, "end")
        self._full.clear()

    @property
    def in_flight(self) -> int:
        """Submits issued and not ended yet."""
        return len(self._pending)

    @property
    def changes_in_flight(self) -> int:
        """Membership changes fired and not ended yet."""
        return len(self._changes) + (self._changing is not None)

    def leader_seen(self, name: str, term: int) -> None:
        """A backend saw `name` lead `term` (the simulator when a core becomes leader,
        the chaos runner when its poll finds a new one)."""
        assert name in self.control_names, name
        if not self._leader_ever_seen:
            self._leader_ever_seen = True
            self._steadiness_changed(self.backend.now_s())
        if self.obs.leaders and self.obs.leaders[-1][1:] == (name, term):
            return
        self.obs.leaders.append((self._now_rounded_s(), name, term))

    # ------------------------------------------------------------------- faults

    def fire(self, fault: AnyFault) -> None:
        """Carry out one fault now (the timeline calls this at its `at_s`)."""
        description = describe_fault(fault)
        self.obs.faults.append((self._now_rounded_s(), description))
        self.backend.note("fault", "", description)
        # One look-up per fault: every `leader` in it means the same node.
        seen = self.backend.leader()
        leader = seen[0] if seen is not None else None
        if isinstance(fault, CrashFault | RestartFault | PauseFault):
            self._process_fault(fault, leader)
        elif isinstance(fault, PartitionFault):
            fault_id = next(self._fault_ids)
            pairs = partition_pairs(self.scenario.topology, fault, lambda: leader)
            self._partitions[fault_id] = frozenset(pairs)
            self._links_changed()
            self._failover_if_cut_off(leader, "partition")
            if fault.heal_after_s is not None:
                self._later(fault.heal_after_s, functools.partial(self._heal_one, fault_id))
        elif isinstance(fault, HealFault):
            self.heal()
        elif isinstance(fault, DiskFault):
            self._disk_fault(fault, leader)
        elif isinstance(fault, ClockFault):
            self._clock_fault(fault, leader)
        elif isinstance(fault, AddNodeFault | RemoveNodeFault | ReplaceNodeFault):
            self._membership_fault(fault, description, leader)
        elif isinstance(fault, LinkLatencyFault):
            fault_id = next(self._fault_ids)
            for pair in sorted(self._pairs(fault.between, leader)):
                self._latency[pair] = (fault_id, fault.latency)
            self._links_changed()
            if fault.duration_s is not None:
                self._later(fault.duration_s, functools.partial(self._restore_one, fault_id))
        elif isinstance(fault, ClogFault):
            fault_id = next(self._fault_ids)
            self._clogs[fault_id] = frozenset(self._pairs(fault.between, leader))
            self._links_changed()
            self._failover_if_cut_off(leader, "clog")
            if fault.duration_s is not None:
                self._later(fault.duration_s, functools.partial(self._unclog_one, fault_id))
        elif isinstance(fault, UnclogFault):
            if fault.between is None:
                self._clogs.clear()
            else:
                released = self._pairs(fault.between, leader)
                for fault_id, clogged in list(self._clogs.items()):
                    kept = clogged - released
                    if kept:
                        self._clogs[fault_id] = kept
                    else:
                        del self._clogs[fault_id]
            self._links_changed()
        else:
            assert isinstance(fault, AgentCrashFault), fault
            name = resolve_target(fault.target, lambda: leader, self.agent_names, self._fault_rng)
            if name is None or name not in self.agent_names:
                return
            self.backend.crash_agent(name)
            if fault.restart_after_s is not None:
                self._later(
                    fault.restart_after_s, functools.partial(self.backend.start_agent, name)
                )

    def heal(self) -> None:
        """A `heal` fault (it has no fields): undo every partition under way. Clogs and
        latency faults stay: they have their own ends (`unclog`, `duration_s`)."""
        self._partitions.clear()
        self._links_changed()
        self.backend.note("heal", "", "all")

    def _process_fault(
        self, fault: CrashFault | RestartFault | PauseFault, leader: str | None
    ) -> None:
        name = resolve_target(fault.target, lambda: leader, list(self.members), self._fault_rng)
        if name is None:  # `leader` while there is none: nothing to hit
            return
        if name not in self.control_names:
            self._agent_only_fault(fault, name)
            return
        if name == leader:
            self._failover_starts(f"{fault.kind} of leader {name}")
        start = functools.partial(self.backend.start_node, name)
        if isinstance(fault, PauseFault):
            self.backend.pause_node(name, fault.duration_s)
        elif isinstance(fault, CrashFault):
            self.backend.crash_node(name)
            if fault.restart_after_s is not None:
                self._later(fault.restart_after_s, start)
        else:
            self.backend.crash_node(name)
            self._later(fault.down_s, start)

    def _control_target(self, target: str, leader: str | None) -> str | None:
        name = resolve_target(target, lambda: leader, list(self.members), self._fault_rng)
        assert name is None or name in self.control_names, name  # validated at load
        return name

    # -------------------------------------------------------------- membership

    def _membership_fault(
        self,
        fault: AddNodeFault | RemoveNodeFault | ReplaceNodeFault,
        what: str,
        leader: str | None,
    ) -> None:
        target: str | None = fault.target
        if not isinstance(fault, AddNodeFault) and fault.target == LEADER:
            target = leader
        if target is None:  # `leader` while there is none: nothing to change
            self.backend.note("change-skipped", "", f"{what}: no leader")
            return
        if isinstance(fault, AddNodeFault):
            steps = plan_add(target, self.backend.member_address(target))
            joins = target
        elif isinstance(fault, RemoveNodeFault):
            steps, joins = plan_remove(target), ""
        else:
            steps = plan_replace(target, fault.new, self.backend.member_address(fault.new))
            joins = fault.new
        self._changes.append(_Change(self._now_rounded_s(), what, steps, joins))
        self._next_change()

    def _next_change(self) -> None:
        if self._changing is not None or not self._changes:
            return
        change = self._changing = self._changes.pop(0)
        if change.joins:
            self.backend.join_node(change.joins, self.members)
        self.backend.note("change-start", "", change.description)
        self.backend.change_membership(
            change.steps, self._change_step, functools.partial(self._change_done, change)
        )

    def _change_step(self, step: Step, sent_s: float) -> None:
        self.backend.note("change-step", step.node, step.kind.value)
        # The leader last seen, not a new look-up: a real backend hands the step over a
        # little after it was sent, when the removed leader may have stepped down already.
        if step.kind is REMOVE and self.obs.leaders and self.obs.leaders[-1][1] == step.node:
            # It leads until its removal commits, then hands over and steps down.
            self._failover_starts(f"removal of leader {step.node}", sent_s)

    def _change_done(self, change: _Change, outcome: Finished | Failed) -> None:
        assert self._changing is change, "one change at a time"
        self._changing = None
        if isinstance(outcome, Finished):
            members = set(outcome.view.voters) | set(outcome.view.learners)
            self.members = tuple(n for n in self.control_names if n in members)
            result = "done"
            for step in change.steps:
                if step.kind is REMOVE:
                    self.backend.stop_node(step.node)
        else:
            result = f"failed: {outcome.why}"
        self.obs.membership.append(
            (change.fired_s, self._now_rounded_s(), change.description, result, self.members)
        )
        self.backend.note("change-end", ",".join(self.members), result[:120])
        self._steadiness_changed(self.backend.now_s())
        self._next_change()

    def _disk_fault(self, fault: DiskFault, leader: str | None) -> None:
        name = self._control_target(fault.target, leader)
        if name is None:  # `leader` while there is none: nothing to hit
            return
        fault_id = next(self._fault_ids)
        if fault.action == "wipe":
            if name == leader:
                self._failover_starts(f"wipe of leader {name}")
            self.backend.crash_node(name)
            self.backend.wipe_node(name)
            self._later(fault.down_s or 0.0, functools.partial(self.backend.start_node, name))
            return
        assert fault.duration_s is not None, "validated: a stall or a full disk ends"
        if fault.action == "stall":
            assert fault.fsync_stall_ms is not None
            self._stalls.setdefault(name, {})[fault_id] = fault.fsync_stall_ms
            self.backend.disk_stall(name, max(self._stalls[name].values()))
            self._later(fault.duration_s, functools.partial(self._stall_ends, name, fault_id))
            return
        if name == leader:
            # Its next write fails and it stops leading: a failover, as a crash is.
            self._failover_starts(f"disk of leader {name} full")
        if not self._full.get(name):
            self.backend.disk_full(name, True)
        self._full.setdefault(name, set()).add(fault_id)
        self._later(fault.duration_s, functools.partial(self._space_freed, name, fault_id))

    def _stall_ends(self, name: str, fault_id: int) -> None:
        stalls = self._stalls.get(name, {})
        if stalls.pop(fault_id, None) is None:
            return
        if stalls:
            self.backend.disk_stall(name, max(stalls.values()))
        else:
            del self._stalls[name]
            self.backend.disk_stall(name, None)

    def _space_freed(self, name: str, fault_id: int) -> None:
        """The last full-disk fault of `name` ends: space again, and the node restarted
        (it stopped serving at its first failed write and does not recover by itself)."""
        ids = self._full.get(name, set())
        if fault_id not in ids:
            return
        ids.discard(fault_id)
        if ids:
            return
        del self._full[name]
        self.backend.disk_full(name, False)
        seen = self.backend.leader()
        if seen is not None and seen[0] == name:
            self._failover_starts(f"restart of leader {name} after its disk was freed")
        self.backend.crash_node(name)
        self.backend.start_node(name)
        self.backend.note("disk-freed", name, str(fault_id))

    def _clock_fault(self, fault: ClockFault, leader: str | None) -> None:
        name = self._control_target(fault.target, leader)
        if name is None:
            return
        if fault.skew_ms is not None:
            offset_ms = fault.skew_ms
        else:
            assert fault.jump_ms is not None, "validated: skew_ms or jump_ms"
            offset_ms = self._clock_ms.get(name, 0) + fault.jump_ms
        # Several faults may add up past the bound one fault is held to.
        offset_ms = max(-CLOCK_OFFSET_MS_MAX, min(CLOCK_OFFSET_MS_MAX, offset_ms))
        self._clock_ms[name] = offset_ms
        self.backend.set_clock(name, offset_ms)

    def _agent_only_fault(self, fault: CrashFault | RestartFault | PauseFault, name: str) -> None:
        """A node with only the agent role: its process is the agent; the fault means
        for it what it means for a control node's process."""
        assert name in self.agent_names, name
        start = functools.partial(self.backend.start_agent, name)
        if isinstance(fault, PauseFault):
            self.backend.pause_agent(name, fault.duration_s)
        elif isinstance(fault, CrashFault):
            self.backend.crash_agent(name)
            if fault.restart_after_s is not None:
                self._later(fault.restart_after_s, start)
        else:
            self.backend.crash_agent(name)
            self._later(fault.down_s, start)

    def _fire_on_time(self, fault: AnyFault) -> None:
        if not self._faults_ended:
            self.fire(fault)

    def _later(self, delay_s: float, action: Callable[[], None]) -> None:
        """Schedule the end of a fault; once the faults have ended it no longer runs
        (the backend restored everything when it settled)."""

        def run() -> None:
            if not self._faults_ended:
                action()

        self.backend.schedule(delay_s, run)

    def _heal_one(self, fault_id: int) -> None:
        if self._partitions.pop(fault_id, None) is not None:
            self._links_changed()
            self.backend.note("heal", "", str(fault_id))

    def _unclog_one(self, fault_id: int) -> None:
        if self._clogs.pop(fault_id, None) is not None:
            self._links_changed()

    def _restore_one(self, fault_id: int) -> None:
        # A pair a later latency fault took over keeps that one.
        for pair in [p for p, (owner, _) in self._latency.items() if owner == fault_id]:
            del self._latency[pair]
        self._links_changed()

    def _pairs(self, between: tuple[Members, Members], leader: str | None) -> set[Pair]:
        topology = self.scenario.topology
        return pairs_between(
            resolve_members(topology, between[0], lambda: leader),
            resolve_members(topology, between[1], lambda: leader),
        )

    def _cut(self) -> frozenset[Pair]:
        cut: set[Pair] = set()
        for pairs in (*self._partitions.values(), *self._clogs.values()):
            cut |= pairs
        return frozenset(cut)

    def _links_changed(self) -> None:
        blocked: set[Pair] = set()
        for pairs in self._partitions.values():
            blocked |= pairs
        clogged: set[Pair] = set()
        for pairs in self._clogs.values():
            clogged |= pairs
        latency = {pair: link for pair, (_, link) in sorted(self._latency.items())}
        self.backend.set_links(frozenset(blocked), frozenset(clogged), latency)
        self._steadiness_changed(self.backend.now_s())

    def _reaches_quorum(self, location: str, cut: frozenset[Pair]) -> bool:
        reachable = sum(
            1
            for name in self.members
            if name == location or ((location, name) not in cut and (name, location) not in cut)
        )
        return reachable > len(self.members) // 2

    # ----------------------------------------------------------------- failover

    def _failover_if_cut_off(self, leader: str | None, what: str) -> None:
        if leader is not None and not self._reaches_quorum(leader, self._cut()):
            self._failover_starts(f"{what} cuts leader {leader} off")

    def _failover_starts(self, why: str, at_s: float | None = None) -> None:
        if self.failover_started_s is not None:
            return  # one window at a time: it ends with the first submit after its start
        self.failover_started_s = self.backend.now_s() if at_s is None else at_s
        self.backend.note("failover-start", "", why)
        self._steadiness_changed(self.failover_started_s)

    def _steadiness_changed(self, at_s: float) -> None:
        last = self._steadiness[-1]
        failing = self.failover_started_s is not None or not self._leader_ever_seen
        state = _Steadiness(max(at_s, last.at_s), failing, self._cut())
        if state[1:] != last[1:]:
            self._steadiness.append(state)

    def _steady(self, pending: _Pending, started_s: float) -> bool:
        # The entry in force when the call started: the one at issue, or a later one
        # from before the start (a chaos submit may wait for a free thread). Strictly
        # before: in the simulator a submit starts as it is issued, and what happens
        # later at the same instant must not count.
        index = pending.steadiness_index
        while index + 1 < len(self._steadiness) and self._steadiness[index + 1].at_s < started_s:
            index += 1
        state = self._steadiness[index]
        return not state.failing_over and self._reaches_quorum(pending.location, state.cut)

    # ----------------------------------------------------------------- workload

    def _arrival(self) -> None:
        # Decided on the arrival's own time, not on when the backend got round to it: a
        # real run's late timer neither drops the last arrival nor shifts the next ones.
        workload = self.scenario.workload
        assert workload is not None and workload.rate_per_s is not None
        stop_s = workload.stop_s if workload.stop_s is not None else self.scenario.duration_s
        if self._faults_ended or self._arrival_s >= stop_s:
            return
        self._issue(self._workload_rng.choice(self._client_names), None)
        self._arrival_s += self._workload_rng.expovariate(workload.rate_per_s)
        self.backend.schedule(max(0.0, self._arrival_s - self.backend.now_s()), self._arrival)

    def _scheduled(self, item: ScheduledSubmit) -> None:
        if self._faults_ended:
            return
        for _ in range(item.count):
            self._issue(item.client or self._workload_rng.choice(self._client_names), item.function)

    def _issue(self, client: str, function: str | None) -> None:
        workload = self.scenario.workload
        assert workload is not None
        self._submit_count += 1
        key = f"s{self.seed}-{self._submit_count}"
        chosen = function or self._workload_rng.choices(self._mix_names, self._mix_weights)[0]
        mix = workload.mix[chosen]
        request = TaskRequest(
            function=chosen,
            args_json=dumps(mix.args),
            resources=Resources(mix.resources.cpu, mix.resources.memory_mb, mix.resources.gpu),
            priority=0,
            max_attempts=workload.max_attempts,
            timeout_ms=workload.timeout_ms,
            idempotency_key=key,
            cloud="",
            region="",
            isolated=mix.isolated,
        )
        assert key not in self._pending, key
        self._pending[key] = _Pending(client, self._locations[client], len(self._steadiness) - 1)
        self.obs.submitted += 1
        self.backend.submit(client, request, functools.partial(self._submit_done, key))

    def _submit_done(self, key: str, outcome: SubmitOutcome) -> None:
        pending = self._pending.pop(key, None)
        assert pending is not None, f"submit {key} ended twice (or was never issued)"
        if outcome.task_id is None:
            self.obs.gave_up += 1
            if len(self.obs.errors) < SUBMIT_ERRORS_KEPT_MAX:
                self.obs.errors.append(f"{pending.client}: {outcome.detail}")
            self.backend.note("give-up", pending.client, f"{key} {outcome.detail[:80]}")
            return
        latency_ms = (outcome.finished_s - outcome.started_s) * 1000
        self.obs.submit_ms.append(latency_ms)
        if self._steady(pending, outcome.started_s):
            self.obs.submit_ms_steady.append(latency_ms)
            self.obs.submit_ms_steady_by_client.setdefault(pending.client, []).append(latency_ms)
            slowest = self.obs.submit_steady_slowest
            item = (latency_ms, outcome.started_s, pending.client)
            if len(slowest) < SLOWEST_KEPT:
                heapq.heappush(slowest, item)
            elif item > slowest[0]:
                heapq.heapreplace(slowest, item)
        assert key not in self.obs.acknowledged, key
        self.obs.acknowledged[key] = outcome.task_id
        self.backend.note("ack", key, outcome.task_id)
        started = self.failover_started_s
        if started is not None and outcome.started_s >= started:
            self.obs.failovers_s.append(outcome.finished_s - started)
            self.failover_started_s = None
            self._steadiness_changed(outcome.finished_s)

    # ------------------------------------------------------------------ samples

    def _sample(self) -> None:
        counts = self.backend.task_counts()
        if counts is not None:
            self.obs.tasks_by_state.append((self._now_rounded_s(), dict(counts)))
        self.backend.schedule(SAMPLE_EVERY_S, self._sample)

    def _now_rounded_s(self) -> float:
        return round(self.backend.now_s(), 3)

    # ------------------------------------------------------------------ summary

    def summary(self, final: FinalState) -> dict[str, object]:
        """The summary fields both worlds report; a backend adds its own."""
        obs = self.obs
        terms = {(name, term) for _, name, term in obs.leaders}
        acknowledged = len(obs.acknowledged)
        return {
            "scenario": self.scenario.name,
            "seed": self.seed,
            "failover_s": distribution(obs.failovers_s, digits=3, with_values=True),
            "submit_ms": distribution(obs.submit_ms, digits=2),
            "submit_ms_steady": distribution(obs.submit_ms_steady, digits=2),
            "submit_ms_steady_by_client": {
                client: distribution(latencies, digits=2)
                for client, latencies in sorted(obs.submit_ms_steady_by_client.items())
            },
            "submit_ms_steady_slowest": [
                {"started_s": round(started_s, 3), "client": client, "ms": round(ms, 2)}
                for ms, started_s, client in sorted(obs.submit_steady_slowest, reverse=True)
            ],
            "tasks_submitted": obs.submitted,
            "tasks_acknowledged": acknowledged,
            "tasks_succeeded": final.tasks_by_state.get(TaskState.SUCCEEDED.value, 0),
            "tasks_dead": final.tasks_by_state.get(TaskState.DEAD.value, 0),
            "tasks_lost": final.tasks_lost,
            "duplicate_results": final.duplicate_results,
            "tasks_retried": final.tasks_retried,
            "leader_changes": max(0, len(terms) - 1),
            "settled": final.settled,
            "submits_given_up": obs.gave_up,
            "submit_errors": list(obs.errors),
            "membership_changes": sum(1 for m in obs.membership if m[3] == "done"),
            "membership_changes_failed": sum(1 for m in obs.membership if m[3] != "done"),
            "commands_per_task": commands_per_task(final.commands, acknowledged),
            "timeline": {
                "leaders": obs.leaders,
                "faults": obs.faults,
                "tasks_by_state": obs.tasks_by_state,
                "submit_ms": [round(x, 2) for x in obs.submit_ms],
                **({"membership": obs.membership} if obs.membership else {}),
            },
        }


def count_commands(entries: Iterable[bytes]) -> dict[str, int]:
    """Committed commands (the data of NORMAL log entries) by type name."""
    counts = dict.fromkeys(COMMAND_TYPES, 0)
    for data in entries:
        name = command_type(data)
        assert name in counts, f"a command type the parity figures do not know: {name}"
        counts[name] += 1
    return counts


def count_retried(manifest: Manifest, task_ids: Iterable[str]) -> int:
    """`tasks_retried`: the acknowledged tasks that `manifest` shows leased more than once."""
    retried = 0
    for task_id in task_ids:
        task = manifest.get_task(task_id)
        if task is not None and task.attempts > 1:
            retried += 1
    return retried


def commands_per_task(counts: Mapping[str, int], acknowledged: int) -> dict[str, float | None]:
    """Each type's committed commands per acknowledged task, and their `total` (None
    for all when nothing was acknowledged)."""
    assert set(counts) <= set(COMMAND_TYPES), sorted(set(counts) - set(COMMAND_TYPES))
    assert acknowledged >= 0
    per_type = {name: counts.get(name, 0) for name in COMMAND_TYPES}
    per_type["total"] = sum(per_type.values())
    return {
        name: round(count / acknowledged, 3) if acknowledged else None
        for name, count in per_type.items()
    }
