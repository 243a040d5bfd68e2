"""goml.raft.types <-> protobuf (goml.raft.v1), with validation of what comes in.

Outbound conversion trusts the core (its values were asserted when built). Inbound
conversion trusts nothing: every field a broken or hostile peer could get wrong is
checked *before* a `goml.raft.types` value is built (their `__post_init__` asserts
would otherwise crash the node on bad input), and a bad message raises
`InvalidMessage`, which the transport logs and counts before dropping the message.
"""

from __future__ import annotations

from dataclasses import dataclass

from goml.proto import raft_pb2
from goml.raft.types import Entry, EntryKind, Message, MessageType, NodeId, Snapshot


class InvalidMessage(ValueError):
    """An inbound message breaks the protocol: the peer's fault, never ours."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Upper bounds on what a peer may send in one message."""

    entries_per_message_max: int
    entry_size_bytes_max: int
    snapshot_size_bytes_max: int
    context_size_bytes_max: int
    number_max: int = 2**62

    def __post_init__(self) -> None:
        assert self.entries_per_message_max >= 1
        assert self.entry_size_bytes_max >= 1
        assert self.snapshot_size_bytes_max >= 1
        assert self.context_size_bytes_max >= 1


_TYPES = {int(t) for t in MessageType}
_KINDS = {int(k) for k in EntryKind}


# ------------------------------------------------------------------- outbound


def entry_to_proto(entry: Entry) -> raft_pb2.Entry:
    return raft_pb2.Entry(
        index=entry.index,
        term=entry.term,
        kind=int(entry.kind),  # type: ignore[arg-type]
        data=entry.data,
    )


def snapshot_to_proto(snapshot: Snapshot) -> raft_pb2.Snapshot:
    return raft_pb2.Snapshot(index=snapshot.index, term=snapshot.term, data=snapshot.data)


def message_to_proto(message: Message) -> raft_pb2.Message:
    proto = raft_pb2.Message(
        type=int(message.type),  # type: ignore[arg-type]
        source=message.source,
        target=message.target,
        term=message.term,
        log_index=message.log_index,
        log_term=message.log_term,
        entries=[entry_to_proto(e) for e in message.entries],
        commit=message.commit,
        index=message.index,
        reject=message.reject,
        hint_index=message.hint_index,
        hint_term=message.hint_term,
        context=message.context,
        force=message.force,
        incarnation=message.incarnation,
        restoring=message.restoring,
        target_previous=message.target_previous,
    )
    if message.snapshot is not None:
        proto.snapshot.CopyFrom(snapshot_to_proto(message.snapshot))
    assert proto.type == int(message.type)
    return proto


# -------------------------------------------------------------------- inbound


def _number(name: str, value: int, limits: Limits) -> int:
    if value < 0:
        raise InvalidMessage(f"{name} is negative ({value})")
    if value > limits.number_max:
        raise InvalidMessage(f"{name} is too large ({value})")
    return value


def entry_from_proto(proto: raft_pb2.Entry, limits: Limits) -> Entry:
    index = _number("entry index", proto.index, limits)
    term = _number("entry term", proto.term, limits)
    if index < 1 or term < 1:
        raise InvalidMessage(f"entry has index {index}, term {term} (both must be >= 1)")
    if proto.kind not in _KINDS:
        raise InvalidMessage(f"entry {index} has unknown kind {proto.kind}")
    if len(proto.data) > limits.entry_size_bytes_max:
        raise InvalidMessage(
            f"entry {index} holds {len(proto.data)} bytes (max {limits.entry_size_bytes_max})"
        )
    return Entry(index=index, term=term, kind=EntryKind(proto.kind), data=proto.data)


def snapshot_from_proto(proto: raft_pb2.Snapshot, limits: Limits) -> Snapshot:
    index = _number("snapshot index", proto.index, limits)
    term = _number("snapshot term", proto.term, limits)
    if index < 1 or term < 1:
        raise InvalidMessage(f"snapshot has index {index}, term {term} (both must be >= 1)")
    if len(proto.data) > limits.snapshot_size_bytes_max:
        raise InvalidMessage(
            f"snapshot holds {len(proto.data)} bytes (max {limits.snapshot_size_bytes_max})"
        )
    return Snapshot(index=index, term=term, data=proto.data)


def message_from_proto(
    proto: raft_pb2.Message,
    local: NodeId,
    sender: NodeId,
    voters: tuple[NodeId, ...],
    limits: Limits,
) -> Message:
    """Validate and convert one inbound message sent by `sender` (authenticated) to `local`."""
    assert local in voters, "the receiver is a voter"
    if proto.type not in _TYPES:
        raise InvalidMessage(f"unknown message type {proto.type}")
    kind = MessageType(proto.type)
    if proto.source != sender:
        raise InvalidMessage(f"source {proto.source!r} differs from the stream's sender {sender!r}")
    if proto.source not in voters or proto.source == local:
        raise InvalidMessage(f"source {proto.source!r} is not a peer voter (voters: {voters})")
    if proto.target != local:
        raise InvalidMessage(f"target {proto.target!r} is not this node ({local!r})")
    term = _number("term", proto.term, limits)
    log_index = _number("log_index", proto.log_index, limits)
    log_term = _number("log_term", proto.log_term, limits)
    commit = _number("commit", proto.commit, limits)
    index = _number("index", proto.index, limits)
    hint_index = _number("hint_index", proto.hint_index, limits)
    hint_term = _number("hint_term", proto.hint_term, limits)
    if term < 1:
        raise InvalidMessage(f"{kind.name} has term {term} (must be >= 1)")
    if len(proto.context) > limits.context_size_bytes_max:
        raise InvalidMessage(
            f"context of {len(proto.context)} bytes (max {limits.context_size_bytes_max})"
        )
    if len(proto.entries) > limits.entries_per_message_max:
        raise InvalidMessage(
            f"{len(proto.entries)} entries in one message (max {limits.entries_per_message_max})"
        )
    if proto.entries and kind is not MessageType.APPEND:
        raise InvalidMessage(f"{kind.name} carries entries")
    entries = tuple(entry_from_proto(e, limits) for e in proto.entries)
    # The core appends these as they are: check what its log asserts (contiguous,
    # following log_index, terms never decreasing and never above the leader's term).
    previous_term = log_term
    for offset, entry in enumerate(entries):
        if entry.index != log_index + 1 + offset:
            raise InvalidMessage(
                f"entries not contiguous after log_index {log_index}: got index {entry.index}"
            )
        if entry.term < previous_term or entry.term > term:
            raise InvalidMessage(
                f"entry {entry.index} has term {entry.term} (previous {previous_term},"
                f" message term {term})"
            )
        previous_term = entry.term
    has_snapshot = proto.HasField("snapshot")
    if has_snapshot != (kind is MessageType.SNAPSHOT):
        raise InvalidMessage(f"{kind.name} {'carries' if has_snapshot else 'lacks'} a snapshot")
    snapshot = snapshot_from_proto(proto.snapshot, limits) if has_snapshot else None
    message = Message(
        type=kind,
        source=proto.source,
        target=proto.target,
        term=term,
        log_index=log_index,
        log_term=log_term,
        entries=entries,
        commit=commit,
        index=index,
        reject=proto.reject,
        hint_index=hint_index,
        hint_term=hint_term,
        context=proto.context,
        snapshot=snapshot,
        force=proto.force,
        incarnation=_number("incarnation", proto.incarnation, limits),
        restoring=proto.restoring,
        target_previous=_number("target_previous", proto.target_previous, limits),
    )
    assert message.target == local
    return message
