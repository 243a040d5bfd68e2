"""The simulated network: one-way latency per link class, in-order delivery per
connection (as TCP gives), partitions that drop, clogs that hold, latency overrides.

Endpoints live at a topology node (an agent or client sits beside a node); latency and
faults are decided by where the two ends live. Every random draw comes from the RNG of
the directed link, so adding traffic on one link never shifts another link's samples.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import simpy

from goml.scenario.schema import AnyLink, Scenario

LOOPBACK_MS = 0.05  # two processes on one host
Deliver = Callable[[], None]


@dataclass
class _LinkState:
    rng: random.Random
    nodes: tuple[str, str]  # where the two ends live
    last_delivery_ms: float = 0.0
    held: list[Deliver] = field(default_factory=list)  # clogged: waiting for unclog
    hop_rng: random.Random | None = None  # `costs.hop_ms` draws, apart from the link's
    api_hop_rng: random.Random | None = None  # `costs.api_hop_ms` draws, apart from both


class Network:
    def __init__(self, env: simpy.Environment, scenario: Scenario, seed: int) -> None:
        self.env = env
        self.scenario = scenario
        self.seed = seed
        self.blocked: set[tuple[str, str]] = set()  # (from node, to node) dropped
        self.clogged: set[tuple[str, str]] = set()
        self.overrides: dict[tuple[str, str], AnyLink] = {}
        self._links: dict[tuple[str, str], _LinkState] = {}
        self._classes: dict[tuple[str, str], AnyLink] = {}  # scenario.link, looked up once
        # The calibrated cost of one hop between processes (TLS, gRPC, a proxy), if any.
        self._hop = scenario.costs.hop_ms if scenario.costs is not None else None
        # An API message's (`costs.api_hop_ms`), when it differs from a Raft message's.
        self._api_hop = scenario.costs.api_hop_ms if scenario.costs is not None else None
        self.sent = 0
        self.sent_api = 0  # of `sent`, API calls and answers (the rest are Raft messages)
        self.dropped = 0

    def _link(self, source: str, target: str, nodes: tuple[str, str]) -> _LinkState:
        key = (source, target)
        state = self._links.get(key)
        if state is None:
            state = _LinkState(random.Random(f"{self.seed}:link:{source}->{target}"), nodes)
            if self._hop is not None:
                state.hop_rng = random.Random(f"{self.seed}:hop:{source}->{target}")
            if self._api_hop is not None:
                state.api_hop_rng = random.Random(f"{self.seed}:api-hop:{source}->{target}")
            self._links[key] = state
        return state

    def latency_ms(self, source_node: str, target_node: str, rng: random.Random) -> float:
        if source_node == target_node:
            return LOOPBACK_MS
        return self.link(source_node, target_node).delay_ms(rng)

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
        api: bool = False,
    ) -> None:
        """Carry one message from endpoint `source` (at `source_node`) to `target`
        (`api`: an API call or answer, else a Raft message)."""
        self.sent += 1
        self.sent_api += api
        if (source_node, target_node) in self.blocked:
            self.dropped += 1
            return
        link_state = self._link(source, target, (source_node, target_node))
        if source_node != target_node and self.link(source_node, target_node).drops(link_state.rng):
            self.dropped += 1
            return
        if (source_node, target_node) in self.clogged:
            link_state.held.append(deliver)
            return
        self._schedule(link_state, source_node, target_node, deliver, api)

    def _schedule(
        self,
        state: _LinkState,
        source_node: str,
        target_node: str,
        deliver: Deliver,
        api: bool,
    ) -> None:
        now = self.env.now
        delay = self.latency_ms(source_node, target_node, state.rng)
        if api and self._api_hop is not None:
            assert state.api_hop_rng is not None, "made with the link, when API hops cost"
            delay += self._api_hop.sample_ms(state.api_hop_rng)
        elif self._hop is not None:
            assert state.hop_rng is not None, "made with the link, when hops cost"
            delay += self._hop.sample_ms(state.hop_rng)
        arrival = max(now + delay, state.last_delivery_ms)
        state.last_delivery_ms = arrival  # one connection delivers in order
        event = self.env.timeout(arrival - now)
        event.callbacks.append(lambda _event: deliver())

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
                event = self.env.timeout(state.last_delivery_ms - self.env.now)
                event.callbacks.append(functools.partial(_call, deliver))


def _call(deliver: Deliver, _event: simpy.Event) -> None:
    deliver()
