"""A/B of the event loop under goml's real processes: asyncio's own loop against uvloop
(goml/event_loop.py, switched by GOML_EVENT_LOOP in each child's environment), interleaved
in one run so that both sides see the same machine:

  raft     bench/goml_node.py's cluster (as bench/peers.py runs it): a lone commit p50/p99
           (COUNT sequential proposals on the idle leader), then commits/s with 64 in
           flight; for each, the CPU the three node processes spent per commit
  control  a real 3-node cluster over mutual TLS (goml node run), COUNT lone submits
           through goml.client: p50/p99, and the nodes' CPU per submit
  floor    bench/grpc_floor.py's bare grpc.aio server (lone Status, with and without the hop)

CPU per commit (from /proc/PID/stat, all three processes) moves much less with the
machine's load than wall-clock latency does: on a shared machine it is the figure to
compare. Rounds alternate the order (A B, B A, ...); each row gives the median over the
rounds and every round's figure, with the load average when the round started.

    python bench/ab_event_loop.py [--rounds 4] [--only raft,control,floor] [--count 500]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]

import bench_control  # noqa: E402
import peers  # noqa: E402

from goml import event_loop  # noqa: E402
from goml.client import Client  # noqa: E402
from goml.cluster import local  # noqa: E402
from goml.event_loop import EVENT_LOOP_ENV  # noqa: E402

LOOPS = ("asyncio", "uvloop")
FLOOR_ROWS = {
    "bare: stub.Status.future().result()": "floor bare p50 ms",
    "hop: goml.client.Client.status()": "floor hop+client p50 ms",
}
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
Figures = dict[str, float]


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds spent so far by these processes (their threads included)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLOCK_TICKS_PER_S


quantile = bench_control.quantile


def raft(seconds: float, count: int) -> Figures:
    with tempfile.TemporaryDirectory(prefix="goml-ab-raft-") as tmp:
        cluster = peers.goml_cluster(Path(tmp))
        with cluster.running():
            leader = peers.wait_until(
                "a settled leader", cluster.converged, peers.CONVERGE_TIMEOUT_S, cluster.all()
            )
            pids = [m.popen.pid for m in cluster.members if m.popen is not None]
            address, _ = cluster.write_request(leader)
            # The lone phase: 1 in flight for a moment, then COUNT sequential ones.
            before = cpu_s(pids)
            lone = peers.ask(address, f"bench 1 0.01 {count}", 300)
            lone_cpu_s = cpu_s(pids) - before
            before = cpu_s(pids)
            many = peers.ask(address, f"bench 64 {seconds} 1", seconds + 120)
            many_cpu_s = cpu_s(pids) - before
    assert lone["ok"] and many["ok"], (lone, many)
    return {
        "raft lone p50 ms": lone["latency_ms_p50"],
        "raft lone p99 ms": lone["latency_ms_p99"],
        "raft lone CPU ms/commit": lone_cpu_s * 1000 / (lone["committed"] + count),
        "raft commits/s (64)": many["commits_per_s"],
        "raft CPU ms/commit (64)": many_cpu_s * 1000 / (many["committed"] + 1),
    }


def control(count: int) -> Figures:
    with tempfile.TemporaryDirectory(prefix="goml-ab-control-") as tmp:
        layout = local.prepare(Path(tmp), nodes=3, insecure=False)
        with (
            local.running_cluster(layout) as processes,
            Client(layout.profile, retry_s=30) as client,
        ):
            local.wait_for_leader(layout.profile, timeout_s=30)
            for _ in range(20):  # warm up channels and the leader's caches
                client.submit_specs([bench_control.spec()])
            pids = [p.popen.pid for p in processes]
            latencies = []
            before = cpu_s(pids)
            for _ in range(count):
                started = time.perf_counter()
                client.submit_specs([bench_control.spec()])
                latencies.append((time.perf_counter() - started) * 1000)
            used_s = cpu_s(pids) - before
    return {
        "control submit p50 ms": quantile(latencies, 0.5),
        "control submit p99 ms": quantile(latencies, 0.99),
        "control CPU ms/submit": used_s * 1000 / count,
    }


def floor(calls: int) -> Figures:
    out = subprocess.run(
        [sys.executable, str(BENCH / "grpc_floor.py"), "--calls", str(calls), "--skip-cluster"],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    figures: Figures = {}
    for line in out.splitlines():
        for row, name in FLOOR_ROWS.items():
            if line.strip().startswith(row):
                figures[name] = float(line.split()[-2])
    assert len(figures) == len(FLOOR_ROWS), out
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--only", default="raft,control,floor")
    parser.add_argument("--seconds", type=float, default=3.0, help="raft throughput phase")
    parser.add_argument("--count", type=int, default=500, help="lone writes/calls per run")
    args = parser.parse_args()
    if not 1 <= args.rounds <= 50:
        parser.error("--rounds takes 1 to 50")
    parts = args.only.split(",")
    runs = {
        "raft": lambda: raft(args.seconds, args.count),
        "control": lambda: control(args.count),
        "floor": lambda: floor(args.count),
    }
    unknown = set(parts) - set(runs)
    if unknown:
        parser.error(f"unknown --only parts {sorted(unknown)}")
    try:
        event_loop.loop_factory("uvloop")  # it compares the two loops: both must run
    except event_loop.EventLoopError as error:
        print(f"ab_event_loop: {error} (pip install uvloop)", file=sys.stderr)
        return 2
    samples: dict[tuple[str, str], list[float]] = defaultdict(list)
    loads: list[str] = []
    failures: dict[str, list[str]] = defaultdict(list)
    for round_index in range(args.rounds):
        order = LOOPS if round_index % 2 == 0 else tuple(reversed(LOOPS))
        loads.append(f"{os.getloadavg()[0]:.2f}")
        for loop in order:
            os.environ[EVENT_LOOP_ENV] = loop  # inherited by every child process
            for part in parts:
                try:
                    figures = runs[part]()
                except (OSError, RuntimeError, AssertionError) as error:
                    # On a loaded machine a run can lose its leader mid-way: count it, go on.
                    failures[loop].append(f"round {round_index + 1} {part}: {error!r}"[:300])
                    print(f"  {loop} {part} failed: {failures[loop][-1]}", flush=True)
                    continue
                for name, value in figures.items():
                    samples[(name, loop)].append(value)
                print(f"  {loop} {part}: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()))
        print(f"round {round_index + 1}/{args.rounds} done (load at its start {loads[-1]})")
    os.environ.pop(EVENT_LOOP_ENV)
    print(f"\n{args.rounds} interleaved rounds; 1-min load at each round's start: {loads}")
    print(f"{'':28}{'asyncio':>10}{'uvloop':>10}{'ratio':>8}   per round (asyncio | uvloop)")
    names = list(dict.fromkeys(name for name, _ in samples))  # first-seen order
    for name in names:
        a, b = samples[(name, "asyncio")], samples[(name, "uvloop")]
        if not a or not b:
            continue
        ma, mb = statistics.median(a), statistics.median(b)
        rounds = " ".join(f"{x:.2f}" for x in a) + " | " + " ".join(f"{x:.2f}" for x in b)
        print(f"{name:28}{ma:10.2f}{mb:10.2f}{mb / ma:8.2f}   {rounds}")
    for loop in LOOPS:
        print(f"failed runs under {loop}: {len(failures[loop])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
