"""What a membership change is, step by step: the one decision behind `goml node
add/remove/replace` (goml.cluster.membership, over gRPC), the simulator's membership
faults (goml.sim.operator, over simulated calls) and the chaos runner's (goml.chaos,
over gRPC to real processes). Sans-IO: inputs are the configuration a runtime read
back and the answers it got, outputs are the next thing to do; time arrives as `now_ms`.

The steps (the dissertation's 4.2.1, etcd's runbooks):
- add NAME: add it as a learner, then promote it; the promotion is sent with `wait_ms`
  and the leader holds it until the learner has caught up (`RaftCore.caught_up`: it
  replicates steadily and holds every committed entry, so it counts at once and no
  availability is lost while it copies). That criterion lives in the Raft core only.
- remove NAME: one change.
- replace OLD NEW: add NEW (learner, then voter), then remove OLD. Adding first never
  lowers the number of failures the cluster tolerates, also when OLD is dead already.

Each step is idempotent: before it is sent and after a refusal the runtime reads the
configuration back, and a step already made counts as done (a retried call whose first
answer was lost). A made step waits until its configuration is committed before the
next one goes (one single-server change at a time). Refusals that pass by themselves (a
change still committing, a new leader that has not committed in its term yet, a learner
still catching up) and unreachable leaders are retried after `STEP_PAUSE_MS`, until the
step's deadline; any other refusal ends the plan, unless the read-back shows it made.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from goml.api.types import ErrorCode, MembershipChangeKind

ADD_LEARNER = MembershipChangeKind.ADD_LEARNER
PROMOTE = MembershipChangeKind.PROMOTE
REMOVE = MembershipChangeKind.REMOVE
# Refusals that go away by themselves (goml.raft.core's and goml.cluster.node_core's
# messages): retried until the step's deadline.
PASSING_REFUSALS = ("retry shortly", "not committed yet", "has not caught up", "did not catch up")
STEP_PAUSE_MS = 200  # between tries of a refused step: the cluster needs a commit or two
STEPS_MAX = 3  # a replace; a plan is never longer
# A scenario's membership faults, in the simulator and on real processes alike: each
# step's deadline, and how long a promotion waits for its learner to catch up.
SCENARIO_STEP_TIMEOUT_MS = 30_000
SCENARIO_CATCH_UP_WAIT_MS = 60_000


@dataclass(frozen=True, slots=True)
class Step:
    """One single-server change: `address` for ADD_LEARNER only."""

    kind: MembershipChangeKind
    node: str
    address: str = ""

    def __post_init__(self) -> None:
        assert self.node, "a step names a node"
        assert bool(self.address) == (self.kind is ADD_LEARNER), self

    def done(self, view: MembersView) -> bool:
        """Whether `view` shows this step made (committed or not)."""
        if self.kind is ADD_LEARNER:
            return self.node in view.voters or self.node in view.learners
        if self.kind is PROMOTE:
            return self.node in view.voters
        return self.node not in view.voters and self.node not in view.learners

    def __str__(self) -> str:
        return f"{self.kind.value} {self.node}"


@dataclass(frozen=True, slots=True)
class MembersView:
    """The configuration as the leader reports it (`goml status`)."""

    voters: tuple[str, ...]
    learners: tuple[str, ...]
    committed: bool  # the leader has committed it (an uncommitted one may yet be undone)


class PlanError(ValueError):
    """A plan that cannot be made (the message says why)."""


def plan_add(name: str, address: str) -> tuple[Step, ...]:
    """`name` as a learner at `address`, then a voter once it caught up."""
    return (Step(ADD_LEARNER, name, address), Step(PROMOTE, name))


def plan_remove(name: str) -> tuple[Step, ...]:
    return (Step(REMOVE, name),)


def plan_replace(old: str, new: str, address: str) -> tuple[Step, ...]:
    """NEW added (learner, voter) before OLD is removed."""
    if old == new:
        raise PlanError(f"replace {old} by itself: remove it, wipe its disk, add it again")
    return (*plan_add(new, address), *plan_remove(old))


class Refusal(enum.Enum):
    """How a failed call is taken (the runtime maps its error codes)."""

    PRECONDITION = "precondition"  # FAILED_PRECONDITION: the cluster said no (maybe for now)
    UNAVAILABLE = "unavailable"  # no leader reached, no answer in time, not committed
    OTHER = "other"  # anything else: a bug or bad input, never retried


def refusal_of(code: ErrorCode) -> Refusal:
    """How the plan takes a node's error code (a caller that follows NOT_LEADER hints
    itself never sees one; one that does not asks the leader again after a pause)."""
    if code is ErrorCode.FAILED_PRECONDITION:
        return Refusal.PRECONDITION
    if code in (ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED, ErrorCode.NOT_LEADER):
        return Refusal.UNAVAILABLE
    return Refusal.OTHER


@dataclass(frozen=True, slots=True)
class Call:
    """Send this change to the leader (a promotion waits up to `wait_ms` for its learner)."""

    step: Step
    wait_ms: int


@dataclass(frozen=True, slots=True)
class Pause:
    """Read the configuration again in `delay_ms` (and ask `next` then)."""

    delay_ms: int
    why: str


@dataclass(frozen=True, slots=True)
class Finished:
    view: MembersView


@dataclass(frozen=True, slots=True)
class Failed:
    why: str


Action = Call | Pause | Finished | Failed


class ChangeDriver:
    """Drives one plan. The runtime loops: read the configuration, `next(view, now_ms)`,
    do what it says (`Call`: send, then `answered` or `refused`; `Pause`: wait), until
    `Finished` or `Failed`. `view` is None when no leader could be asked. `started`
    lists the steps in the order they were first sent (for the runtimes' traces)."""

    def __init__(self, steps: tuple[Step, ...], step_timeout_ms: int, catch_up_wait_ms: int):
        assert 0 < len(steps) <= STEPS_MAX, steps
        assert step_timeout_ms > 0 and catch_up_wait_ms >= 0
        self.steps = steps
        self.step_timeout_ms = step_timeout_ms
        self.catch_up_wait_ms = catch_up_wait_ms
        self.index = 0
        self.done_steps: list[Step] = []
        self._deadline_ms: int | None = None
        self._refused: str | None = None  # a refusal for good, unless the view shows it made
        self._last_error = ""
        self._outcome: Finished | Failed | None = None
        self._calling = False
        self._pause_due = False  # a refusal that passes: wait before the next try

    @property
    def step(self) -> Step | None:
        return self.steps[self.index] if self.index < len(self.steps) else None

    @property
    def outcome(self) -> Finished | Failed | None:
        return self._outcome

    def next(self, view: MembersView | None, now_ms: int) -> Action:
        assert not self._calling, "answered or refused first"
        if self._outcome is not None:
            return self._outcome
        while True:
            step = self.step
            if step is None:
                assert view is not None, "the last step was seen made in a view"
                self._outcome = Finished(view)
                return self._outcome
            if self._deadline_ms is None:
                extra = self.catch_up_wait_ms if step.kind is PROMOTE else 0
                self._deadline_ms = now_ms + self.step_timeout_ms + extra
            if view is None:
                return self._retry_or_fail(step, now_ms, "no leader answers")
            if step.done(view):
                if not view.committed and now_ms < self._deadline_ms:
                    return Pause(STEP_PAUSE_MS, f"{step}: made, not committed yet")
                self.done_steps.append(step)
                self.index += 1
                self._deadline_ms = None
                self._refused = None
                continue
            if self._refused is not None:
                self._outcome = Failed(f"{step}: {self._refused}")
                return self._outcome
            if self._pause_due or now_ms > self._deadline_ms:
                self._pause_due = False
                return self._retry_or_fail(step, now_ms, self._last_error or "no answer")
            self._calling = True
            wait_ms = self.catch_up_wait_ms if step.kind is PROMOTE else 0
            return Call(step, wait_ms)

    def answered(self) -> None:
        """The call returned (the change committed): the next view shows it."""
        assert self._calling
        self._calling = False
        self._last_error = ""

    def refused(self, how: Refusal, detail: str) -> None:
        assert self._calling
        self._calling = False
        self._last_error = detail
        passing = how is Refusal.UNAVAILABLE or (
            how is Refusal.PRECONDITION and any(p in detail for p in PASSING_REFUSALS)
        )
        if passing:
            self._pause_due = True
        else:
            # Read back first: a change an earlier try made is refused as "already".
            self._refused = detail

    def _retry_or_fail(self, step: Step, now_ms: int, why: str) -> Action:
        assert self._deadline_ms is not None
        if now_ms > self._deadline_ms:
            self._outcome = Failed(f"{step}: not done in time; last: {why}")
            return self._outcome
        return Pause(STEP_PAUSE_MS, f"{step}: {why}; trying again")
