"""The CPU model: what the calibrated costs (`costs:`, `goml.scenario.schema.Costs`)
charge, in simulated time, before a process sees an input.

Each process (a control node, an agent) is one service queue: it does one input at a
time, in arrival order (the real ones are single asyncio loops). The processes placed
on one host share its cores: an input starts when its process is free and a core of
its host is free, and holds both for its cost. Without costs nothing here runs, and the
simulator is as fast and its traces as they were.

Every cost is drawn from the RNG of its own process, so charging one process never
shifts another's draws, nor any draw of the network, disks or workload.
"""

from __future__ import annotations

import heapq
import random

from goml.scenario.schema import AnyDistribution, Scenario

SHARED_HOST = "*"  # `costs.cores`: every process on one host (a local cluster)


class Cpu:
    def __init__(self, scenario: Scenario, seed: int) -> None:
        assert scenario.costs is not None
        self.costs = scenario.costs
        self.seed = seed
        self._hosts: dict[str, list[float]] = {}  # host -> when each core is next free
        self._free_at: dict[str, float] = {}  # process -> when it is next free
        self._rngs: dict[str, random.Random] = {}
        self._scenario = scenario
        self.busy_ms = 0.0  # every charge, summed (the summary's cpu_busy_s)

    def _cores(self, location: str) -> list[float]:
        host = SHARED_HOST if self.costs.cores is not None else location
        cores = self._hosts.get(host)
        if cores is None:
            if self.costs.cores is not None:
                count = self.costs.cores
            else:
                count = max(1, int(self._scenario.topology.node(location).capacity.cpu))
            cores = self._hosts[host] = [0.0] * count
        return cores

    def charge(
        self, process: str, location: str, cost: AnyDistribution | None, now_ms: float
    ) -> float:
        """Charge one input of `process` (on host `location`) at `now_ms`; returns the
        delay until its process has done it (0: no cost)."""
        if cost is None:
            # Costs nothing, yet its process takes it only after what it is busy with.
            return max(0.0, self._free_at.get(process, 0.0) - now_ms)
        rng = self._rngs.get(process)
        if rng is None:
            rng = self._rngs[process] = random.Random(f"{self.seed}:cpu:{process}")
        took = cost.sample_ms(rng)
        cores = self._cores(location)
        start = max(now_ms, self._free_at.get(process, 0.0), cores[0])
        done = start + took
        heapq.heapreplace(cores, done)  # the core free first takes it
        self._free_at[process] = done
        self.busy_ms += took
        return done - now_ms

    def restart(self, process: str) -> None:
        """A process that crashed starts again with an empty queue (what it had queued is
        gone with it; the cores its last inputs held stay held until those would end)."""
        self._free_at.pop(process, None)
