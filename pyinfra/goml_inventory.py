"""Pre-flight validation of a goml pyinfra inventory: pure Python, no pyinfra needed.

deploy.py calls `plan_cluster` with every host's name and data before any fact is
gathered or any operation is planned, so bad input stops the deploy with a message that
names the problem while no host has been touched. The tests call it directly.

Host data (per host; group data may supply any of it):
    goml_node     str   required  the node's unique name (node id, agent id prefix)
    goml_cloud    str   required  aws, gcp, ...
    goml_region   str   required  us-east-1, us-central1, ...
    goml_roles    list  required  a non-empty subset of ["control", "agent"]
    goml_address  str   required  the address peers and agents use to reach this host
    goml_port               int   7000   gRPC port (client, agent and peer services)
    goml_metrics_port       int   9100   Prometheus metrics (on goml_address)
    goml_capacity_cpu       float 1.0    what the agent offers
    goml_capacity_memory_mb int   1024
    goml_retire             bool  false  take this host out: its node is removed from the
                                         cluster, then its services are stopped and
                                         disabled (only goml_node is needed then)
Cluster-wide (must be equal on every host that sets them):
    goml_version, goml_cluster_id, goml_election_timeout_ms_min,
    goml_election_timeout_ms_max, goml_heartbeat_interval_ms,
    goml_agent_heartbeat_interval_ms,
    goml_agent_lease_depth_max     int 1    leases an agent may queue, in multiples of its
                                            capacity; raise it once every host runs a
                                            version that has it (a rolling upgrade: after)
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

ROLES = frozenset({"control", "agent"})
REQUIRED = ("goml_node", "goml_cloud", "goml_region", "goml_roles", "goml_address")
CLUSTER_WIDE: dict[str, Any] = {
    "goml_version": "0.1.0",
    "goml_cluster_id": "goml",
    "goml_election_timeout_ms_min": 300,
    "goml_election_timeout_ms_max": 600,
    "goml_heartbeat_interval_ms": 50,
    "goml_agent_heartbeat_interval_ms": 1000,
    "goml_agent_lease_depth_max": 1,
}
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,47}$")
SAME_CLOUD_BOUND_MS = 5.0
CROSS_CLOUD_BOUND_MS = 100.0


class InventoryError(ValueError):
    """The inventory cannot be deployed; the message lists every problem found."""


@dataclass(frozen=True)
class NodeSpec:
    host: str  # the inventory host name (what pyinfra connects to)
    node: str
    cloud: str
    region: str
    roles: frozenset[str]
    address: str
    port: int = 7000
    metrics_port: int = 9100
    capacity_cpu: float = 1.0
    capacity_memory_mb: int = 1024

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def is_control(self) -> bool:
        return "control" in self.roles

    @property
    def is_agent(self) -> bool:
        return "agent" in self.roles

    @property
    def agent_id(self) -> str:
        return f"{self.node}-agent"


@dataclass(frozen=True)
class RetiredSpec:
    """A host marked goml_retire: its node leaves the cluster, then its services stop."""

    host: str
    node: str


@dataclass(frozen=True)
class ClusterPlan:
    nodes: tuple[NodeSpec, ...]  # the hosts deployed (retired ones are not among them)
    settings: Mapping[str, Any]
    warnings: tuple[str, ...] = field(default=())
    retired: tuple[RetiredSpec, ...] = field(default=())

    @property
    def control(self) -> tuple[NodeSpec, ...]:
        return tuple(n for n in self.nodes if n.is_control)

    @property
    def agents(self) -> tuple[NodeSpec, ...]:
        return tuple(n for n in self.nodes if n.is_agent)

    def by_host(self, host: str) -> NodeSpec:
        for node in self.nodes:
            if node.host == host:
                return node
        raise KeyError(f"host {host!r} is not in the plan")

    def by_node(self, node: str) -> NodeSpec:
        return next(n for n in self.nodes if n.node == node)

    def retired_host(self, host: str) -> RetiredSpec | None:
        return next((r for r in self.retired if r.host == host), None)

    def peers(self) -> dict[str, str]:
        return {n.node: n.endpoint for n in self.control}


def latency_bound_ms(a: NodeSpec, b: NodeSpec) -> float:
    return SAME_CLOUD_BOUND_MS if a.cloud == b.cloud else CROSS_CLOUD_BOUND_MS


def _int(host: str, key: str, value: Any, problems: list[str], minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        problems.append(f"host {host}: {key} must be an integer, got {value!r}")
        return minimum
    try:
        number = int(value)
    except ValueError:
        problems.append(f"host {host}: {key} must be an integer, got {value!r}")
        return minimum
    if number < minimum:
        problems.append(f"host {host}: {key} must be >= {minimum}, got {number}")
    return number


def plan_cluster(hosts: Sequence[tuple[str, Mapping[str, Any]]]) -> ClusterPlan:
    """Validate the inventory's hosts (name, data) and return the cluster plan.

    Raises InventoryError naming every problem; an even number of control nodes is a
    warning (it tolerates no more failures than one node fewer)."""
    problems: list[str] = []
    warnings: list[str] = []
    if not hosts:
        raise InventoryError("the inventory has no hosts")
    nodes: list[NodeSpec] = []
    retired: list[RetiredSpec] = []
    settings: dict[str, Any] = {}
    setting_source: dict[str, str] = {}
    for host, data in hosts:
        if _truthy(data.get("goml_retire")):
            if data.get("goml_node") in (None, ""):
                problems.append(f"host {host}: goml_retire needs goml_node (the node to remove)")
            else:
                retired.append(RetiredSpec(host, str(data["goml_node"])))
            continue
        missing = [key for key in REQUIRED if data.get(key) in (None, "", [], ())]
        if missing:
            problems.append(f"host {host}: missing {', '.join(missing)}")
            continue
        node = str(data["goml_node"])
        if not NAME_RE.match(node):
            problems.append(
                f"host {host}: goml_node {node!r} must be lowercase letters, digits and '-'"
                " (at most 48 characters, not starting with '-')"
            )
        roles_value = data["goml_roles"]
        if isinstance(roles_value, str):
            roles_value = [roles_value]
        roles = frozenset(str(r) for r in roles_value)
        unknown = sorted(roles - ROLES)
        if unknown:
            problems.append(
                f"host {host}: unknown role(s) {', '.join(unknown)} (known: agent, control)"
            )
        address = str(data["goml_address"])
        try:
            ipaddress.ip_address(address)
        except ValueError:
            if not re.match(r"^[A-Za-z0-9.-]+$", address):
                problems.append(f"host {host}: goml_address {address!r} is not a host or IP")
        cpu_value = data.get("goml_capacity_cpu", 1.0)
        try:
            cpu = float(cpu_value)
            if cpu <= 0:
                raise ValueError
        except (TypeError, ValueError):
            problems.append(f"host {host}: goml_capacity_cpu must be > 0, got {cpu_value!r}")
            cpu = 1.0
        nodes.append(
            NodeSpec(
                host=host,
                node=node,
                cloud=str(data["goml_cloud"]),
                region=str(data["goml_region"]),
                roles=roles,
                address=address,
                port=_int(host, "goml_port", data.get("goml_port", 7000), problems),
                metrics_port=_int(
                    host, "goml_metrics_port", data.get("goml_metrics_port", 9100), problems
                ),
                capacity_cpu=cpu,
                capacity_memory_mb=_int(
                    host,
                    "goml_capacity_memory_mb",
                    data.get("goml_capacity_memory_mb", 1024),
                    problems,
                ),
            )
        )
        for key in CLUSTER_WIDE:
            if key in data and data[key] is not None:
                if key in settings and settings[key] != data[key]:
                    problems.append(
                        f"{key} differs between hosts: {settings[key]!r} on "
                        f"{setting_source[key]}, {data[key]!r} on {host}"
                        " (it is cluster-wide)"
                    )
                else:
                    settings[key] = data[key]
                    setting_source[key] = host
    seen: dict[str, str] = {}
    for node in [*nodes, *retired]:
        if node.node in seen:
            problems.append(
                f"duplicate node name {node.node!r} on hosts {seen[node.node]} and {node.host}"
            )
        seen.setdefault(node.node, node.host)
    endpoints: dict[str, str] = {}
    for node in nodes:
        if node.endpoint in endpoints:
            problems.append(
                f"hosts {endpoints[node.endpoint]} and {node.host} share the address {node.endpoint}"
            )
        endpoints.setdefault(node.endpoint, node.host)
    control = [n for n in nodes if n.is_control]
    if nodes and not control and not any("missing" in p for p in problems):
        problems.append("no host has the role control: the cluster needs at least one")
    elif control and len(control) % 2 == 0:
        warnings.append(
            f"{len(control)} control nodes is an even number: it tolerates as many failures as "
            f"{len(control) - 1} would (use an odd number)"
        )
    full = {**CLUSTER_WIDE, **settings}
    for key in list(CLUSTER_WIDE)[2:]:
        full[key] = _int("(cluster)", key, full[key], problems)
    if not (
        full["goml_heartbeat_interval_ms"]
        < full["goml_election_timeout_ms_min"]
        <= full["goml_election_timeout_ms_max"]
    ):
        problems.append(
            "need goml_heartbeat_interval_ms < goml_election_timeout_ms_min <= "
            "goml_election_timeout_ms_max"
        )
    if problems:
        raise InventoryError(
            "invalid goml inventory (nothing was changed on any host):\n  - "
            + "\n  - ".join(problems)
        )
    return ClusterPlan(tuple(nodes), full, tuple(warnings), tuple(retired))


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(value)


# ------------------------------------------------------------------ membership


@dataclass(frozen=True)
class MembershipPlan:
    """What one deploy run changes in the running cluster's membership, in this order:
    `add` (each a learner, then a voter once caught up), then `remove` (one at a time).
    Adding first never lowers the number of failures the cluster tolerates (a replace
    is an add plus a remove). `unmanaged`: the removed members no inventory host names,
    so the deploy cannot stop their services."""

    add: tuple[NodeSpec, ...] = ()
    remove: tuple[str, ...] = ()
    unmanaged: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.add and not self.remove

    def describe(self) -> str:
        parts = [f"add {n.node}" for n in self.add] + [f"remove {n}" for n in self.remove]
        return ", ".join(parts) or "no change"


def plan_membership(
    plan: ClusterPlan,
    voters: Sequence[str],
    learners: Sequence[str],
    limit: Collection[str] | None = None,
) -> MembershipPlan:
    """The changes that make the running cluster's members (`voters`, `learners`, as its
    leader reports them) the inventory's control nodes. `limit`: the host names of a
    --limit run (None: every host); such a run changes only its hosts, and removes no
    member that no inventory host names (a partial run cannot tell a host left out from
    one deleted).

    Raises InventoryError when the run would remove a majority of the current voters
    in one go (more than one of them): that is what a wrong or truncated inventory
    looks like, and it would leave the cluster without the quorum it had."""
    members = [*voters, *(n for n in learners if n not in voters)]

    def included(host: str) -> bool:
        return limit is None or host in limit

    add = tuple(n for n in plan.control if n.node not in voters and included(n.host))
    # Retired hosts first, then members on hosts that are no control node any more (their
    # roles changed; goml-node keeps running there until stopped), then members no host
    # names (deleted from the inventory).
    retire = [r.node for r in plan.retired if r.node in members and included(r.host)]
    control = {n.node for n in plan.control}
    demoted = [n.node for n in plan.nodes if n.node in members and n.node not in control]
    demoted = [m for m in demoted if included(plan.by_node(m).host)]
    named = {n.node for n in plan.nodes} | {r.node for r in plan.retired}
    unmanaged = [m for m in members if m not in named] if limit is None else []
    remove = tuple([*retire, *demoted, *unmanaged])
    removed_voters = [v for v in voters if v in remove]
    staying = len(set(voters) - set(remove)) + len(add)
    if len(removed_voters) > 1 and staying < len(voters) // 2 + 1:
        raise InventoryError(
            f"this run would remove {len(removed_voters)} of the {len(voters)} voters "
            f"({', '.join(removed_voters)}) and keep {staying}: fewer than a majority of "
            "the voters it has now; is the inventory complete? Remove fewer hosts per run "
            "(one at a time is always accepted). Nothing was changed on any host"
        )
    return MembershipPlan(add, remove, tuple(m for m in remove if m in unmanaged))


def kept_membership(text: str | None, node: str) -> tuple[dict[str, str], bool] | None:
    """The `peers` and `join` of the node config a host already has (its
    /etc/goml/node.yaml as text), when it is `node`'s: a deployed node keeps them, so an
    inventory change rewrites no member's config and restarts no member. They matter
    only for its first start (the bootstrap voters, or whom a joiner asks); after that
    its configuration comes from its Raft log."""
    if not text or not text.strip():
        return None
    try:
        body = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    if not isinstance(body, dict) or body.get("node_id") != node:
        return None
    peers = body.get("peers")
    if not isinstance(peers, dict) or not peers:
        return None
    return {str(k): str(v) for k, v in peers.items()}, bool(body.get("join", False))


def check_reachable(expected: Sequence[str], connected: Sequence[str]) -> None:
    """Every inventory host must be connected before anything changes."""
    missing = sorted(set(expected) - set(connected))
    if missing:
        raise InventoryError(
            "unreachable host(s): "
            + ", ".join(missing)
            + " (pyinfra could not connect; nothing was changed on any host)"
        )


def check_systemd(has_systemd: Mapping[str, bool]) -> None:
    """Every host must run systemd as PID 1 (/run/systemd/system exists)."""
    without = sorted(host for host, ok in has_systemd.items() if not ok)
    if without:
        raise InventoryError(
            "host(s) without systemd as PID 1 (no /run/systemd/system): "
            + ", ".join(without)
            + " (goml's services need systemd; nothing was changed on any host)"
        )
