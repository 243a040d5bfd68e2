"""Which asyncio event loop the real runtimes run on, decided here once.

Every real process (the node daemon, node_main, the agent, bench/goml_node.py and
bench/grpc_floor.py's server) starts its loop with `run`. The loop is asyncio's own unless
`GOML_EVENT_LOOP=uvloop` asks for uvloop (then it must be installed: `pip install uvloop`;
it is no dependency of goml). The simulator never comes here: it has no asyncio.

Why asyncio's loop is the default: measured interleaved with bench/ab_event_loop.py
(2026-12-01, shared machine, load 6-12), uvloop gave nothing back. Its lone Raft commit
p50 was 3.84 ms against 2.93 ms, commits/s x0.70, the same CPU per commit, the same lone
API submit over mutual TLS and the same bare grpc.aio call. That is no surprise:
grpc.aio does its network I/O on gRPC core's own threads and only wakes the loop through
one socket it registers with `add_reader`, so the loop runs little of a call's work.
uvloop runs goml correctly (tests/test_event_loop.py: a TLS cluster commits under each
loop); the switch stays so that a quiet machine can re-measure.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

EVENT_LOOP_ENV = "GOML_EVENT_LOOP"
EVENT_LOOPS = ("asyncio", "uvloop")

T = TypeVar("T")


class EventLoopError(ValueError):
    """GOML_EVENT_LOOP names no loop, or one that is not installed: a one-line error."""


def chosen(setting: str | None = None) -> str:
    """The loop `run` would use, "asyncio" or "uvloop" (setting defaults to the env)."""
    value = os.environ.get(EVENT_LOOP_ENV, "") if setting is None else setting
    value = value.strip().lower() or "asyncio"
    if value not in EVENT_LOOPS:
        raise EventLoopError(
            f"{EVENT_LOOP_ENV}={value!r}: expected one of {', '.join(EVENT_LOOPS)}"
        )
    return value


def loop_factory(setting: str | None = None) -> Callable[[], asyncio.AbstractEventLoop]:
    """A factory of new loops of the chosen kind; uvloop asked for but missing is an error."""
    if chosen(setting) == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        raise EventLoopError(f"{EVENT_LOOP_ENV}=uvloop but uvloop is not installed") from None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], setting: str | None = None) -> T:
    """asyncio.run(main) on a new loop of the chosen kind."""
    try:
        factory = loop_factory(setting)
    except EventLoopError:
        main.close()  # never awaited: say so once, not as a second warning
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
