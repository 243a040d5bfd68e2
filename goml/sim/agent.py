"""A simulated agent: the production agent core with modeled task durations."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

from goml.agent.core import AgentCore, Call, CancelTask, Log, RunTask
from goml.agent.runtime import AgentConfig, CapacityConfig
from goml.api.types import (
    AgentResponse as Response,
)
from goml.api.types import (
    HeartbeatResponse,
    LeasedTask,
    LeaseResponse,
    RegisterResponse,
    ReportResponse,
)
from goml.cluster.commands import (
    Resources,
)

if TYPE_CHECKING:
    from goml.sim.simulation import Simulation

from goml.sim.rpc import ApiCall, ApiReply, Endpoint


class SimAgent(Endpoint):
    """The production agent core, with tasks that take a modeled time."""

    def __init__(self, sim: Simulation, node: str, capacity: Resources) -> None:
        self.sim = sim
        self.name = f"agent@{node}"
        self.location = node
        self.capacity = capacity
        self.generation = 0
        self.alive = False
        self.core: AgentCore | None = None
        self.tick_at = -1.0
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
        self.core.start(self.sim.now_ms())
        self.sim.record("agent-start", self.name, "")
        self._effects()

    def crash(self) -> None:
        if not self.alive:
            return
        self.alive = False
        self.generation += 1
        self.core = None
        self.sim.record("agent-crash", self.name, "")

    def on_reply(self, reply: ApiReply) -> None:
        if not self.alive or self.core is None:
            return
        now = self.sim.now_ms()
        if reply.response is not None:
            assert isinstance(
                reply.response,
                RegisterResponse | HeartbeatResponse | LeaseResponse | ReportResponse,
            )
            response: Response = reply.response
            self.core.on_response(reply.request_id, response, now)
        else:
            assert reply.error is not None
            self.core.on_call_failed(
                reply.request_id, reply.error, reply.leader_hint, reply.detail, now
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
        if self.tick_at >= self.sim.env.now and self.tick_at <= deadline:
            return
        self.tick_at = max(float(deadline), self.sim.env.now)
        generation = self.generation
        self.sim.after(self.tick_at - self.sim.env.now, lambda: self._tick(generation))

    def _tick(self, generation: int) -> None:
        if generation != self.generation or self.core is None:
            return
        self.tick_at = -1.0
        self.core.tick(self.sim.now_ms())
        self._effects()

    def _call(self, call: Call) -> None:
        method = call.method.value
        api_call = ApiCall(call.request_id, method, call.request, self)
        target = self.sim.nodes[call.node_id]
        self.sim.network.send(
            self.name, self.location, target.name, target.location, lambda: target.receive(api_call)
        )

    def _run(self, task: LeasedTask) -> None:
        duration = self.sim.task_duration_ms(task.function, self.name)
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
