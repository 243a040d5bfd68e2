"""The simulator's operator: runs a scenario's membership changes the way `goml node
add/remove/replace` does (goml.cluster.membership), with the same sans-IO plan and driver
(goml.cluster.membership_plan), over simulated calls to the leader's node core.

Like the chaos runner's observer, it reads the configuration straight from the leader
(the status call an operator makes); its changes travel over the simulated network and
go through the node core's ChangeMembership handling, as a real call does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from goml.api.types import MembershipRequest
from goml.cluster.membership_plan import (
    SCENARIO_CATCH_UP_WAIT_MS,
    SCENARIO_STEP_TIMEOUT_MS,
    Call,
    ChangeDriver,
    Failed,
    Finished,
    MembersView,
    Pause,
    Refusal,
    Step,
    refusal_of,
)
from goml.cluster.node_core import REQUEST_TIMEOUT_MS_DEFAULT
from goml.sim.rpc import ApiCall, ApiReply, Endpoint

if TYPE_CHECKING:
    from goml.sim.simulation import Simulation

CALL_MARGIN_MS = 1000  # a call waits for the node's own deadline, plus this


class SimOperator(Endpoint):
    """One plan at a time (the player serialises them)."""

    def __init__(self, sim: Simulation, location: str) -> None:
        self.sim = sim
        self.name = "operator"
        self.location = location  # where the operator's commands run from
        self._driver: ChangeDriver | None = None
        self._started: Callable[[Step, float], None] = lambda _step, _s: None
        self._done: Callable[[Finished | Failed], None] = lambda _: None
        self._sent: set[Step] = set()
        self._call_id = 0
        self._waiting: int | None = None  # the call whose answer is awaited

    def run(
        self,
        steps: tuple[Step, ...],
        started: Callable[[Step, float], None],
        done: Callable[[Finished | Failed], None],
    ) -> None:
        assert self._driver is None, "one change at a time"
        self._driver = ChangeDriver(steps, SCENARIO_STEP_TIMEOUT_MS, SCENARIO_CATCH_UP_WAIT_MS)
        self._started, self._done = started, done
        self._sent = set()
        self._next()

    def _view(self) -> MembersView | None:
        node = self.sim.leading_node()
        core = node.core if node is not None else None
        if core is None:
            return None
        membership = core.membership
        committed = core.membership_index <= core.commit
        return MembersView(membership.voters, membership.learners, committed)

    def _next(self) -> None:
        driver = self._driver
        assert driver is not None and self._waiting is None
        action = driver.next(self._view(), self.sim.now_ms())
        if isinstance(action, Finished | Failed):
            self._driver = None
            self.sim.record("change", "operator", str(action)[:160])
            self._done(action)
        elif isinstance(action, Pause):
            self.sim.after(action.delay_ms, self._next)
        else:
            assert isinstance(action, Call)
            self._call(action)

    def _call(self, action: Call) -> None:
        step = action.step
        if step not in self._sent:
            self._sent.add(step)
            self._started(step, self.sim.now_s())
        leader = self.sim.leading_node()
        if leader is None:  # it stepped down since the view: ask again shortly
            assert self._driver is not None
            self._driver.refused(Refusal.UNAVAILABLE, "no leader")
            self._next()
            return
        self._call_id += 1
        call_id = self._waiting = self._call_id
        request = MembershipRequest(step.kind.value, step.node, step.address, action.wait_ms)
        call = ApiCall(call_id, request, self)
        self.sim.record("change-call", leader.name, str(step))
        self.sim.network.send(
            self.name, self.location, leader.name, leader.location, lambda: leader.receive(call)
        )
        timeout_ms = REQUEST_TIMEOUT_MS_DEFAULT + action.wait_ms + CALL_MARGIN_MS
        self.sim.after(timeout_ms, lambda: self._timed_out(call_id))

    def _timed_out(self, call_id: int) -> None:
        if self._waiting != call_id:
            return  # answered in time
        self._answer(Refusal.UNAVAILABLE, "no answer in time")

    def on_reply(self, reply: ApiReply) -> None:
        if self._waiting != reply.request_id:
            return  # late: that call timed out
        if reply.error is None:
            self._answer(None, "")
        else:
            self._answer(refusal_of(reply.error.code), reply.error.message)

    def _answer(self, refusal: Refusal | None, detail: str) -> None:
        driver = self._driver
        assert driver is not None
        self._waiting = None
        if refusal is None:
            driver.answered()
        else:
            self.sim.record("change-refused", refusal.value, detail[:160])
            driver.refused(refusal, detail)
        self._next()
