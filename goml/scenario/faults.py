"""How a fault of the scenario timeline names its targets: shared by the simulator and
the chaos runner so both cut, slow and crash exactly the same links and processes.

`leader` is resolved when the fault fires, through the callable each runtime passes in
(the simulator looks at its cores, the chaos runner asks the cluster)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable

from goml.scenario.schema import LEADER, RANDOM, AnyFault, DiskFault, PartitionFault, Topology

Leader = Callable[[], str | None]
Pair = tuple[str, str]


def describe_fault(fault: AnyFault) -> str:
    body = fault.model_dump(exclude={"at_s", "kind"}, exclude_none=True, by_alias=True)
    if isinstance(fault, DiskFault):
        # The action given, not the two that are not (`full: false`, `wipe: false`).
        body = {k: v for k, v in body.items() if v is not False}
    return f"{fault.kind} {json.dumps(body, sort_keys=True, separators=(',', ':'))}"


def resolve_target(target: str, leader: Leader, pool: list[str], rng: random.Random) -> str | None:
    """A crash/pause/restart target: `leader` (None when there is none), `random` from
    `pool`, or a node name as written."""
    if target == LEADER:
        return leader()
    if target == RANDOM:
        return rng.choice(pool)
    return target


def resolve_members(topology: Topology, members: list[str], leader: Leader) -> set[str]:
    names: set[str] = set()
    for member in members:
        if member == LEADER:
            name = leader()
            if name is not None:
                names.add(name)
        else:
            names.update(topology.resolve(member))
    return names


def pairs_between(side_a: set[str], side_b: set[str]) -> set[Pair]:
    """Every directed link between the two sides, both ways."""
    return {(x, y) for x in side_a for y in side_b if x != y} | {
        (y, x) for x in side_a for y in side_b if x != y
    }


def partition_pairs(topology: Topology, fault: PartitionFault, leader: Leader) -> set[Pair]:
    """The directed links a partition cuts: `from` -> `to` one way, or every link between
    different groups (nodes named in no group form one more group)."""
    if fault.direction == "one_way":
        assert fault.from_ is not None and fault.to is not None
        sources = resolve_members(topology, fault.from_, leader)
        targets = resolve_members(topology, fault.to, leader)
        return {(s, t) for s in sources for t in targets if s != t}
    assert fault.groups is not None
    groups = [resolve_members(topology, g, leader) for g in fault.groups]
    rest = set(topology.node_names) - set().union(*groups)
    if rest:
        groups.append(rest)
    pairs: set[Pair] = set()
    for i, group in enumerate(groups):
        for other in groups[i + 1 :]:
            pairs |= pairs_between(group, other)
    return pairs
