"""The simulator's event loop: a heap of (time, sequence, action), nothing more.

The simulator only ever used SimPy's timeouts with a callback, and paid for the rest
(an Event object, a callbacks list and a priority per wake-up, about a third of the
loop's cost per event). This loop keeps SimPy's order exactly, so traces and their
digests do not change: events run by time, then in the order they were scheduled; an
event's time is `now + delay` computed as SimPy computes it; and `run(until)` stops
before the events due at `until` itself (SimPy's stop event is urgent: it comes first
among equals), leaving `now` at `until`.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

Action = Callable[[], None]


class EventLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self.steps = 0  # events processed (the benchmark's count)
        self._queue: list[tuple[float, int, Action]] = []
        self._ids = itertools.count()

    def call_later(self, delay: float, action: Action) -> None:
        """Run `action` once `delay` (>= 0) has passed."""
        assert delay >= 0, delay
        heapq.heappush(self._queue, (self.now + delay, next(self._ids), action))

    def run(self, until: float) -> None:
        """Run every event due before `until` (> now), then stand at `until`."""
        if until <= self.now:
            raise ValueError(f"until ({until}) must be greater than the current time")
        stop = self.now + (until - self.now)  # as SimPy schedules its stop event
        queue, pop = self._queue, heapq.heappop
        while queue and queue[0][0] < stop:
            self.now, _, action = pop(queue)
            self.steps += 1
            action()
        self.now = stop  # not reached when an action raises: `now` is where it raised
