"""Scenario schema: one YAML file drives both the simulator and the chaos runner.

Every model forbids unknown fields so a typo is an error, not a silently ignored
setting. Names carry their units (`_ms`, `_s`). Cross-references (a fault naming a
node, a client placed at a node) are checked on the whole `Scenario`, and each
problem is reported at its own location (e.g. `faults.2.target`) so the loader can
point at the YAML line.

Distributions sample from a `random.Random` passed in, so the simulator stays
deterministic and both runtimes interpret a distribution the same way.
"""

from __future__ import annotations

import math
import random
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

Loc = tuple[int | str, ...]

# Names that mean something else where a node name is expected.
LEADER = "leader"
RANDOM = "random"
RESERVED_NAMES = frozenset({LEADER, RANDOM})
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"

# z-score of the 99th percentile of the standard normal, to turn a p99 into sigma.
_Z99 = 2.3263478740408408


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Name = Annotated[str, Field(pattern=NAME_PATTERN)]


# --------------------------------------------------------------------------- distributions


class _Dist(_Model):
    """A latency or duration distribution in milliseconds (never negative)."""

    def sample_ms(self, rng: random.Random) -> float:
        raise NotImplementedError

    def expected_ms(self) -> float:
        """Mean, e.g. for Toxiproxy's fixed `latency`."""
        raise NotImplementedError


class ConstantDist(_Dist):
    kind: Literal["constant"] = "constant"
    value_ms: float = Field(ge=0)

    def sample_ms(self, rng: random.Random) -> float:
        return self.value_ms

    def expected_ms(self) -> float:
        return self.value_ms


class NormalDist(_Dist):
    """Normal, clamped at `min_ms` (samples below it are raised to it)."""

    kind: Literal["normal"] = "normal"
    mean_ms: float = Field(ge=0)
    stddev_ms: float = Field(ge=0)
    min_ms: float = Field(default=0.0, ge=0)

    def sample_ms(self, rng: random.Random) -> float:
        return max(self.min_ms, rng.gauss(self.mean_ms, self.stddev_ms))

    def expected_ms(self) -> float:
        return max(self.min_ms, self.mean_ms)


class LogNormalDist(_Dist):
    """Log-normal given by its median and 99th percentile: how latencies are measured
    and reported (e.g. fsync p50 0.33 ms, p99 1.2 ms), so no mu/sigma arithmetic by hand."""

    kind: Literal["lognormal"] = "lognormal"
    median_ms: float = Field(gt=0)
    p99_ms: float = Field(gt=0)

    @model_validator(mode="after")
    def _p99_not_below_median(self) -> LogNormalDist:
        if self.p99_ms < self.median_ms:
            raise ValueError(f"p99_ms ({self.p99_ms}) must be >= median_ms ({self.median_ms})")
        return self

    @property
    def mu(self) -> float:
        return math.log(self.median_ms)

    @property
    def sigma(self) -> float:
        return math.log(self.p99_ms / self.median_ms) / _Z99

    def sample_ms(self, rng: random.Random) -> float:
        return rng.lognormvariate(self.mu, self.sigma)

    def expected_ms(self) -> float:
        return math.exp(self.mu + self.sigma**2 / 2)


class UniformDist(_Dist):
    kind: Literal["uniform"] = "uniform"
    min_ms: float = Field(ge=0)
    max_ms: float = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> UniformDist:
        if self.max_ms < self.min_ms:
            raise ValueError(f"max_ms ({self.max_ms}) must be >= min_ms ({self.min_ms})")
        return self

    def sample_ms(self, rng: random.Random) -> float:
        return rng.uniform(self.min_ms, self.max_ms)

    def expected_ms(self) -> float:
        return (self.min_ms + self.max_ms) / 2


Distribution = Annotated[
    ConstantDist | NormalDist | LogNormalDist | UniformDist, Field(discriminator="kind")
]


class _LinkExtras(_Dist):
    # Uniform in [-jitter_ms, +jitter_ms], as Toxiproxy's latency toxic applies it.
    jitter_ms: float = Field(default=0.0, ge=0)
    # Probability that one message is dropped (simulator only: TCP hides loss).
    loss: float = Field(default=0.0, ge=0, le=1)

    def delay_ms(self, rng: random.Random) -> float:
        """One-way delay of one message: the distribution plus jitter, never negative."""
        delay = self.sample_ms(rng)
        if self.jitter_ms:
            delay += rng.uniform(-self.jitter_ms, self.jitter_ms)
        return max(0.0, delay)

    def drops(self, rng: random.Random) -> bool:
        return self.loss > 0 and rng.random() < self.loss


# A link is a distribution written flat with its jitter and loss:
# `{kind: normal, mean_ms: 17, stddev_ms: 2, jitter_ms: 1, loss: 0.001}`.
class ConstantLink(ConstantDist, _LinkExtras):
    pass


class NormalLink(NormalDist, _LinkExtras):
    pass


class LogNormalLink(LogNormalDist, _LinkExtras):
    pass


class UniformLink(UniformDist, _LinkExtras):
    pass


Link = Annotated[
    ConstantLink | NormalLink | LogNormalLink | UniformLink, Field(discriminator="kind")
]
AnyLink = ConstantLink | NormalLink | LogNormalLink | UniformLink


# --------------------------------------------------------------------------- topology

Role = Literal["control", "agent"]
_BOTH_ROLES: list[Role] = ["control", "agent"]


class Capacity(_Model):
    cpu: float = Field(default=2.0, gt=0)
    memory_mb: int = Field(default=4096, gt=0)
    gpu: int = Field(default=0, ge=0)


class Node(_Model):
    name: Name
    cloud: Name
    region: Name
    roles: list[Role] = Field(default_factory=lambda: _BOTH_ROLES.copy(), min_length=1)
    # Used only when the node has the agent role.
    capacity: Capacity = Field(default_factory=Capacity)

    @model_validator(mode="after")
    def _check(self) -> Node:
        if self.name in RESERVED_NAMES:
            raise ValueError(f"'{self.name}' is reserved (it means a role in faults)")
        if len(set(self.roles)) != len(self.roles):
            raise ValueError("roles repeat")
        return self

    @property
    def is_control(self) -> bool:
        return "control" in self.roles

    @property
    def is_agent(self) -> bool:
        return "agent" in self.roles


def _reference_nodes() -> list[Node]:
    aws = [Node(name=f"aws-{i}", cloud="aws", region="us-east-1") for i in (1, 2, 3)]
    gcp = [Node(name=f"gcp-{i}", cloud="gcp", region="us-central1") for i in (1, 2)]
    return aws + gcp


class Topology(_Model):
    """Clouds, regions and nodes. `clouds` (cloud -> regions) is optional: when given,
    every node must sit in a declared cloud and region; when omitted it is derived."""

    clouds: dict[Name, list[Name]] | None = None
    nodes: list[Node] = Field(default_factory=_reference_nodes, min_length=1)

    @model_validator(mode="after")
    def _check(self) -> Topology:
        problems: list[tuple[Loc, str]] = []
        seen: set[str] = set()
        for i, node in enumerate(self.nodes):
            if node.name in seen:
                problems.append((("nodes", i, "name"), f"duplicate node name '{node.name}'"))
            seen.add(node.name)
            if self.clouds is not None:
                if node.cloud not in self.clouds:
                    problems.append(
                        (("nodes", i, "cloud"), f"cloud '{node.cloud}' is not in topology.clouds")
                    )
                elif node.region not in self.clouds[node.cloud]:
                    problems.append(
                        (
                            ("nodes", i, "region"),
                            f"region '{node.region}' is not declared for cloud '{node.cloud}'",
                        )
                    )
        if not any(n.is_control for n in self.nodes):
            problems.append((("nodes",), "at least one node needs the 'control' role"))
        _raise_if(self, problems)
        return self

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.nodes]

    @property
    def control_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.is_control]

    @property
    def agent_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.is_agent]

    @property
    def cloud_regions(self) -> dict[str, list[str]]:
        if self.clouds is not None:
            return {c: list(r) for c, r in self.clouds.items()}
        out: dict[str, list[str]] = {}
        for n in self.nodes:
            regions = out.setdefault(n.cloud, [])
            if n.region not in regions:
                regions.append(n.region)
        return out

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def resolve(self, member: str) -> list[str]:
        """Node names a group member stands for: `NODE`, `cloud:NAME` or `region:NAME`.
        `leader` is decided at run time, so callers resolve it themselves."""
        if member.startswith("cloud:"):
            cloud = member.removeprefix("cloud:")
            return [n.name for n in self.nodes if n.cloud == cloud]
        if member.startswith("region:"):
            region = member.removeprefix("region:")
            return [n.name for n in self.nodes if n.region == region]
        if member == LEADER:
            raise ValueError("'leader' is only known at run time")
        self.node(member)
        return [member]

    def member_problem(self, member: str, allow_leader: bool) -> str | None:
        """Why `member` names nothing in this topology, or None if it is fine."""
        if member == LEADER:
            return None if allow_leader else "'leader' is not allowed here"
        if member.startswith("cloud:"):
            cloud = member.removeprefix("cloud:")
            known = sorted(self.cloud_regions)
            return None if cloud in known else f"unknown cloud '{cloud}' (known: {_list(known)})"
        if member.startswith("region:"):
            region = member.removeprefix("region:")
            known = sorted({r for rs in self.cloud_regions.values() for r in rs})
            return None if region in known else f"unknown region '{region}' (known: {_list(known)})"
        if member in self.node_names:
            return None
        return f"unknown node '{member}' (known: {_list(self.node_names)})"


# --------------------------------------------------------------------------- network, disk


class PairOverride(_Model):
    """Link between two named nodes (both directions), overriding its class."""

    between: tuple[Name, Name]
    link: Link


class Network(_Model):
    """One-way latency per link class; the reference setup is AWS us-east-1 + GCP
    us-central1 (~30-40 ms RTT between them)."""

    same_region: Link = Field(default_factory=lambda: NormalLink(mean_ms=0.5, stddev_ms=0.1))
    same_cloud: Link = Field(default_factory=lambda: NormalLink(mean_ms=10.0, stddev_ms=1.0))
    cross_cloud: Link = Field(default_factory=lambda: NormalLink(mean_ms=17.5, stddev_ms=1.5))
    pairs: list[PairOverride] = Field(default_factory=list)


class Disk(_Model):
    # Measured here: a one-row SQLite WAL commit with synchronous=FULL, p50 0.56 ms, p99 1.4 ms.
    fsync_ms: Distribution = Field(default_factory=lambda: LogNormalDist(median_ms=0.5, p99_ms=1.4))


# --------------------------------------------------------------------------- raft


class Raft(_Model):
    election_timeout_ms_min: int = Field(default=300, gt=0)
    election_timeout_ms_max: int = Field(default=600, gt=0)
    heartbeat_interval_ms: int = Field(default=50, gt=0)

    @model_validator(mode="after")
    def _check(self) -> Raft:
        problems: list[tuple[Loc, str]] = []
        if self.heartbeat_interval_ms >= self.election_timeout_ms_min:
            problems.append(
                (
                    ("heartbeat_interval_ms",),
                    f"heartbeat_interval_ms ({self.heartbeat_interval_ms}) must be less than "
                    f"election_timeout_ms_min ({self.election_timeout_ms_min})",
                )
            )
        if self.election_timeout_ms_min > self.election_timeout_ms_max:
            problems.append(
                (
                    ("election_timeout_ms_max",),
                    f"election_timeout_ms_max ({self.election_timeout_ms_max}) must be >= "
                    f"election_timeout_ms_min ({self.election_timeout_ms_min})",
                )
            )
        _raise_if(self, problems)
        return self


# --------------------------------------------------------------------------- workload


class Client(_Model):
    name: Name
    node: Name


class Resources(_Model):
    cpu: float = Field(default=1.0, gt=0)
    memory_mb: int = Field(default=256, gt=0)
    gpu: int = Field(default=0, ge=0)


class TaskMix(_Model):
    """One task function in the mix: drawn with probability weight / sum(weights)."""

    weight: float = Field(default=1.0, gt=0)
    args: dict[str, JsonValue] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    # Overrides `workload.duration_ms` for this function.
    duration_ms: Distribution | None = None


class ScheduledSubmit(_Model):
    at_s: float = Field(ge=0)
    count: int = Field(default=1, ge=1)
    # Drawn from the mix when omitted; must name a function of the mix otherwise.
    function: str | None = None
    # Picked at random among the clients when omitted.
    client: str | None = None


class Workload(_Model):
    """Load offered by clients. Either `rate_per_s` (Poisson arrivals, total over all
    clients, each arrival at a client picked uniformly) or an explicit `schedule`."""

    clients: list[Client] = Field(min_length=1)
    rate_per_s: float | None = Field(default=None, gt=0)
    schedule: list[ScheduledSubmit] | None = None
    # Arrivals happen in [start_s, stop_s); stop_s defaults to the scenario's end.
    start_s: float = Field(default=0.0, ge=0)
    stop_s: float | None = Field(default=None, gt=0)
    mix: dict[str, TaskMix] = Field(min_length=1)
    duration_ms: Distribution = Field(
        default_factory=lambda: LogNormalDist(median_ms=50.0, p99_ms=500.0)
    )
    max_attempts: int = Field(default=3, ge=1)
    timeout_ms: int = Field(default=30_000, gt=0)

    @model_validator(mode="after")
    def _check(self) -> Workload:
        problems: list[tuple[Loc, str]] = []
        if (self.rate_per_s is None) == (self.schedule is None):
            problems.append(((), "give exactly one of rate_per_s or schedule"))
        if self.stop_s is not None and self.stop_s <= self.start_s:
            problems.append((("stop_s",), "stop_s must be after start_s"))
        names: set[str] = set()
        for i, c in enumerate(self.clients):
            if c.name in names:
                problems.append((("clients", i, "name"), f"duplicate client name '{c.name}'"))
            names.add(c.name)
        for i, s in enumerate(self.schedule or []):
            if s.function is not None and s.function not in self.mix:
                problems.append(
                    (
                        ("schedule", i, "function"),
                        f"function '{s.function}' is not in the mix ({_list(sorted(self.mix))})",
                    )
                )
            if s.client is not None and s.client not in names:
                problems.append((("schedule", i, "client"), f"unknown client '{s.client}'"))
        _raise_if(self, problems)
        return self


# --------------------------------------------------------------------------- faults


def _as_list(value: Any) -> Any:
    # A single member may be written without brackets: `cloud:aws` for `[cloud:aws]`.
    return [value] if isinstance(value, str) else value


# Group members: a node name, `cloud:NAME`, `region:NAME`, or `leader` (decided when
# the fault fires).
Members = Annotated[list[str], BeforeValidator(_as_list, json_schema_input_type=str | list[str])]


class _Fault(_Model):
    at_s: float = Field(ge=0)


class CrashFault(_Fault):
    """Kill the process (SIGKILL): it keeps only what it persisted."""

    kind: Literal["crash"] = "crash"
    target: str  # node name, `leader` or `random`
    restart_after_s: float | None = Field(default=None, gt=0)


class RestartFault(_Fault):
    """Start `target` again if it is down; if it is running, kill it and start it
    `down_s` later (0: at once)."""

    kind: Literal["restart"] = "restart"
    target: str  # node name, `leader` or `random`
    down_s: float = Field(default=0.0, ge=0)


class PauseFault(_Fault):
    """Freeze the process (SIGSTOP) for `duration_s`, then resume it (SIGCONT)."""

    kind: Literal["pause"] = "pause"
    target: str  # node name, `leader` or `random`
    duration_s: float = Field(gt=0)


class PartitionFault(_Fault):
    """`direction: both`: `groups` cannot reach each other; nodes named in no group
    form one more group. `direction: one_way`: messages `from` -> `to` are dropped,
    the reverse still flows."""

    model_config = ConfigDict(populate_by_name=True)

    kind: Literal["partition"] = "partition"
    direction: Literal["both", "one_way"] = "both"
    groups: list[Members] | None = None
    from_: Members | None = Field(default=None, alias="from")
    to: Members | None = None
    heal_after_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _shape(self) -> PartitionFault:
        problems: list[tuple[Loc, str]] = []
        if self.direction == "both":
            if not self.groups:
                problems.append((("groups",), "a two-way partition needs groups"))
            for field, value in (("from", self.from_), ("to", self.to)):
                if value is not None:
                    problems.append(((field,), f"'{field}' is only for direction: one_way"))
        else:
            if self.groups is not None:
                problems.append((("groups",), "direction: one_way takes from/to, not groups"))
            for field, value in (("from", self.from_), ("to", self.to)):
                if not value:
                    problems.append(((field,), "direction: one_way needs from and to"))
        _raise_if(self, problems)
        return self


class HealFault(_Fault):
    """Remove every partition."""

    kind: Literal["heal"] = "heal"


class LinkLatencyFault(_Fault):
    """Replace the latency of every link between the two sides (both directions);
    restore the scenario's network after `duration_s` if given."""

    kind: Literal["link_latency"] = "link_latency"
    between: tuple[Members, Members]
    latency: Link
    duration_s: float | None = Field(default=None, gt=0)


class ClogFault(_Fault):
    """Links between the two sides stop delivering but keep messages queued."""

    kind: Literal["clog"] = "clog"
    between: tuple[Members, Members]
    # Unclog automatically after this long.
    duration_s: float | None = Field(default=None, gt=0)


class UnclogFault(_Fault):
    """Release queued messages; all clogged links when `between` is omitted."""

    kind: Literal["unclog"] = "unclog"
    between: tuple[Members, Members] | None = None


class AgentCrashFault(_Fault):
    """Kill the agent process on a node (the control-plane process stays up)."""

    kind: Literal["agent_crash"] = "agent_crash"
    target: str  # node name with the agent role, or `random`
    restart_after_s: float | None = Field(default=None, gt=0)


Fault = Annotated[
    CrashFault
    | RestartFault
    | PauseFault
    | PartitionFault
    | HealFault
    | LinkLatencyFault
    | ClogFault
    | UnclogFault
    | AgentCrashFault,
    Field(discriminator="kind"),
]
AnyFault = (
    CrashFault
    | RestartFault
    | PauseFault
    | PartitionFault
    | HealFault
    | LinkLatencyFault
    | ClogFault
    | UnclogFault
    | AgentCrashFault
)


# --------------------------------------------------------------------------- expectations

Op = Literal["<", "<=", "==", "!=", ">=", ">"]
_OPS = ("<", "<=", "==", "!=", ">=", ">")
_SHORTHAND = re.compile(
    r"^\s*(?P<metric>[A-Za-z0-9_.]+)\s*(?P<op><=|>=|==|!=|<|>)\s*(?P<value>\S+)\s*$"
)

# Fields of the run summary JSON written by both the simulator and the chaos runner.
KNOWN_METRICS = frozenset(
    {
        "scenario",
        "seed",
        "trace_digest",
        "sim_seconds",
        "wall_seconds",
        "failover_s.count",
        "failover_s.p50",
        "failover_s.p99",
        "failover_s.max",
        "submit_ms.p50",
        "submit_ms.p99",
        "submit_ms.max",
        "submit_ms_steady.count",
        "submit_ms_steady.p50",
        "submit_ms_steady.p99",
        "submit_ms_steady.max",
        "submit_ms.count",
        "tasks_dead",
        "settled",
        "tasks_submitted",
        "tasks_acknowledged",
        "tasks_succeeded",
        "tasks_lost",
        "duplicate_results",
        "leader_changes",
    }
)


class Expectation(_Model):
    """`{metric: failover_s.p99, op: "<", value: 5}`; in a scenario file also the
    shorthand string `"failover_s.p99 < 5"`. `metric` is a dotted path into the run
    summary."""

    metric: str = Field(pattern=r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
    op: Op
    value: float

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


def _expectation_shorthand(data: Any) -> Any:
    if not isinstance(data, str):
        return data
    m = _SHORTHAND.match(data)
    if m is None:
        raise PydanticCustomError(
            "expectation_syntax",
            "expected 'METRIC OP VALUE' with OP one of {ops}, e.g. 'tasks_lost == 0'",
            {"ops": " ".join(_OPS)},
        )
    return m.groupdict()


# The JSON Schema offers both spellings so editors accept the shorthand.
ExpectationItem = Annotated[
    Expectation,
    BeforeValidator(_expectation_shorthand, json_schema_input_type=str | Expectation),
]


# --------------------------------------------------------------------------- scenario


class Scenario(_Model):
    name: Name
    description: str = ""
    # Simulated seconds for the simulator, wall-clock seconds for the chaos runner.
    duration_s: float = Field(gt=0)
    seed: int = 1
    topology: Topology = Field(default_factory=Topology)
    network: Network = Field(default_factory=Network)
    disk: Disk = Field(default_factory=Disk)
    raft: Raft = Field(default_factory=Raft)
    workload: Workload | None = None
    # In any order; see `timeline()`.
    faults: list[Fault] = Field(default_factory=list)
    expectations: list[ExpectationItem] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references(self) -> Scenario:
        _raise_if(self, _reference_problems(self))
        return self

    def timeline(self) -> list[AnyFault]:
        """Faults ordered by `at_s` (ties keep file order)."""
        return sorted(self.faults, key=lambda f: f.at_s)

    def link(self, a: str, b: str) -> AnyLink:
        """The link from node `a` to node `b`: a pair override, else its class."""
        for pair in self.network.pairs:
            if {a, b} == set(pair.between):
                return pair.link
        na, nb = self.topology.node(a), self.topology.node(b)
        if na.cloud != nb.cloud:
            return self.network.cross_cloud
        if na.region != nb.region:
            return self.network.same_cloud
        return self.network.same_region


def _reference_problems(s: Scenario) -> list[tuple[Loc, str]]:
    topo = s.topology
    nodes = set(topo.node_names)
    agents = {n.name for n in topo.agent_nodes}
    problems: list[tuple[Loc, str]] = []

    def node_ref(loc: Loc, name: str, specials: frozenset[str] = frozenset()) -> None:
        if name in specials or name in nodes:
            return
        extra = f", {_list(sorted(specials))}" if specials else ""
        problems.append((loc, f"unknown node '{name}' (known: {_list(sorted(nodes))}{extra})"))

    def members(loc: Loc, values: list[str]) -> None:
        for k, m in enumerate(values):
            why = topo.member_problem(m, allow_leader=True)
            if why:
                problems.append(((*loc, k), why))

    if s.workload is not None:
        for i, c in enumerate(s.workload.clients):
            node_ref(("workload", "clients", i, "node"), c.node)

    for i, pair in enumerate(s.network.pairs):
        for j, name in enumerate(pair.between):
            node_ref(("network", "pairs", i, "between", j), name)
        if pair.between[0] == pair.between[1]:
            problems.append((("network", "pairs", i, "between"), "a pair needs two nodes"))

    for i, f in enumerate(s.faults):
        loc: Loc = ("faults", i)
        if isinstance(f, CrashFault | RestartFault | PauseFault):
            node_ref((*loc, "target"), f.target, RESERVED_NAMES)
        elif isinstance(f, AgentCrashFault):
            if f.target == LEADER:
                problems.append(((*loc, "target"), "agent_crash takes a node name or 'random'"))
            elif f.target != RANDOM:
                if f.target not in nodes:
                    node_ref((*loc, "target"), f.target, frozenset({RANDOM}))
                elif f.target not in agents:
                    problems.append(((*loc, "target"), f"node '{f.target}' has no agent role"))
        elif isinstance(f, PartitionFault):
            before = len(problems)
            for j, group in enumerate(f.groups or []):
                members((*loc, "groups", j), group)
            if f.from_:
                members((*loc, "from"), f.from_)
            if f.to:
                members((*loc, "to"), f.to)
            # Overlaps can only be computed once every member resolves.
            if f.groups and len(problems) == before:
                problems.extend(_overlapping_groups(topo, loc, f.groups))
        elif isinstance(f, LinkLatencyFault | ClogFault | UnclogFault) and f.between:
            for j, side in enumerate(f.between):
                members((*loc, "between", j), side)
    return problems


def _overlapping_groups(topo: Topology, loc: Loc, groups: list[list[str]]) -> list[tuple[Loc, str]]:
    owner: dict[str, int] = {}
    out: list[tuple[Loc, str]] = []
    for j, group in enumerate(groups):
        for m in group:
            for name in [LEADER] if m == LEADER else topo.resolve(m):
                if owner.setdefault(name, j) != j:
                    out.append(
                        ((*loc, "groups", j), f"'{name}' is in groups {owner[name]} and {j}")
                    )
    return out


def _list(names: list[str]) -> str:
    return ", ".join(names) if names else "none"


def _raise_if(model: BaseModel, problems: list[tuple[Loc, str]]) -> None:
    """Raise all problems at once, each at its own location below the model.

    A ValidationError raised inside a validator is nested by pydantic under the
    model's own location, so `('target',)` here becomes `('faults', 2, 'target')`.
    """
    if not problems:
        return
    raise ValidationError.from_exception_data(
        type(model).__name__,
        [
            InitErrorDetails(
                type=PydanticCustomError("scenario", "{message}", {"message": msg}),
                loc=loc,
                input=None,
            )
            for loc, msg in problems
        ],
    )


def scenario_warnings(s: Scenario) -> list[tuple[Loc, str]]:
    """Things that are allowed but probably not meant."""
    out: list[tuple[Loc, str]] = []
    controls = len(s.topology.control_nodes)
    if controls % 2 == 0:
        out.append(
            (
                ("topology", "nodes"),
                f"{controls} control nodes: an even count tolerates no more failures than "
                f"{controls - 1} and needs a larger quorum",
            )
        )
    for i, f in enumerate(s.faults):
        if f.at_s >= s.duration_s:
            out.append(
                (
                    ("faults", i, "at_s"),
                    f"at_s {f.at_s:g} is not before duration_s {s.duration_s:g}",
                )
            )
    if s.workload and s.workload.stop_s is not None and s.workload.stop_s > s.duration_s:
        out.append((("workload", "stop_s"), "stop_s is after the end of the run"))
    for i, e in enumerate(s.expectations):
        if e.metric not in KNOWN_METRICS:
            out.append(
                (("expectations", i, "metric"), f"'{e.metric}' is not a known summary field")
            )
    return out


def json_schema() -> dict[str, Any]:
    """JSON Schema of a scenario file, for editors (e.g. yaml-language-server)."""
    schema = Scenario.model_json_schema(by_alias=True)
    # The loader ignores top-level `x-...` keys (anchors); let editors accept them too.
    schema["patternProperties"] = {"^x-": {}}
    return schema
