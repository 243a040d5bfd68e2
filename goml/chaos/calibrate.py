"""`goml chaos calibrate`: measure, on this machine and with goml's real components, what
the simulator's cost model needs (`costs:`, goml.scenario.schema.Costs), and write it as
a calibration file a scenario names with `costs_file:` (or pastes as its `costs:`).

What is measured, and with what:
- `fsync_ms`: one durable write of the real SQLite store (goml.raft.sqlite_store: WAL,
  synchronous=FULL), one entry and a hard state per write, as a node persists, in the
  directory given (the disk the nodes' data lives on).
- `hop_ms`: one Raft message from the real peer transport (goml.raft.transport: one
  HMAC-authenticated gRPC stream, mutual TLS with certificates from goml.cluster.certs)
  to the real servicer of another grpc.aio server over loopback, one at a time, from
  `send` to the servicer's callback: TLS, HTTP/2 framing, protobuf both ways and both
  event loops; through a Toxiproxy proxy (no toxics) when its binary is found, as the
  chaos runner's links are (the straight hop is then in the file's comments).
- `append_ms`, `message_ms`, `api_call_ms`: the production node core
  (goml.cluster.node_core.NodeCore), timed around each input it takes (a Raft message
  with entries, any other message, an API call or a forwarded answer) and the
  ready/advance work that follows it, while the simulator drives a short run of the
  reference scenario; then shifted, kind by kind, so that the mean is what a real node
  process spends on a CPU per input (`measure_process_cpu`: three real nodes, the CPU
  of their threads from /proc, idle, under Status calls and under submits). The core
  alone is a tenth of that or less: gRPC, TLS, protobuf, asyncio and SQLite take the
  rest, and that is what makes processes on a shared host queue behind each other.
  `--core-only` keeps the core's own time (the calibration before 2026-12-01).
- `api_hop_ms`: half of one real API round trip (`goml.client.Client.get` of a task)
  to a real one-node cluster on loopback, mutual TLS and token: a unary gRPC call costs
  more than a Raft message on an open stream.
- `dispatch_ms`: one trivial task (`matmul` n=2) through the real agent task runner
  (goml.agent.runner: warm forkserver workers), from `run` to its outcome.
- `isolated_dispatch_ms`: the same with `isolated=True`: a fresh process for the task.
- `cores`: os.cpu_count(): a local cluster's processes all share this host.

Each figure is written as a log-normal with the measured median and 99th percentile,
and the file's comments carry the raw quantiles. On a loaded machine every figure is
higher than on a quiet one: the file says the load average it was measured under.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import random
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Protocol

import grpc
import grpc.aio
import yaml

from goml.chaos.server import find_binary, toxiproxy_server
from goml.chaos.toxiproxy import Toxiproxy
from goml.client import Client
from goml.cluster.certs import SECRET_FILE, credentials, init_certs, read_secret
from goml.cluster.config import RaftTiming
from goml.cluster.local import free_ports, prepare, running_cluster, wait_for_leader
from goml.cluster.node_core import NodeCore
from goml.proto import api_pb2
from goml.raft.convert import Limits
from goml.raft.sqlite_store import SqliteStorage
from goml.raft.transport import (
    PeerTransport,
    RaftPeerServicer,
    add_insecure_or_secure_port,
    default_transport_config,
    grpc_options,
)
from goml.raft.types import Entry, HardState, Message, MessageType

CLUSTER_ID = "calibrate"
HOP_TIMEOUT_S = 10.0  # one message; far above any loopback hop
CONNECT_TIMEOUT_S = 20.0
CORE_RUN_S = 10  # simulated seconds of the reference scenario the core is timed over
ENTRY_BYTES = 256  # about a SubmitTasks entry of one task
MEDIAN_MS_MIN = 0.001  # schema.LOGNORMAL_MEDIAN_MS_MIN


@dataclass(frozen=True)
class Measured:
    """One cost: its samples in milliseconds and where they came from."""

    name: str
    samples_ms: list[float]
    how: str

    def quantile(self, q: float) -> float:
        ordered = sorted(self.samples_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def distribution(self) -> dict[str, Any]:
        median = max(MEDIAN_MS_MIN, statistics.median(self.samples_ms))
        p99 = max(median, self.quantile(0.99))
        return {"kind": "lognormal", "median_ms": round(median, 4), "p99_ms": round(p99, 4)}

    def comment(self) -> str:
        q = self.quantile
        return (
            f"{self.name}: {len(self.samples_ms)} samples, p50 {statistics.median(self.samples_ms):.3f}"
            f" p90 {q(0.9):.3f} p99 {q(0.99):.3f} max {max(self.samples_ms):.3f} ms ({self.how})"
        )


# --------------------------------------------------------------------------- fsync


def measure_fsync(directory: Path, samples: int) -> Measured:
    """Durable writes of the real SQLite store in `directory`."""
    took: list[float] = []
    with (
        tempfile.TemporaryDirectory(prefix="goml-calibrate-", dir=directory) as tmp,
        SqliteStorage(Path(tmp) / "store.db") as store,
    ):
        data = b"x" * ENTRY_BYTES
        for index in range(1, samples + 1):
            entry = Entry(index=index, term=1, data=data)
            state = HardState(term=1, vote="", commit=index - 1)
            started = time.perf_counter()
            store.persist(None, (entry,), state, True)
            took.append((time.perf_counter() - started) * 1000)
    return Measured("fsync_ms", took, f"SQLite store in {directory}")


# --------------------------------------------------------------------------- hop


async def _hop(certs: Path, samples: int, proxy: Toxiproxy | None) -> list[float]:
    secret = read_secret(certs / SECRET_FILE).encode()  # as the daemon reads it
    voters = ("n1", "n2")
    arrived: asyncio.Queue[float] = asyncio.Queue()

    def on_messages(messages: list[Message]) -> None:
        for _ in messages:
            arrived.put_nowait(time.perf_counter())

    limits = Limits(
        entries_per_message_max=64,
        entry_size_bytes_max=1 << 20,
        snapshot_size_bytes_max=1 << 20,
        context_size_bytes_max=256,
    )
    servicer = RaftPeerServicer("n2", CLUSTER_ID, secret, voters, limits, on_messages)
    server = grpc.aio.server(options=grpc_options())
    servicer.add_to_server(server)
    node = credentials(certs, "n2")
    ca, cert, key = node.read()
    server_credentials = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )
    port = add_insecure_or_secure_port(
        server, f"127.0.0.1:{free_ports(1)[0]}", server_credentials, False
    )
    await server.start()
    target = f"127.0.0.1:{port}"
    if proxy is not None:  # as the chaos runner puts one on every link
        listen = f"127.0.0.1:{free_ports(1)[0]}"
        target = proxy.create_proxy("calibrate-hop", listen, target).listen
    peer = credentials(certs, "n1")
    ca, cert, key = peer.read()
    channel_credentials = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    transport = PeerTransport(
        default_transport_config("n1", CLUSTER_ID, secret),
        {"n2": "localhost:" + target.rpartition(":")[2]},
        channel_credentials,
        False,
        random.Random(0),
    )
    transport.start()
    took: list[float] = []
    try:
        heartbeat = Message(MessageType.HEARTBEAT, "n1", "n2", term=1)
        # The first message waits for the connection and the TLS handshake: not a hop.
        transport.send(heartbeat)
        await asyncio.wait_for(arrived.get(), CONNECT_TIMEOUT_S)
        for _ in range(samples):
            sent = time.perf_counter()
            transport.send(heartbeat)
            got = await asyncio.wait_for(arrived.get(), HOP_TIMEOUT_S)
            took.append((got - sent) * 1000)
    finally:
        await transport.stop(2.0)
        servicer.close()
        await server.stop(1.0)
    return took


def measure_hop(samples: int, proxy: Toxiproxy | None = None) -> Measured:
    """One-way Raft messages between two real gRPC endpoints with mutual TLS, straight
    over loopback or through a Toxiproxy proxy (no toxics)."""
    with tempfile.TemporaryDirectory(prefix="goml-calibrate-certs-") as tmp:
        certs = Path(tmp)
        init_certs(certs, ["n1", "n2"], ["localhost", "127.0.0.1"])
        took = asyncio.run(_hop(certs, samples, proxy))
    via = "through Toxiproxy" if proxy is not None else "loopback"
    return Measured("hop_ms", took, f"raft transport, mutual TLS, {via}")


# --------------------------------------------------------------------------- node core


_INPUTS = ("step", "request", "forwarded")
_FOLLOW_UPS = ("ready", "advance")


@contextlib.contextmanager
def _timed_core(samples: dict[str, list[float]]) -> Iterator[None]:
    """Time NodeCore's inputs (and the ready/advance work after each) while inside.
    Class attributes are replaced for the duration only, and always restored."""
    originals: dict[str, Callable[..., Any]] = {
        name: getattr(NodeCore, name) for name in _INPUTS + _FOLLOW_UPS
    }
    last: list[str] = []  # the kind of the latest input: its follow-ups are added to it

    def kind_of(name: str, args: tuple[Any, ...]) -> str:
        if name != "step":
            return "api_call_ms"
        message = args[0]
        assert isinstance(message, Message)
        return "append_ms" if message.carries_data else "message_ms"

    def timed(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: NodeCore, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            result = original(self, *args, **kwargs)
            took = (time.perf_counter() - started) * 1000
            if name in _INPUTS:
                kind = kind_of(name, args)
                samples[kind].append(took)
                last[:] = [kind]
            elif last:
                samples[last[0]][-1] += took
            return result

        return wrapper

    try:
        for name, original in originals.items():
            setattr(NodeCore, name, timed(name, original))
        yield
    finally:
        for name, original in originals.items():
            setattr(NodeCore, name, original)


def measure_core() -> list[Measured]:
    """The production node core's time per input, over a short simulated run."""
    from goml.scenario.loader import load_scenario_text
    from goml.sim.simulation import run_scenario

    data = yaml.safe_load((files("goml.scenario") / "reference.yaml").read_text())
    data["duration_s"] = CORE_RUN_S
    if isinstance(data.get("workload"), dict):
        data["workload"]["stop_s"] = CORE_RUN_S - 1
    data.pop("expectations", None)
    scenario = load_scenario_text(yaml.safe_dump(data), "reference (calibrate)").scenario
    samples: dict[str, list[float]] = {"append_ms": [], "message_ms": [], "api_call_ms": []}
    with _timed_core(samples):
        run_scenario(scenario, 1)
    how = "node core, driven by the simulator"
    return [Measured(name, taken, how) for name, taken in samples.items() if taken]


# --------------------------------------------------------------------------- process CPU


def _process_cpu_ms(pid: int) -> float:
    """CPU time of every thread of `pid` so far, in ms: /proc/PID/task/*/schedstat's
    first field (ns on a CPU). /proc/PID/stat counts in 10 ms ticks: too coarse here."""
    total_ns = 0
    for thread in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            total_ns += int(Path(f"/proc/{pid}/task/{thread}/schedstat").read_text().split()[0])
    return total_ns / 1e6


@dataclass(frozen=True)
class ProcessCpu:
    """A real node process's CPU per input, each a mean in ms (see `measure_process_cpu`)."""

    message_ms: float
    append_ms: float
    api_call_ms: float
    load: float

    def add_to(self, core: Measured) -> Measured:
        """`core`'s samples (the node core's own time per input, with its spread) plus
        what the real process spends around the core per input of that kind (the mean
        difference): gRPC, TLS and asyncio cost about the same for every message, so
        they shift the distribution rather than stretch it."""
        real_ms = {"message_ms": self.message_ms, "append_ms": self.append_ms}
        real_ms["api_call_ms"] = self.api_call_ms
        around_ms = max(0.0, real_ms[core.name] - statistics.fmean(core.samples_ms))
        how = (
            f"the node core's own time + {around_ms:.3f} ms: a real node process's CPU per"
            f" input, {real_ms[core.name]:.3f} ms on average (/proc schedstat)"
        )
        return Measured(core.name, [x + around_ms for x in core.samples_ms], how)


def measure_process_cpu(calls: int, window_s: float = 3.0) -> ProcessCpu:
    """What a real node process spends on a CPU per input, gRPC, TLS, protobuf, asyncio
    and SQLite included (the node core alone is a tenth of it or less): three node
    processes on loopback with mutual TLS (started here, stopped by PID), the CPU of
    every thread of each read from /proc:
    - `message_ms`: a follower of an idle cluster over a window, per heartbeat it gets
      (its timers and housekeeping ride on them, as they take its core in turn);
    - `api_call_ms`: the leader, per Status call beyond its idle rate;
    - `append_ms`: each follower, per submit (one APPEND with the entry) beyond its idle
      rate.
    Means, not distributions: `ProcessCpu.add_to` gives them the core's spread."""
    heartbeat_ms = RaftTiming().heartbeat_interval_ms
    with tempfile.TemporaryDirectory(prefix="goml-calibrate-cpu-") as tmp:
        layout = prepare(Path(tmp), 3, insecure=False)
        with running_cluster(layout) as processes:
            leader = wait_for_leader(layout.profile, CONNECT_TIMEOUT_S)
            pids = {p.name: p.popen.pid for p in processes}
            followers = [name for name in pids if name != leader]
            load = os.getloadavg()[0]

            def cpu() -> dict[str, float]:
                return {name: _process_cpu_ms(pid) for name, pid in pids.items()}

            with Client(layout.profile, call_timeout_s=HOP_TIMEOUT_S) as client:
                for _ in range(20):  # channels open, leader known, start-up work done
                    client.status()
                # A measurement window of the idle cluster, not a synchronisation.
                before, started = cpu(), time.perf_counter()
                time.sleep(window_s)
                after, idle_s = cpu(), time.perf_counter() - started
                idle_rate = {n: (after[n] - before[n]) / idle_s for n in pids}  # ms per s

                def per_call(call: Callable[[], object]) -> dict[str, float]:
                    before, started = cpu(), time.perf_counter()
                    for _ in range(calls):
                        call()
                    after, took_s = cpu(), time.perf_counter() - started
                    return {
                        n: max(0.0, after[n] - before[n] - idle_rate[n] * took_s) / calls
                        for n in pids
                    }

                status = per_call(client.status)
                submit = per_call(
                    lambda: client.submit_specs(
                        [api_pb2.TaskSpec(function="matmul", idempotency_key=_key())]
                    )
                )
            load = max(load, os.getloadavg()[0])
    heartbeats_per_s = 1000 / heartbeat_ms
    return ProcessCpu(
        message_ms=statistics.fmean(idle_rate[n] for n in followers) / heartbeats_per_s,
        append_ms=statistics.fmean(submit[n] for n in followers),
        api_call_ms=status[leader],
        load=load,
    )


_keys = random.Random(0)  # submit keys only; nothing depends on their values


def _key() -> str:
    return f"calibrate-{_keys.getrandbits(64):016x}"


# --------------------------------------------------------------------------- API hop


def measure_api_hop(samples: int) -> Measured:
    """Half of one real API round trip: `goml.client.Client.get` of a task on a real
    one-node cluster (a node process started here and stopped by PID), mutual TLS and a
    token, as the chaos runner's clients call. A read answers from the node's manifest,
    so no fsync is in it; the node core's own share (`api_call_ms`, about a tenth of a
    millisecond) is counted again by the simulator, which is within the noise."""

    took: list[float] = []
    with tempfile.TemporaryDirectory(prefix="goml-calibrate-api-") as tmp:
        layout = prepare(Path(tmp), 1, insecure=False)
        with running_cluster(layout):
            wait_for_leader(layout.profile, CONNECT_TIMEOUT_S)
            with Client(layout.profile, call_timeout_s=HOP_TIMEOUT_S) as client:
                (task_id,) = client.submit_specs([api_pb2.TaskSpec(function="matmul")])
                for i in range(samples + 1):
                    started = time.perf_counter()
                    client.get(task_id)
                    if i:  # the first call also opens the channel
                        took.append((time.perf_counter() - started) * 1000 / 2)
    return Measured("api_hop_ms", took, "half an API round trip, mutual TLS, loopback")


# --------------------------------------------------------------------------- dispatch


async def _dispatch(samples: int, isolated: bool) -> list[float]:
    from goml.agent.runner import TaskRunner

    runner = TaskRunner(result_bytes_max=10_000, runs_max=1, kill_wait_ms=5000)
    took: list[float] = []
    try:
        await runner.warm_up()
        for i in range(samples + 1):
            started = time.perf_counter()
            outcome = await runner.run(
                f"calibrate-{i}", "matmul", '{"n": 2}', 10_000, isolated=isolated
            )
            if not outcome.ok:
                raise RuntimeError(f"the task runner failed a trivial task: {outcome}")
            if i:  # the first task also warms the worker's imports
                took.append((time.perf_counter() - started) * 1000)
    finally:
        await runner.close()
    return took


def measure_dispatch(samples: int) -> Measured:
    took = asyncio.run(_dispatch(samples, isolated=False))
    return Measured("dispatch_ms", took, "agent task runner, warm worker")


def measure_isolated_dispatch(samples: int) -> Measured:
    took = asyncio.run(_dispatch(samples, isolated=True))
    return Measured("isolated_dispatch_ms", took, "agent task runner, a fresh process")


# --------------------------------------------------------------------------- the file


def calibrate(
    out: Path,
    data_dir: Path,
    fsync_samples: int = 300,
    hop_samples: int = 300,
    dispatch_samples: int = 50,
    say: Callable[[str], None] = print,
    via_toxiproxy: bool = True,
    process_cpu: bool = True,
) -> dict[str, Any]:
    """Measure everything, write the calibration file `out`, return its `costs:`.
    `via_toxiproxy`: measure the hop through a Toxiproxy proxy, as the chaos runner's
    links are, when its binary is found (never installed from here). `process_cpu`:
    add to the node core's times per input what a real node process spends around it."""
    load = os.getloadavg()[0]
    measured: list[Measured] = []
    notes: list[str] = []
    say(f"fsync of the SQLite store in {data_dir} ({fsync_samples} writes) ...")
    measured.append(measure_fsync(data_dir, fsync_samples))
    say(f"raft hop with mutual TLS over loopback ({hop_samples} messages) ...")
    direct = measure_hop(hop_samples)
    binary = find_binary() if via_toxiproxy else None
    if binary is None:
        measured.append(direct)
    else:
        # The chaos runner's links go through Toxiproxy: that hop is the one it pays.
        say(f"raft hop through Toxiproxy ({binary}) ...")
        with toxiproxy_server(binary=binary) as proxy:
            measured.append(measure_hop(hop_samples, proxy))
        notes.append(f"without Toxiproxy: {direct.comment()}")
    say(f"node core per input ({CORE_RUN_S} simulated s of the reference scenario) ...")
    core = measure_core()
    if process_cpu:
        say(f"a real node process's CPU per input (3 nodes, {hop_samples} calls each way) ...")
        real = measure_process_cpu(hop_samples)
        load = max(load, real.load)
        notes += [f"node core alone: {c.comment()}" for c in core]
        core = [real.add_to(c) for c in core]
    measured += core
    say(f"API round trip to a real node ({hop_samples} calls) ...")
    measured.append(measure_api_hop(hop_samples))
    say(f"task dispatch on an agent's runner ({dispatch_samples} tasks) ...")
    measured.append(measure_dispatch(dispatch_samples))
    say(f"isolated task dispatch, a fresh process each ({dispatch_samples} tasks) ...")
    measured.append(measure_isolated_dispatch(dispatch_samples))
    load = max(load, os.getloadavg()[0])
    cores = os.cpu_count() or 1
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    where = f"{socket.gethostname()}, {when}, {cores} cores, load avg up to {load:.2f}"
    return write_costs_file(out, measured, notes, where, cores, say)


class Cost(Protocol):
    """One measured cost as the calibration file takes it."""

    @property
    def name(self) -> str: ...

    def distribution(self) -> dict[str, Any]: ...

    def comment(self) -> str: ...


def write_costs_file(
    out: Path,
    measured: Sequence[Cost],
    notes: Sequence[str],
    where: str,
    cores: int | None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write the calibration file `out` (its `costs:` and, as comments, the raw figures
    and `notes`); return the `costs:`. `cores`: None leaves it out (each topology node is
    then a host of its own capacity)."""
    costs: dict[str, Any] = {"measured_on": where}
    for m in measured:
        costs[m.name] = m.distribution()
    if cores is not None:
        costs["cores"] = cores
    lines = [
        "# Written by `goml chaos calibrate`: what goml's real components cost on",
        f"# {where}.",
        "# A scenario uses it with `costs_file: <this file>` (relative to the scenario),",
        "# or pastes the `costs:` section. Raw figures:",
        *(f"#   {m.comment()}" for m in measured),
        *(f"#   {note}" for note in notes),
    ]
    text = "\n".join(lines) + "\n" + yaml.safe_dump({"costs": costs}, sort_keys=False)
    out.write_text(text)
    for m in measured:
        say("  " + m.comment())
    for note in notes:
        say("  " + note)
    return costs
