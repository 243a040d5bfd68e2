"""Prometheus metrics of one node, in a registry of its own (several nodes may share a
process in tests), served over HTTP in the Prometheus text format."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from goml.cluster.manifest import AgentState, ApplyResult, TaskState
from goml.cluster.node_core import NodeCore
from goml.raft.types import Role

SUBMIT_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
# Durable writes of the store: fine below a millisecond, where an SSD's fsync lies
# (`goml chaos calibrate --profile` reads its median and p99 from these buckets).
STORE_WRITE_BUCKETS_S = (
    0.0001, 0.0002, 0.0003, 0.0005, 0.0007, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.007,
    0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip
# The kinds of input the node core takes, as the simulator's CPU model charges them
# (goml.scenario.schema.Costs): an APPEND or SNAPSHOT with data, any other Raft
# message, an API call or a forwarded call's answer.
INPUT_KINDS = ("append", "message", "api_call")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.is_leader = Gauge("goml_raft_is_leader", "1 if this node leads", registry=r)
        self.term = Gauge("goml_raft_term", "Current Raft term", registry=r)
        self.commit_index = Gauge("goml_raft_commit_index", "Raft commit index", registry=r)
        self.applied_index = Gauge("goml_raft_applied_index", "Raft applied index", registry=r)
        self.apply_lag = Gauge("goml_raft_apply_lag_entries", "commit - applied", registry=r)
        self.submit_seconds = Histogram(
            "goml_submit_seconds",
            "Submit latency on the leader",
            buckets=SUBMIT_BUCKETS_S,
            registry=r,
        )
        self.tasks = Gauge("goml_tasks", "Tasks by state", ["state"], registry=r)
        self.agents = Gauge("goml_agents", "Agents by state", ["state"], registry=r)
        self.applied_commands = Counter("goml_applied_commands", "Applied commands", registry=r)
        self.leader_changes = Counter(
            "goml_raft_leader_changes", "Leaders this node has seen come (term changes)", registry=r
        )
        self.follower_lag = Gauge(
            "goml_raft_follower_lag_entries",
            "On the leader: entries each follower lacks",
            ["follower"],
            registry=r,
        )
        self.restoring = Gauge(
            "goml_raft_restoring", "1 while this node's new store is being caught up", registry=r
        )
        self.store_repairs = Counter(
            "goml_raft_store_repairs", "Peers seen with a new store (wiped or replaced)", registry=r
        )
        self.loop_stall_seconds = Histogram(
            "goml_event_loop_stall_seconds",
            "Stalls of the node's event loop over goml.stall_watch's threshold",
            buckets=(0.25, 0.5, 1.0, 2.0, 5.0, 10.0),
            registry=r,
        )
        self.healthy = Gauge("goml_node_healthy", "1 if the node reports SERVING", registry=r)
        # What `goml chaos calibrate --profile` needs to measure a deployed node's costs:
        # its process's CPU (every thread, ns resolution: CLOCK_PROCESS_CPUTIME_ID, not
        # /proc/self/stat's 10 ms ticks), its inputs by kind, its durable writes.
        self.process_cpu_seconds = Gauge(
            "goml_process_cpu_seconds", "CPU time of this node's process so far", registry=r
        )
        self.process_cpu_seconds.set_function(time.process_time)
        inputs = Counter("goml_node_inputs", "Inputs the node core took", ["kind"], registry=r)
        self.inputs = {kind: inputs.labels(kind=kind) for kind in INPUT_KINDS}
        self.store_write_seconds = Histogram(
            "goml_store_write_seconds",
            "Durable (fsync'd) writes of the Raft store, as the node waits for them",
            buckets=STORE_WRITE_BUCKETS_S,
            registry=r,
        )
        self._seen_leader: tuple[int, str] = (0, "")
        self._seen_repairs = 0

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def applied(self, result: ApplyResult) -> None:
        self.applied_commands.inc()

    def observe_node(self, core: NodeCore) -> None:
        raft = core.replica.raft
        if raft.leader and (raft.term, raft.leader) != self._seen_leader:
            self._seen_leader = (raft.term, raft.leader)
            self.leader_changes.inc()
        for follower, lag in core.replication_lag().items():
            self.follower_lag.labels(follower=follower).set(lag)
        self.restoring.set(1 if raft.restoring else 0)
        if raft.repairs > self._seen_repairs:
            self.store_repairs.inc(raft.repairs - self._seen_repairs)
            self._seen_repairs = raft.repairs
        self.healthy.set(1 if core.health()[0] else 0)
        self.is_leader.set(1 if raft.role is Role.LEADER else 0)
        self.term.set(raft.term)
        self.commit_index.set(raft.commit)
        self.applied_index.set(raft.applied)
        self.apply_lag.set(max(0, raft.commit - raft.applied))
        manifest = core.manifest
        counts = manifest.counts_by_state()
        for state in TaskState:
            self.tasks.labels(state=state.value).set(counts.get(state, 0))
        agents = manifest.list_agents()
        for agent_state in AgentState:
            self.agents.labels(state=agent_state.value).set(
                sum(1 for a in agents if a.state is agent_state)
            )
