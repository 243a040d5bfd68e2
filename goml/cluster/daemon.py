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
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc

from goml import event_loop
from goml.api.auth import TokensError
from goml.cluster.certs import TokensFile, node_entries, node_token, read_secret
from goml.cluster.config import ConfigError, NodeFileConfig, load_node_config
from goml.cluster.duties import DutiesConfig, RetentionConfig
from goml.cluster.manifest import ManifestLimits
from goml.cluster.metrics import Metrics
from goml.cluster.node_core import NodeCoreConfig, NodeReady, standard_config, tuned_raft
from goml.cluster.service import ControlPlane, add_services
from goml.raft.node import NodeRuntime, default_node_config
from goml.raft.replica import raft_config
from goml.raft.server import SERVER_GRACE_S, bind_server, build_store_and_transport
from goml.stall_watch import StallWatch

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


def _tokens(config: NodeFileConfig, secret: bytes) -> TokensFile:
    """The tokens this node accepts: its tokens file and every node's forwarding token."""
    try:
        return TokensFile(config.tokens_file, node_entries(secret, config.cluster_id, config.peers))
    except TokensError as error:
        raise ConfigError(f"tokens_file: {error}") from None


def _follow_members(
    config: NodeFileConfig, secret: bytes, plane: ControlPlane, tokens: TokensFile
) -> Callable[[], None]:
    """After each loop iteration: the nodes that may forward here are the members (a
    node added by `goml node add` forwards to its peers) and those the config file
    names. The peers dict is the same object until the configuration changes."""
    seen: list[object] = [None]

    def follow() -> None:
        peers = plane.peer_addresses()
        if peers is seen[0]:
            return
        seen[0] = peers
        names = {*config.peers, *peers, config.node_id}
        tokens.set_derived(node_entries(secret, config.cluster_id, names))

    return follow


def core_config(config: NodeFileConfig) -> NodeCoreConfig:
    """The node core configuration of this node: the file's settings, goml's standards."""
    timing, d = config.raft, config.duties
    raft = tuned_raft(
        raft_config(
            config.node_id,
            () if config.join else tuple(sorted(config.peers)),
            timing.election_timeout_ms_min,
            timing.election_timeout_ms_max,
            timing.heartbeat_interval_ms,
        ),
        timing,
    )
    duties = DutiesConfig(
        d.agent_timeout_ms,
        d.election_grace_ms,
        d.lease_ms,
        d.renew_before_ms,
        RetentionConfig(**config.retention.model_dump()),
    )
    standard = standard_config(
        raft,
        tuple(sorted(config.peers.items())),
        duties,
        request_timeout_ms=int(config.request_timeout_s * 1000),
        compact_every_entries=default_node_config(raft).replica.compact_every_entries,
        agent_lease_depth_max=config.agent_lease_depth_max,
    )
    # The limits this node's leader duties make the manifest's (SetLimits).
    return replace(standard, limits=ManifestLimits(**config.limits.model_dump()))


async def serve(config: NodeFileConfig, stop: asyncio.Event, why: list[str] | None = None) -> int:
    """Run the node until `stop` is set, or its loop fails; `why` (if given) names what
    set it, for the one line a clean stop logs. The exit code: 0 after a clean stop,
    1 when the loop failed (a process left up with a dead loop would only answer
    UNAVAILABLE; exiting lets its supervisor start it again from its store)."""
    secret = read_secret(config.secret_file).encode()
    tokens = _tokens(config, secret)  # before anything binds: a bad file stops the start
    server_credentials, channel_credentials = _credentials(config)
    host, _, port = config.listen.rpartition(":")
    server, bound = bind_server(host, int(port), server_credentials, config.insecure)
    seed = os.urandom(16)
    storage, transport = build_store_and_transport(
        config.node_id,
        dict(config.peers),
        config.data_dir,
        config.cluster_id,
        secret,
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
    runtime.on_stop(lambda _error: stop.set())  # the loop failed (or stops): so do we
    metrics = Metrics()
    plane = ControlPlane(
        config,
        node_core,
        runtime,
        tokens,
        node_token(secret, config.cluster_id, config.node_id),
        metrics,
        seed,
        channel_credentials,
    )
    runtime.on_durable_write(metrics.store_write_seconds.observe)
    await add_services(server, plane)
    runtime.on_iteration(_follow_members(config, secret, plane, tokens))
    if config.metrics_listen:
        metrics_host, _, metrics_port = config.metrics_listen.rpartition(":")
        metrics.serve(metrics_host, int(metrics_port))
    await server.start()
    await plane.start()
    log.info(
        "node %s serving on %s:%d (event loop %s)",
        config.node_id,
        host,
        bound,
        type(asyncio.get_running_loop()).__module__.split(".")[0],
    )
    loop = asyncio.get_running_loop()
    # A blocked loop sends no heartbeats: the log then says where it was stuck.
    stall_watch = StallWatch(loop, config.node_id, on_stall=metrics.loop_stall_seconds.observe)
    stall_watch.start()
    # SIGHUP re-reads the tokens file (a change is also seen without it). Only the main
    # thread may set signal handlers: elsewhere (an embedding test) there is none.
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGHUP, tokens.reload)
    try:
        await stop.wait()
    finally:
        stall_watch.stop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGHUP)
        await plane.stop()
        await server.stop(SERVER_GRACE_S)
        failure = runtime.failure
        if failure is not None:
            log.error("node %s stopped: its loop failed (%r); exit code 1", config.node_id, failure)
        else:
            cause = f" on {why[0]}" if why else ""
            log.info("node %s stopped cleanly%s", config.node_id, cause)
    return 1 if failure is not None else 0


def run(config_path: Path) -> int:
    """Run the node of `config_path` until SIGTERM/SIGINT; its exit code (see serve)."""
    config = load_node_config(config_path)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {config.node_id} %(levelname)s %(name)s: %(message)s",
    )

    async def main() -> int:
        stop = asyncio.Event()
        why: list[str] = []
        loop = asyncio.get_running_loop()

        def on_signal(signum: signal.Signals) -> None:
            why.append(signum.name)
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(signum, on_signal, signum)
        return await serve(config, stop, why)

    try:
        return event_loop.run(main())
    except event_loop.EventLoopError as error:
        log.error("node %s: %s", config.node_id, error)
        return 2
