"""A simulated agent: the production agent core (`goml.agent.core`), with tasks that
take a modeled time instead of running."""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import TYPE_CHECKING

from goml.agent.core import AgentCore, Call, CancelTask, Log, RunTask
from goml.agent.runtime import AgentConfig, CapacityConfig
from goml.api.types import (
    HeartbeatResponse,
    LeasedTask,
    LeaseResponse,
    RegisterResponse,
    ReportResponse,
    Resources,
    error_kind,
)
from goml.sim.rpc import ApiCall, ApiReply, Endpoint

if TYPE_CHECKING:
    from goml.sim.simulation import Simulation

_AGENT_RESPONSES = (RegisterResponse, HeartbeatResponse, LeaseResponse, ReportResponse)


class SimAgent(Endpoint):
    def __init__(self, sim: Simulation, node: str, capacity: Resources) -> None:
        self.sim = sim
        self.name = f"agent@{node}"
        self.location = node
        self.capacity = capacity
        self.generation = 0
        self.alive = False
        self.core: AgentCore | None = None
        self.tick_at = -1.0
        self._tick_token = 0
        self.cancelled: set[tuple[str, int]] = set()
        self.start()

    def start(self) -> None:
        self.generation += 1
        self.alive = True
        node = self.sim.scenario.topology.node(self.location)
        config = AgentConfig(
            agent_id=self.name,
            cloud=node.cloud,
            region=node.region,
            capacity=CapacityConfig(
                cpu=self.capacity.cpu, memory_mb=self.capacity.memory_mb, gpu=self.capacity.gpu
            ),
            control_plane={name: name for name in self.sim.control_names},
            token_file=Path("unused-in-simulation"),
            insecure=True,
        )
        rng = random.Random(f"{self.sim.seed}:agent:{self.name}:{self.generation}")
        self.core = AgentCore(config.core_config("sim", self.capacity.gpu), rng)
        self.cancelled = set()
        self.tick_at = -1.0
        self._tick_token += 1
        self.core.start(self.sim.now_ms())
        if self.sim.cpu is not None:
            self.sim.cpu.restart(self.name)
        self.sim.record("agent-start", self.name, "")
        self._effects()

    def crash(self) -> None:
        if not self.alive:
            return
        self.alive = False
        self.generation += 1
        self.core = None
        self.sim.record("agent-crash", self.name, "")
        # The process is gone, so are its connections: each node learns it one link's
        # latency later (a reset), unless the link is cut (then only from its timeouts).
        for name in sorted(self.sim.nodes):
            node = self.sim.nodes[name]
            self.sim.network.send(
                self.name,
                self.location,
                node.name,
                node.location,
                functools.partial(node.caller_gone, self),
                api=True,
            )

    def on_reply(self, reply: ApiReply) -> None:
        if not self.alive or self.core is None:
            return
        now = self.sim.now_ms()
        if reply.error is None:
            response = reply.response
            assert isinstance(response, _AGENT_RESPONSES), response
            self.core.on_response(reply.request_id, response, now, reply.served_by)
        else:
            error = reply.error
            self.core.on_call_failed(
                reply.request_id, error_kind(error.code), error.leader_id, error.message, now
            )
        self._effects()

    def _effects(self) -> None:
        core = self.core
        assert core is not None
        for effect in core.take_effects():
            if isinstance(effect, Call):
                self._call(effect)
            elif isinstance(effect, RunTask):
                self._run(effect.task)
            elif isinstance(effect, CancelTask):
                self.cancelled.add((effect.task_id, effect.epoch))
            else:
                assert isinstance(effect, Log)
        deadline = core.next_deadline_ms()
        if deadline is None:
            return
        now = self.sim.env.now
        if now <= self.tick_at <= deadline:
            return  # an earlier wake-up is pending: it reschedules when it fires
        self.tick_at = max(float(deadline), now)
        self._tick_token += 1
        token = self._tick_token
        self.sim.after(self.tick_at - now, lambda: self._tick(token))

    def _tick(self, token: int) -> None:
        # Only the latest wake-up counts (see SimNode._tick).
        if token != self._tick_token or self.core is None:
            return
        self.tick_at = -1.0
        self.core.tick(self.sim.now_ms())
        self._effects()

    def _call(self, call: Call) -> None:
        api_call = ApiCall(call.request_id, call.request, self)
        target = self.sim.nodes[call.node_id]
        self.sim.network.send(
            self.name,
            self.location,
            target.name,
            target.location,
            lambda: target.receive(api_call),
            api=True,
        )

    def _run(self, task: LeasedTask) -> None:
        duration = self.sim.task_duration_ms(task.function, self.name)
        cpu, costs = self.sim.cpu, self.sim.scenario.costs
        if cpu is not None and costs is not None:
            # The CPU model: handing the task to a warm worker, or starting an isolated
            # task's own process, costs the agent this much first.
            cost = costs.dispatch_ms
            if task.isolated and costs.isolated_dispatch_ms is not None:
                cost = costs.isolated_dispatch_ms
            duration += cpu.charge(self.name, self.location, cost, self.sim.env.now)
        generation = self.generation

        def finish() -> None:
            if generation != self.generation or self.core is None:
                return
            if (task.task_id, task.epoch) in self.cancelled:
                return
            self.core.on_task_finished(
                task.task_id, task.epoch, True, '{"simulated":true}', self.sim.now_ms()
            )
            self._effects()

        self.sim.after(duration, finish)
