"""The simulated network: one-way latency per link class, in-order delivery per
connection (as TCP gives), partitions that drop, clogs that hold, latency overrides.

Endpoints live at a topology node (an agent or client sits beside a node); latency and
faults are decided by where the two ends live. Every random draw comes from the RNG of
the directed link, so adding traffic on one link never shifts another link's samples.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from goml.scenario.schema import AnyLink, Scenario
from goml.sim.loop import EventLoop

LOOPBACK_MS = 0.05  # two processes on one host
Deliver = Callable[[], None]


@dataclass
class _LinkState:
    rng: random.Random
    nodes: tuple[str, str]  # where the two ends live
    last_delivery_ms: float = 0.0
    held: list[Deliver] = field(default_factory=list)  # clogged: waiting for unclog


class Network:
    def __init__(self, env: EventLoop, scenario: Scenario, seed: int) -> None:
        self.env = env
        self.scenario = scenario
        self.seed = seed
        self.blocked: set[tuple[str, str]] = set()  # (from node, to node) dropped
        self.clogged: set[tuple[str, str]] = set()
        self.overrides: dict[tuple[str, str], AnyLink] = {}
        self._links: dict[tuple[str, str], _LinkState] = {}
        self._classes: dict[tuple[str, str], AnyLink] = {}  # scenario.link, looked up once
        self.sent = 0
        self.dropped = 0

    def _link(self, source: str, target: str, nodes: tuple[str, str]) -> _LinkState:
        key = (source, target)
        state = self._links.get(key)
        if state is None:
            state = _LinkState(random.Random(f"{self.seed}:link:{source}->{target}"), nodes)
            self._links[key] = state
        return state

    def link(self, source_node: str, target_node: str) -> AnyLink:
        key = (source_node, target_node)
        override = self.overrides.get(key)
        if override is not None:
            return override
        link = self._classes.get(key)
        if link is None:
            link = self._classes[key] = self.scenario.link(source_node, target_node)
        return link

    def send(
        self,
        source: str,
        source_node: str,
        target: str,
        target_node: str,
        deliver: Deliver,
    ) -> None:
        """Carry one message from endpoint `source` (at `source_node`) to `target`."""
        self.sent += 1
        pair = (source_node, target_node)
        if pair in self.blocked:
            self.dropped += 1
            return
        link_state = self._link(source, target, pair)
        # Looked up once a message (it was twice): loss, then delay, from the link's RNG.
        link = self.link(source_node, target_node) if source_node != target_node else None
        if link is not None and link.drops(link_state.rng):
            self.dropped += 1
            return
        if pair in self.clogged:
            link_state.held.append(deliver)
            return
        latency = LOOPBACK_MS if link is None else link.delay_ms(link_state.rng)
        now = self.env.now
        arrival = max(now + latency, link_state.last_delivery_ms)
        link_state.last_delivery_ms = arrival  # one connection delivers in order
        self.env.call_later(arrival - now, deliver)

    def unclog(self, pairs: set[tuple[str, str]]) -> None:
        """Release the messages held on links no longer clogged, in order, from now."""
        self.clogged -= pairs
        for key in sorted(self._links):
            state = self._links[key]
            if not state.held or state.nodes in self.clogged:
                continue
            held, state.held = state.held, []
            for deliver in held:
                state.last_delivery_ms = max(state.last_delivery_ms, self.env.now)
                self.env.call_later(state.last_delivery_ms - self.env.now, deliver)
