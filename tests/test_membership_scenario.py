"""Membership changes in scenarios: the schema's checks of add/remove/replace faults, the
one sans-IO plan every world drives (goml.cluster.membership_plan), and the simulator
replacing every control node one by one (scenarios/rolling-replace.yaml).

The real-process run of the same scenario is in tests/test_chaos_membership.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from goml.api.types import ErrorCode
from goml.cluster.membership_plan import (
    ADD_LEARNER,
    PASSING_REFUSALS,
    PROMOTE,
    REMOVE,
    STEP_PAUSE_MS,
    Call,
    ChangeDriver,
    Failed,
    Finished,
    MembersView,
    Pause,
    PlanError,
    Refusal,
    Step,
    plan_add,
    plan_replace,
    refusal_of,
)
from goml.scenario.loader import ScenarioError, load_scenario, load_scenario_text
from goml.scenario.player import ChangeDone, ScenarioPlayer, StepStarted
from goml.sim.simulation import run_scenario
from tests.test_player import FakeBackend

ROOT = Path(__file__).resolve().parent.parent
ROLLING = ROOT / "scenarios" / "rolling-replace.yaml"

BASE = """\
name: t
duration_s: 30
topology:
  nodes:
    - {name: a1, cloud: aws, region: us-east-1, roles: [control]}
    - {name: a2, cloud: aws, region: us-east-1, roles: [control]}
    - {name: a3, cloud: aws, region: us-east-1, roles: [control]}
    - {name: s1, cloud: aws, region: us-east-1, roles: [control], spare: true}
    - {name: s2, cloud: aws, region: us-east-1, roles: [control], spare: true}
    - {name: w, cloud: aws, region: us-east-1, roles: [agent]}
"""


def problems(tmp_path: Path, faults: str, base: str = BASE) -> list[str]:
    path = tmp_path / "s.yaml"
    path.write_text(base + "faults:\n" + textwrap.indent(textwrap.dedent(faults), "  "))
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    return str(info.value).splitlines()


# --------------------------------------------------------------------------- the schema


def test_membership_faults_parse_and_leave_no_warning() -> None:
    loaded = load_scenario(ROLLING)
    assert loaded.warnings == []
    topology = loaded.scenario.topology
    assert [n.name for n in topology.voter_nodes] == ["aws-1", "aws-2", "gcp-1"]
    assert topology.spare_names == ["aws-3", "aws-4", "gcp-2"]
    kinds = [f.kind for f in loaded.scenario.timeline()]
    assert kinds == ["replace_node"] * 3


@pytest.mark.parametrize(
    ("faults", "field", "message"),
    [
        ("- {at_s: 1, kind: add_node, target: nope}\n", "faults.0.target", "unknown node 'nope'"),
        ("- {at_s: 1, kind: add_node, target: a1}\n", "faults.0.target", "a member already"),
        ("- {at_s: 1, kind: add_node, target: w}\n", "faults.0.target", "no control role"),
        (
            "- {at_s: 1, kind: add_node, target: s1}\n- {at_s: 2, kind: add_node, target: s1}\n",
            "faults.1.target",
            "'s1' is a member already",
        ),
        (
            "- {at_s: 1, kind: replace_node, target: a1, new: a2}\n",
            "faults.0.new",
            "'a2' is a member already",
        ),
        (
            "- {at_s: 1, kind: replace_node, target: a1, new: a1}\n",
            "faults.0.new",
            "cannot replace itself",
        ),
        (
            "- {at_s: 1, kind: replace_node, target: s1, new: s2}\n",
            "faults.0.target",
            "'s1' is not a member (yet)",
        ),
        (
            "- {at_s: 1, kind: replace_node, target: random, new: s2}\n",
            "faults.0.target",
            "a member's name or 'leader'",
        ),
        (
            # The file order is not the timeline's: the add at 5 s comes after the remove.
            "- {at_s: 5, kind: add_node, target: s1}\n- {at_s: 1, kind: remove_node, target: s1}\n",
            "faults.1.target",
            "'s1' is not a member (yet)",
        ),
        (
            "- {at_s: 1, kind: remove_node, target: a1}\n- {at_s: 2, kind: add_node, target: a1}\n",
            "faults.1.target",
            "was a member before",
        ),
        (
            "- {at_s: 1, kind: remove_node, target: a1}\n"
            "- {at_s: 2, kind: remove_node, target: leader}\n"
            "- {at_s: 3, kind: remove_node, target: a3}\n",
            "faults.2.target",
            "the last voter",
        ),
        (
            "- {at_s: 1, kind: add_node, target: s1, every_s: 5, count: 2}\n",
            "faults.0.every_s",
            "fires once",
        ),
        ("- {at_s: 1, kind: remove_node}\n", "faults.0.target", "Field required"),
    ],
)
def test_bad_membership_faults_name_their_field(
    tmp_path: Path, faults: str, field: str, message: str
) -> None:
    found = problems(tmp_path, faults)
    assert any(field in line and message in line for line in found), found


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        (
            "    - {name: a, cloud: c, region: r, roles: [control]}\n"
            "    - {name: b, cloud: c, region: r, roles: [agent], spare: true}\n",
            "topology.nodes.1.spare: spare: true is for a node with the 'control' role",
        ),
        (
            "    - {name: a, cloud: c, region: r, roles: [control], spare: true}\n",
            "topology.nodes: every control node is a spare",
        ),
    ],
)
def test_a_spare_is_a_control_node_and_a_voter_remains(
    tmp_path: Path, nodes: str, message: str
) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("name: t\nduration_s: 5\ntopology:\n  nodes:\n" + nodes)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert message in str(info.value)


def test_the_even_count_warning_counts_the_initial_voters() -> None:
    loaded = load_scenario_text(BASE)
    assert loaded.warnings == []  # 3 voters (and 2 spares): odd


# --------------------------------------------------------------------------- the plan


def view(
    voters: tuple[str, ...], learners: tuple[str, ...] = (), committed: bool = True
) -> MembersView:
    return MembersView(voters, learners, committed)


def test_a_replace_adds_the_new_node_before_it_removes_the_old() -> None:
    steps = plan_replace("a1", "s1", "s1:1")
    assert [(s.kind, s.node) for s in steps] == [
        (ADD_LEARNER, "s1"),
        (PROMOTE, "s1"),
        (REMOVE, "a1"),
    ]
    with pytest.raises(PlanError, match="by itself"):
        plan_replace("a1", "a1", "a1:1")


def test_the_driver_walks_the_steps_and_waits_for_each_commit() -> None:
    driver = ChangeDriver(plan_replace("a1", "s1", "s1:1"), 10_000, 30_000)
    members = ("a1", "a2", "a3")
    action = driver.next(view(members), 0)
    assert action == Call(Step(ADD_LEARNER, "s1", "s1:1"), 0)
    driver.answered()
    # Made but not committed yet: the next step waits for it.
    assert isinstance(driver.next(view(members, ("s1",), committed=False), 10), Pause)
    action = driver.next(view(members, ("s1",)), 20)
    # The promotion carries the catch-up wait: the leader holds it until s1 caught up.
    assert action == Call(Step(PROMOTE, "s1"), 30_000)
    driver.answered()
    action = driver.next(view(("a1", "a2", "a3", "s1")), 30)
    assert action == Call(Step(REMOVE, "a1"), 0)
    driver.answered()
    done = driver.next(view(("a2", "a3", "s1")), 40)
    assert done == Finished(view(("a2", "a3", "s1")))
    assert driver.done_steps == list(driver.steps)


def test_refusals_that_pass_are_retried_after_a_pause_until_the_deadline() -> None:
    driver = ChangeDriver(plan_add("s1", "s1:1"), 1_000, 0)
    members = view(("a1", "a2", "a3"))
    assert isinstance(driver.next(members, 0), Call)
    driver.refused(Refusal.PRECONDITION, f"a change is pending: {PASSING_REFUSALS[0]}")
    pause = driver.next(members, 10)
    assert pause == Pause(STEP_PAUSE_MS, pause.why) and "trying again" in pause.why
    assert isinstance(driver.next(members, 20), Call)
    driver.refused(Refusal.UNAVAILABLE, "no leader")
    assert isinstance(driver.next(members, 1_001), Failed)


def test_a_refusal_for_good_fails_unless_the_read_back_shows_it_made() -> None:
    made = ChangeDriver(plan_add("s1", "s1:1"), 1_000, 0)
    assert isinstance(made.next(view(("a1",)), 0), Call)
    made.refused(Refusal.PRECONDITION, "s1 is a member already")  # an earlier try's answer lost
    assert made.next(view(("a1",), ("s1",)), 1) == Call(Step(PROMOTE, "s1"), 0)
    refused = ChangeDriver(plan_add("s1", "s1:1"), 1_000, 0)
    assert isinstance(refused.next(view(("a1",)), 0), Call)
    refused.refused(Refusal.OTHER, "permission denied")
    failed = refused.next(view(("a1",)), 1)
    assert isinstance(failed, Failed) and "permission denied" in failed.why


def test_error_codes_map_to_refusals() -> None:
    assert refusal_of(ErrorCode.FAILED_PRECONDITION) is Refusal.PRECONDITION
    for code in (ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED, ErrorCode.NOT_LEADER):
        assert refusal_of(code) is Refusal.UNAVAILABLE
    assert refusal_of(ErrorCode.PERMISSION_DENIED) is Refusal.OTHER


# --------------------------------------------------------------------------- the player


@dataclass
class MembershipBackend(FakeBackend):
    """FakeBackend with the membership operations: a plan ends when the test says so."""

    plans: list[tuple[tuple[Step, ...], StepStarted, ChangeDone]] = field(default_factory=list)

    def join_node(self, name: str, peers: tuple[str, ...]) -> None:
        self._did("join_node", f"{name} {','.join(peers)}")

    def member_address(self, name: str) -> str:
        return f"{name}:1"

    def change_membership(
        self, steps: tuple[Step, ...], started: StepStarted, done: ChangeDone
    ) -> None:
        self._did("change_membership", " ".join(str(s) for s in steps))
        self.plans.append((steps, started, done))

    def stop_node(self, name: str) -> None:
        self._did("stop_node", name)


def test_the_player_joins_spares_queues_changes_and_stops_removed_nodes() -> None:
    fake = MembershipBackend(leading=("a1", 1))
    player = ScenarioPlayer(
        load_scenario_text(
            BASE
            + "faults:\n"
            + "  - {at_s: 1, kind: replace_node, target: leader, new: s1}\n"
            + "  - {at_s: 2, kind: remove_node, target: a2}\n"
        ).scenario,
        7,
        fake,
    )
    player.leader_seen("a1", 1)
    player.start()
    fake.run_until(3)
    # The second change waits for the first; the spare joined before its plan.
    assert [a[1:] for a in fake.actions] == [
        ("join_node", "s1 a1,a2,a3"),
        ("change_membership", "add-learner s1 promote s1 remove a1"),
    ]
    assert player.changes_in_flight == 2
    steps, started, done = fake.plans[0]
    started(steps[2], 2.5)  # the removal of the leader: a failover from when it was sent
    assert player.failover_started_s == 2.5
    done(Finished(view(("a2", "a3", "s1"))))
    assert [a[1:] for a in fake.actions[2:]] == [
        ("stop_node", "a1"),
        ("change_membership", "remove a2"),
    ]
    assert player.members == ("a2", "a3", "s1")
    fake.plans[1][2](Failed("remove a2: refused"))
    assert player.changes_in_flight == 0
    assert player.members == ("a2", "a3", "s1")  # a failed change leaves them
    assert ("stop_node", "a2") not in [a[1:] for a in fake.actions]
    outcomes = [m[3] for m in player.obs.membership]
    assert outcomes == ["done", "failed: remove a2: refused"]


# --------------------------------------------------------------------------- the simulator


def test_the_simulator_replaces_every_node_and_loses_nothing() -> None:
    scenario = load_scenario(ROLLING).scenario
    summary = run_scenario(scenario, seed=1)
    changes = summary["timeline"]["membership"]  # type: ignore[index]
    assert [c[3] for c in changes] == ["done", "done", "done"], changes
    assert changes[-1][4] == ("aws-3", "aws-4", "gcp-2")  # the final voters: the new nodes
    assert summary["membership_changes"] == 3
    assert summary["membership_changes_failed"] == 0
    assert summary["tasks_acknowledged"] == summary["tasks_submitted"] > 100
    assert summary["tasks_lost"] == 0
    assert summary["duplicate_results"] == 0
    assert summary["settled"] is True


def test_a_removed_leader_hands_over_and_the_handover_is_a_failover() -> None:
    text = ROLLING.read_text().replace("target: aws-1, new: aws-3", "target: leader, new: aws-3")
    summary = run_scenario(load_scenario_text(text).scenario, seed=2)
    assert summary["membership_changes"] == 3
    failover = summary["failover_s"]
    assert isinstance(failover, dict) and failover["count"] >= 1
    assert summary["leader_changes"] >= 1  # type: ignore[operator]
    assert summary["tasks_lost"] == 0


def test_the_rolling_replace_trace_is_independent_of_pythonhashseed(tmp_path: Path) -> None:
    digests = set()
    for hash_seed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "goml",
                "sim",
                "run",
                str(ROLLING),
                "--seed",
                "3",
                "--json",
                "--out",
                str(tmp_path / hash_seed),
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=300,
            check=False,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        summary = json.loads(out.stdout)
        assert summary["membership_changes"] == 3
        digests.add(summary["trace_digest"])
    assert len(digests) == 1


def test_a_removal_refused_for_lagging_voters_is_retried_not_final() -> None:
    """The core refuses to remove a voter while too few of the rest have caught up (a
    moment under load, or a voter restoring): the plan must retry that until its
    deadline, not give up at the first refusal (the golden file pins the core's words)."""
    golden = Path(__file__).parent / "testdata" / "raft" / "membership_remove_caught_up.txt"
    refusals = [line for line in golden.read_text().splitlines() if "MembershipRefused" in line]
    assert refusals, "the golden file shows the refusal"
    for line in refusals:
        assert any(passing in line for passing in PASSING_REFUSALS), line
