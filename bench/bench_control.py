"""Benchmark: the control plane as a client sees it, on a real 3-node cluster on loopback
with mutual TLS and fsync'd logs:

  (a) submit latency p50/p99 on an idle cluster (sequential single submits);
  (b) submit throughput with batches (tasks/s acknowledged);
  (c) leader failover after kill -9: from the kill until a submit started after it is
      acknowledged (the simulator's definition), over several trials.

    python bench/bench_control.py [--submits 300] [--batch 100] [--batches 20] [--failovers 5]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from goml.client import Client, ClientError
from goml.cluster import local
from goml.proto import api_pb2

FAILOVER_TIMEOUT_S = 120.0


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def spec(n: int = 4) -> api_pb2.TaskSpec:
    return api_pb2.TaskSpec(
        function="matmul",
        args_json=f'{{"n": {n}, "m": {n}, "k": {n}}}',
        resources=api_pb2.Resources(cpu=0.1, memory_mb=16),
        max_attempts=1,
        timeout_ms=10_000,
        idempotency_key=str(uuid.uuid4()),
    )


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--submits", type=int, default=300)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--failovers", type=int, default=5)
    return parser


def measure(submits: int, batch: int, batches: int, failovers: int) -> dict[str, Any]:
    """Run the three measurements on a fresh cluster (stopped by PID, also on failure)."""
    assert submits >= 1
    assert batch >= 1 and batches >= 1
    with tempfile.TemporaryDirectory(prefix="goml-bench-control-") as tmp:
        layout = local.prepare(Path(tmp), nodes=3, insecure=False)
        with (
            local.running_cluster(layout) as processes,
            Client(layout.profile, retry_s=30) as client,
        ):
            local.wait_for_leader(layout.profile, timeout_s=30)
            for _ in range(20):  # warm up channels and the leader's caches
                client.submit_specs([spec()])
            latencies = []
            for _ in range(submits):
                started = time.perf_counter()
                client.submit_specs([spec()])
                latencies.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            for _ in range(batches):
                client.submit_specs([spec() for _ in range(batch)])
            elapsed = time.perf_counter() - started
            trials = [measure_failover(client, processes, layout) for _ in range(failovers)]
    return {
        "latencies_ms": latencies,
        "latency_ms_p50": quantile(latencies, 0.5),
        "latency_ms_p99": quantile(latencies, 0.99),
        "batch": batch,
        "batch_tasks": batch * batches,
        "batch_seconds": elapsed,
        "tasks_per_s": batch * batches / elapsed,
        "failovers_s": trials,
    }


def report(result: dict[str, Any]) -> None:
    latencies = result["latencies_ms"]
    print("3 node processes on loopback, mutual TLS, fsync'd SQLite logs, no agents")
    print(
        f"  (a) idle submit latency over {len(latencies)} submits: p50 "
        f"{result['latency_ms_p50']:.2f} ms, p99 {result['latency_ms_p99']:.2f} ms, "
        f"max {max(latencies):.2f} ms"
    )
    print(
        f"  (b) batches of {result['batch']}: {result['batch_tasks']} tasks in "
        f"{result['batch_seconds']:.2f} s = {result['tasks_per_s']:.0f} tasks/s"
    )
    failovers = result["failovers_s"]
    if failovers:
        print(
            f"  (c) failover after kill -9 of the leader, {len(failovers)} trials: median "
            f"{statistics.median(failovers):.3f} s, worst {max(failovers):.3f} s "
            "(election timeouts 300-600 ms)"
        )


def main() -> None:
    args = parser().parse_args()
    report(measure(args.submits, args.batch, args.batches, args.failovers))


def measure_failover(
    client: Client, processes: list[local.Process], layout: local.LocalLayout
) -> float:
    leader = client.status().leader_id
    victim = next(p for p in processes if p.name == leader)
    killed_at = time.perf_counter()
    os.kill(victim.popen.pid, signal.SIGKILL)
    victim.popen.wait(timeout=10)
    give_up_at = killed_at + FAILOVER_TIMEOUT_S
    while True:
        try:
            client.submit_specs([spec()])  # started after the kill
            break
        except ClientError:
            if time.perf_counter() > give_up_at:
                raise
            # the client already retried for retry_s; try again
    failover = time.perf_counter() - killed_at
    # Bring the node back from its data directory and let it catch up before the next trial.
    processes.remove(victim)
    processes.append(
        local.spawn(victim.name, local.node_argv(layout.node_configs[victim.name]), victim.log_path)
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            status = client.status(victim.name)
            if status.commit_index >= client.status().commit_index:
                break
        except ClientError:
            pass
        time.sleep(0.1)  # polling a remote process with a deadline
    return failover


if __name__ == "__main__":
    main()
