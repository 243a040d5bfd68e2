"""The client's leader tracking and retries (`goml.client.Client` driving
`goml.api.retry.RetryPolicy`) against small real gRPC servers on loopback.

Each server is the generated `Client` servicer answering `Get` from a script: serve, or
refuse with a status code (and, for NOT_LEADER, the leader in trailing metadata), after
checking the bearer token as the real service does. Servers journal every call before
answering, and the client's sleeps are journaled by a stand-in for its `time` module
(real clock, real sleeps), so one list shows the order of calls and backoffs. The client
is synchronous, so when a call returns every server call it made is already journaled:
nothing to wait for. Backoff draws are pinned to their lowest value (`LowestDraw`), so
the delays are exact.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest

import goml.client as client_module
from goml.api.types import LEADER_ADDRESS_KEY, LEADER_ID_KEY
from goml.client import Client, ClientError, Profile
from goml.proto import api_pb2, api_pb2_grpc

TOKEN = "test-token"
CALL_TIMEOUT_S = 2.0
SERVER_STOP_TIMEOUT_S = 5.0
THREAD_JOIN_TIMEOUT_S = 10.0
# The client's backoff is 20..500 ms; a draw in [d/2, d] pinned to d/2 gives these.
LOWEST_BACKOFFS_MS = [10, 20, 40, 80, 160, 250, 250, 250]


@dataclass(frozen=True)
class Call:
    node: str


@dataclass(frozen=True)
class Sleep:
    delay_ms: int


class Journal:
    """Calls as the servers saw them and sleeps as the client asked for them, in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[Call | Sleep] = []

    def record(self, event: Call | Sleep) -> None:
        with self._lock:
            self._events.append(event)

    def events(self) -> list[Call | Sleep]:
        with self._lock:
            return list(self._events)

    def calls(self) -> list[str]:
        return [e.node for e in self.events() if isinstance(e, Call)]

    def sleeps_ms(self) -> list[int]:
        return [e.delay_ms for e in self.events() if isinstance(e, Sleep)]


class RecordingTime:
    """Stands in for the `time` module inside goml.client: the real clock and real
    sleeps, each sleep journaled."""

    monotonic = staticmethod(time.monotonic)
    monotonic_ns = staticmethod(time.monotonic_ns)

    def __init__(self, journal: Journal) -> None:
        self._journal = journal

    def sleep(self, seconds: float) -> None:
        self._journal.record(Sleep(round(seconds * 1000)))
        time.sleep(seconds)


class LowestDraw(random.Random):
    """Every backoff the smallest the policy allows (d/2), so delays are exact."""

    def random(self) -> float:
        return 0.0


@dataclass(frozen=True)
class Refuse:
    code: grpc.StatusCode
    message: str
    leader_id: str | None = None  # set: a NOT_LEADER answer naming this leader


def not_leader(node: str, leader: str) -> Refuse:
    # As goml.cluster.service.ControlPlane.require_leader answers.
    return Refuse(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"NOT_LEADER: {node} is not the leader (leader: {leader})",
        leader,
    )


class ScriptedNode(api_pb2_grpc.ClientServicer):
    def __init__(
        self, name: str, refuse: Refuse | None, journal: Journal, addresses: dict[str, str]
    ) -> None:
        self._name = name
        self._refuse = refuse
        self._journal = journal
        self._addresses = addresses

    def Get(self, request: api_pb2.GetRequest, context: grpc.ServicerContext) -> api_pb2.Task:
        self._journal.record(Call(self._name))
        metadata = dict(context.invocation_metadata())
        if metadata.get("authorization") != f"Bearer {TOKEN}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong token")
        refuse = self._refuse
        if refuse is not None:
            if refuse.leader_id is not None:
                address = self._addresses.get(refuse.leader_id, "")
                context.set_trailing_metadata(
                    ((LEADER_ID_KEY, refuse.leader_id), (LEADER_ADDRESS_KEY, address))
                )
            context.abort(refuse.code, refuse.message)
        return api_pb2.Task(id=request.task_id, state=api_pb2.PENDING)


@contextlib.contextmanager
def serving(
    script: Mapping[str, Refuse | None], journal: Journal, token: str = TOKEN
) -> Iterator[Profile]:
    """One gRPC server per scripted node on loopback; a profile naming them all. Every
    server started is stopped on exit, also when the test fails."""
    addresses: dict[str, str] = {}
    servers: list[grpc.Server] = []
    try:
        for name in sorted(script):
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
            servers.append(server)
            servicer = ScriptedNode(name, script[name], journal, addresses)
            api_pb2_grpc.add_ClientServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
            port = server.add_insecure_port("127.0.0.1:0")
            assert port > 0, f"could not bind a loopback port for {name}"
            addresses[name] = f"127.0.0.1:{port}"
        for server in servers:
            server.start()
        yield Profile(nodes=dict(addresses), token=token, insecure=True)
    finally:
        stopped = [server.stop(grace=None) for server in servers]
        for event in stopped:
            assert event.wait(SERVER_STOP_TIMEOUT_S), "a test server did not stop"


@pytest.fixture
def journal(monkeypatch: pytest.MonkeyPatch) -> Journal:
    journal = Journal()
    monkeypatch.setattr(client_module, "time", RecordingTime(journal))
    return journal


def make_client(profile: Profile, retry_s: float) -> Client:
    return Client(profile, call_timeout_s=CALL_TIMEOUT_S, retry_s=retry_s, rng=LowestDraw())


def test_not_leader_hint_is_followed_at_once(journal: Journal) -> None:
    script = {"n1": not_leader("n1", "n2"), "n2": None}
    with serving(script, journal) as profile, make_client(profile, retry_s=10.0) as client:
        assert client.get("t-1").id == "t-1"
        # n1 is first in the profile's order; its hint sends the call to n2, no backoff.
        assert journal.events() == [Call("n1"), Call("n2")]
        # The belief moved: the next call goes straight to n2.
        assert client.get("t-2").id == "t-2"
        assert journal.events() == [Call("n1"), Call("n2"), Call("n2")]


def test_followers_naming_each_other_back_off_then_give_up(journal: Journal) -> None:
    redirects_max = 2  # the number of nodes
    retry_s = 1.0
    script = {"n1": not_leader("n1", "n2"), "n2": not_leader("n2", "n1")}
    with serving(script, journal) as profile, make_client(profile, retry_s=retry_s) as client:
        started_s = time.monotonic()
        with pytest.raises(ClientError) as gave_up:
            client.get("t-1")
        elapsed_s = time.monotonic() - started_s

    error = gave_up.value
    assert error.code is grpc.StatusCode.FAILED_PRECONDITION, error
    assert "gave up after 1000 ms" in error.detail, error
    assert "redirected too often in a row" in error.detail, error
    assert "is not the leader" in error.detail, error  # the last answer's message

    # Every call follows the previous hint: n1, n2, n1, n2, ...
    calls = journal.calls()
    assert calls == [("n1", "n2")[i % 2] for i in range(len(calls))], calls
    # At most redirects_max hints in a row, then a backoff: runs of exactly 1 + 2 calls.
    runs: list[list[str]] = [[]]
    for event in journal.events():
        if isinstance(event, Sleep):
            runs.append([])
        else:
            runs[-1].append(event.node)
    assert all(len(run) == 1 + redirects_max for run in runs), runs
    # Backoffs grow from 20 ms towards 500 ms, and there were several of them.
    sleeps_ms = journal.sleeps_ms()
    assert len(sleeps_ms) >= 3, sleeps_ms
    assert sleeps_ms == LOWEST_BACKOFFS_MS[: len(sleeps_ms)], sleeps_ms
    # Gave up within retry_s, and not before the next backoff would have overrun it.
    assert elapsed_s <= retry_s + 0.5, elapsed_s
    assert elapsed_s >= retry_s - max(LOWEST_BACKOFFS_MS) / 1000, elapsed_s


def test_refused_request_is_raised_at_once(journal: Journal) -> None:
    refusal = Refuse(grpc.StatusCode.INVALID_ARGUMENT, "tasks[0].function: unknown 'nope'")
    script = {"n1": refusal, "n2": None}
    with (
        serving(script, journal) as profile,
        make_client(profile, retry_s=10.0) as client,
        pytest.raises(ClientError) as refused,
    ):
        client.get("t-1")
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT, refused.value
    assert "n1 refused the request" in refused.value.detail, refused.value
    assert "unknown 'nope'" in refused.value.detail, refused.value
    # One call, no retry on n1 nor elsewhere, no backoff.
    assert journal.events() == [Call("n1")]


def test_wrong_credentials_are_raised_at_once(journal: Journal) -> None:
    with (
        serving({"n1": None, "n2": None}, journal, token="not-the-token") as profile,
        make_client(profile, retry_s=10.0) as client,
        pytest.raises(ClientError) as refused,
    ):
        client.get("t-1")
    assert refused.value.code is grpc.StatusCode.UNAUTHENTICATED, refused.value
    assert "n1 refused the credentials" in refused.value.detail, refused.value
    assert "wrong token" in refused.value.detail, refused.value
    assert journal.events() == [Call("n1")]


def test_unavailable_node_rotates_after_a_backoff(journal: Journal) -> None:
    script = {"n1": Refuse(grpc.StatusCode.UNAVAILABLE, "not committed; retry"), "n2": None}
    with serving(script, journal) as profile, make_client(profile, retry_s=10.0) as client:
        assert client.get("t-1").id == "t-1"
        assert journal.events() == [Call("n1"), Sleep(LOWEST_BACKOFFS_MS[0]), Call("n2")]
        assert client.get("t-2").id == "t-2"
        assert journal.events()[3:] == [Call("n2")]


def test_threads_share_the_leader_belief(journal: Journal) -> None:
    """A leader one thread's call found is where another thread's call goes first."""
    script = {"n1": not_leader("n1", "n2"), "n2": None}
    with serving(script, journal) as profile, make_client(profile, retry_s=10.0) as client:
        failures: list[BaseException] = []

        def get(task_id: str) -> None:
            try:
                assert client.get(task_id).id == task_id
            except BaseException as error:  # re-raised in the test's thread below
                failures.append(error)

        for task_id in ("t-1", "t-2"):
            thread = threading.Thread(target=get, args=(task_id,))
            thread.start()
            thread.join(THREAD_JOIN_TIMEOUT_S)
            assert not thread.is_alive(), f"get({task_id}) did not return"
        assert not failures, failures
        assert journal.events() == [Call("n1"), Call("n2"), Call("n2")]


@pytest.mark.parametrize(
    ("call_timeout_s", "retry_s"), [(0.0, 1.0), (1.0, 0.0), (-1.0, 1.0), (1.0, float("inf"))]
)
def test_budgets_must_be_finite_and_positive(call_timeout_s: float, retry_s: float) -> None:
    # No server needed: channels connect on first use, and this fails before any.
    profile = Profile(nodes={"n1": "127.0.0.1:1"}, token=TOKEN, insecure=True)
    with pytest.raises(ValueError, match="must be finite and > 0"):
        Client(profile, call_timeout_s=call_timeout_s, retry_s=retry_s)
