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
import select
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

import goml.client as client_module
from goml.api.channels import FAILURE_STALE_MS_MAX
from goml.api.types import LEADER_ADDRESS_KEY, LEADER_ID_KEY
from goml.client import Client, ClientError, Profile
from goml.cluster.certs import init_certs
from goml.proto import api_pb2, api_pb2_grpc

TOKEN = "test-token"
CALL_TIMEOUT_S = 2.0
SERVER_STOP_TIMEOUT_S = 5.0
THREAD_JOIN_TIMEOUT_S = 10.0
CONNECT_DEADLINE_S = 10.0
# The client's backoff is 20..500 ms; a draw in [d/2, d] pinned to d/2 gives these.
SILENT_HOLD_MAX_S = 30.0  # a silent node's call ends long before this, or the test fails
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


class Silent:
    """A node that takes a call and never answers (cut off one way, or stuck): the
    handler holds the call until the client cancels it or its deadline passes, and
    keeps how much of the deadline was left then."""

    def __init__(self) -> None:
        self.ended = threading.Event()
        self.time_left_s: float | None = None

    def hold(self, context: grpc.ServicerContext) -> None:
        gone = threading.Event()
        context.add_callback(gone.set)
        assert gone.wait(SILENT_HOLD_MAX_S), "the client neither cancelled nor timed out"
        self.time_left_s = context.time_remaining()
        self.ended.set()
        context.abort(grpc.StatusCode.CANCELLED, "gone")


def not_leader(node: str, leader: str) -> Refuse:
    # As goml.cluster.service.ControlPlane.require_leader answers.
    return Refuse(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"NOT_LEADER: {node} is not the leader (leader: {leader})",
        leader,
    )


class ScriptedNode(api_pb2_grpc.ClientServicer):
    def __init__(
        self,
        name: str,
        refuse: Refuse | Silent | None,
        journal: Journal,
        addresses: dict[str, str],
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
        if isinstance(refuse, Silent):
            refuse.hold(context)
        elif refuse is not None:
            if refuse.leader_id is not None:
                address = self._addresses.get(refuse.leader_id, "")
                context.set_trailing_metadata(
                    ((LEADER_ID_KEY, refuse.leader_id), (LEADER_ADDRESS_KEY, address))
                )
            context.abort(refuse.code, refuse.message)
        return api_pb2.Task(id=request.task_id, state=api_pb2.PENDING)

    def Watch(
        self, request: api_pb2.WatchRequest, context: grpc.ServicerContext
    ) -> Iterator[api_pb2.TaskEvent]:
        """One SUCCEEDED event per task id asked for, then the stream ends."""
        self._journal.record(Call(self._name))
        metadata = dict(context.invocation_metadata())
        if metadata.get("authorization") != f"Bearer {TOKEN}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong token")
        if isinstance(self._refuse, Refuse):
            context.abort(self._refuse.code, self._refuse.message)
        for index, task_id in enumerate(request.task_ids, start=1):
            yield api_pb2.TaskEvent(
                raft_index=index, task=api_pb2.Task(id=task_id, state=api_pb2.SUCCEEDED)
            )


@dataclass(frozen=True)
class Tls:
    """Mutual TLS as the daemon sets it up: servers use `server_dir`'s CA and node
    certificate `n1`; the profile trusts `client_dir`'s CA and presents its client
    certificate. Two different directories make a mismatch."""

    server_dir: Path
    client_dir: Path


@contextlib.contextmanager
def serving(
    script: Mapping[str, Refuse | Silent | None],
    journal: Journal,
    token: str = TOKEN,
    tls: Tls | None = None,
    insecure_profile: bool = False,
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
            if tls is None:
                port = server.add_insecure_port("127.0.0.1:0")
            else:
                d = tls.server_dir
                credentials = grpc.ssl_server_credentials(
                    [((d / "n1.key").read_bytes(), (d / "n1.pem").read_bytes())],
                    root_certificates=(d / "ca.pem").read_bytes(),
                    require_client_auth=True,
                )
                port = server.add_secure_port("127.0.0.1:0", credentials)
            assert port > 0, f"could not bind a loopback port for {name}"
            addresses[name] = f"127.0.0.1:{port}"
        for server in servers:
            server.start()
        if tls is None or insecure_profile:
            yield Profile(nodes=dict(addresses), token=token, insecure=True)
        else:
            c = tls.client_dir
            yield Profile(
                nodes=dict(addresses),
                token=token,
                ca=c / "ca.pem",
                cert=c / "client.pem",
                key=c / "client.key",
            )
    finally:
        stopped = [server.stop(grace=None) for server in servers]
        for event in stopped:
            assert event.wait(SERVER_STOP_TIMEOUT_S), "a test server did not stop"


@contextlib.contextmanager
def loopback_sockets(count: int, listen: bool) -> Iterator[list[socket.socket]]:
    """`count` TCP sockets bound to loopback ports (so nothing else takes them while the
    test runs), listening or not; closed on exit."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
            if listen:
                sock.listen(8)
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


@contextlib.contextmanager
def closed_ports(count: int) -> Iterator[list[str]]:
    """Loopback addresses that refuse connections: bound but never listened on."""
    with loopback_sockets(count, listen=False) as sockets:
        yield [f"127.0.0.1:{sock.getsockname()[1]}" for sock in sockets]


@pytest.fixture(scope="module")
def two_cas(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two unrelated cluster CAs, each with a node certificate `n1` and a client one."""
    base = tmp_path_factory.mktemp("cas")
    dirs = (base / "a", base / "b")
    for directory in dirs:
        init_certs(directory, ["n1"], ["127.0.0.1", "localhost"])
    return dirs


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


def test_a_hedging_client_connects_to_every_node_before_its_first_call() -> None:
    """A hedged copy must not wait for connection setup (a cross-cloud TLS handshake
    added 300 ms to the first submits after a one-way cut); a client that does not
    hedge connects only when it calls."""
    # Sockets that listen but never speak gRPC: they show who connects.
    with (
        loopback_sockets(2, listen=True) as hedged_to,
        loopback_sockets(1, listen=True) as plain_to,
    ):

        def profile(sockets: list[socket.socket]) -> Profile:
            ports = [sock.getsockname()[1] for sock in sockets]
            nodes = {f"n{i + 1}": f"127.0.0.1:{port}" for i, port in enumerate(ports)}
            return Profile(nodes=nodes, token=TOKEN, insecure=True)

        with (
            Client(profile(hedged_to), retry_s=5.0, hedge_after_s=0.1),
            Client(profile(plain_to), retry_s=5.0),
        ):
            for sock in hedged_to:
                ready, _, _ = select.select([sock], [], [], CONNECT_DEADLINE_S)
                assert ready, f"no connection to {sock.getsockname()} without a call"
            # Something that must not happen, watched for a bounded while.
            ready, _, _ = select.select(plain_to, [], [], 0.5)
            assert not ready, "a client that does not hedge connected before any call"


def test_a_silent_node_is_hedged_to_the_next_one(journal: Journal) -> None:
    silent = Silent()
    with (
        serving({"n1": silent, "n2": None}, journal) as profile,
        Client(
            profile, call_timeout_s=5.0, retry_s=10.0, rng=LowestDraw(), hedge_after_s=0.1
        ) as client,
    ):
        assert client.get("t-1").id == "t-1"
        assert journal.events() == [Call("n1"), Call("n2")]  # the copy, and no backoff
        # n2's answer cancelled n1's copy long before that copy's own deadline.
        assert silent.ended.wait(SILENT_HOLD_MAX_S)
        assert silent.time_left_s is not None and silent.time_left_s > 2.5
        # n1, asked first and outpaced, is avoided: the next call goes to n2 alone.
        assert client.get("t-2").id == "t-2"
        assert journal.calls() == ["n1", "n2", "n2"]


def test_a_silent_node_is_hedged_away_from_the_callers_domain(journal: Journal) -> None:
    # A one-way cut from the caller's domain to the leader: n2, next in order but in the
    # caller's domain, is cut off from the leader too (it would hold the copy); n3, of a
    # third domain, reaches it.
    silent = Silent()
    with (
        serving({"n1": silent, "n2": Silent(), "n3": None}, journal) as profile,
        Client(
            profile,
            call_timeout_s=5.0,
            retry_s=10.0,
            rng=LowestDraw(),
            hedge_after_s=0.1,
            domains={"n1": "azure", "n2": "gcp", "n3": "aws"},
            home_domain="gcp",
        ) as client,
    ):
        assert client.get("t-1").id == "t-1"
        assert journal.events() == [Call("n1"), Call("n3")]
        assert silent.ended.wait(SILENT_HOLD_MAX_S)
        assert silent.time_left_s is not None and silent.time_left_s > 2.5


class SilentOnceThenUnavailable(Silent):
    """Holds the first call (cut off, silent); refuses every later one at once with
    UNAVAILABLE (the same node seen failing by another call)."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = threading.Event()
        self._calls = 0
        self._lock = threading.Lock()

    def hold(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            self._calls += 1
            first = self._calls == 1
        if not first:
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        self.holding.set()
        super().hold(context)


def test_a_call_stranded_on_a_node_another_call_saw_fail_is_hedged_at_once(
    journal: Journal,
) -> None:
    # Call B waits on n1 (silent); call A then finds n1 failing. B is stranded: its copy
    # goes to n2 at once, not at B's own hedge time (3 s), and n1's hold on B is cancelled
    # with nearly all of B's 5 s deadline left.
    n1 = SilentOnceThenUnavailable()
    with (
        serving({"n1": n1, "n2": None}, journal) as profile,
        Client(
            profile, call_timeout_s=5.0, retry_s=10.0, rng=LowestDraw(), hedge_after_s=3.0
        ) as client,
    ):
        results: list[str] = []
        call_b = threading.Thread(target=lambda: results.append(client.get("t-b").id))
        call_b.start()
        try:
            assert n1.holding.wait(SILENT_HOLD_MAX_S), "call B never reached n1"
            assert client.get("t-a").id == "t-a"
            assert n1.ended.wait(SILENT_HOLD_MAX_S)
        finally:
            call_b.join(THREAD_JOIN_TIMEOUT_S)
        assert results == ["t-b"]
        assert n1.time_left_s is not None and n1.time_left_s > 3.5, n1.time_left_s
        assert sorted(journal.calls()) == ["n1", "n1", "n2", "n2"]


def test_without_hedging_a_silent_node_costs_the_call_timeout(journal: Journal) -> None:
    silent = Silent()
    with (
        serving({"n1": silent, "n2": None}, journal) as profile,
        Client(profile, call_timeout_s=1.0, retry_s=10.0, rng=LowestDraw()) as client,
    ):
        assert client.get("t-1").id == "t-1"
        assert silent.ended.wait(SILENT_HOLD_MAX_S)
        assert silent.time_left_s is not None and silent.time_left_s < 0.5  # timed out
        assert journal.calls() == ["n1", "n2"]


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


# --------------------------------------------------------------------------- unreachable


def test_closed_ports_fail_soon_naming_the_cause(journal: Journal) -> None:
    with closed_ports(2) as addresses:
        profile = Profile(
            nodes={"n1": addresses[0], "n2": addresses[1]}, token=TOKEN, insecure=True
        )
        with make_client(profile, retry_s=30.0) as client, pytest.raises(ClientError) as refused:
            started_s = time.monotonic()
            client.get("t-1")
    assert_gave_up_on_fresh_failures(journal, time.monotonic() - started_s)
    error = refused.value
    assert error.code is grpc.StatusCode.UNAVAILABLE, error
    assert error.detail.startswith(
        f"connection refused at every node (n1 at {addresses[0]}, n2 at {addresses[1]})"
    ), error.detail
    assert "gave up" not in error.detail, error.detail  # not the budget running out


def assert_gave_up_on_fresh_failures(journal: Journal, elapsed_s: float) -> None:
    """Given up on the same transport failure at every node: only backoffs (no call
    reached a servicer), as soon as every node's failure is fresh (FAILURE_STALE_MS_MAX
    into the operation; a channel repeats an older failure), long before the budget."""
    assert journal.calls() == [], journal.events()
    assert all(isinstance(event, Sleep) for event in journal.events()), journal.events()
    assert FAILURE_STALE_MS_MAX / 1000 <= elapsed_s < 10.0, elapsed_s


def test_a_node_up_just_after_a_refusal_is_served_not_given_up_on() -> None:
    """A channel repeats its last connection failure until its reconnect backoff ends:
    a node that starts listening just after the client was refused still reads
    "connection refused" for up to half a second. The client must not take that for
    the node being down (it gave up on a cluster whose every node was up: the flaky
    failover test in test_control_plane, a client made while its cluster started)."""
    journal = Journal()
    with closed_ports(1) as (address,):
        profile = Profile(nodes={"n1": address}, token=TOKEN, insecure=True)
        client = make_client(profile, retry_s=10.0)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    try:
        with client:
            with pytest.raises(ClientError, match="connection refused at every node"):
                client.get("t-1")  # the port was closed: refused, the backoff grown
            api_pb2_grpc.add_ClientServicer_to_server(  # type: ignore[no-untyped-call]
                ScriptedNode("n1", None, journal, {"n1": address}), server
            )
            assert server.add_insecure_port(address) > 0, f"{address} was taken meanwhile"
            server.start()
            assert client.get("t-2").id == "t-2"  # served: the refusal its channel repeats is old
        assert journal.calls() == ["n1"]
    finally:
        assert server.stop(grace=None).wait(SERVER_STOP_TIMEOUT_S)


def test_wrong_ca_fails_soon_naming_the_cause(journal: Journal, two_cas: tuple[Path, Path]) -> None:
    server_ca, other_ca = two_cas
    script: dict[str, Refuse | None] = {"n1": None, "n2": None, "n3": None}
    tls = Tls(server_dir=server_ca, client_dir=other_ca)
    with (
        serving(script, journal, tls=tls) as profile,
        make_client(profile, retry_s=30.0) as client,
        pytest.raises(ClientError) as refused,
    ):
        started_s = time.monotonic()
        client.get("t-1")
    assert_gave_up_on_fresh_failures(journal, time.monotonic() - started_s)  # no servicer
    error = refused.value
    assert error.code is grpc.StatusCode.UNAVAILABLE, error
    assert error.detail.startswith("TLS handshake failed at every node (n1 at "), error.detail
    assert "not signed by the profile's CA (wrong CA?)" in error.detail, error.detail


def test_matching_ca_is_served(journal: Journal, two_cas: tuple[Path, Path]) -> None:
    """The TLS set-up of the test above is right but for the CA: with it, calls pass."""
    server_ca, _ = two_cas
    tls = Tls(server_dir=server_ca, client_dir=server_ca)
    with serving({"n1": None}, journal, tls=tls) as profile, make_client(profile, 10.0) as client:
        assert client.get("t-1").id == "t-1"
    assert journal.events() == [Call("n1")]


def test_insecure_profile_against_tls_nodes_fails_soon(
    journal: Journal, two_cas: tuple[Path, Path]
) -> None:
    server_ca, _ = two_cas
    tls = Tls(server_dir=server_ca, client_dir=server_ca)
    with (
        serving({"n1": None}, journal, tls=tls, insecure_profile=True) as profile,
        make_client(profile, retry_s=30.0) as client,
        pytest.raises(ClientError) as refused,
    ):
        started_s = time.monotonic()
        client.get("t-1")
    assert_gave_up_on_fresh_failures(journal, time.monotonic() - started_s)
    assert refused.value.detail.startswith("connection closed during setup at every node"), (
        refused.value.detail
    )


def test_one_node_refusing_one_up_is_served(journal: Journal) -> None:
    with closed_ports(1) as (closed,), serving({"n2": None}, journal) as served:
        profile = Profile(nodes={"n1": closed, **served.nodes}, token=TOKEN, insecure=True)
        with make_client(profile, retry_s=10.0) as client:
            assert client.get("t-1").id == "t-1"
    assert journal.events() == [Sleep(LOWEST_BACKOFFS_MS[0]), Call("n2")]


def test_refusing_and_not_committing_retries_for_the_whole_budget(journal: Journal) -> None:
    """One node down, the other up but failing: a mix, so the client retries as the
    policy says until its budget is spent (the old behaviour, kept)."""
    retry_s = 1.0
    busy = Refuse(grpc.StatusCode.UNAVAILABLE, "not committed; retry")
    with closed_ports(1) as (closed,), serving({"n2": busy}, journal) as served:
        profile = Profile(nodes={"n1": closed, **served.nodes}, token=TOKEN, insecure=True)
        started_s = time.monotonic()
        with make_client(profile, retry_s=retry_s) as client, pytest.raises(ClientError) as given:
            client.get("t-1")
        elapsed_s = time.monotonic() - started_s
    assert f"gave up after {round(retry_s * 1000)} ms" in given.value.detail, given.value
    assert len(journal.calls()) >= 2, journal.events()  # n2 asked again and again
    assert elapsed_s >= retry_s - max(LOWEST_BACKOFFS_MS) / 1000, elapsed_s


def test_different_transport_causes_retry_for_the_whole_budget(
    journal: Journal, two_cas: tuple[Path, Path]
) -> None:
    """n1 refuses connections, n2 closes them (TLS expected): two causes, no verdict."""
    retry_s = 1.0
    server_ca, _ = two_cas
    tls = Tls(server_dir=server_ca, client_dir=server_ca)
    with (
        closed_ports(1) as (closed,),
        serving({"n2": None}, journal, tls=tls, insecure_profile=True) as served,
    ):
        profile = Profile(nodes={"n1": closed, **served.nodes}, token=TOKEN, insecure=True)
        with make_client(profile, retry_s=retry_s) as client, pytest.raises(ClientError) as given:
            client.get("t-1")
    assert "gave up after 1000 ms" in given.value.detail, given.value
    assert len(journal.sleeps_ms()) >= 3, journal.events()


def test_giving_up_on_unreachable_nodes_can_be_turned_off(journal: Journal) -> None:
    retry_s = 0.5
    with closed_ports(1) as (closed,):
        profile = Profile(nodes={"n1": closed}, token=TOKEN, insecure=True)
        client = Client(
            profile,
            call_timeout_s=CALL_TIMEOUT_S,
            retry_s=retry_s,
            rng=LowestDraw(),
            give_up_unreachable=False,
        )
        with client, pytest.raises(ClientError) as given:
            client.get("t-1")
    assert "gave up after 500 ms" in given.value.detail, given.value
    assert "Connection refused" in given.value.detail, given.value
    assert len(journal.sleeps_ms()) >= 3, journal.events()


def test_an_id_longer_than_any_task_id_is_not_found_without_a_call(journal: Journal) -> None:
    with serving({"n1": None}, journal) as profile, make_client(profile, 10.0) as client:
        for call in (client.get, client.cancel):
            with pytest.raises(ClientError) as missing:
                call("x" * 100_000)
            assert missing.value.code is grpc.StatusCode.NOT_FOUND, missing.value
            assert "id of 100000 bytes: ids are at most 256" in missing.value.detail
        assert client.get("x" * 256).id == "x" * 256  # the limit itself is fine
    assert journal.events() == [Call("n1")]


# --------------------------------------------------------------------------- watch


def test_watch_skips_a_node_that_is_down(journal: Journal) -> None:
    with closed_ports(1) as (closed,), serving({"n2": None}, journal) as served:
        profile = Profile(nodes={"n1": closed, **served.nodes}, token=TOKEN, insecure=True)
        with make_client(profile, retry_s=10.0) as client:
            events = list(client.watch(["t-1", "t-2"], timeout_s=5.0))
    assert [(e.raft_index, e.task.id) for e in events] == [(1, "t-1"), (2, "t-2")]
    assert journal.events() == [Sleep(LOWEST_BACKOFFS_MS[0]), Call("n2")]


def test_watch_with_every_node_down_names_them(journal: Journal) -> None:
    with closed_ports(2) as addresses:
        profile = Profile(
            nodes={"n1": addresses[0], "n2": addresses[1]}, token=TOKEN, insecure=True
        )
        with make_client(profile, retry_s=30.0) as client, pytest.raises(ClientError) as down:
            started_s = time.monotonic()
            list(client.watch([], timeout_s=60.0))
    assert_gave_up_on_fresh_failures(journal, time.monotonic() - started_s)
    assert down.value.code is grpc.StatusCode.UNAVAILABLE, down.value
    assert down.value.detail.startswith(
        f"connection refused at every node (n1 at {addresses[0]}, n2 at {addresses[1]})"
    ), down.value.detail


def test_watch_refused_by_the_node_is_raised(journal: Journal) -> None:
    script = {"n1": Refuse(grpc.StatusCode.INVALID_ARGUMENT, "task_ids: too many")}
    with (
        serving(script, journal) as profile,
        make_client(profile, retry_s=10.0) as client,
        pytest.raises(ClientError) as refused,
    ):
        list(client.watch(["t-1"], timeout_s=5.0))
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT, refused.value
    assert refused.value.detail == "n1: task_ids: too many"
    assert journal.events() == [Call("n1")]


def test_wait_watches_without_a_get_first(journal: Journal) -> None:
    """The watch's first event is the task's current state: wait makes one call, not a
    Get then a Watch (a round less, and no gap between the two for an end to fall in)."""
    with serving({"n1": None}, journal) as profile, make_client(profile, 10.0) as client:
        task = client.wait("t-1", timeout_s=5.0)
    assert (task.id, task.state) == ("t-1", api_pb2.SUCCEEDED)
    assert journal.events() == [Call("n1")]


def test_wait_for_a_task_the_node_does_not_know_asks_the_leader(journal: Journal) -> None:
    """NOT_FOUND from the watch (a wrong id, or a node behind the leader) is checked
    with a Get, whose NOT_FOUND is the answer."""
    script = {"n1": Refuse(grpc.StatusCode.NOT_FOUND, "no task 't-1'")}
    with (
        serving(script, journal) as profile,
        make_client(profile, retry_s=10.0) as client,
        pytest.raises(ClientError) as missing,
    ):
        client.wait("t-1", timeout_s=5.0)
    assert missing.value.code is grpc.StatusCode.NOT_FOUND, missing.value
    assert journal.events() == [Call("n1"), Call("n1")]  # the watch, then the Get


# --------------------------------------------------------------------------- reconnect


@contextlib.contextmanager
def hanging_up() -> Iterator[tuple[str, list[int]]]:
    """A loopback address that accepts each connection and closes it at once (a node
    that is not serving yet), and the count of connections it took so far."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.settimeout(0.05)  # a blocked accept() does not see close(): look at `done`
    accepted = [0]
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            accepted[0] += 1
            connection.close()

    thread = threading.Thread(target=accept, daemon=True)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        thread.start()
        yield f"127.0.0.1:{listener.getsockname()[1]}", accepted
    finally:
        done.set()
        if thread.is_alive():
            thread.join(THREAD_JOIN_TIMEOUT_S)
        listener.close()


def test_a_node_not_serving_yet_is_tried_again_every_half_second(journal: Journal) -> None:
    """gRPC's own reconnect backoff starts at 1 s and grows 1.6x to 120 s: a node down
    for the first seconds of a call stays "unavailable" on the client's channel long
    after it is up (measured here: reached 4.5 s after it came up), and each retry
    fails at once with the old error. The client's channels cap the backoff at 0.5 s
    (goml.api.channels): in 6 s they try about 15 times; gRPC's default, 4 times."""
    with hanging_up() as (address, accepted):
        profile = Profile(nodes={"n1": address}, token=TOKEN, insecure=True)
        with (
            Client(
                profile,
                call_timeout_s=1.0,
                retry_s=6.0,
                rng=LowestDraw(),
                give_up_unreachable=False,
            ) as client,
            pytest.raises(ClientError),
        ):
            client.get("t-1")
        assert accepted[0] >= 9, f"{accepted[0]} connections in 6 s"
