"""Profile of a lone write in goml's real Raft runtime: where the milliseconds go between
a proposal on the leader and its answer, stage by stage, over COUNT sequential writes.

Three bench/goml_node.py processes on loopback (SQLite WAL with synchronous=FULL, gRPC
peers, as bench/peers.py runs them), each with trace points hooked in from outside
(this script wraps functions of goml.raft.node, goml.raft.transport, the SQLite store and
grpc.aio's stream write; goml itself carries no tracing). Every process stamps events
with time.perf_counter (CLOCK_MONOTONIC, one clock for all processes on a host) and
writes them out when it stops; then each write is followed through the follower whose
answer reached the leader first (the one that committed it).

    python bench/trace_lone_write.py [--count 300] [--workdir DIR]

A profile, not a benchmark: the hooks cost a few microseconds each, and on a loaded
machine every figure moves; compare stages within one run.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TRACE_ENV = "GOML_TRACE_OUT"
Event = tuple[float, str, int, str]  # (perf_counter s, kind, Raft index, peer)


# ------------------------------------------------------------------ in each node


def node_main(argv: list[str]) -> int:
    """Run bench/goml_node.py with trace points hooked into the runtime."""
    sys.path[:0] = [str(ROOT), str(BENCH)]
    import goml_node
    import grpc.aio._call as grpc_call

    from goml.raft import node as node_module
    from goml.raft import sqlite_store, transport
    from goml.raft.types import Message

    events: list[Event] = []
    clock = time.perf_counter
    node_id = argv[argv.index("--id") + 1]
    out = Path(os.environ[TRACE_ENV]) / f"{node_id}.json"

    def dump() -> None:
        out.write_text(json.dumps(events))

    atexit.register(dump)

    def index_of(message: Message) -> int:
        return message.entries[-1].index if message.entries else message.index

    runtime = node_module.NodeRuntime
    receive = runtime.receive

    def traced_receive(self: Any, messages: list[Message]) -> None:
        now = clock()
        for m in messages:
            events.append((now, "recv_" + m.type.name, index_of(m), m.source))
        receive(self, messages)

    send = transport.PeerTransport.send

    def traced_send(self: Any, message: Message) -> bool:
        events.append((clock(), "send_" + message.type.name, index_of(message), message.target))
        return bool(send(self, message))

    persist = sqlite_store.SqliteStorage.persist

    def traced_persist(self: Any, snapshot: Any, entries: Any, hard_state: Any, sync: Any) -> None:
        last = entries[-1].index if entries else 0
        events.append((clock(), "persist_start", last, ""))  # in the store's thread
        persist(self, snapshot, entries, hard_state, sync)
        events.append((clock(), "persist_end", last, ""))

    write = grpc_call._StreamRequestMixin._write

    async def traced_write(self: Any, request: Any) -> None:
        messages = request.messages
        last = max((m.entries[-1].index if m.entries else m.index) for m in messages)
        target = messages[0].target
        events.append((clock(), "grpc_write", last, target))
        await write(self, request)
        events.append((clock(), "grpc_written", last, target))

    propose = node_module.RaftNode.propose

    async def traced_propose(self: Any, data: bytes, timeout_s: float) -> object:
        events.append((clock(), "propose", 0, ""))
        result = await propose(self, data, timeout_s)
        events.append((clock(), "answered", int(result) if isinstance(result, int) else 0, ""))
        return result

    runtime.receive = traced_receive  # type: ignore[method-assign]
    transport.PeerTransport.send = traced_send  # type: ignore[method-assign]
    sqlite_store.SqliteStorage.persist = traced_persist  # type: ignore[method-assign]
    grpc_call._StreamRequestMixin._write = traced_write
    node_module.RaftNode.propose = traced_propose  # type: ignore[method-assign]
    return int(goml_node.main(argv))


# ------------------------------------------------------------------ the analysis


def first(events: list[Event], kind: str, index: int, after: float, peer: str = "") -> float:
    for t, k, i, p in events:
        if t >= after and k == kind and i >= index and (not peer or p == peer):
            return t
    return float("nan")


STAGES = (
    ("leader: propose -> appends queued (core)", "propose", "L_send"),
    ("leader: queued -> gRPC write starts", "L_send", "L_write"),
    ("gRPC: leader write -> follower receives", "L_write", "F_recv"),
    ("follower: received -> store thread starts", "F_recv", "F_persist"),
    ("follower: SQLite write + fsync (thread)", "F_persist", "F_persisted"),
    ("follower: fsync done -> answer queued", "F_persisted", "F_send"),
    ("follower: queued -> gRPC write starts", "F_send", "F_write"),
    ("gRPC: follower write -> leader receives", "F_write", "L_recv"),
    ("leader: answer received -> caller answered", "L_recv", "answered"),
    ("leader: its own SQLite write + fsync (thread)", "L_persist", "L_persisted"),
)


def analyse(traces: dict[str, list[Event]], leader: str, count: int) -> list[dict[str, float]]:
    events = traces[leader]
    proposes = [e for e in events if e[1] == "propose"][-count:]
    answers = [e for e in events if e[1] == "answered"][-count:]
    rows = []
    for (t0, *_), (t_end, _, index, _) in zip(proposes, answers, strict=True):
        row = {"propose": t0, "answered": t_end, "index": float(index)}
        row["L_send"] = first(events, "send_APPEND", index, t0)
        row["L_persist"] = first(events, "persist_start", index, t0)
        row["L_persisted"] = first(events, "persist_end", index, t0)
        # The follower whose answer the leader received first.
        answered_by = min(
            (first(events, "recv_APPEND_RESPONSE", index, t0, f), f) for f in traces if f != leader
        )
        row["L_recv"], follower = answered_by
        f_events = traces[follower]
        row["L_write"] = first(events, "grpc_write", index, t0, follower)
        row["F_recv"] = first(f_events, "recv_APPEND", index, t0)
        row["F_persist"] = first(f_events, "persist_start", index, t0)
        row["F_persisted"] = first(f_events, "persist_end", index, t0)
        row["F_send"] = first(f_events, "send_APPEND_RESPONSE", index, t0)
        row["F_write"] = first(f_events, "grpc_write", index, t0, leader)
        rows.append(row)
    return rows


def report(rows: list[dict[str, float]]) -> None:
    def stage(row: dict[str, float], a: str, b: str) -> float:
        return (row[b] - row[a]) * 1000

    print(f"{'stage (ms)':48}{'p50':>8}{'p90':>8}")
    for label, a, b in STAGES:
        values = sorted(v for v in (stage(r, a, b) for r in rows) if v == v and v >= 0)
        if values:
            p90 = values[min(len(values) - 1, len(values) * 9 // 10)]
            print(f"{label:48}{statistics.median(values):8.3f}{p90:8.3f}")
    totals = sorted(stage(r, "propose", "answered") for r in rows)
    print(f"{'lone write, proposal to answer':48}{statistics.median(totals):8.3f}", end="")
    print(f"{totals[len(totals) * 9 // 10]:8.3f}")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--node":
        return node_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--count", type=int, default=300, help="lone writes traced")
    parser.add_argument("--workdir", type=Path, default=None, help="keep data and traces here")
    args = parser.parse_args()
    if not 1 <= args.count <= 100_000:
        parser.error("--count takes 1 to 100000")
    sys.path.insert(0, str(BENCH))
    import peers

    with tempfile.TemporaryDirectory(prefix="goml-trace-") as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        traces_dir = workdir / "traces"
        traces_dir.mkdir(parents=True, exist_ok=True)
        os.environ[TRACE_ENV] = str(traces_dir)
        script = str(Path(__file__).resolve())

        def argv(node_id: str, peer_list: str, control: str, data: Path) -> list[str]:
            node_args = ["--id", node_id, "--peers", peer_list, "--control", control]
            return [sys.executable, script, "--node", *node_args, "--data", str(data)]

        make: Callable[..., Any] = peers.node_cluster
        cluster = make("goml", workdir, argv)
        with cluster.running():
            leader = peers.wait_until("a leader", cluster.converged, 60, cluster.all())
            result = peers.ask(cluster.controls[leader], f"bench 1 0.2 {args.count}", 300)
            if not result.get("ok"):
                raise SystemExit(f"bench failed: {result.get('error')}")
        traces = {
            p.stem: [tuple(e) for e in json.loads(p.read_text())] for p in traces_dir.iterdir()
        }
        missing = {"n1", "n2", "n3"} - set(traces)
        if missing:
            raise SystemExit(f"no trace from {sorted(missing)} (did a node crash?)")
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(
            f"{args.count} lone writes of 64 bytes on goml's Raft (3 processes, loopback, "
            f"fsync on); in-process p50 {result['latency_ms_p50']:.2f} ms; load {load}"
        )
        report(analyse(traces, leader, args.count))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
