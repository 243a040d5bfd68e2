"""The write path of a lone commit (issue 15): what goes before the fsync, and what the
store writes.

- A leader's appends leave while its own write is still under way (Raft dissertation
  §10.2.1, `Ready.send_before_persist`), on three real RaftNodes over loopback gRPC
  with SQLite stores; a follower's answer never leaves before its write.
- The SQLite store rewrites its restoring flag and peers' stores only when they change.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

from goml.raft.demo import KeyValueStateMachine, wait_for_leader
from goml.raft.node import RaftNode, default_core_config, default_node_config
from goml.raft.server import bind_server, build_store_and_transport
from goml.raft.sqlite_store import SqliteStorage
from goml.raft.types import Entry, HardState, PersistedState, Snapshot

IDS = ("n1", "n2", "n3")
SECRET = b"test-secret"
HOLD_TIMEOUT_S = 30.0  # a held write gives up after this (the test failed by then)


class HeldStorage:
    """A SqliteStorage whose writes of entries can be held back (in the runtime's store
    thread) until the test releases them; it records the last index it stored."""

    def __init__(self, inner: SqliteStorage) -> None:
        self.inner = inner
        self.hold = threading.Event()
        self.release = threading.Event()
        self.holding = threading.Event()
        self.stored_last = 0

    def load(self) -> PersistedState:
        return self.inner.load()

    def persist(
        self,
        snapshot: Snapshot | None,
        entries: tuple[Entry, ...],
        hard_state: HardState | None,
        sync: bool,
    ) -> None:
        if entries and self.hold.is_set():
            self.holding.set()
            assert self.release.wait(HOLD_TIMEOUT_S), "the test never released the write"
        self.inner.persist(snapshot, entries, hard_state, sync)
        if entries:
            self.stored_last = entries[-1].index

    def compact(self, snapshot: Snapshot) -> None:
        self.inner.compact(snapshot)

    def close(self) -> None:
        self.release.set()  # a held write ends (the node is stopping)
        self.inner.close()


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


Body = Callable[[dict[str, RaftNode], dict[str, HeldStorage]], Awaitable[None]]


def _run(tmp_path: Path, body: Body) -> None:
    """Three RaftNodes with held stores; every node and server is stopped afterwards."""

    async def main() -> None:
        ports = dict(zip(IDS, _free_ports(len(IDS)), strict=True))
        addresses = {i: f"127.0.0.1:{p}" for i, p in ports.items()}
        nodes: dict[str, RaftNode] = {}
        stores: dict[str, HeldStorage] = {}
        servers = []
        try:
            for node_id in IDS:
                server, _ = bind_server("127.0.0.1", ports[node_id], None, insecure=True)
                servers.append(server)
                rng = random.Random(f"write-order-{node_id}")
                storage, transport = build_store_and_transport(
                    node_id, addresses, tmp_path / node_id, "test", SECRET, None, True, rng
                )
                stores[node_id] = HeldStorage(storage)
                config = default_node_config(default_core_config(node_id, IDS))
                node = RaftNode(config, stores[node_id], KeyValueStateMachine(), transport, rng)
                node.servicer().add_to_server(server)
                nodes[node_id] = node
                await server.start()
                await node.start()
            async with asyncio.timeout(60):
                await body(nodes, stores)
        finally:
            for store in stores.values():
                store.release.set()
            for node in nodes.values():
                await node.stop()
            for server in servers:
                await server.stop(0.2)

    asyncio.run(main())


def _command(value: str) -> bytes:
    return json.dumps({"key": "k", "value": value}).encode()


def _stored(store: HeldStorage, index: int) -> Callable[[], bool]:
    return lambda: store.stored_last >= index


async def _settled_leader(nodes: dict[str, RaftNode]) -> RaftNode:
    leader = await wait_for_leader(list(nodes.values()), 30.0)
    await leader.propose(_command("settle"), 10.0)  # its term's first entries are in
    return leader


def test_a_leader_sends_its_entries_before_its_own_write_completes(tmp_path: Path) -> None:
    async def body(nodes: dict[str, RaftNode], stores: dict[str, HeldStorage]) -> None:
        leader = await _settled_leader(nodes)
        followers = [n for n in nodes.values() if n is not leader]
        index = leader.commit + 1
        stores[leader.id].hold.set()
        proposal = asyncio.ensure_future(leader.propose(_command("x"), 20.0))
        # Both followers store the entry while the leader's own write is held.
        for follower in followers:
            await follower.wait_for(_stored(stores[follower.id], index), 10.0)
        assert stores[leader.id].holding.is_set()
        assert stores[leader.id].stored_last < index
        assert not proposal.done(), "acknowledged before the leader stored it"
        stores[leader.id].release.set()
        assert await proposal == index
        assert stores[leader.id].stored_last >= index

    _run(tmp_path, body)


def test_a_follower_answers_only_after_its_write(tmp_path: Path) -> None:
    async def body(nodes: dict[str, RaftNode], stores: dict[str, HeldStorage]) -> None:
        leader = await _settled_leader(nodes)
        held, other = [n for n in nodes.values() if n is not leader]
        index = leader.commit + 1
        stores[held.id].hold.set()
        # Committed with the other follower; the held one has not answered for it.
        assert await leader.propose(_command("y"), 20.0) == index
        await held.wait_for(stores[held.id].holding.is_set, 10.0)
        assert leader.match_index(other.id) >= index
        assert leader.match_index(held.id) < index
        stores[held.id].release.set()
        await leader.wait_for(lambda: leader.match_index(held.id) >= index, 10.0)

    _run(tmp_path, body)


# ------------------------------------------------------------------ the store


def test_unchanged_restoring_and_peers_are_not_rewritten(tmp_path: Path) -> None:
    peers = (("n2", 7, 0), ("n3", 9, 0))
    path = tmp_path / "raft.sqlite3"
    with SqliteStorage(path) as store:
        store.load()
        conn = store._conn
        assert conn is not None

        def rows_written(entry: Entry, hard_state: HardState) -> int:
            assert conn is not None
            before = conn.total_changes
            store.persist(None, (entry,), hard_state, True)
            return conn.total_changes - before

        # The first write of these peers: log row, hard state, and both meta rows.
        assert rows_written(Entry(1, 1), HardState(1, "n1", 0, False, peers)) == 4
        # A follower's usual write (a new entry, a new commit index): two rows.
        assert rows_written(Entry(2, 1), HardState(1, "n1", 1, False, peers)) == 2
        assert rows_written(Entry(3, 1), HardState(1, "n1", 2, True, peers)) == 4
        assert rows_written(Entry(4, 1), HardState(1, "n1", 3, True, peers)) == 2
        assert rows_written(Entry(5, 1), HardState(1, "n1", 4, True, peers[:1])) == 4
    with SqliteStorage(path) as store:
        loaded = store.load().hard_state
        assert loaded.restoring and loaded.peers == peers[:1] and loaded.commit == 4
        # Known from load: an unchanged flag and peers are not written again.
        assert store._conn is not None
        before = store._conn.total_changes
        store.persist(None, (Entry(6, 1),), HardState(1, "n1", 5, True, peers[:1]), True)
        assert store._conn.total_changes - before == 2
        store.persist(None, (Entry(7, 1),), HardState(1, "n1", 6, False, peers[:1]), True)
    with SqliteStorage(path) as store:
        loaded = store.load().hard_state
        assert not loaded.restoring and loaded.peers == peers[:1] and loaded.commit == 6
