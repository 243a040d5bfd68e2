"""Raft's safety properties, checked from the outside on a running cluster of cores.

Used by the in-process harness and by the simulator: both feed it what they observe
(a node's role after each step, every entry a node applies, the logs at the end).

With membership changes, "never two quorums": the checker works out each node's
configuration from its log itself (not from what the core says), and checks that
- the configuration a node acts on is the one its log holds;
- a leader won its term with a quorum of that configuration, and every commit index it
  reaches is held by a quorum of it;
- consecutive configurations differ by one voter at most (so any majority of one meets
  any majority of the other), only one change is uncommitted at a time, and a leader
  appends a change only once an entry of its own term is committed (dissertation 4.1).
"""

from __future__ import annotations

import bisect

from goml.raft.core import RaftCore
from goml.raft.types import Entry, EntryKind, Membership, NodeId, Role

# Tests set this to compare every incremental scan with a full one.
_VERIFY_SCANS = False


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
        self.configs: dict[int, bytes] = {}  # index -> configuration, as applied
        self._elected: set[tuple[NodeId, int]] = set()
        # node -> what `configurations` last found in its log, to scan only new entries
        # (a scan of the whole log at every step made the checker most of the
        # simulator's time: 8 of 21 s in the reference scenario).
        self._scans: dict[NodeId, _ConfigScan] = {}
        self._commit_checked: dict[tuple[NodeId, int], int] = {}
        # When each index was first seen committed: (highest index, term of the leader
        # whose commit reached it), both increasing. Leader completeness is about the
        # leaders of that term and later ones: a stale leader (say one whose disk
        # stalled while a newer term elected and committed) may lack what a newer term
        # committed until it hears of that term, as Raft allows.
        self._commit_indexes: list[int] = []
        self._commit_terms: list[int] = []

    def observe(self, node_id: NodeId, core: RaftCore) -> None:
        """Call after every step of `core`."""
        self._check_quorums(node_id, core)
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

    def _configurations(
        self, node_id: NodeId, core: RaftCore
    ) -> tuple[tuple[int, Membership], tuple[int, Membership]]:
        scan = self._scans.get(node_id)
        if scan is None:  # not setdefault: that would build a scan at every step
            scan = self._scans[node_id] = _ConfigScan()
        found = _scan_configurations(scan, core)
        if __debug__ and _VERIFY_SCANS:
            assert found == configurations(core), (node_id, found, configurations(core))
        return found

    def _check_quorums(self, node_id: NodeId, core: RaftCore) -> None:
        (index, membership), (previous_index, previous) = self._configurations(node_id, core)
        if core.membership != membership:
            raise SafetyViolation(
                f"{node_id} acts on {core.membership} but its log holds {membership}"
            )
        if core.role is not Role.LEADER:
            return
        voters = set(membership.voters)
        quorum = len(voters) // 2 + 1
        key = (node_id, core.term)
        if key not in self._elected:
            self._elected.add(key)
            # What it committed before it led was decided by an earlier leader.
            self._commit_checked[key] = core.commit
            granted = {node for node, ok in core.votes.items() if ok} & voters
            if len(granted) < quorum or node_id not in voters:
                raise SafetyViolation(
                    f"{node_id} leads term {core.term} with votes {sorted(granted)} of "
                    f"voters {sorted(voters)}"
                )
        if core.commit > self._commit_checked.get(key, 0):
            self._commit_checked[key] = core.commit
            holders = {p for p, pr in core.progress.items() if pr.match >= core.commit}
            if core.log.unstable_from - 1 >= core.commit:
                holders.add(node_id)
            if len(holders & voters) < quorum:
                raise SafetyViolation(
                    f"{node_id} (term {core.term}) committed {core.commit}, held only by "
                    f"{sorted(holders & voters)} of voters {sorted(voters)}"
                )
        if index <= core.log.snapshot_index:
            return  # the latest configuration is in the snapshot: nothing left to check
        changed = set(membership.voters) ^ set(previous.voters)
        if len(changed) > 1:
            raise SafetyViolation(
                f"{node_id}: configuration at {index} changes voters {sorted(changed)} at once"
            )
        if index > core.commit and previous_index > core.commit:
            raise SafetyViolation(
                f"{node_id}: configurations at {previous_index} and {index} both uncommitted"
            )
        term = core.log.term_at(index)
        if term == core.term and index > core.commit:
            if core.log.snapshot_term == core.term:
                first_own = core.log.snapshot_index  # it was committed: it is compacted
            else:
                first_own = next(e.index for e in core.log.entries if e.term == core.term)
            if first_own >= index or first_own > core.commit:
                raise SafetyViolation(
                    f"{node_id} appended a configuration at {index} before committing an "
                    f"entry of its term {core.term}"
                )

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
        elif entry.kind is EntryKind.CONFIG:
            self.configs[index] = data
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


class _ConfigScan:
    """The CONFIG entries found in the first `count` entries of one node's log (the two
    latest), valid while the log has the same snapshot and still holds `anchor`, the
    very entry object that was last at position `count - 1` (a truncation replaces it)."""

    __slots__ = ("anchor", "base", "base_key", "count", "found", "snapshot_index")

    def __init__(self) -> None:
        self.snapshot_index = -1
        self.count = 0
        self.anchor: Entry | None = None
        self.found: list[tuple[int, Membership]] = []
        # `_base_configuration` for the log's snapshot as last seen: building a
        # Membership validates it, which was 4 % of a reference run at every step.
        self.base_key: tuple[int, object, object] | None = None
        self.base: tuple[int, Membership] = (0, Membership(()))


def _scan_configurations(
    scan: _ConfigScan, core: RaftCore
) -> tuple[tuple[int, Membership], tuple[int, Membership]]:
    """`configurations(core)`, reading only the entries appended since `scan` last ran."""
    log = core.log
    entries = log.entries
    valid = (
        scan.snapshot_index == log.snapshot_index
        and scan.count <= len(entries)
        and (scan.count == 0 or entries[scan.count - 1] is scan.anchor)
    )
    if not valid:
        scan.snapshot_index, scan.count, scan.anchor, scan.found = log.snapshot_index, 0, None, []
    for entry in entries[scan.count :]:
        if entry.kind is EntryKind.CONFIG:
            scan.found = [*scan.found[-1:], (entry.index, Membership.decode(entry.data))]
    scan.count = len(entries)
    scan.anchor = entries[-1] if entries else None
    found = list(reversed(scan.found))
    if len(found) == 2:
        return found[0], found[1]
    # The same snapshot object and voters give the same base configuration.
    key = (log.snapshot_index, core.snapshot, core.config.voters)
    if (
        scan.base_key is None
        or scan.base_key[0] != key[0]
        or scan.base_key[1] is not key[1]
        or scan.base_key[2] is not key[2]
    ):
        scan.base_key, scan.base = key, _base_configuration(core)
    found.append(scan.base)
    if len(found) == 1:
        found.append(found[0])
    return found[0], found[1]


def _base_configuration(core: RaftCore) -> tuple[int, Membership]:
    """The configuration below the log: the snapshot's, or the bootstrap one (index 0)."""
    snapshot = core.snapshot
    if snapshot is not None and snapshot.index == core.log.snapshot_index:
        assert snapshot.membership is not None, "a core's snapshot names its configuration"
        return (snapshot.index, snapshot.membership)
    return (0, Membership(tuple(sorted(core.config.voters))))


def configurations(core: RaftCore) -> tuple[tuple[int, Membership], tuple[int, Membership]]:
    """The latest configuration of `core`'s log and the one before it, each with the
    index that made it (the snapshot's index, or 0 for the bootstrap one), worked out
    from the log and snapshot themselves."""
    found: list[tuple[int, Membership]] = []
    for entry in reversed(core.log.entries):
        if entry.kind is EntryKind.CONFIG:
            found.append((entry.index, Membership.decode(entry.data)))
            if len(found) == 2:
                return found[0], found[1]
    snapshot = core.snapshot
    if snapshot is not None and snapshot.index == core.log.snapshot_index:
        assert snapshot.membership is not None, "a core's snapshot names its configuration"
        base = (snapshot.index, snapshot.membership)
    else:
        base = (0, Membership(tuple(sorted(core.config.voters))))
    found.append(base)
    if len(found) == 1:
        found.append(base)
    return found[0], found[1]
