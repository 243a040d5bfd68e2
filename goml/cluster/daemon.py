"""`goml node run --config FILE`: one control-plane node as a process.

SIGTERM or SIGINT stops it cleanly (the store is closed, nothing acknowledged is lost;
kill -9 loses nothing acknowledged either, which the tests check).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
from dataclasses import replace
from pathlib import Path

import grpc

from goml.cluster.certs import read_secret
from goml.cluster.config import NodeFileConfig, load_node_config
from goml.cluster.duties import DutiesConfig
from goml.cluster.metrics import Metrics
from goml.cluster.node_core import NodeCoreConfig, NodeReady, standard_config
from goml.cluster.service import ControlPlane, add_services
from goml.raft.node import NodeRuntime, default_node_config
from goml.raft.replica import raft_config
from goml.raft.server import SERVER_GRACE_S, bind_server, build_store_and_transport

log = logging.getLogger(__name__)


def _credentials(
    config: NodeFileConfig,
) -> tuple[grpc.ServerCredentials | None, grpc.ChannelCredentials | None]:
    if config.tls is None:
        return None, None
    ca, cert, key = (
        config.tls.ca.read_bytes(),
        config.tls.cert.read_bytes(),
        config.tls.key.read_bytes(),
    )
    server = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )
    channel = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    return server, channel


def core_config(config: NodeFileConfig) -> NodeCoreConfig:
    """The node core configuration of this node: the file's settings, goml's standards."""
    timing, d = config.raft, config.duties
    raft = raft_config(
        config.node_id,
        () if config.join else tuple(sorted(config.peers)),
        timing.election_timeout_ms_min,
        timing.election_timeout_ms_max,
        timing.heartbeat_interval_ms,
    )
    duties = DutiesConfig(d.agent_timeout_ms, d.election_grace_ms, d.lease_ms, d.renew_before_ms)
    return standard_config(
        raft,
        tuple(sorted(config.peers.items())),
        duties,
        request_timeout_ms=int(config.request_timeout_s * 1000),
        compact_every_entries=default_node_config(raft).replica.compact_every_entries,
    )


async def serve(config: NodeFileConfig, stop: asyncio.Event) -> None:
    """Run the node until `stop` is set."""
    server_credentials, channel_credentials = _credentials(config)
    host, _, port = config.listen.rpartition(":")
    server, bound = bind_server(host, int(port), server_credentials, config.insecure)
    seed = os.urandom(16)
    storage, transport = build_store_and_transport(
        config.node_id,
        dict(config.peers),
        config.data_dir,
        config.cluster_id,
        read_secret(config.secret_file).encode(),
        channel_credentials,
        config.insecure,
        random.Random(seed),
    )
    node_core = core_config(config)
    runtime: NodeRuntime[NodeReady] = NodeRuntime(
        replace(default_node_config(node_core.replica.raft), replica=node_core.replica),
        storage,
        transport,
    )
    runtime.servicer().add_to_server(server)
    metrics = Metrics()
    plane = ControlPlane(
        config,
        node_core,
        runtime,
        read_secret(config.token_file),
        metrics,
        seed,
        channel_credentials,
    )
    await add_services(server, plane)
    if config.metrics_listen:
        metrics_host, _, metrics_port = config.metrics_listen.rpartition(":")
        metrics.serve(metrics_host, int(metrics_port))
    await server.start()
    await plane.start()
    log.info("node %s serving on %s:%d", config.node_id, host, bound)
    try:
        await stop.wait()
    finally:
        await plane.stop()
        await server.stop(SERVER_GRACE_S)
        log.info("node %s stopped", config.node_id)


def run(config_path: Path) -> None:
    config = load_node_config(config_path)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {config.node_id} %(levelname)s %(name)s: %(message)s",
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(signum, stop.set)
        await serve(config, stop)

    asyncio.run(main())
