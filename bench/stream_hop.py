"""What one peer-to-peer message hop costs, by transport and event loop: the floor under
the two hops of every Raft commit (leader -> follower APPEND, follower -> leader answer).

Two processes, A and B, in the shape of goml's peer transport: each writes on its own
connection to the other (a gRPC client stream in goml). A sends a 100-byte message, B
sends it back on its own connection; the round trip is two hops. Kinds, interleaved:

  grpc     grpc.aio client streams (stream-unary, bytes in and out: no protobuf)
  tcp      asyncio streams (open_connection / start_server), 4-byte length prefix
  each on asyncio's own loop and on uvloop (goml/event_loop.py's two choices)

With --tls both use goml's mutual TLS (certificates from goml/cluster/certs.py).

    python bench/stream_hop.py [--rounds 4] [--count 2000] [--tls]

A measurement, not a test: on a loaded machine every figure moves; compare the kinds
within one run, and say the load average beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from goml import event_loop  # noqa: E402
from goml.cluster.certs import credentials, init_certs  # noqa: E402
from goml.cluster.local import free_ports  # noqa: E402

WARMUP = 100
PAYLOAD = b"x" * 100
KINDS = ("grpc/asyncio", "tcp/asyncio", "grpc/uvloop", "tcp/uvloop")
TIMEOUT_S = 120.0
METHOD = "/hop.Hop/Stream"


def _same(data: bytes) -> bytes:
    return data


class Side:
    """One process: a server that queues what arrives, a connection to the other side."""

    def __init__(self, role: str, count: int, certs: Path | None) -> None:
        self.role = role
        self.count = count
        self.certs = certs
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue(maxsize=count + WARMUP + 1)

    async def run(self, send: Any) -> list[float]:
        """B echoes every message; A times COUNT round trips after a warm-up."""
        samples: list[float] = []
        for n in range(self.count + WARMUP):
            if self.role == "b":
                async with asyncio.timeout(TIMEOUT_S):
                    await send(await self.inbox.get())
                continue
            started = time.perf_counter()
            await send(PAYLOAD)
            async with asyncio.timeout(TIMEOUT_S):
                await self.inbox.get()
            if n >= WARMUP:
                samples.append((time.perf_counter() - started) * 1000)
        return samples

    def ssl_contexts(self) -> tuple[ssl.SSLContext, ssl.SSLContext] | None:
        if self.certs is None:
            return None
        files = credentials(self.certs, "n1")
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(files.ca))
        server.load_cert_chain(str(files.cert), str(files.key))
        server.verify_mode = ssl.CERT_REQUIRED
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files.ca))
        client.load_cert_chain(str(files.cert), str(files.key))
        return server, client

    async def grpc(self, my_port: int, peer_port: int) -> list[float]:
        async def handler(requests: AsyncIterator[bytes], context: Any) -> bytes:
            async for message in requests:
                self.inbox.put_nowait(message)
            return b""

        server = grpc.aio.server()
        rpc = grpc.stream_unary_rpc_method_handler(handler, _same, _same)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("hop.Hop", {"Stream": rpc}),)
        )
        target = f"127.0.0.1:{peer_port}"
        if self.certs is None:
            server.add_insecure_port(f"127.0.0.1:{my_port}")
            channel = grpc.aio.insecure_channel(target)
        else:
            ca, cert, key = credentials(self.certs, "n1").read()
            server_creds = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=ca, require_client_auth=True
            )
            server.add_secure_port(f"127.0.0.1:{my_port}", server_creds)
            channel_creds = grpc.ssl_channel_credentials(ca, key, cert)
            channel = grpc.aio.secure_channel(target, channel_creds)
        await server.start()
        async with asyncio.timeout(TIMEOUT_S):
            await channel.channel_ready()
        call = channel.stream_unary(METHOD, _same, _same)()
        try:
            samples = await self.run(call.write)
            await call.done_writing()  # the other side's handler returns: a quiet end
            async with asyncio.timeout(TIMEOUT_S):
                await call
            return samples
        finally:
            call.cancel()
            await channel.close()
            await server.stop(grace=1.0)  # lets the other side's stream to us end first

    async def tcp(self, my_port: int, peer_port: int) -> list[float]:
        inbound_ended = asyncio.Event()

        async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    size = struct.unpack(">I", await reader.readexactly(4))[0]
                    self.inbox.put_nowait(await reader.readexactly(size))
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()
            finally:
                inbound_ended.set()

        contexts = self.ssl_contexts()
        server_ssl, client_ssl = contexts if contexts else (None, None)
        server = await asyncio.start_server(on_connection, "127.0.0.1", my_port, ssl=server_ssl)
        deadline = time.monotonic() + TIMEOUT_S
        while True:  # the other side may not listen yet
            try:
                _, writer = await asyncio.open_connection(
                    "127.0.0.1",
                    peer_port,
                    ssl=client_ssl,
                    server_hostname="localhost" if client_ssl else None,
                )
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)  # retrying a connect to another process

        async def send(message: bytes) -> None:
            writer.write(struct.pack(">I", len(message)) + message)

        try:
            return await self.run(send)
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
            with contextlib.suppress(TimeoutError):  # the other side closes its own too
                async with asyncio.timeout(TIMEOUT_S):
                    await inbound_ended.wait()
            server.close()
            await server.wait_closed()


def side_main(argv: list[str]) -> int:
    kind, role, my_port, peer_port, count, certs = argv
    transport, loop = kind.split("/")
    side = Side(role, int(count), Path(certs) if certs else None)
    body = side.grpc if transport == "grpc" else side.tcp
    samples = event_loop.run(body(int(my_port), int(peer_port)), loop)
    if role == "a":
        print(" ".join(f"{x:.4f}" for x in samples))
    return 0


def one_run(kind: str, count: int, certs: Path | None) -> list[float]:
    """Start B then A (each stopped by PID, also on failure); A's round trips."""
    port_a, port_b = free_ports(2)
    tail = [str(count), str(certs or "")]
    argv = [sys.executable, __file__, "--side", kind]
    b = subprocess.Popen([*argv, "b", str(port_b), str(port_a), *tail])
    a = subprocess.Popen(
        [*argv, "a", str(port_a), str(port_b), *tail], stdout=subprocess.PIPE, text=True
    )
    try:
        out, _ = a.communicate(timeout=TIMEOUT_S)
        b.wait(timeout=TIMEOUT_S)
    finally:
        for process in (a, b):
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
    if a.returncode != 0:
        raise RuntimeError(f"{kind}: side A exited with {a.returncode}")
    return [float(x) for x in out.split()]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--side":
        return side_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--tls", action="store_true", help="goml's mutual TLS on both")
    args = parser.parse_args()
    if not 1 <= args.rounds <= 50 or not 1 <= args.count <= 100_000:
        parser.error("--rounds takes 1 to 50, --count 1 to 100000")
    try:
        event_loop.loop_factory("uvloop")  # it compares the two loops: both must run
    except event_loop.EventLoopError as error:
        print(f"stream_hop: {error} (pip install uvloop)", file=sys.stderr)
        return 2
    medians: dict[str, list[float]] = defaultdict(list)
    p90s: dict[str, list[float]] = defaultdict(list)
    loads = []
    with tempfile.TemporaryDirectory(prefix="goml-hop-") as tmp:
        certs = Path(tmp) / "certs" if args.tls else None
        if certs is not None:
            init_certs(certs, ["n1"], ["127.0.0.1", "localhost"])
        for round_index in range(args.rounds):
            loads.append(f"{os.getloadavg()[0]:.2f}")
            for kind in KINDS if round_index % 2 == 0 else tuple(reversed(KINDS)):
                samples = sorted(one_run(kind, args.count, certs))
                medians[kind].append(statistics.median(samples))
                p90s[kind].append(samples[len(samples) * 9 // 10])
    security = "mutual TLS" if args.tls else "plaintext"
    print(
        f"round trip (two one-way hops) of a 100-byte message between two processes on "
        f"loopback, {security}; {args.rounds} interleaved rounds of {args.count}; "
        f"1-min load at each round's start: {loads}"
    )
    print(f"  {'(ms)':16}{'p50':>8}{'p90':>8}   p50 per round")
    for kind in KINDS:
        rounds = " ".join(f"{x:.3f}" for x in medians[kind])
        p50, p90 = statistics.median(medians[kind]), statistics.median(p90s[kind])
        print(f"  {kind:16}{p50:8.3f}{p90:8.3f}   {rounds}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
