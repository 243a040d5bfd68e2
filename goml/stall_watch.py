"""Say so when an event loop stops turning, and where it is stuck.

A node whose loop is blocked sends no heartbeats: its followers elect another leader and
nothing in the node's own log says why. `StallWatch` schedules a tick on the loop every
`tick_ms`; a daemon thread checks the tick's age and, once it is older than
`threshold_ms`, logs one warning with the loop thread's stack (the call it is stuck in),
then one line with the stall's length when the loop turns again. A loop that is merely
starved of CPU (a loaded machine) shows up too: then the stack is wherever it was
preempted, and the machine's load is the thing to look at.

The thread only reads a float and, during a stall, the loop thread's frame: it costs one
wake-up per `tick_ms` and takes no lock the loop holds.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable

log = logging.getLogger(__name__)

TICK_MS = 50
# Below the Raft election timeout's low end (300 ms): a stall this long already risks one.
THRESHOLD_MS = 200


class StallWatch:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        name: str,
        tick_ms: int = TICK_MS,
        threshold_ms: int = THRESHOLD_MS,
        on_stall: Callable[[float], None] | None = None,
    ) -> None:
        assert 0 < tick_ms < threshold_ms, (tick_ms, threshold_ms)
        self._loop = loop
        self._name = name
        self._tick_s = tick_ms / 1000
        self._threshold_s = threshold_ms / 1000
        self._on_stall = on_stall  # called (on the watch thread) with each stall's seconds
        self._last_tick_s = time.monotonic()
        self._loop_thread_id = threading.get_ident()  # built on the loop's thread
        self._stopped = threading.Event()
        self._handle: asyncio.TimerHandle | None = None
        self._thread = threading.Thread(target=self._watch, name=f"stall-watch-{name}", daemon=True)
        self.stalls = 0

    def start(self) -> None:
        self._tick()
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._handle is not None:
            self._handle.cancel()
        self._thread.join(timeout=1.0)

    def _tick(self) -> None:
        self._last_tick_s = time.monotonic()
        self._handle = self._loop.call_later(self._tick_s, self._tick)

    def _watch(self) -> None:
        stalled_since_s: float | None = None
        while not self._stopped.wait(self._tick_s):
            last_s = self._last_tick_s
            late_s = time.monotonic() - last_s - self._tick_s
            if stalled_since_s is None and late_s > self._threshold_s:
                stalled_since_s = last_s
                self.stalls += 1
                frame = sys._current_frames().get(self._loop_thread_id)
                where = "".join(traceback.format_stack(frame)) if frame else "(no frame)\n"
                log.warning(
                    "%s: event loop has not turned for %.0f ms; its thread is at:\n%s",
                    self._name,
                    late_s * 1000,
                    where.rstrip(),
                )
            elif stalled_since_s is not None and last_s > stalled_since_s:
                stall_s = last_s - stalled_since_s - self._tick_s
                log.warning("%s: event loop turned again after %.0f ms", self._name, stall_s * 1000)
                if self._on_stall is not None:
                    self._on_stall(stall_s)
                stalled_since_s = None
