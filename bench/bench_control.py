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

from goml.client import Client, ClientError
from goml.cluster import local
from goml.proto import api_pb2


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--submits", type=int, default=300)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--failovers", type=int, default=5)
    args = parser.parse_args()
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
            for _ in range(args.submits):
                started = time.perf_counter()
                client.submit_specs([spec()])
                latencies.append((time.perf_counter() - started) * 1000)
            print("3 node processes on loopback, mutual TLS, fsync'd SQLite logs, no agents")
            print(
                f"  (a) idle submit latency over {len(latencies)} submits: p50 "
                f"{quantile(latencies, 0.5):.2f} ms, p99 {quantile(latencies, 0.99):.2f} ms, "
                f"max {max(latencies):.2f} ms"
            )
            started = time.perf_counter()
            for _ in range(args.batches):
                client.submit_specs([spec() for _ in range(args.batch)])
            elapsed = time.perf_counter() - started
            total = args.batch * args.batches
            print(
                f"  (b) batches of {args.batch}: {total} tasks in {elapsed:.2f} s = {total / elapsed:.0f} tasks/s"
            )
            failovers = [measure_failover(client, processes, layout) for _ in range(args.failovers)]
            print(
                f"  (c) failover after kill -9 of the leader, {len(failovers)} trials: median "
                f"{statistics.median(failovers):.3f} s, worst {max(failovers):.3f} s "
                "(election timeouts 300-600 ms)"
            )


def measure_failover(
    client: Client, processes: list[local.Process], layout: local.LocalLayout
) -> float:
    leader = client.status().leader_id
    victim = next(p for p in processes if p.name == leader)
    killed_at = time.perf_counter()
    os.kill(victim.popen.pid, signal.SIGKILL)
    victim.popen.wait(timeout=10)
    while True:
        try:
            client.submit_specs([spec()])  # started after the kill
            break
        except ClientError:
            continue  # the client already retried for retry_s; try again
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
