"""A seeded, deterministic, in-process cluster of Raft replicas.

Each node is the `ReplicaCore` every runtime drives (the Raft core plus the waiters,
compaction and deferred commit writes), over a state machine that keeps every command.

One thread, one event queue, virtual time. The network delays, drops, duplicates,
reorders and partitions messages; nodes crash (sometimes after persisting but before
sending, the nastiest moment) and restart from exactly what their store holds; logs
are compacted so that snapshots travel. Disks fail too: a node's disk may be lost
(amnesia), may refuse a write (a full disk: the runtime stops, nothing of that Ready is
stored or sent, and the node is restarted later) or may stall one (nothing of that node
moves until the write is durable; a crash meanwhile loses it). Members come and go: new
nodes join as learners and are promoted, voters and learners (the leader too) are
removed and their processes stopped a while later, and a removed name may come back,
with a fresh disk or with the one it had. Every step is checked against Raft's safety
properties and against two quorums deciding apart (SafetyChecker); at the end the
cluster is healed and every acknowledged proposal must be applied exactly once on every
member.

Replay a seed: `python -m goml.raft.harness --seed N` (the failure message says so).
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import random
import re
import sys
from dataclasses import dataclass, field

from goml.raft.checker import SafetyChecker, SafetyViolation
from goml.raft.core import RaftCore
from goml.raft.replica import Applied, ReplicaConfig, ReplicaCore, ReplicaReady
from goml.raft.storage import MemoryStorage
from goml.raft.types import (
    ChangeKind,
    Config,
    MembershipChange,
    Message,
    NodeId,
    ProposalError,
    Role,
)


@dataclass(frozen=True)
class Faults:
    """Probabilities and rates of the injected faults (all per event, unless named)."""

    drop: float = 0.05
    duplicate: float = 0.03
    delay_ms_min: int = 1
    delay_ms_max: int = 25
    crash_every_ms: int = 1500  # mean time between crashes (exponential)
    crash_before_send: float = 0.3  # share of crashes that hit after persist, before send
    restart_after_ms_max: int = 1500
    partition_every_ms: int = 2000
    heal_after_ms_max: int = 1500
    compact_every_entries: int = 12
    wipe: float = 0.2  # share of crashes that also lose the node's disk (amnesia)
    # Per Ready with something to write: the write fails (a full disk), or stalls for up
    # to stall_ms_max (a slow fsync).
    persist_fail: float = 0.004
    stall: float = 0.004
    stall_ms_max: int = 400


@dataclass(frozen=True)
class Changes:
    """How often the membership changes (kept apart from `Faults`)."""

    change_every_ms: int = 700  # mean time between proposed changes (exponential)
    retire_after_ms_max: int = 1500  # a removed node's process stops this long after
    spare_nodes: int = 3  # names beyond the bootstrap voters that may join
    voters_min: int = 2
    fresh_disk: float = 0.6  # share of returning names that come back with an empty disk


class _Commands:
    """The state machine: every command, in order (indexes of the leaders' empty entries
    are skipped: only commands reach a state machine)."""

    def __init__(self, node_id: NodeId) -> None:
        self.node_id = node_id
        self.applied: list[bytes] = []
        self.applied_index = 0

    def apply(self, index: int, data: bytes) -> object:
        if index <= self.applied_index:
            raise SafetyViolation(f"{self.node_id} applied {index} after {self.applied_index}")
        self.applied_index = index
        self.applied.append(data)
        return index

    def snapshot(self) -> bytes:
        return _encode_state(self.applied, self.applied_index)

    def restore(self, data: bytes) -> None:
        self.applied, self.applied_index = _decode_state(data)


@dataclass
class _Node:
    storage: MemoryStorage
    replica: ReplicaCore | None
    machine: _Commands
    tick_generation: int = 0
    # A stalled write: the Ready waiting for its disk, and what arrived meanwhile.
    stalled: ReplicaReady | None = None
    stall_id: int = 0
    inbox: list[Message] = field(default_factory=list)

    @property
    def core(self) -> RaftCore | None:
        return self.replica.raft if self.replica is not None else None


@dataclass(order=True)
class _Event:
    at_ms: int
    seq: int
    kind: str = field(compare=False)
    node: NodeId = field(compare=False, default="")
    message: Message | None = field(compare=False, default=None)
    generation: int = field(compare=False, default=0)


def _encode_state(applied: list[bytes], index: int) -> bytes:
    return json.dumps({"index": index, "applied": [a.decode() for a in applied]}).encode()


def _decode_state(data: bytes) -> tuple[list[bytes], int]:
    state = json.loads(data)
    return [a.encode() for a in state["applied"]], int(state["index"])


class Cluster:
    def __init__(
        self, seed: int, nodes: int, faults: Faults, changes: Changes | None = None
    ) -> None:
        self.seed = seed
        self.faults = faults
        self.changes = changes if changes is not None else Changes()
        self.rng = random.Random(f"cluster-{seed}")
        self.bootstrap_ids = tuple(f"n{i + 1}" for i in range(nodes))
        spares = self.changes.spare_nodes if self.changes.change_every_ms else 0
        # Every name that may ever run; `ids` are those whose process should run now.
        self.names = tuple(f"n{i + 1}" for i in range(nodes + spares))
        self.ids: tuple[NodeId, ...] = self.bootstrap_ids
        self.bootstrap: dict[NodeId, tuple[NodeId, ...]] = {
            n: self.bootstrap_ids for n in self.bootstrap_ids
        }
        self.retiring: set[NodeId] = set()
        self.changes_proposed = 0
        self.now_ms = 0
        self._seq = 0
        self._queue: list[_Event] = []
        self.nodes: dict[NodeId, _Node] = {}
        self.blocked: set[tuple[NodeId, NodeId]] = set()
        self.trace = hashlib.sha256()
        self.checker = SafetyChecker()
        self.committed = self.checker.applied  # index -> (term, data), as applied
        self.leaders_by_term = self.checker.leaders_by_term
        self.proposed: dict[int, bytes] = {}  # token -> command
        self.acknowledged: set[bytes] = set()
        self.proposal_count = 0
        self.events = 0
        self.wipes = 0
        self.disk_full = 0  # writes refused
        self.stalls = 0
        self.unrepaired: dict[NodeId, int] = {}  # wiped node -> commit index at its wipe
        for node_id in self.ids:
            self.nodes[node_id] = _Node(MemoryStorage(), None, _Commands(node_id))
            self._start(node_id)
        self._next_token = 10**9  # membership proposals' tokens (commands use 1, 2, ...)

    # ---------------------------------------------------------------- running

    def config(self, node_id: NodeId) -> ReplicaConfig:
        raft = Config(
            node_id=node_id,
            voters=self.bootstrap[node_id],
            election_timeout_ms_min=150,
            election_timeout_ms_max=300,
            heartbeat_interval_ms=50,
            inflight_messages_max=8,
            entries_per_message_max=16,
            uncommitted_entries_max=256,
            message_bytes_max=4096,
            # Small chunks: the harness's snapshots (a few KiB) go in several.
            snapshot_chunk_bytes_max=512,
            snapshot_chunks_inflight_max=2,
        )
        return ReplicaConfig(
            raft=raft,
            compact_every_entries=self.faults.compact_every_entries,
            proposal_bytes_max=1024,
            defer_commit_only_writes=True,
        )

    def run(self, until_ms: int, chaos: bool) -> None:
        if chaos:
            self._schedule(self._exp(self.faults.crash_every_ms), "crash")
            self._schedule(self._exp(self.faults.partition_every_ms), "partition")
            if self.changes.change_every_ms:
                self._schedule(self._exp(self.changes.change_every_ms), "change")
        self._schedule(self.rng.randint(1, 40), "propose")
        while self._queue and self._queue[0].at_ms <= until_ms:
            event = heapq.heappop(self._queue)
            self.now_ms = max(self.now_ms, event.at_ms)
            self.events += 1
            self._handle(event, until_ms, chaos)
        self.now_ms = until_ms

    def settle(self, settle_ms: int) -> None:
        """Heal everything, restart every node, stop faults, and let the cluster converge."""
        self.blocked.clear()
        self._queue = [e for e in self._queue if e.kind in ("deliver", "tick", "persisted")]
        heapq.heapify(self._queue)
        for node_id in sorted(self.retiring):
            self._retire(node_id)
        for node_id in self.ids:
            if self.nodes[node_id].core is None:
                self._start(node_id)
        saved = self.faults
        self.faults = Faults(
            drop=0.0,
            duplicate=0.0,
            crash_every_ms=10**9,
            partition_every_ms=10**9,
            persist_fail=0.0,
            stall=0.0,
        )
        end = self.now_ms + settle_ms
        while self._queue and self._queue[0].at_ms <= end:
            event = heapq.heappop(self._queue)
            self.now_ms = max(self.now_ms, event.at_ms)
            self.events += 1
            self._handle(event, end, chaos=False)
            self._retire_removed(at_once=True)
            if self._converged():
                break
        self.faults = saved

    def _handle(self, event: _Event, until_ms: int, chaos: bool) -> None:
        kind = event.kind
        if kind == "deliver":
            assert event.message is not None
            node = self.nodes[event.node]
            if node.replica is not None and node.stalled is not None:
                node.inbox.append(event.message)  # the runtime is waiting for its disk
            elif node.replica is not None:
                self._record("deliver", event.node, event.message.type.name)
                node.replica.step(event.message, self.now_ms)
                self._drain(event.node)
        elif kind == "tick":
            node = self.nodes[event.node]
            if (
                node.replica is not None
                and node.stalled is None  # rescheduled once the stalled write completes
                and event.generation == node.tick_generation
            ):
                node.replica.tick(self.now_ms)
                self._drain(event.node)
        elif kind == "persisted":
            self._persisted(event.node, event.generation)
        elif kind == "propose":
            self._propose()
            self._schedule(self.now_ms + self.rng.randint(1, 40), "propose")
        elif kind == "crash":
            live = [n for n in self.ids if self.nodes[n].core is not None]
            if live:
                victim = self.rng.choice(live)
                self._crash(victim)
                if self.rng.random() < self.faults.wipe and self._may_wipe(victim):
                    self._wipe(victim)
                restart_at = self.now_ms + self.rng.randint(1, self.faults.restart_after_ms_max)
                self._schedule(restart_at, "restart", victim)
            self._schedule(self.now_ms + self._exp(self.faults.crash_every_ms), "crash")
        elif kind == "restart":
            if event.node in self.ids and self.nodes[event.node].core is None:
                self._start(event.node)
        elif kind == "partition":
            side = [n for n in self.ids if self.rng.random() < 0.5]
            one_way = self.rng.random() < 0.3
            for a in side:
                for b in self.ids:
                    if b not in side:
                        self.blocked.add((a, b))
                        if not one_way:
                            self.blocked.add((b, a))
            self._record("partition", ",".join(side), "one-way" if one_way else "both")
            heal_at = self.now_ms + self.rng.randint(1, self.faults.heal_after_ms_max)
            self._schedule(heal_at, "heal")
            self._schedule(self.now_ms + self._exp(self.faults.partition_every_ms), "partition")
        elif kind == "heal":
            self.blocked.clear()
            self._record("heal", "", "")
        elif kind == "change":
            self._change()
            self._schedule(self.now_ms + self._exp(self.changes.change_every_ms), "change")
        elif kind == "retire" and event.node in self.retiring:
            self._retire(event.node)

    # ------------------------------------------------------------- membership

    def _leader(self) -> ReplicaCore | None:
        """The live leader of the highest term, if any (not one waiting for its disk:
        its runtime takes no input, as _propose knows)."""
        best: ReplicaCore | None = None
        for node_id in self.ids:
            replica = self.nodes[node_id].replica
            if (
                replica is not None
                and self.nodes[node_id].stalled is None
                and replica.raft.role is Role.LEADER
                and (best is None or replica.raft.term > best.raft.term)
            ):
                best = replica
        return best

    def _change(self) -> None:
        """Propose one membership change on the leader: promote a learner, add a spare
        (or a removed name: fresh disk or its old one), or remove a member (sometimes
        the leader itself). Refusals (not caught up, a change pending) are normal."""
        replica = self._leader()
        if replica is None:
            return
        raft = replica.raft
        membership = raft.membership
        rng = self.rng
        outsiders = [n for n in self.names if n not in membership.members]
        choice = rng.random()
        if membership.learners and choice < 0.6:
            change = MembershipChange(ChangeKind.PROMOTE, rng.choice(membership.learners))
        elif outsiders and choice < 0.8 and len(membership.members) < len(self.names):
            node_id = rng.choice(outsiders)
            if node_id in self.retiring or (
                node_id in self.ids and self.nodes[node_id].core is not None
            ):
                return  # still stopping (or still running from an earlier try)
            self._prepare_joiner(node_id)
            change = MembershipChange(ChangeKind.ADD_LEARNER, node_id)
        elif len(membership.voters) > self.changes.voters_min or membership.learners:
            candidates = list(membership.learners)
            if len(membership.voters) > self.changes.voters_min:
                candidates += list(membership.voters)
                if rng.random() < 0.3:
                    candidates = [raft.id]  # the leader removes itself
            # Voters are removed also while a lost disk is being repaired: the core
            # refuses a removal that would leave fewer caught-up voters than a quorum
            # (goml.raft.core, _changed). Before it did, this operator had to hold back:
            # the wiped node cannot vote until a leader repairs it, and a removed one
            # whose removal is not committed never campaigns (it is no voter by its own
            # log) yet may hold the longest log, refusing the rest its vote: two nodes
            # out for good, more than Raft survives (seeds 85 and 475: no leader ever
            # again).
            change = MembershipChange(ChangeKind.REMOVE, rng.choice(candidates))
        else:
            return
        self._next_token += 1
        try:
            index, term = replica.propose_membership(change, self._next_token)
        except ProposalError:
            return
        self.changes_proposed += 1
        self._record("change", raft.id, f"{change.kind.value} {change.node} {index}/{term}")
        self._drain(raft.id)

    def _prepare_joiner(self, node_id: NodeId) -> None:
        """Start `node_id` to join: new, or back after its removal with a fresh disk or
        (sometimes) with the one it had. A fresh one has no bootstrap configuration."""
        node = self.nodes.get(node_id)
        if node is None:
            self.nodes[node_id] = _Node(MemoryStorage(), None, _Commands(node_id))
            self.bootstrap[node_id] = ()
        elif self.rng.random() < self.changes.fresh_disk:
            node.storage = MemoryStorage(incarnation=node.storage.incarnation + 1)
            self.bootstrap[node_id] = ()
            self.unrepaired.pop(node_id, None)
            self._record("fresh-disk", node_id, str(node.storage.incarnation))
        if node_id not in self.ids:
            self.ids = tuple(n for n in self.names if n in self.ids or n == node_id)
        if self.nodes[node_id].core is None:
            self._start(node_id)

    def _retire_removed(self, at_once: bool) -> None:
        """Stop, some time after their removal committed, nodes that are members no
        more (as an operator would): removed nodes keep running meanwhile."""
        replica = self._leader()
        if replica is None:
            return
        raft = replica.raft
        if raft.membership_index > raft.commit:
            return  # the change is not committed yet: it may still be undone
        members = set(raft.membership.members)
        for node_id in self.ids:
            if node_id in members or node_id in self.retiring:
                continue
            if at_once:
                self._retire(node_id)
            else:
                self.retiring.add(node_id)
                delay = self.rng.randint(1, self.changes.retire_after_ms_max)
                self._schedule(self.now_ms + delay, "retire", node_id)

    def _retire(self, node_id: NodeId) -> None:
        self.retiring.discard(node_id)
        if node_id not in self.ids:
            return
        if self.nodes[node_id].core is not None:
            self._crash(node_id)
        self.ids = tuple(n for n in self.ids if n != node_id)
        self.unrepaired.pop(node_id, None)
        self._record("retire", node_id, "")

    def _propose(self) -> None:
        # A node waiting for its disk takes no input (its runtime is blocked).
        live = [
            n for n in self.ids if self.nodes[n].core is not None and self.nodes[n].stalled is None
        ]
        if not live:
            return
        # Clients mostly find the leader; sometimes they hit a follower and are refused.
        leaders = [n for n in live if self._core(n).role is Role.LEADER]
        target = self.rng.choice(leaders if leaders and self.rng.random() < 0.9 else live)
        self.proposal_count += 1
        data = f"p{self.proposal_count}".encode()
        replica = self.nodes[target].replica
        assert replica is not None
        try:
            index, term = replica.propose(data, self.proposal_count)
        except ProposalError:
            return
        self.proposed[self.proposal_count] = data
        self._record("propose", target, f"{index}/{term}")
        self._drain(target)

    def _start(self, node_id: NodeId) -> None:
        node = self.nodes[node_id]
        persisted = node.storage.load()
        rng = random.Random(f"node-{self.seed}-{node_id}-{self.now_ms}")
        node.machine = _Commands(node_id)  # rebuilt from the store
        node.replica = ReplicaCore(self.config(node_id), persisted, node.machine, rng, self.now_ms)
        self._record("start", node_id, "")
        self._drain(node_id)

    def _may_wipe(self, victim: NodeId) -> bool:
        """Amnesia within what Raft with store identities promises: one disk lost at a
        time (no earlier wiped node still lacks what was committed when it was wiped),
        while every other node is up and trusts the current store of every node (so a
        peer that knew the victim's can tell the new one, see RaftCore._from_live_store;
        and no earlier replacement is still news to anyone: a node that still holds one
        tells the replaced node again after a restart of its own, and with the victim
        wiped too, two of three would refuse their votes for good)."""
        self._forget_repaired()
        if self.unrepaired:
            return False
        for node_id in self.ids:
            core = self.nodes[node_id].core
            voters = core.voters if core is not None else ()
            if victim in voters and len(voters) - 1 < len(voters) // 2 + 1:
                # A configuration (committed or not) that needs the victim for every
                # quorum: losing its disk loses a majority (two voters, say). Raft with
                # store identities is unavailable then, rightly; not a case to test.
                return False
            if node_id == victim:
                continue
            core = self.nodes[node_id].core
            if core is None or core.restoring:
                return False
            for peer in self.ids:
                if (
                    peer != node_id
                    and core.trusted_store(peer) != self.nodes[peer].storage.incarnation
                ):
                    return False
        return not self.nodes[victim].storage.hard_state.restoring

    def _forget_repaired(self) -> None:
        for node_id, mark in list(self.unrepaired.items()):
            core = self.nodes[node_id].core
            if core is not None and core.commit >= mark and core.log.last_index >= mark:
                del self.unrepaired[node_id]  # it holds everything committed at its wipe

    def _wipe(self, node_id: NodeId) -> None:
        node = self.nodes[node_id]
        node.storage = MemoryStorage(incarnation=node.storage.incarnation + 1)
        self.unrepaired[node_id] = self.checker.applied_max
        self.wipes += 1
        self._record("wipe", node_id, str(node.storage.incarnation))

    def _crash(self, node_id: NodeId) -> None:
        node = self.nodes[node_id]
        node.replica = None
        node.tick_generation += 1
        node.stalled = None  # a write under way is lost (the store's transaction is atomic)
        node.inbox = []
        self._record("crash", node_id, "")

    def _drain(self, node_id: NodeId) -> None:
        node = self.nodes[node_id]
        replica = node.replica
        assert replica is not None
        assert node.stalled is None, "nothing runs while a write stalls"
        for _ in range(1000):  # bounded: a core that never runs dry is a bug
            if not replica.has_ready():
                break
            ready = replica.ready()
            for outcome in ready.outcomes:
                if isinstance(outcome, Applied) and outcome.token in self.proposed:
                    # Acknowledged: this is what a caller of the proposing node is told.
                    self.acknowledged.add(self.proposed[outcome.token])
            if ready.send_before_persist:
                # As goml.raft.node does: a leader's appends leave before its write, so a
                # crash, a full disk or a stall below hits a Ready already sent.
                for message in ready.messages:
                    self._send(message)
                if self.rng.random() < 0.002 * self.faults.crash_before_send:
                    # Sent, nothing stored: nothing acknowledged may be lost.
                    self._crash(node_id)
                    self._schedule(self.now_ms + self.rng.randint(1, 500), "restart", node_id)
                    return
            if ready.writes() and self.rng.random() < self.faults.persist_fail:
                # The disk is full: the write is refused whole and the runtime stops (as
                # goml.raft.node does on StoreFull). Nothing of this Ready is stored or
                # sent; the node is restarted once an operator has freed space.
                self.disk_full += 1
                self._record("disk-full", node_id, "")
                self._crash(node_id)
                restart_at = self.now_ms + self.rng.randint(1, self.faults.restart_after_ms_max)
                self._schedule(restart_at, "restart", node_id)
                return
            if ready.writes() and self.rng.random() < self.faults.stall:
                # A slow fsync: the runtime waits for it; messages to it queue up.
                self.stalls += 1
                node.stalled = ready
                node.stall_id += 1
                done_at = self.now_ms + self.rng.randint(1, self.faults.stall_ms_max)
                self._record("stall", node_id, str(done_at - self.now_ms))
                self._schedule(done_at, "persisted", node_id, None, node.stall_id)
                return
            if not self._finish(node_id, ready):
                return
        else:
            raise SafetyViolation(f"{node_id}: ready() never ran dry")
        self._schedule_tick(node_id, replica)

    def _finish(self, node_id: NodeId, ready: ReplicaReady) -> bool:
        """Persist, send (unless sent first), advance; False if the node crashed between."""
        node = self.nodes[node_id]
        replica = node.replica
        assert replica is not None
        if ready.compacted is not None:
            node.storage.compact(ready.compacted)
        node.storage.persist(ready.snapshot, ready.entries, ready.hard_state, ready.must_sync)
        if not ready.send_before_persist:  # else sent already (_drain)
            if self.rng.random() < 0.002 * self.faults.crash_before_send:
                # Crash after the write, before anything leaves: what was persisted
                # must be enough, and nothing unsent may have been promised.
                self._crash(node_id)
                self._schedule(self.now_ms + self.rng.randint(1, 500), "restart", node_id)
                return False
            for message in ready.messages:
                self._send(message)
        replica.advance(ready)
        for entry in ready.committed:
            self.checker.applied_entry(node_id, entry)
        return True

    def _persisted(self, node_id: NodeId, stall_id: int) -> None:
        """A stalled write is durable: finish its Ready, then what arrived meanwhile."""
        node = self.nodes[node_id]
        ready = node.stalled
        if ready is None or node.replica is None or stall_id != node.stall_id:
            return  # crashed meanwhile: the write never happened
        node.stalled = None
        if not self._finish(node_id, ready):
            return
        inbox, node.inbox = node.inbox, []
        for message in inbox:
            self._record("deliver", node_id, message.type.name)
            node.replica.step(message, self.now_ms)
        self._drain(node_id)

    def _schedule_tick(self, node_id: NodeId, replica: ReplicaCore) -> None:
        node = self.nodes[node_id]
        self._check_node(node_id, replica.raft)
        if self.changes.change_every_ms and replica.raft.role is Role.LEADER:
            self._retire_removed(at_once=False)
        node.tick_generation += 1
        self._schedule(
            max(replica.next_deadline_ms(), self.now_ms + 1),
            "tick",
            node_id,
            None,
            node.tick_generation,
        )

    def _send(self, message: Message) -> None:
        if (message.source, message.target) in self.blocked:
            return
        if self.rng.random() < self.faults.drop:
            return
        copies = 2 if self.rng.random() < self.faults.duplicate else 1
        for _ in range(copies):
            delay = self.rng.randint(self.faults.delay_ms_min, self.faults.delay_ms_max)
            self._schedule(self.now_ms + delay, "deliver", message.target, message)

    # --------------------------------------------------------------- checking

    def _check_node(self, node_id: NodeId, core: RaftCore) -> None:
        self.checker.observe(node_id, core)

    def check_log_matching(self) -> None:
        live = {n: self._core(n) for n in self.ids if self.nodes[n].core is not None}
        SafetyChecker.check_log_matching(live)

    def check_final(self) -> None:
        self.check_log_matching()
        commit = max(self._core(n).commit for n in self.ids)
        for node_id in self.ids:
            node = self.nodes[node_id]
            applied = self._core(node_id).applied
            if applied != commit:
                raise SafetyViolation(f"{node_id} applied {applied}, cluster committed {commit}")
            counts: dict[bytes, int] = {}
            for data in node.machine.applied:
                counts[data] = counts.get(data, 0) + 1
            twice = sorted(d.decode() for d, c in counts.items() if c > 1)
            if twice:
                raise SafetyViolation(f"{node_id} applied twice: {twice[:5]}")
            lost = sorted(d.decode() for d in self.acknowledged if d not in counts)
            if lost:
                raise SafetyViolation(f"{node_id} lost acknowledged proposals: {lost[:5]}")

    def _converged(self) -> bool:
        cores = [self.nodes[n].core for n in self.ids]
        if any(c is None for c in cores):
            return False
        leaders = [c for c in cores if c is not None and c.role is Role.LEADER]
        if len(leaders) != 1:
            return False
        leader = leaders[0]
        return leader.log.term_at(leader.commit) == leader.term and all(
            c is not None
            and c.commit == leader.log.last_index
            and c.applied == leader.log.last_index
            for c in cores
        )

    # ----------------------------------------------------------------- helpers

    def _core(self, node_id: NodeId) -> RaftCore:
        core = self.nodes[node_id].core
        assert core is not None
        return core

    def _exp(self, mean_ms: int) -> int:
        return max(1, int(self.rng.expovariate(1.0 / mean_ms)))

    def _schedule(
        self,
        at_ms: int,
        kind: str,
        node: NodeId = "",
        message: Message | None = None,
        generation: int = 0,
    ) -> None:
        self._seq += 1
        heapq.heappush(self._queue, _Event(at_ms, self._seq, kind, node, message, generation))

    def _record(self, kind: str, node: str, detail: str) -> None:
        self.trace.update(f"{self.now_ms} {kind} {node} {detail}\n".encode())


@dataclass(frozen=True)
class RunResult:
    seed: int
    trace_digest: str
    events: int
    acknowledged: int
    committed: int
    leader_terms: int
    wipes: int
    disk_full: int  # writes refused (the node stopped and was restarted)
    stalls: int  # writes that stalled
    changes: int  # membership changes committed


def run_seed(seed: int, duration_ms: int = 8000) -> RunResult:
    """One seeded run: chaos for `duration_ms`, then heal and check everything."""
    rng = random.Random(f"shape-{seed}")
    nodes = rng.choice((3, 5))
    cluster = Cluster(seed, nodes, Faults())
    try:
        cluster.run(duration_ms, chaos=True)
        cluster.check_log_matching()
        cluster.settle(30_000)
        cluster.check_final()
    except AssertionError as error:
        raise SafetyViolation(
            f"seed {seed} failed at t={cluster.now_ms} ms: {error}\n"
            f"replay: python -m goml.raft.harness --seed {seed}"
        ) from error
    return RunResult(
        seed=seed,
        trace_digest=cluster.trace.hexdigest(),
        events=cluster.events,
        acknowledged=len(cluster.acknowledged),
        committed=len(cluster.committed),
        leader_terms=len(cluster.leaders_by_term),
        wipes=cluster.wipes,
        disk_full=cluster.disk_full,
        stalls=cluster.stalls,
        changes=len(cluster.checker.configs),
    )


SEEDS_MAX = 1_000_000  # seeds of one run (as `goml raft check`)
_SEED_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def seed_range(text: str) -> range:
    """`LOW-HIGH` or `SEED` (argparse calls this: a bad one is a usage error, exit 2)."""
    match = _SEED_RANGE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a seed range: use e.g. 1-100 or 7")
    low = int(match.group(1))
    high = int(match.group(2) or low)
    if high < low:
        raise argparse.ArgumentTypeError(f"{text!r}: LOW must not be above HIGH")
    if high - low + 1 > SEEDS_MAX:
        raise argparse.ArgumentTypeError(f"{text!r}: at most {SEEDS_MAX} seeds in one run")
    return range(low, high + 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m goml.raft.harness",
        description=__doc__.splitlines()[0] if __doc__ else "",
    )
    parser.add_argument("--seed", type=int, default=None, help="replay one seed")
    parser.add_argument(
        "--seeds", type=seed_range, default="1-100", help="a range of seeds, e.g. 1-1000 or 7"
    )
    args = parser.parse_args(argv)
    seeds = [args.seed] if args.seed is not None else list(args.seeds)
    failures = 0
    for seed in seeds:
        try:
            result = run_seed(seed)
        except SafetyViolation as error:
            failures += 1
            print(error, file=sys.stderr)
            continue
        print(
            f"seed {seed}: ok, {result.acknowledged} acknowledged, {result.committed} "
            f"committed, {result.leader_terms} leader terms, {result.wipes} disks lost, "
            f"{result.disk_full} writes refused, {result.stalls} writes stalled, "
            f"{result.changes} membership changes, "
            f"{result.events} events, "
            f"trace {result.trace_digest[:16]}"
        )
    print(f"{len(seeds) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
