"""goml.stall_watch on a real asyncio loop: a blocked loop is reported with the call it is
stuck in and its length. (That a turning loop is not reported holds only on a machine
that gives the process its CPU: under CI's load a 200 ms preemption is a stall too, so
the test does not claim it.)"""

from __future__ import annotations

import asyncio
import logging
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
    stalls_s: list[float] = []  # appended by the watch's thread

    def ours_ended() -> bool:
        return any(BLOCK_S * 0.6 < stall_s < BLOCK_S * 3 for stall_s in stalls_s)

    async def main() -> None:
        watch = StallWatch(asyncio.get_running_loop(), "n1", on_stall=stalls_s.append)
        watch.start()
        try:
            blocking_call_for_the_stack()
            deadline = time.monotonic() + DEADLINE_S
            while not ours_ended() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # the loop must turn for the end to be seen
        finally:
            watch.stop()
        assert watch.stalls >= 1

    with caplog.at_level(logging.WARNING, logger="goml.stall_watch"):
        asyncio.run(main())
    assert ours_ended(), f"the stall's end was never reported: {stalls_s}"
    stuck = [r.getMessage() for r in caplog.records if "has not turned" in r.getMessage()]
    assert any("blocking_call_for_the_stack" in message for message in stuck), stuck
    assert any("turned again after" in r.getMessage() for r in caplog.records)
