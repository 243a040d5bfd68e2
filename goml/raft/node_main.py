"""One Raft node as a process: `python -m goml.raft.node_main --id n1 --peers ... --data DIR`.

Used by the kill -9 tests and the benchmark. The node runs a key-value state machine
(goml.raft.demo.KeyValueStateMachine) and, with `--status-file`, rewrites its status
as JSON every `--status-interval-ms` (atomically), so a parent process can watch it.

Workloads run on the node while it leads (no client protocol needed):
- `--load-out FILE`: the benchmark. Throughput with `--load-concurrency` proposers for
  `--load-seconds`, then `--latency-count` sequential proposals on the idle leader;
  results are written to FILE as JSON.
- `--acked-file FILE`: propose `key-N` values with `--load-concurrency` proposers and
  append each acknowledged key to FILE (flushed) as soon as it is acknowledged.

SIGTERM or SIGINT stops the node cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from goml import event_loop
from goml.raft.demo import KeyValueStateMachine
from goml.raft.node import NodeStopped, ProposalLost, ProposalOutcomeUnknown, RaftNode
from goml.raft.server import LocalNode, bind_server, build_node
from goml.raft.types import NodeId, ProposalError

log = logging.getLogger("goml.raft.node_main")


def parse_peers(text: str) -> dict[NodeId, str]:
    peers: dict[NodeId, str] = {}
    for item in text.split(","):
        node_id, sep, address = item.strip().partition("=")
        if not sep or not node_id or not address:
            raise argparse.ArgumentTypeError(f"bad peer {item!r}: expected ID=HOST:PORT")
        peers[node_id] = address
    return peers


def _write_json_atomic(path: Path, value: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


async def _status_loop(node: RaftNode, path: Path, interval_s: float) -> None:
    while True:
        status = node.status()
        status["pid"] = os.getpid()
        status["time"] = time.time()
        _write_json_atomic(path, status)
        await asyncio.sleep(interval_s)


_RETRYABLE = (ProposalError, TimeoutError, ProposalLost, ProposalOutcomeUnknown)


async def _bench(node: RaftNode, args: argparse.Namespace) -> None:
    await node.wait_for(lambda: node.is_leader, 600.0)
    # Let the election's no-op commit first so it is not counted as a proposal.
    await node.read_index(5.0)
    payload = b'{"key": "k", "value": 0}'
    committed = 0
    errors = 0
    stop_at = time.monotonic() + args.load_seconds

    async def worker() -> None:
        nonlocal committed, errors
        while time.monotonic() < stop_at:
            try:
                await node.propose(payload, 5.0)
                committed += 1
            except _RETRYABLE:
                errors += 1

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(args.load_concurrency)))
    elapsed = time.monotonic() - started
    latencies: list[float] = []
    for _ in range(args.latency_count):
        t = time.perf_counter()
        await node.propose(payload, 5.0)
        latencies.append((time.perf_counter() - t) * 1000)
    latencies.sort()
    result = {
        "committed": committed,
        "errors": errors,
        "seconds": elapsed,
        "commits_per_s": committed / elapsed,
        "latency_ms_p50": latencies[len(latencies) // 2] if latencies else None,
        "latency_ms_p99": latencies[int(len(latencies) * 0.99)] if latencies else None,
        "status": node.status(),
    }
    _write_json_atomic(args.load_out, result)


async def _acked_load(node: RaftNode, args: argparse.Namespace) -> None:
    await node.wait_for(lambda: node.is_leader, 600.0)
    counter = 0
    with open(args.acked_file, "a", buffering=1) as acked:

        async def worker() -> None:
            nonlocal counter
            while node.running and node.is_leader and not args.load_stop_file.exists():
                counter += 1
                key = f"{args.id}-{os.getpid()}-{counter}"
                try:
                    await node.propose(json.dumps({"key": key, "value": counter}).encode(), 5.0)
                except _RETRYABLE:
                    continue
                except NodeStopped:
                    return
                acked.write(key + "\n")
                acked.flush()

        await asyncio.gather(*(worker() for _ in range(args.load_concurrency)))


async def run(args: argparse.Namespace) -> int:
    peers: dict[NodeId, str] = args.peers
    if args.id not in peers:
        raise SystemExit(f"--id {args.id} is not in --peers {sorted(peers)}")
    secret = os.environ.get(args.secret_env, "").encode()
    if not secret:
        raise SystemExit(f"set the cluster secret in ${args.secret_env}")
    if not args.insecure:
        raise SystemExit("TLS certificates are not wired into node_main yet: pass --insecure")
    host, _, port = peers[args.id].rpartition(":")
    server, _ = bind_server(host, int(port), None, insecure=True)
    node = build_node(
        args.id,
        peers,
        args.data,
        server,
        KeyValueStateMachine(),
        args.cluster_id,
        secret,
        None,
        insecure=True,
    )
    local = LocalNode(node, server, int(port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await local.start()
    tasks: list[asyncio.Task[None]] = []
    if args.status_file:
        tasks.append(
            asyncio.create_task(
                _status_loop(node, args.status_file, args.status_interval_ms / 1000)
            )
        )
    if args.load_out:
        tasks.append(asyncio.create_task(_bench(node, args)))
    if args.acked_file:
        tasks.append(asyncio.create_task(_acked_load(node, args)))
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await local.stop()
        if args.status_file:
            status = node.status()
            status["pid"] = os.getpid()
            status["stopped"] = True
            _write_json_atomic(args.status_file, status)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--id", required=True)
    parser.add_argument("--peers", required=True, type=parse_peers, help="n1=HOST:PORT,...")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--cluster-id", default="goml")
    parser.add_argument("--secret-env", default="GOML_RAFT_SECRET")
    parser.add_argument("--insecure", action="store_true", help="plaintext gRPC (local only)")
    parser.add_argument("--status-file", type=Path, default=None)
    parser.add_argument("--status-interval-ms", type=int, default=100)
    parser.add_argument("--load-out", type=Path, default=None)
    parser.add_argument("--load-seconds", type=float, default=5.0)
    parser.add_argument("--load-concurrency", type=int, default=64)
    parser.add_argument("--latency-count", type=int, default=200)
    parser.add_argument("--acked-file", type=Path, default=None)
    parser.add_argument(
        "--load-stop-file",
        type=Path,
        default=Path("/nonexistent/stop"),
        help="the --acked-file workload stops once this file exists",
    )
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format=f"%(asctime)s {args.id} %(name)s %(levelname)s %(message)s",
    )
    try:
        return event_loop.run(run(args))
    except event_loop.EventLoopError as error:
        print(f"node_main {args.id}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
