"""`goml cluster up`: a real local cluster (separate processes on loopback, TLS on) in
the foreground. Ctrl-C stops every process it started, by PID.

The data directory keeps the certificates, each node's config and Raft store, and the
client profile; `cluster up` on an existing directory starts the same cluster again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from goml.client import Client, ClientError, Profile, default_profile_path
from goml.cluster.certs import init_certs
from goml.cluster.config import (
    Duties,
    NodeFileConfig,
    TlsFiles,
    load_node_config,
    write_node_config,
)

STOP_TIMEOUT_S = 10.0


def free_ports(count: int) -> list[int]:
    """Ports the kernel just handed out: free now (a tiny race, acceptable for local use)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass(frozen=True)
class LocalLayout:
    data_dir: Path
    node_configs: dict[str, Path]
    profile: Profile


def prepare(
    data_dir: Path, nodes: int, insecure: bool, duties: Duties | None = None
) -> LocalLayout:
    """Create (or reuse) certificates, node configs and a client profile under data_dir.

    `duties` overrides the leader's timeouts in new node configs (tests use shorter ones
    so a dead agent is noticed in a second or two); None keeps the production defaults.
    An existing data_dir keeps the configs it has."""
    data_dir = data_dir.resolve()
    config_dir = data_dir / "config"
    existing = sorted(config_dir.glob("n*.yaml")) if config_dir.is_dir() else []
    certs = data_dir / "certs"
    if existing:
        configs = {path.stem: path for path in existing}
        first = load_node_config(existing[0])
        if len(configs) != nodes:
            raise ValueError(
                f"{data_dir} holds a {len(configs)}-node cluster; use --nodes {len(configs)} "
                "or another --data-dir"
            )
    else:
        names = [f"n{i + 1}" for i in range(nodes)]
        config_dir.mkdir(parents=True, exist_ok=True)
        if not insecure:
            init_certs(certs, names, ["127.0.0.1", "localhost"])
        else:
            certs.mkdir(parents=True, exist_ok=True)
            _write_secret(certs / "cluster.secret", os.urandom(32).hex())
            _write_secret(certs / "client.token", os.urandom(24).hex())
        ports = free_ports(nodes * 2)
        peers = {name: f"127.0.0.1:{ports[i]}" for i, name in enumerate(names)}
        configs = {}
        for i, name in enumerate(names):
            config = NodeFileConfig(
                node_id=name,
                listen=peers[name],
                metrics_listen=f"127.0.0.1:{ports[nodes + i]}",
                data_dir=data_dir / "nodes" / name,
                peers=peers,
                cluster_id="local",
                tls=None
                if insecure
                else TlsFiles(
                    ca=certs / "ca.pem", cert=certs / f"{name}.pem", key=certs / f"{name}.key"
                ),
                insecure=insecure,
                secret_file=certs / "cluster.secret",
                token_file=certs / "client.token",
                duties=duties if duties is not None else Duties(),
            )
            path = config_dir / f"{name}.yaml"
            write_node_config(path, config)
            configs[name] = path
        first = load_node_config(configs[names[0]])
    token = (certs / "client.token").read_text().strip()
    profile = Profile(
        nodes=dict(first.peers),
        token=token,
        ca=None if first.insecure else certs / "ca.pem",
        cert=None if first.insecure else certs / "client.pem",
        key=None if first.insecure else certs / "client.key",
        insecure=first.insecure,
    )
    profile.save(data_dir / "profile.json")
    return LocalLayout(data_dir, configs, profile)


def _write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path


def spawn(name: str, argv: list[str], log_path: Path) -> Process:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        # A new session: Ctrl-C in the terminal reaches `cluster up`, which then stops
        # the children in order instead of them all dying at once.
        popen = subprocess.Popen(
            argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Process(name, popen, log_path)


def stop_all(processes: list[Process], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM every process by PID, wait, then SIGKILL whatever is left."""
    for process in processes:
        if process.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.popen.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in processes:
        remaining = max(0.0, deadline - time.monotonic())
        try:
            process.popen.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.popen.pid, signal.SIGKILL)
            process.popen.wait(timeout=5)


def node_argv(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "goml", "node", "run", "--config", str(config_path)]


def wait_for_leader(profile: Profile, timeout_s: float) -> str:
    with Client(profile, call_timeout_s=1.0, retry_s=timeout_s) as client:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                status = client.status()
                if status.leader_id:
                    return status.leader_id
            except ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no leader elected within {timeout_s:.0f} s")
            time.sleep(0.1)  # polling a remote process: there is nothing to wait on locally


@contextlib.contextmanager
def running_cluster(
    layout: LocalLayout, extra: list[tuple[str, list[str]]] | None = None
) -> Iterator[list[Process]]:
    """Start every node (and `extra` processes); stop all of them on exit, also on error."""
    processes: list[Process] = []
    try:
        for name, path in sorted(layout.node_configs.items()):
            processes.append(spawn(name, node_argv(path), layout.data_dir / "logs" / f"{name}.log"))
        for name, argv in extra or []:
            processes.append(spawn(name, argv, layout.data_dir / "logs" / f"{name}.log"))
        yield processes
    finally:
        stop_all(processes)


def publish_profile(layout: LocalLayout) -> Path:
    """Copy the profile where the CLI looks by default, so `goml status` needs no flags."""
    target = default_profile_path()
    layout.profile.save(target)
    return target


def agent_processes(layout: LocalLayout, count: int) -> list[tuple[str, list[str]]]:
    """Configs for `count` local agents (written once) and the commands that run them."""
    import yaml

    certs = layout.data_dir / "certs"
    processes = []
    for i in range(count):
        name = f"agent-{i + 1}"
        path = layout.data_dir / "config" / f"{name}.yaml"
        if not path.exists():
            body: dict[str, object] = {
                "agent_id": name,
                "cloud": "local",
                "region": "loopback",
                "capacity": {"cpu": 2.0, "memory_mb": 2048},
                "control_plane": dict(layout.profile.nodes),
                "token_file": str(certs / "client.token"),
            }
            if layout.profile.insecure:
                body["insecure"] = True
            else:
                body["tls"] = {
                    "ca_file": str(certs / "ca.pem"),
                    "cert_file": str(certs / "client.pem"),
                    "key_file": str(certs / "client.key"),
                }
            path.write_text(yaml.safe_dump(body, sort_keys=False))
        argv = [sys.executable, "-m", "goml", "agent", "run", "--config", str(path)]
        processes.append((name, argv))
    return processes
