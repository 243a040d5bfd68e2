"""CPU cost per task and per idle second, per process, on a real local cluster (3 nodes,
agents, mutual TLS, production defaults).

CPU time (utime + stime from /proc/<pid>/stat), not wall time: on a shared, loaded
machine wall time measures the neighbours, while the CPU a process spends on a fixed
amount of work does not depend much on them. Printed per process: the leader, each
follower, each agent (its own process, then its task workers and forkserver), and
this client process (submits and status polls).

    python bench/cpu_per_task.py [--agents 2] [--tasks 1000] [--batch 50] [--lone 0]
                                 [--idle-seconds 0] [--py-spy leader,agent-1 --py-spy-dir DIR]

`--py-spy` samples the named processes (leader, follower, agent-N) with py-spy during
the timed round (collapsed stacks, `--nonblocking`), for `bench/cpu_per_task.py`'s
reader to aggregate; py-spy must be on PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

# The figures and helpers bench_agent.py measures with (this script runs beside it).
from bench_agent import (
    CLK_TCK,
    START_TIMEOUT_S,
    TINY_ARGS,
    group_pids,
    wait_until,
)
from bench_agent import cpu_ticks as ticks

from goml.client import Client
from goml.cluster import local
from goml.proto import api_pb2


def group_others(pgid: int) -> list[int]:
    """The processes of group `pgid` other than its leader (an agent's workers)."""
    return [pid for pid in group_pids(pgid) if pid != pgid]


def snapshot(pids: dict[str, int]) -> dict[str, int]:
    """Ticks of every named process, and of each agent's other processes."""
    out = {}
    for name, pid in pids.items():
        out[name] = ticks(pid)
        if name.startswith("agent"):
            total = 0
            for other in group_others(pid):
                with contextlib.suppress(OSError):  # it just exited
                    total += ticks(other)
            out[f"{name} workers"] = total
    client = os.times()
    out["client (this)"] = round((client.user + client.system) * CLK_TCK)
    return out


def tiny_spec() -> api_pb2.TaskSpec:
    return api_pb2.TaskSpec(
        function="matmul",
        args_json=json.dumps(TINY_ARGS),
        resources=api_pb2.Resources(cpu=1.0, memory_mb=64),
        max_attempts=3,
        timeout_ms=60_000,
        idempotency_key=str(uuid.uuid4()),
    )


def succeeded(client: Client) -> int:
    return int(client.status().tasks_by_state.get("SUCCEEDED", 0))


def round_of(client: Client, count: int, batch: int) -> float:
    target = succeeded(client) + count
    started = time.monotonic()
    for offset in range(0, count, batch):
        client.submit_specs([tiny_spec() for _ in range(min(batch, count - offset))])
    wait_until(f"{target} SUCCEEDED", lambda: succeeded(client) >= target, 600)
    return time.monotonic() - started


def lone_round(client: Client, count: int) -> float:
    started = time.monotonic()
    for _ in range(count):
        [task_id] = client.submit_specs([tiny_spec()])
        task = client.wait(task_id, timeout_s=60)
        assert task.state == api_pb2.SUCCEEDED, task
    return time.monotonic() - started


def report(title: str, before: dict[str, int], after: dict[str, int], per: int, unit: str) -> None:
    print(f"  {title}")
    total = 0.0
    for name in before:
        ms = (after[name] - before[name]) * 1000 / CLK_TCK
        total += ms
        print(f"    {name:22s} {ms / per:8.3f} ms CPU per {unit}   ({ms:8.0f} ms)")
    print(f"    {'total':22s} {total / per:8.3f} ms CPU per {unit}")


def start_py_spy(
    names: list[str], pids: dict[str, int], out_dir: Path
) -> list[subprocess.Popen[bytes]]:
    exe = shutil.which("py-spy")
    if exe is None:
        raise SystemExit("py-spy not on PATH (pip install py-spy)")
    out_dir.mkdir(parents=True, exist_ok=True)
    spies = []
    for name in names:
        path = out_dir / f"{name}.txt"
        spies.append(
            subprocess.Popen(
                [
                    exe,
                    "record",
                    "--pid",
                    str(pids[name]),
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--rate",
                    "200",
                    "--gil",
                    "-o",
                    str(path),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    time.sleep(1.0)  # py-spy attaches; a measurement aid, not a sync
    return spies


def stop_py_spy(spies: list[subprocess.Popen[bytes]]) -> None:
    for spy in spies:
        spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
    for spy in spies:
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--lone", type=int, default=0)
    parser.add_argument("--idle-seconds", type=float, default=0.0)
    parser.add_argument("--py-spy", default="", help="comma-separated: leader,follower,agent-1")
    parser.add_argument("--py-spy-dir", type=Path, default=Path("/tmp/goml-py-spy"))
    args = parser.parse_args()
    print(f"cpu_per_task: load average {os.getloadavg()[0]:.2f}, goml from {local.__file__}")
    with tempfile.TemporaryDirectory(prefix="goml-cpu-") as tmp:
        layout = local.prepare(Path(tmp), nodes=3, insecure=False)
        extra = local.agent_processes(layout, args.agents)
        with (
            local.running_cluster(layout, extra) as processes,
            Client(layout.profile, call_timeout_s=10.0, retry_s=60.0) as client,
        ):
            leader = local.wait_for_leader(layout.profile, timeout_s=START_TIMEOUT_S)
            wanted = {name for name, _ in extra}
            wait_until(
                "agents registered",
                lambda: {a.id for a in client.status().agents if a.state == "ALIVE"} >= wanted,
                START_TIMEOUT_S,
            )
            round_of(client, args.warmup, args.batch)
            leader = client.status().leader_id
            pids: dict[str, int] = {}
            followers = 0
            for process in processes:
                if process.name == leader:
                    pids[f"leader {process.name}"] = process.popen.pid
                elif process.name.startswith("n"):
                    followers += 1
                    pids[f"follower {process.name}"] = process.popen.pid
                else:
                    pids[process.name] = process.popen.pid
            spy_pids = {
                "leader": next(p for n, p in pids.items() if n.startswith("leader")),
                "follower": next(p for n, p in pids.items() if n.startswith("follower")),
                **{n: p for n, p in pids.items() if n.startswith("agent")},
            }
            spies = (
                start_py_spy(args.py_spy.split(","), spy_pids, args.py_spy_dir)
                if args.py_spy
                else []
            )
            try:
                if args.tasks:
                    index = client.status().commit_index
                    before = snapshot(pids)
                    elapsed = round_of(client, args.tasks, args.batch)
                    after = snapshot(pids)
                    entries = client.status().commit_index - index
                    print(
                        f"\n{args.tasks} tiny tasks, batches of {args.batch}, {args.agents} agents:"
                        f" {args.tasks / elapsed:.1f} tasks/s ({elapsed:.2f} s),"
                        f" {entries / args.tasks:.2f} Raft entries per task,"
                        f" load average {os.getloadavg()[0]:.2f}"
                    )
                    report("CPU per task", before, after, args.tasks, "task")
                if args.lone:
                    before = snapshot(pids)
                    elapsed = lone_round(client, args.lone)
                    after = snapshot(pids)
                    print(
                        f"\n{args.lone} lone tasks (submit, wait): {elapsed / args.lone * 1000:.1f} ms"
                        f" each, load average {os.getloadavg()[0]:.2f}"
                    )
                    report("CPU per lone task", before, after, args.lone, "task")
                if args.idle_seconds:
                    time.sleep(2.0)  # let the last reports and heartbeats settle
                    before = snapshot(pids)
                    start = time.monotonic()
                    time.sleep(args.idle_seconds)
                    after = snapshot(pids)
                    window = time.monotonic() - start
                    print(f"\nidle {window:.1f} s, load average {os.getloadavg()[0]:.2f}")
                    for name in before:
                        ms = (after[name] - before[name]) * 1000 / CLK_TCK
                        print(f"    {name:22s} {ms / window / 10:7.3f} % of a core ({ms:.0f} ms)")
            finally:
                stop_py_spy(spies)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
