"""Retention (issue 12): finished tasks leave the manifest, `goml task export` archives
them first, `List` pages, large results are refused with a clear error.

Three layers, each against the real thing at that layer:
  * the manifest and the duties (sans-IO): PruneTasks, AckExport, SetLimits, tombstones,
    the finish order, snapshots of every format, the retention rules one by one;
  * one node core over MemoryStorage: the snapshot a compaction writes before and after
    pruning (the figure printed is what a follower catching up would be sent);
  * a real 3-node TLS cluster with 2 real agents (`goml node run`, `goml agent run`) and
    the real CLI: tasks_max 200, 10x that many submits over its life, stays under its
    limits, and every task submitted is in the manifest or in exactly one export file.

Processes are started through `local.running_cluster` and stopped by PID on exit, also
on failure. Waits poll the remote processes with deadlines.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from goml.api.auth import Identity, Role, authorize
from goml.api.task_args import validate_args
from goml.api.types import (
    AckExportRequest,
    ApiError,
    ApiRequest,
    ApiResponse,
    GetRequest,
    LeaseRequest,
    LeaseResponse,
    ListRequest,
    ListResponse,
    Method,
    RegisterRequest,
    ReportRequest,
    Resources,
    SubmitRequest,
    TaskRequest,
    TaskState,
)
from goml.client import TERMINAL_STATES, Client, ClientError, Profile
from goml.cluster import local
from goml.cluster.commands import (
    AckExport,
    CancelTask,
    Command,
    CommandError,
    LeaseTasks,
    PruneTasks,
    RegisterAgent,
    Report,
    ReportResults,
    SetLimits,
    SubmitTasks,
    TaskSpec,
    decode_command,
    encode_command,
)
from goml.cluster.config import Duties, load_node_config, write_node_config
from goml.cluster.duties import (
    DEFAULT_RETENTION,
    LeaderDuties,
    RetentionConfig,
    prune_due,
)
from goml.cluster.inspect import replay_cluster
from goml.cluster.manifest import (
    DEFAULT_LIMITS,
    ApplyResult,
    Code,
    Manifest,
    ManifestLimits,
)
from goml.cluster.node_core import NodeCore, Reply
from goml.cluster.paging import PageTokenError, list_page
from goml.proto import api_pb2
from goml.raft.storage import MemoryStorage
from tests.node_interaction import DUTIES, node_config

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent

LIMITS = dataclasses.replace(DEFAULT_LIMITS, tasks_max=40, batch_tasks_max=10)
CAPACITY = Resources(cpu=64.0, memory_mb=65_536, gpu=0)
TINY = Resources(cpu=0.01, memory_mb=1, gpu=0)
DAY_MS = 24 * 3600 * 1000


def retention(**changes: object) -> RetentionConfig:
    """A retention that prunes nothing unless a test says what."""
    base = RetentionConfig(
        retention_ms=365 * DAY_MS,
        finished_tasks_max=1_000_000,
        finished_bytes_max=1 << 40,
        prune_tasks_max=1000,
        tombstone_ms=DAY_MS,
        tombstones_max=1_000_000,
        require_export=False,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def spec(key: str, args_json: str = '{"n":2}') -> TaskSpec:
    return TaskSpec(
        idempotency_key=key,
        function="matmul",
        args_json=args_json,
        resources=TINY,
        priority=0,
        max_attempts=1,
        timeout_ms=60_000,
        cloud=None,
        region=None,
    )


class Log:
    """A manifest fed as Raft feeds it: encoded commands at increasing indexes."""

    def __init__(self, limits: ManifestLimits = LIMITS) -> None:
        self.m = Manifest(limits)
        self.index = 0
        self.keys = 0
        self.now_ms = 1_000

    def run(self, command: Command) -> ApplyResult:
        self.index += 1
        return self.m.apply(self.index, encode_command(command))

    def ok(self, command: Command) -> ApplyResult:
        result = self.run(command)
        assert result.ok, result
        return result

    def submit(self, count: int) -> list[str]:
        specs = []
        for _ in range(count):
            self.keys += 1
            specs.append(spec(f"k{self.keys}"))
        return list(self.ok(SubmitTasks(self.now_ms, tuple(specs))).task_ids)

    def finish(self, task_ids: list[str], result_json: str = '{"ok":1}') -> None:
        """Lease and succeed every one of `task_ids` (in the order given)."""
        self.ok(RegisterAgent(self.now_ms, "a1", "aws", "r1", "amd64", CAPACITY))
        leased = self.ok(LeaseTasks(self.now_ms, "a1", 60_000, len(task_ids), CAPACITY))
        epochs = {t.id: t.epoch for t in leased.tasks}
        assert set(epochs) >= set(task_ids), (epochs, task_ids)
        reports = tuple(Report("a1", t, epochs[t], True, result_json, None) for t in task_ids)
        self.ok(ReportResults(self.now_ms, reports))

    def run_and_finish(self, count: int, result_json: str = '{"ok":1}') -> list[str]:
        ids = self.submit(count)
        self.finish(ids, result_json)
        return ids

    def finished_seqs(self) -> list[tuple[str, int | None]]:
        return [(t.id, t.finished_seq) for t in self.m.finished_tasks()]


def restored(m: Manifest) -> Manifest:
    again = Manifest.restore(m.snapshot())
    assert again.snapshot() == m.snapshot()
    return again


# ---------------------------------------------------------------- the manifest


def test_finished_seq_follows_the_order_tasks_finish_in() -> None:
    log = Log()
    a, b, c = log.submit(3)
    log.ok(CancelTask(log.now_ms, b))  # b finishes first, though submitted second
    log.finish([c, a])
    assert log.finished_seqs() == [(b, 1), (c, 2), (a, 3)]
    assert log.m.finished_seq_last == 3
    assert [t.id for t in restored(log.m).finished_tasks()] == [b, c, a]
    # An open task has none; a list in finish order shows terminal tasks only.
    (d,) = log.submit(1)
    task = log.m.get_task(d)
    assert task is not None and task.finished_seq is None
    page = log.m.list_tasks(limit=10, finished_after_seq=1)
    assert [t.id for t in page] == [c, a]


def test_prune_removes_the_oldest_finished_and_leaves_tombstones() -> None:
    log = Log()
    first = log.run_and_finish(5)
    (open_id,) = log.submit(1)
    result = log.ok(PruneTasks(log.now_ms, 3, 0))
    assert "3 finished task(s) pruned" in result.message
    assert [log.m.get_task(t) is None for t in first] == [True, True, True, False, False]
    assert log.m.get_task(open_id) is not None
    assert (log.m.pruned_through_seq, log.m.finished_count, log.m.tombstone_count) == (3, 2, 3)
    # Positions, not counts: the same command again (or proposed twice) prunes no more.
    again = log.ok(PruneTasks(log.now_ms, 3, 0))
    assert "0 finished task(s) pruned" in again.message
    assert log.m.finished_count == 2
    # The future cannot be pruned.
    refused = log.run(PruneTasks(log.now_ms, 99, 0))
    assert (refused.ok, refused.code) == (False, Code.INVALID_ARGUMENT)
    # Bytes are accounted for what is kept.
    assert log.m.finished_bytes == sum(
        len(t.args_json) + len(t.result_json or "") for t in log.m.finished_tasks()
    )
    assert restored(log.m).tombstone_count == 3


def test_a_resubmit_of_a_pruned_key_gets_its_id_back_until_the_tombstone_goes() -> None:
    log = Log()
    (task_id,) = log.run_and_finish(1)
    log.ok(PruneTasks(log.now_ms, 1, 0))
    kept = log.m.task_count
    # Same key, same content: the same id, and no second task (it will not run again).
    retry = log.ok(SubmitTasks(log.now_ms, (spec("k1"),)))
    assert retry.task_ids == (task_id,)
    assert "0 created" in retry.message
    assert log.m.task_count == kept
    # Same key, other content: refused, naming the pruned task.
    other = log.run(SubmitTasks(log.now_ms, (spec("k1", '{"n":3}'),)))
    assert other.code is Code.ALREADY_EXISTS
    assert task_id in other.message and "pruned" in other.message
    # Once the tombstone is dropped, the key is free: a resubmit is a new task.
    log.ok(PruneTasks(log.now_ms, 0, 1))
    assert log.m.tombstone("k1") is None
    fresh = log.ok(SubmitTasks(log.now_ms, (spec("k1"),)))
    assert fresh.task_ids != (task_id,)
    assert "1 created" in fresh.message


def test_export_watermark_moves_forward_only_and_never_past_what_finished() -> None:
    log = Log()
    log.run_and_finish(4)
    log.ok(AckExport(log.now_ms, 3))
    log.ok(AckExport(log.now_ms, 2))  # an older export acknowledged late
    assert log.m.export_watermark_seq == 3
    future = log.run(AckExport(log.now_ms, 5))
    assert (future.ok, future.code) == (False, Code.FAILED_PRECONDITION)
    assert "only 4 tasks have finished" in future.message
    assert restored(log.m).export_watermark_seq == 3
    with pytest.raises(CommandError):
        decode_command(b'{"now_ms":1,"through_seq":0,"type":"AckExport"}')


def test_set_limits_is_replicated_state_and_waits_for_room() -> None:
    log = Log(DEFAULT_LIMITS)
    log.run_and_finish(6)
    small = dataclasses.replace(DEFAULT_LIMITS, tasks_max=4)
    refused = log.run(SetLimits(log.now_ms, small))
    assert (refused.ok, refused.code) == (False, Code.FAILED_PRECONDITION)
    assert log.m.limits == DEFAULT_LIMITS
    log.ok(PruneTasks(log.now_ms, 3, 0))
    applied = log.ok(SetLimits(log.now_ms, small))
    assert "tasks_max=4" in applied.message
    assert restored(log.m).limits == small  # snapshots carry them
    # The manifest now refuses what the new limit does not allow, saying what to do.
    full = log.run(SubmitTasks(log.now_ms, (spec("x1"), spec("x2"))))
    assert full.code is Code.RESOURCE_EXHAUSTED
    assert "tasks_max=4" in full.message and "goml task export --ack" in full.message
    # A command that names an unknown limit or a bad value never decodes.
    body = json.loads(encode_command(SetLimits(1, small)))
    body["limits"]["tasks_max"] = 0
    with pytest.raises(CommandError, match="tasks_max"):
        decode_command(json.dumps(body).encode())


def test_snapshots_of_every_format_restore() -> None:
    log = Log()
    log.run_and_finish(3)
    log.submit(2)
    log.ok(PruneTasks(log.now_ms, 1, 0))
    log.ok(AckExport(log.now_ms, 2))
    current = log.m.snapshot()
    assert json.loads(current)["format"] == 3
    assert Manifest.restore(current).snapshot() == current
    # An older node's snapshot (no finished_seq, no retention) reads back byte for byte;
    # its finished tasks get a finished_seq in submit order.
    older = Log()
    older.run_and_finish(3)
    for snapshot_format in (1, 2):
        data = older.m._snapshot(snapshot_format)
        assert b"finished_seq" not in data and b"retention" not in data
        back = Manifest.restore(data)
        assert [t.finished_seq for t in back.finished_tasks()] == [1, 2, 3]
        assert back.finished_seq_last == 3


def test_list_pages_in_every_order_without_skipping_or_repeating() -> None:
    log = Log(dataclasses.replace(LIMITS, tasks_max=200))
    ids = log.submit(10) + log.submit(10) + log.submit(5)
    log.finish(ids[:10][::-1])  # finish the first ten newest first

    def page_all(request: ListRequest, limit: int) -> list[str]:
        seen: list[str] = []
        for _ in range(100):
            tasks, token = list_page(log.m, request, limit)
            seen += [t.id for t in tasks]
            if not token:
                return seen
            request = dataclasses.replace(request, page_token=token)
        raise AssertionError("paging never ended")

    plain = ListRequest(None, "", "", 0)
    assert page_all(plain, 4) == ids
    assert page_all(dataclasses.replace(plain, newest_first=True), 4) == ids[::-1]
    finished = dataclasses.replace(plain, finished=True)
    assert page_all(finished, 3) == ids[:10][::-1]
    assert page_all(dataclasses.replace(finished, finished_after_seq=7), 3) == ids[:3][::-1]
    pending = dataclasses.replace(plain, state=TaskState.PENDING, newest_first=True)
    assert page_all(pending, 2) == ids[10:][::-1]
    # Tasks pruned between two pages move nothing: what is left comes, once each.
    by_finish = ids[:10][::-1]
    tasks, token = list_page(log.m, finished, 4)
    assert [t.id for t in tasks] == by_finish[:4]
    log.ok(PruneTasks(log.now_ms, 6, 0))  # two read, two not yet
    rest = page_all(dataclasses.replace(finished, page_token=token), 4)
    assert rest == by_finish[6:]
    # In submit order too (the pruned ones are simply gone).
    tasks, token = list_page(log.m, plain, 3)
    log.ok(PruneTasks(log.now_ms, 8, 0))
    rest = page_all(dataclasses.replace(plain, page_token=token), 3)
    after = ids.index(tasks[-1].id)
    assert rest == [t for t in ids[after + 1 :] if log.m.get_task(t) is not None]
    # A token is for the request that returned it.
    _, token = list_page(log.m, plain, 2)
    for wrong in (
        dataclasses.replace(plain, page_token=token, newest_first=True),
        dataclasses.replace(plain, page_token=token, state=TaskState.PENDING),
        dataclasses.replace(plain, page_token="o.12.nothing"),
        dataclasses.replace(plain, page_token="garbage"),
        dataclasses.replace(plain, page_token="o." + "9" * 100),
        dataclasses.replace(finished, newest_first=True),
    ):
        with pytest.raises(PageTokenError):
            list_page(log.m, wrong, 2)


# ---------------------------------------------------------------- the duties


def test_prune_due_follows_each_rule() -> None:
    log = Log(dataclasses.replace(LIMITS, tasks_max=1000, batch_tasks_max=100))
    log.run_and_finish(6, result_json='{"pad":"' + "x" * 90 + '"}')
    now = log.now_ms
    assert prune_due(log.m, retention(), now) is None
    # Count: keep the newest 4.
    assert prune_due(log.m, retention(finished_tasks_max=4), now) == PruneTasks(now, 2, 0)
    # And never more than half of tasks_max.
    half = Log(dataclasses.replace(LIMITS, tasks_max=6, batch_tasks_max=100))
    half.run_and_finish(5)
    assert prune_due(half.m, retention(), now) == PruneTasks(now, 2, 0)
    # Bytes: each finished task keeps ~110 bytes of args and result.
    per_task = log.m.finished_bytes // 6
    due = prune_due(log.m, retention(finished_bytes_max=3 * per_task), now)
    assert due == PruneTasks(now, 3, 0)
    # Age.
    later = now + 7 * DAY_MS
    assert prune_due(log.m, retention(retention_ms=7 * DAY_MS), later) == PruneTasks(later, 6, 0)
    # At most prune_tasks_max at once.
    assert prune_due(log.m, retention(finished_tasks_max=1, prune_tasks_max=2), now) == (
        PruneTasks(now, 2, 0)
    )
    # require_export: only what an export acknowledged.
    exported = retention(finished_tasks_max=1, require_export=True)
    assert prune_due(log.m, exported, now) is None
    log.ok(AckExport(now, 4))
    assert prune_due(log.m, exported, now) == PruneTasks(now, 4, 0)
    # Tombstones: by age and by count.
    log.ok(PruneTasks(now, 4, 0))
    assert prune_due(log.m, retention(), now) is None
    assert prune_due(log.m, retention(tombstones_max=1), now) == PruneTasks(now, 0, 3)
    assert prune_due(log.m, retention(tombstone_ms=1000), now + 1000) == (
        PruneTasks(now + 1000, 0, 4)
    )


def test_duties_propose_retention_and_limits_only_as_leader() -> None:
    log = Log(DEFAULT_LIMITS)
    log.run_and_finish(3)
    duties = LeaderDuties(dataclasses.replace(DUTIES, retention=retention(finished_tasks_max=1)))
    small = dataclasses.replace(DEFAULT_LIMITS, tasks_max=100)
    assert duties.due(log.m, log.now_ms) == []
    assert duties.limits_due(log.m, small, log.now_ms) == []
    duties.became_leader(log.now_ms)
    assert PruneTasks(log.now_ms, 2, 0) in duties.due(log.m, log.now_ms)
    assert duties.limits_due(log.m, small, log.now_ms) == [SetLimits(log.now_ms, small)]
    log.ok(SetLimits(log.now_ms, small))
    assert duties.limits_due(log.m, small, log.now_ms) == []
    # A lower tasks_max than the manifest holds is not proposed (it would be refused).
    assert duties.limits_due(log.m, dataclasses.replace(small, tasks_max=2), log.now_ms) == []


def test_default_retention_prunes_nothing_young() -> None:
    """The defaults keep a week and 50,000 tasks: the reference scenario never prunes."""
    assert DEFAULT_RETENTION.retention_ms == 7 * DAY_MS
    log = Log(DEFAULT_LIMITS)
    log.run_and_finish(50)
    assert prune_due(log.m, DEFAULT_RETENTION, log.now_ms + DAY_MS) is None
    assert prune_due(log.m, DEFAULT_RETENTION, log.now_ms + 7 * DAY_MS) is not None


def test_only_an_admin_moves_the_export_watermark() -> None:
    """AckExport lets retention prune what it names: a client's token may read (List,
    so export without --ack) but not acknowledge."""
    ack = AckExportRequest(1)
    denied = authorize(Identity(Role.CLIENT, "client"), Method.ACK_EXPORT, ack)
    assert denied is not None and denied.code == "PERMISSION_DENIED"
    assert authorize(Identity(Role.ADMIN, "admin"), Method.ACK_EXPORT, ack) is None
    assert (
        authorize(Identity(Role.CLIENT, "client"), Method.LIST, ListRequest(None, "", "", 1))
        is None
    )


# ------------------------------------------- one node core: the compacted snapshot


class OneNode:
    """A single-voter node core over MemoryStorage, driven as a runtime drives it."""

    def __init__(self, retention_config: RetentionConfig) -> None:
        config = dataclasses.replace(
            node_config("n1", ("n1",)),
            duties=dataclasses.replace(DUTIES, retention=retention_config),
        )
        self.storage = MemoryStorage()
        self.now_ms = 0
        self.wall_ms = 1_700_000_000_000
        self.core = NodeCore(
            config, self.storage.load(), random.Random(1), validate_args, 0, self.wall_ms
        )
        self.replies: dict[int, Reply] = {}
        self.next_id = 0
        self.until(lambda: self.core.is_leader, 5_000)

    def settle(self) -> None:
        for _ in range(1000):
            if not self.core.has_ready():
                return
            ready = self.core.ready()
            if ready.compacted is not None:
                self.storage.compact(ready.compacted)
            self.storage.persist(ready.snapshot, ready.entries, ready.hard_state, ready.must_sync)
            self.core.advance(ready)
            for reply in ready.replies:
                self.replies[reply.request_id] = reply
        raise AssertionError("ready() never runs dry")

    def until(self, done: Callable[[], bool], within_ms: int) -> None:
        deadline = self.now_ms + within_ms
        self.settle()
        while not done():
            step = max(1, min(self.core.next_deadline_ms(), deadline) - self.now_ms)
            self.now_ms += step
            self.wall_ms += step
            assert self.now_ms <= deadline, "not within the simulated deadline"
            self.core.tick(self.now_ms, self.wall_ms)
            self.settle()

    def call(self, request: ApiRequest) -> ApiResponse:
        self.next_id += 1
        request_id = self.next_id
        self.core.request(request_id, request, self.now_ms, self.wall_ms)
        self.until(lambda: request_id in self.replies, 5_000)
        reply = self.replies.pop(request_id)
        if reply.error is not None:
            raise AssertionError(reply.error)
        assert reply.response is not None
        return reply.response

    def error(self, request: ApiRequest) -> ApiError:
        self.next_id += 1
        request_id = self.next_id
        self.core.request(request_id, request, self.now_ms, self.wall_ms)
        self.until(lambda: request_id in self.replies, 5_000)
        error = self.replies.pop(request_id).error
        assert error is not None
        return error

    def stored_snapshot_bytes(self) -> int:
        self.core.replica.compact_now()
        self.settle()
        snapshot = self.storage.load().snapshot
        assert snapshot is not None
        return len(snapshot.data)


def test_a_compacted_snapshot_shrinks_after_pruning(capsys: pytest.CaptureFixture[str]) -> None:
    node = OneNode(retention(finished_tasks_max=20, require_export=True))
    result = json.dumps({"values": [round(i * 0.1, 1) for i in range(400)]})  # ~2.4 KB
    node.call(RegisterRequest("a1", "aws", "r1", "amd64", CAPACITY))
    done = 0
    first_ids: tuple[str, ...] = ()
    for batch in range(10):
        tasks = tuple(
            TaskRequest("matmul", '{"n":2}', TINY, 0, 1, 0, f"k{batch}-{i}", "", "")
            for i in range(50)
        )
        submitted = node.call(SubmitRequest(tasks))
        first_ids = first_ids or submitted.task_ids  # type: ignore[union-attr]
        while done < 50 * (batch + 1):
            leased = node.call(LeaseRequest("a1", CAPACITY, 64, 0))
            assert isinstance(leased, LeaseResponse)
            for t in leased.tasks:
                node.call(ReportRequest("a1", t.task_id, t.epoch, True, result, ""))
                done += 1
    listed = node.call(ListRequest(None, "", "", 1))
    assert isinstance(listed, ListResponse)
    assert (listed.tasks_kept, listed.finished_seq_last, listed.pruned_through_seq) == (
        500,
        500,
        0,
    ), "require_export: nothing pruned before an export"
    before_bytes = node.stored_snapshot_bytes()
    node.call(AckExportRequest(500))
    node.until(lambda: node.core.manifest.finished_count == 20, 10_000)
    after_bytes = node.stored_snapshot_bytes()
    assert node.core.manifest.tombstone_count == 480
    with capsys.disabled():
        print(
            f"\nsnapshot after compaction: 500 finished tasks {before_bytes} bytes; "
            f"pruned to 20 (+480 tombstones) {after_bytes} bytes"
        )
    assert after_bytes < before_bytes / 10
    # What a client sees of a pruned task.
    error = node.error(dataclasses.replace(ListRequest(None, "", "", 1), page_token="bad"))
    assert error.code == "INVALID_ARGUMENT"
    gone = node.error(GetRequest(first_ids[0]))
    assert gone.code == "NOT_FOUND" and "pruned" in gone.message


# ------------------------------------------------------- a real cluster, real agents

TASKS_MAX = 200
SUBMITS = 10 * TASKS_MAX
BATCH = 50
RESULT_BYTES_MAX = 2000
FINISHED_KEPT = 50
TOMBSTONES_MAX = 500
TEST_DUTIES = Duties(
    agent_timeout_ms=2000, election_grace_ms=2000, lease_ms=6000, renew_before_ms=3000
)
POLL_S = 0.05  # polling remote processes: there is nothing local to wait on


def wait_until(what: str, predicate: Callable[[], T | None], timeout_s: float) -> T:
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (ClientError, grpc.RpcError) as error:
            last = f" (last error: {error})"
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}{last}")
        time.sleep(POLL_S)


@dataclass
class Lab:
    layout: local.LocalLayout
    processes: list[local.Process]  # running_cluster stops them all on exit
    client: Client
    admin_profile: Path
    exports: list[Path] = field(default_factory=list)

    def export(self, *extra: str) -> str:
        """`goml task export --ack` into a new file; its stderr summary."""
        out = self.layout.data_dir / f"export-{len(self.exports) + 1:03}.jsonl"
        done = subprocess.run(
            [sys.executable, "-m", "goml", "task", "export", "--out", str(out), "--ack", *extra],
            env={**os.environ, "GOML_PROFILE": str(self.admin_profile)},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        self.exports.append(out)
        return done.stderr

    def listing(self) -> api_pb2.ListResponse:
        return self.client.list_page(limit=1)


def admin_profile(layout: local.LocalLayout) -> Profile:
    """The admin identity `certs init` made (AckExport is an admin's call); the client's
    profile where this checkout has no separate admin yet."""
    certs = layout.data_dir / "certs"
    if not (certs / "admin.token").is_file():
        return layout.profile
    return dataclasses.replace(
        layout.profile,
        token=(certs / "admin.token").read_text().strip(),
        cert=certs / "admin.pem" if layout.profile.cert is not None else None,
        key=certs / "admin.key" if layout.profile.key is not None else None,
    )


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    data_dir = tmp_path_factory.mktemp("retention")
    layout = local.prepare(data_dir, nodes=3, insecure=False, duties=TEST_DUTIES)
    for path in layout.node_configs.values():
        config = load_node_config(path)
        changes = {
            "limits": config.limits.model_copy(
                update={"tasks_max": TASKS_MAX, "result_bytes_max": RESULT_BYTES_MAX}
            ),
            "retention": config.retention.model_copy(
                update={
                    "finished_tasks_max": FINISHED_KEPT,
                    "tombstones_max": TOMBSTONES_MAX,
                    "require_export": True,
                }
            ),
        }
        write_node_config(path, config.model_copy(update=changes))
    admin = data_dir / "admin-profile.json"
    admin_profile(layout).save(admin)
    extra = local.agent_processes(layout, 2)
    with (
        local.running_cluster(layout, extra) as processes,
        Client(layout.profile, call_timeout_s=5.0, retry_s=30.0) as client,
    ):
        lab = Lab(layout, processes, client, admin)
        local.wait_for_leader(layout.profile, timeout_s=60.0)
        wait_until(
            "both agents registered",
            lambda: (
                {a.id for a in client.status().agents if a.state == "ALIVE"}
                >= {name for name, _ in extra}
            ),
            60.0,
        )
        # The configured limits reach the manifest through the log (SetLimits).
        wait_until("tasks_max applied", lambda: lab.listing().tasks_max == TASKS_MAX, 30.0)
        yield lab


def task_spec(
    key: str, function: str = "matmul", args: str = '{"n":2,"m":2,"k":2}'
) -> api_pb2.TaskSpec:
    return api_pb2.TaskSpec(
        function=function,
        args_json=args,
        resources=api_pb2.Resources(cpu=0.1, memory_mb=16),
        max_attempts=2,
        timeout_ms=60_000,
        idempotency_key=key,
    )


@pytest.mark.slow
def test_a_result_over_the_limit_is_refused_with_a_clear_error(lab: Lab) -> None:
    """Results stay in the Raft state, so one over result_bytes_max is refused: the agent
    reports the attempt failed with the control plane's words, and the task ends DEAD
    saying which limit it hit (not hanging, not retried forever)."""
    (task_id,) = lab.client.submit_specs([task_spec("big-1", "eigh", '{"n":200}')])

    def terminal() -> api_pb2.Task | None:
        task = lab.client.get(task_id)
        return task if task.state in TERMINAL_STATES else None

    task = wait_until("the big task terminal", terminal, 90.0)
    assert api_pb2.TaskState.Name(task.state) == "DEAD", task
    assert f"result_bytes_max={RESULT_BYTES_MAX}" in task.error, task.error
    assert "control plane refused the result" in task.error, task.error
    assert task.attempts == 2


@pytest.mark.slow
def test_ten_times_tasks_max_through_a_small_manifest(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    client = lab.client
    submitted: dict[str, api_pb2.TaskSpec] = {}  # task id -> its spec
    peak_kept = 0
    refusals: list[str] = []

    def sample() -> api_pb2.ListResponse:
        nonlocal peak_kept
        listing = lab.listing()
        peak_kept = max(peak_kept, int(listing.tasks_kept))
        assert listing.tasks_kept <= listing.tasks_max == TASKS_MAX
        return listing

    def settled() -> bool:
        listing = sample()
        return listing.tasks_kept == listing.finished_seq_last - listing.pruned_through_seq

    run = uuid.uuid4().hex[:8]
    batch_number = 0
    started = time.monotonic()
    while len(submitted) < SUBMITS:
        specs = [task_spec(f"{run}-{batch_number}-{i}") for i in range(BATCH)]
        batch_number += 1
        for _attempt in range(3):
            try:
                ids = client.submit_specs(specs)
                break
            except ClientError as error:
                assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                refusals.append(error.detail)
                # Full: every task open or finished and not exported. Let the agents
                # finish what is open, archive, and retention makes room.
                wait_until("open tasks finished", settled, 120.0)
                lab.export()
                wait_until(
                    "room made by pruning",
                    lambda: sample().tasks_kept <= TASKS_MAX - BATCH,
                    60.0,
                )
        else:
            raise AssertionError(f"batch {batch_number} refused three times: {refusals[-3:]}")
        assert len(set(ids)) == BATCH and not set(ids) & set(submitted)
        submitted.update(zip(ids, specs, strict=True))
        sample()
    wait_until("every task finished", settled, 180.0)
    elapsed_s = time.monotonic() - started
    lab.export()
    # The leader's duties prune what the export acknowledged on their next pass.
    wait_until(
        "pruned down to finished_tasks_max", lambda: sample().tasks_kept <= FINISHED_KEPT + 1, 60.0
    )

    # A retry of a recently pruned task's submit gets its id back and runs nothing.
    records = [json.loads(line) for path in lab.exports for line in path.open()]
    ours = [r for r in records if r["id"] in submitted]
    exported = [r["id"] for r in records]
    kept = {t.id: t for t in client.list_tasks(limit=10 * TASKS_MAX)}
    recent_pruned = next(r["id"] for r in reversed(ours) if r["id"] not in kept)
    before = sample().tasks_kept
    assert client.submit_specs([submitted[recent_pruned]]) == [recent_pruned]
    assert sample().tasks_kept == before
    with pytest.raises(ClientError, match="pruned"):
        client.get(recent_pruned)
    # One pruned long ago (its tombstone dropped, tombstones_max=500): the key is free.
    first = next(iter(submitted))
    assert first not in kept
    assert client.submit_specs([submitted[first]]) != [first]

    # Every task submitted is in the manifest or in the export; none in two files.
    assert len(exported) == len(set(exported)), "a task exported twice"
    missing = sorted(set(submitted) - set(exported) - set(kept))
    assert not missing, f"{len(missing)} tasks neither kept nor exported: {missing[:5]}"
    assert len(submitted) == SUBMITS
    assert peak_kept <= TASKS_MAX
    assert refusals and "goml task export --ack" in refusals[0], refusals[:1]
    for record in ours:
        assert record["state"] == "SUCCEEDED", record
        assert record["result"]["shape"] == [2, 2], record
        assert record["spec"]["idempotency_key"].startswith(run), record
        assert record["agent_id"] in {"agent-1", "agent-2", None}, record
    seqs = [r["finished_seq"] for r in records]
    assert seqs == sorted(seqs), "exports come in finish order, contiguous across files"
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "no gap between exports"
    # The resubmitted `first` above is a new task: let it finish before the figures
    # the replayed stores are compared with are read.
    wait_until("the resubmitted task finished", settled, 60.0)
    listing = sample()
    assert len(kept) <= FINISHED_KEPT + 1

    # The stopped cluster's stores: every replica holds a small manifest, and the
    # snapshot a compaction would write is small.
    local.stop_all(lab.processes)
    dirs = {name: load_node_config(p).data_dir for name, p in lab.layout.node_configs.items()}
    manifests = replay_cluster(dirs)
    for name, manifest in manifests.items():
        assert manifest.task_count <= TASKS_MAX, name
        assert manifest.limits.tasks_max == TASKS_MAX, name
        assert manifest.finished_seq_last == listing.finished_seq_last, name
    sizes = sorted(len(m.snapshot()) for m in manifests.values())
    with capsys.disabled():
        print(
            f"\n{SUBMITS} submits through tasks_max={TASKS_MAX} in {elapsed_s:.1f} s: "
            f"peak {peak_kept} tasks kept, {len(lab.exports)} exports of {len(records)} "
            f"tasks, {len(kept)} kept at the end, {len(refusals)} submits refused (full); "
            f"replayed manifests {[m.task_count for m in manifests.values()]} tasks, "
            f"{[m.tombstone_count for m in manifests.values()]} tombstones, "
            f"snapshot {sizes} bytes"
        )
    assert sizes[-1] < 200_000  # 2,000+ tasks went through: ~1 MB had none been pruned
