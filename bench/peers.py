"""Benchmark: goml's Raft beside hashicorp/raft and etcd, built and run in one run, with the
ratios goml/peer in one table at the end. Numbers, not a pass/fail test.

Every system runs as 3 processes on loopback with fsync'd logs and 64-byte writes:
  goml          bench/goml_node.py: goml's node (SQLite WAL, synchronous=FULL, gRPC peers,
                election timeouts 300-600 ms, heartbeat 50 ms)
  hashicorp     bench/hashiraft: hashicorp/raft 1.7.3, TCP transport, raft-boltdb/v2 (bbolt
                fsyncs every append), file snapshots; HeartbeatTimeout = ElectionTimeout =
                LeaderLeaseTimeout = 300 ms, the closest it allows to goml's 300-600 ms
                (ElectionTimeout >= HeartbeatTimeout >= LeaderLeaseTimeout). Its follower
                timer fires every 300-600 ms and only then compares the last contact with
                300 ms, so a dead leader is noticed 300 ms to about 1.2 s after its last
                heartbeat (goml and etcd: 300-600 ms); the leader heartbeats every 30-60 ms
  etcd          etcd 3.7.3 built from its Go modules in bench/etcdbench (or Debian's
                etcd-server with --etcd-from apt), --heartbeat-interval 50
                --election-timeout 300; once more with client and peer TLS

Measured on each:
  (a) commits/s with 64 writes in flight for --seconds;
  (b) lone write latency p50/p99 over --latency-count sequential writes on the idle leader;
  (c) failover: kill -9 of the leader (its process group, by PID), then the time until a
      write submitted after the kill is applied; median and worst of --trials.

goml and hashicorp/raft run the load in the leader process (as bench/bench_raft.py does):
each node serves a small line protocol (status / write / bench) that the harness drives.
etcd has no in-process API: etcd's own Go client (bench/etcdbench/load, one gRPC
connection per member) serves the same line protocol, so etcd's figures include one
loopback gRPC hop per write and no Python. For (c) the harness sends a write to every
surviving node every 10 ms, each on its own connection (non-leaders refuse at once; etcd
followers forward), and takes the first acknowledgement: the figure is up to 10 ms late.
goml's API as a client sees it (mutual TLS) comes from bench/bench_control.py, run here too.

Builds are cached under ~/.cache/goml/bench/ (keyed by the sources and the Go version);
without Go (or apt-get download), that peer is skipped with one line saying why.

    python bench/peers.py [--only goml,hashicorp,etcd,control] [--seconds 5] [--trials 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "goml" / "bench"
GO_FALLBACK = Path("/usr/local/go/bin/go")
ETCD_VERSION = "3.7.3"
HASHICORP_VERSION = "1.7.3"
START_TIMEOUT_S = 60.0
CONVERGE_TIMEOUT_S = 60.0
FAILOVER_TIMEOUT_S = 30.0
ATTEMPT_EVERY_S = 0.010
ATTEMPT_TIMEOUT_S = 3.0
STOP_TIMEOUT_S = 10.0
SYSTEMS = ("goml", "hashicorp", "etcd", "control")

Address = tuple[str, int]


class Skip(Exception):
    """A toolchain or download is missing: the peer is skipped, the others go on."""


# ------------------------------------------------------------------ the line protocol


def ask(address: Address, line: str, timeout_s: float) -> dict[str, Any]:
    """One request line, one JSON reply line, on a new connection."""
    with socket.create_connection(address, timeout=timeout_s) as sock:
        sock.sendall(line.encode() + b"\n")
        with sock.makefile("rb") as reader:
            reply = reader.readline()
    if not reply:
        raise ConnectionError(f"{address}: closed without a reply to {line!r}")
    value: dict[str, Any] = json.loads(reply)
    return value


def try_ask(address: Address, line: str, timeout_s: float) -> dict[str, Any] | None:
    try:
        return ask(address, line, timeout_s)
    except (OSError, ValueError):
        return None


async def ask_async(address: Address, line: str, timeout_s: float) -> tuple[bool, float]:
    """(acknowledged, when the reply arrived) for one write attempt."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(*address)
            try:
                writer.write(line.encode() + b"\n")
                reply = await reader.readline()
            finally:
                writer.close()
        replied_at = time.perf_counter()
        return bool(reply) and bool(json.loads(reply).get("ok")), replied_at
    except (OSError, TimeoutError, ValueError):
        return False, time.perf_counter()


async def first_acknowledged(targets: list[tuple[Address, str]], timeout_s: float) -> float:
    """Send every target's write line every ATTEMPT_EVERY_S, each on its own connection;
    return when the first acknowledgement arrived (perf_counter)."""
    acknowledged: list[float] = []
    pending: set[asyncio.Task[None]] = set()

    async def attempt(address: Address, line: str) -> None:
        ok, replied_at = await ask_async(address, line, ATTEMPT_TIMEOUT_S)
        if ok:
            acknowledged.append(replied_at)

    give_up_at = time.perf_counter() + timeout_s
    try:
        while not acknowledged:
            if time.perf_counter() > give_up_at:
                raise TimeoutError(f"no write acknowledged within {timeout_s:.0f} s")
            for address, line in targets:
                task = asyncio.create_task(attempt(address, line))
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.sleep(ATTEMPT_EVERY_S)
        return min(acknowledged)
    finally:
        for task in list(pending):
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


# ------------------------------------------------------------------ processes


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Member:
    """One process, started in its own process group and stopped by that PID."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.popen is None or self.popen.poll() is not None, f"{self.name} runs"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.env,
                cwd=self.log_path.parent,
            )

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill9(self) -> None:
        assert self.popen is not None and self.alive, f"{self.name} is not running"
        os.killpg(self.popen.pid, signal.SIGKILL)

    def reap(self) -> None:
        assert self.popen is not None
        self.popen.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return  # never started, or exited and reaped: its PID may belong to another now
        for signum, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signum)
            try:
                self.popen.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def log_tail(self, lines: int = 15) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def wait_until(what: str, check: Callable[[], Any], timeout_s: float, members: list[Member]) -> Any:
    """Poll `check` until it returns something true; fail early if a member died."""
    deadline = time.monotonic() + timeout_s
    problem = f"not within {timeout_s:.0f} s"
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        dead = [m.name for m in members if m.popen is not None and m.popen.poll() is not None]
        if dead:
            problem = f"{', '.join(dead)} exited"
            break
        time.sleep(0.02)  # polling other processes: nothing to wait on locally
    tails = "\n".join(f"--- {m.name} ({m.log_path})\n{m.log_tail()}" for m in members)
    raise RuntimeError(f"{what}: {problem}\n{tails}")


# ------------------------------------------------------------------ the clusters


@dataclass
class Cluster:
    """Three Raft processes and how to ask them things. Subclasses say how."""

    label: str
    members: list[Member]
    helpers: list[Member] = field(default_factory=list)

    def statuses(self) -> dict[str, dict[str, Any] | None]:
        raise NotImplementedError

    def bench_request(
        self, leader: str, concurrency: int, seconds: float, count: int
    ) -> tuple[Address, str]:
        raise NotImplementedError

    def write_request(self, member: str) -> tuple[Address, str]:
        raise NotImplementedError

    def member(self, name: str) -> Member:
        return next(m for m in self.members if m.name == name)

    def leader(self) -> str | None:
        """The leader every running member agrees on, or None."""
        statuses = self.statuses()
        running = [m.name for m in self.members if m.alive]
        replies = [statuses[name] for name in running]
        leaders = {reply["leader"] if reply else None for reply in replies}
        if len(leaders) != 1:
            return None
        leader = leaders.pop()
        return leader if leader in running else None

    def converged(self) -> str | None:
        """The leader, once all members run, agree on it and have applied the same index."""
        if not all(m.alive for m in self.members):
            return None
        statuses = self.statuses()
        if any(s is None for s in statuses.values()):
            return None
        leaders = {s["leader"] for s in statuses.values() if s}
        applied = {s["applied"] for s in statuses.values() if s}
        if len(leaders) != 1 or len(applied) != 1:
            return None
        leader = leaders.pop()
        return leader if leader in statuses else None

    @contextlib.contextmanager
    def running(self) -> Iterator[Cluster]:
        try:
            for process in [*self.members, *self.helpers]:
                process.start()
            wait_until(f"{self.label}: a leader", self.converged, START_TIMEOUT_S, self.all())
            yield self
        finally:
            for process in [*self.helpers, *self.members]:
                process.stop()

    def all(self) -> list[Member]:
        return [*self.members, *self.helpers]


@dataclass
class NodeCluster(Cluster):
    """goml or hashicorp/raft: every node serves the line protocol itself."""

    controls: dict[str, Address] = field(default_factory=dict)

    def statuses(self) -> dict[str, dict[str, Any] | None]:
        return {
            m.name: try_ask(self.controls[m.name], "status", 1.0) if m.alive else None
            for m in self.members
        }

    def bench_request(
        self, leader: str, concurrency: int, seconds: float, count: int
    ) -> tuple[Address, str]:
        return self.controls[leader], f"bench {concurrency} {seconds} {count}"

    def write_request(self, member: str) -> tuple[Address, str]:
        return self.controls[member], "write"


@dataclass
class EtcdCluster(Cluster):
    """etcd: the load tool (one clientv3 connection per member) serves the line protocol."""

    control: Address = ("127.0.0.1", 0)

    def statuses(self) -> dict[str, dict[str, Any] | None]:
        reply = try_ask(self.control, "status", 2.0)
        members = reply["members"] if reply else [None] * len(self.members)
        by_id = {m["id"]: i for i, m in enumerate(members) if m and m.get("ok")}
        result: dict[str, dict[str, Any] | None] = {}
        for member, status in zip(self.members, members, strict=True):
            if not member.alive or not status or not status.get("ok"):
                result[member.name] = None
                continue
            index = by_id.get(status["leader"])
            leader = self.members[index].name if index is not None else None
            result[member.name] = {"leader": leader, "applied": status["index"]}
        return result

    def bench_request(
        self, leader: str, concurrency: int, seconds: float, count: int
    ) -> tuple[Address, str]:
        index = self.members.index(self.member(leader))
        return self.control, f"bench {index} {concurrency} {seconds} {count}"

    def write_request(self, member: str) -> tuple[Address, str]:
        return self.control, f"write {self.members.index(self.member(member))}"


def node_cluster(
    label: str, workdir: Path, argv: Callable[[str, str, str, Path], list[str]]
) -> NodeCluster:
    ids = ["n1", "n2", "n3"]
    ports = free_ports(6)
    peers = ",".join(f"{i}=127.0.0.1:{p}" for i, p in zip(ids, ports[:3], strict=True))
    controls = {i: ("127.0.0.1", p) for i, p in zip(ids, ports[3:], strict=True)}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    members = [
        Member(
            i,
            argv(i, peers, f"127.0.0.1:{controls[i][1]}", workdir / i),
            workdir / "logs" / f"{i}.log",
            env,
        )
        for i in ids
    ]
    return NodeCluster(label, members, controls=controls)


def goml_cluster(workdir: Path) -> NodeCluster:
    def argv(node_id: str, peers: str, control: str, data: Path) -> list[str]:
        script = str(BENCH / "goml_node.py")
        args = ["--id", node_id, "--peers", peers, "--control", control, "--data", str(data)]
        return [sys.executable, script, *args]

    return node_cluster("goml", workdir, argv)


def hashicorp_cluster(workdir: Path, binary: Path) -> NodeCluster:
    def argv(node_id: str, peers: str, control: str, data: Path) -> list[str]:
        return [
            str(binary),
            "-id",
            node_id,
            "-peers",
            peers,
            "-control",
            control,
            "-data",
            str(data),
            "-heartbeat-timeout",
            "300ms",
            "-election-timeout",
            "300ms",
            "-leader-lease-timeout",
            "300ms",
        ]

    return node_cluster(f"hashicorp/raft {HASHICORP_VERSION}", workdir, argv)


def etcd_cluster(
    label: str, workdir: Path, etcd: Path, load: Path, certs: Path | None
) -> EtcdCluster:
    names = ["n1", "n2", "n3"]
    ports = free_ports(7)
    scheme = "https" if certs else "http"
    clients = [f"{scheme}://127.0.0.1:{p}" for p in ports[0:3]]
    peer_urls = [f"{scheme}://127.0.0.1:{p}" for p in ports[3:6]]
    initial = ",".join(f"{n}={u}" for n, u in zip(names, peer_urls, strict=True))
    members = []
    for name, client_url, peer_url in zip(names, clients, peer_urls, strict=True):
        argv = [
            str(etcd),
            "--name",
            name,
            "--data-dir",
            str(workdir / name),
            "--listen-client-urls",
            client_url,
            "--advertise-client-urls",
            client_url,
            "--listen-peer-urls",
            peer_url,
            "--initial-advertise-peer-urls",
            peer_url,
            "--initial-cluster",
            initial,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            f"goml-bench-{ports[0]}",
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "300",
            "--log-level",
            "warn",
        ]
        if certs:
            for prefix, auth in (("", "--client-cert-auth"), ("peer-", "--peer-client-cert-auth")):
                argv += [
                    f"--{prefix}cert-file",
                    str(certs / f"{name}.pem"),
                    f"--{prefix}key-file",
                    str(certs / f"{name}.key"),
                    f"--{prefix}trusted-ca-file",
                    str(certs / "ca.pem"),
                    auth,
                ]
        members.append(Member(name, argv, workdir / "logs" / f"{name}.log"))
    control = ("127.0.0.1", ports[6])
    load_argv = [str(load), "-endpoints", ",".join(clients), "-control", f"127.0.0.1:{ports[6]}"]
    if certs:
        load_argv += ["-cacert", str(certs / "ca.pem"), "-cert", str(certs / "client.pem")]
        load_argv += ["-key", str(certs / "client.key")]
    helper = Member("load", load_argv, workdir / "logs" / "load.log")
    return EtcdCluster(label, members, [helper], control=control)


# ------------------------------------------------------------------ measurements


@dataclass
class Figures:
    label: str
    short: str = ""
    commits_per_s: float | None = None
    latency_ms_p50: float | None = None
    latency_ms_p99: float | None = None
    failovers_s: list[float] = field(default_factory=list)
    errors: int = 0
    note: str = ""

    @property
    def failover_s_median(self) -> float | None:
        return statistics.median(self.failovers_s) if self.failovers_s else None

    @property
    def failover_s_worst(self) -> float | None:
        return max(self.failovers_s) if self.failovers_s else None


def measure(cluster: Cluster, args: argparse.Namespace, trials: int) -> Figures:
    figures = Figures(cluster.label)
    with cluster.running():
        leader = wait_until(
            "a settled leader", cluster.converged, CONVERGE_TIMEOUT_S, cluster.all()
        )
        address, line = cluster.bench_request(
            leader, args.concurrency, args.seconds, args.latency_count
        )
        result = ask(address, line, args.seconds + 120)
        if not result.get("ok"):
            raise RuntimeError(f"{cluster.label}: bench failed: {result.get('error')}")
        figures.commits_per_s = result["commits_per_s"]
        figures.latency_ms_p50 = result["latency_ms_p50"]
        figures.latency_ms_p99 = result["latency_ms_p99"]
        figures.errors = result["errors"]
        print(
            f"  {cluster.label}: {result['commits_per_s']:.0f} commits/s "
            f"({result['committed']} in {result['seconds']:.1f} s, {result['errors']} errors), "
            f"lone p50 {result['latency_ms_p50']:.2f} ms, p99 {result['latency_ms_p99']:.2f} ms",
            flush=True,
        )
        for trial in range(trials):
            figures.failovers_s.append(failover(cluster, args.settle_seconds))
            print(f"    failover {trial + 1}/{trials}: {figures.failovers_s[-1]:.3f} s", flush=True)
    return figures


def failover(cluster: Cluster, settle_s: float) -> float:
    wait_until("converged before the kill", cluster.converged, CONVERGE_TIMEOUT_S, cluster.all())
    time.sleep(settle_s)  # an idle, steady leader
    leader = wait_until(
        "a leader before the kill", cluster.leader, CONVERGE_TIMEOUT_S, cluster.all()
    )
    victim = cluster.member(leader)
    targets = [cluster.write_request(m.name) for m in cluster.members if m is not victim]
    killed_at = time.perf_counter()
    victim.kill9()
    acknowledged_at = asyncio.run(first_acknowledged(targets, FAILOVER_TIMEOUT_S))
    victim.reap()
    victim.start()  # from its data directory; it catches up before the next trial
    return acknowledged_at - killed_at


# ------------------------------------------------------------------ builds


def go_tool() -> str | None:
    found = shutil.which("go")
    if found:
        return found
    return str(GO_FALLBACK) if GO_FALLBACK.is_file() else None


def go_build(module: Path, packages: list[str], binaries: list[str]) -> dict[str, Path]:
    """`go build` the packages of `module` into a cache dir keyed by the sources and the Go
    version; a second run reuses it."""
    go = go_tool()
    if go is None:
        raise Skip(f"Go is missing (no `go` on PATH nor {GO_FALLBACK}) to build {module.name}")
    version = subprocess.run([go, "version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256(version.encode())
    sources = sorted(
        p for p in module.rglob("*") if p.suffix == ".go" or p.name in ("go.mod", "go.sum")
    )
    for path in sources:
        digest.update(str(path.relative_to(module)).encode() + b"\0" + path.read_bytes() + b"\0")
    out = CACHE / f"{module.name}-{digest.hexdigest()[:16]}"
    paths = {name: out / name for name in binaries}
    if all(p.is_file() for p in paths.values()):
        print(f"  {module.name}: cached build {out}", flush=True)
        return paths
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{module.name}-", dir=CACHE))
    started = time.monotonic()
    print(f"  {module.name}: go build {' '.join(packages)} (first run only) ...", flush=True)
    try:
        try:
            subprocess.run([go, "build", "-o", f"{tmp}/", *packages], cwd=module, check=True)
        except subprocess.CalledProcessError as error:
            raise Skip(
                f"`go build` in {module} failed (exit {error.returncode}, output above): "
                "no Go module proxy, or the sources do not build"
            ) from error
        for name in binaries:
            assert (tmp / name).is_file(), f"go build made no {name}"
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"  {module.name}: built in {time.monotonic() - started:.0f} s into {out}", flush=True)
    return paths


def debian_etcd() -> Path:
    """Debian's etcd-server, fetched with `apt-get download` and unpacked (no root install)."""
    root = CACHE / "debian-etcd-server"
    binary = root / "root" / "usr" / "bin" / "etcd"
    if binary.is_file():
        print(f"  etcd-server: cached {binary}", flush=True)
        return binary
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise Skip(f"`{tool}` is missing to fetch Debian's etcd-server")
    debs = root / "deb"
    debs.mkdir(parents=True, exist_ok=True)
    try:
        # As root, apt hands the download to its _apt user, who cannot write to ~/.cache.
        sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
        subprocess.run(["apt-get", *sandbox, "download", "etcd-server"], cwd=debs, check=True)
    except subprocess.CalledProcessError as error:
        raise Skip(f"`apt-get download etcd-server` failed ({error.returncode})") from error
    deb = max(debs.glob("etcd-server_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root / "root")], check=True)
    assert binary.is_file(), f"{deb} has no usr/bin/etcd"
    return binary


# ------------------------------------------------------------------ report


def fmt(value: float | None, spec: str) -> str:
    width = int(spec.split(".")[0])
    return format(value, spec) if value is not None else f"{'-':>{width}}"


def ratio(a: float | None, b: float | None) -> str:
    return f"x{a / b:.2f}" if a is not None and b else "-"


def table(rows: list[Figures], pairs: list[tuple[Figures, Figures]]) -> None:
    if not rows:
        print("nothing was measured")
        return
    columns = ("commits/s", "p50 ms", "p99 ms", "fail med s", "fail max s")
    width = max(len(r.label) for r in rows) + 2
    print(f"{'':{width}}" + "".join(f"{c:>12}" for c in columns))
    for r in rows:
        print(
            f"{r.label:{width}}{fmt(r.commits_per_s, '12.0f')}{fmt(r.latency_ms_p50, '12.2f')}"
            f"{fmt(r.latency_ms_p99, '12.2f')}{fmt(r.failover_s_median, '12.3f')}"
            f"{fmt(r.failover_s_worst, '12.3f')}"
        )
    if pairs:
        print("ratios goml / peer (commits/s: above 1 is goml faster; the rest: below 1 is)")
    for mine, peer in pairs:
        cells = [
            ratio(mine.commits_per_s, peer.commits_per_s),
            ratio(mine.latency_ms_p50, peer.latency_ms_p50),
            ratio(mine.latency_ms_p99, peer.latency_ms_p99),
            ratio(mine.failover_s_median, peer.failover_s_median),
            ratio(mine.failover_s_worst, peer.failover_s_worst),
        ]
        label = f"{mine.short} / {peer.short}"
        print(f"{label:{width}}" + "".join(f"{c:>12}" for c in cells))
    for r in rows:
        if r.note:
            print(f"{r.label}: {r.note}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--only", default=",".join(SYSTEMS), help=", ".join(SYSTEMS))
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-count", type=int, default=200)
    parser.add_argument("--trials", type=int, default=20, help="failovers per system")
    parser.add_argument("--settle-seconds", type=float, default=0.5, help="idle before a kill")
    parser.add_argument("--etcd-from", choices=["go", "apt"], default="go")
    parser.add_argument("--no-tls", action="store_true", help="skip etcd over TLS")
    parser.add_argument("--workdir", type=Path, default=None, help="keep data and logs here")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so every `finally` stops its processes by PID.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    only = set(args.only.split(","))
    if not only <= set(SYSTEMS):
        parser.error(f"--only takes {', '.join(SYSTEMS)}")
    started = time.monotonic()
    load_before = os.getloadavg()
    found: dict[str, Figures] = {}
    skipped: list[str] = []
    print(
        f"3 processes on loopback, fsync'd logs, {args.concurrency} writes of 64 bytes in "
        f"flight for {args.seconds:g} s, {args.latency_count} lone writes, {args.trials} "
        f"kill -9 failovers; load average before: {loadavg(load_before)}",
        flush=True,
    )
    runs: dict[str, tuple[str, Callable[[Path], dict[str, Figures]]]] = {
        "goml": ("goml", lambda workdir: {"goml": run_goml(args, workdir)}),
        "hashicorp": (
            "hashicorp/raft",
            lambda workdir: {"hashicorp": run_hashicorp(args, workdir)},
        ),
        "etcd": ("etcd", lambda workdir: run_etcd(args, workdir)),
        "control": ("goml API", lambda workdir: {"control": run_control(args)}),
    }
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="goml-bench-peers-") as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        for key, (name, run) in runs.items():
            if key not in only:
                continue
            try:
                found.update(run(workdir))
            except Skip as why:
                skipped.append(f"SKIP {name}: {why}")
                print(skipped[-1], flush=True)
            except Exception as error:  # one system failing does not hide the others
                traceback.print_exc()
                failed.append(f"FAILED {name}: {str(error).splitlines()[0]}")
                print(failed[-1], flush=True)
    load_after = os.getloadavg()
    wanted = [("goml", "hashicorp"), ("goml", "etcd"), ("control", "etcd-tls"), ("control", "etcd")]
    pairs = [(found[a], found[b]) for a, b in wanted if a in found and b in found]
    print()
    table(list(found.values()), pairs)
    for line in [*skipped, *failed]:
        print(line)
    print(
        f"whole run {time.monotonic() - started:.0f} s; load average before {loadavg(load_before)}, "
        f"after {loadavg(load_after)} ({os.cpu_count()} CPUs)"
    )
    return 1 if failed else 0


def loadavg(values: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in values)


def run_goml(args: argparse.Namespace, workdir: Path) -> Figures:
    figures = measure(goml_cluster(workdir / "goml"), args, args.trials)
    figures.label, figures.short = "goml 0.1 (Raft, in leader)", "goml"
    return figures


def run_hashicorp(args: argparse.Namespace, workdir: Path) -> Figures:
    binary = go_build(BENCH / "hashiraft", ["."], ["hashiraft"])["hashiraft"]
    figures = measure(hashicorp_cluster(workdir / "hashicorp", binary), args, args.trials)
    figures.label = f"hashicorp/raft {HASHICORP_VERSION} (in leader)"
    figures.short = "hashicorp"
    return figures


def run_etcd(args: argparse.Namespace, workdir: Path) -> dict[str, Figures]:
    built = go_build(BENCH / "etcdbench", ["./etcd", "./load"], ["etcd", "load"])
    etcd = debian_etcd() if args.etcd_from == "apt" else built["etcd"]
    out = subprocess.run([str(etcd), "--version"], capture_output=True, text=True, timeout=30)
    version = out.stdout.split()[2] if out.stdout.startswith("etcd Version:") else "?"
    name = f"etcd {version}"
    found = {}
    cluster = etcd_cluster(name, workdir / "etcd", etcd, built["load"], None)
    found["etcd"] = measure(cluster, args, args.trials)
    found["etcd"].label, found["etcd"].short = f"{name} (gRPC, Go client)", "etcd"
    if not args.no_tls:
        from goml.cluster.certs import init_certs

        certs = workdir / "etcd-tls-certs"
        init_certs(certs, ["n1", "n2", "n3"], ["127.0.0.1", "localhost"])
        cluster = etcd_cluster(f"{name} TLS", workdir / "etcd-tls", etcd, built["load"], certs)
        found["etcd-tls"] = measure(cluster, args, 0)
        found["etcd-tls"].label = f"{name} (gRPC, mutual TLS)"
        found["etcd-tls"].short = "etcd TLS"
    return found


def run_control(args: argparse.Namespace) -> Figures:
    """goml's API over mutual TLS, as a client sees it: bench/bench_control.py."""
    sys.path.insert(0, str(BENCH))
    import bench_control

    print("  goml API (bench/bench_control.py):", flush=True)
    defaults = bench_control.parser().parse_args([])
    result = bench_control.measure(defaults.submits, defaults.batch, defaults.batches, args.trials)
    bench_control.report(result)
    return Figures(
        "goml 0.1 API (client, mutual TLS)",
        short="goml API",
        latency_ms_p50=result["latency_ms_p50"],
        latency_ms_p99=result["latency_ms_p99"],
        failovers_s=result["failovers_s"],
        note=(
            f"{result['tasks_per_s']:.0f} tasks/s in batches of {result['batch']} (not comparable "
            "with commits/s); latency = one submit; failover = until a submit after the kill "
            "is acknowledged, through goml's client and its retries"
        ),
    )


if __name__ == "__main__":
    raise SystemExit(main())
