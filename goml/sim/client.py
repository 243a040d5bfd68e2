"""A simulated workload client: the one retry policy (`goml.api.retry`) over simulated
calls, with the scenario clients' configuration (`goml.scenario.player`)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
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
    in_flight: dict[int, tuple[str, int]] = field(default_factory=dict)  # id -> (node, sent)
    finished: bool = False
    hedge_deadlines_ms: dict[int, int] = field(default_factory=dict)  # try's id -> deadline
    hedged: set[int] = field(default_factory=set)  # tries whose copy has gone


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

    def _call(self, op: _Submit, node: str | None = None, deadline_ms: int | None = None) -> None:
        """A try of `op` to the policy's belief, or a hedged copy to `node` that ends by
        `deadline_ms`, the first copy's deadline (as goml.client.Client sends one)."""
        now_ms = self.sim.now_ms()
        self.counter += 1
        request_id = self.counter
        target_name = node or self.policy.leader
        op.in_flight[request_id] = (target_name, now_ms)
        self.calls[request_id] = op
        call = ApiCall(request_id, op.request, self)
        target = self.sim.nodes[target_name]
        self.sim.network.send(
            self.name,
            self.location,
            target.name,
            target.location,
            lambda: target.receive(call),
            api=True,
        )
        if deadline_ms is None:
            timeout_ms = self.policy.call_timeout_ms(op.attempt, now_ms)
        else:
            timeout_ms = max(1, deadline_ms - now_ms)
        self.sim.after(timeout_ms, lambda: self._timed_out(request_id))
        hedge_ms = self.policy.config.hedge_after_ms
        if node is None and hedge_ms is not None and hedge_ms < timeout_ms:
            deadline = now_ms + timeout_ms
            op.hedge_deadlines_ms[request_id] = deadline
            self.sim.after(hedge_ms, lambda: self._hedge(op, request_id, deadline))

    def _hedge(self, op: _Submit, request_id: int, deadline_ms: int) -> None:
        """No answer yet: the same submit (same idempotency key) to another node too."""
        if op.finished or request_id not in op.in_flight or request_id in op.hedged:
            return
        op.hedged.add(request_id)
        target = self.policy.hedge_target(op.in_flight[request_id][0], self.sim.now_ms())
        if target is not None and target not in {n for n, _ in op.in_flight.values()}:
            self._call(op, target, deadline_ms)

    def _hedge_stranded(self) -> None:
        """The policy has just learnt that a node failed: tries still waiting on it are
        hedged now, not at their hedge time (`RetryPolicy.stranded`)."""
        now_ms = self.sim.now_ms()
        for request_id, op in list(self.calls.items()):
            deadline_ms = op.hedge_deadlines_ms.get(request_id)
            if deadline_ms is None or request_id in op.hedged or request_id not in op.in_flight:
                continue
            node, sent_ms = op.in_flight[request_id]
            if self.policy.stranded(node, sent_ms, now_ms):
                self._hedge(op, request_id, deadline_ms)

    def _timed_out(self, request_id: int) -> None:
        op = self.calls.pop(request_id, None)
        if op is not None:  # else answered in time
            self._failed(op, request_id, ErrorKind.DEADLINE, "", "no answer in time")

    def on_reply(self, reply: ApiReply) -> None:
        op = self.calls.pop(reply.request_id, None)
        if op is None:
            return  # late: that call timed out and the submit moved on
        if reply.error is None:
            response = reply.response
            assert isinstance(response, SubmitResponse) and len(response.task_ids) == 1, response
            node, sent_ms = op.in_flight.pop(reply.request_id)
            now_ms = self.sim.now_ms()
            for other, other_sent_ms in op.in_flight.values():
                if other_sent_ms < sent_ms:  # sent first, still silent: slow or cut off
                    self.policy.outpaced(other, now_ms)
            self.policy.succeeded(op.attempt, node, now_ms, reply.served_by)
            self._finish(op, response.task_ids[0], "")
            self._hedge_stranded()
            return
        error = reply.error
        self._failed(op, reply.request_id, error_kind(error.code), error.leader_id, error.message)

    def _finish(self, op: _Submit, task_id: str | None, why: str) -> None:
        if op.finished:
            return
        op.finished = True
        for request_id in op.in_flight:  # the other copies' answers are ignored
            self.calls.pop(request_id, None)
        op.in_flight.clear()
        op.done(task_id, why)

    def _failed(
        self, op: _Submit, request_id: int, kind: ErrorKind, hint: str, detail: str
    ) -> None:
        node, _ = op.in_flight.pop(request_id)
        if op.finished:
            return
        decision = self.policy.failed(op.attempt, node, kind, hint, self.sim.now_ms())
        self._hedge_stranded()
        if op.in_flight:
            return  # another copy is still under way: it may yet succeed
        if not decision.retry:
            self._finish(op, None, f"{decision.why} ({detail})" if detail else decision.why)
        elif decision.delay_ms == 0:
            self._call(op)  # a redirect: at once, as the real client does
        else:
            self.sim.after(decision.delay_ms, lambda: self._call(op))
