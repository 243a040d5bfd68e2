"""An etcd-style interaction harness for the Raft core (STYLE.md, "Tests that find bugs").

A tiny command interpreter drives N `RaftCore`s over `MemoryStorage` and a manual
network: messages are queued when a node hands them out and are never delivered until
a command says so. `tests/testdata/raft/*.txt` hold the commands and the expected
output after each one; `GOML_REWRITE=1 pytest tests/test_raft_interaction.py`
regenerates the expected output (read it before keeping it).

File format (etcd's datadriven): comment lines start with `#`; a case is one command
line, a `----` line, the output lines, and a blank line.

Commands (every `<node>` may be a list where noted with `...`):

    add-nodes <n> [pre-vote=true|false] [check-quorum=true|false] [max-entries=8]
              [max-bytes=1048576] [chunk-bytes=1048576] [chunks-inflight=4]
                                        the first call makes the bootstrap voters; later
                                        ones add nodes that join (no configuration: they
                                        learn it from a leader once made members)
    propose-change <node> add-learner|promote|remove <member>
                                        a membership change on <node> (the leader)
    members <node>...                   the configuration in force on each node
    campaign <node>                     start an election now
    tick <node>... <ms>                 advance the nodes' clocks, firing every timer due
    tick-election <node>...             advance to the election deadline (leaders: by
                                        the maximum election timeout)
    tick-heartbeat <node>...            advance to the heartbeat deadline (leaders)
    propose <node> <data>
    read-index <node> <context>
    transfer-leader <from> <to>
    process-ready <node>...             persist, send, apply, advance until quiet
    deliver-msgs <target>|<a>-><b>      step the queued messages (no process-ready)
    drop-msgs <target>|<a>-><b>         forget queued messages
    stabilize                           process-ready + deliver until nothing moves
    partition <node>... | <node>...     messages across the cut are lost (both ways)
    heal
    crash <node>                        drop the core; the store survives
    persist-no-send <node>              take one Ready, persist it, then crash: nothing
                                        of it leaves the node
    send-no-persist <node>              take one Ready; if the core lets its messages go
                                        before its write (a leader's appends), send them
                                        and crash before storing anything; else crash
                                        with nothing sent nor stored
    restart <node>                      rebuild the core from its store
    wipe <node>                         (down) its disk is lost: a new, empty store
    compact <node> <index>              local snapshot of the state machine at index
    status <node>...
    log <node>...
    msg-stats                           messages sent since the last msg-stats, by kind

Output lines: `n1->n2 APPEND term=2 log=5/1 entries=[6/2 7/2:x] commit=5` for a message
(entries: index/term, `:data` for commands, none for the leader's empty entry), `n2:
follower/1 -> pre-candidate/1` for a role/term change, and for each Ready the stored
hard state, entries, snapshot, messages sent and entries applied; `n1 ready
(send-first):` when the core lets the runtime send the messages before it persists
(`Ready.send_before_persist`).

Invariants are checked after every command (a violation raises): one leader per term,
terms and commit indexes never go back (across restarts too), every node applies the
same entry at an index.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from goml.raft.core import RaftCore
from goml.raft.storage import MemoryStorage
from goml.raft.types import (
    ChangeKind,
    Config,
    Entry,
    EntryKind,
    Membership,
    MembershipChange,
    Message,
    MessageType,
    NodeId,
    ProposalError,
    Ready,
    Role,
)

ELECTION_MS_MIN = 100
ELECTION_MS_MAX = 200
HEARTBEAT_MS = 20


class InteractionError(Exception):
    """A malformed command (a test-file bug, not a Raft bug)."""


class InvariantViolation(AssertionError):
    pass


def format_membership(membership: Membership) -> str:
    text = "v=" + ",".join(membership.voters)
    if membership.learners:
        text += " l=" + ",".join(membership.learners)
    return text


def format_entry(entry: Entry) -> str:
    if entry.kind is EntryKind.NOOP:
        return f"{entry.index}/{entry.term}"
    if entry.kind is EntryKind.CONFIG:
        return (
            f"{entry.index}/{entry.term}:conf({format_membership(Membership.decode(entry.data))})"
        )
    return f"{entry.index}/{entry.term}:{entry.data.decode()}"


def format_entries(entries: tuple[Entry, ...] | list[Entry]) -> str:
    return "[" + " ".join(format_entry(e) for e in entries) + "]"


def format_message(m: Message) -> str:
    parts = [f"{m.source}->{m.target} {m.type.name} term={m.term}"]
    t = MessageType
    if m.type in (t.VOTE, t.PRE_VOTE):
        parts.append(f"log={m.log_index}/{m.log_term}")
        if m.force:
            parts.append("force")
    elif m.type in (t.VOTE_RESPONSE, t.PRE_VOTE_RESPONSE):
        if m.reject:
            parts.append("reject")
    elif m.type is t.APPEND:
        parts.append(f"log={m.log_index}/{m.log_term}")
        parts.append(f"entries={format_entries(m.entries)}")
        parts.append(f"commit={m.commit}")
    elif m.type is t.APPEND_RESPONSE:
        if m.reject:
            parts.append(f"reject index={m.index} hint={m.hint_index}/{m.hint_term}")
        else:
            parts.append(f"index={m.index}")
    elif m.type is t.HEARTBEAT:
        parts.append(f"commit={m.commit}")
        if m.context:
            parts.append(f"ctx={m.context.decode()}")
    elif m.type is t.HEARTBEAT_RESPONSE:
        if m.context:
            parts.append(f"ctx={m.context.decode()}")
    elif m.type is t.SNAPSHOT:
        assert m.snapshot is not None
        parts.append(f"snapshot={m.snapshot.index}/{m.snapshot.term}")
        size = m.snapshot_size_bytes
        if m.snapshot_offset_bytes or len(m.snapshot.data) < size:  # one chunk of several
            parts.append(f"bytes={m.snapshot_offset_bytes}+{len(m.snapshot.data)}/{size}")
    elif m.type is t.SNAPSHOT_RESPONSE:
        parts.append(f"snapshot={m.log_index}/{m.log_term} received={m.snapshot_offset_bytes}")
    return " ".join(parts)


def message_kind(m: Message) -> str:
    return f"{m.type.name}{' reject' if m.reject else ''}"


@dataclass
class InteractionNode:
    id: NodeId
    config: Config
    storage: MemoryStorage
    core: RaftCore | None
    clock_ms: int = 0
    # The state machine: (index, data) of every command applied, in order.
    applied: list[tuple[int, str]] = field(default_factory=list)
    applied_index: int = 0
    restarts: int = 0


def encode_state(applied: list[tuple[int, str]], upto: int) -> bytes:
    return json.dumps([[i, d] for i, d in applied if i <= upto]).encode()


def decode_state(data: bytes) -> list[tuple[int, str]]:
    return [(int(i), str(d)) for i, d in json.loads(data)]


class InteractionEnv:
    def __init__(self) -> None:
        self.nodes: dict[NodeId, InteractionNode] = {}
        self.queue: list[Message] = []
        self.blocked: set[tuple[NodeId, NodeId]] = set()
        self.out: list[str] = []
        self.stats: Counter[str] = Counter()
        # Invariant bookkeeping, across crashes.
        self.leaders_by_term: dict[int, NodeId] = {}
        self.applied_by_index: dict[int, tuple[int, str]] = {}
        self.max_term: dict[NodeId, int] = {}
        self.max_commit: dict[NodeId, int] = {}
        self.stores_printed: dict[NodeId, str] = {}

    # ------------------------------------------------------------------ driver

    def run(self, command: str) -> str:
        """Execute one command line; return its output ("ok" when silent)."""
        self.out = []
        words = command.split()
        if not words:
            raise InteractionError("empty command")
        name, args = words[0], words[1:]
        handler = getattr(self, "cmd_" + name.replace("-", "_"), None)
        if handler is None:
            raise InteractionError(f"unknown command {name!r}")
        handler(args)
        self.check_invariants()
        return "\n".join(self.out) if self.out else "ok"

    def core(self, node_id: NodeId) -> RaftCore:
        core = self.node(node_id).core
        if core is None:
            raise InteractionError(f"{node_id} is down")
        return core

    def node(self, node_id: NodeId) -> InteractionNode:
        if node_id not in self.nodes:
            raise InteractionError(f"unknown node {node_id!r}")
        return self.nodes[node_id]

    # ------------------------------------------------------------ node inputs

    def _input(self, node_id: NodeId, action: str, *args: object) -> None:
        """Call one core input, printing the role/term change it causes."""
        core = self.core(node_id)
        before = (core.role, core.term)
        getattr(core, action)(*args)
        after = (core.role, core.term)
        if before != after:
            self.out.append(
                f"{node_id}: {before[0].value}/{before[1]} -> {after[0].value}/{after[1]}"
            )

    def cmd_add_nodes(self, args: list[str]) -> None:
        if not args:
            raise InteractionError("add-nodes <n> [pre-vote=..] [check-quorum=..]")
        count = int(args[0])
        options = dict(a.split("=", 1) for a in args[1:])
        pre_vote = options.pop("pre-vote", "true") == "true"
        check_quorum = options.pop("check-quorum", "true") == "true"
        max_entries = int(options.pop("max-entries", "8"))
        max_bytes = int(options.pop("max-bytes", str(1 << 20)))
        chunk_bytes = int(options.pop("chunk-bytes", str(1 << 20)))
        chunks_inflight = int(options.pop("chunks-inflight", "4"))
        if options:
            raise InteractionError(f"unknown options {options}")
        ids = tuple(f"n{i + 1}" for i in range(len(self.nodes), len(self.nodes) + count))
        # Nodes added to a running cluster join it: no bootstrap configuration.
        voters = () if self.nodes else ids
        for node_id in ids:
            config = Config(
                node_id=node_id,
                voters=voters,
                election_timeout_ms_min=ELECTION_MS_MIN,
                election_timeout_ms_max=ELECTION_MS_MAX,
                heartbeat_interval_ms=HEARTBEAT_MS,
                inflight_messages_max=4,
                entries_per_message_max=max_entries,
                uncommitted_entries_max=64,
                message_bytes_max=max_bytes,
                pre_vote=pre_vote,
                check_quorum=check_quorum,
                snapshot_chunk_bytes_max=chunk_bytes,
                snapshot_chunks_inflight_max=chunks_inflight,
            )
            node = InteractionNode(node_id, config, MemoryStorage(), None)
            self.nodes[node_id] = node
            self._start(node)
            self.out.append(self._describe(node_id))

    def _start(self, node: InteractionNode) -> None:
        persisted = node.storage.load()
        rng = random.Random(f"{node.id}-{node.restarts}")
        node.core = RaftCore(node.config, persisted, rng, node.clock_ms)
        if persisted.snapshot is not None:
            node.applied = decode_state(persisted.snapshot.data)
            node.applied_index = persisted.snapshot.index
        else:
            node.applied = []
            node.applied_index = 0

    def cmd_campaign(self, args: list[str]) -> None:
        for node_id in args:
            self._input(node_id, "campaign", self.node(node_id).clock_ms)

    def _tick_to(self, node_id: NodeId, target_ms: int) -> None:
        node = self.node(node_id)
        core = self.core(node_id)
        for _ in range(10_000):
            deadline = core.next_deadline_ms()
            if deadline > target_ms:
                break
            node.clock_ms = max(node.clock_ms, deadline)
            self._input(node_id, "tick", node.clock_ms)
        else:
            raise InvariantViolation(f"{node_id}: tick deadlines never move forward")
        node.clock_ms = max(node.clock_ms, target_ms)

    def cmd_tick(self, args: list[str]) -> None:
        if len(args) < 2:
            raise InteractionError("tick <node>... <ms>")
        ms = int(args[-1])
        for node_id in args[:-1]:
            self._tick_to(node_id, self.node(node_id).clock_ms + ms)

    def cmd_tick_election(self, args: list[str]) -> None:
        for node_id in args:
            core = self.core(node_id)
            node = self.node(node_id)
            if core.role is Role.LEADER:
                self._tick_to(node_id, node.clock_ms + ELECTION_MS_MAX)
            else:
                self._tick_to(node_id, max(node.clock_ms, core.election_deadline_ms))

    def cmd_tick_heartbeat(self, args: list[str]) -> None:
        for node_id in args:
            core = self.core(node_id)
            if core.role is not Role.LEADER:
                raise InteractionError(f"tick-heartbeat: {node_id} is not a leader")
            self._tick_to(node_id, max(self.node(node_id).clock_ms, core.heartbeat_deadline_ms))

    def cmd_propose(self, args: list[str]) -> None:
        node_id, data = args
        try:
            index, term = self.core(node_id).propose(data.encode())
        except ProposalError as error:
            self.out.append(f"{node_id}: propose {data}: {type(error).__name__}: {error}")
            return
        self.out.append(f"{node_id}: proposed {data} at {index}/{term}")

    def cmd_propose_change(self, args: list[str]) -> None:
        if len(args) != 3:
            raise InteractionError("propose-change <node> add-learner|promote|remove <member>")
        node_id, kind_text, member = args
        try:
            kind = ChangeKind(kind_text)
        except ValueError:
            raise InteractionError(f"unknown change {kind_text!r}") from None
        change = MembershipChange(kind, member)
        try:
            index, term = self.core(node_id).propose_membership(change)
        except ProposalError as error:
            self.out.append(f"{node_id}: {kind_text} {member}: {type(error).__name__}: {error}")
            return
        self.out.append(f"{node_id}: proposed {kind_text} {member} at {index}/{term}")

    def cmd_members(self, args: list[str]) -> None:
        for node_id in args:
            core = self.core(node_id)
            self.out.append(
                f"{node_id}: {format_membership(core.membership) if core.voters else 'none'}"
                f" (index {core.membership_index})"
            )

    def cmd_read_index(self, args: list[str]) -> None:
        node_id, context = args
        try:
            self.core(node_id).read_index(context.encode())
        except ProposalError as error:
            self.out.append(f"{node_id}: read-index {context}: {type(error).__name__}: {error}")

    def cmd_transfer_leader(self, args: list[str]) -> None:
        source, target = args
        try:
            self._input(source, "transfer_leadership", target, self.node(source).clock_ms)
        except ProposalError as error:
            self.out.append(f"{source}: transfer-leader: {type(error).__name__}: {error}")

    def cmd_compact(self, args: list[str]) -> None:
        node_id, index_text = args
        index = int(index_text)
        node = self.node(node_id)
        snapshot = self.core(node_id).compact(index, encode_state(node.applied, index))
        node.storage.compact(snapshot)
        self.out.append(f"{node_id}: compacted to {snapshot.index}/{snapshot.term}")

    # ------------------------------------------------------------ ready / net

    def cmd_process_ready(self, args: list[str]) -> None:
        for node_id in args:
            self.process_ready(node_id)

    def process_ready(self, node_id: NodeId) -> bool:
        """Drain one node: persist, send, apply, advance until it has nothing left."""
        node = self.node(node_id)
        core = node.core
        if core is None:
            return False
        worked = False
        for _ in range(100):
            if not core.has_ready():
                return worked
            worked = True
            ready = core.ready()
            node.storage.persist(ready.snapshot, ready.entries, ready.hard_state, ready.must_sync)
            self._print_ready(node_id, ready)
            for message in ready.messages:
                self._send(message)
            self._apply(node, ready)
            before = (core.role, core.term)
            core.advance(ready)
            if (core.role, core.term) != before:
                raise InvariantViolation("advance() changed role or term")
        raise InvariantViolation(f"{node_id}: ready() never runs dry")

    def _print_ready(self, node_id: NodeId, ready: Ready) -> None:
        self.out.append(f"{node_id} ready{' (send-first)' if ready.send_before_persist else ''}:")
        if ready.hard_state is not None:
            hs = ready.hard_state
            sync = " sync" if ready.must_sync else ""
            # Peers' stores are printed when they change (first contact, a replaced disk).
            stores = ",".join(f"{p}:{i}" + (f"<{b}" if b else "") for p, i, b in hs.peers)
            changed = self.stores_printed.get(node_id) != stores
            self.stores_printed[node_id] = stores
            extra = (" restoring" if hs.restoring else "") + (
                f" stores={stores}" if stores and changed else ""
            )
            self.out.append(
                f"  hard-state term={hs.term} vote={hs.vote or '-'} commit={hs.commit}{extra}{sync}"
            )
        if ready.snapshot is not None:
            self.out.append(f"  snapshot: {ready.snapshot.index}/{ready.snapshot.term}")
        if ready.entries:
            self.out.append(f"  entries: {format_entries(ready.entries)}")
        for message in ready.messages:
            blocked = (message.source, message.target) in self.blocked
            self.out.append(f"  {format_message(message)}{' (lost: partition)' if blocked else ''}")
        if ready.committed:
            self.out.append(f"  apply: {format_entries(ready.committed)}")
        for read in ready.read_states:
            self.out.append(f"  read-state ctx={read.context.decode()} index={read.index}")

    def _send(self, message: Message) -> None:
        self.stats[message_kind(message)] += 1
        if (message.source, message.target) in self.blocked:
            return
        self.queue.append(message)

    def _apply(self, node: InteractionNode, ready: Ready) -> None:
        if ready.snapshot is not None:
            node.applied = decode_state(ready.snapshot.data)
            node.applied_index = ready.snapshot.index
        for entry in ready.committed:
            if entry.index != node.applied_index + 1:
                raise InvariantViolation(
                    f"{node.id} applies {entry.index} after {node.applied_index}"
                )
            node.applied_index = entry.index
            value = (entry.term, entry.data.decode())
            known = self.applied_by_index.setdefault(entry.index, value)
            if known != value:
                raise InvariantViolation(
                    f"{node.id} applied {value} at {entry.index}, another node {known}"
                )
            if entry.kind is EntryKind.NORMAL:
                node.applied.append((entry.index, entry.data.decode()))

    def _select(self, spec: str) -> list[Message]:
        if "->" in spec:
            source, target = spec.split("->")
            return [m for m in self.queue if m.source == source and m.target == target]
        self.node(spec)
        return [m for m in self.queue if m.target == spec]

    def cmd_deliver_msgs(self, args: list[str]) -> None:
        for spec in args:
            chosen = self._select(spec)
            self.queue = [m for m in self.queue if not any(m is c for c in chosen)]
            for message in chosen:
                self.deliver(message)

    def deliver(self, message: Message) -> None:
        if (message.source, message.target) in self.blocked:
            self.out.append(f"lost (partition): {format_message(message)}")
            return
        node = self.node(message.target)
        if node.core is None:
            self.out.append(f"lost ({message.target} down): {format_message(message)}")
            return
        self._input(message.target, "step", message, node.clock_ms)

    def cmd_drop_msgs(self, args: list[str]) -> None:
        for spec in args:
            chosen = self._select(spec)
            self.queue = [m for m in self.queue if not any(m is c for c in chosen)]
            for message in chosen:
                self.out.append(f"dropped: {format_message(message)}")

    def cmd_stabilize(self, args: list[str]) -> None:
        if args:
            raise InteractionError("stabilize takes no arguments")
        for _ in range(1000):
            worked = False
            for node_id in self.nodes:
                worked |= self.process_ready(node_id)
            if self.queue:
                worked = True
                pending, self.queue = self.queue, []
                # Deliver per target, in the order sent (etcd's stabilize).
                for node_id in self.nodes:
                    for message in pending:
                        if message.target == node_id:
                            self.deliver(message)
            if not worked:
                return
        raise InvariantViolation("stabilize never settles")

    def cmd_partition(self, args: list[str]) -> None:
        text = " ".join(args)
        if "|" not in text:
            raise InteractionError("partition <nodes> | <nodes>")
        groups = [g.split() for g in text.split("|")]
        for i, group in enumerate(groups):
            for other in groups[i + 1 :]:
                for a in group:
                    for b in other:
                        self.node(a)
                        self.node(b)
                        self.blocked.add((a, b))
                        self.blocked.add((b, a))

    def cmd_heal(self, args: list[str]) -> None:
        self.blocked.clear()

    def cmd_crash(self, args: list[str]) -> None:
        for node_id in args:
            self.core(node_id)
            node = self.node(node_id)
            node.core = None
            self.out.append(f"{node_id}: crashed")

    def cmd_persist_no_send(self, args: list[str]) -> None:
        (node_id,) = args
        node = self.node(node_id)
        core = self.core(node_id)
        ready = core.ready()
        node.storage.persist(ready.snapshot, ready.entries, ready.hard_state, ready.must_sync)
        self._print_ready(node_id, ready)
        self.out.append(f"{node_id}: crashed after persisting, {len(ready.messages)} msgs unsent")
        node.core = None

    def cmd_send_no_persist(self, args: list[str]) -> None:
        (node_id,) = args
        node = self.node(node_id)
        core = self.core(node_id)
        ready = core.ready()
        self._print_ready(node_id, ready)
        if ready.send_before_persist:
            for message in ready.messages:
                self._send(message)
            self.out.append(
                f"{node_id}: crashed after sending {len(ready.messages)} msgs, before persisting"
            )
        else:
            self.out.append(f"{node_id}: crashed before persisting: its messages wait for it")
        node.core = None
        # What this Ready would have stored is gone, and nothing promised it: the term
        # and commit index restart from the store (the invariants hold them from there).
        stored = node.storage.hard_state
        self.max_term[node_id] = stored.term
        self.max_commit[node_id] = stored.commit

    def cmd_wipe(self, args: list[str]) -> None:
        for node_id in args:
            node = self.node(node_id)
            if node.core is not None:
                raise InteractionError(f"{node_id} is running: crash it first")
            node.storage = MemoryStorage(incarnation=node.storage.incarnation + 1)
            self.max_term[node_id] = 0  # a new store: its terms start again
            self.max_commit[node_id] = 0
            self.out.append(f"{node_id}: store wiped (incarnation {node.storage.incarnation})")

    def cmd_restart(self, args: list[str]) -> None:
        for node_id in args:
            node = self.node(node_id)
            if node.core is not None:
                raise InteractionError(f"{node_id} is running")
            node.restarts += 1
            self._start(node)
            self.out.append(f"{node_id}: restarted: {self._describe(node_id)}")

    # ---------------------------------------------------------------- queries

    def _describe(self, node_id: NodeId) -> str:
        core = self.core(node_id)
        log = core.log
        return (
            f"{node_id} {core.role.value} term={core.term} vote={core.vote or '-'} "
            f"leader={core.leader or '-'} commit={core.commit} applied={core.applied} "
            f"log={log.first_index}..{log.last_index} snapshot={log.snapshot_index}/"
            f"{log.snapshot_term}"
        )

    def cmd_status(self, args: list[str]) -> None:
        for node_id in args:
            if self.node(node_id).core is None:
                self.out.append(f"{node_id} down")
                continue
            core = self.core(node_id)
            self.out.append(self._describe(node_id))
            for peer, progress in sorted(core.progress.items()):
                learner = " learner" if peer in core.membership.learners else ""
                self.out.append(
                    f"  {peer}: match={progress.match} next={progress.next} "
                    f"{progress.state.value}{learner}"
                )

    def cmd_log(self, args: list[str]) -> None:
        for node_id in args:
            node = self.node(node_id)
            stored = node.storage
            snap = f"{stored.snapshot.index}/{stored.snapshot.term}" if stored.snapshot else "-"
            self.out.append(
                f"{node_id} stored: snapshot={snap} entries={format_entries(stored.entries)}"
            )
            state = " ".join(d for _, d in node.applied)
            self.out.append(f"{node_id} state (applied {node.applied_index}): [{state}]")

    def cmd_msg_stats(self, args: list[str]) -> None:
        for kind, count in sorted(self.stats.items()):
            self.out.append(f"{kind}: {count}")
        self.stats.clear()

    # -------------------------------------------------------------- invariants

    def check_invariants(self) -> None:
        for node_id, node in self.nodes.items():
            stored = node.storage.hard_state
            term = max(stored.term, node.core.term if node.core else 0)
            if term < self.max_term.get(node_id, 0):
                raise InvariantViolation(f"{node_id}: term went back to {term}")
            self.max_term[node_id] = term
            commit = stored.commit
            if node.core is not None:
                commit = max(commit, node.core.commit)
                if node.core.commit < stored.commit:
                    raise InvariantViolation(f"{node_id}: core commit below stored commit")
            if commit < self.max_commit.get(node_id, 0):
                raise InvariantViolation(f"{node_id}: commit went back to {commit}")
            self.max_commit[node_id] = commit
            core = node.core
            if core is not None and core.role is Role.LEADER:
                holder = self.leaders_by_term.setdefault(core.term, node_id)
                if holder != node_id:
                    raise InvariantViolation(f"{holder} and {node_id} both lead term {core.term}")
            if core is not None and core.commit > core.log.last_index:
                raise InvariantViolation(f"{node_id}: commit beyond its log")


# -------------------------------------------------------------------- files


@dataclass
class Case:
    comments: list[str]
    command: str
    expected: str
    line: int


def parse_file(text: str) -> tuple[list[Case], list[str]]:
    """Cases, and any comment lines after the last case."""
    cases: list[Case] = []
    comments: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        if line.startswith("#"):
            comments.append(line)
            i += 1
            continue
        start = i + 1
        command = line
        i += 1
        if i >= len(lines) or lines[i] != "----":
            raise InteractionError(f"line {start}: expected ---- after {command!r}")
        i += 1
        output: list[str] = []
        while i < len(lines) and lines[i].strip():
            output.append(lines[i])
            i += 1
        cases.append(Case(comments, command, "\n".join(output), start))
        comments = []
    return cases, comments


def render_file(cases: list[Case], trailing: list[str]) -> str:
    blocks: list[str] = []
    for case in cases:
        block = [*case.comments, case.command, "----", case.expected]
        blocks.append("\n".join(block))
    if trailing:
        blocks.append("\n".join(trailing))
    return "\n\n".join(blocks) + "\n"


def run_file(path: Path, rewrite: bool) -> list[str]:
    """Run a golden file; return mismatch descriptions (rewrite: fix the file instead)."""
    cases, trailing = parse_file(path.read_text())
    env = InteractionEnv()
    problems: list[str] = []
    for case in cases:
        try:
            actual = env.run(case.command)
        except (InteractionError, InvariantViolation, AssertionError) as error:
            actual = f"error: {type(error).__name__}: {error}"
        if actual != case.expected:
            problems.append(
                f"{path.name}:{case.line}: {case.command}\n--- expected\n{case.expected}\n"
                f"--- actual\n{actual}"
            )
            case.expected = actual
    if rewrite and problems:
        path.write_text(render_file(cases, trailing))
    return problems
