"""Benchmark: goml's Raft runtime against PySyncObj 0.3.17, side by side, in one run.

Both run as three real processes on loopback with durable logs (goml: SQLite WAL,
synchronous=FULL; PySyncObj: its journal file, default batched mode, password set).
On each, the leader measures in-process:
  (a) throughput: commits/s with 64 proposals in flight for ~5 s;
  (b) latency: p50/p99 of 200 sequential proposals on the idle leader.

    python bench/bench_raft.py [--seconds 5] [--concurrency 64] [--latency-count 200]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret"


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def _wait_for_result(
    paths: list[Path], procs: list[subprocess.Popen[bytes]], timeout_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for path in paths:
            if path.exists():
                result: dict[str, Any] = json.loads(path.read_text())
                return result
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"node process {proc.pid} exited with {proc.returncode}")
        time.sleep(0.05)  # polling a file written by another process
    raise TimeoutError(f"no benchmark result within {timeout_s} s")


def run_goml(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    ids = ["n1", "n2", "n3"]
    ports = free_ports(3)
    peers = ",".join(f"{i}=127.0.0.1:{p}" for i, p in zip(ids, ports, strict=True))
    env = dict(os.environ, GOML_RAFT_SECRET=SECRET, PYTHONPATH=str(ROOT))
    outs = [workdir / f"goml-{i}.json" for i in ids]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for node_id, out in zip(ids, outs, strict=True):
            cmd = [
                sys.executable,
                "-m",
                "goml.raft.node_main",
                "--id",
                node_id,
                "--peers",
                peers,
                "--data",
                str(workdir / f"goml-{node_id}"),
                "--insecure",
                "--load-out",
                str(out),
                "--load-seconds",
                str(args.seconds),
                "--load-concurrency",
                str(args.concurrency),
                "--latency-count",
                str(args.latency_count),
            ]
            if args.profile:
                cmd[1:1] = ["-m", "cProfile", "-o", str(workdir / f"goml-{node_id}.prof")]
            procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT))
        return _wait_for_result(outs, procs, args.seconds + 40)
    finally:
        _stop_all(procs)


# ------------------------------------------------------------------ PySyncObj


def pysyncobj_node(args: argparse.Namespace) -> None:
    from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjException, replicated

    class Counter(SyncObj):  # type: ignore[misc]
        def __init__(self, self_address: str, partners: list[str], conf: Any) -> None:
            super().__init__(self_address, partners, conf)
            self.value = 0

        @replicated  # type: ignore[misc]
        def incr(self) -> int:
            self.value += 1
            return self.value

    conf = SyncObjConf(password=SECRET, journalFile=args.journal, dynamicMembershipChange=False)
    counter = Counter(args.self_address, args.partners.split(","), conf)
    deadline = time.monotonic() + 30
    while counter._getLeader() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    give_up_at = time.monotonic() + 600
    while True:
        if os.path.exists(args.done):
            return  # another node led and measured
        if time.monotonic() > give_up_at:
            raise TimeoutError("this node neither led nor saw another node's result in 600 s")
        if not counter._isLeader():
            time.sleep(0.05)  # followers just serve until the parent stops them
            continue
        try:
            counter.incr(sync=True, timeout=10)  # let the leader's first entries commit
            break
        except SyncObjException:
            continue  # leadership changed while settling (a loaded machine): wait again
    lock = threading.Lock()
    in_flight = threading.Semaphore(args.concurrency)
    stats = {"committed": 0, "errors": 0}

    def on_done(result: Any, error: Any) -> None:
        with lock:
            if error == FAIL_REASON.SUCCESS:
                stats["committed"] += 1
            else:
                stats["errors"] += 1
        in_flight.release()

    started = time.monotonic()
    stop_at = started + args.seconds
    while time.monotonic() < stop_at:
        if in_flight.acquire(timeout=0.5):
            counter.incr(callback=on_done)
    for _ in range(args.concurrency):  # wait for the stragglers
        in_flight.acquire(timeout=10)
    elapsed = time.monotonic() - started
    latencies: list[float] = []
    for _ in range(args.latency_count):
        t = time.perf_counter()
        counter.incr(sync=True, timeout=10)
        latencies.append((time.perf_counter() - t) * 1000)
    latencies.sort()
    result = {
        "committed": stats["committed"],
        "errors": stats["errors"],
        "seconds": elapsed,
        "commits_per_s": stats["committed"] / elapsed,
        "latency_ms_p50": latencies[len(latencies) // 2],
        "latency_ms_p99": latencies[int(len(latencies) * 0.99)],
    }
    tmp = args.out + ".tmp"
    Path(tmp).write_text(json.dumps(result))
    os.replace(tmp, args.out)
    Path(args.done).write_text("done")
    counter.destroy()


def run_pysyncobj(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    ports = free_ports(3)
    addresses = [f"127.0.0.1:{p}" for p in ports]
    outs = [workdir / f"pso-{i}.json" for i in range(3)]
    done = workdir / "pso-done"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, address in enumerate(addresses):
            partners = ",".join(a for a in addresses if a != address)
            cmd = [
                sys.executable,
                __file__,
                "--pysyncobj-node",
                "--self-address",
                address,
                "--partners",
                partners,
                "--journal",
                str(workdir / f"pso-{i}.journal"),
                "--out",
                str(outs[i]),
                "--done",
                str(done),
                "--seconds",
                str(args.seconds),
                "--concurrency",
                str(args.concurrency),
                "--latency-count",
                str(args.latency_count),
            ]
            procs.append(subprocess.Popen(cmd, cwd=workdir))
        return _wait_for_result(outs, procs, args.seconds + 60)
    finally:
        _stop_all(procs)


def main() -> int:
    parser = argparse.ArgumentParser(description="goml vs PySyncObj Raft benchmark")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-count", type=int, default=200)
    parser.add_argument("--only", choices=["goml", "pysyncobj"], default=None)
    parser.add_argument("--profile", action="store_true", help="cProfile the goml nodes")
    parser.add_argument("--workdir", type=Path, default=None)
    # internal: one PySyncObj node
    parser.add_argument("--pysyncobj-node", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--self-address", help=argparse.SUPPRESS)
    parser.add_argument("--partners", help=argparse.SUPPRESS)
    parser.add_argument("--journal", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--done", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pysyncobj_node:
        pysyncobj_node(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="goml-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        results: dict[str, dict[str, Any]] = {}
        if args.only in (None, "goml"):
            results["goml"] = run_goml(args, workdir)
        if args.only in (None, "pysyncobj"):
            results["pysyncobj"] = run_pysyncobj(args, workdir)
    print(
        f"3 processes on loopback, fsync'd logs, {args.concurrency} proposals in flight "
        f"for {args.seconds:g} s, then {args.latency_count} sequential proposals"
    )
    print(f"{'':12}{'commits/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    for name, r in results.items():
        print(
            f"{name:12}{r['commits_per_s']:12.0f}{r['latency_ms_p50']:10.2f}"
            f"{r['latency_ms_p99']:10.2f}{r['errors']:8d}"
        )
    if len(results) == 2:
        g, p = results["goml"], results["pysyncobj"]
        print(
            f"goml / pysyncobj: throughput x{g['commits_per_s'] / p['commits_per_s']:.2f}, "
            f"p50 latency x{g['latency_ms_p50'] / p['latency_ms_p50']:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
