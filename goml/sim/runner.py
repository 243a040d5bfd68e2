"""`goml sim run`: run a scenario in the simulator, judge its expectations, write the
report, and name a failing seed with the command that replays it. `goml sim sweep` is
`goml.sim.sweep`; it shares `simulate`, `replay_command` and `parse_seeds` from here."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

from goml.raft.checker import SafetyViolation
from goml.report.html import write_report
from goml.scenario.loader import ScenarioError, evaluate_expectations, load_scenario
from goml.scenario.schema import Scenario
from goml.sim.simulation import run_scenario


def judge(scenario: Scenario, summary: dict[str, Any]) -> bool:
    """Add `expectations` (bound, value, verdict) to the summary; True if all pass."""
    verdicts = evaluate_expectations(scenario.expectations, summary)
    summary["expectations"] = [
        {
            "metric": v.metric,
            "op": v.op,
            "bound": v.bound,
            "value": v.value,
            "passed": v.passed,
            "text": str(v),
        }
        for v in verdicts
    ]
    return all(v.passed for v in verdicts)


def simulate(
    scenario: Scenario, seed: int, first_leader: str | None = None
) -> tuple[dict[str, Any], bool]:
    """One seeded run; a safety violation is a failed run whose summary says why.
    `first_leader`: see `Simulation`."""
    try:
        summary = run_scenario(scenario, seed, first_leader)
    except SafetyViolation as violation:
        summary = {"scenario": scenario.name, "seed": seed, "violation": str(violation)}
        judge(scenario, summary)
        return summary, False
    passed = judge(scenario, summary)
    return summary, passed


def replay_command(path: Path, seed: int) -> str:
    return f"goml sim run {shlex.quote(str(path))} --seed {seed}"


def commands_per_task_text(figures: object) -> str:
    """`total 3.5 (SubmitTasks 1.0, LeaseTasks 1.5, ...)`, the types that occur."""
    if not isinstance(figures, dict) or figures.get("total") is None:
        return "none (nothing acknowledged)"
    each = ", ".join(
        f"{name} {value}" for name, value in figures.items() if name != "total" and value
    )
    return f"total {figures['total']} ({each})"


def _readable(summary: dict[str, Any]) -> str:
    failover = summary.get("failover_s", {})
    submit = summary.get("submit_ms", {})
    lines = [
        f"scenario {summary['scenario']}  seed {summary['seed']}  trace {str(summary.get('trace_digest', ''))[:16]}",
        f"  simulated {summary.get('sim_seconds')} s in {summary.get('wall_seconds')} s wall "
        f"({summary.get('speedup')}x), {summary.get('events')} traced events",
        f"  failovers {failover.get('count')}: p50 {failover.get('p50')} s, p99 {failover.get('p99')} s, "
        f"max {failover.get('max')} s",
        f"  submit latency: p50 {submit.get('p50')} ms, p99 {submit.get('p99')} ms, max {submit.get('max')} ms",
        *(
            f"    steady, {client}: p50 {d.get('p50')} ms, p99 {d.get('p99')} ms ({d.get('count')})"
            for client, d in (summary.get("submit_ms_steady_by_client") or {}).items()
        ),
        "  slowest steady submits: "
        + (
            ", ".join(
                f"{s['started_s']:.2f} s {s['client']} {s['ms']:.0f} ms"
                for s in (summary.get("submit_ms_steady_slowest") or [])[:5]
            )
            or "-"
        ),
        f"  tasks: {summary.get('tasks_submitted')} submitted, {summary.get('tasks_acknowledged')} acknowledged, "
        f"{summary.get('tasks_succeeded')} succeeded, {summary.get('tasks_lost')} lost, "
        f"{summary.get('duplicate_results')} results twice",
        f"  leader changes {summary.get('leader_changes')}",
        f"  commands per task: {commands_per_task_text(summary.get('commands_per_task'))}",
    ]
    changes = (summary.get("timeline") or {}).get("membership") or []
    for fired_s, ended_s, what, outcome, members in changes:
        lines.append(
            f"  membership {what} at {fired_s} s: {outcome} at {ended_s} s "
            f"(members {','.join(members)})"
        )
    if "violation" in summary:
        lines = [f"SAFETY VIOLATION: {summary['violation']}"]
    lines += [f"  {e['text']}" for e in summary.get("expectations", [])]
    return "\n".join(lines)


def load_for_run(path: Path) -> Scenario | None:
    """The scenario at `path`, its warnings printed; None (problems printed) if invalid."""
    try:
        loaded = load_scenario(path)
    except ScenarioError as error:
        print(error, file=sys.stderr)
        return None
    for warning in loaded.warnings:
        print(warning, file=sys.stderr)
    return loaded.scenario


def print_summary(
    summary: dict[str, Any], readable: str, report: Path, target: Path, as_json: bool
) -> None:
    """The summary as JSON (without the timeline), or readable with the report's path."""
    if as_json:
        shown = {k: v for k, v in summary.items() if k != "timeline"}
        print(json.dumps(shown, indent=2, sort_keys=True))
    else:
        print(readable)
        print(f"report: {report}  (summary: {target / 'summary.json'})")


def run_command(path: Path, seed: int | None, out_dir: Path | None, as_json: bool) -> int:
    scenario = load_for_run(path)
    if scenario is None:
        return 2
    chosen = seed if seed is not None else scenario.seed
    summary, passed = simulate(scenario, chosen)
    target = out_dir or Path("reports") / f"{scenario.name}-seed{chosen}"
    report = write_report(summary, target)
    print_summary(summary, _readable(summary), report, target, as_json)
    if not passed:
        print(f"FAILED; replay: {replay_command(path, chosen)}", file=sys.stderr)
    return 0 if passed else 1


# Seeds of one sweep: a million 5-second runs is a month of one core, already more than
# any cluster here gives a sweep; a typo like 1-10000000000 must not build a list first.
SEEDS_MAX = 1_000_000
# `goml sim run --seed` takes an int64; a seed it cannot replay is no use.
SEED_MAX = 2**63 - 1


def parse_seeds(text: str) -> list[int]:
    """`1-1000`, `7`, or `1,5,9-12`: the seeds in the order given, each once."""
    seeds: dict[int, None] = {}  # ordered, no repeats
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"bad seed range {text!r}: use e.g. 1-100 or 3,7,10-20")
        first, last = int(low), int(high or low)
        if last < first:
            raise ValueError(f"bad seed range {part.strip()!r}: the first seed is the lower")
        if last > SEED_MAX:
            raise ValueError(f"seed {last} is over {SEED_MAX}, the largest `--seed` takes")
        if last - first + 1 + len(seeds) > SEEDS_MAX:
            raise ValueError(f"{text!r}: more than {SEEDS_MAX} seeds in one sweep")
        seeds.update(dict.fromkeys(range(first, last + 1)))
    assert 0 < len(seeds) <= SEEDS_MAX
    return list(seeds)
