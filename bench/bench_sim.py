"""Benchmark: simulated seconds per wall second for the reference topology (3 AWS +
2 GCP nodes, 5 agents) at 50 submits/s, and the wall cost per simulated event.

    python bench/bench_sim.py [--seconds 30] [--rate 50]
"""

from __future__ import annotations

import argparse
import time

from goml.scenario.loader import load_scenario_text
from goml.sim.simulation import Simulation

SCENARIO = """
name: bench-reference
duration_s: {seconds}
workload:
  clients: [{{name: c-aws, node: aws-1}}, {{name: c-gcp, node: gcp-1}}]
  rate_per_s: {rate}
  mix:
    matmul: {{args: {{n: 64}}}}
  duration_ms: {{kind: lognormal, median_ms: 50, p99_ms: 500}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=50.0)
    args = parser.parse_args()
    scenario = load_scenario_text(SCENARIO.format(seconds=args.seconds, rate=args.rate)).scenario
    sim = Simulation(scenario, seed=1)
    started = time.perf_counter()
    summary = sim.run()
    wall_s = time.perf_counter() - started
    sim_s = float(summary["sim_seconds"])  # type: ignore[arg-type]
    simpy_events = next(sim.env._eid)  # how many events SimPy scheduled (its own counter)
    messages = int(summary["messages_sent"])  # type: ignore[call-overload]
    print(f"reference topology, 5 agents, {args.rate:g} submits/s, {args.seconds:g} s + settle")
    print(
        f"  simulated {sim_s:.1f} s in {wall_s:.1f} s wall: {sim_s / wall_s:.2f} sim s per wall s"
    )
    print(
        f"  {simpy_events} SimPy events, {messages} messages: {wall_s / simpy_events * 1e6:.1f} us per event"
    )
    print(f"  tasks {summary['tasks_acknowledged']} acknowledged, {summary['tasks_lost']} lost")


if __name__ == "__main__":
    main()
