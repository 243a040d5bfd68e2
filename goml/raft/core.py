"""goml's sans-IO Raft core.

Inputs are method calls (`tick`, `step`, `propose`, `propose_membership`,
`read_index`, `transfer_leadership`, `compact`); outputs are taken with `ready()` and
acknowledged with `advance()`. No sockets, files, clocks or global randomness:
time arrives as `now_ms`, randomness from the `random.Random` passed in.

The rules are the Raft paper's (Figure 2 and chapter 9 of the dissertation for
PreVote and CheckQuorum), shaped after etcd's raft package. Between `ready()` and
`advance()` no other input may be given (asserted): the runtime persists, sends,
applies, then advances.

Membership (dissertation chapter 4): single-server changes through the log, not joint
consensus. Each change adds a learner, promotes a caught-up learner or removes one
member, so any majority of the old configuration meets any majority of the new one and
no two quorums can decide apart; one change at a time (the previous one committed), and
only once the leader has committed an entry of its own term (the fix of 4.1 for the
bug where a change by a new leader could be lost along with a predecessor's). A
configuration is in force on a node from the moment it is in its log, committed or not,
and a truncation reverts it: a node counts votes and acknowledgements only by the
configuration its own log holds. Learners replicate but never vote, campaign or count.
A leader that removes itself leads on, without counting itself, until the change
commits, then hands off (TimeoutNow to the most caught-up voter, also when none holds
its whole log yet) and steps down.
Snapshots carry the configuration at their index; a node with neither a snapshot nor a
CONFIG entry uses its bootstrap `Config.voters` (empty for a node that joins).

Snapshots travel in chunks of `snapshot_chunk_bytes_max`, at most
`snapshot_chunks_inflight_max` unacknowledged, each answered with the bytes received;
a transfer that stalls for an election timeout goes on from the last acknowledged byte
(one chunk, as a probe), never from the start unless the receiver lost its copy.
"""

from __future__ import annotations

import enum
import json
import random
from dataclasses import dataclass, field, replace

from goml.raft.log import RaftLog
from goml.raft.types import (
    NO_NODE,
    ChangeKind,
    Config,
    Entry,
    EntryKind,
    HardState,
    Membership,
    MembershipChange,
    MembershipInvalid,
    MembershipRefused,
    Message,
    MessageType,
    NodeId,
    NotLeader,
    PersistedState,
    ProposalDropped,
    ReadState,
    Ready,
    Role,
    Snapshot,
)

_FROM_LEADER = (MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT)
# What a leader sends of its own accord: replication and transfer, never an answer that
# promises a vote or stored entries (those wait for the write: `Ready.send_before_persist`).
_LEADER_TRAFFIC = frozenset((*_FROM_LEADER, MessageType.TIMEOUT_NOW))
_VOTE_REQUESTS = (MessageType.PRE_VOTE, MessageType.VOTE)


class ProgressState(enum.Enum):
    PROBE = "probe"  # one append per heartbeat until the match point is found
    REPLICATE = "replicate"  # pipelined appends, next index advanced optimistically
    SNAPSHOT = "snapshot"  # a snapshot is on its way; wait for its acknowledgement


@dataclass(slots=True)
class Progress:
    """The leader's view of one follower."""

    match: int
    next: int
    state: ProgressState = ProgressState.PROBE
    probe_sent: bool = False
    inflight_last_indexes: list[int] = field(default_factory=list)
    last_heard_ms: int = 0
    pending_snapshot_index: int = 0
    # The snapshot on its way (kept even if the leader compacts again meanwhile) and how
    # far it got: sent, and acknowledged by the receiver (contiguous from byte 0).
    snapshot: Snapshot | None = None
    snapshot_sent_bytes: int = 0
    snapshot_acked_bytes: int = 0
    snapshot_all_sent: bool = False
    snapshot_progress_ms: int = 0  # when the acknowledged part last grew

    def is_paused(self, inflight_max: int) -> bool:
        if self.state is ProgressState.PROBE:
            return self.probe_sent
        if self.state is ProgressState.REPLICATE:
            return len(self.inflight_last_indexes) >= inflight_max
        return True


@dataclass(slots=True)
class _PendingRead:
    context: bytes
    index: int
    acks: set[NodeId]


@dataclass(slots=True)
class _IncomingSnapshot:
    """A snapshot being received, chunk by chunk, from one leader in one term."""

    source: NodeId
    term: int
    index: int
    snapshot_term: int
    size_bytes: int
    membership: Membership | None
    chunks: list[bytes]
    received_bytes: int = 0

    def key(self) -> tuple[NodeId, int, int, int, int]:
        return (self.source, self.term, self.index, self.snapshot_term, self.size_bytes)


class RaftCore:
    def __init__(
        self, config: Config, persisted: PersistedState, rng: random.Random, now_ms: int
    ) -> None:
        self.config = config
        self.id = config.node_id
        self._rng = rng
        self.now_ms = now_ms
        self.role = Role.FOLLOWER

        self.log = RaftLog(persisted.snapshot, persisted.entries)
        # Membership: the bootstrap configuration, the one at the snapshot's index, and
        # every CONFIG entry of the log after it (index -> configuration).
        self._bootstrap = Membership(tuple(sorted(config.voters)))
        snapshot = persisted.snapshot
        if snapshot is not None and snapshot.membership is None:
            # Written before snapshots kept configurations: the bootstrap one held.
            snapshot = replace(snapshot, membership=self._bootstrap)
        self._snapshot_membership: Membership = self._bootstrap
        if snapshot is not None and snapshot.membership is not None:
            self._snapshot_membership = snapshot.membership
        self._configs: dict[int, Membership] = {
            e.index: Membership.decode(e.data)
            for e in persisted.entries
            if e.kind is EntryKind.CONFIG
        }
        self.membership = Membership(())
        self.membership_index = -1
        self.voters: tuple[NodeId, ...] = ()
        self.peers: tuple[NodeId, ...] = ()  # every other member: voters and learners
        self.quorum = 1
        self._voter_set: frozenset[NodeId] = frozenset()
        self._refresh_membership()
        self.snapshot: Snapshot | None = snapshot
        hard = persisted.hard_state
        assert hard.commit <= self.log.last_index, "store holds a commit beyond its log"
        self.term = hard.term
        self.vote = hard.vote
        self.commit = max(hard.commit, self.log.snapshot_index)
        self.incarnation = persisted.incarnation
        self.restoring = hard.restoring
        # Each peer's newest store seen (trusted on first contact) and, while that peer
        # has not said it is restoring, the store it replaced (see _from_live_store).
        self._peer_stores: dict[NodeId, tuple[int, int]] = {
            peer: (incarnation, previous) for peer, incarnation, previous in hard.peers
        }
        self._peers_state = hard.peers
        self.repairs = 0  # peers seen with a new store (repaired from scratch when leading)
        self._stores_pending = False
        self._told: set[NodeId] = set()  # replaced peers that said they are restoring
        for entry in persisted.entries:
            if entry.kind is EntryKind.NOOP and entry.data:
                self._adopt_stores(entry.data)
        # The runtime restores the state machine from `persisted.snapshot`; every
        # committed entry after it is applied again through `ready()`.
        self.applied = self.log.snapshot_index
        self._persisted_hard_state = hard

        self.leader: NodeId = NO_NODE
        self.leader_heard_ms: int | None = None
        self.votes: dict[NodeId, bool] = {}
        self.election_deadline_ms = 0
        self.heartbeat_deadline_ms = 0
        self.progress: dict[NodeId, Progress] = {}
        self.transfer_target: NodeId = NO_NODE
        self.transfer_deadline_ms = 0

        self._messages: list[Message] = []
        self._pending_snapshot: Snapshot | None = None
        self._incoming: _IncomingSnapshot | None = None
        self._broadcast_pending = False
        self._read_states: list[ReadState] = []
        self._reads_waiting_for_commit: list[bytes] = []
        self._reads_pending: list[_PendingRead] = []
        self._ready_outstanding = False
        self._reset_election_deadline()

    # ------------------------------------------------------------------ inputs

    def tick(self, now_ms: int) -> None:
        """Let time pass. Safe to call at any time; acts only when a deadline is due."""
        self._advance_clock(now_ms)
        if self.role is Role.LEADER:
            if now_ms >= self.transfer_deadline_ms and self.transfer_target != NO_NODE:
                self.transfer_target = NO_NODE  # the transfer took too long: abort it
            if now_ms >= self.heartbeat_deadline_ms:
                self.heartbeat_deadline_ms = now_ms + self.config.heartbeat_interval_ms
                if self.config.check_quorum and not self.quorum_active():
                    # CheckQuorum: a leader cut off from a majority stops serving,
                    # so clients go to the side that can commit.
                    self._become_follower(self.term, NO_NODE)
                    return
                # Piggyback the newest pending read: its acknowledgement releases it
                # and every read before it, so a lost heartbeat does not strand reads.
                context = self._reads_pending[-1].context if self._reads_pending else b""
                self._broadcast_heartbeat(context)
        elif now_ms >= self.election_deadline_ms:
            if self.id in self._voter_set:
                self._campaign(pre_vote=self.config.pre_vote, force=False)
            else:
                # A learner, a node that has not learnt its configuration yet, or one
                # removed: it never campaigns (nor counts votes) by a configuration
                # that does not make it a voter.
                self._reset_election_deadline()

    def next_deadline_ms(self) -> int:
        """When `tick` has something to do next: the runtime may sleep until then."""
        if self.role is Role.LEADER:
            deadline = self.heartbeat_deadline_ms
            if self.transfer_target != NO_NODE:
                deadline = min(deadline, self.transfer_deadline_ms)
            return deadline
        return self.election_deadline_ms

    def step(self, message: Message, now_ms: int) -> None:
        """Handle one message from a peer."""
        self._advance_clock(now_ms)
        assert message.target == self.id, message
        # Any other node may write: a leader to a node that has not learnt it is a
        # member yet, a removed node to its old peers. Who counts is decided by the
        # configuration in this node's log, not by who writes.
        assert message.source != self.id, message
        if not self._from_live_store(message):
            return
        if message.term > self.term:
            if message.type in _VOTE_REQUESTS and self._in_leader_lease() and not message.force:
                # Leader lease (with CheckQuorum): we heard from a live leader less than
                # an election timeout ago, so a disruptive candidate is ignored.
                return
            if message.type is MessageType.PRE_VOTE:
                pass  # a pre-vote never changes our term
            elif message.type is MessageType.PRE_VOTE_RESPONSE and not message.reject:
                pass  # the granted pre-vote carries the term we would campaign for
            else:
                leader = message.source if message.type in _FROM_LEADER else NO_NODE
                self._become_follower(message.term, leader)
        elif message.term < self.term:
            if message.type in (MessageType.APPEND, MessageType.HEARTBEAT):
                # A stale leader: tell it our term so it steps down (it may have been
                # partitioned away while we moved on).
                self._send(
                    Message(
                        MessageType.APPEND_RESPONSE,
                        self.id,
                        message.source,
                        self.term,
                        incarnation=self.incarnation,
                    )
                )
            elif message.type is MessageType.PRE_VOTE:
                self._send(
                    Message(
                        MessageType.PRE_VOTE_RESPONSE,
                        self.id,
                        message.source,
                        self.term,
                        reject=True,
                        incarnation=self.incarnation,
                    )
                )
            return

        if message.type in _VOTE_REQUESTS:
            self._handle_vote_request(message)
        elif self.role is Role.LEADER:
            self._step_leader(message)
        elif self.role in (Role.CANDIDATE, Role.PRE_CANDIDATE):
            self._step_candidate(message)
        else:
            self._step_follower(message)

    def propose(self, data: bytes) -> tuple[int, int]:
        """Append a command; returns its (index, term). It is acknowledged once an
        entry with that index *and term* is applied; another term there means lost."""
        self._assert_no_ready_outstanding()
        if self.role is not Role.LEADER:
            raise NotLeader(self.leader)
        if self.transfer_target != NO_NODE:
            raise ProposalDropped("leadership transfer under way")
        if self.log.last_index - self.commit >= self.config.uncommitted_entries_max:
            raise ProposalDropped(
                f"{self.config.uncommitted_entries_max} entries already wait for commit"
            )
        entry = Entry(self.log.last_index + 1, self.term, EntryKind.NORMAL, data)
        self.log.append((entry,))
        # Sent at the next ready(): proposals that arrive before it share one append.
        self._broadcast_pending = True
        return entry.index, entry.term

    def propose_membership(self, change: MembershipChange) -> tuple[int, int]:
        """Append a configuration entry making one single-server change; in force at
        once (on this leader, and on each follower as it appends it). Returns its
        (index, term) like `propose`. Raises NotLeader, ProposalDropped (busy, transfer)
        or MembershipRefused (which rule stops it: retry later, or never)."""
        self._assert_no_ready_outstanding()
        if self.role is not Role.LEADER:
            raise NotLeader(self.leader)
        if self.transfer_target != NO_NODE:
            raise ProposalDropped("leadership transfer under way")
        if self.log.last_index - self.commit >= self.config.uncommitted_entries_max:
            raise ProposalDropped(
                f"{self.config.uncommitted_entries_max} entries already wait for commit"
            )
        membership = self._changed(change)
        entry = Entry(self.log.last_index + 1, self.term, EntryKind.CONFIG, membership.encode())
        self._append_own((entry,))
        assert self.membership == membership and self.membership_index == entry.index
        self._broadcast_pending = True
        return entry.index, entry.term

    def _changed(self, change: MembershipChange) -> Membership:
        """The configuration `change` makes of the current one; MembershipRefused if a
        rule forbids it now."""
        if self.log.term_at(self.commit) != self.term:
            raise MembershipRefused(
                "this leader has not committed an entry of its term yet (a change now "
                "could undo one of a previous leader, dissertation 4.1): retry shortly"
            )
        if self.membership_index > self.commit:
            raise MembershipRefused(
                f"the change at index {self.membership_index} is not committed yet: "
                "one change at a time"
            )
        current = self.membership
        node = change.node
        voters, learners = set(current.voters), set(current.learners)
        addresses = dict(current.addresses)
        if change.kind is ChangeKind.ADD_LEARNER:
            if node in voters or node in learners:
                role = "voter" if node in voters else "learner"
                raise MembershipRefused(f"{node} is already a {role}")
            learners.add(node)
            if change.address:
                addresses[node] = change.address
        elif change.kind is ChangeKind.PROMOTE:
            if node in voters:
                raise MembershipRefused(f"{node} is already a voter")
            if node not in learners:
                raise MembershipRefused(f"{node} is not a learner: add it as one first")
            progress = self.progress[node]
            if not self.caught_up(node):
                raise MembershipRefused(
                    f"learner {node} has not caught up: it holds {progress.match} of "
                    f"{self.commit} committed entries ({progress.state.value})"
                )
            learners.discard(node)
            voters.add(node)
        else:
            assert change.kind is ChangeKind.REMOVE
            if node not in voters and node not in learners:
                raise MembershipRefused(f"{node} is not a member")
            if voters == {node}:
                raise MembershipRefused(f"{node} is the last voter")
            voters.discard(node)
            learners.discard(node)
            addresses.pop(node, None)
        if voters != set(current.voters):
            # etcd's strict reconfiguration check: a change that leaves fewer healthy
            # voters than a quorum would stop the cluster (and with a replaced store
            # among them, for good: only a leader can repair it, and none could be
            # elected). Healthy: heard from within an election timeout, store trusted.
            healthy = [v for v in sorted(voters) if self._healthy(v)]
            quorum = len(voters) // 2 + 1
            if len(healthy) < quorum:
                raise MembershipRefused(
                    f"{change.kind.value} {node} would leave {len(healthy)} healthy of "
                    f"{len(voters)} voters ({', '.join(healthy) or 'none'}): a quorum "
                    f"needs {quorum}"
                )
            if change.kind is ChangeKind.REMOVE:
                # Heard from lately is not enough to lose a voter: a follower still
                # probing (or one whose disk was wiped, the news not here yet) may not be
                # electable, and with a wiped voter restoring (it grants no vote until a
                # leader repairs it) and the removed one's change uncommitted, no quorum
                # could elect a leader ever again (the seeded harness, seeds 85 and 475).
                # A removal waits for a quorum of the rest to hold every committed entry.
                caught = [v for v in healthy if v == self.id or self.caught_up(v)]
                if len(caught) < quorum:
                    lagging = [v for v in sorted(voters) if v not in caught]
                    raise MembershipRefused(
                        f"remove {node} would leave {len(caught)} caught-up of "
                        f"{len(voters)} voters ({', '.join(caught) or 'none'}; not caught "
                        f"up: {', '.join(lagging)}): a quorum needs {quorum}; retry shortly, "
                        "once they have caught up (a restoring node is repaired first)"
                    )
        try:
            return Membership(
                tuple(sorted(voters)), tuple(sorted(learners)), tuple(sorted(addresses.items()))
            )
        except MembershipInvalid as error:
            raise MembershipRefused(str(error)) from None

    def _healthy(self, node: NodeId) -> bool:
        """A leader's view: `node` answers (within an election timeout) from a store it
        trusts (not one replaced and still being repaired)."""
        if node == self.id:
            return not self.restoring
        progress = self.progress.get(node)
        if progress is None:
            return False
        recent = self.now_ms - progress.last_heard_ms < self.config.election_timeout_ms_min
        previous = self._peer_stores.get(node, (0, 0))[1]
        return recent and not previous

    def caught_up(self, node: NodeId) -> bool:
        """A leader's view: `node` replicates steadily and holds every committed entry
        (so promoting it costs no availability: it can count at once)."""
        progress = self.progress.get(node) if self.role is Role.LEADER else None
        return (
            progress is not None
            and progress.state is ProgressState.REPLICATE
            and progress.match >= self.commit
        )

    def read_index(self, context: bytes) -> None:
        """Ask for a linearizable read point; answered by a ReadState in a later Ready."""
        self._assert_no_ready_outstanding()
        if self.role is not Role.LEADER:
            raise NotLeader(self.leader)
        assert context, "read contexts must be non-empty and unique"
        if self.log.term_at(self.commit) != self.term:
            # Until an entry of its own term commits, a new leader does not know the
            # latest commit index (dissertation 6.4): hold the read until then.
            self._reads_waiting_for_commit.append(context)
            return
        self._start_read(context)

    def transfer_leadership(self, target: NodeId, now_ms: int) -> None:
        self._advance_clock(now_ms)
        if self.role is not Role.LEADER:
            raise NotLeader(self.leader)
        if target == self.id or target not in self._voter_set:
            others = tuple(v for v in self.voters if v != self.id)
            raise ValueError(f"unknown transfer target {target!r}: voters are {others}")
        self.transfer_target = target
        self.transfer_deadline_ms = now_ms + self.config.election_timeout_ms_min
        progress = self.progress[target]
        if progress.match == self.log.last_index:
            self._send(
                Message(
                    MessageType.TIMEOUT_NOW,
                    self.id,
                    target,
                    self.term,
                    incarnation=self.incarnation,
                )
            )
        else:
            self._send_append(target, allow_empty=True)

    def campaign(self, now_ms: int) -> None:
        """Start an election now (tests and demos; production waits for the timer)."""
        self._advance_clock(now_ms)
        if self.role is not Role.LEADER and self.id in self._voter_set:
            self._campaign(pre_vote=self.config.pre_vote, force=False)

    def compact(self, index: int, data: bytes) -> Snapshot:
        """Take a local snapshot at `index` (<= applied) holding the state machine `data`.

        The runtime stores it with `Storage.compact`, which drops the log up to it."""
        self._assert_no_ready_outstanding()
        assert self.log.snapshot_index < index <= self.applied, (index, self.applied)
        membership = self._membership_at(index)
        term = self.log.compact(index)
        self._snapshot_membership = membership
        self._configs = {i: m for i, m in self._configs.items() if i > index}
        self._refresh_membership()
        self.snapshot = Snapshot(index, term, data, membership)
        return self.snapshot

    # ----------------------------------------------------------------- outputs

    def has_ready(self) -> bool:
        return bool(
            self._broadcast_pending
            or self._stores_pending
            or self._messages
            or self._pending_snapshot
            or self._read_states
            or self.log.unstable_from <= self.log.last_index
            or self.commit > self.applied
            or self._hard_state_changed()
        )

    def ready(self) -> Ready:
        self._assert_no_ready_outstanding()
        if self._stores_pending:
            self._stores_pending = False
            if self.role is Role.LEADER and self.transfer_target == NO_NODE:
                self._append_stores_entry()
        if self._broadcast_pending:
            self._broadcast_pending = False
            # Only a leader replicates: a proposal may have been followed by a step down
            # (a higher term arrived) before the runtime took this Ready.
            if self.role is Role.LEADER:
                self._broadcast_append(allow_empty=False)
        hard_state = self._hard_state()
        changed = hard_state != self._persisted_hard_state
        entries = self.log.unstable()
        apply_from = max(self.applied, self.log.snapshot_index) + 1
        # Apply only what is committed and stored here (the commit index can run ahead
        # of this node's log only transiently and never past its last entry).
        apply_to = min(self.commit, self.log.last_index)
        persisted = self._persisted_hard_state
        ready = Ready(
            snapshot=self._pending_snapshot,
            entries=entries,
            hard_state=hard_state if changed else None,
            messages=tuple(self._messages),
            committed=self.log.slice(apply_from, apply_to + 1) if apply_to >= apply_from else (),
            read_states=tuple(self._read_states),
            must_sync=bool(
                entries
                or self._pending_snapshot
                or hard_state.term != self._persisted_hard_state.term
                or hard_state.vote != self._persisted_hard_state.vote
                # What peers' stores are, and that this one is restoring: rare, durable
                # before anything acts on it. Leaving restoring may wait (conservative).
                or hard_state.peers != self._persisted_hard_state.peers
                or (hard_state.restoring and not self._persisted_hard_state.restoring)
            ),
            # Raft dissertation §10.2.1: a leader may send its entries while it writes
            # them, because it counts itself for them only at `advance` (`_maybe_commit`
            # reads the stable index). Only a leader's own traffic, and only when what
            # its messages rest on is stored already: its term and vote (a candidate
            # stored them before asking for votes), its peers' stores and restoring.
            send_before_persist=bool(
                self.role is Role.LEADER
                and self._pending_snapshot is None
                and hard_state.term == persisted.term
                and hard_state.vote == persisted.vote
                and hard_state.restoring == persisted.restoring
                and hard_state.peers == persisted.peers
                and all(m.type in _LEADER_TRAFFIC for m in self._messages)
            ),
        )
        assert not (ready.send_before_persist and ready.snapshot), "a leader installs none"
        self._messages.clear()
        self._read_states.clear()
        self._ready_outstanding = True
        return ready

    def advance(self, ready: Ready) -> None:
        assert self._ready_outstanding, "advance without ready"
        self._ready_outstanding = False
        if ready.snapshot is not None:
            assert self._pending_snapshot is ready.snapshot
            self._pending_snapshot = None
            self.snapshot = ready.snapshot
            self.applied = max(self.applied, ready.snapshot.index)
        if ready.entries:
            self.log.stable_to(ready.entries[-1].index)
        if ready.hard_state is not None:
            self._persisted_hard_state = ready.hard_state
        if ready.committed:
            assert ready.committed[0].index == self.applied + 1, "apply in order, no gaps"
            self.applied = ready.committed[-1].index
        assert self.applied <= self.commit
        if self.role is Role.LEADER and self._maybe_commit():
            # The leader counts itself only for what it has stored (STYLE.md: persist,
            # then send; commit needs a durable majority). The new commit index rides on
            # the next append or heartbeat: no empty append just to carry it.
            self._broadcast_append(allow_empty=False)

    # ---------------------------------------------------------------- queries

    def status(self) -> dict[str, object]:
        return {
            "id": self.id,
            "role": self.role.value,
            "term": self.term,
            "leader": self.leader,
            "commit": self.commit,
            "applied": self.applied,
            "last_index": self.log.last_index,
            "snapshot_index": self.log.snapshot_index,
            "restoring": self.restoring,
            "repairs": self.repairs,
            "voters": list(self.voters),
            "learners": list(self.membership.learners),
            "membership_index": self.membership_index,
            # The leader's view of each member's log (empty on a follower).
            "progress": {
                peer: {
                    "match": progress.match,
                    "next": progress.next,
                    "state": progress.state.value,
                    "voter": peer in self._voter_set,
                    "caught_up": self.caught_up(peer),
                }
                for peer, progress in sorted(self.progress.items())
            },
        }

    # ------------------------------------------------------------ role changes

    def _become_follower(self, term: int, leader: NodeId) -> None:
        assert term >= self.term, "terms never go back"
        if term > self.term:
            self.term = term
            self.vote = NO_NODE
        self.role = Role.FOLLOWER
        self.leader = leader
        self.leader_heard_ms = self.now_ms if leader != NO_NODE else None
        self.progress = {}
        self.transfer_target = NO_NODE
        self._drop_reads()
        self._reset_election_deadline()

    def _campaign(self, pre_vote: bool, force: bool) -> None:
        self._reset_election_deadline()
        self.leader = NO_NODE
        self.leader_heard_ms = None
        self.votes = {self.id: True}
        if pre_vote:
            # PreVote: ask first whether we could win, without raising our term, so a
            # node that was cut off cannot disrupt the cluster when it comes back.
            self.role = Role.PRE_CANDIDATE
            campaign_term = self.term + 1
            kind = MessageType.PRE_VOTE
        else:
            self.role = Role.CANDIDATE
            self.term += 1
            self.vote = self.id
            campaign_term = self.term
            kind = MessageType.VOTE
        if self._tally() == "won":
            self._on_election_won()
            return
        for peer in self.voters:
            if peer == self.id:
                continue
            self._send(
                Message(
                    kind,
                    self.id,
                    peer,
                    campaign_term,
                    log_index=self.log.last_index,
                    log_term=self.log.last_term,
                    force=force,
                    incarnation=self.incarnation,
                )
            )

    def _on_election_won(self) -> None:
        if self.role is Role.PRE_CANDIDATE:
            self._campaign(pre_vote=False, force=False)
        else:
            self._become_leader()

    def _become_leader(self) -> None:
        assert self.role is Role.CANDIDATE
        assert self.vote == self.id
        assert self.id in self._voter_set, "only a voter campaigns"
        self.role = Role.LEADER
        self.leader = self.id
        self.leader_heard_ms = None
        self.transfer_target = NO_NODE
        self.progress = {
            peer: Progress(match=0, next=self.log.last_index + 1, last_heard_ms=self.now_ms)
            for peer in self.peers
        }
        self.heartbeat_deadline_ms = self.now_ms + self.config.heartbeat_interval_ms
        # Only entries of the current term commit by counting (Figure 8): an entry of
        # our own term lets the predecessors' entries commit with it. It carries the
        # stores this leader trusts, so every node learns them (_adopt_stores).
        self._append_stores_entry()
        self._broadcast_append(allow_empty=True)

    def _append_stores_entry(self) -> None:
        trusted = [[self.id, self.incarnation]]
        members = set(self.peers)
        for peer, (known, previous) in sorted(self._peer_stores.items()):
            if peer in members and (previous or known):
                trusted.append([peer, previous or known])  # a replaced one: its old store
        data = json.dumps({"stores": sorted(trusted)}, separators=(",", ":")).encode()
        self.log.append((Entry(self.log.last_index + 1, self.term, EntryKind.NOOP, data),))
        self._broadcast_pending = True

    # -------------------------------------------------------------- elections

    def _handle_vote_request(self, message: Message) -> None:
        is_pre_vote = message.type is MessageType.PRE_VOTE
        log_ok = message.log_term > self.log.last_term or (
            message.log_term == self.log.last_term and message.log_index >= self.log.last_index
        )
        can_vote = (
            self.vote == message.source
            or (self.vote == NO_NODE and self.leader == NO_NODE)
            or (is_pre_vote and message.term > self.term)
        )
        # Amnesia: a store that may have lost entries it acknowledged must not help
        # elect a candidate that lacks them. It votes only while the cluster has no
        # history at all (a new cluster), until a leader has caught it up.
        amnesiac = self.restoring and message.log_index > 0
        granted = log_ok and can_vote and not amnesiac
        response = MessageType.PRE_VOTE_RESPONSE if is_pre_vote else MessageType.VOTE_RESPONSE
        if granted and not is_pre_vote:
            assert message.term == self.term
            self.vote = message.source
            self._reset_election_deadline()
        self._send(
            Message(
                response,
                self.id,
                message.source,
                message.term if granted else self.term,
                reject=not granted,
                incarnation=self.incarnation,
            )
        )

    def _tally(self) -> str:
        # Only voters of this node's own configuration count, whoever answered.
        granted = sum(1 for node, ok in self.votes.items() if ok and node in self._voter_set)
        rejected = sum(1 for node, ok in self.votes.items() if not ok and node in self._voter_set)
        if granted >= self.quorum:
            return "won"
        if rejected >= self.quorum:
            return "lost"
        return "pending"

    def _step_candidate(self, message: Message) -> None:
        expected = (
            MessageType.PRE_VOTE_RESPONSE
            if self.role is Role.PRE_CANDIDATE
            else MessageType.VOTE_RESPONSE
        )
        if message.type in _FROM_LEADER:
            # A leader exists in our term (a pre-candidate has not raised its term).
            self._become_follower(message.term, message.source)
            self._step_follower(message)
        elif message.type is expected:
            # A grant from a peer whose store was just replaced is void: that store may
            # have lost what the old one acknowledged (it may not know it yet).
            replaced = self._peer_stores.get(message.source, (0, 0))[1] != 0
            self.votes.setdefault(message.source, not message.reject and not replaced)
            outcome = self._tally()
            if outcome == "won":
                self._on_election_won()
            elif outcome == "lost":
                self._become_follower(self.term, NO_NODE)

    # ---------------------------------------------------------------- follower

    def _step_follower(self, message: Message) -> None:
        if message.type in _FROM_LEADER:
            self.leader = message.source
            self.leader_heard_ms = self.now_ms
            self._reset_election_deadline()
        self._step_follower_kind(message)
        if self.restoring and message.type in _FROM_LEADER:
            self._restored_if_caught_up()

    def _restored_if_caught_up(self) -> None:
        """A restoring node is caught up once it holds an entry of the current leader's
        term that is committed: by leader completeness and log matching it then holds
        everything ever committed, so its vote is safe again."""
        if self.commit > 0 and self.log.term_at(self.commit) == self.term:
            self.restoring = False

    def _step_follower_kind(self, message: Message) -> None:
        if message.type is MessageType.APPEND:
            self._handle_append(message)
        elif message.type is MessageType.HEARTBEAT:
            self.commit = max(self.commit, min(message.commit, self.log.last_index))
            self._send(
                Message(
                    MessageType.HEARTBEAT_RESPONSE,
                    self.id,
                    message.source,
                    self.term,
                    context=message.context,
                    incarnation=self.incarnation,
                )
            )
        elif message.type is MessageType.SNAPSHOT:
            self._handle_snapshot(message)
        elif message.type is MessageType.TIMEOUT_NOW and self.id in self._voter_set:
            # Leadership transfer: campaign at once, skipping PreVote and the lease.
            self._campaign(pre_vote=False, force=True)

    def _handle_append(self, message: Message) -> None:
        respond_index: int
        if message.log_index < self.commit:
            # Everything up to our commit index already matches the leader.
            respond_index = self.commit
        elif self.log.matches(message.log_index, message.log_term):
            for entry in message.entries:
                existing = self.log.term_at(entry.index)
                if existing is None:
                    self._append_from_leader(self._entries_from(message.entries, entry.index))
                    break
                if existing != entry.term:
                    # Figure 2, AppendEntries rule 3: delete the conflicting entry and
                    # all that follow it. Committed entries never conflict.
                    assert entry.index > self.commit, "a committed entry conflicts"
                    self._truncate_from(entry.index)
                    self._append_from_leader(self._entries_from(message.entries, entry.index))
                    break
            last_new = message.log_index + len(message.entries)
            self.commit = max(self.commit, min(message.commit, last_new))
            respond_index = last_new
        else:
            hint_index, hint_term = self.log.conflict_hint(
                min(message.log_index, self.log.last_index), message.log_term
            )
            self._send(
                Message(
                    MessageType.APPEND_RESPONSE,
                    self.id,
                    message.source,
                    self.term,
                    index=message.log_index,
                    reject=True,
                    hint_index=hint_index,
                    hint_term=hint_term,
                    incarnation=self.incarnation,
                )
            )
            return
        self._send(
            Message(
                MessageType.APPEND_RESPONSE,
                self.id,
                message.source,
                self.term,
                index=respond_index,
                incarnation=self.incarnation,
            )
        )

    def _append_from_leader(self, entries: tuple[Entry, ...]) -> None:
        self._append_own(entries)
        for entry in entries:
            if entry.kind is EntryKind.NOOP and entry.data:
                self._adopt_stores(entry.data)

    def _adopt_stores(self, data: bytes) -> None:
        """A leader's entry listing the stores it trusts: what each peer's store is, and
        whether the cluster trusted an earlier store of this node (amnesia)."""
        try:
            listed = json.loads(data)["stores"]
            stores = [(str(node), int(incarnation)) for node, incarnation in listed]
        except (ValueError, KeyError, TypeError):
            return  # not written by goml: nothing to learn from it
        for node, incarnation in stores:
            if node == self.id:
                if 0 < incarnation < self.incarnation and not self.restoring:
                    self.restoring = True  # the cluster trusted an earlier store of ours
                continue
            known, previous = self._peer_stores.get(node, (0, 0))
            if incarnation > known:
                self._remember(node, incarnation, 0)
            elif incarnation == known and previous:
                self._remember(node, known, 0)  # restored: the leader trusts it again
            elif incarnation < known and not previous:
                # We saw a newer store directly that the leader does not trust yet.
                self._remember(node, known, incarnation)

    @staticmethod
    def _entries_from(entries: tuple[Entry, ...], index: int) -> tuple[Entry, ...]:
        return tuple(e for e in entries if e.index >= index)

    def _handle_snapshot(self, message: Message) -> None:
        chunk = message.snapshot
        assert chunk is not None
        if chunk.index <= self.commit:
            self._incoming = None
            respond_index = self.commit
        elif self.log.matches(chunk.index, chunk.term):
            # Our log already holds the snapshot's last entry: by log matching it holds
            # everything before it too, so only the commit index moves.
            self._incoming = None
            self.commit = chunk.index
            respond_index = chunk.index
        else:
            snapshot = self._receive_chunk(message, chunk)
            if snapshot is None:
                return  # more to come (answered with what we hold)
            # Our log disagrees with the snapshot, so nothing in it can be trusted: it is
            # dropped entirely, and we acknowledge the snapshot's index and no more. (The
            # PySyncObj bug was to keep and acknowledge entries beyond it.)
            self.log.restore(snapshot)
            self._configs = {}
            self._snapshot_membership = snapshot.membership or self._bootstrap
            self._refresh_membership()
            self.commit = snapshot.index
            self._pending_snapshot = snapshot
            respond_index = snapshot.index
        self._send(
            Message(
                MessageType.APPEND_RESPONSE,
                self.id,
                message.source,
                self.term,
                index=respond_index,
                incarnation=self.incarnation,
            )
        )

    def _receive_chunk(self, message: Message, chunk: Snapshot) -> Snapshot | None:
        """Add one chunk to the snapshot being received; the whole snapshot once this
        chunk completes it, else None (the sender is told how much we hold)."""
        offset, size = message.snapshot_offset_bytes, message.snapshot_size_bytes
        if offset == 0 and size == 0:
            size = len(chunk.data)  # the whole snapshot in one message (a peer that says no size)
        incoming = self._incoming
        key = (message.source, message.term, chunk.index, chunk.term, size)
        if incoming is None or incoming.key() != key:
            if offset != 0:
                # A chunk of a transfer we do not hold (we restarted, or it is a new
                # one): ask for it from the start.
                self._send_snapshot_progress(message.source, chunk, 0)
                return None
            incoming = _IncomingSnapshot(
                message.source, message.term, chunk.index, chunk.term, size, chunk.membership, []
            )
            self._incoming = incoming
        if offset == incoming.received_bytes and offset + len(chunk.data) <= size:
            incoming.chunks.append(chunk.data)
            incoming.received_bytes += len(chunk.data)
        # Otherwise a duplicate or one after a gap: ignored; we say what we hold.
        if incoming.received_bytes < size:
            self._send_snapshot_progress(message.source, chunk, incoming.received_bytes)
            return None
        assert incoming.received_bytes == size
        self._incoming = None
        data = b"".join(incoming.chunks)
        return Snapshot(chunk.index, chunk.term, data, incoming.membership)

    def _send_snapshot_progress(self, leader: NodeId, chunk: Snapshot, received: int) -> None:
        self._send(
            Message(
                MessageType.SNAPSHOT_RESPONSE,
                self.id,
                leader,
                self.term,
                log_index=chunk.index,
                log_term=chunk.term,
                snapshot_offset_bytes=received,
                incarnation=self.incarnation,
            )
        )

    # ------------------------------------------------------------------ leader

    def _step_leader(self, message: Message) -> None:
        progress = self.progress.get(message.source)
        if progress is None:
            return  # not a member of this leader's configuration (removed, or unknown)
        progress.last_heard_ms = self.now_ms
        if message.type is MessageType.SNAPSHOT_RESPONSE:
            self._handle_snapshot_progress(message.source, progress, message)
        elif message.type is MessageType.APPEND_RESPONSE:
            if message.reject:
                self._handle_append_rejection(message.source, progress, message)
            else:
                self._handle_append_success(message.source, progress, message.index)
        elif message.type is MessageType.HEARTBEAT_RESPONSE:
            progress.probe_sent = False
            if len(progress.inflight_last_indexes) >= self.config.inflight_messages_max:
                # The window is full and the follower is alive: some append was lost.
                # Free one slot so the next append goes out; the follower's rejection of
                # it (a gap) sends this progress back to probing from its real match.
                progress.inflight_last_indexes.pop(0)
            if progress.match < self.log.last_index:
                self._send_append(message.source, allow_empty=True)
            if message.context:
                self._ack_read(message.context, message.source)

    def _handle_append_success(self, peer: NodeId, progress: Progress, index: int) -> None:
        progress.inflight_last_indexes = [i for i in progress.inflight_last_indexes if i > index]
        if index <= progress.match:
            return  # a stale or duplicate acknowledgement
        assert index <= self.log.last_index, "a follower acknowledged entries we never had"
        progress.match = index
        progress.next = max(progress.next, index + 1)
        progress.probe_sent = False
        known, previous = self._peer_stores.get(peer, (0, 0))
        if previous and index >= self.commit and self.log.term_at(index) == self.term:
            # A replaced follower holds everything committed (an entry of our term at
            # or past the commit index): trust its new store, and say so in the log.
            self._remember(peer, known, 0)
            self._append_stores_entry()
        if progress.state is ProgressState.SNAPSHOT:
            if index >= progress.pending_snapshot_index:
                progress.state = ProgressState.PROBE
                progress.snapshot = None
        elif progress.state is ProgressState.PROBE:
            progress.state = ProgressState.REPLICATE
            progress.inflight_last_indexes = []
        if self._maybe_commit():
            # The commit index rides on the next append or heartbeat (an empty append per
            # commit doubled the messages of every proposal).
            self._broadcast_append(allow_empty=False)
        elif progress.next <= self.log.last_index:
            self._send_append(peer, allow_empty=False)
        if peer == self.transfer_target and progress.match == self.log.last_index:
            self._send(
                Message(
                    MessageType.TIMEOUT_NOW, self.id, peer, self.term, incarnation=self.incarnation
                )
            )

    def _handle_append_rejection(self, peer: NodeId, progress: Progress, message: Message) -> None:
        rejected = message.index
        if progress.state is ProgressState.SNAPSHOT:
            return  # stale: answers an append sent before the snapshot
        if progress.state is ProgressState.REPLICATE:
            if rejected <= progress.match:
                return  # stale: sent before a later success
            progress.next = progress.match + 1
        elif progress.next - 1 != rejected:
            return  # stale: answers a probe we have moved past
        else:
            probe = message.hint_index
            if message.hint_term > 0:
                # Skip over the follower's whole conflicting term in one step.
                probe, _ = self.log.conflict_hint(message.hint_index, message.hint_term)
            progress.next = max(min(rejected, probe + 1), progress.match + 1)
        progress.state = ProgressState.PROBE
        progress.probe_sent = False
        progress.inflight_last_indexes = []
        self._send_append(peer, allow_empty=True)

    def _maybe_commit(self) -> bool:
        """Advance the commit index by the voters of this leader's configuration (itself
        only if it is one, and only for what it has stored). True if it moved and this
        node still leads (a leader whose removal commits steps down here)."""
        matches = [p.match for peer, p in self.progress.items() if peer in self._voter_set]
        if self.id in self._voter_set:
            matches.append(self.log.unstable_from - 1)
        assert len(matches) == len(self.voters), (matches, self.voters)
        matches.sort(reverse=True)
        candidate = matches[self.quorum - 1]
        # Figure 2 leader rule: commit by counting only entries of the current term.
        if candidate > self.commit and self.log.term_at(candidate) == self.term:
            self.commit = candidate
            self._on_commit_advanced()
            if self.id not in self._voter_set and self.membership_index <= self.commit:
                self._step_down_removed()
                return False
            return True
        return False

    def _step_down_removed(self) -> None:
        """This leader's removal committed: tell everyone the commit index, hand off to
        the most caught-up voter so no election timeout is lost, and step down. It never
        campaigns again (it is no voter by its own configuration).

        The hand-off goes also when that voter does not hold the whole log yet (entries
        proposed behind the change, common under load: 3 of 13 removals of a
        leader in the simulated chaos rolling-replace, seeds 1-10). Waiting for it to
        catch up, as `transfer_leadership` does, loses the race with the operator, who
        stops a removed node once its removal is answered; stepping down without a
        TimeoutNow cost an election timeout. Sent now, the TimeoutNow follows the appends
        on the stream, and it is safe in any order: the vote rule still decides. Its
        candidate holds everything committed (it is the most caught-up voter) and wins
        unless a majority's logs are longer than the leader knows, and then an election
        timeout passes, as before; what it lacks was never committed (its clients retry)."""
        assert self.role is Role.LEADER and self.id not in self._voter_set
        self._broadcast_append(allow_empty=True)
        ranked = sorted(
            (-p.match, peer) for peer, p in self.progress.items() if peer in self._voter_set
        )
        if ranked:
            self._send(
                Message(
                    MessageType.TIMEOUT_NOW,
                    self.id,
                    ranked[0][1],
                    self.term,
                    incarnation=self.incarnation,
                )
            )
        self._become_follower(self.term, NO_NODE)

    def _on_commit_advanced(self) -> None:
        if self.restoring and self.log.term_at(self.commit) == self.term:
            self.restoring = False  # elected and committed in its term: it holds it all
        if self.log.term_at(self.commit) == self.term and self._reads_waiting_for_commit:
            waiting, self._reads_waiting_for_commit = self._reads_waiting_for_commit, []
            for context in waiting:
                self._start_read(context)

    def _broadcast_append(self, allow_empty: bool) -> None:
        for peer in self.peers:
            self._send_append(peer, allow_empty)

    def _send_append(self, peer: NodeId, allow_empty: bool) -> None:
        progress = self.progress.get(peer)
        if progress is None or progress.is_paused(self.config.inflight_messages_max):
            return  # a member no more (or stepped down), or its window is full
        previous = progress.next - 1
        previous_term = self.log.term_at(previous)
        if previous_term is None:
            self._send_snapshot(peer, progress)
            return
        last = min(self.log.last_index, previous + self.config.entries_per_message_max)
        entries = self._bounded(self.log.slice(progress.next, last + 1))
        if not entries and not allow_empty:
            return
        self._send(
            Message(
                MessageType.APPEND,
                self.id,
                peer,
                self.term,
                log_index=previous,
                log_term=previous_term,
                entries=entries,
                commit=self.commit,
                incarnation=self.incarnation,
            )
        )
        if progress.state is ProgressState.REPLICATE:
            if entries:
                # Pipelining: assume success and move on; a rejection resets `next`.
                progress.next = entries[-1].index + 1
                progress.inflight_last_indexes.append(entries[-1].index)
        else:
            progress.probe_sent = True

    def _bounded(self, entries: tuple[Entry, ...]) -> tuple[Entry, ...]:
        """At most `message_bytes_max` of entry data, and never less than one entry."""
        budget = self.config.message_bytes_max
        for count, entry in enumerate(entries):
            budget -= len(entry.data)
            if budget < 0 and count > 0:
                return entries[:count]
        return entries

    def _send_snapshot(self, peer: NodeId, progress: Progress) -> None:
        assert self.snapshot is not None, "entries were compacted, so a snapshot exists"
        progress.state = ProgressState.SNAPSHOT
        progress.pending_snapshot_index = self.snapshot.index
        progress.inflight_last_indexes = []
        progress.snapshot = self.snapshot
        progress.snapshot_sent_bytes = 0
        progress.snapshot_acked_bytes = 0
        progress.snapshot_all_sent = False
        progress.snapshot_progress_ms = self.now_ms
        self._send_snapshot_chunks(peer, progress, self.config.snapshot_chunks_inflight_max)

    def _send_snapshot_chunks(self, peer: NodeId, progress: Progress, chunks_max: int) -> None:
        """Send the next chunks, keeping at most `snapshot_chunks_inflight_max` of them
        unacknowledged (flow control: a slow link is not flooded)."""
        snapshot = progress.snapshot
        assert snapshot is not None and progress.state is ProgressState.SNAPSHOT
        chunk_bytes = self.config.snapshot_chunk_bytes_max
        window_bytes = chunk_bytes * self.config.snapshot_chunks_inflight_max
        size = len(snapshot.data)
        for _ in range(chunks_max):
            unacknowledged = progress.snapshot_sent_bytes - progress.snapshot_acked_bytes
            if progress.snapshot_all_sent or unacknowledged >= window_bytes:
                return
            offset = progress.snapshot_sent_bytes
            data = snapshot.data[offset : offset + chunk_bytes]
            self._send(
                Message(
                    MessageType.SNAPSHOT,
                    self.id,
                    peer,
                    self.term,
                    snapshot=Snapshot(snapshot.index, snapshot.term, data, snapshot.membership),
                    snapshot_offset_bytes=offset,
                    snapshot_size_bytes=size,
                    incarnation=self.incarnation,
                )
            )
            progress.snapshot_sent_bytes = offset + len(data)
            progress.snapshot_all_sent = progress.snapshot_sent_bytes >= size

    def _handle_snapshot_progress(self, peer: NodeId, progress: Progress, message: Message) -> None:
        snapshot = progress.snapshot
        if progress.state is not ProgressState.SNAPSHOT or snapshot is None:
            return  # stale: the transfer is over
        if (message.log_index, message.log_term) != (snapshot.index, snapshot.term):
            return  # stale: answers an earlier snapshot
        received = message.snapshot_offset_bytes
        if received < progress.snapshot_acked_bytes:
            # The receiver holds less than it said before: it restarted (or this answer
            # was overtaken). Go on from what it holds.
            progress.snapshot_acked_bytes = received
            progress.snapshot_sent_bytes = received
            progress.snapshot_all_sent = False
        elif received > progress.snapshot_acked_bytes:
            progress.snapshot_acked_bytes = min(received, len(snapshot.data))
            progress.snapshot_sent_bytes = max(progress.snapshot_sent_bytes, received)
            progress.snapshot_progress_ms = self.now_ms
        self._send_snapshot_chunks(peer, progress, self.config.snapshot_chunks_inflight_max)

    def _broadcast_heartbeat(self, context: bytes) -> None:
        for peer, progress in self.progress.items():
            progress.probe_sent = False
            if (
                progress.state is ProgressState.SNAPSHOT
                and self.now_ms - progress.snapshot_progress_ms
                >= self.config.election_timeout_ms_min
            ):
                # Nothing acknowledged for an election timeout: chunks were lost (or the
                # receiver is down). Go on from the last acknowledged byte, one chunk as
                # a probe; its answer reopens the window.
                progress.snapshot_sent_bytes = progress.snapshot_acked_bytes
                progress.snapshot_all_sent = False
                progress.snapshot_progress_ms = self.now_ms
                self._send_snapshot_chunks(peer, progress, 1)
            self._send(
                Message(
                    MessageType.HEARTBEAT,
                    self.id,
                    peer,
                    self.term,
                    commit=min(progress.match, self.commit),
                    context=context,
                    incarnation=self.incarnation,
                )
            )

    def quorum_active(self) -> bool:
        """A leader heard from a majority within the last election timeout."""
        window_start = self.now_ms - self.config.election_timeout_ms_min
        active = sum(
            1
            for peer, p in self.progress.items()
            if peer in self._voter_set and p.last_heard_ms >= window_start
        )
        if self.id in self._voter_set:
            active += 1
        return active >= self.quorum

    # ------------------------------------------------------------- read index

    def _start_read(self, context: bytes) -> None:
        if self.voters == (self.id,):
            self._read_states.append(ReadState(context, self.commit))
            return
        acks = {self.id} if self.id in self._voter_set else set()
        self._reads_pending.append(_PendingRead(context, self.commit, acks))
        self._broadcast_heartbeat(context)

    def _ack_read(self, context: bytes, peer: NodeId) -> None:
        if peer not in self._voter_set:
            return  # a learner's answer confirms nothing
        for position, read in enumerate(self._reads_pending):
            if read.context != context:
                continue
            read.acks.add(peer)
            if len(read.acks & self._voter_set) >= self.quorum:
                # A quorum confirmed we were still leader after this read arrived, so it
                # and every read queued before it are safe at their recorded index.
                done = self._reads_pending[: position + 1]
                self._reads_pending = self._reads_pending[position + 1 :]
                self._read_states.extend(ReadState(r.context, r.index) for r in done)
            return

    def _drop_reads(self) -> None:
        # Callers wait with a deadline and retry on the new leader.
        self._reads_pending = []
        self._reads_waiting_for_commit = []

    # -------------------------------------------------------------- membership

    def _append_own(self, entries: tuple[Entry, ...]) -> None:
        """Append to the log, putting any configuration in it in force at once."""
        self.log.append(entries)
        configs = [e for e in entries if e.kind is EntryKind.CONFIG]
        for entry in configs:
            self._configs[entry.index] = Membership.decode(entry.data)
        if configs:
            self._refresh_membership()

    def _truncate_from(self, index: int) -> None:
        """Drop entries from `index` on; a configuration among them is undone."""
        self.log.truncate_from(index)
        if any(i >= index for i in self._configs):
            self._configs = {i: m for i, m in self._configs.items() if i < index}
            self._refresh_membership()

    def _membership_at(self, index: int) -> Membership:
        """The configuration in force at `index` (of this log)."""
        before = [i for i in self._configs if i <= index]
        return self._configs[max(before)] if before else self._snapshot_membership

    def _refresh_membership(self) -> None:
        """Put in force the latest configuration of the log (or the snapshot's, or the
        bootstrap one): who votes, who is replicated to, what a quorum is."""
        if self._configs:
            index = max(self._configs)
            membership = self._configs[index]
        else:
            index, membership = self.log.snapshot_index, self._snapshot_membership
        if (index, membership) == (self.membership_index, self.membership):
            return
        self.membership, self.membership_index = membership, index
        self.voters = membership.voters
        self.peers = tuple(m for m in membership.members if m != self.id)
        self.quorum = membership.quorum
        self._voter_set = frozenset(membership.voters)
        if self.role is Role.LEADER:
            self._sync_progress()

    def _sync_progress(self) -> None:
        """A leader tracks exactly the members of its configuration. A new one is
        probed from the entry that made it a member (its answer finds its log)."""
        for peer in self.peers:
            if peer not in self.progress:
                self.progress[peer] = Progress(
                    match=0, next=max(1, self.log.last_index), last_heard_ms=self.now_ms
                )
        for peer in [p for p in self.progress if p not in self.peers]:
            del self.progress[peer]
        if self.transfer_target != NO_NODE and self.transfer_target not in self._voter_set:
            self.transfer_target = NO_NODE

    # ----------------------------------------------------------------- helpers

    def _send(self, message: Message) -> None:
        assert message.source == self.id
        assert message.target != self.id
        assert message.incarnation == self.incarnation, "every message says which store sent it"
        previous = self._peer_stores.get(message.target, (0, 0))[1]
        if previous and message.target in self._told:
            previous = 0
        if self.restoring or previous:  # rare: only while a store replacement is news
            message = replace(message, restoring=self.restoring, target_previous=previous)
        self._messages.append(message)

    def _hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.commit, self.restoring, self._peers_state)

    def _hard_state_changed(self) -> bool:
        """`_hard_state() != _persisted_hard_state`, field by field: has_ready asks it
        on every loop turn, and building a HardState each time was a tenth of its cost."""
        persisted = self._persisted_hard_state
        return (
            self.term != persisted.term
            or self.vote != persisted.vote
            or self.commit != persisted.commit
            or self.restoring != persisted.restoring
            or self._peers_state != persisted.peers
        )

    def _from_live_store(self, message: Message) -> bool:
        """Amnesia, detected by peers' memory of each other's stores (trusted on first
        contact, persisted). A message of a store older than the newest seen of its
        sender is from a store that no longer exists: dropped. A newer store means the
        peer lost its disk: a leader finds its log from scratch (its old match is void),
        and every message to it names the store it replaced, until it says it knows.
        A node told so of itself is `restoring`: it grants no vote to a candidate with
        history until a leader has caught it up (`_restored_if_caught_up`).

        Limit: a node that comes back with an empty disk while every peer that knew its
        old store is down cannot be told (as etcd, which asks its peers at start)."""
        incarnation = message.incarnation
        if not incarnation:
            return True  # a peer that does not say (a test's hand-made message)
        source = message.source
        known, previous = self._peer_stores.get(source, (0, 0))
        if incarnation < known:
            return False
        if incarnation > known:
            if known:
                previous = known
                self.repairs += 1
                progress = self.progress.get(source) if self.role is Role.LEADER else None
                if progress is not None:
                    progress.match = 0
                    progress.next = self.log.last_index + 1
                    progress.state = ProgressState.PROBE
                    progress.probe_sent = False
                    progress.inflight_last_indexes = []
                    progress.snapshot = None
            self._remember(source, incarnation, previous)
            if not known and self.role is Role.LEADER:
                # A store the log does not list yet: one entry at the next ready() lists
                # every such store (responses of one round share it).
                self._stores_pending = True
        if previous and message.restoring:
            self._told.add(source)  # it knows now: no need to keep telling it
        told = message.target_previous
        if told and told != self.incarnation and not self.restoring:
            self.restoring = True  # a peer knew an earlier store of this node
        return True

    def trusted_store(self, peer: NodeId) -> int:
        """The store of `peer` this node trusts (0: none known, or a replaced one)."""
        known, previous = self._peer_stores.get(peer, (0, 0))
        return 0 if previous else known

    def _remember(self, peer: NodeId, incarnation: int, previous: int) -> None:
        if not previous:
            self._told.discard(peer)
        self._peer_stores[peer] = (incarnation, previous)
        self._peers_state = tuple(sorted((p, i, b) for p, (i, b) in self._peer_stores.items()))

    def _in_leader_lease(self) -> bool:
        if not self.config.check_quorum:
            return False
        if self.role is Role.LEADER:
            # A live leader is its own lease (etcd: lead == self): CheckQuorum makes it
            # step down once it loses the majority. Without this, a node rejoining after
            # a partition won its PreVote with the leader's own grant (leader + it form
            # a majority of 3) and deposed a healthy leader (testdata/raft/prevote.txt).
            return True
        if self.leader_heard_ms is None:
            return False
        return self.now_ms - self.leader_heard_ms < self.config.election_timeout_ms_min

    def _reset_election_deadline(self) -> None:
        timeout = self._rng.randint(
            self.config.election_timeout_ms_min, self.config.election_timeout_ms_max
        )
        self.election_deadline_ms = self.now_ms + timeout

    def _advance_clock(self, now_ms: int) -> None:
        self._assert_no_ready_outstanding()
        assert now_ms >= self.now_ms, "time never goes back"
        self.now_ms = now_ms

    def _assert_no_ready_outstanding(self) -> None:
        assert not self._ready_outstanding, "input between ready() and advance()"
