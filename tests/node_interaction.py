"""An etcd-style interaction harness for the control-plane node core (STYLE.md, "Tests
that find bugs"), the sibling of tests/raft_interaction.py one layer up.

A command interpreter drives N `NodeCore`s over `MemoryStorage` and a manual network,
with a clock per node. Output is what the API layer decides: requests, the commands
proposed and applied (by type), replies and log lines; Raft messages are counted, not
printed (tests/testdata/raft covers them). `tests/testdata/cluster/*.txt` hold the
commands and expected output; `GOML_REWRITE=1 pytest tests/test_node_interaction.py`
regenerates it (read the diff before keeping it).

Commands:

    add-nodes <n>                       n1..n<n>, all voters
    elect <node>                        campaign, then stabilize
    campaign-start <node>               campaign, deliver nothing
    request <node> <id> <kind> [k=v]... an API request (kinds below); <id> is a number
    forget <node> <id>                  the caller of request <id> went away
    stabilize                           process every node's Ready and deliver messages
                                        until nothing moves (prints replies and applies)
    tick <node>... <ms>                 advance those nodes' clocks alone, firing every
                                        deadline due (the others hear nothing meanwhile)
    run <ms>                            advance every clock together, deadline by
                                        deadline, stabilizing after each (no latency)
    skew <node> <ms>                    that node's wall clock runs <ms> off its monotonic one
    clock <node>...                     print monotonic, wall and cluster time
    partition <node>... | <node>...     messages across the cut are lost (both ways); a
                                        forward across it fails at once (refused)
    cut <node>... > <node>...           messages from the first nodes to the others are
                                        lost (one way, a black hole): a forward across
                                        it is never answered (its deadline answers)
    heal
    crash <node> / restart <node>
    pending <node>                      requests waiting, parked polls, claimed tasks

Request kinds and their fields (defaults in brackets):

    submit fn=[matmul] args=[{}] key=<key> cpu=[1] mem=[64] priority=[0]
    get task=<id> / list [state=..] [limit=..] / cancel task=<id> / status [local]
    watch [tasks=a,b] [known=false]
    register agent=<id> [cpu=2] [mem=1024] [cloud=aws] [region=r1]
    heartbeat agent=<id> [cpu=2] [mem=1024] [running=a,b]
    lease agent=<id> [cpu=2] [mem=1024] [max=4] [wait=0]
    report agent=<id> task=<id> epoch=<n> [ok=true]
    membership kind=add-learner|promote|remove node=<id> [address=..] [wait=0]
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from goml.api.task_args import validate_args
from goml.api.types import (
    ApiError,
    ApiRequest,
    CancelRequest,
    ErrorCode,
    GetRequest,
    HeartbeatRequest,
    LeaseRequest,
    ListRequest,
    MembershipRequest,
    RegisterRequest,
    ReportRequest,
    Resources,
    StatusRequest,
    SubmitRequest,
    TaskRequest,
    TaskResult,
    TaskState,
    WatchRequest,
)
from goml.cluster.duties import DutiesConfig
from goml.cluster.manifest import DEFAULT_LIMITS
from goml.cluster.node_core import Forward, NodeCore, NodeCoreConfig, NodeReady, Reply
from goml.raft.replica import ReplicaConfig
from goml.raft.storage import MemoryStorage
from goml.raft.types import Config, EntryKind, Message, Role
from tests.raft_interaction import Case, InteractionError, parse_file, render_file

ELECTION_MS_MIN = 100
ELECTION_MS_MAX = 200
HEARTBEAT_MS = 20
DUTIES = DutiesConfig(
    agent_timeout_ms=10_000, election_grace_ms=10_000, lease_ms=3000, renew_before_ms=1500
)


def node_config(node_id: str, voters: tuple[str, ...]) -> NodeCoreConfig:
    raft = Config(
        node_id=node_id,
        voters=voters,
        election_timeout_ms_min=ELECTION_MS_MIN,
        election_timeout_ms_max=ELECTION_MS_MAX,
        heartbeat_interval_ms=HEARTBEAT_MS,
        inflight_messages_max=4,
        entries_per_message_max=8,
        uncommitted_entries_max=64,
        message_bytes_max=1 << 20,
    )
    return NodeCoreConfig(
        replica=ReplicaConfig(
            raft=raft,
            compact_every_entries=1000,
            proposal_bytes_max=1 << 20,
            defer_commit_only_writes=True,
        ),
        addresses=tuple((v, f"{v}.test:7000") for v in voters),
        duties=DUTIES,
        limits=DEFAULT_LIMITS,
        duties_interval_ms=100,
        request_timeout_ms=2000,
        lease_wait_ms_max=30_000,
        agent_heartbeat_interval_ms=200,
        list_limit_default=100,
        list_limit_max=1000,
        max_attempts_default=3,
        task_timeout_ms_default=60_000,
        requests_max=64,
        forward_requests=True,
        agent_lease_depth_max=4,
    )


@dataclass
class _Node:
    id: str
    config: NodeCoreConfig
    storage: MemoryStorage
    core: NodeCore | None
    clock_ms: int = 0  # monotonic
    restarts: int = 0
    wall_offset_ms: int = 0  # its wall clock is the monotonic one plus this (skew)

    @property
    def wall_ms(self) -> int:
        return self.clock_ms + self.wall_offset_ms


@dataclass
class NodeEnv:
    nodes: dict[str, _Node] = field(default_factory=dict)
    queue: list[Message] = field(default_factory=list)
    blocked: set[tuple[str, str]] = field(default_factory=set)
    out: list[str] = field(default_factory=list)
    messages: Counter[str] = field(default_factory=Counter)
    roles: dict[str, str] = field(default_factory=dict)  # node -> role/term last printed
    # Forwarded requests in flight: (leader, id there) -> (forwarding node, id there).
    forwarded: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)
    forward_ids: int = 0

    def run(self, command: str) -> str:
        self.out = []
        words = command.split()
        if not words:
            raise InteractionError("empty command")
        handler = getattr(self, "cmd_" + words[0].replace("-", "_"), None)
        if handler is None:
            raise InteractionError(f"unknown command {words[0]!r}")
        handler(words[1:])
        return "\n".join(self.out) if self.out else "ok"

    def node(self, node_id: str) -> _Node:
        if node_id not in self.nodes:
            raise InteractionError(f"unknown node {node_id!r}")
        return self.nodes[node_id]

    def core(self, node_id: str) -> NodeCore:
        core = self.node(node_id).core
        if core is None:
            raise InteractionError(f"{node_id} is down")
        return core

    # ---------------------------------------------------------------- nodes

    def cmd_add_nodes(self, args: list[str]) -> None:
        (count_text,) = args
        if self.nodes:
            raise InteractionError("add nodes once")
        voters = tuple(f"n{i + 1}" for i in range(int(count_text)))
        for node_id in voters:
            node = _Node(node_id, node_config(node_id, voters), MemoryStorage(), None)
            self.nodes[node_id] = node
            self._start(node)

    def _start(self, node: _Node) -> None:
        rng = random.Random(f"{node.id}-{node.restarts}")
        node.core = NodeCore(
            node.config, node.storage.load(), rng, validate_args, node.clock_ms, node.wall_ms
        )

    def cmd_crash(self, args: list[str]) -> None:
        for node_id in args:
            self.core(node_id)
            self.node(node_id).core = None
            self.out.append(f"{node_id}: crashed")

    def cmd_restart(self, args: list[str]) -> None:
        for node_id in args:
            node = self.node(node_id)
            if node.core is not None:
                raise InteractionError(f"{node_id} is running")
            node.restarts += 1
            self._start(node)
            self.out.append(f"{node_id}: restarted")

    def cmd_campaign_start(self, args: list[str]) -> None:
        (node_id,) = args
        self.core(node_id).replica.raft.campaign(self.node(node_id).clock_ms)
        self.out.append(f"{node_id}: {self.core(node_id).replica.raft.role.value}")

    def cmd_elect(self, args: list[str]) -> None:
        (node_id,) = args
        core = self.core(node_id)
        core.replica.raft.campaign(self.node(node_id).clock_ms)
        self._watch_roles()
        self.cmd_stabilize([])
        if not core.is_leader:
            raft = core.replica.raft
            self.out.append(f"{node_id} not elected: {raft.role.value} term {raft.term}")

    # ------------------------------------------------------------- requests

    def cmd_request(self, args: list[str]) -> None:
        if len(args) < 3:
            raise InteractionError("request <node> <id> <kind> [k=v]...")
        node_id, request_id, kind = args[0], int(args[1]), args[2]
        options = dict(a.split("=", 1) if "=" in a else (a, "true") for a in args[3:])
        request = self._request(kind, options)
        node = self.node(node_id)
        self.out.append(f"r{request_id} -> {node_id}: {kind}")
        self.core(node_id).request(request_id, request, node.clock_ms, node.wall_ms)
        self._drain_replies(node_id)

    @staticmethod
    def _resources(options: dict[str, str], cpu: str, mem: str) -> Resources:
        return Resources(float(options.pop("cpu", cpu)), int(options.pop("mem", mem)), 0)

    def _request(self, kind: str, options: dict[str, str]) -> ApiRequest:
        request: ApiRequest
        if kind == "submit":
            task = TaskRequest(
                function=options.pop("fn", "matmul"),
                args_json=options.pop("args", "{}"),
                resources=self._resources(options, "1", "64"),
                priority=int(options.pop("priority", "0")),
                max_attempts=0,
                timeout_ms=0,
                idempotency_key=options.pop("key", ""),
                cloud="",
                region="",
            )
            count = int(options.pop("n", "1"))  # n>1: as many tasks, keys <key>-<i>
            tasks = (task,)
            if count > 1:
                key = task.idempotency_key
                tasks = tuple(replace(task, idempotency_key=f"{key}-{i}") for i in range(count))
            request = SubmitRequest(tasks)
        elif kind == "get":
            request = GetRequest(options.pop("task"))
        elif kind == "list":
            state = options.pop("state", None)
            request = ListRequest(
                TaskState(state) if state else None, "", "", int(options.pop("limit", "0"))
            )
        elif kind == "cancel":
            request = CancelRequest(options.pop("task"))
        elif kind == "status":
            request = StatusRequest(options.pop("local", "false") == "true")
        elif kind == "watch":
            tasks = options.pop("tasks", "")
            known_only = options.pop("known", "false") == "true"
            request = WatchRequest(tuple(t for t in tasks.split(",") if t), known_only)
        elif kind == "register":
            request = RegisterRequest(
                options.pop("agent"),
                options.pop("cloud", "aws"),
                options.pop("region", "r1"),
                "x86_64",
                self._resources(options, "2", "1024"),
                int(options.pop("depth", "1")),
            )
        elif kind == "heartbeat":
            running = options.pop("running", "")
            queued = options.pop("queued", "")
            request = HeartbeatRequest(
                options.pop("agent"),
                self._resources(options, "2", "1024"),
                tuple(t for t in running.split(",") if t),
                tuple(t for t in queued.split(",") if t),
            )
        elif kind == "lease":
            request = LeaseRequest(
                options.pop("agent"),
                self._resources(options, "2", "1024"),
                int(options.pop("max", "4")),
                int(options.pop("wait", "0")),
            )
        elif kind == "report":
            ok = options.pop("ok", "true") == "true"
            request = ReportRequest(
                options.pop("agent"),
                options.pop("task"),
                int(options.pop("epoch")),
                ok,
                '{"done":true}' if ok else "",
                "" if ok else "it failed",
                options.pop("into", "false") == "true",
                tuple(  # more=<task>@<epoch>,...: further results of the same call, all ok
                    TaskResult(task, int(epoch), True, '{"done":true}', "")
                    for task, epoch in (
                        item.split("@") for item in options.pop("more", "").split(",") if item
                    )
                ),
            )
        elif kind == "membership":
            request = MembershipRequest(
                options.pop("kind"),
                options.pop("node"),
                options.pop("address", ""),
                int(options.pop("wait", "0")),
            )
        else:
            raise InteractionError(f"unknown request kind {kind!r}")
        if options:
            raise InteractionError(f"unknown fields {sorted(options)} for {kind}")
        return request

    def cmd_forget(self, args: list[str]) -> None:
        node_id, request_id = args
        self.core(node_id).forget(int(request_id))
        self.out.append(f"r{request_id} forgotten by {node_id}")

    # ------------------------------------------------------------ the world

    def _watch_roles(self) -> None:
        for node_id, node in self.nodes.items():
            core = node.core
            if core is None:
                continue
            raft = core.replica.raft
            now = f"{raft.role.value}/{raft.term}"
            if self.roles.get(node_id) != now:
                if raft.role is Role.LEADER:
                    self.out.append(f"{node_id} leads term {raft.term}")
                self.roles[node_id] = now

    def process_ready(self, node_id: str) -> bool:
        node = self.node(node_id)
        core = node.core
        if core is None:
            return False
        worked = False
        for _ in range(100):
            if not core.has_ready():
                return worked
            worked = True
            ready = core.ready()
            self._print_replies(node_id, ready.replies)
            for log in ready.logs:
                if log.level != "INFO":  # INFO lines repeat the replies printed above
                    self.out.append(f"{node_id} log {log.level}: {log.text}")
            self._persist(node, ready)
            for message in ready.messages:
                self.messages[message.type.name] += 1
                if (message.source, message.target) not in self.blocked:
                    self.queue.append(message)
            core.advance(ready)
            for forward in ready.forwards:  # after advance: an answer is an input
                self._forward(node_id, forward)
            for result in core.last_applied:
                status = "ok" if result.ok else f"{result.code}: {result.message}"
                self.out.append(f"{node_id} applied {result.index} {result.command} {status}")
                for item in result.items:  # a batch: each item's own outcome
                    detail = "" if item.code == "OK" else f": {item.message}"
                    self.out.append(f"  {item.task_id} {item.code}{detail}")
        raise AssertionError(f"{node_id}: ready() never runs dry")

    def _persist(self, node: _Node, ready: NodeReady) -> None:
        if ready.compacted is not None:
            node.storage.compact(ready.compacted)
        node.storage.persist(ready.snapshot, ready.entries, ready.hard_state, ready.must_sync)
        for entry in ready.entries:
            if entry.kind is EntryKind.NORMAL and self._leads(node.id):
                kind = json.loads(entry.data)["type"]
                self.out.append(f"{node.id} proposed {entry.index}/{entry.term} {kind}")

    def _leads(self, node_id: str) -> bool:
        core = self.nodes[node_id].core
        return core is not None and core.is_leader

    def _drain_replies(self, node_id: str) -> None:
        self.process_ready(node_id)

    def _print_replies(self, node_id: str, replies: tuple[Reply, ...]) -> None:
        for reply in replies:
            back = self.forwarded.pop((node_id, reply.request_id), None)
            if back is not None:  # the leader's answer to a forwarded request
                source, source_id = back
                self.out.append(f"fwd r{source_id} <- {node_id}: {format_reply(reply)}")
                outcome = reply.error if reply.error is not None else reply.response
                assert outcome is not None
                source_node = self.nodes[source]
                if source_node.core is not None:
                    source_node.core.forwarded(
                        source_id, outcome, source_node.clock_ms, source_node.wall_ms
                    )
                continue
            hint = f" (served by {reply.leader_hint})" if reply.leader_hint else ""
            self.out.append(f"r{reply.request_id} <- {node_id}: {format_reply(reply)}{hint}")

    def _forward(self, node_id: str, forward: Forward) -> None:
        """Zero latency, as every message here: the leader gets it at once."""
        self.out.append(f"fwd r{forward.request_id} {node_id} -> {forward.leader}")
        leader = self.nodes[forward.leader]
        cut = (node_id, forward.leader) in self.blocked
        if cut and (forward.leader, node_id) not in self.blocked:  # one way: a black hole
            self.out.append(f"fwd r{forward.request_id} lost (cut {node_id} > {forward.leader})")
            return
        if leader.core is None or (node_id, forward.leader) in self.blocked:
            node = self.nodes[node_id]
            assert node.core is not None
            error = ApiError(ErrorCode.UNAVAILABLE, f"{forward.leader} unreachable from {node_id}")
            node.core.forwarded(forward.request_id, error, node.clock_ms, node.wall_ms)
            return
        self.forward_ids += 1
        local_id = 1_000_000 + self.forward_ids
        self.forwarded[(forward.leader, local_id)] = (node_id, forward.request_id)
        leader.core.request(
            local_id, forward.request, leader.clock_ms, leader.wall_ms, forwarded=True
        )

    def cmd_stabilize(self, args: list[str]) -> None:
        for _ in range(1000):
            worked = False
            for node_id in self.nodes:
                worked |= self.process_ready(node_id)
            if self.queue:
                worked = True
                pending, self.queue = self.queue, []
                for node_id in self.nodes:
                    for message in pending:
                        if message.target == node_id:
                            self._deliver(message)
            self._watch_roles()
            if not worked:
                return
        raise AssertionError("stabilize never settles")

    def _deliver(self, message: Message) -> None:
        node = self.nodes[message.target]
        if node.core is None or (message.source, message.target) in self.blocked:
            return
        node.core.step(message, node.clock_ms, node.wall_ms)

    def cmd_tick(self, args: list[str]) -> None:
        ms = int(args[-1])
        for node_id in args[:-1]:
            node = self.node(node_id)
            core = self.core(node_id)
            target = node.clock_ms + ms
            for _ in range(100_000):
                deadline = core.next_deadline_ms()
                if deadline > target:
                    break
                node.clock_ms = max(node.clock_ms, deadline)
                core.tick(node.clock_ms, node.wall_ms)
                self.process_ready(node_id)
            node.clock_ms = target
            core.tick(node.clock_ms, node.wall_ms)
            self.process_ready(node_id)
        self._watch_roles()

    def cmd_run(self, args: list[str]) -> None:
        (ms_text,) = args
        live = [n for n in self.nodes.values() if n.core is not None]
        now = max(n.clock_ms for n in live)
        target = now + int(ms_text)
        for _ in range(100_000):
            due = min(n.core.next_deadline_ms() for n in live if n.core is not None)
            now = max(now, min(due, target))
            for node in live:
                assert node.core is not None
                node.clock_ms = now
                if node.core.next_deadline_ms() <= now:
                    node.core.tick(now, node.wall_ms)
            self.cmd_stabilize([])
            if now >= target:
                return
        raise AssertionError("run: deadlines never move forward")

    def cmd_skew(self, args: list[str]) -> None:
        """skew <node> <ms>: that node's wall clock is now <ms> off its monotonic clock
        (a jump when it was set before); printed with the cluster time it stamps."""
        node_id, offset = args
        node = self.node(node_id)
        node.wall_offset_ms = int(offset)
        self.out.append(f"{node_id} wall clock {node.wall_offset_ms:+d} ms")

    def cmd_clock(self, args: list[str]) -> None:
        """clock <node>...: each node's monotonic, wall and cluster time."""
        for node_id in args:
            node = self.node(node_id)
            cluster = node.core.cluster_ms if node.core is not None else "-"
            self.out.append(f"{node_id} mono {node.clock_ms} wall {node.wall_ms} cluster {cluster}")

    def cmd_partition(self, args: list[str]) -> None:
        groups = [g.split() for g in " ".join(args).split("|")]
        if len(groups) < 2:
            raise InteractionError("partition <nodes> | <nodes>")
        for i, group in enumerate(groups):
            for other in groups[i + 1 :]:
                for a in group:
                    for b in other:
                        self.blocked |= {(a, b), (b, a)}

    def cmd_cut(self, args: list[str]) -> None:
        groups = [g.split() for g in " ".join(args).split(">")]
        if len(groups) != 2 or not all(groups):
            raise InteractionError("cut <nodes> > <nodes>")
        self.blocked |= {(a, b) for a in groups[0] for b in groups[1]}

    def cmd_heal(self, args: list[str]) -> None:
        self.blocked.clear()

    def cmd_pending(self, args: list[str]) -> None:
        for node_id in args:
            core = self.core(node_id)
            stats = core.stats
            self.out.append(
                f"{node_id}: {core.pending_requests} waiting, parked {stats.polls_parked}, "
                f"woken {stats.polls_woken}, empty leases {stats.leases_empty}, "
                f"proposed {dict(sorted(stats.proposed.items()))}"
            )

    def cmd_msg_stats(self, args: list[str]) -> None:
        for kind, count in sorted(self.messages.items()):
            self.out.append(f"{kind}: {count}")
        self.messages.clear()


def format_reply(reply: Reply) -> str:
    if reply.error is not None:
        error = reply.error
        leader = f" leader={error.leader_id or '-'}" if error.code.name == "NOT_LEADER" else ""
        return f"{error.code} {error.message!r}{leader}"
    response = reply.response
    name = type(response).__name__
    fields = getattr(response, "__dataclass_fields__", {})
    parts = []
    for key in fields:
        value = getattr(response, key)
        if name == "ReportResponse" and key in ("tasks", "more") and not value:
            continue  # most reports carry no lease: their lines stay as they were
        if key in ("task", "tasks"):
            items = value if isinstance(value, tuple) else (value,)
            value = [_task_text(t) for t in items]
        elif key in ("members", "agents"):
            value = [getattr(v, "id", v) for v in value]
        parts.append(f"{key}={value}")
    return f"{name} {' '.join(parts)}".rstrip()


def _task_text(task: object) -> str:
    state = getattr(task, "state", "")
    task_id = getattr(task, "id", None) or getattr(task, "task_id", "")
    epoch = getattr(task, "epoch", 0)
    return f"{task_id}:{state}@{epoch}" if state else f"{task_id}@{epoch}"


def run_file(path: Path, rewrite: bool) -> list[str]:
    cases, trailing = parse_file(path.read_text())
    env = NodeEnv()
    problems: list[str] = []
    for case in cases:
        try:
            actual = env.run(case.command)
        except (InteractionError, AssertionError, KeyError, ValueError) as error:
            actual = f"error: {type(error).__name__}: {error}"
        if actual != case.expected:
            problems.append(
                f"{path.name}:{case.line}: {case.command}\n--- expected\n{case.expected}\n"
                f"--- actual\n{actual}"
            )
            case.expected = actual
    if rewrite and problems:
        path.write_text(render_file(cases, trailing))
    return problems


__all__ = ["Case", "NodeEnv", "run_file"]
