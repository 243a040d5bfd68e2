"""goml.raft.convert: protobuf round trips and validation of inbound messages."""

from __future__ import annotations

import pytest

from goml.proto import raft_pb2
from goml.raft.convert import InvalidMessage, Limits, message_from_proto, message_to_proto
from goml.raft.types import Entry, EntryKind, Membership, Message, MessageType, Snapshot

LIMITS = Limits(
    entries_per_message_max=8,
    entry_size_bytes_max=64,
    snapshot_size_bytes_max=128,
    context_size_bytes_max=16,
)


def _inbound(proto: raft_pb2.Message) -> Message:
    return message_from_proto(proto, "n2", "n1", LIMITS)


@pytest.mark.parametrize(
    "message",
    [
        Message(MessageType.PRE_VOTE, "n1", "n2", 3, log_index=7, log_term=2),
        Message(MessageType.VOTE, "n1", "n2", 3, log_index=7, log_term=2, force=True),
        Message(
            MessageType.APPEND_RESPONSE,
            "n1",
            "n2",
            3,
            index=4,
            incarnation=1796120051586392123,
            restoring=True,
            target_previous=1796120051586391999,
        ),
        Message(MessageType.VOTE_RESPONSE, "n1", "n2", 3, reject=True),
        Message(
            MessageType.APPEND,
            "n1",
            "n2",
            3,
            log_index=4,
            log_term=2,
            entries=(Entry(5, 2, EntryKind.NORMAL, b"a"), Entry(6, 3, EntryKind.NOOP)),
            commit=4,
        ),
        Message(
            MessageType.APPEND_RESPONSE,
            "n1",
            "n2",
            3,
            index=4,
            reject=True,
            hint_index=2,
            hint_term=1,
        ),
        Message(MessageType.HEARTBEAT, "n1", "n2", 3, commit=9, context=b"r1"),
        Message(MessageType.SNAPSHOT, "n1", "n2", 3, snapshot=Snapshot(10, 2, b"image")),
        Message(
            MessageType.SNAPSHOT,
            "n1",
            "n2",
            3,
            snapshot=Snapshot(
                10, 2, b"mage", Membership(("n1", "n2"), ("n4",), (("n4", "10.0.0.4:7000"),))
            ),
            snapshot_offset_bytes=1,
            snapshot_size_bytes=5,
        ),
        Message(
            MessageType.SNAPSHOT_RESPONSE,
            "n1",
            "n2",
            3,
            log_index=10,
            log_term=2,
            snapshot_offset_bytes=4,
        ),
        Message(
            MessageType.APPEND,
            "n1",
            "n2",
            3,
            log_index=4,
            log_term=2,
            entries=(Entry(5, 3, EntryKind.CONFIG, Membership(("n1", "n2", "n3")).encode()),),
        ),
        Message(MessageType.TIMEOUT_NOW, "n1", "n2", 3),
    ],
)
def test_round_trip(message: Message) -> None:
    proto = message_to_proto(message)
    wire = proto.SerializeToString()
    assert _inbound(raft_pb2.Message.FromString(wire)) == message


def _append(**fields: object) -> raft_pb2.Message:
    base = Message(
        MessageType.APPEND,
        "n1",
        "n2",
        3,
        log_index=4,
        log_term=2,
        entries=(Entry(5, 2, data=b"a"),),
    )
    proto = message_to_proto(base)
    for name, value in fields.items():
        setattr(proto, name, value)
    return proto


@pytest.mark.parametrize(
    ("proto", "reason"),
    [
        (_append(type=42), "unknown message type"),
        (_append(type=0), "unknown message type"),
        (_append(source="n9"), "differs from the stream's sender"),
        (_append(target="n3"), "is not this node"),
        (_append(term=-1), "term is negative"),
        (_append(commit=-5), "commit is negative"),
        (_append(log_index=2**63 - 1), "too large"),
        (_append(term=0), "must be >= 1"),
        (_append(context=b"x" * 17), "context of 17 bytes"),
    ],
)
def test_rejects_bad_fields(proto: raft_pb2.Message, reason: str) -> None:
    with pytest.raises(InvalidMessage, match=reason):
        _inbound(proto)


def test_rejects_bad_entries() -> None:
    proto = _append()
    proto.entries[0].data = b"x" * 65
    with pytest.raises(InvalidMessage, match="65 bytes"):
        _inbound(proto)
    proto = _append()
    proto.entries[0].index = 9
    with pytest.raises(InvalidMessage, match="not contiguous"):
        _inbound(proto)
    proto = _append()
    proto.entries[0].term = 0
    with pytest.raises(InvalidMessage, match="must be >= 1"):
        _inbound(proto)
    proto = _append()
    proto.entries[0].term = 4
    with pytest.raises(InvalidMessage, match="message term 3"):
        _inbound(proto)
    proto = _append()
    proto.entries[0].kind = 7  # type: ignore[assignment]
    with pytest.raises(InvalidMessage, match="unknown kind"):
        _inbound(proto)
    proto = _append()
    for i in range(8):
        proto.entries.add(index=6 + i, term=2)
    with pytest.raises(InvalidMessage, match="9 entries"):
        _inbound(proto)


def test_accepts_any_peer_but_not_self_or_nameless() -> None:
    # Membership is the core's business: a node not (yet) in the receiver's
    # configuration may write to it (a leader to a joining node).
    proto = message_to_proto(Message(MessageType.VOTE, "n9", "n2", 3))
    assert message_from_proto(proto, "n2", "n9", LIMITS).source == "n9"
    proto = message_to_proto(Message(MessageType.VOTE, "n2", "n1", 3))
    proto.target = "n2"
    with pytest.raises(InvalidMessage, match="not a peer"):
        message_from_proto(proto, "n2", "n2", LIMITS)
    proto.source = ""
    with pytest.raises(InvalidMessage, match="not a peer"):
        message_from_proto(proto, "n2", "", LIMITS)


def test_rejects_bad_configurations() -> None:
    proto = _append()
    proto.entries[0].kind = int(EntryKind.CONFIG)  # type: ignore[assignment]
    proto.entries[0].data = b"not json"
    with pytest.raises(InvalidMessage, match="not a configuration"):
        _inbound(proto)
    proto.entries[0].data = b'{"voters":["n2","n1"],"learners":[],"addresses":{}}'
    with pytest.raises(InvalidMessage, match="sorted and unique"):
        _inbound(proto)
    proto.entries[0].data = b'{"voters":["n1"],"learners":["n1"],"addresses":{}}'
    with pytest.raises(InvalidMessage, match="both voter and learner"):
        _inbound(proto)
    proto.entries[0].data = b'{"voters":["n1"],"learners":[],"addresses":{"n7":"x:1"}}'
    with pytest.raises(InvalidMessage, match="non-members"):
        _inbound(proto)
    snapshot = message_to_proto(
        Message(MessageType.SNAPSHOT, "n1", "n2", 3, snapshot=Snapshot(10, 2, b"x"))
    )
    snapshot.snapshot.membership.learners.append("n4")
    with pytest.raises(InvalidMessage, match="learners without voters"):
        _inbound(snapshot)
    snapshot.snapshot.membership.voters.append("n1")
    assert _inbound(snapshot).snapshot == Snapshot(10, 2, b"x", Membership(("n1",), ("n4",)))


def test_rejects_bad_snapshot_chunks() -> None:
    chunk = Snapshot(10, 2, b"abcd")
    proto = message_to_proto(
        Message(
            MessageType.SNAPSHOT,
            "n1",
            "n2",
            3,
            snapshot=chunk,
            snapshot_offset_bytes=2,
            snapshot_size_bytes=5,
        )
    )
    with pytest.raises(InvalidMessage, match="runs past its size 5"):
        _inbound(proto)
    proto.snapshot_size_bytes = 129
    with pytest.raises(InvalidMessage, match="129 bytes announced"):
        _inbound(proto)
    heartbeat = message_to_proto(Message(MessageType.HEARTBEAT, "n1", "n2", 3))
    heartbeat.snapshot_offset_bytes = 3
    with pytest.raises(InvalidMessage, match="carries snapshot offsets"):
        _inbound(heartbeat)


def test_snapshot_presence_and_size() -> None:
    proto = message_to_proto(
        Message(MessageType.SNAPSHOT, "n1", "n2", 3, snapshot=Snapshot(10, 2, b"x"))
    )
    proto.ClearField("snapshot")
    with pytest.raises(InvalidMessage, match="lacks a snapshot"):
        _inbound(proto)
    proto = message_to_proto(Message(MessageType.HEARTBEAT, "n1", "n2", 3))
    proto.snapshot.index = 1
    with pytest.raises(InvalidMessage, match="carries a snapshot"):
        _inbound(proto)
    proto = message_to_proto(
        Message(MessageType.SNAPSHOT, "n1", "n2", 3, snapshot=Snapshot(10, 2, b"x" * 129))
    )
    with pytest.raises(InvalidMessage, match="129 bytes"):
        _inbound(proto)
    proto.snapshot.data = b""
    proto.snapshot.index = 0
    with pytest.raises(InvalidMessage, match="snapshot has index 0"):
        _inbound(proto)
