"""Benchmark: how fast the simulator runs, scenario by scenario, on one core.

For the reference scenario (`goml sim run` with no argument: goml/scenario/reference.yaml)
and each shipped scenario (scenarios/*.yaml; the one that links to the reference runs once), then
the reference again at 30 s and 240 s of load (does a longer run cost more per simulated
second?), one after another:
  sim s per wall s     simulated seconds (from the scenario's start, settling included)
                       per second of wall time
  events per sim s     events processed (goml.sim.loop: SimPy's before it) per simulated second
  msgs per sim s       network messages sent per simulated second
  us per event         wall microseconds per SimPy event

    python bench/bench_sim.py [--seed N]
"""

from __future__ import annotations

import argparse
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from goml.scenario.loader import load_scenario_text
from goml.scenario.schema import Scenario
from goml.sim.simulation import Simulation

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = Path(str(files("goml.scenario") / "reference.yaml"))
# The reference stops its load 10 s before its end, so the last tasks finish; the longer
# and shorter variants keep that, so they differ in load time alone.
DRAIN_S = 10
VARIANTS_S = (30, 240)


def with_duration(text: str, duration_s: int) -> str:
    """The scenario text with its load lasting duration_s - DRAIN_S of duration_s."""
    data: dict[str, Any] = yaml.safe_load(text)
    data["name"] = f"{data['name']}-{duration_s}s"
    data["duration_s"] = duration_s
    data["workload"]["stop_s"] = duration_s - DRAIN_S
    return yaml.safe_dump(data, sort_keys=False)


def measure(label: str, scenario: Scenario, seed: int) -> None:
    sim = Simulation(scenario, seed)
    started = time.perf_counter()
    summary = sim.run()
    wall_s = time.perf_counter() - started
    sim_s = float(summary["sim_seconds"])  # type: ignore[arg-type]
    messages = int(summary["messages_sent"])  # type: ignore[call-overload]
    assert sim.env.steps > 0 and sim_s > 0 and wall_s > 0
    print(
        f"{label:<22} {sim_s:>7.1f} {wall_s:>7.2f} {sim_s / wall_s:>9.1f} "
        f"{sim.env.steps / sim_s:>10.0f} {messages / sim_s:>9.0f} "
        f"{wall_s / sim.env.steps * 1e6:>8.1f}  {summary['tasks_acknowledged']}/{summary['tasks_lost']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    runs: list[tuple[str, str]] = [("reference", REFERENCE.read_text())]
    for path in sorted((ROOT / "scenarios").glob("*.yaml")):
        if path.read_bytes() == REFERENCE.read_bytes():
            continue  # scenarios/steady.yaml links to the reference: run it once
        runs.append((path.stem, path.read_text()))
    reference = REFERENCE.read_text()
    runs += [(f"reference {s} s", with_duration(reference, s)) for s in VARIANTS_S]
    print(f"seed {args.seed}, one run at a time on one core; reference = {REFERENCE.name}")
    print(
        f"{'scenario':<22} {'sim s':>7} {'wall s':>7} {'sim s/s':>9} "
        f"{'ev/sim s':>10} {'msg/sim s':>9} {'us/event':>8}  acked/lost"
    )
    for label, text in runs:
        measure(label, load_scenario_text(text, label).scenario, args.seed)


if __name__ == "__main__":
    main()
