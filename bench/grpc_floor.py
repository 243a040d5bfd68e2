"""The floor under goml's API latency: what a lone unary call over mutual TLS costs with
grpc alone, and what goml adds on top, layer by layer, as a sync client sees it.

    python bench/grpc_floor.py [--calls 500] [--skip-cluster]

Part 1, a bare grpc.aio server in its own process (the real node is one), with goml's
proto and the certificates goml/cluster/certs.py makes, answering Status at once:
  bare          the sync stub's `.future(...).result()` (the call goml.client makes)
  +token        the same with goml's bearer-token metadata
  +client       goml.client.Client.status() (its retry policy, lock and done-queue)
  hop           the server's handler hands the call to a loop task and awaits a future
                (the shape of ControlPlane.call -> NodeRuntime.submit -> deliver)
Part 2, a real 3-node TLS cluster on loopback (goml.cluster.local):
  stub Status   the sync stub against the leader (goml's admission, runtime hop, core)
  Client.status/get/submit  through goml.client.Client

A measurement, not a test: on a loaded machine every figure moves; compare rows
within one run, and say the load average beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from goml import event_loop  # noqa: E402
from goml.client import Client, Profile  # noqa: E402
from goml.cluster import local  # noqa: E402
from goml.cluster.certs import credentials, init_certs  # noqa: E402
from goml.proto import api_pb2, api_pb2_grpc  # noqa: E402

WARMUP = 50


# ------------------------------------------------------------------ the bare server


class _Bare(api_pb2_grpc.ClientServicer):
    """Status answered at once, or through one hop into a loop task (`hop`)."""

    def __init__(self, hop: bool) -> None:
        self.hop = hop
        self.inputs: asyncio.Queue[asyncio.Future[Any]] = asyncio.Queue()
        self.wakeup = asyncio.Event()

    async def Status(self, request: Any, context: Any) -> Any:
        context.invocation_metadata()
        context.auth_context()
        if not self.hop:
            return api_pb2.StatusResponse(leader_id="n1")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.inputs.put_nowait(future)
        self.wakeup.set()
        return await future

    async def loop(self) -> None:
        """The runtime's shape: wait for the wake-up, feed the queued inputs, answer."""
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while not self.inputs.empty():
                self.inputs.get_nowait().set_result(api_pb2.StatusResponse(leader_id="n1"))


async def _serve(certs: Path, port_file: Path, hop: bool) -> None:
    ca, cert, key = credentials(certs, "n1").read()
    server = grpc.aio.server()
    servicer = _Bare(hop)
    api_pb2_grpc.add_ClientServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    creds = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    task = asyncio.create_task(servicer.loop())
    port_file.write_text(str(port))
    await server.wait_for_termination()
    task.cancel()


# ------------------------------------------------------------------ measuring


def _time(calls: int, one: Callable[[], object]) -> list[float]:
    for _ in range(WARMUP):
        one()
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        one()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def _row(label: str, samples: list[float]) -> None:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    print(f"  {label:44}{statistics.median(samples):8.3f}{p99:8.3f}")


def _stub_calls(profile: Profile, address: str) -> tuple[grpc.Channel, Any, Any]:
    credentials_ = profile.channel_credentials()
    assert credentials_ is not None
    channel = grpc.secure_channel(address, credentials_)
    stub = api_pb2_grpc.ClientStub(channel)  # type: ignore[no-untyped-call]
    metadata = (("authorization", f"Bearer {profile.token}"),)
    return channel, stub, metadata


def bare(certs: Path, calls: int, hop: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="goml-floor-") as tmp:
        port_file = Path(tmp) / "port"
        argv = [sys.executable, __file__, "--serve", str(certs), str(port_file)]
        server = subprocess.Popen([*argv, "--hop"] if hop else argv)
        try:
            deadline = time.monotonic() + 30
            while not port_file.exists() or not port_file.read_text():
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the bare server did not start")
                time.sleep(0.05)  # polling another process's port file, with a deadline
            address = f"127.0.0.1:{port_file.read_text()}"
            profile = local.client_profile(certs, {"n1": address})
            channel, stub, metadata = _stub_calls(profile, address)
            request = api_pb2.StatusRequest()
            tag = "hop" if hop else "bare"
            _row(
                f"{tag}: stub.Status.future().result()",
                _time(calls, lambda: stub.Status.future(request, timeout=5).result()),
            )
            _row(
                f"{tag}: stub.Status.with_call() (blocking)",
                _time(calls, lambda: stub.Status.with_call(request, timeout=5, metadata=metadata)),
            )
            _row(
                f"{tag}: + token metadata",
                _time(
                    calls,
                    lambda: stub.Status.future(request, timeout=5, metadata=metadata).result(),
                ),
            )
            channel.close()
            with Client(profile, retry_s=30) as client:
                _row(f"{tag}: goml.client.Client.status()", _time(calls, client.status))
        finally:
            server.terminate()
            server.wait(timeout=10)


def cluster(calls: int) -> None:
    with tempfile.TemporaryDirectory(prefix="goml-floor-cluster-") as tmp:
        layout = local.prepare(Path(tmp), nodes=3, insecure=False)
        with local.running_cluster(layout), Client(layout.profile, retry_s=30) as client:
            local.wait_for_leader(layout.profile, timeout_s=30)
            leader = client.status().leader_id
            address = layout.profile.nodes[leader]
            channel, stub, metadata = _stub_calls(layout.profile, address)
            request = api_pb2.StatusRequest()
            _row(
                "cluster: stub Status to the leader",
                _time(
                    calls,
                    lambda: stub.Status.future(request, timeout=5, metadata=metadata).result(),
                ),
            )
            channel.close()
            _row("cluster: Client.status()", _time(calls, client.status))
            task_id = client.submit("matmul", {"n": 4, "m": 4, "k": 4}, cpu=0.1, memory_mb=16)
            _row("cluster: Client.get() (ReadIndex)", _time(calls, lambda: client.get(task_id)))

            def submit() -> None:
                spec = api_pb2.TaskSpec(
                    function="matmul",
                    args_json='{"n": 4, "m": 4, "k": 4}',
                    resources=api_pb2.Resources(cpu=0.1, memory_mb=16),
                    max_attempts=1,
                    timeout_ms=10_000,
                    idempotency_key=str(uuid.uuid4()),
                )
                client.submit_specs([spec])

            _row("cluster: Client.submit_specs([1])", _time(calls, submit))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        event_loop.run(_serve(Path(sys.argv[2]), Path(sys.argv[3]), "--hop" in sys.argv))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--skip-cluster", action="store_true")
    parser.add_argument("--skip-bare", action="store_true")
    args = parser.parse_args()
    if not 1 <= args.calls <= 100_000:
        parser.error("--calls takes 1 to 100000")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"lone unary calls over mutual TLS on loopback, sync client; load {load}")
    print(f"  {'(ms)':44}{'p50':>8}{'p99':>8}")
    with tempfile.TemporaryDirectory(prefix="goml-floor-certs-") as tmp:
        certs = Path(tmp) / "certs"
        init_certs(certs, ["n1"], ["127.0.0.1", "localhost"])
        if not args.skip_bare:
            bare(certs, args.calls, hop=False)
            bare(certs, args.calls, hop=True)
    if not args.skip_cluster:
        cluster(args.calls)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load at the end {load}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
