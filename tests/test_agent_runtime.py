"""The real agent runtime: the process-per-task runner, the gRPC client side, the loop."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest

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
    AgentRequest as Request,
    Resources,
    AgentResponse as Response,
)
from goml.agent.runner import TaskRunner
from goml.agent.runtime import (
    AgentConfig,
    CallFailure,
    ConfigError,
    GrpcControlPlane,
    classify_status,
    load_config,
    run_agent,
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
        out = await make_runner().run("r1", "matmul", '{"n":3,"m":3,"k":3}', 30_000)
        assert out.ok, out.text
        assert '"shape":[3,3]' in out.text
        assert out.exit_code == 0 and pid_gone(out.pid)

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
    (Method.HEARTBEAT, HeartbeatResponse(False)),
    (Method.LEASE, LeaseResponse((TASK,))),
    (Method.REPORT, ReportResponse(False, "stale")),
]


@pytest.mark.parametrize(("method", "request_"), REQUESTS)
def test_requests_round_trip_through_protobuf(method: Method, request_: Request) -> None:
    pb = request_to_pb(request_)
    again = type(pb).FromString(pb.SerializeToString())
    assert request_from_pb(method, again) == request_


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
