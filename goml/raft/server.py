"""Wiring for one Raft node process: a gRPC server, the transport, the store, the node.

The control plane builds its own `grpc.aio.Server` (to host its client and agent
services beside the peer service) and calls `build_node` with it; demos, tests and
benchmarks use `bind_server` + `build_node` + `LocalNode.start`.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

from goml.raft.node import (
    NodeConfig,
    RaftNode,
    StateMachine,
    default_core_config,
    default_node_config,
)
from goml.raft.sqlite_store import SqliteStorage
from goml.raft.transport import (
    PeerTransport,
    add_insecure_or_secure_port,
    default_transport_config,
    grpc_options,
)
from goml.raft.types import NodeId

log = logging.getLogger(__name__)

SERVER_GRACE_S = 0.2


@dataclass(slots=True)
class LocalNode:
    node: RaftNode
    server: grpc.aio.Server
    port: int

    async def start(self) -> None:
        await self.server.start()
        await self.node.start()

    async def stop(self) -> None:
        try:
            await self.node.stop()
        finally:
            await self.server.stop(SERVER_GRACE_S)


def bind_server(
    host: str,
    port: int,
    credentials: grpc.ServerCredentials | None,
    insecure: bool,
) -> tuple[grpc.aio.Server, int]:
    """A new grpc.aio server bound to host:port (0 = a free port); returns it and the port."""
    server = grpc.aio.server(options=grpc_options())
    bound = add_insecure_or_secure_port(server, f"{host}:{port}", credentials, insecure)
    return server, bound


def build_store_and_transport(
    node_id: NodeId,
    addresses: dict[NodeId, str],
    data_dir: Path,
    cluster_id: str,
    secret: bytes,
    channel_credentials: grpc.ChannelCredentials | None,
    insecure: bool,
    rng: random.Random,
) -> tuple[SqliteStorage, PeerTransport]:
    """SqliteStorage in `data_dir` and the peer transport to every other node."""
    assert node_id in addresses
    data_dir.mkdir(parents=True, exist_ok=True)
    storage = SqliteStorage(data_dir / "raft.sqlite3")
    transport = PeerTransport(
        default_transport_config(node_id, cluster_id, secret),
        {peer: address for peer, address in addresses.items() if peer != node_id},
        channel_credentials,
        insecure,
        random.Random(rng.random()),
    )
    return storage, transport


def build_node(
    node_id: NodeId,
    addresses: dict[NodeId, str],
    data_dir: Path,
    server: grpc.aio.Server,
    state_machine: StateMachine,
    cluster_id: str,
    secret: bytes,
    channel_credentials: grpc.ChannelCredentials | None,
    insecure: bool,
    config: NodeConfig | None = None,
    seed: int | None = None,
) -> RaftNode:
    """A RaftNode on SqliteStorage in `data_dir`, its servicer added to `server`."""
    voters = tuple(sorted(addresses))
    if config is None:
        config = default_node_config(default_core_config(node_id, voters))
    assert config.core.node_id == node_id
    assert set(config.core.voters) == set(voters)
    rng = random.Random(seed if seed is not None else os.urandom(16))
    storage, transport = build_store_and_transport(
        node_id, addresses, data_dir, cluster_id, secret, channel_credentials, insecure, rng
    )
    node = RaftNode(config, storage, state_machine, transport, rng)
    node.servicer().add_to_server(server)
    return node
