"""The real agent runtime: the task runner (warm workers, isolated runs), gRPC client, loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest

from goml.agent.runner import TaskOutcome, TaskRunner, _encode, _read_reply, _Reply
from goml.agent.runtime import (
    AgentConfig,
    CallFailure,
    ConfigError,
    GrpcControlPlane,
    classify_status,
    load_config,
    run_agent,
)
from goml.api.types import AgentRequest as Request
from goml.api.types import AgentResponse as Response
from goml.api.types import (
    ErrorKind,
    HeartbeatRequest,
    HeartbeatResponse,
    LeasedTask,
    LeaseRequest,
    LeaseResponse,
    Method,
    RegisterRequest,
    RegisterResponse,
    ReportRequest,
    ReportResponse,
    Resources,
)
from goml.api.wire import request_from_pb, request_to_pb, response_from_pb, response_to_pb
from goml.proto import api_pb2, api_pb2_grpc

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def make_runner(result_bytes_max: int = 100_000) -> TaskRunner:
    return TaskRunner(result_bytes_max=result_bytes_max, runs_max=4, kill_wait_ms=5000)


# --------------------------------------------------------------------------- the runner


def test_runner_returns_the_result_json() -> None:
    async def go() -> None:
        runner = make_runner()
        try:
            out = await runner.run("r1", "matmul", '{"n":3,"m":3,"k":3}', 30_000)
            assert out.ok, out.text
            assert '"shape":[3,3]' in out.text
            # A warm worker: kept alive for the next task (no exit code yet).
            assert out.exit_code is None and not pid_gone(out.pid)
        finally:
            await runner.close()
        wait_gone = time.monotonic() + 10
        while not pid_gone(out.pid) and time.monotonic() < wait_gone:
            await asyncio.sleep(0.02)  # polling another process's exit, bounded
        assert pid_gone(out.pid), "close() kills and reaps its workers"

    run(go())


def test_hung_task_is_killed_at_its_timeout_and_the_runner_keeps_working() -> None:
    async def go() -> None:
        runner = make_runner()
        started = time.monotonic()
        out = await runner.run("hang", "sleep_ms", '{"ms":600000}', 500)
        elapsed = time.monotonic() - started
        assert not out.ok and out.timed_out
        assert out.text == "timed out after 500 ms"
        assert elapsed < 5, elapsed
        assert pid_gone(out.pid)
        assert runner.running == ()
        again = await runner.run("next", "sleep_ms", '{"ms":10}', 30_000)
        assert again.ok and again.text == '{"slept_ms":10}'

    run(go())


def test_cancel_stops_the_process() -> None:
    async def go() -> None:
        runner = make_runner()
        job = asyncio.create_task(runner.run("c1", "sleep_ms", '{"ms":600000}', 600_000))
        pid = None
        for _ in range(500):
            await asyncio.sleep(0.01)
            pid = runner.pid("c1")
            if pid is not None:
                break
        assert pid is not None
        await asyncio.sleep(0.2)
        assert not pid_gone(pid)
        assert runner.cancel("c1")
        out = await job
        assert out.cancelled and not out.ok and out.pid == pid
        assert pid_gone(pid)
        assert not runner.cancel("c1")  # nothing left to cancel
        assert (await runner.run("c2", "fail", '{"message":"x"}', 30_000)).text == "RuntimeError: x"

    run(go())


def test_a_raising_task_returns_its_error_text() -> None:
    async def go() -> None:
        out = await make_runner().run("f", "fail", '{"message":"bad input row 7"}', 30_000)
        assert not out.ok and not out.cancelled and not out.timed_out
        assert out.text == "RuntimeError: bad input row 7"
        bad = await make_runner().run("g", "no_such_function", "{}", 30_000)
        assert not bad.ok and "unknown task function 'no_such_function'" in bad.text

    run(go())


def test_an_oversized_result_gives_the_clear_error() -> None:
    async def go() -> None:
        out = await make_runner(result_bytes_max=500).run("big", "eigh", '{"n":200}', 30_000)
        assert not out.ok
        assert out.text.startswith("TaskResultTooLarge: result of task function 'eigh' is ")
        assert out.text.endswith("bytes, over the limit of 500 bytes")

    run(go())


def test_runs_run_in_parallel_and_the_limit_holds() -> None:
    async def go() -> None:
        runner = TaskRunner(result_bytes_max=1000, runs_max=2, kill_wait_ms=5000)
        # Warm the forkserver first, so the timing below measures the runs, not its start.
        assert (await runner.run("warm", "sleep_ms", '{"ms":1}', 30_000)).ok
        started = time.monotonic()
        outs = await asyncio.gather(
            runner.run("p1", "sleep_ms", '{"ms":1000}', 30_000),
            runner.run("p2", "sleep_ms", '{"ms":1000}', 30_000),
        )
        assert all(o.ok for o in outs)
        # One after the other would take at least 2 s.
        assert time.monotonic() - started < 1.95
        assert outs[0].pid != outs[1].pid

    run(go())


# --------------------------------------------------------------------------- warm workers

TINY = ("matmul", '{"n":4,"m":4,"k":4,"seed":1}')


def parent_pid(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(raw[raw.rindex(")") + 2 :].split()[1])


class Tracked:
    """A real runner that remembers every process pid it showed, so the test can stop
    them by PID (`tracked_runner`)."""

    def __init__(self, runner: TaskRunner) -> None:
        self.runner = runner
        self.pids: set[int] = set()

    async def run(
        self, run_id: str, function: str, args_json: str, timeout_ms: int = 30_000, **kw: bool
    ) -> TaskOutcome:
        out = await self.runner.run(run_id, function, args_json, timeout_ms, **kw)
        if out.pid:
            self.pids.add(out.pid)
        return out

    async def tiny(self, run_id: str) -> TaskOutcome:
        out = await self.run(run_id, *TINY)
        assert out.ok and '"shape":[4,4]' in out.text, out
        return out

    async def wait_for_pid(self, run_id: str, timeout_s: float = 10.0) -> int:
        """The pid running `run_id` (its task is sent by then), polled with a deadline."""
        deadline = time.monotonic() + timeout_s
        while (pid := self.runner.pid(run_id)) is None:
            assert time.monotonic() < deadline, f"{run_id} got no process in {timeout_s} s"
            await asyncio.sleep(0.005)
        self.pids.add(pid)
        return pid


@contextlib.asynccontextmanager
async def tracked_runner(**options: int) -> AsyncIterator[Tracked]:
    """Started here, stopped here also on failure: close(), then SIGKILL by PID any
    process it showed that is still our grandchild (a forkserver child, not a reused PID)."""
    config = {
        "result_bytes_max": 100_000,
        "runs_max": 1,
        "kill_wait_ms": 5000,
        "worker_tasks_max": 1000,
        "worker_memory_mb_max": 2048,
    }
    tracked = Tracked(TaskRunner(**{**config, **options}))
    try:
        yield tracked
    finally:
        await tracked.runner.close()
        for pid in sorted(tracked.pids):
            parent = parent_pid(pid)
            if parent is not None and parent_pid(parent) == os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_fifty_tiny_tasks_reuse_at_most_runs_max_workers() -> None:
    async def go() -> None:
        async with tracked_runner(runs_max=2) as runner:
            outs = [await runner.tiny(f"t{i}") for i in range(50)]
            pids = {out.pid for out in outs}
            assert 1 <= len(pids) <= 2, pids
            assert all(out.exit_code is None for out in outs)  # kept alive, not exited
            assert not any(pid_gone(pid) for pid in pids)

    run(go())


def test_a_hung_task_is_killed_with_its_worker_and_the_next_task_gets_a_new_one() -> None:
    async def go() -> None:
        async with tracked_runner(runs_max=1) as runner:
            first = await runner.tiny("first")
            started = time.monotonic()
            hung = await runner.run("hang", "sleep_ms", '{"ms":600000}', 500)
            elapsed = time.monotonic() - started
            assert hung.timed_out and not hung.ok and hung.text == "timed out after 500 ms"
            assert 0.5 <= elapsed < 5, elapsed
            assert hung.pid == first.pid, "the hung task ran on the warm worker"
            assert hung.exit_code == -signal.SIGKILL
            assert pid_gone(hung.pid)
            after = await runner.tiny("after")
            assert after.pid != hung.pid and not pid_gone(after.pid)

    run(go())


def test_kill_9_of_a_worker_mid_task_fails_the_task_and_the_next_task_works() -> None:
    async def go() -> None:
        async with tracked_runner(runs_max=1) as runner:
            job = asyncio.create_task(runner.run("k", "sleep_ms", '{"ms":600000}', 600_000))
            pid = await runner.wait_for_pid("k")
            os.kill(pid, signal.SIGKILL)
            out = await asyncio.wait_for(job, 10)
            assert not out.ok and not out.cancelled and not out.timed_out
            assert out.text == f"worker process {pid} died without a result (exit code -9)"
            assert out.pid == pid and pid_gone(pid)
            after = await runner.tiny("after")
            assert after.pid != pid

    run(go())


def test_an_idle_worker_that_died_is_replaced_without_failing_a_task() -> None:
    async def go() -> None:
        async with tracked_runner(runs_max=1) as runner:
            first = await runner.tiny("first")
            os.kill(first.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while not pid_gone(first.pid):  # the forkserver reaps it
                assert time.monotonic() < deadline, "killed worker not reaped in 10 s"
                await asyncio.sleep(0.005)
            after = await runner.tiny("after")
            assert after.pid != first.pid

    run(go())


def test_a_worker_whose_peak_memory_passes_the_limit_is_replaced_after_its_task() -> None:
    async def go() -> None:
        async with tracked_runner(runs_max=1, worker_memory_mb_max=256) as runner:
            first = await runner.tiny("first")
            # Under the limit (a worker starts near 40 MiB): the worker stays.
            small = await runner.run("small", "allocate_mb", '{"mb":32}')
            assert small.ok and small.text == '{"allocated_mb":32}'
            assert small.pid == first.pid and small.exit_code is None
            # The task frees its 400 MiB before it returns: only the peak shows it.
            big = await runner.run("big", "allocate_mb", '{"mb":400}')
            assert big.ok and big.text == '{"allocated_mb":400}', big
            assert big.pid == first.pid
            assert big.exit_code == -signal.SIGKILL and pid_gone(big.pid)
            after = await runner.tiny("after")
            assert after.pid != big.pid

    run(go())


def test_a_worker_is_replaced_after_worker_tasks_max_tasks() -> None:
    async def go() -> None:
        async with tracked_runner(runs_max=1, worker_tasks_max=3) as runner:
            outs = [await runner.tiny(f"t{i}") for i in range(7)]
            pids = [out.pid for out in outs]
            assert pids[0] == pids[1] == pids[2] != pids[3] == pids[4] == pids[5] != pids[6]
            assert pids[6] != pids[0]
            assert [out.exit_code is None for out in outs] == [True, True, False] * 2 + [True]
            assert pid_gone(pids[0]) and pid_gone(pids[3]) and not pid_gone(pids[6])

    run(go())


def test_isolated_runs_get_a_fresh_process_each_and_leave_the_pool_alone() -> None:
    async def go() -> None:
        async with tracked_runner(runs_max=2) as runner:
            warm = await runner.tiny("warm")
            isolated = [await runner.run(f"i{i}", *TINY, isolated=True) for i in range(3)]
            assert all(out.ok and '"shape":[4,4]' in out.text for out in isolated)
            pids = {out.pid for out in isolated}
            assert len(pids) == 3 and warm.pid not in pids
            assert all(out.exit_code == 0 and pid_gone(out.pid) for out in isolated)
            again = await runner.tiny("again")
            assert again.pid == warm.pid

    run(go())


def test_close_kills_and_reaps_every_worker() -> None:
    async def go() -> None:
        async with tracked_runner(runs_max=2) as runner:
            # Two at once use both workers the warm-up started: every worker is known.
            pair = await asyncio.gather(
                runner.run("a", "sleep_ms", '{"ms":100}'), runner.run("b", "sleep_ms", '{"ms":100}')
            )
            pids = {out.pid for out in pair}
            assert len(pids) == 2 and all(out.ok for out in pair)
            job = asyncio.create_task(runner.run("long", "sleep_ms", '{"ms":600000}', 600_000))
            assert await runner.wait_for_pid("long") in pids
            assert not any(pid_gone(pid) for pid in pids)
            await runner.runner.close()
            out = await asyncio.wait_for(job, 1)  # close() returned after the run did
            assert out.cancelled and not out.ok
            assert runner.runner.running == ()
            alive = [pid for pid in sorted(pids) if not pid_gone(pid)]
            assert alive == [], alive

    run(go())


def test_cancel_kills_the_worker_and_frees_the_slot_within_2_s() -> None:
    async def go() -> None:
        async with tracked_runner(runs_max=1) as runner:
            job = asyncio.create_task(runner.run("c", "sleep_ms", '{"ms":600000}', 600_000))
            pid = await runner.wait_for_pid("c")
            started = time.monotonic()
            assert runner.runner.cancel("c")
            async with asyncio.timeout(2):
                out = await job
            assert time.monotonic() - started < 2
            assert out.cancelled and not out.ok and out.pid == pid
            assert pid_gone(pid)
            assert runner.runner.running == ()
            after = await runner.tiny("after")  # runs_max=1: the slot is free again
            assert after.pid != pid

    run(go())


@pytest.mark.parametrize("isolated", [False, True])
def test_an_error_text_full_of_json_escapes_arrives_whole(isolated: bool) -> None:
    """JSON escaping can make a reply up to 12 bytes per character of text; a cap on text
    characters alone read such a reply as a dead process."""

    async def go() -> None:
        async with tracked_runner(runs_max=1, result_bytes_max=5000) as runner:
            quotes = '"' * 4000
            out = await runner.run(
                "q",
                "fail",
                f'{{"message":"{quotes.replace(chr(34), chr(92) + chr(34))}"}}',
                isolated=isolated,
            )
            assert not out.ok and out.text == f"RuntimeError: {quotes}", out.text[:80]
            emoji = "\U0001f600" * 3000
            out = await runner.run("e", "fail", f'{{"message":"{emoji}"}}', isolated=isolated)
            assert not out.ok and out.text == f"RuntimeError: {emoji}"[:5000], out.text[:80]

    run(go())


def test_read_reply_tells_a_reply_from_death_and_garbage() -> None:
    import multiprocessing

    ours, theirs = multiprocessing.Pipe(duplex=True)
    try:
        theirs.send_bytes(_encode({"ok": True, "text": "{}"}))
        assert _read_reply(ours, 2048) == _Reply(True, "{}")
        for garbage, why in [
            (b"\xff not json", "10 bytes that are not JSON"),
            (b"[1]", "JSON that is not a reply"),
            (b'{"ok": 1, "text": "x"}', "a reply with the wrong types"),
            (b'{"ok": true, "text": "x", "extra": 1}', "JSON that is not a reply"),
        ]:
            theirs.send_bytes(garbage)
            assert _read_reply(ours, 2048) == why
        theirs.send_bytes(b"x" * 3000)
        assert _read_reply(ours, 2048) == "a message over 2048 bytes"
    finally:
        ours.close()
        theirs.close()
    ours, theirs = multiprocessing.Pipe(duplex=True)
    theirs.close()
    assert _read_reply(ours, 2048) == ""  # EOF: the other end died
    ours.close()


# --------------------------------------------------------------------------- wire, status


REQUESTS: list[tuple[Method, Request]] = [
    (Method.REGISTER, RegisterRequest("a", "aws", "r", "x86_64", Resources(2.5, 10, 1))),
    (Method.HEARTBEAT, HeartbeatRequest("a", Resources(1.0, 5, 0), ("t1", "t2"))),
    (Method.LEASE, LeaseRequest("a", Resources(1.0, 5, 0), 3, 5000)),
    (Method.REPORT, ReportRequest("a", "t1", 4, False, "", "boom")),
]
# A generous timeout: the first task waits for the forkserver to load NumPy, which takes
# seconds on a loaded 2-core machine.
TASK = LeasedTask("t1", "matmul", "{}", Resources(1.0, 512, 0), 3, 30_000, 99)
RESPONSES: list[tuple[Method, Response]] = [
    (Method.REGISTER, RegisterResponse(250)),
    (Method.REGISTER, RegisterResponse(250, lease_poll_is_heartbeat=False)),
    (Method.HEARTBEAT, HeartbeatResponse(False)),
    (Method.LEASE, LeaseResponse((TASK,))),
    (Method.LEASE, LeaseResponse((), lease_poll_is_heartbeat=False)),
    (Method.REPORT, ReportResponse(False, "stale")),
]


@pytest.mark.parametrize(("method", "request_"), REQUESTS)
def test_requests_round_trip_through_protobuf(method: Method, request_: Request) -> None:
    pb = request_to_pb(request_)
    again = type(pb).FromString(pb.SerializeToString())
    assert request_from_pb(method, again) == request_


def test_an_older_nodes_answers_do_not_count_polls_as_heartbeats() -> None:
    """Answers without `lease_poll_is_heartbeat` (a node from before it) decode as False."""
    register = api_pb2.RegisterResponse(heartbeat_interval_ms=250)
    lease = api_pb2.LeaseResponse()
    assert response_from_pb(Method.REGISTER, register) == RegisterResponse(250, False)
    assert response_from_pb(Method.LEASE, lease) == LeaseResponse((), False)


@pytest.mark.parametrize(("method", "response"), RESPONSES)
def test_responses_round_trip_through_protobuf(method: Method, response: Response) -> None:
    pb = response_to_pb(response)
    again = type(pb).FromString(pb.SerializeToString())
    assert response_from_pb(method, again) == response


def test_status_codes_map_to_error_kinds() -> None:
    c = grpc.StatusCode
    leader = {"goml-leader-id": "n2"}
    assert classify_status(c.FAILED_PRECONDITION, leader, "x") == CallFailure(
        ErrorKind.NOT_LEADER, "n2", "x"
    )
    assert classify_status(c.FAILED_PRECONDITION, {}, "").leader_hint == ""
    assert classify_status(c.UNAVAILABLE, {}, "").kind is ErrorKind.UNAVAILABLE
    assert classify_status(c.INTERNAL, {}, "").kind is ErrorKind.UNAVAILABLE
    assert classify_status(c.DEADLINE_EXCEEDED, {}, "").kind is ErrorKind.DEADLINE
    assert classify_status(c.UNAUTHENTICATED, {}, "").kind is ErrorKind.UNAUTHENTICATED
    assert classify_status(c.INVALID_ARGUMENT, {}, "").kind is ErrorKind.INVALID
    assert classify_status(c.RESOURCE_EXHAUSTED, {}, "").kind is ErrorKind.INVALID


# --------------------------------------------------------------------------- config


def test_load_config_yaml_resolves_paths_and_validates(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cret\n")
    path = tmp_path / "agent.yaml"
    path.write_text(
        "agent_id: a1\ncloud: aws\nregion: us-east-1\n"
        "capacity: {cpu: 2, memory_mb: 1024}\n"
        "control_plane: {n1: 'localhost:1'}\n"
        "token_file: token\ninsecure: true\n"
    )
    config = load_config(path)
    assert config.token_file == tmp_path / "token"
    assert config.capacity.gpu is None  # detected at start
    core = config.core_config("aarch64", 0)
    assert core.control_nodes == ("n1",) and core.arch == "aarch64"
    path.write_text(path.read_text().replace("insecure: true", "insecure: false"))
    with pytest.raises(ConfigError, match="exactly one of `tls`"):
        load_config(path)
    path.write_text(path.read_text() + "typo_field: 1\n")
    with pytest.raises(ConfigError, match="typo_field"):
        load_config(path)


# --------------------------------------------------------------------------- gRPC client side


class FakeAgentService(api_pb2_grpc.AgentServiceServicer):
    """Test double for the node side of AgentService: NOT_LEADER or a scripted leader."""

    def __init__(self, leader_id: str | None) -> None:
        self.leader_id = leader_id  # None: this node is the leader
        self.metadata: list[dict[str, str]] = []
        self.reports: list[api_pb2.ReportRequest] = []

    async def _check(self, context: grpc.aio.ServicerContext) -> None:
        md = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.metadata.append(md)
        if md.get("authorization") != "Bearer tok":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")
        if self.leader_id is not None:
            context.set_trailing_metadata((("goml-leader-id", self.leader_id),))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not the leader")

    async def Register(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._check(context)
        return api_pb2.RegisterResponse(heartbeat_interval_ms=200)

    async def Heartbeat(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._check(context)
        return api_pb2.HeartbeatResponse(known=True)

    async def Lease(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._check(context)
        if not self.reports and not getattr(self, "leased", False):
            self.leased = True
            return response_to_pb(LeaseResponse((TASK,)))
        await asyncio.sleep(min(request.wait_ms, 200) / 1000)
        return api_pb2.LeaseResponse()

    async def Report(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._check(context)
        self.reports.append(request)
        return api_pb2.ReportResponse(recorded=True)


async def _serve(servicer: FakeAgentService) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    api_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_grpc_client_sends_the_token_and_reads_not_leader() -> None:
    async def go() -> None:
        follower = FakeAgentService(leader_id="n2")
        server, address = await _serve(follower)
        try:
            client = GrpcControlPlane({"n1": address, "dead": "127.0.0.1:1"}, None, "tok")
            request = RegisterRequest("a", "aws", "r", "x86_64", Resources(1, 1, 0))
            out = await client.call("n1", Method.REGISTER, request, 2000)
            assert out == CallFailure(ErrorKind.NOT_LEADER, "n2", "not the leader")
            assert follower.metadata[0]["authorization"] == "Bearer tok"
            dead = await client.call("dead", Method.REGISTER, request, 500)
            assert isinstance(dead, CallFailure)
            assert dead.kind in (ErrorKind.UNAVAILABLE, ErrorKind.DEADLINE)
            wrong = GrpcControlPlane({"n1": address}, None, "nope")
            bad = await wrong.call("n1", Method.REGISTER, request, 2000)
            assert isinstance(bad, CallFailure) and bad.kind is ErrorKind.UNAUTHENTICATED
            await client.close()
            await wrong.close()
        finally:
            await server.stop(None)

    run(go())


def test_agent_runs_a_leased_task_end_to_end_following_not_leader(tmp_path: Path) -> None:
    """The whole runtime against two fake nodes: n1 redirects to n2, n2 leases one task;
    the agent runs it in a child process and reports the result under its epoch."""

    async def go() -> None:
        follower, leader = FakeAgentService("n2"), FakeAgentService(None)
        s1, a1 = await _serve(follower)
        s2, a2 = await _serve(leader)
        (tmp_path / "token").write_text("tok")
        config = AgentConfig.model_validate(
            {
                "agent_id": "a1",
                "cloud": "aws",
                "region": "us-east-1",
                "capacity": {"cpu": 2, "memory_mb": 2048, "gpu": 0},
                "control_plane": {"n1": a1, "n2": a2},
                "token_file": str(tmp_path / "token"),
                "insecure": True,
                "lease_wait_ms": 200,
                "seed": 1,  # random() = 0.13: the first node tried is n1
            }
        )
        stop = asyncio.Event()
        agent = asyncio.create_task(run_agent(config, stop=stop))
        try:
            for _ in range(1000):
                if leader.reports:
                    break
                await asyncio.sleep(0.02)
            assert len(leader.reports) == 1
            assert follower.metadata, "the agent asked n1 first and followed its hint"
            report = leader.reports[0]
            assert (report.task_id, report.epoch, report.success) == ("t1", 3, True)
            assert '"shape":[256,256]' in report.result_json
        finally:
            stop.set()
            await agent
            await s1.stop(None)
            await s2.stop(None)

    run(go())
