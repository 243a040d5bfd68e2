"""A simulated workload client: the one retry policy (`goml.api.retry`) over simulated
calls, with the scenario clients' configuration (`goml.scenario.player`)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from goml.api.retry import Attempt, RetryConfig, RetryPolicy
from goml.api.types import ErrorKind, SubmitRequest, SubmitResponse, TaskRequest, error_kind

if TYPE_CHECKING:
    from goml.sim.simulation import Simulation

from goml.sim.rpc import ApiCall, ApiReply, Endpoint

Done = Callable[[str | None, str], None]  # (task id or None, why not)


@dataclass
class _Submit:
    request: SubmitRequest
    attempt: Attempt
    done: Done
    request_id: int = 0  # of the call under way
    node: str = ""  # where the call under way went


class SimClient(Endpoint):
    """Submits with the shared retry policy: calls go to the node it believes leads,
    NOT_LEADER hints are followed, timeouts and refusals rotate and back off, a retry
    carries the same idempotency key, and the operation gives up after its budget."""

    def __init__(self, sim: Simulation, name: str, node: str, config: RetryConfig) -> None:
        self.sim = sim
        self.name = name
        self.location = node
        self.policy = RetryPolicy(
            config, random.Random(f"{sim.seed}:client:{name}"), start=config.nodes[0]
        )
        self.calls: dict[int, _Submit] = {}  # request id -> submit awaiting that reply
        self.counter = 0

    def submit(self, request: TaskRequest, done: Done) -> None:
        """Submit one task; `done` is called exactly once (task id, or None and why)."""
        submit = SubmitRequest((request,))
        self._call(_Submit(submit, Attempt(self.sim.now_ms()), done))

    def _call(self, op: _Submit) -> None:
        now_ms = self.sim.now_ms()
        self.counter += 1
        op.request_id = self.counter
        op.node = self.policy.leader
        self.calls[op.request_id] = op
        call = ApiCall(op.request_id, op.request, self)
        target = self.sim.nodes[op.node]
        self.sim.network.send(
            self.name, self.location, target.name, target.location, lambda: target.receive(call)
        )
        request_id = op.request_id
        timeout_ms = self.policy.call_timeout_ms(op.attempt, now_ms)
        self.sim.after(timeout_ms, lambda: self._timed_out(request_id))

    def _timed_out(self, request_id: int) -> None:
        op = self.calls.pop(request_id, None)
        if op is not None:  # else answered in time
            self._failed(op, ErrorKind.DEADLINE, "", "no answer in time")

    def on_reply(self, reply: ApiReply) -> None:
        op = self.calls.pop(reply.request_id, None)
        if op is None:
            return  # late: that call timed out and the submit moved on
        if reply.error is None:
            response = reply.response
            assert isinstance(response, SubmitResponse) and len(response.task_ids) == 1, response
            self.policy.succeeded(op.attempt, op.node)
            op.done(response.task_ids[0], "")
            return
        error = reply.error
        self._failed(op, error_kind(error.code), error.leader_id, error.message)

    def _failed(self, op: _Submit, kind: ErrorKind, hint: str, detail: str) -> None:
        decision = self.policy.failed(op.attempt, op.node, kind, hint, self.sim.now_ms())
        if not decision.retry:
            op.done(None, f"{decision.why} ({detail})" if detail else decision.why)
        elif decision.delay_ms == 0:
            self._call(op)  # a redirect: at once, as the real client does
        else:
            self.sim.after(decision.delay_ms, lambda: self._call(op))
