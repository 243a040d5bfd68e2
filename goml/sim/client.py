"""A simulated client: the client library's behaviour."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from goml.api.types import (
    ErrorKind,
)
from goml.cluster.commands import (
    SubmitTasks,
    TaskSpec,
)

if TYPE_CHECKING:
    from goml.sim.simulation import Simulation

from goml.sim.rpc import ApiCall, ApiReply, Endpoint

CLIENT_CALL_TIMEOUT_MS = 1000  # the real client's per-call deadline in chaos runs too
CLIENT_GIVE_UP_MS = 30_000


@dataclass
class _Submit:
    key: str
    spec: TaskSpec
    started_ms: float
    steady: bool  # started outside a failover window, able to reach a quorum
    attempt_started_ms: float = 0.0
    request_id: int = 0
    node: str = ""  # where the current attempt went
    done: bool = False
    backoff_ms: float = 20.0


class SimClient(Endpoint):
    """The client library's behaviour: leader guess, NOT_LEADER hints, rotation on
    timeouts, retries with the same idempotency key."""

    def __init__(self, sim: Simulation, name: str, node: str) -> None:
        self.sim = sim
        self.name = name
        self.location = node
        self.rng = random.Random(f"{sim.seed}:client:{name}")
        self.leader_guess = sim.control_names[0]
        self.in_flight: dict[int, _Submit] = {}
        self.counter = 0

    def submit(self, spec: TaskSpec) -> None:
        op = _Submit(
            spec.idempotency_key, spec, self.sim.env.now, self.sim.steady_for(self.location)
        )
        self.sim.submitted += 1
        self._attempt(op)

    def _attempt(self, op: _Submit) -> None:
        if self.sim.env.now - op.started_ms > CLIENT_GIVE_UP_MS:
            op.done = True
            self.sim.record("give-up", self.name, op.key)
            return
        self.counter += 1
        op.request_id = self.counter
        op.attempt_started_ms = self.sim.env.now
        op.node = self.leader_guess
        self.in_flight[op.request_id] = op
        call = ApiCall(op.request_id, "Submit", SubmitTasks(0, (op.spec,)), self)
        target = self.sim.nodes[self.leader_guess]
        self.sim.network.send(
            self.name, self.location, target.name, target.location, lambda: target.receive(call)
        )
        request_id = op.request_id
        self.sim.after(CLIENT_CALL_TIMEOUT_MS, lambda: self._timeout(request_id))

    def _timeout(self, request_id: int) -> None:
        op = self.in_flight.pop(request_id, None)
        if op is None or op.done:
            return
        self._rotate(op.node)
        self._attempt(op)

    def on_reply(self, reply: ApiReply) -> None:
        op = self.in_flight.pop(reply.request_id, None)
        if op is None or op.done:
            return
        if reply.response is not None:
            op.done = True
            task_ids = reply.response
            assert isinstance(task_ids, tuple)
            self.sim.on_acknowledged(op, task_ids[0])
            return
        if reply.error is ErrorKind.INVALID:
            op.done = True
            self.sim.record("refused", self.name, reply.detail[:80])
            return
        if (
            reply.error is ErrorKind.NOT_LEADER
            and reply.leader_hint
            and reply.leader_hint != self.leader_guess
        ):
            self.leader_guess = reply.leader_hint
            self._attempt(op)
            return
        self._rotate(op.node)
        delay = op.backoff_ms * (1 + self.rng.random())
        op.backoff_ms = min(op.backoff_ms * 2, 500.0)
        self.sim.after(delay, lambda: self._attempt(op))

    def _rotate(self, failed: str) -> None:
        # Only if no other call has moved the guess on already: with many submits in
        # flight, each timing-out call would otherwise rotate the guess off the leader.
        if self.leader_guess == failed:
            names = self.sim.control_names
            self.leader_guess = names[(names.index(failed) + 1) % len(names)]
