"""The real Raft runtime: RaftNode on loopback gRPC with SqliteStorage."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from goml.raft.demo import KeyValueStateMachine, propose_with_retry, wait_for_leader
from goml.raft.node import RaftNode
from goml.raft.server import LocalNode, bind_server, build_node
from goml.raft.sqlite_store import SqliteStorage
from goml.raft.types import EntryKind

ROOT = Path(__file__).resolve().parent.parent
IDS = ["n1", "n2", "n3"]
SECRET = b"test-secret"


@dataclass
class Tls:
    server: grpc.ServerCredentials
    channel: grpc.ChannelCredentials


@dataclass
class Cluster:
    data_dir: Path
    addresses: dict[str, str]
    ports: dict[str, int]
    secrets: dict[str, bytes]
    tls: Tls | None
    nodes: dict[str, LocalNode]
    machines: dict[str, KeyValueStateMachine]

    def raft(self) -> list[RaftNode]:
        return [n.node for n in self.nodes.values() if n.node.running]

    async def start(self, node_id: str) -> None:
        server, _ = bind_server(
            "127.0.0.1",
            self.ports[node_id],
            self.tls.server if self.tls else None,
            insecure=self.tls is None,
        )
        machine = KeyValueStateMachine()
        node = build_node(
            node_id,
            self.addresses,
            self.data_dir / node_id,
            server,
            machine,
            "test",
            self.secrets[node_id],
            self.tls.channel if self.tls else None,
            insecure=self.tls is None,
        )
        self.machines[node_id] = machine
        self.nodes[node_id] = LocalNode(node, server, self.ports[node_id])
        await self.nodes[node_id].start()


async def make_cluster(
    tmp_path: Path, secrets: dict[str, bytes] | None = None, tls: Tls | None = None
) -> Cluster:
    ports = free_ports(len(IDS))
    cluster = Cluster(
        data_dir=tmp_path,
        addresses={i: f"127.0.0.1:{p}" for i, p in zip(IDS, ports, strict=True)},
        ports=dict(zip(IDS, ports, strict=True)),
        secrets=secrets or dict.fromkeys(IDS, SECRET),
        tls=tls,
        nodes={},
        machines={},
    )
    for node_id in IDS:
        await cluster.start(node_id)
    return cluster


def run_with_cluster(
    tmp_path: Path,
    body: Callable[[Cluster], Awaitable[None]],
    secrets: dict[str, bytes] | None = None,
    tls: Tls | None = None,
) -> None:
    """Run `body` on a fresh 3-node cluster; every node is stopped afterwards."""

    async def main() -> None:
        cluster = await make_cluster(tmp_path, secrets=secrets, tls=tls)
        try:
            async with asyncio.timeout(60):
                await body(cluster)
        finally:
            for local in cluster.nodes.values():
                await local.stop()

    asyncio.run(main())


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def command(key: str, value: object) -> bytes:
    return json.dumps({"key": key, "value": value}).encode()


async def all_applied(nodes: list[RaftNode], index: int, timeout_s: float) -> None:
    await asyncio.gather(*(n.wait_for(lambda n=n: n.applied >= index, timeout_s) for n in nodes))


def test_elect_replicate_failover_restart(tmp_path: Path) -> None:
    run_with_cluster(tmp_path, _elect_replicate_failover_restart)


async def _elect_replicate_failover_restart(cluster: Cluster) -> None:
    leader = await wait_for_leader(cluster.raft(), 10.0)
    for n in range(20):
        index = await leader.propose(command(f"a{n}", n), 5.0)
        assert isinstance(index, int)
    read_point = await leader.read_index(5.0)
    assert read_point >= 21  # 20 proposals and the election's no-op
    await all_applied(cluster.raft(), read_point, 5.0)
    for node_id in IDS:
        assert cluster.machines[node_id].values == {f"a{n}": n for n in range(20)}

    old = leader.id
    await cluster.nodes[old].stop()
    survivors = cluster.raft()
    assert old not in [n.id for n in survivors]
    new_leader_id, _ = await propose_with_retry(survivors, command("after", 1), 10.0)
    assert new_leader_id != old
    new_leader = cluster.nodes[new_leader_id].node
    for n in range(20, 30):
        await new_leader.propose(command(f"a{n}", n), 5.0)

    await cluster.start(old)  # restart from its data directory
    target = await new_leader.read_index(5.0)
    await all_applied(cluster.raft(), target, 10.0)
    expected = {f"a{n}": n for n in range(30)} | {"after": 1}
    for node_id in IDS:
        assert cluster.machines[node_id].values == expected, node_id
    assert cluster.nodes[old].node.term == new_leader.term


def test_transfer_leadership(tmp_path: Path) -> None:
    run_with_cluster(tmp_path, _transfer_leadership)


async def _transfer_leadership(cluster: Cluster) -> None:
    leader = await wait_for_leader(cluster.raft(), 10.0)
    await leader.propose(command("x", 1), 5.0)
    target = next(i for i in IDS if i != leader.id)
    await leader.transfer_leadership(target, 5.0)
    new = await wait_for_leader(cluster.raft(), 5.0)
    assert new.id == target
    await new.propose(command("y", 2), 5.0)


def test_wrong_cluster_secret_is_rejected_clearly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    secrets = {"n1": SECRET, "n2": SECRET, "n3": b"wrong-password"}
    run_with_cluster(tmp_path, _wrong_secret, secrets=secrets)
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        "rejected raft stream from ipv4:127.0.0.1:" in m and "wrong cluster secret" in m
        for m in messages
    ), messages
    assert any("rejected our stream" in m and "cluster secret" in m for m in messages), messages


async def _wrong_secret(cluster: Cluster) -> None:
    n3 = cluster.nodes["n3"].node
    good = [cluster.nodes["n1"].node, cluster.nodes["n2"].node]
    leader = await wait_for_leader(good, 10.0)
    await leader.propose(command("k", 1), 5.0)
    await n3.wait_for(
        lambda: all(p["unauthenticated"] for p in n3.status()["peers"].values()),  # type: ignore[union-attr]
        5.0,
    )
    assert n3.leader == ""
    assert n3.applied == 0


def make_tls(tmp_path: Path) -> Tls:
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("goml test CA"))
        .issuer_name(name("goml test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("goml node"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return Tls(
        server=grpc.ssl_server_credentials(
            [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True
        ),
        channel=grpc.ssl_channel_credentials(ca_pem, key_pem, cert_pem),
    )


def test_mutual_tls(tmp_path: Path) -> None:
    run_with_cluster(tmp_path, _mutual_tls, tls=make_tls(tmp_path))


async def _mutual_tls(cluster: Cluster) -> None:
    leader = await wait_for_leader(cluster.raft(), 10.0)
    for n in range(5):
        await leader.propose(command(f"t{n}", n), 5.0)
    await all_applied(cluster.raft(), await leader.read_index(5.0), 5.0)
    for node_id in IDS:
        assert len(cluster.machines[node_id].values) == 5


def test_plaintext_needs_explicit_insecure() -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="insecure=True"):
            bind_server("127.0.0.1", 0, None, insecure=False)

    asyncio.run(main())


# ---------------------------------------------------------------- kill -9


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)  # polling files written by other processes


def _status(path: Path) -> dict[str, object]:
    try:
        value: dict[str, object] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return value


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


@pytest.mark.slow
def test_kill_9_leader_loses_no_acknowledged_proposal(tmp_path: Path) -> None:
    ports = free_ports(3)
    peers = ",".join(f"{i}=127.0.0.1:{p}" for i, p in zip(IDS, ports, strict=True))
    env = dict(os.environ, GOML_RAFT_SECRET="kill-test", PYTHONPATH=str(ROOT))
    stop_file = tmp_path / "stop-load"
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(node_id: str) -> None:
        procs[node_id] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "goml.raft.node_main",
                "--id",
                node_id,
                "--peers",
                peers,
                "--data",
                str(tmp_path / node_id),
                "--insecure",
                "--status-file",
                str(tmp_path / f"{node_id}.status"),
                "--status-interval-ms",
                "20",
                "--acked-file",
                str(tmp_path / f"{node_id}.acked"),
                "--load-stop-file",
                str(stop_file),
                "--load-concurrency",
                "16",
            ],
            env=env,
            cwd=ROOT,
        )

    def leader() -> str:
        for node_id in IDS:
            status = _status(tmp_path / f"{node_id}.status")
            if status.get("role") == "leader" and procs[node_id].poll() is None:
                return node_id
        return ""

    try:
        for node_id in IDS:
            spawn(node_id)
        _wait(lambda: leader() != "", 20, "a leader")
        first = leader()
        _wait(lambda: len(_lines(tmp_path / f"{first}.acked")) >= 200, 20, "acks")
        os.kill(procs[first].pid, signal.SIGKILL)  # mid-stream of proposals
        procs[first].wait(timeout=10)
        _wait(lambda: leader() not in ("", first), 20, "a new leader")
        second = leader()
        _wait(lambda: len(_lines(tmp_path / f"{second}.acked")) >= 100, 20, "acks on new leader")
        spawn(first)  # restart from its data directory
        stop_file.write_text("stop")

        def caught_up() -> bool:
            statuses = [_status(tmp_path / f"{i}.status") for i in IDS]
            if any(s.get("pid") != procs[i].pid for s, i in zip(statuses, IDS, strict=True)):
                return False
            applied = {s.get("applied") for s in statuses}
            commits = {s.get("commit") for s in statuses}
            return len(applied) == 1 and applied == commits

        _wait(caught_up, 30, "every node caught up")
        for node_id in IDS:
            os.kill(procs[node_id].pid, signal.SIGTERM)
        for node_id in IDS:
            assert procs[node_id].wait(timeout=15) == 0
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    acked = set(_lines(tmp_path / f"{first}.acked")) | set(_lines(tmp_path / f"{second}.acked"))
    assert len(acked) >= 300
    for node_id in IDS:
        with SqliteStorage(tmp_path / node_id / "raft.sqlite3") as store:
            persisted = store.load()
        keys: set[str] = set()
        if persisted.snapshot is not None:
            keys |= set(json.loads(persisted.snapshot.data)["values"])
        for entry in persisted.entries:
            # Commands only: the leaders' own entries (NOOP) list stores, not keys.
            if entry.index <= persisted.hard_state.commit and entry.kind is EntryKind.NORMAL:
                keys.add(json.loads(entry.data)["key"])
        missing = acked - keys
        assert not missing, f"{node_id} lost {len(missing)} acknowledged: {sorted(missing)[:5]}"
