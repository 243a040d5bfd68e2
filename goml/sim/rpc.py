"""The simulator's RPC envelope: what travels between simulated callers and nodes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from goml.api.types import (
    ErrorKind,
)
from goml.cluster.manifest import (
    ApplyResult,
)


@dataclass(frozen=True, slots=True)
class ApiCall:
    request_id: int
    method: str  # Submit | Register | Heartbeat | Lease | Report
    request: object
    caller: Endpoint


@dataclass(frozen=True, slots=True)
class ApiReply:
    request_id: int
    response: object | None  # None: failed
    error: ErrorKind | None = None
    leader_hint: str = ""
    detail: str = ""


class Endpoint:
    name: str
    location: str  # the topology node it runs on

    def on_reply(self, reply: ApiReply) -> None:
        raise NotImplementedError


Outcome = Callable[[ApplyResult | None, ErrorKind | None, str], None]
