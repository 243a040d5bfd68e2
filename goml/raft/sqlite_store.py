"""A durable `Storage` on SQLite: WAL mode, `synchronous=FULL`, one transaction per call.

Behaves exactly like `MemoryStorage` (goml.raft.storage); see that module for the contract.

Safety rules:
- `persist` and `compact` each run in one `BEGIN IMMEDIATE ... COMMIT`; once they
  return, the change is on disk (WAL fsync'd at commit). `sync=False` is accepted and
  ignored: every commit is fsync'd.
- Every row carries a blake2b checksum, computed before writing and checked after
  reading (pair assertions). Any damage found when opening or loading raises
  `StoreCorrupted` naming the file; an existing file is never treated as a new store.
- A new store is built under a temporary name and renamed into place, so a crash during
  creation leaves either no store or a complete empty one.
- `<path>.lock` is held with `flock` while the store is open: a second opener (another
  process, or the same one) gets `StoreLocked`. The kernel releases it when the holder dies.
- Calls must be serialised by the caller (one runtime owns one store). After any error
  inside a transaction the store refuses further use: its on-disk state is unknown.
- A full disk is `StoreFull` (an OSError, ENOSPC), never `StoreCorrupted`: the write is
  rolled back whole, so nothing it carried is stored, and a runtime that persists before
  it sends has acknowledged none of it. The store stays intact: free space and restart.
  SQLite says SQLITE_FULL while writing, but only "disk I/O error" when it cannot create
  its shared-memory index at open: an I/O error on a file system with no free space
  left is taken for what it almost always is.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import sqlite3
import struct
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import TracebackType

from goml.raft.types import (
    Entry,
    EntryKind,
    HardState,
    Membership,
    MembershipInvalid,
    PersistedState,
    Snapshot,
)

STORE_MAGIC = "goml-raft-store"
LEGACY_INCARNATION = 1
SCHEMA_VERSION = 1
_KINDS = frozenset(int(kind) for kind in EntryKind)
# Below this much free space on the store's file system, an I/O error is a full disk.
FULL_FREE_BYTES_MAX = 1024 * 1024

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT",
    "CREATE TABLE hard_state (id INTEGER PRIMARY KEY CHECK (id = 0), term INTEGER NOT NULL,"
    " vote TEXT NOT NULL, commit_index INTEGER NOT NULL, checksum BLOB NOT NULL) STRICT",
    "CREATE TABLE snapshot (id INTEGER PRIMARY KEY CHECK (id = 0), idx INTEGER NOT NULL,"
    " term INTEGER NOT NULL, data BLOB NOT NULL, checksum BLOB NOT NULL) STRICT",
    "CREATE TABLE log (idx INTEGER PRIMARY KEY, term INTEGER NOT NULL, kind INTEGER NOT NULL,"
    " data BLOB NOT NULL, checksum BLOB NOT NULL) STRICT",
)


class StoreCorrupted(Exception):
    """The store file exists but cannot be trusted. Never start empty instead."""


class StoreLocked(Exception):
    """Another opener holds the store: two nodes on one data directory."""


class StoreFull(OSError):
    """The file system holding the store has no space left. The write (or the opening)
    was refused whole: nothing it carried is stored. The store is intact: free space
    and restart the node."""


def disk_full(path: Path, error: BaseException) -> StoreFull | None:
    """`error` (met on the store at `path`) as a StoreFull when the disk is full, else None."""
    if isinstance(error, StoreFull):
        return error
    if isinstance(error, sqlite3.Error):
        code = getattr(error, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        full = primary == sqlite3.SQLITE_FULL or (
            primary == sqlite3.SQLITE_IOERR and _free_bytes(path) < FULL_FREE_BYTES_MAX
        )
    elif isinstance(error, OSError):
        full = error.errno in (errno.ENOSPC, errno.EDQUOT)
    else:
        full = False
    if not full:
        return None
    free = _free_bytes(path)
    shown = f"{free} bytes" if free >= 0 else "unknown space"
    return StoreFull(
        errno.ENOSPC,
        f"{path}: disk full ({error}; {shown} free on the file system holding "
        f"{path.parent}): the write was refused whole and nothing it carried was stored or "
        "acknowledged; free space there and restart the node (the store is intact)",
    )


def _free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use next to `path` (-1 if unknown)."""
    try:
        stat = os.statvfs(path.parent)
    except OSError:
        return -1
    return stat.f_bavail * stat.f_frsize


def new_incarnation() -> int:
    """A new store's identity: its creation time in microseconds (so a node's later
    store has a larger one) plus random low digits (two stores made in the same
    microsecond still differ)."""
    return time.time_ns() // 1000 * 1000 + secrets.randbelow(1000)


def _digest(person: bytes, header: bytes, data: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16, person=person)
    h.update(header)
    h.update(data)
    return h.digest()


def entry_checksum(index: int, term: int, kind: int, data: bytes) -> bytes:
    return _digest(b"goml-entry", struct.pack(">qqq", index, term, kind), data)


def snapshot_checksum(index: int, term: int, data: bytes) -> bytes:
    return _digest(b"goml-snapshot", struct.pack(">qq", index, term), data)


def hard_state_checksum(term: int, vote: str, commit: int) -> bytes:
    return _digest(b"goml-hard-state", struct.pack(">qq", term, commit), vote.encode())


def membership_checksum(index: int, encoded: bytes) -> bytes:
    return _digest(b"goml-membership", struct.pack(">q", index), encoded)


class SqliteStorage:
    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.parent.is_dir():
            raise FileNotFoundError(f"{path}: parent directory {path.parent} does not exist")
        try:
            self._lock_fd = _acquire_lock(path)
        except OSError as exc:
            full = disk_full(path, exc)
            if full is None:
                raise
            raise full from exc
        self._broken = False
        # (restoring, peers) as the meta table holds them, once known: unchanged, they
        # are not rewritten (one page less to write and fsync per persist).
        self._meta_stored: tuple[bool, tuple[tuple[str, int, int], ...]] | None = None
        try:
            if not path.exists():
                self._create()
            self._conn: sqlite3.Connection | None = self._open()
        except BaseException as exc:
            os.close(self._lock_fd)
            full = disk_full(path, exc)
            if full is not None:
                raise full from exc
            raise

    # --- opening -----------------------------------------------------------------

    def _create(self) -> None:
        wal = Path(f"{self.path}-wal")
        if wal.exists():
            raise StoreCorrupted(f"{self.path}: database is missing but {wal} exists")
        tmp = Path(f"{self.path}.creating")
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm"), Path(f"{tmp}-journal")):
            leftover.unlink(missing_ok=True)
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            assert conn.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [
                    ("magic", STORE_MAGIC),
                    ("schema_version", str(SCHEMA_VERSION)),
                    ("incarnation", str(new_incarnation())),
                ],
            )
            empty = HardState()
            conn.execute(
                "INSERT INTO hard_state VALUES (0, ?, ?, ?, ?)",
                (empty.term, empty.vote, empty.commit, hard_state_checksum(0, empty.vote, 0)),
            )
            conn.execute("COMMIT")
        finally:
            conn.close()  # checkpoints the WAL into the file and removes it
        _fsync_path(tmp, directory=False)
        os.replace(tmp, self.path)
        _fsync_path(self.path.parent, directory=True)

    def _open(self) -> sqlite3.Connection:
        if self.path.stat().st_size == 0:
            raise StoreCorrupted(f"{self.path}: file is empty, not a goml raft store")
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise StoreCorrupted(f"{self.path}: SQLite integrity check failed: {problems[:5]}")
            self._check_meta(conn)
            assert conn.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
            conn.execute("PRAGMA synchronous=FULL")
            assert conn.execute("PRAGMA synchronous").fetchone() == (2,)
        except sqlite3.DatabaseError as exc:
            conn.close()
            full = disk_full(self.path, exc)
            if full is not None:
                raise full from exc
            raise StoreCorrupted(f"{self.path}: not a readable SQLite database: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_meta(self, conn: sqlite3.Connection) -> None:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        missing = {"meta", "hard_state", "snapshot", "log"} - tables
        if missing:
            raise StoreCorrupted(
                f"{self.path}: not a goml raft store (missing tables {sorted(missing)})"
            )
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("magic") != STORE_MAGIC:
            raise StoreCorrupted(
                f"{self.path}: not a goml raft store (magic {meta.get('magic')!r})"
            )
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise StoreCorrupted(
                f"{self.path}: unsupported schema version {meta.get('schema_version')!r}"
                f" (expected {SCHEMA_VERSION})"
            )

    # --- Storage protocol --------------------------------------------------------

    def _meta(self, conn: sqlite3.Connection) -> tuple[int, bool, tuple[tuple[str, int, int], ...]]:
        meta = dict(
            conn.execute(
                "SELECT key, value FROM meta WHERE key IN ('incarnation', 'restoring', 'peers')"
            )
        )
        # Stores written before incarnations existed: one fixed identity, not restoring.
        incarnation = int(meta.get("incarnation", LEGACY_INCARNATION))
        if incarnation < 1:
            raise StoreCorrupted(f"{self.path}: incarnation {incarnation} is not positive")
        try:
            raw = json.loads(meta.get("peers", "[]"))
            peers = tuple((str(p), int(i), int(b)) for p, i, b in raw)
        except (ValueError, TypeError) as exc:
            raise StoreCorrupted(f"{self.path}: unreadable peer incarnations: {exc}") from exc
        return incarnation, meta.get("restoring") == "1", peers

    def load(self) -> PersistedState:
        conn = self._connection()
        try:
            conn.execute("BEGIN")
            try:
                hard_rows = conn.execute(
                    "SELECT term, vote, commit_index, checksum FROM hard_state"
                ).fetchall()
                snapshot_rows = conn.execute(
                    "SELECT idx, term, data, checksum FROM snapshot"
                ).fetchall()
                log_rows = conn.execute(
                    "SELECT idx, term, kind, data, checksum FROM log ORDER BY idx"
                ).fetchall()
                membership_rows = conn.execute(
                    "SELECT value FROM meta WHERE key = 'snapshot_membership'"
                ).fetchall()
                incarnation, restoring, peers = self._meta(conn)
            finally:
                conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            full = disk_full(self.path, exc)
            if full is not None:
                raise full from exc
            raise StoreCorrupted(f"{self.path}: cannot read the store: {exc}") from exc
        hard_state = replace(self._decode_hard_state(hard_rows), restoring=restoring, peers=peers)
        self._meta_stored = (restoring, peers)
        snapshot = self._decode_snapshot(snapshot_rows)
        if snapshot is not None and membership_rows:
            membership = self._decode_membership(str(membership_rows[0][0]), snapshot.index)
            snapshot = replace(snapshot, membership=membership)
        base = snapshot.index if snapshot is not None else 0
        entries = self._decode_log(log_rows, base)
        last = entries[-1].index if entries else base
        if hard_state.commit > last:
            raise StoreCorrupted(
                f"{self.path}: hard state commit {hard_state.commit} is beyond the last"
                f" stored index {last}"
            )
        return PersistedState(
            hard_state=hard_state, snapshot=snapshot, entries=entries, incarnation=incarnation
        )

    def persist(
        self,
        snapshot: Snapshot | None,
        entries: tuple[Entry, ...],
        hard_state: HardState | None,
        sync: bool,
    ) -> None:
        with self._transaction() as conn:
            base, last = _bounds(conn)
            if snapshot is not None:
                assert snapshot.index >= base, "snapshots never go back"
                conn.execute("DELETE FROM log")
                _write_snapshot(conn, snapshot)
                base = last = snapshot.index
            if entries:
                first = entries[0].index
                assert first > base, "entries must follow the snapshot"
                assert first <= last + 1, "entries must not leave a gap"
                for offset, entry in enumerate(entries):
                    assert entry.index == first + offset, "entries must be contiguous"
                if first <= last:  # a conflicting suffix (else nothing to delete)
                    conn.execute("DELETE FROM log WHERE idx >= ?", (first,))
                conn.executemany(
                    "INSERT INTO log (idx, term, kind, data, checksum) VALUES (?, ?, ?, ?, ?)",
                    [
                        (
                            e.index,
                            e.term,
                            int(e.kind),
                            e.data,
                            entry_checksum(e.index, e.term, int(e.kind), e.data),
                        )
                        for e in entries
                    ],
                )
                last = entries[-1].index
            if hard_state is not None:
                conn.execute(
                    "UPDATE hard_state SET term = ?, vote = ?, commit_index = ?, checksum = ?"
                    " WHERE id = 0",
                    (
                        hard_state.term,
                        hard_state.vote,
                        hard_state.commit,
                        hard_state_checksum(hard_state.term, hard_state.vote, hard_state.commit),
                    ),
                )
                meta = (hard_state.restoring, hard_state.peers)
                if meta != self._meta_stored:
                    conn.executemany(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                        [
                            ("restoring", "1" if hard_state.restoring else "0"),
                            ("peers", json.dumps([list(peer) for peer in hard_state.peers])),
                        ],
                    )
            _check_commit(conn, last)
        if hard_state is not None:
            self._meta_stored = (hard_state.restoring, hard_state.peers)  # committed

    def compact(self, snapshot: Snapshot) -> None:
        with self._transaction() as conn:
            base, last = _bounds(conn)
            assert snapshot.index > base, "compaction moves forward"
            row = conn.execute("SELECT term FROM log WHERE idx = ?", (snapshot.index,)).fetchone()
            assert row is not None, "compaction point must be a stored entry"
            assert row[0] == snapshot.term, "compaction point term must match the entry"
            _write_snapshot(conn, snapshot)
            conn.execute("DELETE FROM log WHERE idx <= ?", (snapshot.index,))
            _check_commit(conn, last)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
            os.close(self._lock_fd)

    def __enter__(self) -> SqliteStorage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- internals ---------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        assert self._conn is not None, "store is closed"
        assert not self._broken, "store failed in an earlier transaction"
        return self._conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            self._broken = True
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            full = disk_full(self.path, exc)
            if full is not None:
                raise full from exc
            raise
        assert not conn.in_transaction

    def _decode_hard_state(self, rows: list[tuple[object, ...]]) -> HardState:
        if len(rows) != 1:
            raise StoreCorrupted(f"{self.path}: expected 1 hard state row, found {len(rows)}")
        term, vote, commit, checksum = rows[0]
        if not (isinstance(term, int) and isinstance(vote, str) and isinstance(commit, int)):
            raise StoreCorrupted(f"{self.path}: hard state has wrong column types")
        if checksum != hard_state_checksum(term, vote, commit):
            raise StoreCorrupted(f"{self.path}: hard state checksum mismatch")
        if term < 0 or commit < 0:
            raise StoreCorrupted(f"{self.path}: hard state has negative term or commit")
        return HardState(term=term, vote=vote, commit=commit)

    def _decode_snapshot(self, rows: list[tuple[object, ...]]) -> Snapshot | None:
        if not rows:
            return None
        if len(rows) != 1:
            raise StoreCorrupted(f"{self.path}: expected at most 1 snapshot, found {len(rows)}")
        index, term, data, checksum = rows[0]
        if not (isinstance(index, int) and isinstance(term, int) and isinstance(data, bytes)):
            raise StoreCorrupted(f"{self.path}: snapshot has wrong column types")
        if checksum != snapshot_checksum(index, term, data):
            raise StoreCorrupted(f"{self.path}: snapshot checksum mismatch (index {index})")
        if index < 1 or term < 1:
            raise StoreCorrupted(f"{self.path}: snapshot has index {index}, term {term}")
        return Snapshot(index=index, term=term, data=data)

    def _decode_membership(self, text: str, index: int) -> Membership:
        """The configuration stored with the snapshot at `index` (checksummed, bound to
        that index: one left by an older snapshot is damage)."""
        try:
            value = json.loads(text)
            encoded = str(value["membership"]).encode()
            stored_index = int(value["index"])
            checksum = bytes.fromhex(str(value["checksum"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreCorrupted(f"{self.path}: unreadable snapshot configuration: {exc}") from exc
        if stored_index != index or checksum != membership_checksum(index, encoded):
            raise StoreCorrupted(
                f"{self.path}: snapshot configuration does not match the snapshot at {index}"
            )
        try:
            return Membership.decode(encoded)
        except MembershipInvalid as exc:
            raise StoreCorrupted(f"{self.path}: snapshot configuration: {exc}") from exc

    def _decode_log(self, rows: list[tuple[object, ...]], base: int) -> tuple[Entry, ...]:
        entries: list[Entry] = []
        for offset, (index, term, kind, data, checksum) in enumerate(rows):
            if not (
                isinstance(index, int)
                and isinstance(term, int)
                and isinstance(kind, int)
                and isinstance(data, bytes)
            ):
                raise StoreCorrupted(f"{self.path}: log row {index!r} has wrong column types")
            expected = base + 1 + offset
            if index != expected:
                raise StoreCorrupted(
                    f"{self.path}: log gap: expected index {expected}, found {index}"
                    f" (snapshot index {base})"
                )
            if checksum != entry_checksum(index, term, kind, data):
                raise StoreCorrupted(f"{self.path}: entry checksum mismatch at index {index}")
            if term < 1 or kind not in _KINDS:
                raise StoreCorrupted(f"{self.path}: entry {index} has term {term}, kind {kind}")
            if kind == EntryKind.CONFIG:
                try:
                    Membership.decode(data)
                except MembershipInvalid as exc:
                    raise StoreCorrupted(f"{self.path}: entry {index}: {exc}") from exc
            entries.append(Entry(index=index, term=term, kind=EntryKind(kind), data=data))
        return tuple(entries)


def _bounds(conn: sqlite3.Connection) -> tuple[int, int]:
    """(snapshot index or 0, last stored index)."""
    row = conn.execute("SELECT idx FROM snapshot WHERE id = 0").fetchone()
    base = row[0] if row is not None else 0
    (last_entry,) = conn.execute("SELECT MAX(idx) FROM log").fetchone()
    last = last_entry if last_entry is not None else base
    assert isinstance(base, int) and isinstance(last, int)
    assert last >= base
    return base, last


def _check_commit(conn: sqlite3.Connection, last: int) -> None:
    (commit,) = conn.execute("SELECT commit_index FROM hard_state WHERE id = 0").fetchone()
    assert isinstance(commit, int)
    assert commit <= last, "commit must not pass the last stored index"


def _write_snapshot(conn: sqlite3.Connection, snapshot: Snapshot) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO snapshot (id, idx, term, data, checksum) VALUES (0, ?, ?, ?, ?)",
        (
            snapshot.index,
            snapshot.term,
            snapshot.data,
            snapshot_checksum(snapshot.index, snapshot.term, snapshot.data),
        ),
    )
    # The configuration at the snapshot's index, in the same transaction (a meta row:
    # no schema change, and a store without one is read as it always was).
    if snapshot.membership is None:
        conn.execute("DELETE FROM meta WHERE key = 'snapshot_membership'")
        return
    encoded = snapshot.membership.encode()
    value = {
        "index": snapshot.index,
        "membership": encoded.decode(),
        "checksum": membership_checksum(snapshot.index, encoded).hex(),
    }
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('snapshot_membership', ?)",
        (json.dumps(value, sort_keys=True),),
    )


def _acquire_lock(path: Path) -> int:
    lock_path = f"{path}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise StoreLocked(
            f"{path}: store is already open (lock {lock_path} held by pid {holder or '?'})"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # fails with ENOSPC on a full disk
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fsync_path(path: Path, directory: bool) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
