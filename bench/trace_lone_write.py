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

    node_id = argv[argv.index("--id") + 1]
    events = install_hooks(node_id)
    from goml.raft import node as node_module

    propose = node_module.RaftNode.propose

    async def traced_propose(self: Any, data: bytes, timeout_s: float) -> object:
        events.append((clock(), "propose", 0, ""))
        result = await propose(self, data, timeout_s)
        events.append((clock(), "answered", int(result) if isinstance(result, int) else 0, ""))
        return result

    node_module.RaftNode.propose = traced_propose  # type: ignore[method-assign]
    return int(goml_node.main(argv))


def control_node_main(argv: list[str]) -> int:
    """Run a control-plane node (`goml node run --config FILE`) with the same trace
    points, plus the API call's: the gRPC handler, ControlPlane.call and the proposal's
    index (NodeCore._propose)."""
    sys.path[:0] = [str(ROOT)]
    from goml.cluster import daemon, service
    from goml.cluster import node_core as node_core_module
    from goml.cluster.config import load_node_config

    config_path = Path(argv[argv.index("--config") + 1])
    events = install_hooks(load_node_config(config_path).node_id)

    submit = service.ClientServicer.Submit

    async def traced_submit(self: Any, request: Any, context: Any) -> Any:
        events.append((clock(), "handler", 0, ""))
        try:
            return await submit(self, request, context)
        finally:
            events.append((clock(), "handler_end", 0, ""))

    call = service.ControlPlane.call

    async def traced_call(self: Any, request: Any, admission: Any) -> Any:
        if type(request).__name__ != "SubmitRequest":  # the driver's status calls
            return await call(self, request, admission)
        events.append((clock(), "propose", 0, ""))
        try:
            return await call(self, request, admission)
        finally:
            events.append((clock(), "answered", 0, ""))

    propose = node_core_module.NodeCore._propose

    def traced_propose(self: Any, *args: Any, **kwargs: Any) -> int | None:
        index = propose(self, *args, **kwargs)
        events.append((clock(), "proposed", index or 0, ""))
        return index

    service.ClientServicer.Submit = traced_submit  # type: ignore[method-assign]
    service.ControlPlane.call = traced_call  # type: ignore[method-assign]
    node_core_module.NodeCore._propose = traced_propose  # type: ignore[method-assign]
    return daemon.run(config_path)


clock = time.perf_counter


def install_hooks(node_id: str) -> list[Event]:
    """Wrap the runtime's receive, the transport's send, the store's persist and
    grpc.aio's stream write; the events are written out when the process exits."""
    import grpc.aio._call as grpc_call

    from goml.raft import node as node_module
    from goml.raft import sqlite_store, transport
    from goml.raft.types import Message

    events: list[Event] = []
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

    runtime.receive = traced_receive  # type: ignore[method-assign]
    transport.PeerTransport.send = traced_send  # type: ignore[method-assign]
    sqlite_store.SqliteStorage.persist = traced_persist  # type: ignore[method-assign]
    grpc_call._StreamRequestMixin._write = traced_write
    return events


# ------------------------------------------------------------------ the analysis


def first(events: list[Event], kind: str, index: int, after: float, peer: str = "") -> float:
    for t, k, i, p in events:
        if t >= after and k == kind and i >= index and (not peer or p == peer):
            return t
    return float("nan")


STAGES = (
    ("leader: gRPC handler -> ControlPlane.call", "handler", "propose"),
    ("leader: propose -> appends queued (core)", "propose", "L_send"),
    ("leader: queued -> gRPC write starts", "L_send", "L_write"),
    ("gRPC: leader write -> follower receives", "L_write", "F_recv"),
    ("follower: received -> store thread starts", "F_recv", "F_persist"),
    ("follower: SQLite write + fsync (thread)", "F_persist", "F_persisted"),
    ("follower: fsync done -> answer queued", "F_persisted", "F_send"),
    ("follower: queued -> gRPC write starts", "F_send", "F_write"),
    ("gRPC: follower write -> leader receives", "F_write", "L_recv"),
    ("leader: answer received -> caller answered", "L_recv", "answered"),
    ("leader: answered -> gRPC handler returns", "answered", "handler_end"),
    ("leader: its own SQLite write + fsync (thread)", "L_persist", "L_persisted"),
)


def analyse(traces: dict[str, list[Event]], leader: str, count: int) -> list[dict[str, float]]:
    events = traces[leader]
    proposes = [e for e in events if e[1] == "propose"][-count:]
    answers = [e for e in events if e[1] == "answered"][-count:]
    rows = []
    handlers = [e for e in events if e[1] == "handler"][-count:]
    handler_ends = [e for e in events if e[1] == "handler_end"][-count:]
    for n, ((t0, *_), (t_end, _, index, _)) in enumerate(zip(proposes, answers, strict=True)):
        row = {"propose": t0, "answered": t_end}
        if handlers:  # the control plane: its handler, and the index NodeCore proposed
            row["handler"], row["handler_end"] = handlers[n][0], handler_ends[n][0]
            index = next((i for t, k, i, _ in events if t >= t0 and k == "proposed"), 0)
        row["index"] = float(index)
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
        values = sorted(
            v for v in (stage(r, a, b) for r in rows if a in r and b in r) if v == v and v >= 0
        )
        if values:
            p90 = values[min(len(values) - 1, len(values) * 9 // 10)]
            print(f"{label:48}{statistics.median(values):8.3f}{p90:8.3f}")
    totals = sorted(stage(r, "propose", "answered") for r in rows)
    print(f"{'lone write, proposal to answer':48}{statistics.median(totals):8.3f}", end="")
    print(f"{totals[len(totals) * 9 // 10]:8.3f}")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--node":
        return node_main(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "--control-node":
        return control_node_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--count", type=int, default=300, help="lone writes traced")
    parser.add_argument("--workdir", type=Path, default=None, help="keep data and traces here")
    parser.add_argument(
        "--control-plane",
        action="store_true",
        help="trace lone Submit calls of goml.client.Client on a 3-node mutual-TLS control "
        "plane (goml node run) instead of bench/goml_node.py's bare Raft",
    )
    args = parser.parse_args()
    if not 1 <= args.count <= 100_000:
        parser.error("--count takes 1 to 100000")
    if args.control_plane:
        return control_plane_main(args.count, args.workdir)
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


def control_plane_main(count: int, workdir_arg: Path | None) -> int:
    import uuid

    from goml.client import Client
    from goml.cluster import local
    from goml.proto import api_pb2

    def spec() -> api_pb2.TaskSpec:
        return api_pb2.TaskSpec(
            function="matmul",
            args_json='{"n": 4, "m": 4, "k": 4}',
            resources=api_pb2.Resources(cpu=0.1, memory_mb=16),
            max_attempts=1,
            timeout_ms=10_000,
            idempotency_key=str(uuid.uuid4()),
        )

    with tempfile.TemporaryDirectory(prefix="goml-trace-cp-") as tmp:
        workdir = (workdir_arg or Path(tmp)).resolve()
        traces_dir = workdir / "traces"
        traces_dir.mkdir(parents=True, exist_ok=True)
        os.environ[TRACE_ENV] = str(traces_dir)
        layout = local.prepare(workdir / "cluster", nodes=3, insecure=False)
        script = str(Path(__file__).resolve())
        processes = []
        try:
            for name, path in sorted(layout.node_configs.items()):
                argv = [sys.executable, script, "--control-node", "--config", str(path)]
                log_path = layout.data_dir / "logs" / f"{name}.log"
                processes.append(local.spawn(name, argv, log_path))
            local.wait_for_leader(layout.profile, timeout_s=30)
            with Client(layout.profile, retry_s=30) as client:
                for _ in range(50):  # warm up channels and the leader's caches
                    client.submit_specs([spec()])
                leader = client.status().leader_id
                latencies = []
                for _ in range(count):
                    started = time.perf_counter()
                    client.submit_specs([spec()])
                    latencies.append((time.perf_counter() - started) * 1000)
        finally:
            local.stop_all(processes)  # SIGTERM: each node writes its trace as it exits
        traces = {
            p.stem: [tuple(e) for e in json.loads(p.read_text())] for p in traces_dir.iterdir()
        }
        if set(traces) != {"n1", "n2", "n3"}:
            raise SystemExit(f"traces from {sorted(traces)} only (did a node crash?)")
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(
            f"{count} lone Submit calls (goml.client.Client, one task) on a 3-node mutual-TLS "
            f"control plane (loopback, fsync on); client p50 {statistics.median(latencies):.2f} "
            f"ms; load {load}"
        )
        rows = analyse(traces, leader, count)
        report(rows)
        outside = sorted(
            latency - (row["handler_end"] - row["handler"]) * 1000
            for latency, row in zip(latencies, rows, strict=True)
        )
        print(f"{'client + gRPC, outside the leader handler':48}{statistics.median(outside):8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
