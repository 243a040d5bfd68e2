"""One goml Raft node as a process for bench/peers.py, serving the same line protocol as
bench/hashiraft (the hashicorp/raft peer), so both are measured the same way:

    status                              role, leader, term, indexes (one JSON line)
    write                               propose one payload on this node (fails fast unless leader)
    bench CONCURRENCY SECONDS COUNT      in the leader process: CONCURRENCY proposals in flight
                                        for SECONDS, then COUNT sequential ones on the idle leader

The node is goml.raft.node_main's (build_node: SQLite WAL with synchronous=FULL, gRPC
peers, the key-value state machine, 300-600 ms election timeouts, 50 ms heartbeats) and
`bench` is node_main's `--load-out` workload with a 64-byte command, so the figures are
those of bench/bench_raft.py.

    python bench/goml_node.py --id n1 --peers n1=127.0.0.1:P1,... --control 127.0.0.1:C --data DIR
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
from typing import Any

from goml import event_loop
from goml.raft.demo import KeyValueStateMachine
from goml.raft.node import ProposalLost, ProposalOutcomeUnknown, RaftNode
from goml.raft.node_main import parse_peers
from goml.raft.server import LocalNode, bind_server, build_node
from goml.raft.types import NodeId, ProposalError

PROPOSE_TIMEOUT_S = 5.0
WRITE_TIMEOUT_S = 2.0
CONTROL_LINE_BYTES_MAX = 256
CONCURRENCY_MAX = 4096
BENCH_SECONDS_MAX = 600.0
LATENCY_COUNT_MAX = 100_000
_RETRYABLE = (ProposalError, TimeoutError, ProposalLost, ProposalOutcomeUnknown)


def payload(size_bytes: int) -> bytes:
    """A key-value command of exactly size_bytes bytes."""
    head = b'{"key": "k", "value": "'
    tail = b'"}'
    assert size_bytes >= len(head) + len(tail)
    data = head + b"x" * (size_bytes - len(head) - len(tail)) + tail
    assert len(data) == size_bytes
    return data


class Control:
    def __init__(self, node: RaftNode, data: bytes) -> None:
        self.node = node
        self.data = data

    def status(self) -> dict[str, Any]:
        status = self.node.status()
        keys = ("id", "role", "leader", "term", "commit", "applied", "last_index")
        reply = {key: status.get(key) for key in keys}
        reply.update(ok=True, pid=os.getpid())
        return reply

    async def write(self) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            await self.node.propose(self.data, WRITE_TIMEOUT_S)
        except _RETRYABLE as error:
            return {"ok": False, "error": f"{type(error).__name__}: {error}"}
        return {"ok": True, "ms": (time.perf_counter() - started) * 1000}

    async def bench(self, concurrency: int, seconds: float, count: int) -> dict[str, Any]:
        """node_main's --load-out workload (bench/bench_raft.py), with this payload."""
        node = self.node
        if not node.is_leader:
            return {"ok": False, "error": "not the leader"}
        await node.read_index(PROPOSE_TIMEOUT_S)  # the election's no-op is not counted
        committed = 0
        errors = 0
        stop_at = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal committed, errors
            while time.monotonic() < stop_at:
                try:
                    await node.propose(self.data, PROPOSE_TIMEOUT_S)
                    committed += 1
                except _RETRYABLE:
                    errors += 1

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
        latencies: list[float] = []
        for _ in range(count):
            t = time.perf_counter()
            await node.propose(self.data, PROPOSE_TIMEOUT_S)
            latencies.append((time.perf_counter() - t) * 1000)
        latencies.sort()
        return {
            "ok": True,
            "committed": committed,
            "errors": errors,
            "seconds": elapsed,
            "commits_per_s": committed / elapsed,
            "latency_ms_p50": latencies[len(latencies) // 2],
            "latency_ms_p99": latencies[int(len(latencies) * 0.99)],
        }

    async def request(self, words: list[str]) -> dict[str, Any]:
        if words == ["status"]:
            return self.status()
        if words == ["write"]:
            return await self.write()
        if len(words) == 4 and words[0] == "bench":
            try:
                concurrency, seconds, count = int(words[1]), float(words[2]), int(words[3])
            except ValueError as error:
                return {"ok": False, "error": str(error)}
            if not (
                1 <= concurrency <= CONCURRENCY_MAX
                and 0 < seconds <= BENCH_SECONDS_MAX
                and 1 <= count <= LATENCY_COUNT_MAX
            ):
                return {"ok": False, "error": "bench arguments out of range"}
            return await self.bench(concurrency, seconds, count)
        return {"ok": False, "error": f"unknown request {words!r}"}

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                if len(line) > CONTROL_LINE_BYTES_MAX:
                    return
                try:
                    reply = await self.request(line.decode().split())
                except _RETRYABLE as error:
                    # e.g. the leader lost its term mid-bench on a loaded machine: say so,
                    # rather than closing the connection without a reason
                    reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return  # the harness went away, or sent a line over the limit
        finally:
            writer.close()


async def run(args: argparse.Namespace) -> int:
    peers: dict[NodeId, str] = args.peers
    if args.id not in peers:
        raise SystemExit(f"--id {args.id} is not in --peers {sorted(peers)}")
    host, _, port = peers[args.id].rpartition(":")
    server, _ = bind_server(host, int(port), None, insecure=True)
    secret = os.environ.get("GOML_RAFT_SECRET", "bench-secret").encode()
    node = build_node(
        args.id, peers, args.data, server, KeyValueStateMachine(), "goml-bench", secret, None, True
    )
    local = LocalNode(node, server, int(port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await local.start()
    control = Control(node, payload(args.payload_bytes))
    control_host, _, control_port = args.control.rpartition(":")
    control_server = await asyncio.start_server(
        control.serve, control_host, int(control_port), limit=CONTROL_LINE_BYTES_MAX * 4
    )
    try:
        await stop.wait()
    finally:
        control_server.close()
        await local.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--id", required=True)
    parser.add_argument("--peers", required=True, type=parse_peers, help="n1=HOST:PORT,...")
    parser.add_argument("--control", required=True, help="HOST:PORT for the line protocol")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--payload-bytes", type=int, default=64)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format=f"%(asctime)s {args.id} %(name)s %(levelname)s %(message)s",
    )
    return event_loop.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
