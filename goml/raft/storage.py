"""The storage contract between a runtime and its store, and an in-memory store.

A store persists exactly what a `Ready` asks for, in one transaction:

    persist(snapshot, entries, hard_state, sync)

- `snapshot`: a snapshot received from the leader. It replaces the whole log: every
  stored entry is dropped (the core only hands one over when its log disagrees with
  it), and only the `entries` of the same call follow it.
- `entries`: the first entry's index may overwrite a suffix: every stored entry
  with index >= entries[0].index is deleted first (conflict truncation).
- `hard_state`: replaces the stored one.

`compact(snapshot)` is the local log compaction: it stores the snapshot and drops
the entries up to and including its index, keeping the ones after it.

`load()` returns a `PersistedState`. `MemoryStorage` serves tests and the
in-process harness: "crash" means dropping the core and keeping the store.
"""

from __future__ import annotations

from typing import Protocol

from goml.raft.types import Entry, HardState, PersistedState, Snapshot


class Storage(Protocol):
    def load(self) -> PersistedState: ...

    def persist(
        self,
        snapshot: Snapshot | None,
        entries: tuple[Entry, ...],
        hard_state: HardState | None,
        sync: bool,
    ) -> None: ...

    def compact(self, snapshot: Snapshot) -> None: ...

    def close(self) -> None: ...


class MemoryStorage:
    """Everything persisted is kept; nothing else is. Deterministic, no I/O.

    A new store has the `incarnation` it is given: give a node's later store a larger
    one (a wiped node's new store, for instance)."""

    def __init__(self, incarnation: int = 1) -> None:
        assert incarnation >= 1
        self.incarnation = incarnation
        self.hard_state = HardState()
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []
        self.persist_calls = 0

    def load(self) -> PersistedState:
        return PersistedState(
            hard_state=self.hard_state,
            snapshot=self.snapshot,
            entries=tuple(self.entries),
            incarnation=self.incarnation,
        )

    def persist(
        self,
        snapshot: Snapshot | None,
        entries: tuple[Entry, ...],
        hard_state: HardState | None,
        sync: bool,
    ) -> None:
        self.persist_calls += 1
        if snapshot is not None:
            if self.snapshot is not None:
                assert snapshot.index >= self.snapshot.index, "snapshots never go back"
            self.snapshot = snapshot
            self.entries = []
        if entries:
            base = self.snapshot.index if self.snapshot else 0
            first = entries[0].index
            assert base < first <= base + len(self.entries) + 1, "entries must not leave a gap"
            del self.entries[first - base - 1 :]  # the conflicting suffix, if any
            self.entries.extend(entries)
        if hard_state is not None:
            self.hard_state = hard_state
        self._check()

    def compact(self, snapshot: Snapshot) -> None:
        if self.snapshot is not None:
            assert snapshot.index > self.snapshot.index, "compaction moves forward"
        assert any(e.index == snapshot.index and e.term == snapshot.term for e in self.entries)
        self.snapshot = snapshot
        self.entries = [e for e in self.entries if e.index > snapshot.index]
        self._check()

    def _check(self) -> None:
        # O(1): the ends pin down contiguity, since every write keeps indexes consecutive.
        base = self.snapshot.index if self.snapshot else 0
        if self.entries:
            assert self.entries[0].index == base + 1, "stored log must follow the snapshot"
            assert self.entries[-1].index == base + len(self.entries), "stored log has a gap"

    def close(self) -> None:
        pass
