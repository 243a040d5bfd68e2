"""SqliteStorage: same behaviour as MemoryStorage, durable across kill -9, loud on damage."""

from __future__ import annotations

import os
import random
import selectors
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from goml.raft.sqlite_store import SqliteStorage, StoreCorrupted, StoreLocked, entry_checksum
from goml.raft.storage import MemoryStorage
from goml.raft.types import Entry, EntryKind, HardState, Membership, PersistedState, Snapshot

REPO_ROOT = Path(__file__).resolve().parents[1]
CHILD_DEADLINE_S = 60.0


# --- helpers -------------------------------------------------------------------------


# A new store has an identity of its own: comparisons with MemoryStorage look at
# everything else.
EMPTY = PersistedState()


def plain(state: PersistedState) -> PersistedState:
    assert state.incarnation >= 1
    return replace(state, incarnation=1)


def fill(path: Path, count: int, commit: int, data_bytes: int = 100) -> None:
    with SqliteStorage(path) as store:
        entries = tuple(
            Entry(i, 1 + i // 10, data=i.to_bytes(4, "big") * (data_bytes // 4))
            for i in range(1, count + 1)
        )
        store.persist(None, entries, HardState(term=9, vote="n1", commit=commit), True)


def raw_sql(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for statement in statements:
            conn.execute(statement)
    finally:
        conn.close()


def spawn(script: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


class LineReader:
    """Reads a child's stdout line by line, every wait bounded by a deadline."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.buffer = b""
        self.eof = False
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.fd, selectors.EVENT_READ)

    def lines_until(self, done: int, deadline: float) -> list[str]:
        """Reads until `done` lines arrived, EOF, or the deadline (then fails)."""
        lines: list[str] = []
        while len(lines) < done and not self.eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"child gave {len(lines)} of {done} lines before the deadline")
            if not self.selector.select(timeout=remaining):
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                self.eof = True
            self.buffer += chunk
            *complete, self.buffer = self.buffer.split(b"\n")
            lines.extend(line.decode() for line in complete)
        return lines

    def close(self) -> None:
        self.selector.close()


def kill_child(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=CHILD_DEADLINE_S)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


# --- behaviour equivalence with MemoryStorage ----------------------------------------


class Script:
    """Random but valid Ready-shaped calls, as a Raft core could make them."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.term = 1

    def step(self, state: PersistedState) -> tuple[str, tuple[object, ...]]:
        rng = self.rng
        base = state.snapshot.index if state.snapshot else 0
        last = state.entries[-1].index if state.entries else base
        commit = state.hard_state.commit
        choice = rng.random()
        if choice < 0.12 and commit > base:
            index = rng.randint(base + 1, commit)
            term = state.entries[index - base - 1].term
            data = rng.randbytes(rng.randint(0, 64))
            return "compact", (Snapshot(index, term, data, self.membership()),)
        if choice < 0.2:
            self.term += rng.randint(0, 1)
            index = rng.randint(max(base, commit, 1), last + 5)
            snapshot = Snapshot(
                index, self.term, rng.randbytes(rng.randint(0, 64)), self.membership()
            )
            entries = self.entries(index + 1, rng.randint(0, 3))
            hard_state = HardState(self.term, "n2", rng.randint(index, index + len(entries)))
            return "persist", (snapshot, entries, hard_state, rng.random() < 0.5)
        if choice < 0.3:
            self.term += 1
            vote = rng.choice(["", "n1", "n2", "n3"])
            hard_state = HardState(self.term, vote, rng.randint(commit, last))
            return "persist", (None, (), hard_state, True)
        if choice < 0.32:
            return "persist", (None, (), None, False)
        # Append, sometimes overwriting an uncommitted suffix.
        first = last + 1 if rng.random() < 0.7 else rng.randint(max(base, commit) + 1, last + 1)
        if rng.random() < 0.2:
            self.term += 1
        entries = self.entries(first, rng.randint(1, 8))
        if rng.random() < 0.5:
            return "persist", (None, entries, None, rng.random() < 0.5)
        hard_state = HardState(self.term, "n1", rng.randint(commit, entries[-1].index))
        return "persist", (None, entries, hard_state, rng.random() < 0.5)

    def membership(self) -> Membership | None:
        """A configuration (or none: a snapshot of a store older than configurations)."""
        rng = self.rng
        if rng.random() < 0.3:
            return None
        names = rng.sample(["n1", "n2", "n3", "n4", "n5"], rng.randint(1, 5))
        split = rng.randint(1, len(names))
        voters, learners = sorted(names[:split]), sorted(names[split:])
        addresses = tuple((n, f"10.0.0.{n[1]}:7000") for n in sorted(names) if rng.random() < 0.5)
        return Membership(tuple(voters), tuple(learners), addresses)

    def entries(self, first: int, count: int) -> tuple[Entry, ...]:
        rng = self.rng
        entries = []
        for index in range(first, first + count):
            kind = rng.choice(list(EntryKind))
            data = rng.randbytes(rng.choice([0, 1, 16, 300]))
            if kind is EntryKind.CONFIG:
                data = (self.membership() or Membership(("n1",))).encode()
            entries.append(Entry(index, self.term, kind, data))
        return tuple(entries)


def apply(store: MemoryStorage | SqliteStorage, op: str, args: tuple[object, ...]) -> None:
    if op == "compact":
        (snapshot,) = args
        assert isinstance(snapshot, Snapshot)
        store.compact(snapshot)
    else:
        snapshot, entries, hard_state, sync = args
        assert snapshot is None or isinstance(snapshot, Snapshot)
        assert isinstance(entries, tuple)
        assert hard_state is None or isinstance(hard_state, HardState)
        assert isinstance(sync, bool)
        store.persist(snapshot, entries, hard_state, sync)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_matches_memory_storage(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    script = Script(rng)
    path = tmp_path / "raft.db"
    memory = MemoryStorage()
    store = SqliteStorage(path)
    try:
        assert plain(store.load()) == memory.load() == EMPTY
        for step in range(250):
            op, args = script.step(memory.load())
            apply(memory, op, args)
            apply(store, op, args)
            assert plain(store.load()) == memory.load(), f"seed {seed} step {step}: {op}"
            if rng.random() < 0.1:
                store.close()
                store = SqliteStorage(path)
                assert plain(store.load()) == memory.load(), f"seed {seed} step {step}: reopen"
    finally:
        store.close()
    with SqliteStorage(path) as reopened:
        assert plain(reopened.load()) == memory.load()


def test_new_store_is_empty_and_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "raft.db"
    with SqliteStorage(path) as store:
        assert plain(store.load()) == EMPTY
    assert path.exists()
    with SqliteStorage(path) as store:
        assert plain(store.load()) == EMPTY
        store.persist(None, (Entry(1, 1, data=b"x"),), HardState(1, "n1", 1), True)
    with SqliteStorage(path) as store:
        assert plain(store.load()) == PersistedState(
            HardState(1, "n1", 1), None, (Entry(1, 1, data=b"x"),)
        )


def test_missing_parent_directory_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "absent" / "raft.db"
    with pytest.raises(FileNotFoundError, match="parent directory"):
        SqliteStorage(path)
    assert not path.parent.exists()


def test_invalid_persist_is_rolled_back(tmp_path: Path) -> None:
    path = tmp_path / "raft.db"
    fill(path, 5, commit=3)
    with SqliteStorage(path) as store:
        before = plain(store.load())
        with pytest.raises(AssertionError):
            # Leaves a gap after 5: the hard state would be written first in a naive store.
            store.persist(None, (Entry(7, 2),), HardState(5, "n2", 3), True)
        with pytest.raises(AssertionError, match="earlier transaction"):
            plain(store.load())
    with SqliteStorage(path) as store:
        assert plain(store.load()) == before


# --- kill -9 ---------------------------------------------------------------------------

APPENDER = """
import sys
from pathlib import Path
from goml.raft.sqlite_store import SqliteStorage
from goml.raft.types import Entry, HardState, Snapshot

def term(i): return 1 + i // 50
def data(i): return (b"entry-%d-" % i) * (1 + i % 7)

store = SqliteStorage(Path({path!r}))
for i in range(1, 1_000_000):
    store.persist(None, (Entry(i, term(i), data=data(i)),), HardState(term(i), "n1", i), True)
    if i % 64 == 0:
        store.compact(Snapshot(i - 32, term(i - 32), b"upto-%d" % (i - 32)))
    sys.stdout.write(f"{{i}}\\n")
    sys.stdout.flush()
"""


def test_every_acknowledged_entry_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "raft.db"
    proc = spawn(APPENDER.format(path=str(path)))
    reader = LineReader(proc)
    try:
        acked = reader.lines_until(300, time.monotonic() + CHILD_DEADLINE_S)
        assert len(acked) >= 300, proc.stderr.read() if proc.stderr else ""
        os.kill(proc.pid, signal.SIGKILL)
        # Everything the child printed before dying was acknowledged too.
        acked += reader.lines_until(sys.maxsize, time.monotonic() + CHILD_DEADLINE_S)
    finally:
        reader.close()
        kill_child(proc)
    assert proc.returncode == -signal.SIGKILL
    assert Path(f"{path}-wal").exists(), "reopening must recover from the WAL"
    acked_indexes = [int(line) for line in acked]
    assert acked_indexes == list(range(1, len(acked_indexes) + 1))

    def term(i: int) -> int:
        return 1 + i // 50

    def data(i: int) -> bytes:
        return (b"entry-%d-" % i) * (1 + i % 7)

    with SqliteStorage(path) as store:
        state = plain(store.load())
    assert state.snapshot is not None
    base = state.snapshot.index
    assert state.snapshot == Snapshot(base, term(base), b"upto-%d" % base)
    assert base >= acked_indexes[-1] - 64 - 32
    assert state.entries, "the tail after the snapshot is kept"
    last = state.entries[-1].index
    assert last >= acked_indexes[-1]
    assert last <= acked_indexes[-1] + 1, "at most one persisted but unacknowledged entry"
    for entry in state.entries:
        assert entry == Entry(entry.index, term(entry.index), data=data(entry.index))
    assert state.hard_state == HardState(term(last), "n1", last)


# --- corruption ------------------------------------------------------------------------


def assert_corrupted(path: Path, match: str) -> None:
    with pytest.raises(StoreCorrupted, match=match) as info, SqliteStorage(path) as store:
        plain(store.load())
    assert str(path) in str(info.value)
    # The lock is released even when opening failed.
    with pytest.raises(StoreCorrupted), SqliteStorage(path) as store:
        plain(store.load())


@pytest.mark.parametrize("keep", ["zero", "header", "half", "one-byte-short"])
def test_truncated_file(tmp_path: Path, keep: str) -> None:
    path = tmp_path / "raft.db"
    fill(path, 200, commit=150, data_bytes=1000)
    size = path.stat().st_size
    length = {"zero": 0, "header": 50, "half": size // 2, "one-byte-short": size - 1}[keep]
    os.truncate(path, length)
    assert_corrupted(path, "empty|malformed|checksum|not a")


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "raft.db"
    path.write_bytes(random.Random(7).randbytes(64 * 1024))
    before = path.read_bytes()
    assert_corrupted(path, "not a")
    assert path.read_bytes() == before, "a bad file is never rewritten"


@pytest.mark.parametrize(
    ("statements", "match"),
    [
        (["CREATE TABLE notes (text TEXT)"], "missing tables"),
        (
            [
                "CREATE TABLE meta (key TEXT, value TEXT)",
                "CREATE TABLE hard_state (x)",
                "CREATE TABLE snapshot (x)",
                "CREATE TABLE log (x)",
                "INSERT INTO meta VALUES ('magic', 'someone-else')",
            ],
            "magic",
        ),
    ],
)
def test_foreign_sqlite_database(tmp_path: Path, statements: list[str], match: str) -> None:
    path = tmp_path / "raft.db"
    raw_sql(path, *statements)
    before = path.read_bytes()
    assert_corrupted(path, match)
    assert path.read_bytes() == before


def test_unknown_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "raft.db"
    fill(path, 3, commit=1)
    raw_sql(path, "UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    assert_corrupted(path, "schema version")


@pytest.mark.parametrize(
    ("statement", "match"),
    [
        ("UPDATE log SET data = X'00' WHERE idx = 5", "checksum mismatch at index 5"),
        ("UPDATE log SET term = 99 WHERE idx = 7", "checksum mismatch at index 7"),
        ("UPDATE hard_state SET vote = 'n3'", "hard state checksum"),
        ("UPDATE snapshot SET data = X'01'", "snapshot checksum"),
    ],
)
def test_checksum_mismatch(tmp_path: Path, statement: str, match: str) -> None:
    path = tmp_path / "raft.db"
    fill(path, 10, commit=4)
    with SqliteStorage(path) as store:
        store.compact(Snapshot(2, 1, b"state"))
    raw_sql(path, statement)
    assert_corrupted(path, match)


def test_gap_in_log(tmp_path: Path) -> None:
    path = tmp_path / "raft.db"
    fill(path, 10, commit=4)
    raw_sql(path, "DELETE FROM log WHERE idx = 5")
    assert_corrupted(path, "gap: expected index 5, found 6")


def test_log_not_following_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "raft.db"
    fill(path, 10, commit=4)
    with SqliteStorage(path) as store:
        store.compact(Snapshot(3, 1, b"state"))
    raw_sql(path, "DELETE FROM log WHERE idx = 4")
    assert_corrupted(path, "gap: expected index 4, found 5")


def test_commit_beyond_stored_log(tmp_path: Path) -> None:
    path = tmp_path / "raft.db"
    fill(path, 10, commit=8)
    raw_sql(path, "DELETE FROM log WHERE idx > 5")
    assert_corrupted(path, "commit 8 is beyond the last stored index 5")


def test_wal_without_database(tmp_path: Path) -> None:
    path = tmp_path / "raft.db"
    Path(f"{path}-wal").write_bytes(b"leftover")
    assert_corrupted(path, "database is missing")


# --- locking ---------------------------------------------------------------------------


def test_second_open_in_same_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "raft.db"
    with SqliteStorage(path):
        with pytest.raises(StoreLocked) as info:
            SqliteStorage(path)
        assert str(path) in str(info.value)
    with SqliteStorage(path) as store:
        assert plain(store.load()) == EMPTY


HOLDER = """
import sys
from pathlib import Path
from goml.raft.sqlite_store import SqliteStorage
store = SqliteStorage(Path({path!r}))
print("open", flush=True)
sys.stdin.read()
"""


def test_open_from_another_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "raft.db"
    proc = spawn(HOLDER.format(path=str(path)))
    reader = LineReader(proc)
    try:
        assert reader.lines_until(1, time.monotonic() + CHILD_DEADLINE_S) == ["open"]
        with pytest.raises(StoreLocked) as info:
            SqliteStorage(path)
        assert str(path) in str(info.value)
        assert f"pid {proc.pid}" in str(info.value)
    finally:
        reader.close()
        kill_child(proc)
    # The kernel drops the lock of a killed holder.
    with SqliteStorage(path) as store:
        assert plain(store.load()) == EMPTY


# --- identity and amnesia ----------------------------------------------------------------


def test_each_new_store_has_its_own_growing_incarnation(
    tmp_path: Path,
) -> None:
    first_path, second_path = tmp_path / "a.db", tmp_path / "b.db"
    with SqliteStorage(first_path) as first:
        one = first.load()
    with SqliteStorage(second_path) as second:
        two = second.load()
    assert one.incarnation != two.incarnation
    assert two.incarnation > one.incarnation  # a later store: a larger identity
    assert not one.hard_state.restoring  # a new store is trusted until a peer knew another
    with SqliteStorage(first_path) as again:  # reopening keeps the identity
        assert again.load().incarnation == one.incarnation


def test_restoring_and_peer_stores_persist_with_the_hard_state(tmp_path: Path) -> None:
    path = tmp_path / "raft.db"
    peers = (("n2", 7, 0), ("n3", 9, 5))
    with SqliteStorage(path) as store:
        store.persist(None, (Entry(1, 1),), HardState(1, "n1", 1, True, peers), True)
    with SqliteStorage(path) as store:
        loaded = store.load().hard_state
        assert loaded.restoring and loaded.peers == peers
        store.persist(None, (), HardState(1, "n1", 1, False, peers[:1]), True)
    with SqliteStorage(path) as store:
        loaded = store.load().hard_state
        assert not loaded.restoring and loaded.peers == peers[:1]


def test_a_store_of_an_older_version_is_not_restoring(tmp_path: Path) -> None:
    path = tmp_path / "raft.db"
    with SqliteStorage(path) as store:
        store.persist(None, (Entry(1, 1),), HardState(1, "n1", 1), True)
    conn = sqlite3.connect(path)  # as 0.1 wrote it: no identity, no restoring flag
    conn.execute("DELETE FROM meta WHERE key IN ('incarnation', 'restoring')")
    conn.commit()
    conn.close()
    with SqliteStorage(path) as store:
        loaded = store.load()
    assert loaded.incarnation == 1 and not loaded.hard_state.restoring


def test_a_snapshot_keeps_its_configuration(tmp_path: Path) -> None:
    path = tmp_path / "raft.db"
    membership = Membership(("n1", "n2", "n4"), ("n5",), (("n5", "10.0.0.5:7000"),))
    config = Entry(2, 1, EntryKind.CONFIG, membership.encode())
    with SqliteStorage(path) as store:
        store.persist(None, (Entry(1, 1), config, Entry(3, 1)), HardState(1, "n1", 3), True)
        store.compact(Snapshot(2, 1, b"state", membership))
    with SqliteStorage(path) as store:
        loaded = store.load()
    assert loaded.snapshot == Snapshot(2, 1, b"state", membership)
    assert loaded.entries == (Entry(3, 1),)


def test_a_damaged_configuration_is_named(tmp_path: Path) -> None:
    path = tmp_path / "raft.db"
    with SqliteStorage(path) as store:
        store.persist(None, (Entry(1, 1), Entry(2, 1)), HardState(1, "n1", 2), True)
        store.compact(Snapshot(1, 1, b"state", Membership(("n1", "n2"))))
    raw_sql(
        path, "UPDATE meta SET value = replace(value, 'n2', 'n3') WHERE key = 'snapshot_membership'"
    )
    assert_corrupted(path, "snapshot configuration does not match")
    path = tmp_path / "entries.db"
    with SqliteStorage(path) as store:
        store.persist(None, (Entry(1, 1),), HardState(1, "n1", 1), True)
    # A CONFIG entry that is no configuration, with a valid checksum: read, refused.
    data = b"{}"
    checksum = entry_checksum(2, 1, int(EntryKind.CONFIG), data)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(
        "INSERT INTO log (idx, term, kind, data, checksum) VALUES (2, 1, ?, ?, ?)",
        (int(EntryKind.CONFIG), data, checksum),
    )
    conn.close()
    assert_corrupted(path, "entry 2: not a configuration")
