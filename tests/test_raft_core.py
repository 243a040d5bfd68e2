"""Focused tests of the Raft core, beside the golden interaction files.

The first one is the regression that broke PySyncObj (DESIGN.md): a lagging follower
holding entries only an old leader had receives a snapshot from a leader that has
compacted its log.
"""

from __future__ import annotations

import random

import pytest

from goml.raft.core import RaftCore
from goml.raft.storage import MemoryStorage
from goml.raft.types import (
    Config,
    Entry,
    EntryKind,
    HardState,
    Message,
    MessageType,
    PersistedState,
    Ready,
    Role,
    Snapshot,
)
from tests.raft_interaction import InteractionEnv

VOTERS = ("n1", "n2", "n3")


def config(node_id: str, *, pre_vote: bool = True, check_quorum: bool = True) -> Config:
    return Config(
        node_id=node_id,
        voters=VOTERS,
        election_timeout_ms_min=100,
        election_timeout_ms_max=200,
        heartbeat_interval_ms=20,
        inflight_messages_max=4,
        entries_per_message_max=8,
        uncommitted_entries_max=64,
        message_bytes_max=1 << 20,
        pre_vote=pre_vote,
        check_quorum=check_quorum,
    )


def core(node_id: str, persisted: PersistedState | None = None, **options: bool) -> RaftCore:
    return RaftCore(
        config(node_id, **options), persisted or PersistedState(), random.Random(node_id), 0
    )


def drain(node: RaftCore, storage: MemoryStorage | None = None) -> list[Ready]:
    readies = []
    while node.has_ready():
        ready = node.ready()
        if storage is not None:
            storage.persist(ready.snapshot, ready.entries, ready.hard_state, ready.must_sync)
        node.advance(ready)
        readies.append(ready)
    return readies


def env_with_leader(*extra: str) -> InteractionEnv:
    env = InteractionEnv()
    for command in ("add-nodes 3 " + " ".join(extra), "campaign n1", "stabilize"):
        env.run(command)
    assert env.core("n1").role is Role.LEADER
    return env


def record_messages(env: InteractionEnv) -> list[Message]:
    """Every message any node hands out from now on (partitioned or not)."""
    sent: list[Message] = []
    original = env._send

    def spy(message: Message) -> None:
        sent.append(message)
        original(message)

    env._send = spy  # type: ignore[method-assign]
    return sent


# ---------------------------------------------------------------- PySyncObj regression


def divergent_follower() -> tuple[RaftCore, MemoryStorage]:
    """n1: old leader of term 1; entries 3..12 were never replicated (uncommitted)."""
    storage = MemoryStorage()
    old = tuple(Entry(i, 1, data=f"old{i}".encode()) for i in range(3, 13))
    entries = (Entry(1, 1, EntryKind.NOOP), Entry(2, 1, data=b"a"), *old)
    storage.persist(None, entries, HardState(term=1, vote="n1", commit=2), True)
    follower = core("n1", storage.load())
    drain(follower, storage)  # re-applies 1..2
    return follower, storage


def test_snapshot_replaces_divergent_log_and_acknowledges_only_its_index() -> None:
    follower, storage = divergent_follower()
    snapshot = Snapshot(index=6, term=3, data=b"leader state at 6")
    follower.step(Message(MessageType.SNAPSHOT, "n2", "n1", term=3, snapshot=snapshot), now_ms=10)
    ready = follower.ready()
    assert ready.snapshot == snapshot
    assert ready.committed == (), "nothing of the divergent log may be applied"
    assert ready.entries == ()
    responses = [m for m in ready.messages if m.type is MessageType.APPEND_RESPONSE]
    assert [(m.index, m.reject) for m in responses] == [(6, False)]
    assert ready.hard_state is not None and ready.hard_state.commit == 6
    storage.persist(ready.snapshot, ready.entries, ready.hard_state, ready.must_sync)
    follower.advance(ready)
    assert (follower.log.last_index, follower.commit, follower.applied) == (6, 6, 6)
    assert storage.entries == [] and storage.snapshot == snapshot
    # The old entries 7..12 are gone: the leader's next append decides what is there.
    follower.step(
        Message(
            MessageType.APPEND,
            "n2",
            "n1",
            term=3,
            log_index=6,
            log_term=3,
            entries=(Entry(7, 3, data=b"new7"),),
            commit=7,
        ),
        now_ms=11,
    )
    (ready,) = drain(follower, storage)
    assert [e.data for e in ready.committed] == [b"new7"]
    assert [m.index for m in ready.messages] == [7]
    assert follower.log.slice(7, 8) == (Entry(7, 3, data=b"new7"),)


def test_snapshot_matching_the_log_keeps_it_but_acknowledges_only_its_index() -> None:
    follower, storage = divergent_follower()
    # A snapshot whose last entry the follower holds (6/1): only the commit moves;
    # entries after 6 are not acknowledged (they may still be divergent).
    follower.step(
        Message(MessageType.SNAPSHOT, "n2", "n1", term=3, snapshot=Snapshot(6, 1, b"s")),
        now_ms=10,
    )
    (ready,) = drain(follower, storage)
    assert [m.index for m in ready.messages] == [6]
    assert max(e.index for e in ready.committed) == 6
    assert follower.commit == 6


def test_compacted_leader_repairs_a_divergent_follower_end_to_end() -> None:
    env = env_with_leader("check-quorum=false")
    for command in ("propose n1 a", "stabilize", "partition n1 | n2 n3"):
        env.run(command)
    for i in range(10):
        env.run(f"propose n1 old{i}")
    env.run("process-ready n1")  # stored on n1 only: the messages are lost
    env.run("campaign n2")
    env.run("stabilize")
    for data in "bcdefgh":
        env.run(f"propose n2 {data}")
    env.run("stabilize")
    leader = env.core("n2")
    env.run(f"compact n2 {leader.commit - 1}")
    snapshot_index = leader.log.snapshot_index
    assert env.core("n1").log.last_index > snapshot_index, "n1's divergent log is longer"
    sent = record_messages(env)
    env.run("heal")
    env.run("tick-heartbeat n2")
    env.run("stabilize")

    from_n1 = [m for m in sent if m.source == "n1" and m.type is MessageType.APPEND_RESPONSE]
    snapshots = [m for m in sent if m.type is MessageType.SNAPSHOT and m.target == "n1"]
    assert snapshots, "the leader had to send a snapshot"
    first_ack = next(m for m in from_n1 if not m.reject)
    assert first_ack.index == snapshot_index, "acknowledge the snapshot's index, no more"
    n1, n2 = env.node("n1"), env.node("n2")
    assert not any(d.startswith("old") for _, d in n1.applied)
    assert n1.applied == n2.applied
    assert n1.applied_index == n2.applied_index == leader.commit
    assert env.core("n1").log.last_index == leader.log.last_index
    assert env.core("n1").log.last_term == leader.log.last_term


# ----------------------------------------------------------- crash between persist/send


def test_follower_crash_after_persist_before_ack_is_not_counted() -> None:
    env = env_with_leader()
    env.run("partition n1 | n3")
    env.run("propose n1 a")
    env.run("process-ready n1")
    env.run("deliver-msgs n1->n2")
    env.run("persist-no-send n2")  # n2 stored 2/1:a, its acknowledgement never left
    env.run("stabilize")
    assert env.core("n1").commit == 1, "an unsent acknowledgement must not count"
    assert [e.index for e in env.node("n2").storage.entries] == [1, 2]
    env.run("restart n2")
    env.run("tick-heartbeat n1")
    env.run("stabilize")
    assert env.core("n1").commit == 2
    env.run("tick-heartbeat n1")  # the commit index reaches followers on the next heartbeat
    env.run("stabilize")
    assert env.node("n2").applied == [(2, "a")]


def test_vote_persisted_before_crash_binds_after_restart() -> None:
    env = InteractionEnv()
    env.run("add-nodes 3 pre-vote=false")
    env.run("campaign n2")
    env.run("process-ready n2")
    env.run("deliver-msgs n2->n3")
    env.run("persist-no-send n3")  # vote for n2 stored, grant never sent
    env.run("restart n3")
    env.run("campaign n1")  # also term 1
    env.run("process-ready n1")
    env.run("deliver-msgs n1->n3")
    env.run("process-ready n3")
    grants = [m for m in env.queue if m.source == "n3" and m.type is MessageType.VOTE_RESPONSE]
    assert [(m.target, m.reject) for m in grants] == [("n1", True)]
    # n2 asking again in the same term is granted again (same candidate).
    env.run("drop-msgs n3")
    env.run("tick n2 1")
    n2 = env.core("n2")
    env.core("n3").step(
        Message(MessageType.VOTE, "n2", "n3", term=n2.term, log_index=0, log_term=0),
        env.node("n3").clock_ms,
    )
    env.run("process-ready n3")
    again = [m for m in env.queue if m.source == "n3" and m.target == "n2"]
    assert [m.reject for m in again] == [False]


def test_leader_crash_after_persist_before_send_restarts_cleanly() -> None:
    env = env_with_leader("check-quorum=false")  # no lease: n1 may campaign at once
    env.run("propose n1 a")
    env.run("persist-no-send n1")
    env.run("restart n1")
    n1 = env.core("n1")
    assert n1.log.last_index == 2 and n1.commit == 1 and n1.role is Role.FOLLOWER
    env.run("campaign n1")
    env.run("stabilize")
    assert env.core("n1").role is Role.LEADER
    env.run("tick-heartbeat n1")  # the last follower learns the commit index here
    env.run("stabilize")
    assert all(env.node(n).applied == [(2, "a")] for n in VOTERS)


# ------------------------------------------------------------ monotonic & immutable


def test_append_below_commit_never_truncates_committed_entries() -> None:
    storage = MemoryStorage()
    entries = (Entry(1, 1, EntryKind.NOOP), Entry(2, 1, data=b"a"), Entry(3, 1, data=b"b"))
    storage.persist(None, entries, HardState(term=1, vote="n2", commit=3), True)
    follower = core("n1", storage.load())
    drain(follower, storage)
    # A (buggy or stale) term-2 leader tries to overwrite 2 and 3.
    follower.step(
        Message(
            MessageType.APPEND,
            "n2",
            "n1",
            term=2,
            log_index=1,
            log_term=1,
            entries=(Entry(2, 2), Entry(3, 2, data=b"x"), Entry(4, 2, data=b"y")),
            commit=1,
        ),
        now_ms=5,
    )
    (ready,) = drain(follower, storage)
    assert follower.log.slice(1, 4) == entries
    assert follower.commit == 3
    assert [(m.index, m.reject) for m in ready.messages] == [(3, False)]


def test_stale_messages_never_lower_term_or_commit() -> None:
    follower = core("n1", check_quorum=False)
    follower.step(
        Message(
            MessageType.APPEND,
            "n2",
            "n1",
            term=5,
            log_index=0,
            log_term=0,
            entries=(Entry(1, 5), Entry(2, 5, data=b"a")),
            commit=2,
        ),
        now_ms=1,
    )
    drain(follower)
    assert (follower.term, follower.commit) == (5, 2)
    follower.step(Message(MessageType.HEARTBEAT, "n2", "n1", term=5, commit=0), now_ms=2)
    follower.step(
        Message(MessageType.APPEND, "n3", "n1", term=4, log_index=0, log_term=0, commit=0),
        now_ms=3,
    )
    (ready,) = drain(follower)
    assert (follower.term, follower.commit) == (5, 2)
    stale_answer = [m for m in ready.messages if m.target == "n3"]
    assert [(m.type, m.term) for m in stale_answer] == [(MessageType.APPEND_RESPONSE, 5)]


@pytest.mark.parametrize("seed", range(20))
def test_random_leader_messages_keep_follower_invariants(seed: int) -> None:
    """Arbitrary APPEND/HEARTBEAT/VOTE traffic, with crashes: the term and commit never
    go back, the committed prefix never changes, each index is applied once with one
    entry, and nothing beyond the log is acknowledged."""
    rng = random.Random(seed)
    storage = MemoryStorage()
    follower = core("n1", check_quorum=False)
    committed: dict[int, Entry] = {}
    applied_to = 0
    term_seen = commit_seen = 0
    now = 0
    for _ in range(400):
        now += rng.randint(0, 5)
        if rng.random() < 0.05:
            follower = RaftCore(
                config("n1", check_quorum=False), storage.load(), random.Random(now), now
            )
            applied_to = follower.applied
        term = follower.term + rng.choice((-1, 0, 0, 0, 1))
        term = max(term, 1)
        kind = rng.choice(("append", "append", "append", "heartbeat", "vote"))
        last = follower.log.last_index
        if kind == "append":
            log_index = rng.randint(max(0, last - 4), last + 1)
            log_term = follower.log.term_at(log_index) or rng.randint(1, term)
            if rng.random() < 0.2:
                log_term = rng.randint(1, term)
            count = rng.randint(0, 3)
            first_term = rng.randint(log_term, term)
            entries = tuple(
                Entry(
                    log_index + 1 + i,
                    first_term if i == 0 else term,
                    data=f"{seed}-{now}-{i}".encode(),
                )
                for i in range(count)
            )
            message = Message(
                MessageType.APPEND,
                "n2",
                "n1",
                term=term,
                log_index=log_index,
                log_term=log_term,
                entries=entries,
                commit=rng.randint(0, log_index + count),
            )
        elif kind == "heartbeat":
            message = Message(
                MessageType.HEARTBEAT, "n2", "n1", term=term, commit=rng.randint(0, last + 2)
            )
        else:
            message = Message(
                MessageType.VOTE,
                rng.choice(("n2", "n3")),
                "n1",
                term=term,
                log_index=rng.randint(0, last + 2),
                log_term=rng.randint(0, term),
            )
        follower.step(message, now)
        while follower.has_ready():
            ready = follower.ready()
            storage.persist(ready.snapshot, ready.entries, ready.hard_state, ready.must_sync)
            for response in ready.messages:
                if response.type is MessageType.APPEND_RESPONSE and not response.reject:
                    assert response.index <= follower.log.last_index
            for entry in ready.committed:
                assert entry.index == applied_to + 1
                applied_to = entry.index
                assert committed.setdefault(entry.index, entry) == entry
            follower.advance(ready)
        assert follower.term >= term_seen and follower.commit >= commit_seen
        term_seen, commit_seen = follower.term, follower.commit
        for index in range(1, follower.commit + 1):
            if index in committed:
                assert follower.log.slice(index, index + 1) == (committed[index],)
        assert storage.hard_state.commit <= follower.commit


# -------------------------------------------------------------------- elections


def test_leader_ignores_pre_vote_from_rejoining_node() -> None:
    """Core fix: with CheckQuorum a leader is in its own lease. Before the fix the
    leader granted the PreVote of a node rejoining after a partition (leader + it are
    a majority of 3), the node then raised the term and deposed a healthy leader."""
    env = env_with_leader()
    leader = env.core("n1")
    leader.step(
        Message(
            MessageType.PRE_VOTE,
            "n3",
            "n1",
            term=leader.term + 1,
            log_index=leader.log.last_index,
            log_term=leader.log.last_term,
        ),
        env.node("n1").clock_ms,
    )
    assert leader.role is Role.LEADER
    answers = [m for r in drain(leader) for m in r.messages]
    assert not [m for m in answers if m.type is MessageType.PRE_VOTE_RESPONSE]
    # A forced request (leadership transfer) still goes through.
    leader.step(
        Message(
            MessageType.VOTE,
            "n3",
            "n1",
            term=leader.term + 1,
            force=True,
            log_index=leader.log.last_index,
            log_term=leader.log.last_term,
        ),
        env.node("n1").clock_ms,
    )
    assert leader.status()["role"] == Role.FOLLOWER.value


def test_fast_backtracking_needs_one_rejection_per_term() -> None:
    env = InteractionEnv()
    for command in (
        "add-nodes 3 check-quorum=false",
        "campaign n1",
        "stabilize",
        "propose n1 a",
        "stabilize",
        "partition n1 | n2 n3",
    ):
        env.run(command)
    for i in range(40):
        env.run(f"propose n1 old{i}")
    env.run("process-ready n1")
    env.run("campaign n2")
    env.run("stabilize")
    for i in range(30):
        env.run(f"propose n2 new{i}")
    env.run("stabilize")
    env.run("transfer-leader n2 n3")
    env.run("stabilize")
    sent = record_messages(env)
    env.run("heal")
    env.run("tick-heartbeat n3")
    env.run("stabilize")
    rejections = [m for m in sent if m.type is MessageType.APPEND_RESPONSE and m.reject]
    assert len(rejections) == 1, rejections
    assert env.node("n1").applied == env.node("n3").applied


def test_figure8_entry_of_older_term_not_committed_by_counting() -> None:
    env = InteractionEnv()
    env.run("add-nodes 3 pre-vote=false check-quorum=false")
    env.run("campaign n1")
    env.run("stabilize")
    env.run("partition n1 | n2 n3")
    env.run("propose n1 a")  # a/1 stays on n1
    env.run("process-ready n1")
    env.run("heal")
    env.run("crash n1")
    env.run("restart n1")
    # n1 wins term 2 with n2; entry a/1 reaches n2 (a majority) before n1's term-2 one.
    n1 = env.core("n1")
    n1.campaign(env.node("n1").clock_ms)
    env.run("process-ready n1")
    env.run("deliver-msgs n1->n2")
    env.run("drop-msgs n1->n3")
    env.run("process-ready n2")
    env.run("deliver-msgs n2->n1")
    assert n1.role is Role.LEADER
    leader = env.core("n1")
    (a,) = [e for e in leader.log.entries if e.data == b"a"]
    assert a.term == 1 and leader.commit < a.index
    committed = leader.commit
    leader.progress["n2"].match = a.index  # n2 holds a/1: a majority with n1
    assert not leader._maybe_commit(), "an older term's entry must not commit by counting"
    assert leader.commit == committed


def test_proposal_then_step_down_before_ready_sends_nothing() -> None:
    # Found by the simulator (a paused leader resumed with a higher-term message queued
    # behind a proposal): ready() replicated for a node that was no longer leader.
    env = env_with_leader()
    leader = env.core("n1")
    index, term = leader.propose(b"late")
    leader.step(Message(MessageType.APPEND_RESPONSE, "n2", "n1", term + 1), leader.now_ms)
    assert leader.role is Role.FOLLOWER
    ready = leader.ready()  # must not try to replicate as a leader
    assert all(m.type is not MessageType.APPEND for m in ready.messages)
    assert [e.index for e in ready.entries] == [index]  # kept, uncommitted, until a leader decides
    leader.advance(ready)


# ---------------------------------------------------------------- message size


def test_an_append_carries_at_most_message_bytes_max_of_entries_but_always_one() -> None:
    """etcd's MaxSizePerMsg: a follower catching up on large entries gets them in
    messages under the limit (512 entries of 256 KiB would exceed gRPC's 64 MiB)."""
    env = env_with_leader("max-entries=64", "max-bytes=1000")
    env.run("partition n1 | n2 n3")  # n2, n3 fall behind while n1 takes proposals
    sizes = (400, 400, 400, 5000, 10)
    for size in sizes:
        env.run(f"propose n1 {'x' * size}")
    env.run("process-ready n1")
    env.run("heal")
    sent = record_messages(env)
    env.run("tick-heartbeat n1")
    env.run("stabilize")
    appends = [m for m in sent if m.type is MessageType.APPEND and m.target == "n2" and m.entries]
    batches = [[len(e.data) for e in m.entries] for m in appends]
    delivered = {e.index: len(e.data) for m in appends for e in m.entries}  # resends alike
    assert [delivered[i] for i in sorted(delivered)][-len(sizes) :] == list(sizes), batches
    for batch in batches:
        assert len(batch) == 1 or sum(batch) <= 1000, batches
    assert [5000] in batches  # alone: one entry always goes, whatever its size
