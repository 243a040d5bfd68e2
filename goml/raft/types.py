"""Plain values exchanged between the Raft core and its runtimes.

Everything here is immutable and free of I/O. The runtimes convert these to and
from protobuf (real world) or pass them as they are (in-process harness, simulator).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field

NodeId = str
NO_NODE: NodeId = ""


class EntryKind(enum.IntEnum):
    NORMAL = 0
    # A leader appends one empty entry on election: only current-term entries are
    # committed by counting, so this is what lets a new leader commit its predecessors'.
    NOOP = 1
    # A configuration (`Membership.encode()`): in force on every node from the moment it
    # is appended to that node's log, committed or not (dissertation 4.1).
    CONFIG = 2


NODE_ID_CHARS_MAX = 64
ADDRESS_CHARS_MAX = 256
MEMBERS_MAX = 64


class MembershipInvalid(ValueError):
    """A configuration that breaks the rules (unreadable, duplicate or overlapping names)."""


@dataclass(frozen=True, slots=True)
class Membership:
    """A cluster configuration: who votes, who only replicates (learners), and where
    each member listens. Voters and learners are sorted and disjoint.

    `addresses` are opaque to the Raft core: the runtimes connect by them. Empty voters
    mean "no configuration known": a node that joins an existing cluster starts so and
    learns its configuration from the leader (a snapshot, or the log)."""

    voters: tuple[NodeId, ...]
    learners: tuple[NodeId, ...] = ()
    addresses: tuple[tuple[NodeId, str], ...] = ()

    def __post_init__(self) -> None:
        problem = _membership_problem(self.voters, self.learners, self.addresses)
        if problem:
            raise MembershipInvalid(problem)

    @property
    def members(self) -> tuple[NodeId, ...]:
        return tuple(sorted(self.voters + self.learners))

    @property
    def quorum(self) -> int:
        return len(self.voters) // 2 + 1

    def address(self, node: NodeId) -> str:
        return dict(self.addresses).get(node, "")

    def encode(self) -> bytes:
        value = {
            "voters": list(self.voters),
            "learners": list(self.learners),
            "addresses": dict(self.addresses),
        }
        return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()

    @staticmethod
    def decode(data: bytes) -> Membership:
        """The configuration a CONFIG entry holds; MembershipInvalid when it is not one."""
        try:
            value = json.loads(data)
            voters = value["voters"]
            learners = value["learners"]
            addresses = value["addresses"]
        except (ValueError, KeyError, TypeError) as error:
            raise MembershipInvalid(f"not a configuration: {error}") from None
        if not (
            isinstance(voters, list)
            and isinstance(learners, list)
            and isinstance(addresses, dict)
            and all(isinstance(n, str) for n in voters + learners)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in addresses.items())
        ):
            raise MembershipInvalid("configuration fields have the wrong types")
        return Membership(tuple(voters), tuple(learners), tuple(sorted(addresses.items())))


def _membership_problem(
    voters: tuple[NodeId, ...],
    learners: tuple[NodeId, ...],
    addresses: tuple[tuple[NodeId, str], ...],
) -> str:
    if list(voters) != sorted(set(voters)):
        return f"voters must be sorted and unique: {list(voters)}"
    if list(learners) != sorted(set(learners)):
        return f"learners must be sorted and unique: {list(learners)}"
    both = set(voters) & set(learners)
    if both:
        return f"{sorted(both)} both voter and learner"
    if learners and not voters:
        return "learners without voters"
    if len(voters) + len(learners) > MEMBERS_MAX:
        return f"{len(voters) + len(learners)} members (max {MEMBERS_MAX})"
    for name in voters + learners:
        if not name or len(name) > NODE_ID_CHARS_MAX:
            return f"bad node name {name!r}"
    names = [name for name, _ in addresses]
    if names != sorted(set(names)):
        return "addresses must be sorted by node, one each"
    stray = set(names) - set(voters) - set(learners)
    if stray:
        return f"addresses of non-members {sorted(stray)}"
    for _, address in addresses:
        if len(address) > ADDRESS_CHARS_MAX:
            return f"address of {len(address)} characters (max {ADDRESS_CHARS_MAX})"
    return ""


class ChangeKind(enum.StrEnum):
    ADD_LEARNER = "add-learner"  # a new member that replicates but does not vote
    PROMOTE = "promote"  # a learner that has caught up becomes a voter
    REMOVE = "remove"  # a voter or learner leaves (the leader too: it steps down)


@dataclass(frozen=True, slots=True)
class MembershipChange:
    """One single-server change (dissertation 4.1): one member, one step."""

    kind: ChangeKind
    node: NodeId
    address: str = ""  # ADD_LEARNER: where it listens (opaque to the core)

    def __post_init__(self) -> None:
        assert self.node, "a change names its node"
        assert self.kind is ChangeKind.ADD_LEARNER or not self.address, self


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
    """State-machine image covering every entry up to and including `index`, and the
    configuration in force at `index` (None: a snapshot written before configurations
    were kept in snapshots; the node's bootstrap configuration applies)."""

    index: int
    term: int
    data: bytes
    membership: Membership | None = None

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
    SNAPSHOT_RESPONSE = 11


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
    - SNAPSHOT: one chunk of a snapshot: `snapshot` holds its index, term and
      configuration and `snapshot_offset_bytes ..` of its data, of
      `snapshot_size_bytes` in all. The chunk that completes it is answered with an
      APPEND_RESPONSE whose `index` is the snapshot's index (never more: see the
      PySyncObj note in DESIGN.md); the others with a SNAPSHOT_RESPONSE.
    - SNAPSHOT_RESPONSE: `log_index`/`log_term` name the snapshot being received,
      `snapshot_offset_bytes` how much of it the receiver holds (contiguously from 0):
      the leader sends on from there (0 after a restart: start again).
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
    snapshot_offset_bytes: int = 0
    snapshot_size_bytes: int = 0

    @property
    def carries_data(self) -> bool:
        """Entries or a snapshot chunk: an input the CPU model charges as an append
        (goml.scenario.schema.Costs.append_ms), and a node's metrics count as one."""
        return bool(self.entries) or self.snapshot is not None


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
    # The bootstrap configuration: in force until the log or a snapshot holds one. Empty
    # for a node that joins an existing cluster (it learns its configuration).
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
    # Snapshots travel in chunks of at most this many bytes, this many unacknowledged
    # at a time (etcd sends one message; hashicorp/raft streams, unbounded).
    snapshot_chunk_bytes_max: int = 1 << 20
    snapshot_chunks_inflight_max: int = 4

    def __post_init__(self) -> None:
        assert not self.voters or self.node_id in self.voters, "a bootstrap voter list names us"
        assert len(set(self.voters)) == len(self.voters), "voters must be unique"
        assert self.snapshot_chunk_bytes_max >= 1
        assert self.snapshot_chunks_inflight_max >= 1
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


class MembershipRefused(ProposalError):
    """A membership change this leader cannot make now (the reason says which rule)."""
