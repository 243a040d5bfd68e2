"""A local demo of the real Raft runtime: N nodes in one process on loopback.

Elects a leader, makes proposals, stops the leader, shows the failover, and keeps
proposing on the new leader. `goml raft demo` runs it; so does `python -m goml.raft.demo`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from goml.raft.node import RaftNode
from goml.raft.server import LocalNode, bind_server, build_node
from goml.raft.types import NodeId, NotLeader, ProposalDropped

CLUSTER_ID = "goml-demo"
DEMO_SECRET = b"demo-secret-not-for-production"


class KeyValueStateMachine:
    """Commands are JSON {"key": str, "value": any}; apply returns the entry's index."""

    def __init__(self) -> None:
        self.values: dict[str, object] = {}
        self.applied_index = 0

    def apply(self, index: int, data: bytes) -> object:
        assert index > self.applied_index, "entries apply in order, once"
        command = json.loads(data)
        self.values[str(command["key"])] = command["value"]
        self.applied_index = index
        return index

    def snapshot(self) -> bytes:
        return json.dumps({"applied": self.applied_index, "values": self.values}).encode()

    def restore(self, data: bytes) -> None:
        image = json.loads(data)
        self.values = dict(image["values"])
        self.applied_index = int(image["applied"])


async def start_local_cluster(
    ids: list[NodeId], data_dir: Path, seed: int | None = None
) -> tuple[dict[NodeId, LocalNode], dict[NodeId, KeyValueStateMachine], dict[NodeId, str]]:
    """Bind a server per node on a free loopback port, then build and start every node."""
    servers = {i: bind_server("127.0.0.1", 0, None, insecure=True) for i in ids}
    addresses = {i: f"127.0.0.1:{port}" for i, (_, port) in servers.items()}
    machines = {i: KeyValueStateMachine() for i in ids}
    nodes: dict[NodeId, LocalNode] = {}
    for offset, node_id in enumerate(ids):
        server, port = servers[node_id]
        node = build_node(
            node_id,
            addresses,
            data_dir / node_id,
            server,
            machines[node_id],
            CLUSTER_ID,
            DEMO_SECRET,
            None,
            insecure=True,
            seed=None if seed is None else seed + offset,
        )
        nodes[node_id] = LocalNode(node, server, port)
    for local in nodes.values():
        await local.start()
    return nodes, machines, addresses


async def wait_for_leader(
    nodes: list[RaftNode], timeout_s: float, exclude: NodeId = ""
) -> RaftNode:
    """The node that leads, once all running nodes agree on it."""
    deadline = time.monotonic() + timeout_s
    while True:
        leaders = [n for n in nodes if n.running and n.is_leader and n.id != exclude]
        if len(leaders) == 1:
            return leaders[0]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no leader within {timeout_s} s")
        # Wake on any node's next loop iteration (no fixed sleep): whichever is first.
        waits = [
            asyncio.ensure_future(n.wait_for(_role_changed(n), min(remaining, 0.5)))
            for n in nodes
            if n.running
        ]
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for task in done:
            task.exception()  # a timeout here only means: look again


def _applied_at_least(node: RaftNode, index: int) -> Callable[[], bool]:
    return lambda: node.applied >= index


def _role_changed(node: RaftNode) -> Callable[[], bool]:
    initial = (node.role, node.term, node.leader)
    return lambda: (node.role, node.term, node.leader) != initial


async def propose_with_retry(
    nodes: list[RaftNode], data: bytes, timeout_s: float
) -> tuple[NodeId, object]:
    """Propose on whichever node leads, following NotLeader hints; (leader, result)."""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("proposal not acknowledged in time")
        leader = await wait_for_leader(nodes, remaining)
        try:
            return leader.id, await leader.propose(data, min(remaining, 2.0))
        except (NotLeader, ProposalDropped, TimeoutError):
            continue


async def run_demo(nodes: int, proposals: int, data_dir: Path) -> dict[str, object]:
    """Run the demo; prints what happens and returns the numbers."""
    assert nodes >= 3, "failover needs at least 3 nodes"
    assert proposals >= 2
    ids = [f"n{i + 1}" for i in range(nodes)]

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:7.3f} s] {text}", flush=True)

    started = time.monotonic()
    cluster, machines, addresses = await start_local_cluster(ids, data_dir)
    raft_nodes = [c.node for c in cluster.values()]
    say(f"started {nodes} nodes: " + ", ".join(f"{i}@{a}" for i, a in addresses.items()))
    result: dict[str, object] = {}
    try:
        t0 = time.monotonic()
        leader = await wait_for_leader(raft_nodes, 10.0)
        say(
            f"leader elected: {leader.id} (term {leader.term}) after "
            f"{(time.monotonic() - t0) * 1000:.0f} ms"
        )
        first_half = proposals // 2
        latencies: list[float] = []
        for n in range(first_half):
            t = time.perf_counter()
            await propose_with_retry(
                raft_nodes, json.dumps({"key": f"k{n}", "value": n}).encode(), 10.0
            )
            latencies.append((time.perf_counter() - t) * 1000)
        latencies.sort()
        say(
            f"{first_half} proposals committed on {leader.id}: commit {leader.commit}, "
            f"latency p50 {latencies[len(latencies) // 2]:.2f} ms"
        )
        old = leader.id
        say(f"stopping the leader {old} ...")
        killed_at = time.monotonic()
        await cluster[old].stop()
        survivors = [n for n in raft_nodes if n.id != old]
        new_leader_id, _ = await propose_with_retry(
            survivors, json.dumps({"key": "after-failover", "value": True}).encode(), 10.0
        )
        failover_ms = (time.monotonic() - killed_at) * 1000
        new_leader = cluster[new_leader_id].node
        say(
            f"failover: {new_leader_id} leads term {new_leader.term}; first proposal after"
            f" the stop acknowledged {failover_ms:.0f} ms after it"
        )
        for n in range(first_half, proposals):
            await propose_with_retry(
                survivors, json.dumps({"key": f"k{n}", "value": n}).encode(), 10.0
            )
        await new_leader.read_index(5.0)
        say(
            f"{proposals - first_half} more proposals on {new_leader_id}: commit "
            f"{new_leader.commit}"
        )
        commit = new_leader.commit
        for node in survivors:
            await node.wait_for(_applied_at_least(node, commit), 5.0)
        for node in survivors:
            say(
                f"  {node.id}: role {node.role.value}, term {node.term}, commit {node.commit},"
                f" applied {node.applied}, keys {len(machines[node.id].values)}"
            )
        result = {
            "first_leader": old,
            "new_leader": new_leader_id,
            "term": new_leader.term,
            "commit": new_leader.commit,
            "failover_ms": round(failover_ms, 1),
            "keys": len(machines[new_leader_id].values),
        }
        say("done: " + json.dumps(result))
    finally:
        for local in cluster.values():
            await local.stop()
    return result


def main(nodes: int = 3, proposals: int = 100, data_dir: Path | None = None) -> int:
    """Run the demo synchronously (the `goml raft demo` command); returns an exit code."""
    if nodes < 3 or proposals < 2:
        print("the failover demo needs at least 3 nodes and 2 proposals")
        return 2
    if data_dir is not None:
        asyncio.run(run_demo(nodes, proposals, data_dir))
        return 0
    with tempfile.TemporaryDirectory(prefix="goml-raft-demo-") as tmp:
        asyncio.run(run_demo(nodes, proposals, Path(tmp)))
    return 0


def _cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="goml raft demo: failover on loopback")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--proposals", type=int, default=100)
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    return main(args.nodes, args.proposals, args.data_dir)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(_cli())
