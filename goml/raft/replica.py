"""`ReplicaCore`: a Raft core, the state machine it drives, and the bookkeeping around
them that every runtime needs, written once: proposal and read waiters, applying
committed entries, installing snapshots, compaction and when to write what.

Sans-IO like the Raft core underneath: inputs are method calls with `now_ms`, outputs
are taken with `ready()` and acknowledged with `advance()`; no clock, socket, thread or
file. The control-plane node core (`goml.cluster.node_core`) composes one with the
manifest; the Raft demo, benchmark and harness use one with a trivial state machine.

Runtime contract, for each `ReplicaReady` (STYLE.md "Order of effects"):

1. store `compacted` (a local snapshot: `Storage.compact`), then persist `snapshot`,
   `entries` and `hard_state` in one transaction, fsync'd when `must_sync`;
2. send `messages`;
3. hand `outcomes` to whoever waits for them (they depend on nothing this Ready
   persists: a runtime may hand them out first);
4. call `advance(ready)`: that applies `committed` to the state machine (restoring
   `snapshot` first), and the outcomes it produces appear in the next `ready()`.

Outcomes are keyed by the `token` the caller gave with `propose` or `read`: `Applied`
(the entry committed at its index and term; the state machine's result), `Lost` (another
term's entry took the index: it will never apply), `Unknown` (a snapshot from the leader
replaced the log around it: retry with an idempotency key) and `ReadReady` / `ReadFailed`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

from goml.raft.core import RaftCore
from goml.raft.types import (
    Config,
    Entry,
    EntryKind,
    HardState,
    Membership,
    MembershipChange,
    Message,
    NodeId,
    NotLeader,
    PersistedState,
    ProposalDropped,
    ReadState,
    Ready,
    Role,
    Snapshot,
)

# Limits every goml Raft node runs with (the simulator too), etcd's MaxInflightMsgs,
# MaxSizePerMsg (in entries) and MaxUncommittedEntriesSize (in entries).
INFLIGHT_MESSAGES_MAX = 64
ENTRIES_PER_MESSAGE_MAX = 512
UNCOMMITTED_ENTRIES_MAX = 8192
# Entry data per APPEND (etcd's MaxSizePerMsg): 512 entries of 256 KiB would exceed gRPC's
# 64 MiB message limit and wedge a follower that is catching up.
MESSAGE_BYTES_MAX = 4 * 1024 * 1024
PROPOSAL_BYTES_MAX = 1024 * 1024
# Snapshots go in chunks of 1 MiB, 4 unacknowledged at a time: a 48 MiB manifest no longer
# travels as one message, and a lost chunk costs one chunk, not the whole snapshot again.
SNAPSHOT_CHUNK_BYTES_MAX = 1024 * 1024
SNAPSHOT_CHUNKS_INFLIGHT_MAX = 4


def raft_config(
    node_id: str,
    voters: tuple[str, ...],
    election_timeout_ms_min: int,
    election_timeout_ms_max: int,
    heartbeat_interval_ms: int,
) -> Config:
    """A Raft core configuration with goml's standard limits and the given timing."""
    return Config(
        node_id=node_id,
        voters=voters,
        election_timeout_ms_min=election_timeout_ms_min,
        election_timeout_ms_max=election_timeout_ms_max,
        heartbeat_interval_ms=heartbeat_interval_ms,
        inflight_messages_max=INFLIGHT_MESSAGES_MAX,
        entries_per_message_max=ENTRIES_PER_MESSAGE_MAX,
        uncommitted_entries_max=UNCOMMITTED_ENTRIES_MAX,
        message_bytes_max=MESSAGE_BYTES_MAX,
        snapshot_chunk_bytes_max=SNAPSHOT_CHUNK_BYTES_MAX,
        snapshot_chunks_inflight_max=SNAPSHOT_CHUNKS_INFLIGHT_MAX,
    )


class PeerAddresses:
    """Which peers a node keeps streams to, and where they listen: the members of its
    configuration (addresses from the configuration, else from the node's config file),
    or, while it knows no configuration (it joins), the peers its config file names.
    The same dict is returned until the configuration changes (runtimes compare by
    identity)."""

    def __init__(self, node_id: NodeId, configured: dict[NodeId, str]) -> None:
        self.node_id = node_id
        self._configured = dict(configured)
        self._membership: Membership | None = None
        self._current: dict[NodeId, str] = {}

    def current(self, membership: Membership) -> dict[NodeId, str]:
        if membership is not self._membership:
            self._membership = membership
            known = {**self._configured, **dict(membership.addresses)}
            members = membership.members if membership.voters else tuple(self._configured)
            self._current = {
                m: known[m] for m in sorted(members) if m != self.node_id and m in known
            }
        return self._current

    def address(self, node: NodeId) -> str:
        """Where `node` listens, as far as this node knows ("" if it does not)."""
        membership = self._membership
        found = membership.address(node) if membership is not None else ""
        return found or self._configured.get(node, "")


class StateMachine(Protocol):
    """What the replica drives. Pure and deterministic (it runs on every replica)."""

    def apply(self, index: int, data: bytes) -> object: ...

    def snapshot(self) -> bytes: ...

    def restore(self, data: bytes) -> None: ...


class ProposalTooLarge(ProposalDropped):
    """A proposal over `proposal_bytes_max`: refused before it reaches the log."""


@dataclass(frozen=True, slots=True)
class ReplicaConfig:
    raft: Config
    compact_every_entries: int  # take a local snapshot after this many applied entries
    proposal_bytes_max: int
    # A hard state that moves only the commit index (no entries, term or vote) is not
    # written on its own: it rides along with the next write. A lower stored commit is
    # safe (entries are applied again after a restart, the leader re-commits), and it
    # saves a whole fsync on the critical path of every proposal.
    defer_commit_only_writes: bool

    def __post_init__(self) -> None:
        assert self.compact_every_entries >= 1
        assert self.proposal_bytes_max >= 1


@dataclass(frozen=True, slots=True)
class Applied:
    token: int
    index: int
    result: object


@dataclass(frozen=True, slots=True)
class Lost:
    token: int
    index: int
    why: str


@dataclass(frozen=True, slots=True)
class Unknown:
    token: int
    index: int
    why: str


@dataclass(frozen=True, slots=True)
class ReadReady:
    """The read point `index` is applied here: a read answered now is linearizable."""

    token: int
    index: int


@dataclass(frozen=True, slots=True)
class ReadFailed:
    token: int
    leader: str  # the leader this node now knows ("" if none)


Outcome = Applied | Lost | Unknown | ReadReady | ReadFailed


@dataclass(frozen=True, slots=True)
class ReplicaReady:
    raft: Ready  # as the Raft core handed it out (advanced as is)
    compacted: Snapshot | None
    hard_state: HardState | None  # what to write: the deferred commit may ride along
    outcomes: tuple[Outcome, ...]

    @property
    def snapshot(self) -> Snapshot | None:
        return self.raft.snapshot

    @property
    def entries(self) -> tuple[Entry, ...]:
        return self.raft.entries

    @property
    def must_sync(self) -> bool:
        return self.raft.must_sync

    @property
    def messages(self) -> tuple[Message, ...]:
        return self.raft.messages

    @property
    def send_before_persist(self) -> bool:
        # The compaction and the deferred commit index ride on this Ready's write, and
        # no message depends on either.
        return self.raft.send_before_persist

    @property
    def committed(self) -> tuple[Entry, ...]:
        return self.raft.committed

    def writes(self) -> bool:
        """Whether the store has anything to do for this Ready."""
        return bool(self.compacted or self.raft.snapshot or self.raft.entries or self.hard_state)


class ReplicaCore:
    def __init__(
        self,
        config: ReplicaConfig,
        persisted: PersistedState,
        state_machine: StateMachine,
        rng: random.Random,
        now_ms: int,
    ) -> None:
        self.config = config
        self.state_machine = state_machine
        if persisted.snapshot is not None:
            state_machine.restore(persisted.snapshot.data)
        # Every committed entry after the snapshot is applied again through ready().
        self.raft = RaftCore(config.raft, persisted, rng, now_ms)
        self._proposals: dict[int, tuple[int, int]] = {}  # index -> (term, token)
        self._reads_pending: dict[bytes, int] = {}  # context -> token: no read point yet
        self._reads_applying: list[tuple[int, int]] = []  # (index, token): wait for apply
        self._read_counter = 0
        self._outcomes: list[Outcome] = []
        self._deferred: HardState | None = None
        self._was_leader = False
        self._force_compaction = False
        self._outstanding: ReplicaReady | None = None

    # ----------------------------------------------------------------- inputs

    def step(self, message: Message, now_ms: int) -> None:
        self._no_ready_outstanding()
        self.raft.step(message, now_ms)
        self._leadership_changed()

    def tick(self, now_ms: int) -> None:
        self._no_ready_outstanding()
        self.raft.tick(now_ms)
        self._leadership_changed()

    def propose(self, data: bytes, token: int) -> tuple[int, int]:
        """Append `data` to the log; its outcome comes back under `token`. Raises
        NotLeader, ProposalDropped (busy, transfer) or ProposalTooLarge."""
        self._no_ready_outstanding()
        if len(data) > self.config.proposal_bytes_max:
            raise ProposalTooLarge(
                f"proposal of {len(data)} bytes; limit {self.config.proposal_bytes_max}"
            )
        index, term = self.raft.propose(data)
        self._waiting(index, term, token)
        return index, term

    def propose_membership(self, change: MembershipChange, token: int) -> tuple[int, int]:
        """Append a configuration change (`RaftCore.propose_membership`); its outcome
        (Applied with result None once committed) comes back under `token`. Raises
        NotLeader, ProposalDropped or MembershipRefused."""
        self._no_ready_outstanding()
        index, term = self.raft.propose_membership(change)
        self._waiting(index, term, token)
        return index, term

    def _waiting(self, index: int, term: int, token: int) -> None:
        previous = self._proposals.get(index)
        if previous is not None:
            # A lower-term entry at this index was truncated: that proposal is lost.
            self._outcomes.append(Lost(previous[1], index, f"index {index} reused in term {term}"))
        self._proposals[index] = (term, token)

    def read(self, token: int) -> None:
        """A linearizable read point (ReadIndex); answered with ReadReady or ReadFailed."""
        self._no_ready_outstanding()
        if self.raft.role is not Role.LEADER:
            raise NotLeader(self.raft.leader)
        self._read_counter += 1
        # Unique per leadership: a node leads at most once per term, so a stale answer
        # from an earlier incarnation can never release a read of this one.
        context = f"{self.raft.term}/{self._read_counter}".encode()
        self._reads_pending[context] = token
        self.raft.read_index(context)

    def compact_now(self) -> None:
        """Make the next Ready carry a local snapshot (tests and operators)."""
        self._no_ready_outstanding()
        self._force_compaction = True

    # ---------------------------------------------------------------- outputs

    def next_deadline_ms(self) -> int:
        return self.raft.next_deadline_ms()

    def has_ready(self) -> bool:
        return bool(self._outcomes) or self.raft.has_ready() or self._compaction_due()

    def ready(self) -> ReplicaReady:
        self._no_ready_outstanding()
        compacted = None
        if self._compaction_due():
            compacted = self.raft.compact(self.raft.applied, self.state_machine.snapshot())
            self._force_compaction = False
        raft = self.raft.ready()
        hard_state = raft.hard_state
        if (
            self.config.defer_commit_only_writes
            and hard_state is not None
            and not raft.must_sync
            and raft.snapshot is None
            and not raft.entries
        ):
            # Only the commit index moved (must_sync is False: term and vote did not).
            assert self._deferred is None or self._deferred.commit <= hard_state.commit
            self._deferred = hard_state
            hard_state = None
        elif raft.entries or raft.snapshot is not None or hard_state is not None:
            if hard_state is None:
                hard_state = self._deferred
            self._deferred = None
        outcomes, self._outcomes = tuple(self._outcomes), []
        ready = ReplicaReady(raft, compacted, hard_state, outcomes)
        self._outstanding = ready
        return ready

    def advance(self, ready: ReplicaReady) -> None:
        assert self._outstanding is ready, "advance the Ready last handed out"
        self._outstanding = None
        raft = ready.raft
        if raft.snapshot is not None:
            self.state_machine.restore(raft.snapshot.data)
            self._snapshot_installed(raft.snapshot.index)
        for entry in raft.committed:
            self._apply(entry)
        self._reads_started(raft.read_states)
        self.raft.advance(raft)
        self._release_reads()
        self._leadership_changed()
        assert self.raft.applied <= self.raft.commit

    def take_outcomes(self) -> tuple[Outcome, ...]:
        """For a core that composes this one: the outcomes produced so far, now rather
        than in the next Ready (so it can act on them before more input arrives)."""
        self._no_ready_outstanding()
        outcomes, self._outcomes = tuple(self._outcomes), []
        return outcomes

    def take_deferred_hard_state(self) -> HardState | None:
        """At a clean stop: the commit index not written yet (write it if you can)."""
        self._no_ready_outstanding()
        deferred, self._deferred = self._deferred, None
        return deferred

    # -------------------------------------------------------------- internals

    def _compaction_due(self) -> bool:
        raft = self.raft
        if raft.applied <= raft.log.snapshot_index:
            return False
        if self._force_compaction:
            return True
        return raft.applied - raft.log.snapshot_index >= self.config.compact_every_entries

    def _apply(self, entry: Entry) -> None:
        result: object = None
        if entry.kind is EntryKind.NORMAL:
            result = self.state_machine.apply(entry.index, entry.data)
        waiter = self._proposals.pop(entry.index, None)
        if waiter is None:
            return
        term, token = waiter
        if term == entry.term:
            self._outcomes.append(Applied(token, entry.index, result))
        else:
            why = f"index {entry.index} committed in term {entry.term}, proposed in {term}"
            self._outcomes.append(Lost(token, entry.index, why))

    def _snapshot_installed(self, index: int) -> None:
        for waiting in sorted(i for i in self._proposals if i <= index):
            _, token = self._proposals.pop(waiting)
            why = f"index {waiting} was replaced by a snapshot from the leader"
            self._outcomes.append(Unknown(token, waiting, why))

    def _reads_started(self, read_states: tuple[ReadState, ...]) -> None:
        for state in read_states:
            token = self._reads_pending.pop(state.context, None)
            if token is not None:
                self._reads_applying.append((state.index, token))

    def _release_reads(self) -> None:
        if not self._reads_applying:
            return
        applied = self.raft.applied
        still = []
        for index, token in self._reads_applying:
            if index <= applied:
                self._outcomes.append(ReadReady(token, index))
            else:
                still.append((index, token))
        self._reads_applying = still

    def _leadership_changed(self) -> None:
        leader = self.raft.role is Role.LEADER
        if self._was_leader and not leader and self._reads_pending:
            # The Raft core dropped its pending reads when it stepped down: tell the
            # callers (reads that already have a read point stay valid).
            for context in sorted(self._reads_pending):
                token = self._reads_pending[context]
                self._outcomes.append(ReadFailed(token, self.raft.leader))
            self._reads_pending = {}
        self._was_leader = leader

    def _no_ready_outstanding(self) -> None:
        assert self._outstanding is None, "input between ready() and advance()"
