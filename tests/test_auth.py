"""Who may do what (issue 11, item 17): per-identity certificates and tokens, roles, the
agent-is-itself check, forwarding, and token rotation without a restart.

The pure parts (`goml.api.auth`: the table, names, the tokens format, admission) are
tested directly; everything else against real node processes (`goml node run`) on
loopback with mutual TLS, started by `local.running_cluster`, which stops every process
it started by PID, also when a test fails. Waits poll the remote processes with a
deadline; nothing sleeps to synchronise.

The matrix: each role's credentials (client, admin, agent, node) against every RPC of the
Client and AgentService services, at the leader and through a follower (which forwards
the leader-only ones): allowed calls succeed, the others get PERMISSION_DENIED naming
the role and the method.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from goml.agent.runtime import ConfigError as AgentConfigError
from goml.agent.runtime import channel_credentials, load_config
from goml.api.auth import (
    ADMIN_METHODS,
    AGENT_METHODS,
    CLIENT_METHODS,
    FORWARDED_BY_KEY,
    FORWARDED_FOR_KEY,
    PERMISSIONS,
    CallCredentials,
    Identity,
    Role,
    TokenEntry,
    TokensError,
    TokenTable,
    admit,
    format_tokens,
    name_problem,
    parse_tokens,
    token_digest,
)
from goml.api.types import (
    ApiError,
    ErrorCode,
    GetRequest,
    HeartbeatRequest,
    Method,
    RegisterRequest,
    Resources,
    SubmitRequest,
)
from goml.client import Client, ClientError
from goml.cluster import local
from goml.cluster.certs import (
    TOKENS_FILE,
    TokensFile,
    certificate_identity,
    ensure_identity,
    identity_files,
    init_certs,
    node_token,
    read_tokens,
    retire_tokens,
    revoke_tokens,
    rotate_token,
    write_tokens,
)
from goml.cluster.config import Duties, load_node_config
from goml.proto import api_pb2, api_pb2_grpc

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
CALL_TIMEOUT_S = 5.0
WAIT_S = 30.0
CAPACITY = api_pb2.Resources(cpu=4.0, memory_mb=4096, gpu=0)
SMALL = api_pb2.Resources(cpu=0.5, memory_mb=128, gpu=0)  # fits any agent here
# Short agent timeouts so the agent that runs for real is seen alive quickly.
DUTIES = Duties(agent_timeout_ms=5000, election_grace_ms=3000, lease_ms=5000, renew_before_ms=1000)


def wait_until(predicate: Callable[[], T | None], timeout_s: float, what: str) -> T:
    """Poll a remote process until `predicate` returns something truthy (call errors count
    as "not yet"); fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (grpc.RpcError, ClientError, OSError) as error:
            last = repr(error)
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what} {last}")
        time.sleep(0.05)  # polling a remote process: nothing local to wait on


# =============================================================== pure: goml.api.auth


def test_the_table_gives_every_method_to_a_role_and_nodes_none() -> None:
    assert set(CLIENT_METHODS) | set(AGENT_METHODS) | set(ADMIN_METHODS) == set(Method)
    assert PERMISSIONS[Role.CLIENT] == CLIENT_METHODS
    assert PERMISSIONS[Role.ADMIN] == CLIENT_METHODS | ADMIN_METHODS
    assert not CLIENT_METHODS & ADMIN_METHODS, "admin operations are no client's"
    assert PERMISSIONS[Role.AGENT] == AGENT_METHODS
    assert not PERMISSIONS[Role.ADMIN] & AGENT_METHODS, "an admin is no agent"
    assert not PERMISSIONS[Role.NODE], "a node calls nothing in its own name"


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "is empty"),
        ("a" * 65, "more than 64"),
        ("../x", "'/'"),
        ("a/b", "'/'"),
        ("a\\b", "'\\\\'"),
        ("agent 1", "' '"),
        ("café", "'é'"),
        (".hidden", "must start with a letter or a digit"),
        ("-rf", "must start with a letter or a digit"),
        ("a:b", "':'"),
    ],
)
def test_bad_names_say_why(name: str, problem: str) -> None:
    found = name_problem(name)
    assert found is not None and problem in found, found


@pytest.mark.parametrize("name", ["n1", "aws-1", "gpu_7.lab", "A" * 64, "0"])
def test_good_names(name: str) -> None:
    assert name_problem(name) is None


DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("agent a1\n", "tokens.txt:1: expected 'ROLE NAME sha256:DIGEST', got 2 field(s)"),
        (f"# c\n\nwizard a1 {DIGEST}\n", "tokens.txt:3: unknown role 'wizard'"),
        (f"agent ../a {DIGEST}\n", "tokens.txt:1: name '../a' contains '/'"),
        (f"node n1 {DIGEST}\n", "tokens.txt:1: node tokens come from the cluster secret"),
        ("agent a1 s3cret-token\n", "tokens.txt:1: the digest must be 'sha256:'"),
        ("agent a1 sha256:ABCD\n", "tokens.txt:1: the digest must be 'sha256:'"),
        (
            f"agent a1 {DIGEST}\nagent a2 {DIGEST}\n",
            "tokens.txt:2: the same token digest as line 1",
        ),
    ],
)
def test_tokens_file_errors_name_the_file_and_line(text: str, problem: str) -> None:
    with pytest.raises(TokensError) as refused:
        parse_tokens(text, "tokens.txt")
    assert problem in str(refused.value), str(refused.value)


def test_tokens_format_round_trips_and_lets_one_identity_hold_two_tokens() -> None:
    a1 = Identity(Role.AGENT, "a1")
    entries = (TokenEntry(a1, token_digest("old")), TokenEntry(a1, token_digest("new")))
    parsed = parse_tokens(format_tokens(entries), "x")
    assert parsed == entries
    table = TokenTable(parsed)
    assert table.identify("old") == table.identify("new") == a1
    assert table.identify("other") is None
    with pytest.raises(TokensError, match="one token listed for both"):
        TokenTable([*entries, TokenEntry(Identity(Role.CLIENT, "c"), token_digest("old"))])


def _call(
    token: str | None, uris: tuple[str, ...] = (), by: str | None = None, for_: str | None = None
) -> CallCredentials:
    return CallCredentials(bool(uris), uris, token, by, for_)


def test_admit_pure_cases() -> None:
    """The decisions, one by one (the real cluster below shows them end to end)."""
    a1, a2 = Identity(Role.AGENT, "a1"), Identity(Role.AGENT, "a2")
    n2 = Identity(Role.NODE, "n2")
    table = TokenTable(
        [
            TokenEntry(a1, token_digest("t-a1")),
            TokenEntry(a2, token_digest("t-a2")),
            TokenEntry(Identity(Role.CLIENT, "c"), token_digest("t-c")),
            TokenEntry(n2, token_digest("t-n2")),
        ]
    )
    register = RegisterRequest("a1", "aws", "r", "x86_64", Resources(1.0, 1, 0))

    def code(outcome: object) -> str:
        return outcome.code.value if isinstance(outcome, ApiError) else "OK"

    assert code(admit(_call("t-a1", (a1.uri,)), Method.REGISTER, register, table)) == "OK"
    # Plaintext: the token alone names the caller.
    assert code(admit(_call("t-a1"), Method.REGISTER, register, table)) == "OK"
    # Another agent's token with a1's certificate, or a1's token with a2's certificate.
    assert code(admit(_call("t-a2", (a1.uri,)), Method.REGISTER, register, table)) == (
        "UNAUTHENTICATED"
    )
    refused = admit(_call("t-a2", (a2.uri,)), Method.REGISTER, register, table)
    assert isinstance(refused, ApiError) and refused.code is ErrorCode.PERMISSION_DENIED
    assert "'a2' may not act for agent 'a1'" in refused.message
    # No certificate identity, two identities, none at all, no token.
    for uris in ((), ("goml:agent:a1", "goml:client:c"), ("spiffe://x/y",)):
        outcome = admit(CallCredentials(True, uris, "t-a1"), Method.REGISTER, register, table)
        assert code(outcome) == "UNAUTHENTICATED", uris
    assert code(admit(_call(None, (a1.uri,)), Method.REGISTER, register, table)) == (
        "UNAUTHENTICATED"
    )
    # Forwarding: only a node, in its own name, for a named caller; then the caller's rights.
    get = GetRequest("t1")
    client_uri = "goml:client:c"
    forged = admit(_call("t-c", (client_uri,), "n2", "agent:a1"), Method.REGISTER, register, table)
    assert isinstance(forged, ApiError) and "role client may not forward" in forged.message
    other = admit(_call("t-n2", (n2.uri,), "n3", "client:c"), Method.GET, get, table)
    assert isinstance(other, ApiError) and "only in its own name" in other.message
    bare = admit(_call("t-n2", (n2.uri,)), Method.GET, get, table)
    assert isinstance(bare, ApiError) and "role node may not call Get" in bare.message
    ok = admit(_call("t-n2", (n2.uri,), "n2", "client:c"), Method.GET, get, table)
    assert not isinstance(ok, ApiError) and ok.forwarded and ok.acting.name == "c"
    as_other = admit(_call("t-n2", (n2.uri,), "n2", "agent:a2"), Method.REGISTER, register, table)
    assert isinstance(as_other, ApiError) and "'a2' may not act for agent 'a1'" in as_other.message
    beat = HeartbeatRequest("a1", Resources(1.0, 1, 0), ())
    as_node = admit(_call("t-n2", (n2.uri,), "n2", "node:n2"), Method.HEARTBEAT, beat, table)
    assert isinstance(as_node, ApiError) and "role node may not call Heartbeat" in as_node.message
    submit = SubmitRequest(())
    client_submits = admit(_call("t-c", (client_uri,)), Method.SUBMIT, submit, table)
    assert not isinstance(client_submits, ApiError)
    agent_submits = admit(_call("t-a1", (a1.uri,)), Method.SUBMIT, submit, table)
    assert isinstance(agent_submits, ApiError)
    assert agent_submits.message.startswith("role agent may not call Submit")


# =============================================================== certs: init and issue


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"nodes": [""]}, "node name '' is empty"),
        ({"nodes": ["../n1"]}, "node name '../n1' contains '/'"),
        ({"nodes": ["n1", "n1"]}, "node name 'n1' is given twice"),
        ({"nodes": ["ca"]}, "node name 'ca' is reserved"),
        ({"nodes": ["client"]}, "node name 'client' is reserved"),
        ({"nodes": ["x" * 65]}, "more than 64"),
        ({"agents": ["a/../../etc"]}, "agent name 'a/../../etc' contains '/'"),
        ({"agents": ["ok", ""]}, "agent name '' is empty"),
        ({"clients": ["two words"]}, "client name 'two words' contains ' '"),
        ({"admins": [".."]}, "admin name '..' must start with a letter or a digit"),
        ({"hosts": [""]}, "host '': empty"),
        ({"hosts": ["bad host"]}, "host 'bad host' is neither an IP address nor a DNS name"),
        ({"hosts": ["a..b"]}, "host 'a..b' is neither"),
    ],
)
def test_init_certs_checks_names_before_writing_anything(
    tmp_path: Path, kwargs: dict[str, Any], problem: str
) -> None:
    args: dict[str, Any] = {"nodes": ["n1"], "hosts": ["127.0.0.1"], **kwargs}
    directory = tmp_path / "certs"
    with pytest.raises(ValueError) as refused:
        init_certs(directory, args.pop("nodes"), args.pop("hosts"), **args)
    assert problem in str(refused.value), str(refused.value)
    assert not directory.exists(), "nothing is written for a bad name"


def test_cli_certs_init_bad_agent_is_a_clear_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "goml", "certs", "init", str(tmp_path / "c"), "--node", "n1",
         "--agent", "../evil"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2, done
    assert "agent name '../evil' contains '/'" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "c").exists()


def test_each_certificate_names_its_identity_and_only_nodes_serve(tmp_path: Path) -> None:
    init_certs(tmp_path, ["n1", "n2"], ["127.0.0.1", "localhost"], agents=["n1", "a1"])
    expected = {
        Identity(Role.NODE, "n1"): tmp_path / "n1.pem",
        Identity(Role.AGENT, "n1"): tmp_path / "agents" / "n1.pem",  # no clash with node n1
        Identity(Role.AGENT, "a1"): tmp_path / "agents" / "a1.pem",
        Identity(Role.CLIENT, "client"): tmp_path / "client.pem",
        Identity(Role.ADMIN, "admin"): tmp_path / "admin.pem",
    }
    tokens = TokenTable(read_tokens(tmp_path / TOKENS_FILE))
    for identity, path in expected.items():
        files = identity_files(tmp_path, identity)
        assert files.cert == path
        assert certificate_identity(path.read_bytes()) == identity
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        serves = ExtendedKeyUsageOID.SERVER_AUTH in usages
        assert serves == (identity.role is Role.NODE), identity
        assert ExtendedKeyUsageOID.CLIENT_AUTH in usages
        assert files.key.stat().st_mode & 0o077 == 0
        if files.token is not None:
            assert files.token.stat().st_mode & 0o077 == 0
            assert tokens.identify(files.read_token()) == identity
    assert len(tokens) == 4  # client, admin, two agents; nodes derive theirs
    assert "sha256:" in (tmp_path / TOKENS_FILE).read_text()
    assert (tmp_path / "client.token").read_text() not in (tmp_path / TOKENS_FILE).read_text()


def test_rotate_retire_revoke_edit_the_tokens_file(tmp_path: Path) -> None:
    init_certs(tmp_path, ["n1"], ["127.0.0.1"], agents=["a1"])
    a1 = Identity(Role.AGENT, "a1")
    files = identity_files(tmp_path, a1)
    old = files.read_token()
    rotate_token(tmp_path, a1)
    new = files.read_token()
    assert new != old
    table = TokenTable(read_tokens(tmp_path / TOKENS_FILE))
    assert table.identify(old) == table.identify(new) == a1
    assert retire_tokens(tmp_path, a1) == 1
    table = TokenTable(read_tokens(tmp_path / TOKENS_FILE))
    assert table.identify(old) is None and table.identify(new) == a1
    assert revoke_tokens(tmp_path, a1) == 1
    assert TokenTable(read_tokens(tmp_path / TOKENS_FILE)).identify(new) is None
    with pytest.raises(ValueError, match="revoked, or never issued"):
        rotate_token(tmp_path, a1)
    # A revoked agent stays revoked when a local cluster issues identities again.
    assert ensure_identity(tmp_path, a1, certificate=True) == files
    assert TokenTable(read_tokens(tmp_path / TOKENS_FILE)).identify(new) is None


def test_tokens_file_reload_keeps_the_old_table_on_a_bad_edit(tmp_path: Path) -> None:
    init_certs(tmp_path, ["n1"], ["127.0.0.1"], agents=["a1"])
    path = tmp_path / TOKENS_FILE
    tokens = TokensFile(path, [])
    a1_token = identity_files(tmp_path, Identity(Role.AGENT, "a1")).read_token()
    assert tokens.table().identify(a1_token) is not None
    good = path.read_text()
    path.write_text(good + "agent a2 not-a-digest\n")
    assert tokens.table().identify(a1_token) is not None, "a typo locks nobody out"
    assert tokens.reloads == 0
    path.write_text(good.replace("agent a1", "agent a9"))
    assert tokens.table().identify(a1_token) == Identity(Role.AGENT, "a9")
    assert tokens.reloads == 1
    os.chmod(path, 0o666)
    with pytest.raises(TokensError, match="writable by group or others"):
        TokensFile(path, [])


def test_agent_config_with_another_agents_certificate_is_refused(tmp_path: Path) -> None:
    init_certs(tmp_path, ["n1"], ["127.0.0.1"], agents=["a1", "a2"])
    theirs = identity_files(tmp_path, Identity(Role.AGENT, "a2"))
    config = tmp_path / "agent.yaml"
    config.write_text(
        json.dumps(
            {
                "agent_id": "a1",
                "cloud": "local",
                "region": "lab",
                "capacity": {"cpu": 1.0, "memory_mb": 256},
                "control_plane": {"n1": "127.0.0.1:1"},
                "token_file": str(theirs.token),
                "tls": {
                    "ca_file": str(tmp_path / "ca.pem"),
                    "cert_file": str(theirs.cert),
                    "key_file": str(theirs.key),
                },
            }
        )
    )
    with pytest.raises(AgentConfigError) as refused:
        channel_credentials(load_config(config))
    assert "is agent:a2's certificate, not that of agent 'a1'" in str(refused.value)


# =============================================================== the real cluster


@dataclass(frozen=True)
class Creds:
    """One caller's credentials: certificate and key (None: plaintext) and token."""

    label: str
    ca: Path | None
    cert: Path | None
    key: Path | None
    token: str

    @contextlib.contextmanager
    def channel(self, address: str) -> Iterator[grpc.Channel]:
        if self.cert is None:
            channel = grpc.insecure_channel(address)
        else:
            assert self.ca is not None and self.key is not None
            credentials = grpc.ssl_channel_credentials(
                self.ca.read_bytes(), self.key.read_bytes(), self.cert.read_bytes()
            )
            channel = grpc.secure_channel(address, credentials)
        try:
            yield channel
        finally:
            channel.close()

    def metadata(self, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"), *extra)


@dataclass
class Cluster:
    layout: local.LocalLayout
    processes: list[local.Process]
    client: Client
    tls: bool
    task_keys: dict[str, int] = field(default_factory=dict)

    @property
    def certs(self) -> Path:
        return self.layout.data_dir / "certs"

    def leader(self) -> str:
        return wait_until(lambda: self.client.status().leader_id, WAIT_S, "a leader")

    def follower(self) -> str:
        leader = self.leader()
        return sorted(n for n in self.layout.node_configs if n != leader)[0]

    def address(self, node: str) -> str:
        return self.layout.profile.nodes[node]

    def creds(self, identity: Identity) -> Creds:
        files = ensure_identity(self.certs, identity, certificate=self.tls)
        return self._creds(str(identity), files.cert, files.key, files.read_token())

    def node_creds(self, node: str) -> Creds:
        config = load_node_config(self.layout.node_configs[node])
        secret = config.secret_file.read_text().strip().encode()
        token = node_token(secret, config.cluster_id, node)
        return self._creds(
            f"node:{node}", self.certs / f"{node}.pem", self.certs / f"{node}.key", token
        )

    def _creds(self, label: str, cert: Path, key: Path, token: str) -> Creds:
        if not self.tls:
            return Creds(label, None, None, None, token)
        return Creds(label, self.certs / "ca.pem", cert, key, token)

    def submit(self, prefix: str, priority: int = 0) -> str:
        """A task the harness submits (as the default client), for Get/Cancel/Watch/Lease."""
        number = self.task_keys.get(prefix, 0) + 1
        self.task_keys[prefix] = number
        return self.client.submit(
            "matmul", {"n": 2}, priority=priority, idempotency_key=f"{prefix}-{number}"
        )

    def node_pids(self) -> dict[str, int]:
        return {p.name: p.popen.pid for p in self.processes if p.popen.poll() is None}


@contextlib.contextmanager
def start(data_dir: Path, insecure: bool, agents: int = 0) -> Iterator[Cluster]:
    layout = local.prepare(data_dir, 3, insecure=insecure, duties=DUTIES)
    extra = local.agent_processes(layout, agents)
    with (
        local.running_cluster(layout, extra) as processes,
        Client(layout.profile, call_timeout_s=CALL_TIMEOUT_S, retry_s=WAIT_S) as client,
    ):
        cluster = Cluster(layout, processes, client, tls=not insecure)
        cluster.leader()
        yield cluster


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with start(tmp_path_factory.mktemp("auth"), insecure=False) as cluster:
        yield cluster


def invoke(cluster: Cluster, creds: Creds, node: str, method: Method, agent: str,
           metadata: tuple[tuple[str, str], ...] | None = None) -> tuple[str, str]:  # fmt: skip
    """Call `method` at `node` with `creds` and a request that succeeds when allowed;
    (status code name, details). Agent requests name `agent`."""
    md = metadata if metadata is not None else creds.metadata()
    with creds.channel(cluster.address(node)) as channel:
        client = api_pb2_grpc.ClientStub(channel)  # type: ignore[no-untyped-call]
        agents = api_pb2_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call]
        kw: dict[str, Any] = {"metadata": md, "timeout": CALL_TIMEOUT_S}
        try:
            match method:
                case Method.SUBMIT:
                    key = f"matrix-{creds.label}-{node}-{time.monotonic_ns()}"
                    task = api_pb2.TaskSpec(
                        function="matmul", args_json='{"n": 2}', resources=SMALL,
                        max_attempts=1, timeout_ms=60_000, idempotency_key=key,
                    )  # fmt: skip
                    assert client.Submit(api_pb2.SubmitRequest(tasks=[task]), **kw).task_ids
                case Method.GET:
                    task_id = cluster.submit("get")
                    assert client.Get(api_pb2.GetRequest(task_id=task_id), **kw).id == task_id
                case Method.LIST:
                    client.List(api_pb2.ListRequest(limit=5), **kw)
                case Method.CANCEL:
                    task_id = cluster.submit("cancel")
                    client.Cancel(api_pb2.CancelRequest(task_id=task_id), **kw)
                case Method.STATUS:
                    assert client.Status(api_pb2.StatusRequest(), **kw).leader_id
                case Method.WATCH:
                    task_id = cluster.submit("watch")
                    stream = client.Watch(api_pb2.WatchRequest(task_ids=[task_id]), **kw)
                    try:
                        assert next(stream).task.id == task_id  # the current state first
                    finally:
                        stream.cancel()
                case Method.ACK_EXPORT:  # through the first finished task only
                    cluster.client.cancel(cluster.submit("ack"))
                    client.AckExport(api_pb2.AckExportRequest(through_seq=1), **kw)
                case Method.CHANGE_MEMBERSHIP:  # a learner that never runs, removed again
                    change = api_pb2.MembershipChangeRequest
                    add = change(kind="add-learner", node_id="mx", address="127.0.0.1:9")
                    assert client.ChangeMembership(add, **kw).learners == ["mx"]
                    assert not client.ChangeMembership(
                        change(kind="remove", node_id="mx"), **kw
                    ).learners
                case Method.REGISTER:
                    agents.Register(
                        api_pb2.RegisterRequest(
                            agent_id=agent, cloud="local", region="lab", arch="x86_64",
                            capacity=CAPACITY,
                        ),
                        **kw,
                    )  # fmt: skip
                case Method.HEARTBEAT:
                    agents.Heartbeat(api_pb2.HeartbeatRequest(agent_id=agent, free=CAPACITY), **kw)
                case Method.LEASE:
                    agents.Lease(
                        api_pb2.LeaseRequest(agent_id=agent, free=CAPACITY, max_tasks=1, wait_ms=0),
                        **kw,
                    )
                case Method.REPORT:
                    agents.Report(
                        api_pb2.ReportRequest(
                            agent_id=agent, task_id="no-such-task", epoch=1, success=True,
                            result_json="{}",
                        ),
                        **kw,
                    )  # fmt: skip
        except grpc.RpcError as error:
            return error.code().name, error.details() or ""
    return "OK", ""


ROLES = {
    "client": Identity(Role.CLIENT, "client"),
    "admin": Identity(Role.ADMIN, "admin"),
    "agent": Identity(Role.AGENT, "agent-a"),
}


@pytest.mark.slow
@pytest.mark.parametrize("path", ["leader", "follower"])
@pytest.mark.parametrize("role", [*ROLES, "node"])
def test_authorization_matrix(secured: Cluster, role: str, path: str) -> None:
    """Each role against every RPC of both services, at the leader and through a
    follower (which forwards the leader-only calls under the caller's identity)."""
    if role == "node":
        # A node's own credentials (n-certificate, derived token) at another node.
        leader = secured.leader()
        follower = secured.follower()
        target = leader if path == "leader" else follower
        creds = secured.node_creds(
            next(n for n in sorted(secured.layout.node_configs) if n != target)
        )
        allowed: frozenset[Method] = frozenset()
        agent = "agent-a"
    else:
        identity = ROLES[role]
        creds = secured.creds(identity)
        allowed = PERMISSIONS[identity.role]
        agent = identity.name if identity.role is Role.AGENT else "agent-a"
        target = secured.leader() if path == "leader" else secured.follower()
    outcomes = {m: invoke(secured, creds, target, m, agent) for m in Method}
    wrong = []
    for method, (code, details) in outcomes.items():
        if method in allowed:
            if code != "OK":
                wrong.append(f"{method}: expected OK, got {code} {details}")
        elif code != "PERMISSION_DENIED" or f"role {role} may not call {method}" not in details:
            wrong.append(
                f"{method}: expected PERMISSION_DENIED naming {role}, got {code} {details}"
            )
    assert not wrong, f"{role} at the {path}:\n" + "\n".join(wrong)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["leader", "follower"])
def test_an_agent_cannot_act_as_another(secured: Cluster, path: str) -> None:
    """The issue's exploit: agent-b is registered; agent-a (or a client) re-registering it
    from cloud 'evil' with 64 CPUs, heartbeating, leasing or reporting for it is refused,
    and agent-b's registration stays as it was."""
    node = secured.leader() if path == "leader" else secured.follower()
    b = secured.creds(Identity(Role.AGENT, "agent-b"))
    with b.channel(secured.address(node)) as channel:
        stub = api_pb2_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call]
        stub.Register(
            api_pb2.RegisterRequest(agent_id="agent-b", cloud="good", region="lab",
                                    arch="x86_64", capacity=CAPACITY),
            metadata=b.metadata(), timeout=CALL_TIMEOUT_S,
        )  # fmt: skip
    a = secured.creds(Identity(Role.AGENT, "agent-a"))
    for method in sorted(AGENT_METHODS):
        code, details = invoke(secured, a, node, method, "agent-b")
        assert code == "PERMISSION_DENIED", (method, code, details)
        assert f"role agent 'agent-a' may not act for agent 'agent-b' ({method})" in details
    client = secured.creds(Identity(Role.CLIENT, "client"))
    code, details = invoke(secured, client, node, Method.REGISTER, "agent-b")
    assert (code, "role client may not call Register" in details) == ("PERMISSION_DENIED", True)
    agents = {v.id: v for v in secured.client.status().agents}
    assert agents["agent-b"].cloud == "good", agents["agent-b"]
    assert agents["agent-b"].capacity.cpu == CAPACITY.cpu


@pytest.mark.slow
def test_credentials_that_do_not_match_are_unauthenticated(
    secured: Cluster, tmp_path: Path
) -> None:
    node = secured.leader()
    a = secured.creds(Identity(Role.AGENT, "agent-a"))
    b = secured.creds(Identity(Role.AGENT, "agent-b"))
    # agent-a's certificate with agent-b's token: two factors, two identities.
    mixed = Creds("mixed", a.ca, a.cert, a.key, b.token)
    code, details = invoke(secured, mixed, node, Method.HEARTBEAT, "agent-b")
    assert code == "UNAUTHENTICATED", (code, details)
    assert "the token is not one of agent:agent-a's" in details
    # A certificate from the cluster CA that names no goml identity (as before 0.2).
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    _issue_without_identity(secured.certs, legacy / "old.pem", legacy / "old.key")
    old = Creds("legacy", a.ca, legacy / "old.pem", legacy / "old.key", a.token)
    code, details = invoke(secured, old, node, Method.STATUS, "agent-a")
    assert code == "UNAUTHENTICATED" and "names no goml identity" in details, (code, details)
    # No token at all; an unknown one.
    code, details = invoke(secured, a, node, Method.STATUS, "agent-a", metadata=())
    assert code == "UNAUTHENTICATED" and "missing token" in details
    code, details = invoke(
        secured, a, node, Method.STATUS, "agent-a", metadata=(("authorization", "Bearer nope"),)
    )
    assert code == "UNAUTHENTICATED" and "wrong token" in details


@pytest.mark.slow
def test_only_a_node_may_forward_and_the_leader_checks_whom_for(secured: Cluster) -> None:
    leader = secured.leader()
    follower = secured.follower()
    client = secured.creds(Identity(Role.CLIENT, "client"))
    # A client claiming to be a follower forwarding for agent-a.
    claim = client.metadata((FORWARDED_BY_KEY, follower), (FORWARDED_FOR_KEY, "agent:agent-a"))
    code, details = invoke(secured, client, leader, Method.REGISTER, "agent-a", metadata=claim)
    assert code == "PERMISSION_DENIED" and "role client may not forward" in details, details
    # The same claim through a follower: refused there, never forwarded.
    code, details = invoke(secured, client, follower, Method.STATUS, "agent-a", metadata=claim)
    assert code == "PERMISSION_DENIED" and "role client may not forward" in details, details
    node = secured.node_creds(follower)
    # A node in another node's name.
    other = sorted(n for n in secured.layout.node_configs if n not in (leader, follower))[0]
    as_other = node.metadata((FORWARDED_BY_KEY, other), (FORWARDED_FOR_KEY, "client:client"))
    code, details = invoke(secured, node, leader, Method.STATUS, "x", metadata=as_other)
    assert code == "PERMISSION_DENIED" and "only in its own name" in details, details
    # A forward is admitted as the caller it names, exactly as that caller directly.
    forward = node.metadata((FORWARDED_BY_KEY, follower), (FORWARDED_FOR_KEY, "agent:agent-a"))
    assert invoke(secured, node, leader, Method.HEARTBEAT, "agent-a", metadata=forward)[0] == "OK"
    code, details = invoke(secured, node, leader, Method.HEARTBEAT, "agent-b", metadata=forward)
    assert code == "PERMISSION_DENIED" and "'agent-a' may not act for agent 'agent-b'" in details
    code, details = invoke(secured, node, leader, Method.SUBMIT, "agent-a", metadata=forward)
    assert code == "PERMISSION_DENIED" and "role agent may not call Submit" in details


@pytest.mark.slow
def test_rotated_and_revoked_tokens_without_a_restart(secured: Cluster) -> None:
    """rotate: old and new both work; retire: the old is refused at once, the new works;
    revoke: the identity is refused (its certificate alone is not enough). The nodes are
    the same processes throughout."""
    pids = secured.node_pids()
    identity = Identity(Role.AGENT, "agent-r")
    old = secured.creds(identity)
    leader, follower = secured.leader(), secured.follower()

    def works(creds: Creds) -> bool:
        return all(
            invoke(secured, creds, n, Method.HEARTBEAT, "agent-r")[0] == "OK"
            for n in (leader, follower)
        )

    def refused(creds: Creds) -> bool:
        for n in (leader, follower):
            code, details = invoke(secured, creds, n, Method.HEARTBEAT, "agent-r")
            if code != "UNAUTHENTICATED" or "wrong token" not in details:
                return False
        return True

    assert works(old)
    rotate_token(secured.certs, identity)
    new = secured.creds(identity)
    assert new.token != old.token
    # The nodes stat their tokens file before each call: no wait is needed.
    assert works(old) and works(new)
    assert retire_tokens(secured.certs, identity) == 1
    assert refused(old), "the retired token is refused"
    assert works(new)
    assert revoke_tokens(secured.certs, identity) == 1
    assert refused(new), "a revoked identity is refused"
    assert secured.node_pids() == pids, "no node restarted"


@pytest.mark.slow
def test_sighup_rereads_the_tokens_file(secured: Cluster) -> None:
    """SIGHUP makes each node read its tokens file again, changed or not (for file systems
    whose stat() cannot be trusted to show a change), and stops no node."""

    def reloads(process: local.Process) -> int:
        return process.log_path.read_text().count("tokens: reloaded")

    nodes = [p for p in secured.processes if p.name in secured.layout.node_configs]
    before = {p.name: reloads(p) for p in nodes}
    for process in nodes:
        os.kill(process.popen.pid, signal.SIGHUP)
    for process in nodes:

        def reloaded(process: local.Process = process) -> bool:
            return reloads(process) > before[process.name]

        wait_until(reloaded, WAIT_S, f"{process.name} to reload its tokens on SIGHUP")
    assert all(p.popen.poll() is None for p in nodes), "SIGHUP stops no node"
    client = secured.creds(Identity(Role.CLIENT, "client"))
    assert invoke(secured, client, secured.leader(), Method.STATUS, "x")[0] == "OK"


@pytest.mark.slow
def test_a_running_agent_moves_to_a_rotated_token_with_no_restart(tmp_path: Path) -> None:
    """The agent process rereads its token file: rotate, wait until the agent says it uses
    the new token, retire the old, and it still runs tasks (same PID)."""
    with start(tmp_path / "cluster", insecure=False, agents=1) as cluster:

        def alive() -> bool:
            return any(
                a.id == "agent-1" and a.state == "ALIVE" for a in cluster.client.status().agents
            )

        wait_until(alive, WAIT_S, "agent-1 alive")
        agent = next(p for p in cluster.processes if p.name == "agent-1")
        identity = Identity(Role.AGENT, "agent-1")
        rotate_token(cluster.certs, identity)
        wait_until(
            lambda: "using its new token" in agent.log_path.read_text(),
            WAIT_S,
            "the agent to read its new token",
        )
        assert retire_tokens(cluster.certs, identity) == 1
        task_id = cluster.submit("after-rotation")

        def succeeded() -> bool:
            return api_pb2.TaskState.Name(cluster.client.get(task_id).state) == "SUCCEEDED"

        wait_until(succeeded, WAIT_S, "a task run after the old token was retired")
        assert agent.popen.poll() is None
        assert "UNAUTHENTICATED" not in agent.log_path.read_text()


@pytest.mark.slow
def test_insecure_local_cluster_still_separates_identities(tmp_path: Path) -> None:
    """Plaintext: no certificates, but per-identity tokens still decide who may do what."""
    with start(tmp_path / "plain", insecure=True, agents=1) as cluster:
        wait_until(
            lambda: any(a.id == "agent-1" for a in cluster.client.status().agents),
            WAIT_S,
            "agent-1 (token only) registered",
        )
        leader, follower = cluster.leader(), cluster.follower()
        a = cluster.creds(Identity(Role.AGENT, "agent-1"))
        client = cluster.creds(Identity(Role.CLIENT, "client"))
        for node in (leader, follower):
            assert invoke(cluster, a, node, Method.HEARTBEAT, "agent-1")[0] == "OK"
            code, details = invoke(cluster, a, node, Method.REGISTER, "agent-2")
            assert code == "PERMISSION_DENIED" and "may not act for agent 'agent-2'" in details
            code, details = invoke(cluster, a, node, Method.SUBMIT, "agent-1")
            assert code == "PERMISSION_DENIED" and "role agent may not call Submit" in details
            code, details = invoke(cluster, client, node, Method.LEASE, "agent-1")
            assert code == "PERMISSION_DENIED" and "role client may not call Lease" in details
            claim = client.metadata(
                (FORWARDED_BY_KEY, leader), (FORWARDED_FOR_KEY, "agent:agent-1")
            )
            code, details = invoke(
                cluster, client, node, Method.HEARTBEAT, "agent-1", metadata=claim
            )
            assert code == "PERMISSION_DENIED" and "role client may not forward" in details
        assert invoke(cluster, client, follower, Method.SUBMIT, "x") == ("OK", "")


@pytest.mark.slow
def test_node_refuses_to_start_on_a_bad_tokens_file_or_a_shared_token(tmp_path: Path) -> None:
    layout = local.prepare(tmp_path / "c", 1, insecure=False)
    config_path = layout.node_configs["n1"]
    tokens = layout.data_dir / "certs" / TOKENS_FILE
    write_tokens(tokens, read_tokens(tokens))
    with open(tokens, "a") as handle:
        handle.write("agent a1 plaintext-token\n")
    node = [sys.executable, "-m", "goml", "node", "run", "--config", str(config_path)]
    done = subprocess.run(node, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2, done
    assert f"{tokens}:4: the digest must be 'sha256:'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    legacy = config_path.read_text().replace("tokens_file:", "token_file:")
    config_path.write_text(legacy)
    done = subprocess.run(node, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2, done
    assert "token_file (one token shared by every client and agent) was replaced" in done.stderr
    assert "Traceback" not in done.stderr


def _issue_without_identity(certs: Path, cert_path: Path, key_path: Path) -> None:
    """A client certificate from the cluster CA with no goml SAN URI (the old layout)."""
    ca_cert = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((certs / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("client")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
