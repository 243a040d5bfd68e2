"""The simulator's RPC envelope: API requests and replies (`goml.api.types`) as they
travel between simulated callers and nodes, with no conversion at all."""

from __future__ import annotations

from dataclasses import dataclass

from goml.api.types import ApiError, ApiRequest, ApiResponse


class Endpoint:
    """A simulated caller: where it runs, and how it takes a reply."""

    name: str
    location: str  # the topology node it runs on

    def on_reply(self, reply: ApiReply) -> None:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class ApiCall:
    request_id: int  # the caller's own id for the call
    request: ApiRequest
    caller: Endpoint
    forwarded: bool = False  # from a follower that forwards it (never forwarded again)


@dataclass(frozen=True, slots=True)
class ApiReply:
    request_id: int
    response: ApiResponse | None
    error: ApiError | None
    served_by: str = ""  # a forwarded request's answer: the leader that served it

    def __post_init__(self) -> None:
        assert (self.response is None) != (self.error is None), self
