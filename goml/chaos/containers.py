"""The container runtime of the chaos runner (`goml chaos run --runtime containers`): every
control node and every agent in its own container, started through testcontainers, with
its own name and data volume; Toxiproxy in a container too; all on a Docker network the
run creates. The scenario, the proxies, the toxics and the report are `ChaosCluster`'s and
the runner's, the same as for processes; only where the members run differs:

    crash      `docker kill` (SIGKILL to the container's init: the whole container dies)
    restart    `docker start` of the same container: same name, same data volume
    pause      `docker pause` (the freezer cgroup), resumed with `docker unpause`
    links      Toxiproxy, one proxy per directed link, exactly as for processes

The network: a bridge network `goml-chaos-RUN` made for the run. Members reach each other
only through the Toxiproxy container (alias `toxiproxy`, proxies on ports 10000 + i),
and Toxiproxy reaches node N at `node-N:7000`. The harness (the workload's clients and the
observer) stays on the host and reaches Toxiproxy's API, the clients' proxies (20000 + j
inside) and each node's port through ports published on 127.0.0.1 only. Nothing in the run dials any
address but those. (`docker network disconnect` is not used: a cut is per link and per
direction in the scenarios, and the observer must keep seeing every node, as it does
with processes; Toxiproxy gives both runtimes the same faults.)

Images: `goml:VERSION` and `goml-toxiproxy:2.12.0`, built offline by `nox -s image`
(`goml.chaos.image`). Nothing is pulled: a missing image is an error naming that command.

Cleanup is our own, not testcontainers' reaper (Ryuk is an image to pull, which cannot
be had here, so it is disabled): every container, volume and the network carry the
labels org.goml.chaos=1, org.goml.chaos.run=RUN and org.goml.chaos.pid=PID, and the
run removes everything labelled with its RUN when it ends, whatever the way (the runner
turns SIGINT and SIGTERM into an exception, so this runs after Ctrl-C too). A harness
killed with SIGKILL cannot clean up: the next container run removes whatever is labelled
with a PID that no longer exists, and says so.

Stores: after the members stop, each node's data volume is copied out of its container
(`docker cp`, as an archive) into the node's data directory under the run's work
directory, where the runner reads it as it does for processes; each container's output
is written to its log file there.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import secrets
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from goml.chaos.cluster import Member, Runtime
from goml.chaos.toxiproxy import Toxiproxy
from goml.cluster.local import free_ports
from goml.scenario.schema import Scenario

LABEL = "org.goml.chaos"
LABEL_RUN = "org.goml.chaos.run"
LABEL_PID = "org.goml.chaos.pid"
NODE_PORT = 7000  # inside a node's container
TOXIPROXY_API_PORT = 8474  # inside Toxiproxy's container
PROXY_PORT_BASE = 10000  # the i-th proxy listens on PROXY_PORT_BASE + i inside Toxiproxy's
HOST_PROXY_PORT_BASE = 20000  # the j-th client proxy, published on 127.0.0.1, on BASE + j
PROXIES_MAX = 2000
TOXIPROXY_ALIAS = "toxiproxy"
AGENT_DIR = "/var/lib/goml"  # an agent's working directory: its data volume
ENGINE_TIMEOUT_S = 10.0
API_TIMEOUT_S = 60.0  # one Docker API call (create, start, kill, remove)
START_TIMEOUT_S = 30.0  # Toxiproxy's API answering after its container started
STOP_TIMEOUT_S = 10.0
STATUS_REFRESH_S = 1.0  # how stale a member's running state may be (a crash on its own)
HOW_TO_START_ENGINE = (
    "start one as root: `apt-get install -y --no-install-recommends docker.io`, then "
    "`dockerd >/var/log/dockerd.log 2>&1 &` (or `systemctl start docker`); `docker info` "
    "must answer"
)
HOW_TO_INSTALL = "pip install 'goml[containers]' (testcontainers and the docker SDK)"


class ContainerError(RuntimeError):
    """The container runtime cannot run or went wrong; the message says what to do."""


# Faults carried out on host processes (loop-device disks, the block I/O throttle,
# libfaketime: goml.chaos.node_faults), which this runtime cannot give a container.
PROCESS_ONLY_FAULTS = frozenset({"disk", "clock"})


def process_only(scenario: Scenario) -> str | None:
    """Why `scenario` needs the process runtime (None when containers can play it)."""
    kinds = sorted({str(getattr(f, "kind", "")) for f in scenario.faults} & PROCESS_ONLY_FAULTS)
    if not kinds:
        if scenario.topology.spare_names:
            # A joining node's certificate and config are prepared on the host when it
            # joins (goml.chaos.cluster); the container runtime builds every member first.
            return "its spare nodes join during the run (--runtime processes)"
        return None
    return f"its {' and '.join(kinds)} faults act on host processes (--runtime processes)"


def _sdk(module: str = "docker") -> Any:
    """A module of the docker SDK or of testcontainers, imported at run time: they are an
    optional dependency (goml[containers]), and the checkout's docker/ directory of
    Dockerfiles would pass for the `docker` package with static tools."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ContainerError(f"{module} is missing: {HOW_TO_INSTALL}") from None


def engine_problem() -> str | None:
    """Why no Docker engine can be used (None when one answers)."""
    try:
        docker, errors = _sdk(), _sdk("docker.errors")
    except ContainerError as error:
        return str(error)
    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        client = docker.from_env(timeout=int(ENGINE_TIMEOUT_S))
    except (errors.DockerException, OSError) as error:
        return f"no Docker engine reachable at {where} ({_short(error)}): {HOW_TO_START_ENGINE}"
    try:
        client.ping()
    except (errors.DockerException, OSError) as error:
        return (
            f"the Docker engine at {where} does not answer ({_short(error)}): {HOW_TO_START_ENGINE}"
        )
    finally:
        client.close()
    return None


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:300]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------- addressing


class ContainerAddressing:
    """Members dial proxies at toxiproxy:PORT; Toxiproxy dials node-N:7000; the harness
    dials ports published on 127.0.0.1 (Toxiproxy's and each node's)."""

    def __init__(self, proxy_host_ports: list[int], node_host_ports: dict[str, int]) -> None:
        self.proxy_host_ports = proxy_host_ports
        self.node_host_ports = node_host_ports
        self._host_side = 0  # client proxies handed out so far

    @property
    def cert_hosts(self) -> list[str]:
        return ["127.0.0.1", "localhost", TOXIPROXY_ALIAS]

    def node_listen(self, name: str) -> str:
        return f"0.0.0.0:{NODE_PORT}"

    def node_upstream(self, name: str) -> str:
        return f"{node_alias(name)}:{NODE_PORT}"

    def node_observed(self, name: str) -> str:
        return f"127.0.0.1:{self.node_host_ports[name]}"

    def proxy_listen(self, index: int, host_side: bool) -> str:
        """Members' proxies on PROXY_PORT_BASE + index (not published); the clients'
        proxies on HOST_PROXY_PORT_BASE + j, each published on its own host port."""
        if not host_side:
            assert 0 <= index < HOST_PROXY_PORT_BASE - PROXY_PORT_BASE, index
            return f"0.0.0.0:{PROXY_PORT_BASE + index}"
        j = self._host_side
        if j >= len(self.proxy_host_ports):
            raise ContainerError(
                f"client proxy #{j}: only {len(self.proxy_host_ports)} proxy ports were published"
            )
        self._host_side += 1
        return f"0.0.0.0:{HOST_PROXY_PORT_BASE + j}"

    def proxy_for_members(self, listen: str) -> str:
        return f"{TOXIPROXY_ALIAS}:{_port(listen)}"

    def proxy_for_host(self, listen: str) -> str:
        j = _port(listen) - HOST_PROXY_PORT_BASE
        assert 0 <= j < len(self.proxy_host_ports), f"{listen} is not a published proxy"
        return f"127.0.0.1:{self.proxy_host_ports[j]}"


def _port(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def node_alias(name: str) -> str:
    return f"node-{name}"


# ------------------------------------------------------------------------ members


@dataclass
class ContainerMember:
    """A node or agent container: created at its first start, then killed, paused and
    started again as the same container with the same volume."""

    name: str  # "node:aws-1" or "agent:aws-1"
    container_name: str
    volume: str
    spec: Any  # testcontainers' DockerContainer
    log_path: Path
    data_dir: Path | None  # a node's data directory (the volume's mount point)
    ports: dict[int, int] = field(default_factory=dict)  # container port -> 127.0.0.1 port
    paused: bool = False
    created: bool = False
    _running: bool = False
    _checked_s: float = 0.0

    @property
    def wrapped(self) -> Any:  # the docker SDK's Container
        return self.spec.get_wrapped_container()

    @property
    def running(self) -> bool:
        """Running or paused (as a stopped process is); checked with the engine at most
        every STATUS_REFRESH_S, so a member that died on its own is noticed."""
        if self._running and time.monotonic() - self._checked_s > STATUS_REFRESH_S:
            with contextlib.suppress(Exception):  # the engine gone: keep what we knew
                self.wrapped.reload()
                self._running = self.wrapped.status in ("running", "paused")
            self._checked_s = time.monotonic()
        return self._running


def _member(member: Member) -> ContainerMember:
    assert isinstance(member, ContainerMember), f"{member.name} is not a container"
    return member


class ContainerRuntime:
    """The members as containers (a `goml.chaos.cluster.Runtime`)."""

    kind = "containers"
    owns_toxiproxy = True  # its container, and every proxy in it, is removed by close()

    def __init__(
        self,
        scenario: Scenario,
        client_locations: list[str],
        work_dir: Path,
        host_ports: list[int] | None = None,
    ) -> None:
        from goml.chaos.image import TOXIPROXY_IMAGE, goml_image

        self.work_dir = work_dir.resolve()
        self.run_id = secrets.token_hex(4)
        self.prefix = f"goml-chaos-{self.run_id}"
        self.labels = {LABEL: "1", LABEL_RUN: self.run_id, LABEL_PID: str(os.getpid())}
        self.image = goml_image()
        self.toxiproxy_image = TOXIPROXY_IMAGE
        topology = scenario.topology
        control = [n.name for n in topology.control_nodes]
        agents = [n.name for n in topology.agent_nodes]
        clients = sorted(set(client_locations))
        proxies = len(control) * (len(control) - 1) + (len(agents) + len(clients)) * len(control)
        if proxies > PROXIES_MAX:
            raise ContainerError(f"{proxies} proxies: at most {PROXIES_MAX} (one per link)")
        published = len(clients) * len(control)  # only the clients' proxies face the host
        wanted = 1 + published + len(control)
        ports = host_ports if host_ports is not None else free_ports(wanted)
        if len(ports) < wanted or len(set(ports[:wanted])) < wanted:
            raise ContainerError(f"{wanted} distinct host ports are needed, {len(ports)} given")
        self.api_host_port = ports[0]
        self.addressing = ContainerAddressing(
            list(ports[1 : 1 + published]),
            {n: ports[1 + published + i] for i, n in enumerate(control)},
        )
        self.client: Any = None  # the docker SDK's DockerClient
        self.network: Any = None  # testcontainers' Network
        self.toxiproxy_spec: Any = None  # testcontainers' DockerContainer
        self.members: list[ContainerMember] = []
        self.notes: list[str] = []
        self._state_path = self.work_dir / "containers.json"

    # ---------------------------------------------------------------- open / close

    def open(self) -> Toxiproxy:
        """Sweep what dead runs left, make the network, start Toxiproxy; its client."""
        # Ryuk, testcontainers' reaper, is an image to pull: not here. We clean up.
        _sdk("testcontainers.core.config").testcontainers_config.ryuk_disabled = True
        network_class = _sdk("testcontainers.core.network").Network
        self.client = self._api(
            "connect to the Docker engine", lambda: _sdk().from_env(timeout=int(API_TIMEOUT_S))
        )
        self._sweep_dead_runs()
        self._record()
        network = network_class(docker_network_kw={"driver": "bridge", "labels": dict(self.labels)})
        network.name = self.prefix
        self.network = self._api(f"create network {self.prefix}", network.create)
        self._record()
        spec = self._spec(self.toxiproxy_image, f"{self.prefix}-toxiproxy", [TOXIPROXY_ALIAS])
        spec.with_command(["-host", "0.0.0.0", "-port", str(TOXIPROXY_API_PORT)])
        ports = {TOXIPROXY_API_PORT: self.api_host_port}
        for j, host_port in enumerate(self.addressing.proxy_host_ports):
            ports[HOST_PROXY_PORT_BASE + j] = host_port
        _publish(spec, ports)
        self.toxiproxy_spec = spec
        self._start_spec(spec, "Toxiproxy", ports)
        self._record()
        toxiproxy = Toxiproxy(f"http://127.0.0.1:{self.api_host_port}")
        deadline = time.monotonic() + START_TIMEOUT_S
        while not toxiproxy.reachable():
            container = spec.get_wrapped_container()
            self._api("docker inspect (Toxiproxy)", container.reload)
            if container.status not in ("created", "running"):
                raise ContainerError(
                    f"the Toxiproxy container exited ({container.status}): "
                    f"{container.logs().decode(errors='replace')[-1000:]}"
                )
            if time.monotonic() > deadline:
                raise ContainerError(
                    f"Toxiproxy's API at {toxiproxy.url} not up {START_TIMEOUT_S:g} s after its "
                    "container started"
                )
            time.sleep(0.05)  # polling another container's port, bounded by the deadline
        self.notes.append(
            f"containers on network {self.prefix}: Toxiproxy {toxiproxy.version()} "
            f"({self.toxiproxy_image}) at {toxiproxy.url}; members from {self.image}"
        )
        return toxiproxy

    def close(self) -> list[str]:
        """Remove every container, volume and network labelled with this run; returns
        the problems met (if any). Safe to call on a partial start."""
        if self.client is None:
            return []
        problems = self._write_toxiproxy_log()
        try:
            problems += remove_labelled(self.client, f"{LABEL_RUN}={self.run_id}")
        except Exception as error:  # the engine itself failed: say what is left to remove
            problems.append(f"listing what to remove: {_short(error)}")
        self._record(removed=not problems)
        with contextlib.suppress(Exception):
            if self.toxiproxy_spec is not None:
                self.toxiproxy_spec.get_docker_client().client.close()
            for member in self.members:
                member.spec.get_docker_client().client.close()
        self.client.close()
        self.client = None
        return problems

    def _sweep_dead_runs(self) -> None:
        assert self.client is not None
        dead: set[str] = set()
        listings: list[Any] = [
            self.client.containers.list(all=True, filters={"label": LABEL}),
            self.client.networks.list(filters={"label": LABEL}),
            self.client.volumes.list(filters={"label": LABEL}),
        ]
        for listing in listings:
            for item in listing:
                labels = (
                    item.attrs.get("Labels") or item.attrs.get("Config", {}).get("Labels") or {}
                )
                pid = labels.get(LABEL_PID, "")
                run = labels.get(LABEL_RUN, "")
                if run and pid.isdigit() and not _pid_alive(int(pid)):
                    dead.add(run)
        for run in sorted(dead):
            problems = remove_labelled(self.client, f"{LABEL_RUN}={run}")
            self.notes.append(
                f"removed what chaos run {run} left (its harness is gone)"
                + (f"; problems: {'; '.join(problems)}" if problems else "")
            )

    # ---------------------------------------------------------------- members

    def node(self, name: str, goml_args: list[str], data_dir: Path, log_path: Path) -> Member:
        container_name = f"{self.prefix}-node-{name}"
        spec = self._spec(self.image, container_name, [node_alias(name)], goml_args)
        ports = {NODE_PORT: self.addressing.node_host_ports[name]}
        _publish(spec, ports)
        return self._add(
            ContainerMember(
                f"node:{name}",
                container_name,
                f"{container_name}-data",
                spec,
                log_path,
                data_dir,
                ports,
            )
        )

    def agent(self, name: str, goml_args: list[str], log_path: Path) -> Member:
        container_name = f"{self.prefix}-agent-{name}"
        spec = self._spec(self.image, container_name, [f"agent-{name}"], goml_args)
        return self._add(
            ContainerMember(
                f"agent:{name}", container_name, f"{container_name}-data", spec, log_path, None
            )
        )

    def _add(self, member: ContainerMember) -> ContainerMember:
        mount = str(member.data_dir) if member.data_dir is not None else AGENT_DIR
        member.spec.with_volume_mapping(member.volume, mount, "rw")
        self.members.append(member)
        return member

    def _spec(
        self, image: str, name: str, aliases: list[str], command: list[str] | None = None
    ) -> Any:
        """A testcontainers DockerContainer, not created yet."""
        container_class = _sdk("testcontainers.core.container").DockerContainer
        assert self.network is not None, "open() makes the network first"
        spec = container_class(image, name=name, labels=dict(self.labels), init=True)
        spec.with_network(self.network)
        spec.with_network_aliases(*aliases)
        if command is not None:
            spec.with_command(command)
            # Configs and certificates: read-only, at the paths the configs name.
            for sub in ("config", "certs"):
                spec.with_volume_mapping(str(self.work_dir / sub), str(self.work_dir / sub), "ro")
        return spec

    def start(self, member: Member) -> None:
        m = _member(member)
        if m.created:
            if m.running:
                return
            self._api(f"docker start {m.container_name}", m.wrapped.start)
        else:
            assert self.client is not None
            self._api(
                f"create volume {m.volume}",
                lambda: self.client.volumes.create(m.volume, labels=dict(self.labels)),
            )
            m.created = True  # from here on, close() removes it (by label) whatever happens
            self._record()
            self._start_spec(m.spec, m.name, m.ports)
        m._running, m._checked_s, m.paused = True, time.monotonic(), False

    def kill(self, member: Member) -> None:
        """`docker kill`: SIGKILL to the container's init; it keeps only its volume."""
        m = _member(member)
        if not m.created or not m.running:
            return
        if m.paused:  # the engine refuses to kill a paused container
            self._api(f"docker unpause {m.container_name}", m.wrapped.unpause)
        self._api(f"docker kill {m.container_name}", m.wrapped.kill)
        self._api(f"wait for {m.container_name}", lambda: m.wrapped.wait(timeout=STOP_TIMEOUT_S))
        m._running, m.paused = False, False

    def pause(self, member: Member) -> None:
        m = _member(member)
        if m.created and m.running and not m.paused:
            self._api(f"docker pause {m.container_name}", m.wrapped.pause)
            m.paused = True

    def resume(self, member: Member) -> None:
        m = _member(member)
        if m.created and m.paused:
            self._api(f"docker unpause {m.container_name}", m.wrapped.unpause)
        m.paused = False

    def stop_all(self, members: list[Member], timeout_s: float) -> None:
        """Unpause, SIGTERM every container (in order), wait, `docker kill` the rest."""
        running = [m for m in map(_member, members) if m.created and m.running]
        for m in running:
            with contextlib.suppress(Exception):
                if m.paused:
                    m.wrapped.unpause()
                m.paused = False
                m.wrapped.kill(signal="SIGTERM")
        deadline = time.monotonic() + timeout_s
        for m in running:
            try:
                m.wrapped.wait(timeout=max(1.0, deadline - time.monotonic()))
            except Exception:  # still running at the deadline (or the engine hiccuped)
                with contextlib.suppress(Exception):
                    m.wrapped.kill()
                    m.wrapped.wait(timeout=STOP_TIMEOUT_S)
            m._running = False

    def collect(self, members: list[Member]) -> list[str]:
        """Each container's output into its log file; each node's volume copied into its
        data directory (the containers are stopped, not yet removed)."""
        problems: list[str] = []
        for m in map(_member, members):
            if not m.created:
                continue
            try:
                m.log_path.parent.mkdir(parents=True, exist_ok=True)
                m.log_path.write_bytes(m.wrapped.logs())
                if m.data_dir is not None:
                    _copy_out(m.wrapped, m.data_dir)
            except Exception as error:  # keep collecting the others
                problems.append(f"{m.container_name}: {_short(error)}")
        return problems

    # -------------------------------------------------------------------- engine

    def _start_spec(self, spec: Any, what: str, ports: dict[int, int]) -> None:
        errors = _sdk("docker.errors")
        try:
            spec.start()
        except errors.APIError as error:
            text = str(error.explanation or error)
            if "port is already allocated" in text or "address already in use" in text:
                published = ", ".join(f"127.0.0.1:{p}" for p in sorted(ports.values()))
                raise ContainerError(
                    f"{what}: a port it publishes is in use on this machine ({published}): "
                    f"{_short(error)}. Free it, or run again (the ports are picked anew)"
                ) from None
            raise ContainerError(
                f"{what}: starting its container failed: {_short(error)}"
            ) from None
        except (errors.DockerException, OSError) as error:
            raise ContainerError(
                f"{what}: starting its container failed: {_short(error)}"
            ) from None

    def _api(self, what: str, call: Any) -> Any:
        errors = _sdk("docker.errors")
        try:
            return call()
        except (errors.DockerException, OSError) as error:  # requests' errors are OSErrors
            raise ContainerError(f"{what}: {_short(error)}") from None

    def _write_toxiproxy_log(self) -> list[str]:
        spec = self.toxiproxy_spec
        if spec is None or spec._container is None:
            return []
        try:
            path = self.work_dir / "logs" / "toxiproxy.log"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(spec.get_wrapped_container().logs())
        except Exception as error:
            return [f"Toxiproxy's log: {_short(error)}"]
        return []

    def _record(self, removed: bool = False) -> None:
        """What this run made, written as it goes (for people and tests)."""
        body = {
            "run": self.run_id,
            "labels": self.labels,
            "network": self.prefix,
            "containers": [
                f"{self.prefix}-toxiproxy",
                *(m.container_name for m in self.members if m.created),
            ],
            "volumes": [m.volume for m in self.members if m.created],
            "removed": removed,
        }
        self._state_path.parent.mkdir(parents=True, exist_ok=True)
        self._state_path.write_text(json.dumps(body, indent=2))


def _publish(spec: Any, ports: dict[int, int]) -> None:
    """Publish on 127.0.0.1 only (testcontainers' with_bind_ports binds every address)."""
    for inside, outside in ports.items():
        spec.ports[f"{inside}/tcp"] = ("127.0.0.1", outside)


def _copy_out(container: Any, data_dir: Path) -> None:
    """`docker cp CONTAINER:DATA_DIR` into DATA_DIR's parent (the archive holds DATA_DIR)."""
    stream, _ = container.get_archive(str(data_dir))
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile() as buffer:
        for chunk in stream:
            buffer.write(chunk)
        buffer.seek(0)
        with tarfile.open(fileobj=buffer, mode="r:") as archive:
            names = archive.getnames()
            if not names or names[0].split("/")[0] != data_dir.name:
                raise ContainerError(f"the archive of {data_dir} holds {names[:3]}")
            archive.extractall(data_dir.parent, filter="data")


def remove_labelled(client: Any, label: str) -> list[str]:
    """Remove every container (with its anonymous volumes), then every network and
    volume that carries `label` ("key=value"); returns the problems met."""
    problems: list[str] = []
    for container in client.containers.list(all=True, filters={"label": label}):
        try:
            container.remove(force=True, v=True)
        except Exception as error:
            problems.append(f"container {container.name}: {_short(error)}")
    for network in client.networks.list(filters={"label": label}):
        try:
            network.remove()
        except Exception as error:
            problems.append(f"network {network.name}: {_short(error)}")
    for volume in client.volumes.list(filters={"label": label}):
        try:
            volume.remove(force=True)
        except Exception as error:
            problems.append(f"volume {volume.name}: {_short(error)}")
    return problems


def leftovers(label: str = LABEL) -> dict[str, list[str]]:
    """Names of the containers, networks and volumes that carry `label` (tests use it)."""
    client = _sdk().from_env(timeout=int(ENGINE_TIMEOUT_S))
    try:
        return {
            "containers": [
                c.name for c in client.containers.list(all=True, filters={"label": label})
            ],
            "networks": [n.name for n in client.networks.list(filters={"label": label})],
            "volumes": [v.name for v in client.volumes.list(filters={"label": label})],
        }
    finally:
        client.close()


@contextlib.contextmanager
def container_runtime(
    scenario: Scenario,
    client_locations: list[str],
    work_dir: Path,
    notes: list[str],
    host_ports: list[int] | None = None,
) -> Iterator[tuple[Toxiproxy, Runtime]]:
    """Toxiproxy (in its container) and the container runtime for one run; everything it
    made is removed when the context ends, also on an error or Ctrl-C."""
    problem = engine_problem()
    if problem is not None:
        raise ContainerError(problem)
    _sdk("testcontainers")
    from goml.chaos.image import ImageError, image_problem

    try:
        problem = image_problem()
    except ImageError as error:
        problem = str(error)
    if problem is not None:
        raise ContainerError(problem)
    runtime = ContainerRuntime(scenario, client_locations, work_dir, host_ports)
    failed = True
    try:
        toxiproxy = runtime.open()
        notes.extend(runtime.notes)
        yield toxiproxy, runtime
        failed = False
    finally:
        problems = runtime.close()
        if problems:
            message = (
                f"could not remove everything chaos run {runtime.run_id} made: "
                f"{'; '.join(problems)} (the next container run removes it, or by hand: "
                f"docker rm -f $(docker ps -aq --filter label={LABEL_RUN}={runtime.run_id}))"
            )
            if not failed:
                raise ContainerError(message)
            print(message, file=sys.stderr)  # an error is already on its way: keep it


__all__ = [
    "PROCESS_ONLY_FAULTS",
    "ContainerError",
    "ContainerRuntime",
    "container_runtime",
    "engine_problem",
    "leftovers",
    "process_only",
    "remove_labelled",
]


def main(argv: list[str] | None = None) -> int:
    """`python -m goml.chaos.containers runnable SCENARIO...`: one line per scenario,
    `run PATH` or `skip PATH: why` (what `nox -s chaos_containers` plays)."""
    import argparse

    from goml.scenario.loader import ScenarioError, load_scenario

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("action", choices=["runnable"])
    parser.add_argument("scenarios", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for path in args.scenarios:
        try:
            why = process_only(load_scenario(path).scenario)
        except ScenarioError as error:
            print(f"run {path}  # invalid: `goml chaos run` will say why ({_short(error)})")
            continue
        print(f"skip {path}: {why}" if why else f"run {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
