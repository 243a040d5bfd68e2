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
from goml.raft.types import (
    NODE_ID_CHARS_MAX,
    Entry,
    EntryKind,
    Membership,
    MembershipInvalid,
    Message,
    MessageType,
    NodeId,
    Snapshot,
)


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


def membership_to_proto(membership: Membership) -> raft_pb2.Membership:
    return raft_pb2.Membership(
        voters=list(membership.voters),
        learners=list(membership.learners),
        addresses=dict(membership.addresses),
    )


def snapshot_to_proto(snapshot: Snapshot) -> raft_pb2.Snapshot:
    proto = raft_pb2.Snapshot(index=snapshot.index, term=snapshot.term, data=snapshot.data)
    if snapshot.membership is not None:
        proto.membership.CopyFrom(membership_to_proto(snapshot.membership))
    return proto


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
        snapshot_offset_bytes=message.snapshot_offset_bytes,
        snapshot_size_bytes=message.snapshot_size_bytes,
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
    kind = EntryKind(proto.kind)
    if kind is EntryKind.CONFIG:
        try:
            Membership.decode(proto.data)  # the core puts it in force as it appends it
        except MembershipInvalid as error:
            raise InvalidMessage(f"entry {index}: {error}") from None
    return Entry(index=index, term=term, kind=kind, data=proto.data)


def membership_from_proto(proto: raft_pb2.Membership) -> Membership:
    try:
        return Membership(
            tuple(proto.voters),
            tuple(proto.learners),
            tuple(sorted(proto.addresses.items())),
        )
    except MembershipInvalid as error:
        raise InvalidMessage(f"snapshot configuration: {error}") from None


def snapshot_from_proto(proto: raft_pb2.Snapshot, limits: Limits) -> Snapshot:
    index = _number("snapshot index", proto.index, limits)
    term = _number("snapshot term", proto.term, limits)
    if index < 1 or term < 1:
        raise InvalidMessage(f"snapshot has index {index}, term {term} (both must be >= 1)")
    if len(proto.data) > limits.snapshot_size_bytes_max:
        raise InvalidMessage(
            f"snapshot holds {len(proto.data)} bytes (max {limits.snapshot_size_bytes_max})"
        )
    membership = None
    if proto.HasField("membership"):
        membership = membership_from_proto(proto.membership)
        if not membership.voters:
            raise InvalidMessage(f"snapshot {index} has a configuration without voters")
    return Snapshot(index=index, term=term, data=proto.data, membership=membership)


def message_from_proto(
    proto: raft_pb2.Message,
    local: NodeId,
    sender: NodeId,
    limits: Limits,
) -> Message:
    """Validate and convert one inbound message sent by `sender` (authenticated) to `local`.

    Any node of the cluster may be the sender, member or not (a leader writes to a node
    before it knows it is a member; a removed one writes to its old peers): the core
    decides who counts, by the configuration in its log."""
    if proto.type not in _TYPES:
        raise InvalidMessage(f"unknown message type {proto.type}")
    kind = MessageType(proto.type)
    if proto.source != sender:
        raise InvalidMessage(f"source {proto.source!r} differs from the stream's sender {sender!r}")
    if not proto.source or len(proto.source) > NODE_ID_CHARS_MAX or proto.source == local:
        raise InvalidMessage(f"source {proto.source!r} is not a peer")
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
    offset = _number("snapshot_offset_bytes", proto.snapshot_offset_bytes, limits)
    size = _number("snapshot_size_bytes", proto.snapshot_size_bytes, limits)
    if size > limits.snapshot_size_bytes_max:
        raise InvalidMessage(
            f"snapshot of {size} bytes announced (max {limits.snapshot_size_bytes_max})"
        )
    if snapshot is not None and (size or offset) and offset + len(snapshot.data) > size:
        raise InvalidMessage(
            f"snapshot chunk {offset}+{len(snapshot.data)} runs past its size {size}"
        )
    if kind not in (MessageType.SNAPSHOT, MessageType.SNAPSHOT_RESPONSE) and (offset or size):
        raise InvalidMessage(f"{kind.name} carries snapshot offsets")
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
        snapshot_offset_bytes=offset,
        snapshot_size_bytes=size,
    )
    assert message.target == local
    return message
