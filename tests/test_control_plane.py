"""The control plane end to end: real node processes (`goml node run`) on loopback with
mutual TLS, real gRPC, the real client library and CLI. No mocks.

Every cluster is started by `start_cluster`, which stops every process it started by PID
(`local.running_cluster` -> `stop_all`), also when a test fails. Waits are polling loops
with deadlines against the remote processes, never bare sleeps.

The two fault tests (kill -9 of the leader) come first and use a cluster each; the other
tests share one cluster (module scope), started after them so the two never compete for
the machine's two cores. Every test that starts processes is marked slow (they still run
by default); `-m "not slow"` keeps only the offline replay test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from goml.api.auth import Identity, Role
from goml.client import Client, ClientError, Profile
from goml.cluster import local
from goml.cluster.certs import IdentityFiles, ensure_identity, init_certs
from goml.cluster.commands import Resources, SubmitTasks, TaskSpec, encode_command
from goml.cluster.config import Duties, load_node_config, write_node_config
from goml.cluster.inspect import STORE_FILE, read_store, replay_cluster, replay_store
from goml.cluster.manifest import Manifest
from goml.proto import api_pb2, api_pb2_grpc
from goml.raft.sqlite_store import SqliteStorage, StoreLocked
from goml.raft.types import Entry, EntryKind, HardState

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
LEADER_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 5.0
# Short leases so the shared cluster can show a lease expiring and the task re-leased.
SHORT_LEASES = Duties(
    agent_timeout_ms=5000, election_grace_ms=5000, lease_ms=1500, renew_before_ms=500
)


def wait_until(predicate: Callable[[], T | None], timeout_s: float, what: str) -> T:
    """Poll a remote process until `predicate` returns something truthy (errors count as
    "not yet"); fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last_error = ""
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (ClientError, grpc.RpcError, OSError) as error:
            last_error = repr(error)
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what} {last_error}")
        time.sleep(0.05)  # polling a remote process: nothing local to wait on


@dataclass
class LocalCluster:
    layout: local.LocalLayout
    processes: list[local.Process]  # the list running_cluster stops on exit
    client: Client

    @property
    def profile(self) -> Profile:
        return self.layout.profile

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.profile.token}"),)

    def names(self) -> list[str]:
        return sorted(self.layout.node_configs)

    def data_dirs(self) -> dict[str, Path]:
        return {
            name: load_node_config(path).data_dir
            for name, path in sorted(self.layout.node_configs.items())
        }

    def process(self, name: str) -> local.Process:
        (found,) = [p for p in self.processes if p.name == name]
        return found

    def leader(self, client: Client | None = None, not_in: tuple[str, ...] = ()) -> str:
        """Wait until the cluster names a leader outside `not_in`."""
        client = client or self.client

        def elected() -> str | None:
            leader = client.status().leader_id
            return leader if leader and leader not in not_in else None

        return wait_until(elected, LEADER_TIMEOUT_S, f"a leader not in {not_in}")

    def kill(self, name: str) -> None:
        process = self.process(name)
        os.kill(process.popen.pid, signal.SIGKILL)
        process.popen.wait(timeout=10)

    def restart(self, name: str) -> None:
        position = self.processes.index(self.process(name))
        assert self.processes[position].popen.poll() is not None, f"{name} still runs"
        self.processes[position] = local.spawn(
            name,
            local.node_argv(self.layout.node_configs[name]),
            self.layout.data_dir / "logs" / f"{name}.log",
        )

    def stop(self) -> dict[str, int | None]:
        """Stop every node cleanly (SIGTERM by PID); return their exit codes."""
        local.stop_all(self.processes)
        return {p.name: p.popen.returncode for p in self.processes}

    @contextlib.contextmanager
    def channel(self, node_id: str) -> Iterator[grpc.Channel]:
        credentials = self.profile.channel_credentials()
        assert credentials is not None
        channel = grpc.secure_channel(self.profile.nodes[node_id], credentials)
        try:
            yield channel
        finally:
            channel.close()


@contextlib.contextmanager
def start_cluster(data_dir: Path, duties: Duties | None = None) -> Iterator[LocalCluster]:
    """A 3-node TLS cluster in `data_dir`, started and led; every process stopped on exit."""
    layout = local.prepare(data_dir, 3, insecure=False)
    if duties is not None:
        for path in layout.node_configs.values():
            write_node_config(path, load_node_config(path).model_copy(update={"duties": duties}))
    with local.running_cluster(layout) as processes:
        client = Client(layout.profile, call_timeout_s=CALL_TIMEOUT_S, retry_s=30.0)
        try:
            cluster = LocalCluster(layout, processes, client)
            cluster.leader()
            yield cluster
        finally:
            client.close()
            print_log_tails(layout.data_dir / "logs")


def print_log_tails(logs_dir: Path, lines: int = 60) -> None:
    """The end of every node's log, on stdout: pytest shows it when the test failed (a
    flaky failover test is then explained by the nodes' own words), hides it otherwise."""
    for path in sorted(logs_dir.glob("*.log")):
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        print(f"--- {path.name} (last {len(tail)} lines)", *tail, sep="\n")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with start_cluster(tmp_path / "cluster") as running:
        yield running


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with start_cluster(tmp_path_factory.mktemp("shared"), SHORT_LEASES) as running:
        yield running


def wait_caught_up(cluster: LocalCluster, names: list[str]) -> None:
    """Wait until every node in `names` has applied the leader's commit index."""
    with Client(cluster.profile, call_timeout_s=2.0, retry_s=10.0) as fresh:  # fresh channels
        target = fresh.status().commit_index
        for name in names:

            def applied(name: str = name) -> bool:
                status = fresh.status(name)
                (me,) = [m for m in status.members if m.id == name]
                return me.applied_index >= target

            wait_until(applied, 30.0, f"{name} to apply index {target}")


def health_of(cluster: LocalCluster, name: str) -> int:
    with cluster.channel(name) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[no-untyped-call]
            health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT_S
        )
    return int(answer.status)


def all_tasks(manifest: Manifest) -> list[tuple[str, str]]:
    """(task id, idempotency key) of every task in a replayed manifest."""
    return [(t.id, t.idempotency_key) for t in manifest.list_tasks(limit=manifest.limits.tasks_max)]


def check_replicas(manifests: dict[str, Manifest], acknowledged: dict[str, str]) -> None:
    """Every acknowledged (key -> id) present on every replica, no key mapped twice."""
    for name, manifest in manifests.items():
        tasks = all_tasks(manifest)
        keys = [key for _, key in tasks]
        duplicated = sorted({k for k in keys if keys.count(k) > 1})
        assert not duplicated, f"{name}: idempotency keys mapped to two tasks: {duplicated}"
        ids = dict(tasks)
        missing = sorted(i for i in acknowledged.values() if i not in ids)
        assert not missing, f"{name}: acknowledged tasks missing: {missing[:10]}"
        for key, task_id in acknowledged.items():
            assert ids[task_id] == key, (name, task_id, key)
            assert manifest.task_id_for_key(key) == task_id, (name, key)


def agent_identity(
    cluster: LocalCluster, agent_id: str
) -> tuple[IdentityFiles, grpc.ChannelCredentials]:
    """A certificate and token of the agent's own, and TLS credentials that present it."""
    certs = cluster.layout.data_dir / "certs"
    own = ensure_identity(certs, Identity(Role.AGENT, agent_id), certificate=True)
    credentials = grpc.ssl_channel_credentials(
        (certs / "ca.pem").read_bytes(), own.key.read_bytes(), own.cert.read_bytes()
    )
    return own, credentials


def spec(key: str, function: str = "matmul", args: object = None) -> api_pb2.TaskSpec:
    """A TaskSpec exactly as `Client.submit` builds it (so contents compare equal)."""
    return api_pb2.TaskSpec(
        function=function,
        args_json=json.dumps(args if args is not None else {}),
        resources=api_pb2.Resources(cpu=1.0, memory_mb=256, gpu=0),
        max_attempts=3,
        timeout_ms=60_000,
        idempotency_key=key,
    )


# ----------------------------------------------------------------- faults (own clusters)


@dataclass
class Ack:
    key: str
    task_id: str
    sent_s: float
    acked_s: float


class Submitter(threading.Thread):
    """Submits with unique keys until stopped, recording every acknowledged task."""

    def __init__(self, profile: Profile) -> None:
        super().__init__(name="submitter", daemon=True)
        self.profile = profile
        self.acks: list[Ack] = []
        self.errors: list[str] = []
        self.halt = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        with Client(self.profile, call_timeout_s=2.0, retry_s=30.0) as client:
            n = 0
            while not self.halt.is_set():
                key = f"load-{n}"
                n += 1
                sent = time.monotonic()
                try:
                    task_id = client.submit("matmul", {"n": 2}, idempotency_key=key)
                except ClientError as error:
                    with self.lock:
                        self.errors.append(f"{key}: {error}")
                    continue
                with self.lock:
                    self.acks.append(Ack(key, task_id, sent, time.monotonic()))

    def count(self) -> int:
        with self.lock:
            return len(self.acks)


@pytest.mark.slow
def test_kill_leader_under_submits_loses_nothing(cluster: LocalCluster) -> None:
    """kill -9 of the leader while a stream of submits runs: a new leader takes over, the
    submits go on, and after the killed node comes back every acknowledged task is on
    every replica's store exactly once."""
    old_leader = cluster.leader()
    submitter = Submitter(cluster.profile)
    submitter.start()
    try:
        wait_until(lambda: submitter.count() >= 30, 30.0, "30 acknowledged submits")
        killed_s = time.monotonic()
        cluster.kill(old_leader)
        acked_before_kill = submitter.count()
        with Client(cluster.profile, call_timeout_s=1.0, retry_s=10.0) as watcher:
            new_leader = cluster.leader(watcher, not_in=(old_leader,))
        assert new_leader != old_leader
        wait_until(
            lambda: submitter.count() >= acked_before_kill + 50,
            30.0,
            "50 more acknowledged submits after the kill",
        )
    finally:
        submitter.halt.set()
        submitter.join(timeout=60)
    assert not submitter.is_alive()
    assert submitter.errors == [], submitter.errors[:5]
    after_kill = [a for a in submitter.acks if a.sent_s > killed_s]
    assert after_kill, "no submit sent after the kill was acknowledged"
    failover_s = min(a.acked_s for a in after_kill) - killed_s
    assert failover_s < 10.0, f"failover took {failover_s:.2f} s"  # the promise is < 5 s

    cluster.restart(old_leader)
    wait_caught_up(cluster, cluster.names())
    exit_codes = cluster.stop()
    assert exit_codes == dict.fromkeys(cluster.names(), 0), exit_codes  # a clean stop

    acknowledged = {a.key: a.task_id for a in submitter.acks}
    assert len(set(acknowledged.values())) == len(acknowledged) == len(submitter.acks)
    manifests = replay_cluster(cluster.data_dirs())
    check_replicas(manifests, acknowledged)
    # All caught up and stopped cleanly: every replica holds the very same tasks.
    reference = all_tasks(manifests[new_leader])
    for name, manifest in manifests.items():
        assert all_tasks(manifest) == reference, name
    # After a clean stop each node's own stored commit covers what it had applied.
    for name, data_dir in cluster.data_dirs().items():
        own = replay_store(data_dir)
        assert set(all_tasks(own)) <= set(reference), name
        assert set(acknowledged.values()) <= {i for i, _ in all_tasks(own)}, name


@pytest.mark.slow
def test_retry_through_failover_never_duplicates(cluster: LocalCluster) -> None:
    """Submit with key K, kill the leader, submit K again through the client: the same
    task id, and exactly one task with key K on every replica."""
    old_leader = cluster.leader()
    first = cluster.client.submit("matmul", {"n": 3}, idempotency_key="K")
    cluster.kill(old_leader)
    again = cluster.client.submit("matmul", {"n": 3}, idempotency_key="K")
    assert again == first
    new_leader = cluster.leader(not_in=(old_leader,))
    # The new leader still knows K: different content under K is refused.
    with pytest.raises(ClientError) as refused:
        cluster.client.submit("matmul", {"n": 4}, idempotency_key="K")
    assert refused.value.code is grpc.StatusCode.ALREADY_EXISTS
    assert first in refused.value.detail
    other = cluster.client.submit("matmul", {"n": 3}, idempotency_key="K2")
    assert other != first
    survivors = [n for n in cluster.names() if n != old_leader]
    wait_caught_up(cluster, survivors)
    cluster.stop()

    # The killed node's store is read too (kill -9: its stored commit may lag; the
    # replay covers what the others committed).
    manifests = replay_cluster(cluster.data_dirs())
    assert set(manifests) == {old_leader, new_leader, *survivors}
    for name, manifest in manifests.items():
        with_k = [task_id for task_id, key in all_tasks(manifest) if key == "K"]
        assert with_k == [first], (name, with_k)
    check_replicas({n: manifests[n] for n in survivors}, {"K": first, "K2": other})


@pytest.mark.slow
def test_a_node_restarted_with_an_empty_disk_loses_no_acknowledged_task(
    cluster: LocalCluster,
) -> None:
    """Issue 11 item 1, as a user would do it: stop follower A, submit 20 tasks (all
    acknowledged, by the leader and B), stop B and delete its data directory, kill -9
    the leader, start A and B. B's new store must not count as the voter it was: A (which
    lacks the 20 tasks) is not elected with B's vote. When the old leader is back, every
    acknowledged task is there under its id, an idempotent resubmit finds it, and B is
    repaired from scratch."""
    leader = cluster.leader()
    a, b = [name for name in cluster.names() if name != leader]
    # A must have heard from the cluster (and so know B's store) before it goes down:
    # under load a node can be elected around before A ever took an entry, and then A
    # and the wiped B are two empty stores, which may elect each other (the limit in
    # RaftCore._from_live_store), and the test proves nothing.
    wait_caught_up(cluster, cluster.names())
    cluster.kill(a)
    keys = [f"amnesia-{i}" for i in range(20)]
    ids = {key: cluster.client.submit("matmul", {"n": 3}, idempotency_key=key) for key in keys}
    cluster.kill(b)
    b_dir = cluster.data_dirs()[b]
    for path in b_dir.iterdir():  # the disk is lost: every file of the store
        path.unlink()
    cluster.kill(leader)
    cluster.restart(a)
    cluster.restart(b)
    with Client(cluster.profile, call_timeout_s=1.0, retry_s=2.0) as probe:

        def someone_leads() -> str | None:
            for name in (a, b):
                with contextlib.suppress(ClientError):
                    status = probe.status(name)
                    if status.leader_id:
                        return f"{name} sees leader {status.leader_id}"
            return None

        # Elections take well under a second here: several election rounds pass in 4 s.
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            assert someone_leads() is None, "a leader was elected without the 20 tasks"
            time.sleep(0.1)  # polling two remote processes for the whole window
    # Health says so: neither node is a working member now (issue 11 item 3).
    for name in (a, b):
        assert health_of(cluster, name) == health_pb2.HealthCheckResponse.NOT_SERVING, name
    cluster.restart(leader)
    cluster.leader()
    for name in cluster.names():
        wait_until(
            lambda name=name: health_of(cluster, name) == health_pb2.HealthCheckResponse.SERVING,
            30.0,
            f"{name} to report SERVING",
        )
    for key, task_id in ids.items():
        assert cluster.client.get(task_id).spec.idempotency_key == key
        assert cluster.client.submit("matmul", {"n": 3}, idempotency_key=key) == task_id
    wait_caught_up(cluster, cluster.names())  # B repaired: it applied everything
    cluster.stop()
    manifests = replay_cluster(cluster.data_dirs())
    check_replicas(manifests, ids)


# ------------------------------------------------------------- the shared cluster


@pytest.mark.slow
def test_agent_lease_report_and_epoch_fencing(shared: LocalCluster) -> None:
    """An agent over the real AgentService (mTLS, token): register, heartbeat, lease,
    report; a repeated report and a report from an expired, re-leased epoch are refused,
    so no result is recorded twice."""
    client = shared.client
    capacity = api_pb2.Resources(cpu=4.0, memory_mb=4096, gpu=0)
    agent_id = "agent-flow"
    # Its own identity: a client's credentials may not act as an agent (goml.api.auth).
    own, credentials = agent_identity(shared, agent_id)
    address = shared.profile.nodes[shared.leader()]
    with grpc.secure_channel(address, credentials) as channel:
        agent = api_pb2_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call]
        md = (("authorization", f"Bearer {own.read_token()}"),)
        registered = agent.Register(
            api_pb2.RegisterRequest(
                agent_id=agent_id, cloud="local", region="lab", arch="x86_64", capacity=capacity
            ),
            metadata=md,
            timeout=CALL_TIMEOUT_S,
        )
        assert registered.heartbeat_interval_ms > 0

        def heartbeat() -> bool:
            response = agent.Heartbeat(
                api_pb2.HeartbeatRequest(agent_id=agent_id, free=capacity),
                metadata=md,
                timeout=CALL_TIMEOUT_S,
            )
            return bool(response.known)

        def lease() -> api_pb2.LeasedTask:
            response = agent.Lease(
                api_pb2.LeaseRequest(agent_id=agent_id, free=capacity, max_tasks=1, wait_ms=5000),
                metadata=md,
                timeout=CALL_TIMEOUT_S + 5,
            )
            assert len(response.tasks) == 1, response
            leased: api_pb2.LeasedTask = response.tasks[0]
            return leased

        def report(task_id: str, epoch: int, result: object) -> api_pb2.ReportResponse:
            response: api_pb2.ReportResponse = agent.Report(
                api_pb2.ReportRequest(
                    agent_id=agent_id,
                    task_id=task_id,
                    epoch=epoch,
                    success=True,
                    result_json=json.dumps(result),
                ),
                metadata=md,
                timeout=CALL_TIMEOUT_S,
            )
            return response

        assert heartbeat()
        status = client.status()
        assert agent_id in [a.id for a in status.agents]

        # Lease and report: SUCCEEDED with the result; the same report again is refused.
        task_a = client.submit("matmul", {"n": 4}, priority=100, idempotency_key="flow-a")
        leased = lease()
        assert (leased.task_id, leased.function, leased.epoch) == (task_a, "matmul", 1)
        assert json.loads(leased.args_json) == {"n": 4}
        got = client.get(task_a)
        assert (got.state, got.agent_id, got.epoch) == (api_pb2.LEASED, agent_id, 1)
        assert report(task_a, leased.epoch, {"trace": 1.5}).recorded
        got = client.get(task_a)
        assert got.state == api_pb2.SUCCEEDED
        assert json.loads(got.result_json) == {"trace": 1.5}
        assert got.finished_ms >= got.submitted_ms > 0
        twice = report(task_a, leased.epoch, {"trace": 2.5})
        assert not twice.recorded
        assert task_a in twice.reason and "SUCCEEDED" in twice.reason
        assert json.loads(client.get(task_a).result_json) == {"trace": 1.5}

        # A lease that expires (no heartbeat names the task, so it is never renewed):
        # the task is requeued, leased again at a higher epoch; the old epoch is fenced.
        task_b = client.submit("matmul", {"n": 8}, priority=100, idempotency_key="flow-b")
        first = lease()
        assert first.task_id == task_b

        def requeued() -> api_pb2.Task | None:
            assert heartbeat()  # the agent stays alive; only its lease runs out
            task = client.get(task_b)
            return task if task.state == api_pb2.PENDING else None

        pending = wait_until(requeued, 20.0, f"the lease of {task_b} to expire")
        assert pending.epoch > first.epoch and pending.attempts == 1
        assert "lease expired" in pending.error
        second = lease()
        assert second.task_id == task_b and second.epoch > pending.epoch
        stale = report(task_b, first.epoch, {"from": "expired lease"})
        assert not stale.recorded
        assert f"epoch {first.epoch} refused" in stale.reason
        assert report(task_b, second.epoch, {"from": "current lease"}).recorded
        assert not report(task_b, first.epoch, {"from": "expired lease"}).recorded
        done = client.get(task_b)
        assert done.state == api_pb2.SUCCEEDED and done.attempts == 2
        assert json.loads(done.result_json) == {"from": "current lease"}


@pytest.mark.slow
@pytest.mark.parametrize("via", ["leader", "follower"])
def test_a_parked_lease_poll_keeps_an_idle_agent_alive_until_its_caller_goes(
    shared: LocalCluster, via: str
) -> None:
    """An idle agent sends no heartbeats while its lease poll is parked (goml.agent.core):
    the leader counts the poll as one for as long as it holds it. Once the caller goes
    (its call cancelled, as a dead agent's closed connection does), the agent is marked
    DOWN within agent_timeout_ms, as if its heartbeats had stopped. Through a follower,
    the poll is forwarded to the leader and held there: the caller's cancellation
    cancels the forward too."""
    client = shared.client
    timeout_s = SHORT_LEASES.agent_timeout_ms / 1000
    agent_id = f"agent-parked-{via}"
    own, credentials = agent_identity(shared, agent_id)
    capacity = api_pb2.Resources(cpu=1.0, memory_mb=256, gpu=0)

    def state() -> str:
        return {a.id: a.state for a in client.status().agents}.get(agent_id, "")

    leader = shared.leader()
    node = (
        leader if via == "leader" else next(n for n in sorted(shared.profile.nodes) if n != leader)
    )
    with grpc.secure_channel(shared.profile.nodes[node], credentials) as channel:
        agent = api_pb2_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call]
        md = (("authorization", f"Bearer {own.read_token()}"),)
        agent.Register(
            api_pb2.RegisterRequest(
                agent_id=agent_id, cloud="local", region="lab", arch="x86_64", capacity=capacity
            ),
            metadata=md,
            timeout=CALL_TIMEOUT_S,
        )
        wait_until(lambda: state() == "ALIVE" or None, 10.0, f"{agent_id} ALIVE")
        poll = agent.Lease.future(
            api_pb2.LeaseRequest(agent_id=agent_id, free=capacity, max_tasks=1, wait_ms=30_000),
            metadata=md,
            timeout=60.0,
        )
        # Parked for twice the agent timeout with no heartbeat: still ALIVE throughout.
        window_end = time.monotonic() + 2 * timeout_s
        while time.monotonic() < window_end:
            assert state() == "ALIVE", "an agent with a parked poll was marked down"
            time.sleep(0.2)  # sampling a remote state over a window, not a sync
        assert not poll.done(), "the poll was answered: nothing held it parked"
        poll.cancel()
        cancelled = time.monotonic()
        wait_until(lambda: state() == "DOWN" or None, timeout_s + 5.0, f"{agent_id} DOWN")
        took = time.monotonic() - cancelled
    # Marked down one agent timeout after the poll went (plus a duties round and a
    # commit), not after the poll's 30 s wait.
    assert timeout_s - 0.5 <= took <= timeout_s + 3.0, took


@pytest.mark.slow
def test_idempotent_submit(shared: LocalCluster) -> None:
    """Same key + same content: the same task; same key + other content: ALREADY_EXISTS;
    a batch is all or nothing."""
    client = shared.client
    first = client.submit("matmul", {"n": 4}, idempotency_key="idem-1")
    assert client.submit("matmul", {"n": 4}, idempotency_key="idem-1") == first
    # Equal JSON spelled differently is the same content.
    respelled = spec("idem-1", args={"n": 4})
    respelled.args_json = '{ "n" :  4 }'
    assert client.submit_specs([respelled]) == [first]

    with pytest.raises(ClientError) as conflict:
        client.submit("matmul", {"n": 5}, idempotency_key="idem-1")
    assert conflict.value.code is grpc.StatusCode.ALREADY_EXISTS
    assert "'idem-1'" in conflict.value.detail and first in conflict.value.detail
    assert "different content" in conflict.value.detail

    before = {t.id for t in client.list_tasks()}
    with pytest.raises(ClientError) as batch:
        client.submit_specs([spec("idem-batch-new", args={"n": 2}), spec("idem-1", args={"n": 6})])
    assert batch.value.code is grpc.StatusCode.ALREADY_EXISTS
    assert "tasks[1]" in batch.value.detail
    assert {t.id for t in client.list_tasks()} == before  # the new key was not created

    # Within one batch: a repeated key with the same content is one task.
    ids = client.submit_specs(
        [
            spec("idem-batch-new", args={"n": 2}),
            spec("idem-1", args={"n": 4}),
            spec("idem-batch-new", args={"n": 2}),
        ]
    )
    assert ids[1] == first and ids[0] == ids[2] and ids[0] not in before
    assert {t.id for t in client.list_tasks()} == before | {ids[0]}
    with pytest.raises(ClientError) as inside:
        client.submit_specs([spec("idem-dup", args={"n": 2}), spec("idem-dup", args={"n": 3})])
    assert inside.value.code is grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.slow
def test_bad_input_is_refused_clearly_and_changes_nothing(
    shared: LocalCluster, tmp_path: Path
) -> None:
    client = shared.client
    before = sorted(t.id for t in client.list_tasks())

    def refused(specs: list[api_pb2.TaskSpec], code: grpc.StatusCode, *parts: str) -> None:
        with pytest.raises(ClientError) as error:
            client.submit_specs(specs)
        assert error.value.code is code, error.value
        for part in parts:
            assert part in error.value.detail, (part, error.value.detail)

    refused(
        [spec("bad-fn", function="no_such_function")],
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown task function 'no_such_function'",
        "known: ",
        "matmul",
    )
    not_json = spec("bad-json")
    not_json.args_json = "{n: 4"
    refused([not_json], grpc.StatusCode.INVALID_ARGUMENT, "tasks[0]", "not JSON")
    refused(
        [spec("bad-args", args={"n": "big", "colour": 1})],
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid args for task function 'matmul'",
        "colour",
    )
    # Over the manifest's args_bytes_max (64 KiB): valid args, 12 bytes of JSON per emoji.
    big = {"message": "\U0001f600" * 10_000}
    refused(
        [spec("bad-big", function="fail", args=big)],
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "args_json",
        "args_bytes_max=65536",
    )
    # Padding that canonical JSON would drop still counts: the client sent it.
    padded = spec("bad-padded", args={"n": 4})
    padded.args_json = '{"n": 4' + " " * 70_000 + "}"
    refused([padded], grpc.StatusCode.RESOURCE_EXHAUSTED, "args_bytes_max=65536")
    # A batch of tasks each under the limit, together over what one proposal may carry.
    many = [
        spec(f"bad-many-{i}", function="fail", args={"message": "\U0001f600" * 4000})
        for i in range(30)
    ]
    refused(many, grpc.StatusCode.RESOURCE_EXHAUSTED, "bytes", "split the batch")
    refused([], grpc.StatusCode.INVALID_ARGUMENT, "empty submit")
    no_key = spec("")
    no_key.idempotency_key = ""
    request = api_pb2.SubmitRequest(tasks=[no_key])

    leader = shared.leader()
    with shared.channel(leader) as channel:
        stub = api_pb2_grpc.ClientStub(channel)  # type: ignore[no-untyped-call]
        for metadata, message in [
            ((), "missing token"),
            ((("authorization", "Bearer not-the-token"),), "wrong token"),
        ]:
            with pytest.raises(grpc.RpcError) as unauthenticated:
                stub.Submit(
                    api_pb2.SubmitRequest(tasks=[spec("bad-token")]),
                    metadata=metadata,
                    timeout=CALL_TIMEOUT_S,
                )
            assert unauthenticated.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert message in (unauthenticated.value.details() or "")
        with pytest.raises(grpc.RpcError) as keyless:
            stub.Submit(request, metadata=shared.metadata, timeout=CALL_TIMEOUT_S)
        assert keyless.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "idempotency_key: required" in (keyless.value.details() or "")

    # Certificates from another CA: the TLS handshake fails, nothing reaches a service.
    other = tmp_path / "other-ca"
    init_certs(other, ["x"], ["127.0.0.1", "localhost"])
    certs = shared.layout.data_dir / "certs"
    address = shared.profile.nodes[leader]
    for root, chain, key in [
        (other / "ca.pem", other / "client.pem", other / "client.key"),  # all foreign
        (certs / "ca.pem", other / "client.pem", other / "client.key"),  # foreign client cert
    ]:
        credentials = grpc.ssl_channel_credentials(
            root.read_bytes(), key.read_bytes(), chain.read_bytes()
        )
        with grpc.secure_channel(address, credentials) as foreign:
            stub = api_pb2_grpc.ClientStub(foreign)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.RpcError) as handshake:
                stub.Submit(
                    api_pb2.SubmitRequest(tasks=[spec("bad-ca")]),
                    metadata=shared.metadata,
                    timeout=CALL_TIMEOUT_S,
                )
            assert handshake.value.code() is grpc.StatusCode.UNAVAILABLE, handshake.value
    foreign_profile = Profile(
        nodes=shared.profile.nodes,
        token=shared.profile.token,
        ca=other / "ca.pem",
        cert=other / "client.pem",
        key=other / "client.key",
    )
    with Client(foreign_profile, call_timeout_s=1.0, retry_s=2.0) as foreign_client:
        with pytest.raises(ClientError) as unreachable:
            foreign_client.status()
        assert unreachable.value.code is grpc.StatusCode.UNAVAILABLE

    after = sorted(t.id for t in client.list_tasks())
    assert after == before
    assert not [t for t in client.list_tasks() if t.spec.idempotency_key.startswith("bad-")]


def run_cli(profile_path: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "GOML_PROFILE": str(profile_path), "COLUMNS": "200"}
    return subprocess.Popen(
        [sys.executable, "-m", "goml", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(popen: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = popen.communicate(timeout=60)
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()
    return popen.returncode, out, err


@pytest.mark.slow
def test_cli_status_submit_wait_get_list(shared: LocalCluster) -> None:
    profile = shared.layout.data_dir / "profile.json"
    assert Profile.load(profile) == shared.profile
    # Independent commands run side by side (each pays Python's start-up).
    status = run_cli(profile, "status")
    submitted = run_cli(profile, "submit", "matmul", "--args", '{"n": 4}', "--key", "cli-1")
    waited = run_cli(
        profile,
        "submit",
        "matmul",
        "--args",
        '{"n": 5}',
        "--key",
        "cli-2",
        "--wait",
        "--wait-s",
        "1",
    )
    missing = run_cli(profile, "task", "get", "t-999999-0")
    unknown = run_cli(profile, "submit", "no_such_function")

    code, out, err = finish(status)
    assert code == 0, err
    leader = shared.leader()
    assert f"leader {leader}" in out
    for name in shared.names():
        assert name in out and shared.profile.nodes[name] in out
    assert "PENDING" in out and "follower" in out

    code, out, err = finish(submitted)
    assert code == 0, err
    task_id = out.strip()
    assert task_id == shared.client.submit("matmul", {"n": 4}, idempotency_key="cli-1")

    code, out, err = finish(waited)
    assert code != 0
    assert out.strip().startswith("t-")  # the id is printed before waiting
    assert "error: timed out after 1 s waiting for task" in err and "PENDING" in err, err

    code, out, err = finish(missing)
    assert code != 0 and "NOT_FOUND" in err and "t-999999-0" in err, err
    code, out, err = finish(unknown)
    assert code != 0 and "unknown task function 'no_such_function'" in err, err

    got = run_cli(profile, "task", "get", task_id)
    listed = run_cli(profile, "task", "list", "--state", "pending")
    code, out, err = finish(got)
    assert code == 0, err
    body = json.loads(out)
    assert body["id"] == task_id and body["state"] == "PENDING"
    assert body["spec"]["function"] == "matmul" and body["spec"]["idempotency_key"] == "cli-1"
    code, out, err = finish(listed)
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith(f"{task_id} "))
    assert "PENDING" in line and "matmul" in line


@pytest.mark.slow
def test_health_and_reflection(shared: LocalCluster) -> None:
    for name in shared.names():
        with shared.channel(name) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT_S)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, name
    with shared.channel(shared.names()[0]) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"goml.api.v1.Client", "goml.api.v1.AgentService", "grpc.health.v1.Health"} <= (
            services
        )
        pool = DescriptorPool(database)
        methods = {m.name for m in pool.FindServiceByName("goml.api.v1.Client").methods}
        assert {"Submit", "Get", "List", "Watch", "Cancel", "Status"} <= methods


@pytest.mark.slow
def test_prometheus_metrics(shared: LocalCluster) -> None:
    shared.client.submit("matmul", {"n": 4}, idempotency_key="metrics-1")
    leader = shared.leader()
    address = load_node_config(shared.layout.node_configs[leader]).metrics_listen
    assert address

    def scrape() -> str | None:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
            text: str = response.read().decode()
        return text if 'goml_tasks{state="PENDING"}' in text else None

    text = wait_until(scrape, 10.0, "goml_tasks in the leader's metrics")
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values["goml_raft_term"] >= 1
    assert values["goml_raft_is_leader"] == 1
    assert values['goml_tasks{state="PENDING"}'] >= 1
    assert 'goml_submit_seconds_bucket{le="0.5"}' in values
    assert values["goml_submit_seconds_count"] >= 1  # the submit above went through it


@pytest.mark.slow
def test_replay_store_refuses_a_running_node(shared: LocalCluster, tmp_path: Path) -> None:
    """A live node holds its store's lock: inspecting it is refused, never racy."""
    data_dir = next(iter(shared.data_dirs().values()))
    with pytest.raises(StoreLocked):
        read_store(data_dir)
    with pytest.raises(FileNotFoundError):
        replay_store(tmp_path)


def _submit_entry(index: int, term: int, key: str) -> Entry:
    command = SubmitTasks(
        1000 + index,
        (TaskSpec(key, "matmul", "{}", Resources(1.0, 256, 0), 0, 3, 60_000, None, None),),
    )
    return Entry(index=index, term=term, kind=EntryKind.NORMAL, data=encode_command(command))


def _write_store(data_dir: Path, entries: list[Entry], commit: int) -> Path:
    data_dir.mkdir(parents=True)
    with SqliteStorage(data_dir / STORE_FILE) as storage:
        storage.persist(None, tuple(entries), HardState(term=2, vote="", commit=commit), True)
    return data_dir


def test_replay_cluster_uses_the_highest_commit_and_log_matching(tmp_path: Path) -> None:
    """Offline, no processes: a node whose stored commit lags (deferred commit write,
    kill -9) still shows the committed tasks it holds; a deposed leader's uncommitted
    entry at a committed index is never applied."""
    noop = Entry(index=1, term=1, kind=EntryKind.NOOP)
    a1, a2 = _submit_entry(2, 1, "a"), _submit_entry(3, 1, "b")
    stale = _submit_entry(3, 1, "b")  # same term: identical to the committed one
    divergent = Entry(index=3, term=2, kind=EntryKind.NORMAL, data=a2.data.replace(b'"b"', b'"x"'))
    dirs = {
        "lagging": _write_store(tmp_path / "lagging", [noop, a1, stale], commit=1),
        "leader": _write_store(tmp_path / "leader", [noop, a1, a2], commit=3),
        "deposed": _write_store(tmp_path / "deposed", [noop, a1, divergent], commit=2),
    }
    # Each store alone: its own commit only, or everything with replay_all_entries.
    assert all_tasks(replay_store(dirs["lagging"])) == []
    assert all_tasks(replay_store(dirs["lagging"], replay_all_entries=True)) == [
        ("t-2-0", "a"),
        ("t-3-0", "b"),
    ]
    assert [k for _, k in all_tasks(replay_store(dirs["deposed"], replay_all_entries=True))] == [
        "a",
        "x",
    ]
    manifests = replay_cluster(dirs)
    assert all_tasks(manifests["leader"]) == [("t-2-0", "a"), ("t-3-0", "b")]
    assert all_tasks(manifests["lagging"]) == [("t-2-0", "a"), ("t-3-0", "b")]
    assert all_tasks(manifests["deposed"]) == [("t-2-0", "a")]  # "x" was never committed
    check_replicas({n: manifests[n] for n in ("leader", "lagging")}, {"a": "t-2-0", "b": "t-3-0"})
