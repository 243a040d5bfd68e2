"""goml.stall_watch on a real asyncio loop: a blocked loop is reported with the call it is
stuck in and its length; a loop that turns is never reported."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from goml.stall_watch import StallWatch

BLOCK_S = 0.5
DEADLINE_S = 10.0


def blocking_call_for_the_stack() -> None:
    time.sleep(BLOCK_S)  # the stall under test: the loop's thread is blocked on purpose


def test_a_blocked_loop_is_reported_with_where_it_is_stuck(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stalls_s: list[float] = []
    reported = threading.Event()

    def on_stall(stall_s: float) -> None:
        stalls_s.append(stall_s)
        reported.set()

    async def main() -> None:
        watch = StallWatch(asyncio.get_running_loop(), "n1", on_stall=on_stall)
        watch.start()
        try:
            await asyncio.sleep(0.2)  # a turning loop: nothing reported
            assert watch.stalls == 0
            blocking_call_for_the_stack()
            deadline = time.monotonic() + DEADLINE_S
            while not reported.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # the loop must turn for the end to be seen
        finally:
            watch.stop()
        assert watch.stalls == 1

    with caplog.at_level(logging.WARNING, logger="goml.stall_watch"):
        asyncio.run(main())
    assert reported.is_set(), "the stall's end was never reported"
    (stall_s,) = stalls_s
    assert BLOCK_S * 0.6 < stall_s < BLOCK_S * 3, stall_s
    stuck = [r.getMessage() for r in caplog.records if "has not turned" in r.getMessage()]
    assert len(stuck) == 1, stuck
    assert "blocking_call_for_the_stack" in stuck[0]
    assert any("turned again after" in r.getMessage() for r in caplog.records)
