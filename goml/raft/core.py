"""goml's sans-IO Raft core.

Inputs are method calls (`tick`, `step`, `propose`, `read_index`,
`transfer_leadership`, `compact`); outputs are taken with `ready()` and
acknowledged with `advance()`. No sockets, files, clocks or global randomness:
time arrives as `now_ms`, randomness from the `random.Random` passed in.

The rules are the Raft paper's (Figure 2 and chapter 9 of the dissertation for
PreVote and CheckQuorum), shaped after etcd's raft package. Between `ready()` and
`advance()` no other input may be given (asserted): the runtime persists, sends,
applies, then advances.
"""

from __future__ import annotations

import enum
import json
import random
from dataclasses import dataclass, field, replace

from goml.raft.log import RaftLog
from goml.raft.types import (
    NO_NODE,
    Config,
    Entry,
    EntryKind,
    HardState,
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


class RaftCore:
    def __init__(
        self, config: Config, persisted: PersistedState, rng: random.Random, now_ms: int
    ) -> None:
        self.config = config
        self.id = config.node_id
        self.peers = tuple(v for v in config.voters if v != config.node_id)
        self.quorum = len(config.voters) // 2 + 1
        self._rng = rng
        self.now_ms = now_ms

        self.log = RaftLog(persisted.snapshot, persisted.entries)
        self.snapshot: Snapshot | None = persisted.snapshot
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

        self.role = Role.FOLLOWER
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
            self._campaign(pre_vote=self.config.pre_vote, force=False)

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
        assert message.source in self.config.voters and message.source != self.id, message
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
        if target not in self.peers:
            raise ValueError(f"unknown transfer target {target!r}: voters are {self.peers}")
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
        if self.role is not Role.LEADER:
            self._campaign(pre_vote=self.config.pre_vote, force=False)

    def compact(self, index: int, data: bytes) -> Snapshot:
        """Take a local snapshot at `index` (<= applied) holding the state machine `data`.

        The runtime stores it with `Storage.compact`, which drops the log up to it."""
        self._assert_no_ready_outstanding()
        assert self.log.snapshot_index < index <= self.applied, (index, self.applied)
        term = self.log.compact(index)
        self.snapshot = Snapshot(index, term, data)
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
        for peer in self.peers:
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
        for peer, (known, previous) in sorted(self._peer_stores.items()):
            if peer in self.config.voters and (previous or known):
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
        granted = sum(1 for ok in self.votes.values() if ok)
        rejected = len(self.votes) - granted
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
        elif message.type is MessageType.TIMEOUT_NOW:
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
                    self.log.truncate_from(entry.index)
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
        self.log.append(entries)
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
            if node not in self.config.voters:
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
        snapshot = message.snapshot
        assert snapshot is not None
        if snapshot.index <= self.commit:
            respond_index = self.commit
        elif self.log.matches(snapshot.index, snapshot.term):
            # Our log already holds the snapshot's last entry: by log matching it holds
            # everything before it too, so only the commit index moves.
            self.commit = snapshot.index
            respond_index = snapshot.index
        else:
            # Our log disagrees with the snapshot, so nothing in it can be trusted: it is
            # dropped entirely, and we acknowledge the snapshot's index and no more. (The
            # PySyncObj bug was to keep and acknowledge entries beyond it.)
            self.log.restore(snapshot)
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

    # ------------------------------------------------------------------ leader

    def _step_leader(self, message: Message) -> None:
        progress = self.progress[message.source]
        progress.last_heard_ms = self.now_ms
        if message.type is MessageType.APPEND_RESPONSE:
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
        if not self.peers:
            return self._maybe_commit_single()
        matches = sorted(
            [self.log.unstable_from - 1] + [p.match for p in self.progress.values()],
            reverse=True,
        )
        candidate = matches[self.quorum - 1]
        # Figure 2 leader rule: commit by counting only entries of the current term.
        if candidate > self.commit and self.log.term_at(candidate) == self.term:
            self.commit = candidate
            self._on_commit_advanced()
            return True
        return False

    def _maybe_commit_single(self) -> bool:
        stored = self.log.unstable_from - 1
        if stored > self.commit and self.log.term_at(stored) == self.term:
            self.commit = stored
            self._on_commit_advanced()
            return True
        return False

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
        progress = self.progress[peer]
        if progress.is_paused(self.config.inflight_messages_max):
            return
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
        self._send(
            Message(
                MessageType.SNAPSHOT,
                self.id,
                peer,
                self.term,
                snapshot=self.snapshot,
                incarnation=self.incarnation,
            )
        )

    def _broadcast_heartbeat(self, context: bytes) -> None:
        for peer, progress in self.progress.items():
            progress.probe_sent = False
            if progress.state is ProgressState.SNAPSHOT:
                # Snapshot lost in flight? Offer it again with the next probe.
                progress.state = ProgressState.PROBE
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
        active = 1 + sum(1 for p in self.progress.values() if p.last_heard_ms >= window_start)
        return active >= self.quorum

    # ------------------------------------------------------------- read index

    def _start_read(self, context: bytes) -> None:
        if not self.peers:
            self._read_states.append(ReadState(context, self.commit))
            return
        self._reads_pending.append(_PendingRead(context, self.commit, {self.id}))
        self._broadcast_heartbeat(context)

    def _ack_read(self, context: bytes, peer: NodeId) -> None:
        for position, read in enumerate(self._reads_pending):
            if read.context != context:
                continue
            read.acks.add(peer)
            if len(read.acks) >= self.quorum:
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
