"""Scenario schema: one YAML file drives both the simulator and the chaos runner.

Every model forbids unknown fields so a typo is an error, not a silently ignored
setting. Names carry their units (`_ms`, `_s`). Cross-references (a fault naming a
node, a client placed at a node) are checked on the whole `Scenario`, and each
problem is reported at its own location (e.g. `faults.2.target`) so the loader can
point at the YAML line.

Distributions sample from a `random.Random` passed in, so the simulator stays
deterministic and both runtimes interpret a distribution the same way.

Every number is finite (the models refuse `.inf` and `.nan`) and bounded by the limits
below, and every list and name has a maximum length: a typo such as `rate_per_s: .inf`
or `duration_s: 1e400` is an error at load, not a simulator that never ends.
"""

from __future__ import annotations

import difflib
import math
import random
import re
from typing import Annotated, Any, Literal, get_args

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

from goml.cluster import commands
from goml.raft.replica import (
    ENTRIES_PER_MESSAGE_MAX,
    INFLIGHT_MESSAGES_MAX,
    MESSAGE_BYTES_MAX,
    UNCOMMITTED_ENTRIES_MAX,
)

Loc = tuple[int | str, ...]

# Names that mean something else where a node name is expected.
LEADER = "leader"
RANDOM = "random"
RESERVED_NAMES = frozenset({LEADER, RANDOM})
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"

# z-score of the 99th percentile of the standard normal, to turn a p99 into sigma.
_Z99 = 2.3263478740408408

# --------------------------------------------------------------------------- limits
# Generous for any experiment this project runs, small enough that a run ends and a
# file validates in well under a second.

# Any time in seconds (duration_s, at_s, start_s, restart_after_s, ...): one day.
DURATION_S_MAX = 86_400.0
# Any latency, timeout or task duration in milliseconds (distributions, jitter, Raft
# timeouts): ten minutes.
LATENCY_MS_MAX = 600_000.0
# The smallest log-normal median: below a microsecond mu and sigma stop meaning a
# latency, and a large p99/median ratio makes sigma so wide that exp() overflows.
LOGNORMAL_MEDIAN_MS_MIN = 0.001
# Arrivals per second of a whole workload.
RATE_PER_S_MAX = 100_000.0
# Tasks one schedule entry submits, and tasks a whole workload may offer (the Poisson
# rate times its window, or the schedule's counts summed).
TASKS_MAX = 1_000_000
# A task's wall-clock timeout: one day, in the API's milliseconds.
TASK_TIMEOUT_MS_MAX = 86_400_000
# Attempts of one task (the API carries an int32; more than this is a typo).
ATTEMPTS_MAX = 1_000
# A mix weight (only ratios matter).
WEIGHT_MAX = 1_000_000.0
# Node capacity and task resources.
CPU_MAX = 1_024.0
MEMORY_MB_MAX = 16 * 1024 * 1024  # 16 TiB
GPU_MAX = 1_024
# The seed is carried as a protobuf int64 and in JSON summaries.
SEED_MIN = -(2**63)
SEED_MAX = 2**63 - 1
# Bound on an expectation's value (any summary figure is far below it).
EXPECTATION_VALUE_MAX = 1e12
# Names (nodes, clouds, clients, functions): half the manifest's name_bytes_max (256),
# so ids the runtimes build from them (e.g. agent ids) still fit.
NAME_CHARS_MAX = 128
DESCRIPTION_CHARS_MAX = 10_000
# The firings of one repeated fault, and of a whole timeline once repeats are expanded.
FIRINGS_MAX = 10_000
# A wall clock's offset from true time (clock faults): a day.
CLOCK_OFFSET_MS_MAX = 86_400_000
# List lengths.
NODES_MAX = 256
CLIENTS_MAX = 256
MIX_FUNCTIONS_MAX = 100
EXPECTATIONS_MAX = 1_000
ITEMS_MAX = 10_000  # faults, schedule entries, link pairs, group members


class _Model(BaseModel):
    # allow_inf_nan=False: `.inf`, `.nan` and overflowing literals such as `1e400` are
    # refused by every float field (and inside task args).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=NAME_CHARS_MAX)]
# A node name, `leader` or `random` (checked against the topology by `Scenario`).
Target = Annotated[str, Field(min_length=1, max_length=NAME_CHARS_MAX)]
# A task function name (checked by the task library) or a client name.
Ref = Annotated[str, Field(min_length=1, max_length=NAME_CHARS_MAX)]
Seconds = Annotated[float, Field(ge=0, le=DURATION_S_MAX)]
PositiveSeconds = Annotated[float, Field(gt=0, le=DURATION_S_MAX)]
Millis = Annotated[float, Field(ge=0, le=LATENCY_MS_MAX)]


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
    value_ms: Millis

    def sample_ms(self, rng: random.Random) -> float:
        return self.value_ms

    def expected_ms(self) -> float:
        return self.value_ms


class NormalDist(_Dist):
    """Normal, clamped at `min_ms` (samples below it are raised to it)."""

    kind: Literal["normal"] = "normal"
    mean_ms: Millis
    stddev_ms: Millis
    min_ms: Millis = 0.0

    def sample_ms(self, rng: random.Random) -> float:
        return max(self.min_ms, rng.gauss(self.mean_ms, self.stddev_ms))

    def expected_ms(self) -> float:
        return max(self.min_ms, self.mean_ms)


class LogNormalDist(_Dist):
    """Log-normal given by its median and 99th percentile: how latencies are measured
    and reported (e.g. fsync p50 0.33 ms, p99 1.2 ms), so no mu/sigma arithmetic by hand."""

    kind: Literal["lognormal"] = "lognormal"
    median_ms: float = Field(ge=LOGNORMAL_MEDIAN_MS_MIN, le=LATENCY_MS_MAX)
    p99_ms: float = Field(ge=LOGNORMAL_MEDIAN_MS_MIN, le=LATENCY_MS_MAX)

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
    min_ms: Millis
    max_ms: Millis

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
AnyDistribution = ConstantDist | NormalDist | LogNormalDist | UniformDist


class _LinkExtras(_Dist):
    # Uniform in [-jitter_ms, +jitter_ms], as Toxiproxy's latency toxic applies it.
    jitter_ms: Millis = 0.0
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
    cpu: float = Field(default=2.0, gt=0, le=CPU_MAX)
    memory_mb: int = Field(default=4096, gt=0, le=MEMORY_MB_MAX)
    gpu: int = Field(default=0, ge=0, le=GPU_MAX)


class Node(_Model):
    name: Name
    cloud: Name
    region: Name
    roles: list[Role] = Field(
        default_factory=lambda: _BOTH_ROLES.copy(), min_length=1, max_length=len(_BOTH_ROLES)
    )
    # Used only when the node has the agent role.
    capacity: Capacity = Field(default_factory=Capacity)
    # A control node outside the initial configuration: its machine is there, its node
    # is started and joined by an `add_node` or `replace_node` fault (until then it runs
    # nothing; its agent, if it has the role, runs from the start).
    spare: bool = False

    @model_validator(mode="after")
    def _check(self) -> Node:
        if self.name in RESERVED_NAMES:
            raise ValueError(f"'{self.name}' is reserved (it means a role in faults)")
        if len(set(self.roles)) != len(self.roles):
            raise ValueError("roles repeat")
        if self.spare and not self.is_control:
            _raise_if(self, [(("spare",), "spare: true is for a node with the 'control' role")])
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

    clouds: dict[Name, Annotated[list[Name], Field(max_length=NODES_MAX)]] | None = Field(
        default=None, max_length=NODES_MAX
    )
    nodes: list[Node] = Field(default_factory=_reference_nodes, min_length=1, max_length=NODES_MAX)

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
        elif not any(n.is_control and not n.spare for n in self.nodes):
            problems.append(
                (("nodes",), "every control node is a spare: the cluster needs a first voter")
            )
        _raise_if(self, problems)
        return self

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.nodes]

    @property
    def control_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.is_control]

    @property
    def voter_nodes(self) -> list[Node]:
        """The control nodes of the initial configuration (the spares join later)."""
        return [n for n in self.nodes if n.is_control and not n.spare]

    @property
    def spare_names(self) -> list[str]:
        return [n.name for n in self.nodes if n.spare]

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


# A pair of clouds or of regions, written `A-B` (`aws-gcp`, `us-east-1-eu-west-1`): names
# may hold `-` themselves, so the key is split where both halves are declared names.
PairKey = Annotated[str, Field(min_length=3, max_length=2 * NAME_CHARS_MAX + 1)]


class Network(_Model):
    """One-way latency per link class; the reference setup is AWS us-east-1 + GCP
    us-central1 (~30-40 ms RTT between them).

    The link between two nodes is, most specific first: a `pairs` entry naming both
    nodes; a `region_pairs` entry for their two regions (`A-A`: two nodes of region A);
    a `cloud_pairs` entry for their two clouds (`A-A`: two regions of cloud A); else its
    class (`same_region`, `same_cloud`, `cross_cloud`)."""

    same_region: Link = Field(default_factory=lambda: NormalLink(mean_ms=0.5, stddev_ms=0.1))
    same_cloud: Link = Field(default_factory=lambda: NormalLink(mean_ms=10.0, stddev_ms=1.0))
    cross_cloud: Link = Field(default_factory=lambda: NormalLink(mean_ms=17.5, stddev_ms=1.5))
    cloud_pairs: dict[PairKey, Link] = Field(default_factory=dict, max_length=ITEMS_MAX)
    region_pairs: dict[PairKey, Link] = Field(default_factory=dict, max_length=ITEMS_MAX)
    pairs: list[PairOverride] = Field(default_factory=list, max_length=ITEMS_MAX)


def split_pair_key(key: str, known: list[str]) -> tuple[str, str] | str:
    """`A-B` as the pair (A, B) of known names, or why it names no such pair."""
    names = set(known)
    splits = [
        (key[:i], key[i + 1 :])
        for i, char in enumerate(key)
        if char == "-" and key[:i] in names and key[i + 1 :] in names
    ]
    if len(splits) == 1:
        return splits[0]
    if splits:
        shown = " or ".join(f"'{a}' and '{b}'" for a, b in splits)
        return f"'{key}' is ambiguous: it reads as {shown}"
    close = difflib.get_close_matches(
        key, [f"{a}-{b}" for a in sorted(names) for b in sorted(names)], n=1, cutoff=0.75
    )
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"'{key}' is not NAME-NAME of two declared names{hint} (known: {_list(known)})"


class Disk(_Model):
    # Measured here: a one-row SQLite WAL commit with synchronous=FULL, p50 0.56 ms, p99 1.4 ms.
    fsync_ms: Distribution = Field(default_factory=lambda: LogNormalDist(median_ms=0.5, p99_ms=1.4))


# --------------------------------------------------------------------------- costs


# Cores of one host in the CPU model (`costs.cores`).
CORES_MAX = 1_024


class Costs(_Model):
    """What the real processes cost, as `goml chaos calibrate` measures them on a machine
    (or as written by hand). The simulator's CPU model charges them; with no `costs:`
    section it charges nothing and runs as it always did.

    Every field is optional: a missing one costs nothing (fsync: `disk.fsync_ms`).
    - `fsync_ms`: a durable write of the node's store; replaces `disk.fsync_ms`.
    - `append_ms`: a control node's work on one APPEND or SNAPSHOT that carries data.
    - `message_ms`: on any other Raft message (heartbeats, votes, responses).
    - `api_call_ms`: on one API call (from a client, an agent or a forwarding
      follower) and on a forwarded call's answer.
    - `hop_ms`: one message between two processes, on top of its link's latency: TLS,
      gRPC framing, the loopback or proxy hop.
    - `api_hop_ms`: the same for one API message (a call or its answer, between a client,
      an agent or a forwarding node and a node), in place of `hop_ms`: a unary gRPC call
      with its metadata, token check and protobuf conversion costs more than a Raft
      message on a stream that is already open. Unset, API messages cost `hop_ms`.
    - `dispatch_ms`: an agent's work from a leased task to its warm worker running it.
    - `isolated_dispatch_ms`: the same for an isolated task (`isolated: true` in the
      mix): a fresh process is started for it. Unset, isolated tasks cost `dispatch_ms`.
    - `cores`: every process shares one host of this many cores (a local cluster, as the
      chaos runner starts one); unset, each topology node is a host of its
      `capacity.cpu` cores (at least one), shared by the processes placed on it.
    A process does one input at a time, in arrival order, on a free core of its host.
    """

    fsync_ms: Distribution | None = None
    append_ms: Distribution | None = None
    message_ms: Distribution | None = None
    api_call_ms: Distribution | None = None
    hop_ms: Distribution | None = None
    api_hop_ms: Distribution | None = None
    dispatch_ms: Distribution | None = None
    isolated_dispatch_ms: Distribution | None = None
    cores: int | None = Field(default=None, ge=1, le=CORES_MAX)
    # Where and when it was measured (free text, written by `goml chaos calibrate`).
    measured_on: str = Field(default="", max_length=DESCRIPTION_CHARS_MAX)

    @property
    def charges_cpu(self) -> bool:
        """Whether any input costs processing time (else the CPU model is off)."""
        return any(
            d is not None
            for d in (
                self.append_ms,
                self.message_ms,
                self.api_call_ms,
                self.dispatch_ms,
                self.isolated_dispatch_ms,
            )
        )


# --------------------------------------------------------------------------- raft


class Raft(_Model):
    election_timeout_ms_min: int = Field(default=300, gt=0, le=LATENCY_MS_MAX)
    election_timeout_ms_max: int = Field(default=600, gt=0, le=LATENCY_MS_MAX)
    heartbeat_interval_ms: int = Field(default=50, gt=0, le=LATENCY_MS_MAX)
    # The core's other settings (goml.raft.types.Config); the defaults are goml's
    # standards (goml.raft.replica), so a scenario that sets none runs what a node runs.
    pre_vote: bool = True
    check_quorum: bool = True
    inflight_messages_max: int = Field(default=INFLIGHT_MESSAGES_MAX, ge=1, le=1_000_000)
    entries_per_message_max: int = Field(default=ENTRIES_PER_MESSAGE_MAX, ge=1, le=1_000_000)
    uncommitted_entries_max: int = Field(default=UNCOMMITTED_ENTRIES_MAX, ge=1, le=100_000_000)
    message_bytes_max: int = Field(default=MESSAGE_BYTES_MAX, ge=1, le=1 << 30)

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
    cpu: float = Field(default=1.0, gt=0, le=CPU_MAX)
    memory_mb: int = Field(default=256, gt=0, le=MEMORY_MB_MAX)
    gpu: int = Field(default=0, ge=0, le=GPU_MAX)


class TaskMix(_Model):
    """One task function in the mix: drawn with probability weight / sum(weights)."""

    weight: float = Field(default=1.0, gt=0, le=WEIGHT_MAX)
    args: dict[str, JsonValue] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    # Overrides `workload.duration_ms` for this function.
    duration_ms: Distribution | None = None
    # Each task in a fresh process of its own (`goml submit --isolated`), not a warm
    # worker: it costs `costs.isolated_dispatch_ms` to start instead of `dispatch_ms`.
    isolated: bool = False


class ScheduledSubmit(_Model):
    at_s: Seconds
    count: int = Field(default=1, ge=1, le=TASKS_MAX)
    # Drawn from the mix when omitted; must name a function of the mix otherwise.
    function: Ref | None = None
    # Picked at random among the clients when omitted.
    client: Ref | None = None


class Workload(_Model):
    """Load offered by clients. Either `rate_per_s` (Poisson arrivals, total over all
    clients, each arrival at a client picked uniformly) or an explicit `schedule`."""

    clients: list[Client] = Field(min_length=1, max_length=CLIENTS_MAX)
    rate_per_s: float | None = Field(default=None, gt=0, le=RATE_PER_S_MAX)
    schedule: list[ScheduledSubmit] | None = Field(default=None, max_length=ITEMS_MAX)
    # Arrivals happen in [start_s, stop_s); stop_s defaults to the scenario's end.
    start_s: Seconds = 0.0
    stop_s: PositiveSeconds | None = None
    mix: dict[Ref, TaskMix] = Field(min_length=1, max_length=MIX_FUNCTIONS_MAX)
    duration_ms: Distribution = Field(
        default_factory=lambda: LogNormalDist(median_ms=50.0, p99_ms=500.0)
    )
    max_attempts: int = Field(default=3, ge=1, le=ATTEMPTS_MAX)
    timeout_ms: int = Field(default=30_000, gt=0, le=TASK_TIMEOUT_MS_MAX)

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
Members = Annotated[
    list[Target],
    Field(max_length=ITEMS_MAX),
    BeforeValidator(_as_list, json_schema_input_type=str | list[str]),
]


class _Fault(_Model):
    """When a fault fires: at `at_s`; with `every_s`, again every `every_s` seconds, `count`
    times in all or as long as the next firing is at or before `until_s` (a flapping link
    is one partition with `heal_after_s: 2, every_s: 5, count: 10`). `Scenario.timeline()`
    expands the repeats, so every world plays the same firings."""

    at_s: Seconds
    every_s: PositiveSeconds | None = None
    count: int | None = Field(default=None, ge=1, le=FIRINGS_MAX)
    until_s: Seconds | None = None

    @model_validator(mode="after")
    def _repeat(self) -> _Fault:
        problems: list[tuple[Loc, str]] = []
        if self.every_s is None:
            for name in ("count", "until_s"):
                if getattr(self, name) is not None:
                    problems.append(((name,), f"{name} repeats a fault: give every_s too"))
        elif (self.count is None) == (self.until_s is None):
            problems.append(
                (
                    ("every_s",),
                    "every_s needs exactly one of count (how many firings) or until_s "
                    "(the last firing time)",
                )
            )
        elif self.until_s is not None and self.until_s < self.at_s:
            problems.append(
                (("until_s",), f"until_s ({self.until_s:g}) is before at_s ({self.at_s:g})")
            )
        elif self.firings() > FIRINGS_MAX:
            problems.append(
                (
                    ("every_s",),
                    f"every_s {self.every_s:g} until_s {self.until_s:g} fires "
                    f"{self.firings()} times, more than {FIRINGS_MAX}",
                )
            )
        _raise_if(self, problems)
        return self

    def firings(self) -> int:
        """How many times this fault fires."""
        if self.every_s is None:
            return 1
        if self.count is not None:
            return self.count
        if self.until_s is None:
            return 1  # refused by `_repeat` (every_s without count or until_s)
        # A hair of tolerance: `at_s: 0.1, every_s: 0.1, until_s: 0.3` fires 3 times.
        return math.floor((self.until_s - self.at_s) / self.every_s + 1e-9) + 1

    def firing_times_s(self) -> list[float]:
        assert self.firings() <= FIRINGS_MAX, "validated"
        step = self.every_s or 0.0
        return [self.at_s + k * step for k in range(self.firings())]

    def length_s(self) -> float:
        """How long one firing lasts before it undoes itself (0: it does not)."""
        for name in ("heal_after_s", "duration_s", "restart_after_s", "down_s"):
            value = getattr(self, name, None)
            if value is not None:
                return float(value)
        return 0.0


class CrashFault(_Fault):
    """Kill the process (SIGKILL): it keeps only what it persisted."""

    kind: Literal["crash"] = "crash"
    target: Target  # node name, `leader` or `random`
    restart_after_s: PositiveSeconds | None = None


class RestartFault(_Fault):
    """Start `target` again if it is down; if it is running, kill it and start it
    `down_s` later (0: at once)."""

    kind: Literal["restart"] = "restart"
    target: Target  # node name, `leader` or `random`
    down_s: Seconds = 0.0


class PauseFault(_Fault):
    """Freeze the process (SIGSTOP) for `duration_s`, then resume it (SIGCONT)."""

    kind: Literal["pause"] = "pause"
    target: Target  # node name, `leader` or `random`
    duration_s: PositiveSeconds


class PartitionFault(_Fault):
    """`direction: both`: `groups` cannot reach each other; nodes named in no group
    form one more group. `direction: one_way`: messages `from` -> `to` are dropped,
    the reverse still flows."""

    model_config = ConfigDict(populate_by_name=True)

    kind: Literal["partition"] = "partition"
    direction: Literal["both", "one_way"] = "both"
    groups: list[Members] | None = Field(default=None, max_length=NODES_MAX)
    from_: Members | None = Field(default=None, alias="from")
    to: Members | None = None
    heal_after_s: PositiveSeconds | None = None

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
    duration_s: PositiveSeconds | None = None


class ClogFault(_Fault):
    """Links between the two sides stop delivering but keep messages queued."""

    kind: Literal["clog"] = "clog"
    between: tuple[Members, Members]
    # Unclog automatically after this long.
    duration_s: PositiveSeconds | None = None


class UnclogFault(_Fault):
    """Release queued messages; all clogged links when `between` is omitted."""

    kind: Literal["unclog"] = "unclog"
    between: tuple[Members, Members] | None = None


class AgentCrashFault(_Fault):
    """Kill the agent process on a node (the control-plane process stays up)."""

    kind: Literal["agent_crash"] = "agent_crash"
    target: Target  # node name with the agent role, or `random`
    restart_after_s: PositiveSeconds | None = None


class DiskFault(_Fault):
    """A control node's disk, one of:
    - `fsync_stall_ms`: for `duration_s`, every write of the node's store waits this much
      longer before it is durable;
    - `full: true`: for `duration_s` the disk has no space left: the node's next write fails
      and the node stops serving (saying why) without acknowledging anything that write
      carried; when the space is freed the node is restarted, as an operator would;
    - `wipe: true`: the node is stopped, its data directory deleted, and it is started
      `down_s` later with an empty store (amnesia)."""

    kind: Literal["disk"] = "disk"
    target: Target  # control node name, `leader` or `random`
    fsync_stall_ms: float | None = Field(default=None, gt=0, le=LATENCY_MS_MAX)
    full: bool = False
    wipe: bool = False
    duration_s: PositiveSeconds | None = None
    down_s: Seconds | None = None

    @model_validator(mode="after")
    def _one_action(self) -> DiskFault:
        problems: list[tuple[Loc, str]] = []
        actions = [
            name
            for name, given in (
                ("fsync_stall_ms", self.fsync_stall_ms is not None),
                ("full", self.full),
                ("wipe", self.wipe),
            )
            if given
        ]
        if len(actions) != 1:
            problems.append(
                (
                    (),
                    "a disk fault takes exactly one of fsync_stall_ms, full: true or wipe: true"
                    + (f" (got {', '.join(actions)})" if actions else ""),
                )
            )
        elif self.wipe:
            if self.duration_s is not None:
                problems.append(
                    (("duration_s",), "wipe takes down_s (how long the node stays down)")
                )
        else:
            if self.duration_s is None:
                problems.append(((actions[0],), f"{actions[0]} needs duration_s"))
            if self.down_s is not None:
                problems.append((("down_s",), "down_s is only for wipe: true"))
        _raise_if(self, problems)
        return self

    @property
    def action(self) -> Literal["stall", "full", "wipe"]:
        if self.wipe:
            return "wipe"
        return "full" if self.full else "stall"


ClockOffsetMs = Annotated[int, Field(ge=-CLOCK_OFFSET_MS_MAX, le=CLOCK_OFFSET_MS_MAX)]


class ClockFault(_Fault):
    """A control node's wall clock (what a leader stamps into commands; its monotonic clock
    is untouched): `skew_ms` sets its offset from true time (0: back to true time),
    `jump_ms` moves it by that much at once (repeated, a drifting clock)."""

    kind: Literal["clock"] = "clock"
    target: Target  # control node name, `leader` or `random`
    skew_ms: ClockOffsetMs | None = None
    jump_ms: ClockOffsetMs | None = None

    @model_validator(mode="after")
    def _one_change(self) -> ClockFault:
        problems: list[tuple[Loc, str]] = []
        if (self.skew_ms is None) == (self.jump_ms is None):
            problems.append(((), "a clock fault takes exactly one of skew_ms or jump_ms"))
        elif self.jump_ms is not None and abs(self.jump_ms) * self.firings() > CLOCK_OFFSET_MS_MAX:
            problems.append(
                (
                    ("jump_ms",),
                    f"{self.firings()} jumps of {self.jump_ms} ms move the clock more than "
                    f"{CLOCK_OFFSET_MS_MAX} ms",
                )
            )
        _raise_if(self, problems)
        return self


class _MembershipFault(_Fault):
    """A membership change, as `goml node add/remove/replace` makes it (the steps are
    goml.cluster.membership_plan's); one firing each (a node joins once)."""

    @model_validator(mode="after")
    def _once(self) -> _MembershipFault:
        if self.every_s is not None:
            kind = getattr(self, "kind", "membership")
            _raise_if(self, [(("every_s",), f"a {kind} fault fires once (no every_s)")])
        return self


class AddNodeFault(_MembershipFault):
    """Start spare `target` (join: true, the current members as its peers) and add it:
    a learner first, a voter once it has caught up."""

    kind: Literal["add_node"] = "add_node"
    target: Name  # a spare control node


class RemoveNodeFault(_MembershipFault):
    """Remove `target` from the configuration (the leader hands over and steps down once
    its removal commits), then stop its process."""

    kind: Literal["remove_node"] = "remove_node"
    target: Target  # a member or `leader`


class ReplaceNodeFault(_MembershipFault):
    """Replace member `target` by spare `new`: add `new` (learner, then voter), then remove
    `target` and stop it. Adding first never lowers the failures the cluster tolerates."""

    kind: Literal["replace_node"] = "replace_node"
    target: Target  # a member or `leader`
    new: Name  # a spare control node


MembershipFault = AddNodeFault | RemoveNodeFault | ReplaceNodeFault

Fault = Annotated[
    CrashFault
    | RestartFault
    | PauseFault
    | PartitionFault
    | HealFault
    | LinkLatencyFault
    | ClogFault
    | UnclogFault
    | AgentCrashFault
    | DiskFault
    | ClockFault
    | AddNodeFault
    | RemoveNodeFault
    | ReplaceNodeFault,
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
    | DiskFault
    | ClockFault
    | AddNodeFault
    | RemoveNodeFault
    | ReplaceNodeFault
)


# --------------------------------------------------------------------------- expectations

Op = Literal["<", "<=", "==", "!=", ">=", ">"]
_OPS = ("<", "<=", "==", "!=", ">=", ">")
_SHORTHAND = re.compile(
    r"^\s*(?P<metric>[A-Za-z0-9_.]+)\s*(?P<op><=|>=|==|!=|<|>)\s*(?P<value>\S+)\s*$"
)

# What an expectation may compare: the numbers of the run summary that both the
# simulator (`goml.sim.simulation`) and the chaos runner (`goml.chaos.runner`) write,
# both through `goml.scenario.player.Player.summary`. A metric outside this set is an
# error at load: otherwise a typo is found only after a full run, as a failed verdict.
DISTRIBUTIONS = ("failover_s", "submit_ms", "submit_ms_steady")
DISTRIBUTION_STATS = ("count", "p50", "p99", "max")
COUNTERS = (
    "sim_seconds",
    "wall_seconds",
    "tasks_submitted",
    "tasks_acknowledged",
    "tasks_succeeded",
    "tasks_dead",
    "tasks_lost",
    "duplicate_results",
    "leader_changes",
    "submits_given_up",
    "tasks_retried",
    # Membership faults carried out to the end, and those the cluster refused or that
    # did not finish in time.
    "membership_changes",
    "membership_changes_failed",
)
# `commands_per_task.<Type>`: committed Raft commands of each type per acknowledged
# task, and their `total`; the type names are those `goml.cluster.commands` decodes.
COMMAND_TYPE_NAMES = tuple(sorted(t.__name__ for t in get_args(commands.Command)))
PER_TASK = "commands_per_task"
NUMERIC_METRICS = frozenset(
    [
        *COUNTERS,
        *(f"{d}.{stat}" for d in DISTRIBUTIONS for stat in DISTRIBUTION_STATS),
        *(f"{PER_TASK}.{name}" for name in (*COMMAND_TYPE_NAMES, "total")),
    ]
)
_DISTRIBUTION_HINT = "a distribution: compare {name}.count, .p50, .p99 or .max"
_SIM_ONLY = "only the simulator reports it (a chaos run has no such field)"
# Summary fields that are there but cannot be compared with a number, and why.
NOT_COMPARABLE: dict[str, str] = {
    "scenario": "the scenario's name, not a number",
    "seed": "the run's input, not a measurement",
    "kind": "a description of the run, not a number",
    "trace_digest": "a hex digest of the trace, not a number",
    "settled": "true or false, not a number",
    "submit_errors": "a list of messages, not a number",
    "timeline": "the run's time series, not a number",
    "work_dir": "a path, not a number",
    "speedup": _SIM_ONLY,
    "events": _SIM_ONLY,
    "messages_sent": _SIM_ONLY,
    "messages_dropped": _SIM_ONLY,
    "ready_s": _SIM_ONLY,
    "commands_note": "a note of the chaos runner, not a number",
    "simulator": "the simulator's prediction inside a chaos summary, not compared",
    "expectations": "the verdicts themselves",
    "submit_ms_steady_by_client": (
        "one distribution per client, keyed by client names, which metric names cannot"
        " carry: compare submit_ms_steady (over every client)"
    ),
    "submit_ms_steady_slowest": "a list of the slowest steady submits (when, whose), not a number",
    PER_TASK: f"one figure per command type: {PER_TASK}.<Type> or {PER_TASK}.total",
    **{d: _DISTRIBUTION_HINT.format(name=d) for d in DISTRIBUTIONS},
    **{f"{d}.values": "the samples themselves, not a number" for d in DISTRIBUTIONS},
}
METRIC_CHARS_MAX = 200


def metric_problem(metric: str) -> str | None:
    """Why an expectation cannot compare `metric` with a number, or None if it can."""
    if metric in NUMERIC_METRICS:
        return None
    if metric in NOT_COMPARABLE:
        return f"'{metric}' cannot be compared with a number: {NOT_COMPARABLE[metric]}"
    head, _, tail = metric.partition(".")
    if head in NOT_COMPARABLE and head not in (*DISTRIBUTIONS, PER_TASK):
        return f"'{metric}' cannot be compared with a number: {NOT_COMPARABLE[head]}"
    if head == PER_TASK:
        close = difflib.get_close_matches(tail, [*COMMAND_TYPE_NAMES, "total"], n=1)
        hint = f" (did you mean '{PER_TASK}.{close[0]}'?)" if close else ""
        return (
            f"unknown command type '{tail}' in '{metric}'{hint}; known: "
            f"{_list([*COMMAND_TYPE_NAMES, 'total'])}"
        )
    if head in DISTRIBUTIONS:
        return f"'{metric}' is not in the summary: '{head}' is " + _DISTRIBUTION_HINT.format(
            name=head
        )
    close = difflib.get_close_matches(metric, sorted(NUMERIC_METRICS), n=1, cutoff=0.75)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return (
        f"unknown metric '{metric}'{hint}; known: {_list(sorted(COUNTERS))}, "
        f"{_list(list(DISTRIBUTIONS))} (.count .p50 .p99 .max), {PER_TASK}.<Type>"
    )


class Expectation(_Model):
    """`{metric: failover_s.p99, op: "<", value: 5}`; in a scenario file also the
    shorthand string `"failover_s.p99 < 5"`. `metric` is a dotted path to a number of
    the run summary (`NUMERIC_METRICS`)."""

    metric: str = Field(pattern=r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$", max_length=METRIC_CHARS_MAX)
    op: Op
    value: float = Field(ge=-EXPECTATION_VALUE_MAX, le=EXPECTATION_VALUE_MAX)

    @model_validator(mode="after")
    def _known_metric(self) -> Expectation:
        why = metric_problem(self.metric)
        if why is not None:
            _raise_if(self, [(("metric",), why)])
        return self

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
    description: str = Field(default="", max_length=DESCRIPTION_CHARS_MAX)
    # Simulated seconds for the simulator, wall-clock seconds for the chaos runner.
    duration_s: PositiveSeconds
    seed: int = Field(default=1, ge=SEED_MIN, le=SEED_MAX)
    topology: Topology = Field(default_factory=Topology)
    network: Network = Field(default_factory=Network)
    disk: Disk = Field(default_factory=Disk)
    raft: Raft = Field(default_factory=Raft)
    # The calibrated costs (see `Costs`), written here or read by the loader from
    # `costs_file` (a YAML file holding a `costs:` section, relative to the scenario's).
    costs: Costs | None = None
    costs_file: str | None = Field(default=None, min_length=1, max_length=4096)
    workload: Workload | None = None
    # In any order; see `timeline()`.
    faults: list[Fault] = Field(default_factory=list, max_length=ITEMS_MAX)
    expectations: list[ExpectationItem] = Field(default_factory=list, max_length=EXPECTATIONS_MAX)

    @model_validator(mode="after")
    def _references(self) -> Scenario:
        _raise_if(self, _reference_problems(self) + _offered_tasks_problems(self))
        return self

    def timeline(self) -> list[AnyFault]:
        """Every firing, repeats expanded (each a copy of its fault at its own `at_s`,
        without the repeat fields), ordered by `at_s`; ties keep file order."""
        firings: list[AnyFault] = []
        for fault in self.faults:
            if fault.every_s is None:
                firings.append(fault)
                continue
            for at_s in fault.firing_times_s():
                firings.append(
                    fault.model_copy(
                        update={"at_s": at_s, "every_s": None, "count": None, "until_s": None}
                    )
                )
        assert len(firings) <= FIRINGS_MAX, "validated by _firings_problems"
        return sorted(firings, key=lambda f: f.at_s)

    @property
    def fsync_ms(self) -> AnyDistribution:
        """A durable write's latency: the calibrated one, else the modelled disk's."""
        if self.costs is not None and self.costs.fsync_ms is not None:
            return self.costs.fsync_ms
        return self.disk.fsync_ms

    def link(self, a: str, b: str) -> AnyLink:
        """The link from node `a` to node `b`, most specific first: a node pair, a region
        pair, a cloud pair, else its class (see `Network`)."""
        for pair in self.network.pairs:
            if {a, b} == set(pair.between):
                return pair.link
        na, nb = self.topology.node(a), self.topology.node(b)
        regions = sorted({r for rs in self.topology.cloud_regions.values() for r in rs})
        for key, link in self.network.region_pairs.items():
            if sorted(_as_pair(split_pair_key(key, regions))) == sorted((na.region, nb.region)):
                return link
        clouds = sorted(self.topology.cloud_regions)
        if na.cloud != nb.cloud or na.region != nb.region:
            for key, link in self.network.cloud_pairs.items():
                if sorted(_as_pair(split_pair_key(key, clouds))) == sorted((na.cloud, nb.cloud)):
                    return link
        if na.cloud != nb.cloud:
            return self.network.cross_cloud
        if na.region != nb.region:
            return self.network.same_cloud
        return self.network.same_region


def _as_pair(split: tuple[str, str] | str) -> tuple[str, str]:
    assert not isinstance(split, str), f"validated: {split}"
    return split


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

    clouds = sorted(topo.cloud_regions)
    regions = sorted({r for rs in topo.cloud_regions.values() for r in rs})
    for field, known in (("cloud_pairs", clouds), ("region_pairs", regions)):
        seen_pairs: dict[tuple[str, str], str] = {}
        for key in getattr(s.network, field):
            split = split_pair_key(key, known)
            if isinstance(split, str):
                problems.append((("network", field, key), split))
                continue
            normal = (min(split), max(split))
            if normal in seen_pairs:
                problems.append(
                    (("network", field, key), f"the same pair as '{seen_pairs[normal]}'")
                )
            seen_pairs.setdefault(normal, key)

    controls = {n.name for n in topo.control_nodes}

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
        elif isinstance(f, DiskFault | ClockFault):
            if f.target in nodes and f.target not in controls:
                what = "store" if isinstance(f, DiskFault) else "wall clock"
                problems.append(
                    (
                        (*loc, "target"),
                        f"node '{f.target}' has no control role: a {f.kind} fault hits a "
                        f"control node's {what}",
                    )
                )
            else:
                node_ref((*loc, "target"), f.target, RESERVED_NAMES)
    problems.extend(_membership_problems(s))
    firings = sum(f.firings() for f in s.faults)
    if firings > FIRINGS_MAX:
        problems.append(
            (("faults",), f"the faults fire {firings} times in all, more than {FIRINGS_MAX}")
        )
    return problems


def _membership_problems(s: Scenario) -> list[tuple[Loc, str]]:
    """Membership faults played in timeline order (`at_s`, then file order) against the
    configuration they leave: the targets must be members, the new nodes spares that
    were never members, and a voter must remain. `leader` is a member whichever it is."""
    topo = s.topology
    nodes = set(topo.node_names)
    controls = {n.name for n in topo.control_nodes}
    spares = set(topo.spare_names)
    voters = {n.name for n in topo.voter_nodes}
    voters_count = len(voters)
    ever = set(voters)  # nodes that were members at some point
    problems: list[tuple[Loc, str]] = []

    def newcomer(loc: Loc, name: str) -> bool:
        if name not in nodes:
            problems.append((loc, f"unknown node '{name}' (known: {_list(sorted(nodes))})"))
        elif name not in controls:
            problems.append((loc, f"node '{name}' has no control role"))
        elif name in voters:
            problems.append((loc, f"node '{name}' is a member already"))
        elif name in ever:
            problems.append(
                (loc, f"node '{name}' was a member before: its store holds the old state")
            )
        elif name not in spares:
            problems.append((loc, f"node '{name}' is not a spare (give it spare: true)"))
        else:
            return True
        return False

    def member(loc: Loc, name: str) -> bool:
        if name == LEADER:
            return True
        if name == RANDOM:
            problems.append((loc, "a membership change takes a member's name or 'leader'"))
        elif name not in nodes:
            known = _list(sorted(voters | {LEADER}))
            problems.append((loc, f"unknown node '{name}' (members now: {known})"))
        elif name not in voters:
            why = "was removed earlier" if name in ever else "is not a member (yet)"
            problems.append((loc, f"node '{name}' {why}: members now: {_list(sorted(voters))}"))
        else:
            return True
        return False

    order = sorted(
        (
            (f.at_s, i, f)
            for i, f in enumerate(s.faults)
            if isinstance(f, AddNodeFault | RemoveNodeFault | ReplaceNodeFault)
        ),
        key=lambda item: (item[0], item[1]),
    )
    for _, i, f in order:
        loc: Loc = ("faults", i)
        if isinstance(f, AddNodeFault):
            if newcomer((*loc, "target"), f.target):
                voters.add(f.target)
                ever.add(f.target)
                voters_count += 1
        elif isinstance(f, RemoveNodeFault):
            if not member((*loc, "target"), f.target):
                continue
            if voters_count <= 1:
                problems.append(((*loc, "target"), "it would remove the last voter"))
                continue
            voters.discard(f.target)
            voters_count -= 1
        else:
            known_old = member((*loc, "target"), f.target)
            if f.new == f.target:
                problems.append(((*loc, "new"), "a node cannot replace itself"))
            elif newcomer((*loc, "new"), f.new) and known_old:
                voters.discard(f.target)
                voters.add(f.new)
                ever.add(f.new)
    return problems


def _offered_tasks_problems(s: Scenario) -> list[tuple[Loc, str]]:
    """Each bound alone still allows 100000/s for a day: 8.6e9 tasks, a simulator that
    does not end. Bound what the workload offers in total."""
    w = s.workload
    if w is None:
        return []
    if w.rate_per_s is not None:
        window_s = max(0.0, (w.stop_s if w.stop_s is not None else s.duration_s) - w.start_s)
        offered = w.rate_per_s * window_s
        if offered > TASKS_MAX:
            return [
                (
                    ("workload", "rate_per_s"),
                    f"rate_per_s {w.rate_per_s:g} over {window_s:g} s offers {offered:.3g} "
                    f"tasks, more than {TASKS_MAX}",
                )
            ]
    total = sum(entry.count for entry in w.schedule or [])
    if total > TASKS_MAX:
        return [
            (("workload", "schedule"), f"the schedule submits {total} tasks, more than {TASKS_MAX}")
        ]
    return []


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
    controls = len(s.topology.voter_nodes)
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
        elif f.every_s is not None:
            late = sum(1 for t in f.firing_times_s() if t >= s.duration_s)
            if late:
                out.append(
                    (
                        ("faults", i, "every_s"),
                        f"{late} of its {f.firings()} firings are not before duration_s "
                        f"{s.duration_s:g}: they never fire",
                    )
                )
            if f.length_s() >= f.every_s:
                out.append(
                    (
                        ("faults", i, "every_s"),
                        f"each firing lasts {f.length_s():g} s, not less than every_s "
                        f"{f.every_s:g}: firings overlap",
                    )
                )
    if (
        s.costs is not None
        and s.costs.fsync_ms is not None
        and "fsync_ms" in s.disk.model_fields_set
    ):
        out.append((("disk", "fsync_ms"), "costs.fsync_ms replaces it: this one is not used"))
    if s.workload and s.workload.stop_s is not None and s.workload.stop_s > s.duration_s:
        out.append((("workload", "stop_s"), "stop_s is after the end of the run"))
    return out


def json_schema() -> dict[str, Any]:
    """JSON Schema of a scenario file, for editors (e.g. yaml-language-server)."""
    schema = Scenario.model_json_schema(by_alias=True)
    # The loader ignores top-level `x-...` keys (anchors); let editors accept them too.
    schema["patternProperties"] = {"^x-": {}}
    return schema
