"""`goml node run --config FILE`: one control-plane node as a process.

SIGTERM or SIGINT stops it cleanly (the store is closed, nothing acknowledged is lost;
kill -9 loses nothing acknowledged either, which the tests check).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

import grpc

from goml.cluster.certs import read_secret
from goml.cluster.config import NodeFileConfig, load_node_config
from goml.cluster.manifest import DEFAULT_LIMITS
from goml.cluster.metrics import Metrics
from goml.cluster.service import ControlPlane, ManifestMachine, add_services
from goml.raft.node import default_core_config, default_node_config
from goml.raft.server import SERVER_GRACE_S, bind_server, build_node
from goml.raft.types import Config

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


def _core_config(config: NodeFileConfig) -> Config:
    base = default_core_config(config.node_id, tuple(sorted(config.peers)))
    timing = config.raft
    return Config(
        node_id=base.node_id,
        voters=base.voters,
        election_timeout_ms_min=timing.election_timeout_ms_min,
        election_timeout_ms_max=timing.election_timeout_ms_max,
        heartbeat_interval_ms=timing.heartbeat_interval_ms,
        inflight_messages_max=base.inflight_messages_max,
        entries_per_message_max=base.entries_per_message_max,
        uncommitted_entries_max=base.uncommitted_entries_max,
    )


async def serve(config: NodeFileConfig, stop: asyncio.Event) -> None:
    """Run the node until `stop` is set."""
    server_credentials, channel_credentials = _credentials(config)
    host, _, port = config.listen.rpartition(":")
    server, bound = bind_server(host, int(port), server_credentials, config.insecure)
    machine = ManifestMachine(DEFAULT_LIMITS)
    raft = build_node(
        config.node_id,
        dict(config.peers),
        config.data_dir,
        server,
        machine,
        config.cluster_id,
        read_secret(config.secret_file).encode(),
        channel_credentials,
        config.insecure,
        default_node_config(_core_config(config)),
    )
    metrics = Metrics()
    plane = ControlPlane(config, raft, machine, read_secret(config.token_file), metrics)
    await add_services(server, plane)
    if config.metrics_listen:
        metrics_host, _, metrics_port = config.metrics_listen.rpartition(":")
        metrics.serve(metrics_host, int(metrics_port))
    await server.start()
    await raft.start()
    plane.start_duties()
    log.info("node %s serving on %s:%d", config.node_id, host, bound)
    try:
        await stop.wait()
    finally:
        await plane.stop_duties()
        await raft.stop()
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
