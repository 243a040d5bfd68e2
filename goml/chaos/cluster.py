"""A real local cluster built from a scenario's topology, every link behind its own proxy.

Processes: one control-plane node per `control` node of the topology and one agent per
`agent` node, each a separate process on loopback with TLS and its own data directory.

Links: every directed link between two processes goes through its own Toxiproxy proxy,
so each process gets its own view of addresses:

- node A's `peers` = {A: A's real listen address, B: proxy "A->B" (forwards to B)};
- the agent at X: `control_plane` = {N: proxy "agent@X->N"};
- a workload client at X: `Profile.nodes` = {N: proxy "client@X->N"}.

A proxy "S->D" carries S's connections to D: its `upstream` stream is what S sends to D,
`downstream` what D sends back. So the directed location pair (x, y) of the simulator
("messages from x to y") is the upstream of every proxy from x to y plus the downstream
of every proxy from y to x. The harness itself (leader lookups, the final checks) talks
to the nodes' real addresses: it is an observer, not part of the scenario's network.

Spare control nodes (membership faults): their proxies exist from the start, their
process is prepared when they join (`goml.cluster.membership.prepare_node`: a node
certificate from the cluster CA, a config with `join: true` and the current members as
its peers, each through its own proxy) and started then. The address a joining node is
added with is one proxy to it (the one from the node that leads when it is added): the
members dial it there (a configuration carries one address per member), so links *to* a
joined node carry that proxy's link class and faults. Removed nodes are stopped and their
stores no longer count as replicas.

Where the members run is a `Runtime`: `ProcessRuntime` (here: processes on loopback,
SIGKILL/SIGSTOP) or `goml.chaos.containers.ContainerRuntime` (a container each on a Docker
network, `docker kill`/`docker pause`). A runtime brings its `Addressing` (who dials which
address) and its members; everything else (configs, certificates, proxies, toxics, the
observer) is this module's, the same for both.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import yaml

from goml.api.auth import Identity, Role
from goml.chaos.toxiproxy import Stream, Toxiproxy
from goml.client import Client, ClientError, Profile
from goml.cluster.certs import DEFAULT_ADMIN, TOKENS_FILE, identity_files, init_certs
from goml.cluster.config import (
    Duties,
    NodeFileConfig,
    RaftTiming,
    TlsFiles,
    write_node_config,
)
from goml.cluster.local import client_profile, free_ports
from goml.cluster.membership import prepare_node
from goml.cluster.node_core import AGENT_LEASE_DEPTH_NEW_CLUSTER
from goml.scenario.schema import AnyLink, Scenario

STOP_TIMEOUT_S = 10.0
STATUS_TIMEOUT_S = 0.5
BLACK_HOLE = {"timeout": 0}  # Toxiproxy timeout toxic: hold every byte, never close


class Member(Protocol):
    """A node or agent the cluster may kill, pause and start again (a process or a
    container): `name` is "node:aws-1" or "agent:aws-1"."""

    name: str
    paused: bool

    @property
    def running(self) -> bool: ...


class Addressing(Protocol):
    """Who dials which address: the members (inside the scenario's network), Toxiproxy
    (to reach a node) and the harness on the host (the clients and the observer)."""

    @property
    def cert_hosts(self) -> list[str]:
        """Names and addresses the node certificates must be valid for."""
        ...

    def node_listen(self, name: str) -> str: ...

    def node_upstream(self, name: str) -> str:
        """Where Toxiproxy reaches node `name`."""
        ...

    def node_observed(self, name: str) -> str:
        """Where the harness reaches node `name` directly (no proxy)."""
        ...

    def proxy_listen(self, index: int, host_side: bool) -> str:
        """What Toxiproxy is asked to listen on for the index-th proxy (`host_side`: a
        proxy the harness dials, i.e. a workload client's)."""
        ...

    def proxy_for_members(self, listen: str) -> str:
        """How a member reaches the proxy Toxiproxy says listens on `listen`."""
        ...

    def proxy_for_host(self, listen: str) -> str:
        """How the harness (the workload's clients) reaches a host-side proxy."""
        ...


class Runtime(Protocol):
    """Runs the members: builds them from a goml command line, starts, kills, pauses,
    resumes and stops them; `collect` makes what they left (stores, logs) readable on the
    host under the paths they were given, once they are stopped."""

    @property
    def kind(self) -> str:
        """ "processes" or "containers"."""
        ...

    @property
    def addressing(self) -> Addressing: ...

    @property
    def owns_toxiproxy(self) -> bool:
        """True when the Toxiproxy server is the runtime's own and goes away with it (and
        its proxies with it): they are then not deleted one by one."""
        ...

    def node(self, name: str, goml_args: list[str], data_dir: Path, log_path: Path) -> Member: ...

    def agent(self, name: str, goml_args: list[str], log_path: Path) -> Member: ...

    def start(self, member: Member) -> None: ...

    def kill(self, member: Member) -> None: ...

    def pause(self, member: Member) -> None: ...

    def resume(self, member: Member) -> None: ...

    def stop_all(self, members: list[Member], timeout_s: float) -> None: ...

    def collect(self, members: list[Member]) -> list[str]:
        """After stop_all; returns the problems met (if any)."""
        ...


@dataclass
class ManagedProcess:
    """A node or agent process the cluster may kill, pause and start again."""

    name: str  # "node:aws-1" or "agent:aws-1"
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    paused: bool = False

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None


class LoopbackAddressing:
    """Processes on 127.0.0.1: every party dials the same addresses."""

    def __init__(self, control: list[str]) -> None:
        ports = free_ports(len(control))
        self._nodes = {n: f"127.0.0.1:{ports[i]}" for i, n in enumerate(control)}

    @property
    def cert_hosts(self) -> list[str]:
        return ["127.0.0.1", "localhost"]

    def node_listen(self, name: str) -> str:
        return self._nodes[name]

    def node_upstream(self, name: str) -> str:
        return self._nodes[name]

    def node_observed(self, name: str) -> str:
        return self._nodes[name]

    def proxy_listen(self, index: int, host_side: bool) -> str:
        return "127.0.0.1:0"  # Toxiproxy picks a free port

    def proxy_for_members(self, listen: str) -> str:
        return listen

    def proxy_for_host(self, listen: str) -> str:
        return listen


class ProcessRuntime:
    """Members as local processes: SIGKILL, SIGSTOP/SIGCONT, SIGTERM to stop."""

    kind = "processes"
    owns_toxiproxy = False  # a server given with --toxiproxy-url outlives the run

    def __init__(self, control: list[str], on_spawn: Callable[[int], None] | None = None) -> None:
        self.addressing = LoopbackAddressing(control)
        self.on_spawn = on_spawn

    def node(self, name: str, goml_args: list[str], data_dir: Path, log_path: Path) -> Member:
        return ManagedProcess(f"node:{name}", [sys.executable, "-m", "goml", *goml_args], log_path)

    def agent(self, name: str, goml_args: list[str], log_path: Path) -> Member:
        return ManagedProcess(f"agent:{name}", [sys.executable, "-m", "goml", *goml_args], log_path)

    def start(self, member: Member) -> None:
        process = _process(member)
        if process.running:
            return
        process.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(process.log_path, "ab") as log_file:
            process.popen = subprocess.Popen(
                process.argv,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the runner, which stops us
            )
        process.paused = False
        if self.on_spawn is not None:
            self.on_spawn(process.popen.pid)

    def kill(self, member: Member) -> None:
        """SIGKILL: the process keeps only what it persisted."""
        process = _process(member)
        if process.popen is not None and process.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.popen.pid, signal.SIGKILL)
            process.popen.wait(timeout=STOP_TIMEOUT_S)
        process.paused = False

    def pause(self, member: Member) -> None:
        process = _process(member)
        if process.running and process.popen is not None:
            os.kill(process.popen.pid, signal.SIGSTOP)
            process.paused = True

    def resume(self, member: Member) -> None:
        process = _process(member)
        if process.running and process.popen is not None and process.paused:
            os.kill(process.popen.pid, signal.SIGCONT)
        process.paused = False

    def stop_all(self, members: list[Member], timeout_s: float) -> None:
        """SIGCONT what is paused, SIGTERM everything (in order), wait, SIGKILL the rest."""
        processes = [p for p in map(_process, members) if p.popen is not None]
        for process in processes:
            assert process.popen is not None
            if process.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.popen.pid, signal.SIGCONT)
                    os.kill(process.popen.pid, signal.SIGTERM)
            process.paused = False
        deadline = time.monotonic() + timeout_s
        for process in processes:
            assert process.popen is not None
            try:
                process.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.popen.pid, signal.SIGKILL)
                process.popen.wait(timeout=STOP_TIMEOUT_S)

    def collect(self, members: list[Member]) -> list[str]:
        return []  # the stores and logs are already where the processes wrote them


def _process(member: Member) -> ManagedProcess:
    assert isinstance(member, ManagedProcess), f"{member.name} is not a process"
    return member


@dataclass
class ProxyState:
    """What a proxy should look like; `apply` makes Toxiproxy match it."""

    name: str
    source: str  # location (node name) of the dialling process
    target: str  # node it reaches
    listen: str
    upstream_address: str
    latency: AnyLink | None  # the scenario's link class; None for co-located processes
    override: AnyLink | None = None  # a link_latency fault
    blocked: set[Stream] = field(default_factory=set)  # partition, per stream
    clogged: set[Stream] = field(default_factory=set)
    applied: dict[str, dict[str, float | int]] = field(default_factory=dict)  # toxic -> attrs
    enabled: bool = True
    host_listen: str = ""  # how the harness reaches it (a client proxy; "" for the others)

    def wanted(self) -> tuple[bool, dict[str, tuple[Stream, str, dict[str, float | int]]]]:
        """(enabled, toxic name -> (stream, type, attributes))."""
        toxics: dict[str, tuple[Stream, str, dict[str, float | int]]] = {}
        link = self.override or self.latency
        if link is not None:
            attrs: dict[str, float | int] = {
                "latency": round(link.expected_ms()),
                "jitter": round(link.jitter_ms),
            }
            if attrs["latency"] or attrs["jitter"]:
                toxics["latency-up"] = ("upstream", "latency", attrs)
                toxics["latency-down"] = ("downstream", "latency", attrs)
        enabled = self.blocked != {"upstream", "downstream"}
        for stream in ("upstream", "downstream"):
            # A proxy disabled (cut both ways) refuses connections; a one-way cut or a
            # clog is a black hole on that stream.
            if stream in self.clogged or (enabled and stream in self.blocked):
                toxics[f"hole-{stream}"] = (stream, "timeout", dict(BLACK_HOLE))
        return enabled, toxics


class ChaosCluster:
    """Build (`create`), run and tear down (`stop_all`, `collect`, `delete_proxies`) the
    members and proxies, on a runtime (processes on loopback unless one is given)."""

    def __init__(
        self,
        scenario: Scenario,
        work_dir: Path,
        toxiproxy: Toxiproxy,
        duties: Duties | None = None,
        on_spawn: Callable[[int], None] | None = None,
        runtime: Runtime | None = None,
    ) -> None:
        self.scenario = scenario
        self.work_dir = work_dir.resolve()
        self.toxiproxy = toxiproxy
        self.duties = duties or Duties()
        topology = scenario.topology
        self.control = [n.name for n in topology.control_nodes]  # spares too
        self.voters = [n.name for n in topology.voter_nodes]  # the initial configuration
        self.spares = topology.spare_names
        self.joined: set[str] = set()  # spares started as joining nodes
        self.retired: set[str] = set()  # nodes removed and stopped
        self._template: NodeFileConfig | None = None  # a voter's config, for joiners
        self.agents = [n.name for n in topology.agent_nodes]
        self.locations = topology.node_names
        self.runtime: Runtime = runtime or ProcessRuntime(self.control, on_spawn)
        self.addresses: dict[str, str] = {}  # control node -> address the harness dials
        self.proxies: dict[str, ProxyState] = {}
        self.nodes: dict[str, Member] = {}
        self.agent_processes: dict[str, Member] = {}
        self.data_dirs: dict[str, Path] = {}
        self.profiles: dict[str, Profile] = {}  # client location -> profile through proxies
        self.observer: Profile | None = None  # real addresses: the harness's own view
        self.admin: Profile | None = None  # the same, as the admin (membership changes)
        self._lock = threading.RLock()
        self._created: list[str] = []  # proxy names this cluster created

    # ------------------------------------------------------------------ build

    def create(self, client_locations: list[str]) -> None:
        work = self.work_dir
        certs = work / "certs"
        net = self.runtime.addressing
        # A certificate and token per agent: each may act only as itself.
        # Spares get theirs when they join (prepare_node), as `goml node add` issues one.
        init_certs(certs, self.voters, net.cert_hosts, agents=self.agents)
        self.addresses = {n: net.node_observed(n) for n in self.control}
        # Proxies: node->node, agent@X->N, client@X->N.
        for a in self.control:
            for b in self.control:
                if a != b:
                    self._proxy(f"{a}->{b}", a, b)
        for x in self.agents:
            for n in self.control:
                self._proxy(f"agent@{x}->{n}", x, n)
        for x in sorted(set(client_locations)):
            for n in self.control:
                self._proxy(f"client@{x}->{n}", x, n, host_side=True)
        for state in self.proxies.values():
            self._apply(state)
        raft = self.scenario.raft
        for name in self.control:
            data_dir = work / "nodes" / name
            self.data_dirs[name] = data_dir
            path = work / "config" / f"{name}.yaml"
            self.nodes[name] = self.runtime.node(
                name,
                ["node", "run", "--config", str(path)],
                data_dir,
                work / "logs" / f"{name}.log",
            )
            if name in self.spares:
                continue  # its config is written when it joins
            peers = {
                n: net.node_listen(n) if n == name else self.proxies[f"{name}->{n}"].listen
                for n in self.voters
            }
            config = NodeFileConfig(
                node_id=name,
                listen=net.node_listen(name),
                data_dir=data_dir,
                peers=peers,
                cluster_id=f"chaos-{self.scenario.name}",
                tls=TlsFiles(
                    ca=certs / "ca.pem", cert=certs / f"{name}.pem", key=certs / f"{name}.key"
                ),
                secret_file=certs / "cluster.secret",
                tokens_file=certs / TOKENS_FILE,
                raft=RaftTiming(**raft.model_dump()),  # the same fields, every knob
                duties=self.duties,
                agent_lease_depth_max=AGENT_LEASE_DEPTH_NEW_CLUSTER,
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            write_node_config(path, config)
            self._template = self._template or config
        for x in self.agents:
            node = self.scenario.topology.node(x)
            own = identity_files(certs, Identity(Role.AGENT, x))
            body = {
                "agent_id": x,
                "cloud": node.cloud,
                "region": node.region,
                "capacity": {
                    "cpu": node.capacity.cpu,
                    "memory_mb": node.capacity.memory_mb,
                    "gpu": node.capacity.gpu,
                },
                "control_plane": {n: self.proxies[f"agent@{x}->{n}"].listen for n in self.control},
                "token_file": str(own.token),
                "tls": {
                    "ca_file": str(certs / "ca.pem"),
                    "cert_file": str(own.cert),
                    "key_file": str(own.key),
                },
            }
            path = work / "config" / f"agent-{x}.yaml"
            path.write_text(yaml.safe_dump(body, sort_keys=False))
            self.agent_processes[x] = self.runtime.agent(
                x, ["agent", "run", "--config", str(path)], work / "logs" / f"agent-{x}.log"
            )

        for x in sorted(set(client_locations)):
            self.profiles[x] = client_profile(
                certs, {n: self.proxies[f"client@{x}->{n}"].host_listen for n in self.control}
            )
        self.observer = client_profile(certs, dict(self.addresses))
        admin = identity_files(certs, Identity(Role.ADMIN, DEFAULT_ADMIN))
        assert admin.token is not None
        self.admin = Profile(
            nodes=dict(self.addresses),
            token=admin.token.read_text().strip(),
            ca=certs / "ca.pem",
            cert=admin.cert,
            key=admin.key,
        )

    # ------------------------------------------------------------ membership

    def prepare_joiner(self, name: str, peers: tuple[str, ...]) -> None:
        """Spare `name`'s certificate (from the cluster CA) and config (join: true, the
        members `peers` through its proxies), as `goml node add --template` writes them."""
        assert name in self.spares and name not in self.joined, name
        assert self._template is not None
        net = self.runtime.addressing
        listen = net.node_listen(name)
        host = listen.rpartition(":")[0]
        prepare_node(
            self.work_dir / "certs",
            self._template,
            name,
            listen,
            self.data_dirs[name],
            self.work_dir / "config" / f"{name}.yaml",
            {n: self.proxies[f"{name}->{n}"].listen for n in peers if n != name},
            [h for h in net.cert_hosts if h != host],
        )
        self.joined.add(name)

    def in_service(self, name: str) -> bool:
        """An initial voter or a spare that joined, not removed and stopped since."""
        return name not in self.retired and (name not in self.spares or name in self.joined)

    def replicas(self) -> list[str]:
        """The control nodes whose stores count (without spares: all of them)."""
        return [n for n in self.control if self.in_service(n)]

    def stop(self, member: Member) -> None:
        """Stop one member for good (SIGTERM, then SIGKILL past the deadline)."""
        with self._lock:
            self.runtime.stop_all([member], STOP_TIMEOUT_S)

    def _proxy(self, name: str, source: str, target: str, host_side: bool = False) -> None:
        net = self.runtime.addressing
        latency = None if source == target else self.scenario.link(source, target)
        upstream = net.node_upstream(target)
        listen = net.proxy_listen(len(self._created), host_side)
        created = self.toxiproxy.create_proxy(name, listen, upstream)
        self._created.append(name)
        self.proxies[name] = ProxyState(
            name,
            source,
            target,
            net.proxy_for_members(created.listen),
            upstream,
            latency,
            host_listen=net.proxy_for_host(created.listen) if host_side else "",
        )

    def _apply(self, state: ProxyState) -> None:
        enabled, toxics = state.wanted()
        for toxic in [t for t in state.applied if t not in toxics]:
            self.toxiproxy.remove_toxic(state.name, toxic)
            del state.applied[toxic]
        for toxic, (stream, kind, attrs) in toxics.items():
            if toxic not in state.applied:
                self.toxiproxy.add_toxic(state.name, toxic, kind, stream, attrs)
            elif state.applied[toxic] != attrs:
                self.toxiproxy.update_toxic(state.name, toxic, attrs)
            state.applied[toxic] = attrs
        if enabled != state.enabled:
            self.toxiproxy.set_enabled(state.name, enabled)
            state.enabled = enabled

    # -------------------------------------------------------------- the network

    def streams(self, x: str, y: str) -> list[tuple[ProxyState, Stream]]:
        """The proxy streams that carry messages from location x to location y."""
        out: list[tuple[ProxyState, Stream]] = []
        for state in self.proxies.values():
            if state.source == x and state.target == y:
                out.append((state, "upstream"))
            elif state.source == y and state.target == x:
                out.append((state, "downstream"))
        return out

    def update_pairs(
        self, pairs: set[tuple[str, str]], change: Callable[[ProxyState, Stream], None]
    ) -> None:
        with self._lock:
            touched: dict[str, ProxyState] = {}
            for x, y in pairs:
                for state, stream in self.streams(x, y):
                    change(state, stream)
                    touched[state.name] = state
            for state in touched.values():
                self._apply(state)

    def heal_all(self, latency_too: bool) -> None:
        with self._lock:
            for state in self.proxies.values():
                state.blocked.clear()
                state.clogged.clear()
                if latency_too:
                    state.override = None
                self._apply(state)

    def delete_proxies(self) -> list[str]:
        """Delete every proxy this cluster created; returns the errors (if any). Nothing
        to do when the runtime's own Toxiproxy goes away with them (a container: deleting
        a proxy whose peers' containers are gone waits for Toxiproxy's 5 s timeout)."""
        if self.runtime.owns_toxiproxy:
            self._created.clear()
            return []
        errors = []
        for name in self._created:
            try:
                self.toxiproxy.delete_proxy(name)
            except Exception as error:  # keep cleaning up
                errors.append(str(error))
        self._created.clear()
        return errors

    # ----------------------------------------------------------------- members

    def start(self, member: Member) -> None:
        with self._lock:
            self.runtime.start(member)

    def kill(self, member: Member) -> None:
        """Crash: SIGKILL or `docker kill`; the member keeps only what it persisted."""
        with self._lock:
            self.runtime.kill(member)

    def pause(self, member: Member) -> None:
        with self._lock:
            self.runtime.pause(member)

    def resume(self, member: Member) -> None:
        with self._lock:
            self.runtime.resume(member)

    def all_processes(self) -> list[Member]:
        return [*self.agent_processes.values(), *self.nodes.values()]

    def stop_all(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Resume what is paused, stop everything (agents first), kill what outlives the
        deadline."""
        with self._lock:
            self.runtime.stop_all(self.all_processes(), timeout_s)

    def collect(self) -> list[str]:
        """After stop_all: the stores under data_dirs and the logs, readable here."""
        with self._lock:
            return self.runtime.collect(self.all_processes())

    # ---------------------------------------------------------------- observer

    def node_status(self, name: str, client: Client) -> tuple[str, int, str] | None:
        """(leader id as `name` sees it, term, role) or None if it does not answer."""
        process = self.nodes[name]
        if not process.running or process.paused:
            return None
        try:
            status = client.status(name)
        except ClientError:
            return None
        role = next((m.role for m in status.members if m.id == name), "")
        return status.leader_id, int(status.term), role

    def leader(self, client: Client) -> tuple[str, int] | None:
        """The running node that says it leads, in the highest term (None if none)."""
        best: tuple[str, int] | None = None
        for name in self.control:
            seen = self.node_status(name, client)
            if seen is not None and seen[0] == name and (best is None or seen[1] > best[1]):
                best = (name, seen[1])
        return best

    def observer_client(self) -> Client:
        assert self.observer is not None
        return Client(self.observer, call_timeout_s=STATUS_TIMEOUT_S, retry_s=STATUS_TIMEOUT_S)

    def describe(self) -> dict[str, object]:
        return {
            "runtime": self.runtime.kind,
            "nodes": dict(self.addresses),
            "proxies": {
                name: {
                    "listen": s.listen,
                    "host_listen": s.host_listen,
                    "upstream": s.upstream_address,
                }
                for name, s in self.proxies.items()
            },
        }


def _write_secret(path: Path, value: str) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value)
    return value


def record_pids(path: Path, pids: list[int]) -> None:
    """Every PID a run started, written as it goes (tests check they are all gone).
    Replaced whole (write, then rename): a reader never sees a file half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(pids))
    partial.replace(path)
