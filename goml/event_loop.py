"""Which asyncio event loop the real runtimes run on, decided here once.

Every real process (the node daemon, the bench Raft node, the agent) starts its loop with
`run`. uvloop is used when it is installed and not turned off; `GOML_EVENT_LOOP=asyncio`
turns it off, `GOML_EVENT_LOOP=uvloop` insists on it (an error if it is missing). The
simulator never comes here: it has no asyncio.

grpc.aio does its network I/O on gRPC core's own poller thread and only wakes the loop
through a socket it registers with `add_reader`, which uvloop supports like asyncio's
selector loop does.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

EVENT_LOOP_ENV = "GOML_EVENT_LOOP"
EVENT_LOOPS = ("auto", "asyncio", "uvloop")

T = TypeVar("T")


def chosen(setting: str | None = None) -> str:
    """The loop `run` would use: "uvloop" or "asyncio" (setting defaults to the env)."""
    value = os.environ.get(EVENT_LOOP_ENV, "auto") if setting is None else setting
    value = value.strip().lower() or "auto"
    if value not in EVENT_LOOPS:
        raise ValueError(f"{EVENT_LOOP_ENV}={value!r}: expected one of {', '.join(EVENT_LOOPS)}")
    if value == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if value == "uvloop":
            raise RuntimeError(f"{EVENT_LOOP_ENV}=uvloop but uvloop is not installed") from None
        return "asyncio"
    return "uvloop"


def loop_factory(setting: str | None = None) -> Callable[[], asyncio.AbstractEventLoop]:
    """A factory of new loops of the chosen kind."""
    if chosen(setting) == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], setting: str | None = None) -> T:
    """asyncio.run(main) on a new loop of the chosen kind."""
    with asyncio.Runner(loop_factory=loop_factory(setting)) as runner:
        return runner.run(main)
