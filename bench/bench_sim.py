"""Benchmark: how fast the simulator runs, scenario by scenario, on one core.

For the reference scenario (`goml sim run` with no argument: goml/scenario/reference.yaml)
and each shipped scenario (scenarios/*.yaml; the one that links to the reference runs once), then
the reference again lasting 30 s and 240 s at the same load (does a longer run cost more
per simulated second?), one after another:
  sim s per wall s     simulated seconds (from the scenario's start, settling included)
                       per second of wall time
  events per sim s     SimPy events processed (Environment.step calls) per simulated second
  msgs per sim s       network messages sent per simulated second
  raft msg/cmd         Raft messages (not API calls) per committed command: what one
                       proposal costs the protocol, heartbeats included
  us per event         wall microseconds per SimPy event
  ms per task          wall milliseconds per task acknowledged (the work done)

    python bench/bench_sim.py [--seed N] [--reference-only]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

import simpy
import yaml

from goml.scenario.loader import load_scenario_text
from goml.scenario.schema import Scenario
from goml.sim.simulation import Simulation

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = Path(str(files("goml.scenario") / "reference.yaml"))
# The reference loads 50 s of its 60 (it leaves the last 10 s for the last tasks to
# finish); the longer and shorter variants keep that fraction, so that both carry the same
# load per simulated second and differ in length alone. (With a fixed 10 s drain the 30 s
# run idled a third of its time, the 240 s run 4 %: the 240 s run did half as much again
# work per simulated second, and looked slower per simulated second for that alone.)
VARIANTS_S = (30, 240)


class StepCounter:
    """Counts an Environment's step() calls: SimPy keeps no count of processed events.
    Installed on the instance, so the Simulation builds its own env as always."""

    def __init__(self, env: simpy.Environment) -> None:
        self.steps = 0
        self._step: Callable[[], None] = env.step
        # Environment.run calls self.step(): an instance attribute comes first.
        setattr(env, "step", self)  # noqa: B010 (mypy refuses assigning to a method)

    def __call__(self) -> None:
        self.steps += 1
        self._step()


def with_duration(text: str, duration_s: int) -> str:
    """The scenario text lasting duration_s, its load stopping at the reference's fraction."""
    data: dict[str, Any] = yaml.safe_load(text)
    load_fraction = data["workload"]["stop_s"] / data["duration_s"]
    data["name"] = f"{data['name']}-{duration_s}s"
    data["duration_s"] = duration_s
    data["workload"]["stop_s"] = round(duration_s * load_fraction)
    return yaml.safe_dump(data, sort_keys=False)


def measure(label: str, scenario: Scenario, seed: int) -> None:
    sim = Simulation(scenario, seed)
    counter = StepCounter(sim.env)
    started = time.perf_counter()
    summary = sim.run()
    wall_s = time.perf_counter() - started
    sim_s = float(summary["sim_seconds"])  # type: ignore[arg-type]
    messages = int(summary["messages_sent"])  # type: ignore[call-overload]
    acked = int(summary["tasks_acknowledged"])  # type: ignore[call-overload]
    raft_messages = sim.network.sent - sim.network.sent_api
    commands = max(1, len(sim.checker.commands))
    assert counter.steps > 0 and sim_s > 0 and wall_s > 0
    print(
        f"{label:<22} {sim_s:>7.1f} {wall_s:>7.2f} {sim_s / wall_s:>9.1f} "
        f"{counter.steps / sim_s:>10.0f} {messages / sim_s:>9.0f} {raft_messages / commands:>8.1f} "
        f"{wall_s / counter.steps * 1e6:>8.1f} {wall_s / max(1, acked) * 1000:>8.2f}  "
        f"{acked}/{summary['tasks_lost']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--reference-only",
        action="store_true",
        help="the reference and its 30 s and 240 s variants, not the other scenarios",
    )
    args = parser.parse_args()
    runs: list[tuple[str, str]] = [("reference", REFERENCE.read_text())]
    for path in sorted((ROOT / "scenarios").glob("*.yaml")):
        if args.reference_only or path.read_bytes() == REFERENCE.read_bytes():
            continue  # scenarios/steady.yaml links to the reference: run it once
        runs.append((path.stem, path.read_text()))
    reference = REFERENCE.read_text()
    runs += [(f"reference {s} s", with_duration(reference, s)) for s in VARIANTS_S]
    print(f"seed {args.seed}, one run at a time on one core; reference = {REFERENCE.name}")
    print(
        f"{'scenario':<22} {'sim s':>7} {'wall s':>7} {'sim s/s':>9} "
        f"{'ev/sim s':>10} {'msg/sim s':>9} {'raft/cmd':>8} {'us/event':>8} {'ms/task':>8}  "
        "acked/lost"
    )
    for label, text in runs:
        measure(label, load_scenario_text(text, label).scenario, args.seed)


if __name__ == "__main__":
    main()
