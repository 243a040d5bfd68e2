"""Plain values exchanged between the Raft core and its runtimes.

Everything here is immutable and free of I/O. The runtimes convert these to and
from protobuf (real world) or pass them as they are (in-process harness, simulator).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

NodeId = str
NO_NODE: NodeId = ""


class EntryKind(enum.IntEnum):
    NORMAL = 0
    # A leader appends one empty entry on election: only current-term entries are
    # committed by counting, so this is what lets a new leader commit its predecessors'.
    NOOP = 1


@dataclass(frozen=True, slots=True)
class Entry:
    index: int
    term: int
    kind: EntryKind = EntryKind.NORMAL
    data: bytes = b""

    def __post_init__(self) -> None:
        assert self.index >= 1, self
        assert self.term >= 1, self


@dataclass(frozen=True, slots=True)
class HardState:
    """What must survive a crash besides the log: Figure 2's persistent state."""

    term: int = 0
    vote: NodeId = NO_NODE
    commit: int = 0
    # Amnesia (RaftCore): this store replaced one that peers knew, so it may have lost
    # what that one promised; it grants no vote to a candidate with history until a
    # leader has caught it up.
    restoring: bool = False
    # What this node knows of its peers' stores, sorted by peer: (peer, incarnation,
    # previous): `previous` is the incarnation a peer had before a new one was seen,
    # kept until that peer says it is restoring (0 otherwise).
    peers: tuple[tuple[NodeId, int, int], ...] = ()

    def __post_init__(self) -> None:
        assert self.term >= 0
        assert self.commit >= 0
        assert list(self.peers) == sorted(self.peers), self.peers


@dataclass(frozen=True, slots=True)
class Snapshot:
    """State-machine image covering every entry up to and including `index`."""

    index: int
    term: int
    data: bytes

    def __post_init__(self) -> None:
        assert self.index >= 1, "a snapshot covers at least one entry"
        assert self.term >= 1


class MessageType(enum.IntEnum):
    PRE_VOTE = 1
    PRE_VOTE_RESPONSE = 2
    VOTE = 3
    VOTE_RESPONSE = 4
    APPEND = 5
    APPEND_RESPONSE = 6
    HEARTBEAT = 7
    HEARTBEAT_RESPONSE = 8
    SNAPSHOT = 9
    TIMEOUT_NOW = 10


@dataclass(frozen=True, slots=True)
class Message:
    """One Raft message. Fields not used by a type keep their zero value.

    - PRE_VOTE / VOTE: `term` is the term campaigned for, `log_index`/`log_term`
      describe the candidate's last entry, `force` marks a leadership transfer
      (bypasses the leader lease).
    - *_RESPONSE to votes: `reject`.
    - APPEND: `log_index`/`log_term` is the entry preceding `entries`; `commit`.
    - APPEND_RESPONSE: `index` is the highest index known to match when accepted;
      when rejected, `index` echoes the rejected `log_index` and `hint_index`/
      `hint_term` let the leader skip a whole term at a time.
    - HEARTBEAT: `commit` (capped at the follower's match), `context` (ReadIndex).
    - SNAPSHOT: `snapshot`; answered with an APPEND_RESPONSE whose `index` is the
      snapshot's index (never more: see the PySyncObj note in DESIGN.md).
    - every message: `incarnation`, the sender's store identity. It grows with every new
      store of a node, so a higher one means the peer's disk was replaced (or wiped), and
      a lower one comes from a store that no longer exists. `restoring` and
      `target_previous` carry the amnesia protocol (see RaftCore).
    """

    type: MessageType
    source: NodeId
    target: NodeId
    term: int
    log_index: int = 0
    log_term: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    index: int = 0
    reject: bool = False
    hint_index: int = 0
    hint_term: int = 0
    context: bytes = b""
    snapshot: Snapshot | None = None
    force: bool = False
    incarnation: int = 0  # the sender's store (0: unknown, from a peer that does not say)
    restoring: bool = False  # the sender knows it replaced a store and is catching up
    # The target's previous store, when the sender saw it replaced (0 otherwise): tells
    # an amnesiac node that it is one.
    target_previous: int = 0


@dataclass(frozen=True, slots=True)
class ReadState:
    """A ReadIndex answer: reads for `context` are linearizable once `index` is applied."""

    context: bytes
    index: int


@dataclass(frozen=True, slots=True)
class Ready:
    """Work the runtime must do, in this order (STYLE.md, etcd's Ready):

    1. persist `snapshot` (if any), then `entries`, then `hard_state`, in one
       transaction, fsync'd when `must_sync`;
    2. send `messages`;
    3. install `snapshot` into the state machine (if any), then apply `committed`;
       hand out `read_states`;
    4. call `advance(ready)`.

    `send_before_persist`: the messages promise nothing that this Ready's writes make
    durable (a leader's own appends and heartbeats, in a term already stored), so the
    runtime may send them first and persist while they travel (Raft dissertation
    §10.2.1, as etcd does). The leader counts itself for its new entries only once
    `advance` says they are stored.
    """

    snapshot: Snapshot | None = None
    entries: tuple[Entry, ...] = ()
    hard_state: HardState | None = None
    messages: tuple[Message, ...] = ()
    committed: tuple[Entry, ...] = ()
    read_states: tuple[ReadState, ...] = ()
    must_sync: bool = False
    send_before_persist: bool = False

    def is_empty(self) -> bool:
        return not (
            self.snapshot
            or self.entries
            or self.hard_state
            or self.messages
            or self.committed
            or self.read_states
        )


@dataclass(frozen=True, slots=True)
class PersistedState:
    """What a store hands back at start: the input to rebuild a core after a crash."""

    hard_state: HardState = field(default_factory=HardState)
    snapshot: Snapshot | None = None
    entries: tuple[Entry, ...] = ()
    incarnation: int = 1  # this store's identity: set when it was created, never changed

    def __post_init__(self) -> None:
        assert self.incarnation >= 1, self.incarnation
        first = self.snapshot.index + 1 if self.snapshot else 1
        for offset, entry in enumerate(self.entries):
            assert entry.index == first + offset, "persisted log must be contiguous"


@dataclass(frozen=True, slots=True)
class Config:
    """Core settings. Every option is explicit: no silent defaults (STYLE.md)."""

    node_id: NodeId
    voters: tuple[NodeId, ...]
    election_timeout_ms_min: int
    election_timeout_ms_max: int
    heartbeat_interval_ms: int
    inflight_messages_max: int
    entries_per_message_max: int
    uncommitted_entries_max: int
    message_bytes_max: int  # entry data per APPEND; one entry always goes, whatever its size
    pre_vote: bool = True
    check_quorum: bool = True

    def __post_init__(self) -> None:
        assert self.node_id in self.voters, "a node must be one of the voters"
        assert len(set(self.voters)) == len(self.voters), "voters must be unique"
        assert 0 < self.heartbeat_interval_ms < self.election_timeout_ms_min
        assert self.election_timeout_ms_min <= self.election_timeout_ms_max
        assert self.inflight_messages_max >= 1
        assert self.entries_per_message_max >= 1
        assert self.uncommitted_entries_max >= 1
        assert self.message_bytes_max >= 1


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


class ProposalError(Exception):
    """An operating error: the proposal was not accepted and nothing changed."""


class NotLeader(ProposalError):
    def __init__(self, leader: NodeId) -> None:
        super().__init__(f"not the leader (leader: {leader or 'unknown'})")
        self.leader = leader


class ProposalDropped(ProposalError):
    """Leader busy: too many uncommitted entries, or a leadership transfer is under way."""
