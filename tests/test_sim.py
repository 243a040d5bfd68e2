"""The simulator: determinism by seed, faults that move leadership, promises checked,
the CLI's exit codes and reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from goml.cluster.duties import DEFAULT_DUTIES
from goml.cluster.manifest import ApplyResult
from goml.raft.checker import SafetyChecker, SafetyViolation
from goml.raft.types import Entry
from goml.scenario.loader import load_scenario, load_scenario_text
from goml.scenario.player import CLIENT_HEDGE_AFTER_MS, SLOWEST_KEPT
from goml.sim.node import SimNode
from goml.sim.simulation import Simulation, run_scenario

ROOT = Path(__file__).resolve().parent.parent

SHORT = """
name: short
duration_s: 8
workload:
  clients: [{name: c-aws, node: aws-1}, {name: c-gcp, node: gcp-1}]
  rate_per_s: 10
  stop_s: 7
  mix:
    matmul: {args: {n: 8}}
  duration_ms: {kind: uniform, min_ms: 5, max_ms: 50}
"""


def short(extra: str = "") -> str:
    return SHORT + extra


def test_steady_run_keeps_every_promise() -> None:
    scenario = load_scenario_text(short()).scenario
    summary = run_scenario(scenario, seed=3)
    assert summary["tasks_acknowledged"] == summary["tasks_submitted"] > 50
    assert summary["tasks_succeeded"] == summary["tasks_acknowledged"]
    assert summary["tasks_lost"] == 0
    assert summary["duplicate_results"] == 0
    assert summary["settled"] is True
    submit = summary["submit_ms"]
    assert isinstance(submit, dict)
    assert 0 < submit["p50"] < 500


def test_steady_submits_are_also_split_by_client() -> None:
    """A client far from the leader (or cut off from it) shows in its own figures, not
    only inside everyone's p99."""
    summary = run_scenario(load_scenario_text(short()).scenario, seed=3)
    steady, by_client = summary["submit_ms_steady"], summary["submit_ms_steady_by_client"]
    assert isinstance(steady, dict) and isinstance(by_client, dict)
    assert sorted(by_client) == ["c-aws", "c-gcp"]
    assert sum(d["count"] for d in by_client.values()) == steady["count"] > 50
    # The leader is in aws (the first leader of this topology): the gcp client pays the
    # cross-cloud round trip on every submit.
    assert by_client["c-gcp"]["p50"] > by_client["c-aws"]["p50"] + 20, by_client
    # And the slowest of them, slowest first, with when they started and whose they were.
    slowest = summary["submit_ms_steady_slowest"]
    assert isinstance(slowest, list) and len(slowest) == SLOWEST_KEPT
    assert [s["ms"] for s in slowest] == sorted((s["ms"] for s in slowest), reverse=True)
    assert slowest[0]["ms"] == steady["max"]
    assert {s["client"] for s in slowest} <= {"c-aws", "c-gcp"}
    assert all(0 <= s["started_s"] <= 7 for s in slowest)  # the workload stops at 7 s


def test_submits_caught_by_a_one_way_cut_end_with_the_first_ones_lesson() -> None:
    """The cut-off client's submits in flight when the cut starts (10 s) are hedged as
    soon as the first one's copy answers (`RetryPolicy.stranded`), not each at its own
    hedge time: each ends within one copy's round trip of the first one's end (before,
    each waited its own 300 ms: seed 1, 406, 407 and 409 ms, ending 155 and 234 ms after
    the first)."""
    path = ROOT / "scenarios" / "chaos" / "one-way-partition.yaml"
    summary = run_scenario(load_scenario(path).scenario, seed=1)
    slowest = summary["submit_ms_steady_slowest"]
    assert isinstance(slowest, list)
    caught = sorted(
        (s["started_s"], s["ms"] / 1000)
        for s in slowest
        if s["client"] == "client-gcp" and 10.0 <= s["started_s"] < 10.0 + 0.3
    )
    assert len(caught) >= 2, slowest
    (first_start_s, first_s), *later = caught
    assert first_s >= CLIENT_HEDGE_AFTER_MS / 1000, caught  # the first waits its hedge
    copy_round_trip_s = first_s - CLIENT_HEDGE_AFTER_MS / 1000
    first_end_s = first_start_s + first_s
    for start_s, took_s in later:
        assert start_s + took_s <= first_end_s + copy_round_trip_s + 0.02, caught


def test_a_crashed_idle_agent_is_marked_down_one_timeout_later() -> None:
    """A dead agent's connections close, so its parked lease poll is forgotten and no
    longer counts as its heartbeat: marked down one agent timeout after the crash (plus
    a duties round), as a real kill -9 is (test_agent_integration), not up to one lease
    wait later (before: 9.9 s after a crash at 5 s)."""
    text = """
name: idle-agent-crash
duration_s: 20
faults:
  - {at_s: 5, kind: agent_crash, target: aws-2}
"""
    simulation = Simulation(load_scenario_text(text).scenario, seed=1)
    marked_down_s: list[float] = []
    on_applied = simulation.on_applied

    def watching(node: SimNode, result: ApplyResult) -> None:
        if result.command == "MarkAgentDown" and node.node is not None and node.node.is_leader:
            marked_down_s.append(simulation.now_s())
        on_applied(node, result)

    simulation.on_applied = watching  # type: ignore[method-assign]
    simulation.run()
    timeout_s = DEFAULT_DUTIES.agent_timeout_ms / 1000
    assert len(marked_down_s) == 1, marked_down_s
    assert 5 + timeout_s <= marked_down_s[0] < 5 + timeout_s + 0.5, marked_down_s


def test_same_seed_same_trace_different_seed_different_trace() -> None:
    scenario = load_scenario_text(short()).scenario
    first = run_scenario(scenario, seed=11)
    again = run_scenario(scenario, seed=11)
    other = run_scenario(scenario, seed=12)
    assert first["trace_digest"] == again["trace_digest"]
    assert first["trace_digest"] != other["trace_digest"]


def test_trace_is_independent_of_pythonhashseed(tmp_path: Path) -> None:
    path = tmp_path / "short.yaml"
    path.write_text(short("faults: [{at_s: 3, kind: crash, target: leader, restart_after_s: 2}]\n"))
    digests = set()
    for hash_seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "goml",
                "sim",
                "run",
                str(path),
                "--seed",
                "5",
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
        assert out.returncode == 0, out.stderr
        digests.add(json.loads(out.stdout)["trace_digest"])
    assert len(digests) == 1


def test_leader_crash_fails_over_and_loses_nothing() -> None:
    scenario = load_scenario_text(
        short("faults: [{at_s: 3, kind: crash, target: leader, restart_after_s: 2}]\n")
    ).scenario
    summary = run_scenario(scenario, seed=2)
    failover = summary["failover_s"]
    assert isinstance(failover, dict)
    assert failover["count"] == 1
    assert 0 < failover["max"] < 5
    assert summary["leader_changes"] >= 1
    assert summary["tasks_lost"] == 0
    assert summary["duplicate_results"] == 0


def test_partition_of_the_leader_side_moves_leadership() -> None:
    # Cut the leader alone off: the majority elects another, the old one steps down.
    scenario = load_scenario_text(
        short("faults: [{at_s: 3, kind: partition, groups: [[leader]], heal_after_s: 2}]\n")
    ).scenario
    summary = run_scenario(scenario, seed=4)
    failover = summary["failover_s"]
    assert isinstance(failover, dict)
    assert failover["count"] == 1
    assert summary["leader_changes"] >= 1
    assert summary["tasks_lost"] == 0


def test_checker_catches_conflicting_applies() -> None:
    checker = SafetyChecker()
    checker.applied_entry("n1", Entry(5, 2, data=b"a"))
    with pytest.raises(SafetyViolation, match="state-machine safety"):
        checker.applied_entry("n2", Entry(5, 3, data=b"b"))


def test_cli_exit_code_follows_expectations(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(short("expectations: [tasks_lost == 0]\n"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(short("expectations: [tasks_lost > 0]\n"))
    ok = subprocess.run(
        [sys.executable, "-m", "goml", "sim", "run", str(good), "--out", str(tmp_path / "g")],
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "PASS tasks_lost == 0" in ok.stdout
    report = (tmp_path / "g" / "report.html").read_text()
    assert "<svg" in report and "Submit latency CDF" in report
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    for key in ("scenario", "seed", "trace_digest", "sim_seconds", "wall_seconds", "failover_s",
                "submit_ms", "tasks_submitted", "tasks_acknowledged", "tasks_succeeded",
                "tasks_lost", "duplicate_results", "leader_changes", "expectations"):  # fmt: skip
        assert key in summary, key
    failed = subprocess.run(
        [sys.executable, "-m", "goml", "sim", "run", str(bad), "--out", str(tmp_path / "b")],
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
    )  # fmt: skip
    assert failed.returncode == 1
    assert "FAIL tasks_lost > 0" in failed.stdout
    assert f"goml sim run {bad} --seed 1" in failed.stderr


def test_sweep_lists_failing_seeds_with_replay_commands(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        short("expectations: [tasks_lost > 0]\n").replace("duration_s: 8", "duration_s: 3")
    )
    out = subprocess.run(
        [sys.executable, "-m", "goml", "sim", "sweep", str(bad), "--seeds", "1-3", "-j", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 1
    assert "0 passed, 3 failed" in out.stdout
    for seed in (1, 2, 3):
        assert f"goml sim run {bad} --seed {seed}" in out.stdout


def test_bad_scenario_gets_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\nduration_s: -1\n")
    out = subprocess.run(
        [sys.executable, "-m", "goml", "sim", "run", str(path)],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 2
    assert f"{path}:2: duration_s" in out.stderr
    assert "Traceback" not in out.stderr
