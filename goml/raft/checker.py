"""Raft's safety properties, checked from the outside on a running cluster of cores.

Used by the in-process harness and by the simulator: both feed it what they observe
(a node's role after each step, every entry a node applies, the logs at the end).
"""

from __future__ import annotations

import bisect

from goml.raft.core import RaftCore
from goml.raft.types import Entry, EntryKind, NodeId, Role


class SafetyViolation(AssertionError):
    pass


class SafetyChecker:
    def __init__(self) -> None:
        self.leaders_by_term: dict[int, NodeId] = {}
        self.applied: dict[int, tuple[int, bytes]] = {}  # index -> (term, data), as applied
        self.commands: set[int] = set()  # indexes of applied commands (not leaders' entries)
        self.applied_max = 0
        # (node, term) -> highest applied index already found in that leader's log. A
        # leader never drops entries, so each one needs checking only once per term.
        self._completeness_checked: dict[tuple[NodeId, int], int] = {}
        # When each index was first seen committed: (highest index, term of the leader
        # whose commit reached it), both increasing. Leader completeness is about the
        # leaders of that term and later ones: a stale leader (say one whose disk
        # stalled while a newer term elected and committed) may lack what a newer term
        # committed until it hears of that term, as Raft allows.
        self._commit_indexes: list[int] = []
        self._commit_terms: list[int] = []

    def observe(self, node_id: NodeId, core: RaftCore) -> None:
        """Call after every step of `core`."""
        if core.role is Role.LEADER:
            # Election safety: at most one leader per term.
            holder = self.leaders_by_term.setdefault(core.term, node_id)
            if holder != node_id:
                raise SafetyViolation(
                    f"election safety: {holder} and {node_id} both lead term {core.term}"
                )
            if core.commit > (self._commit_indexes[-1] if self._commit_indexes else 0):
                self._commit_indexes.append(core.commit)
                self._commit_terms.append(core.term)
            # Leader completeness: every entry committed in this term or an earlier one,
            # and applied anywhere, is in this leader's log.
            key = (node_id, core.term)
            start = max(self._completeness_checked.get(key, 0), core.log.snapshot_index) + 1
            for index in range(start, self.applied_max + 1):
                known = self.applied.get(index)
                if known is None or self._committed_in(index, known[0]) > core.term:
                    continue
                if core.log.term_at(index) != known[0]:
                    raise SafetyViolation(
                        f"leader completeness: {node_id} (term {core.term}) lacks committed "
                        f"entry {index}/{known[0]}"
                    )
            self._completeness_checked[key] = max(start - 1, self.applied_max)
        if core.commit > core.log.last_index:
            raise SafetyViolation(f"{node_id}: commit {core.commit} beyond its log")

    def _committed_in(self, index: int, entry_term: int) -> int:
        """The term in which `index` was first seen committed (its own term when no
        leader was seen committing it: never later than its commit)."""
        found = bisect.bisect_left(self._commit_indexes, index)
        if found == len(self._commit_indexes):
            return entry_term
        return max(entry_term, self._commit_terms[found])

    def applied_entry(self, node_id: NodeId, entry: Entry) -> None:
        """State-machine safety: every node applies the same entry at each index."""
        index, term, data = entry.index, entry.term, entry.data
        if entry.kind is EntryKind.NORMAL:
            self.commands.add(index)
        known = self.applied.setdefault(index, (term, data))
        self.applied_max = max(self.applied_max, index)
        if known != (term, data):
            raise SafetyViolation(
                f"state-machine safety: {node_id} applied {(term, data[:60])!r} at {index}, "
                f"another node applied {(known[0], known[1][:60])!r}"
            )

    @staticmethod
    def check_log_matching(cores: dict[NodeId, RaftCore]) -> None:
        """If two logs hold an entry with the same index and term, they are identical up
        to that index."""
        ids = sorted(cores)
        for i, a in enumerate(ids):
            for b in ids[i + 1 :]:
                log_a, log_b = cores[a].log, cores[b].log
                low = max(log_a.first_index, log_b.first_index)
                high = min(log_a.last_index, log_b.last_index)
                matched = False
                for index in range(high, low - 1, -1):
                    same = log_a.term_at(index) == log_b.term_at(index)
                    if matched and not same:
                        raise SafetyViolation(f"log matching: {a} and {b} differ at {index}")
                    if same:
                        matched = True
                        if log_a.slice(index, index + 1) != log_b.slice(index, index + 1):
                            raise SafetyViolation(f"log matching: {a}/{b} entry {index}")
