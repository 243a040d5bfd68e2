"""The in-memory Raft log: entries after the last snapshot, and what is not yet persisted."""

from __future__ import annotations

from goml.raft.types import Entry, Snapshot


class RaftLog:
    """Entries `first_index .. last_index`; everything before is covered by a snapshot.

    `unstable_from` is the lowest index that the store does not hold yet: entries from
    there on are handed to the runtime in the next `Ready`.
    """

    def __init__(self, snapshot: Snapshot | None, entries: tuple[Entry, ...]) -> None:
        self.snapshot_index = snapshot.index if snapshot else 0
        self.snapshot_term = snapshot.term if snapshot else 0
        self.entries: list[Entry] = list(entries)
        self.unstable_from = self.last_index + 1
        self._check()

    @property
    def first_index(self) -> int:
        return self.snapshot_index + 1

    @property
    def last_index(self) -> int:
        return self.snapshot_index + len(self.entries)

    @property
    def last_term(self) -> int:
        return self.entries[-1].term if self.entries else self.snapshot_term

    def term_at(self, index: int) -> int | None:
        """The term of the entry at `index`; None when compacted away or beyond the end."""
        if index == self.snapshot_index:
            return self.snapshot_term
        if index < self.snapshot_index or index > self.last_index:
            return None
        return self.entries[index - self.first_index].term

    def matches(self, index: int, term: int) -> bool:
        return self.term_at(index) == term

    def slice(self, low: int, high: int) -> tuple[Entry, ...]:
        """Entries with low <= index < high."""
        assert self.first_index <= low <= high <= self.last_index + 1, (low, high)
        return tuple(self.entries[low - self.first_index : high - self.first_index])

    def append(self, entries: tuple[Entry, ...]) -> None:
        """Append entries that follow the last one directly."""
        for entry in entries:
            assert entry.index == self.last_index + 1, (entry.index, self.last_index)
            assert entry.term >= self.last_term, "terms in a log never decrease"
            self.entries.append(entry)

    def truncate_from(self, index: int) -> None:
        """Drop entries with index >= `index` (conflict resolution on a follower)."""
        assert index > self.snapshot_index, "never truncate into a snapshot"
        del self.entries[index - self.first_index :]
        self.unstable_from = min(self.unstable_from, index)

    def conflict_hint(self, index: int, term: int) -> tuple[int, int]:
        """The largest index <= `index` whose term is <= `term`, and that term.

        This is etcd's findConflictByTerm: a rejection carries it so the leader can
        skip a whole term of mismatching entries at once instead of one per round trip.
        """
        index = min(index, self.last_index)
        while index > self.snapshot_index:
            entry_term = self.term_at(index)
            assert entry_term is not None
            if entry_term <= term:
                return index, entry_term
            index -= 1
        return index, self.snapshot_term if index == self.snapshot_index else 0

    def restore(self, snapshot: Snapshot) -> None:
        """Replace the whole log by a snapshot received from the leader."""
        self.snapshot_index = snapshot.index
        self.snapshot_term = snapshot.term
        self.entries = []
        self.unstable_from = snapshot.index + 1
        self._check()

    def compact(self, index: int) -> int:
        """Drop entries up to and including `index` (already in a local snapshot)."""
        term = self.term_at(index)
        assert term is not None, "compact only inside the log"
        assert index < self.unstable_from, "compact only what is persisted"
        del self.entries[: index - self.first_index + 1]
        self.snapshot_index = index
        self.snapshot_term = term
        self._check()
        return term

    def unstable(self) -> tuple[Entry, ...]:
        return self.slice(self.unstable_from, self.last_index + 1)

    def stable_to(self, index: int) -> None:
        self.unstable_from = max(self.unstable_from, index + 1)

    def _check(self) -> None:
        assert self.snapshot_index >= 0
        if self.entries:
            assert self.entries[0].index == self.first_index
            assert self.entries[-1].index == self.last_index
