"""The Python client: finds the leader, follows NOT_LEADER hints, retries across a
failover with the same idempotency key (so a retry never creates a second task), and
puts a deadline on every call.

Which node to ask and when to ask again is decided by the one retry policy every caller
shares (`goml.api.retry`); failures are classified by the wire's one mapping
(`goml.api.wire.error_from_status`, `goml.api.types.error_kind`). This module only moves
the bytes, reads the clock and sleeps.

One rule is the client's own, because only a real channel sees it: when every node of
the profile has failed, in one operation, with the same transport failure (connection
refused, TLS handshake failed, host not found...), the client gives up with that cause
instead of retrying for the whole budget: a wrong address or a wrong CA does not heal by
waiting. It gives up once each node has failed so at least FAILURE_STALE_MS_MAX (0.7 s)
into the operation, not at the first round: until its reconnect backoff ends, a channel
repeats its last connection failure without trying again, so a node that started just
after the client first tried it reads "connection refused" for up to that long (a
client made while its cluster starts, then a failover, gave up with every node up). A
mix (one node refusing, another answering) retries as the policy says.

A profile (JSON) names a cluster: its nodes, credentials and token. `goml cluster up`
writes one where `default_profile_path()` looks, so the CLI needs no flags locally.
"""

from __future__ import annotations

import json
import math
import os
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from goml.api.channels import FAILURE_STALE_MS_MAX, reconnect_options
from goml.api.retry import UNREACHABLE_MS, Attempt, Decision, RetryConfig, RetryPolicy
from goml.api.types import LEADER_ID_KEY, ApiError, ErrorKind, error_kind
from goml.api.wire import error_from_status
from goml.cluster.manifest import DEFAULT_LIMITS
from goml.proto import api_pb2, api_pb2_grpc

TERMINAL_STATES = frozenset({api_pb2.SUCCEEDED, api_pb2.DEAD, api_pb2.CANCELLED})
LIST_PAGE_MAX = 10_000  # goml.cluster.node_core.LIST_LIMIT_MAX: one List call's most
# Backoff between tries of one call: short enough for a failover to be quick, capped so
# a client never waits long for a cluster that is back.
BACKOFF_MS_MIN = 20
BACKOFF_MS_MAX = 500
# Task ids are names of the manifest: longer ones cannot exist, and the node's NOT_FOUND
# answer quoting one would not fit in gRPC's metadata (a 100 KB id is an INTERNAL error).
TASK_ID_BYTES_MAX = DEFAULT_LIMITS.name_bytes_max
# A unary call started with `.future`: a grpc.Future that is also the grpc.Call (its
# trailing metadata names the node that served it).
_Unary = Callable[[api_pb2_grpc.ClientStub, float], Any]

# Transport failures as gRPC reports them in an UNAVAILABLE status's details (grpc
# core's wording, lower-cased): the cause and a hint at the fix. First match wins: the
# TLS specifics before the generic handshake failure. An UNAVAILABLE a node answers
# itself ("not committed; retry") matches none of these: that node is up.
_TRANSPORT_CAUSES: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (
        ("bad_signature", "certificate_verify_failed", "certificate verify failed", "unknown ca"),
        "TLS handshake failed",
        "the node's certificate is not signed by the profile's CA (wrong CA?)",
    ),
    (
        ("wrong_version_number",),
        "TLS handshake failed",
        "the node does not speak TLS (an insecure node, a TLS profile?)",
    ),
    (
        ("handshake failed", "ssl_error", "ssl routines"),
        "TLS handshake failed",
        "check the profile's ca, cert and key",
    ),
    (("connection refused",), "connection refused", "is the cluster running, at these addresses?"),
    (
        ("socket closed",),
        "connection closed during setup",
        "the node refused the client certificate, or it expects TLS from an insecure profile",
    ),
    (("connection reset",), "connection reset", "is it a goml node at these addresses?"),
    (
        ("errors resolving", "dns resolution failed", "domain name not found"),
        "host name not found",
        "check the profile's addresses",
    ),
    (("no route to host", "network is unreachable"), "network unreachable", ""),
)


@dataclass(frozen=True)
class _Cause:
    """Why a node could not be reached: `what` is compared across nodes, `hint` shown."""

    what: str
    hint: str
    seen_ms: int  # when the node failed so (the client's monotonic clock)


class ClientError(Exception):
    """A call failed for good. `code`: the status code of the last answer; `detail`: why
    the client stopped (refused, or gave up and on what) and that answer's message."""

    def __init__(self, code: grpc.StatusCode | None, message: str) -> None:
        super().__init__(f"{code.name if code else 'ERROR'}: {message}")
        self.code = code
        self.detail = message


def default_profile_path() -> Path:
    override = os.environ.get("GOML_PROFILE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "goml" / "profile.json"


@dataclass(frozen=True)
class Profile:
    nodes: dict[str, str]  # node id -> host:port
    token: str
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ValueError("a profile needs at least one node address")
        if not self.insecure and not (self.ca and self.cert and self.key):
            raise ValueError("a TLS profile needs ca, cert and key (or insecure: true)")

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if self.insecure:
            return None
        assert self.ca and self.cert and self.key
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key.read_bytes(),
            certificate_chain=self.cert.read_bytes(),
        )

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "nodes": self.nodes,
            "token": self.token,
            "ca": str(self.ca) if self.ca else None,
            "cert": str(self.cert) if self.cert else None,
            "key": str(self.key) if self.key else None,
            "insecure": self.insecure,
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the token
        with os.fdopen(fd, "w") as handle:
            json.dump(body, handle, indent=2)

    @classmethod
    def load(cls, path: Path | None = None) -> Profile:
        path = path or default_profile_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"no goml profile at {path}: start a local cluster with `goml cluster up`, "
                "or pass --profile FILE"
            )
        try:
            body = json.loads(path.read_text())
            return cls(
                nodes={str(k): str(v) for k, v in dict(body["nodes"]).items()},
                token=str(body["token"]),
                ca=Path(body["ca"]) if body.get("ca") else None,
                cert=Path(body["cert"]) if body.get("cert") else None,
                key=Path(body["key"]) if body.get("key") else None,
                insecure=bool(body.get("insecure", False)),
            )
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: not a valid goml profile: {error}") from error


@dataclass
class _Node:
    address: str
    channel: grpc.Channel
    stub: api_pb2_grpc.ClientStub


@dataclass
class Client:
    """A synchronous client. `call_timeout_s` bounds each RPC; `retry_s` bounds the
    whole operation including failover retries. `give_up_unreachable`: give up at once
    when every node failed with the same transport cause (see the module docstring);
    False retries for all of `retry_s`, as the simulator's client does."""

    profile: Profile
    call_timeout_s: float = 5.0
    retry_s: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    give_up_unreachable: bool = True
    # Idempotent calls with no answer after this long go to a second node too (the
    # policy's `hedge_target`); the first answer wins. None: no hedging.
    hedge_after_s: float | None = None
    # Each node's failure domain (its cloud) and this client's, when known: a hedged
    # copy then prefers a node of another domain (goml.api.retry). Empty: node order.
    domains: Mapping[str, str] = field(default_factory=dict)
    home_domain: str = ""

    def __post_init__(self) -> None:
        if not 0 < self.call_timeout_s < math.inf:
            raise ValueError(f"call_timeout_s must be finite and > 0: {self.call_timeout_s!r}")
        if not 0 < self.retry_s < math.inf:
            raise ValueError(f"retry_s must be finite and > 0: {self.retry_s!r}")
        if self.hedge_after_s is not None and not 0 < self.hedge_after_s < self.call_timeout_s:
            raise ValueError(
                f"hedge_after_s must be in (0, call_timeout_s): {self.hedge_after_s!r}"
            )
        credentials = self.profile.channel_credentials()
        self._nodes: dict[str, _Node] = {}
        for node_id, address in sorted(self.profile.nodes.items()):
            channel = (
                grpc.secure_channel(address, credentials, options=reconnect_options())
                if credentials is not None
                else grpc.insecure_channel(address, options=reconnect_options())
            )
            stub = api_pb2_grpc.ClientStub(channel)  # type: ignore[no-untyped-call]
            self._nodes[node_id] = _Node(address, channel, stub)
        self._order = list(self._nodes)
        self._budget_ms = _ms(self.retry_s)
        config = RetryConfig(
            nodes=tuple(self._order),
            call_timeout_ms=_ms(self.call_timeout_s),
            # Enough to walk every node once: more hints in a row mean nodes that name
            # each other (a stale belief), and the policy backs off instead of spinning.
            redirects_max=len(self._order),
            backoff_ms_min=BACKOFF_MS_MIN,
            backoff_ms_max=BACKOFF_MS_MAX,
            give_up_after_ms=self._budget_ms,  # retry_s bounds the whole operation
            # A user with wrong credentials should hear it at once, not after retry_s.
            retry_unauthenticated=False,
            unreachable_ms=UNREACHABLE_MS,
            hedge_after_ms=None if self.hedge_after_s is None else _ms(self.hedge_after_s),
            domains=tuple(self.domains.get(n, "") for n in self._order) if self.domains else (),
            home_domain=self.home_domain,
        )
        # One belief for every thread (the chaos runner shares a client): a leader one
        # call found is where the next call of any thread goes. The policy is a plain
        # object, so each of its steps runs under the lock; each call has its own Attempt.
        self._policy = RetryPolicy(config, self.rng, start=self._order[0])
        self._lock = threading.Lock()
        # The tries waiting for answers now, each woken when the policy learns that a node
        # failed (`RetryPolicy.stranded`); guarded by _lock.
        self._waiting: set[_Finished] = set()
        # The policy ends every operation within its budget: at most redirects_max hints
        # in a row, then a backoff of at least backoff_ms_min // 2 ms. So a call takes at
        # most this many tries; more is a bug, not a slow cluster.
        self._tries_max = (config.redirects_max + 1) * (
            self._budget_ms // (BACKOFF_MS_MIN // 2) + 2
        )
        self._metadata = (("authorization", f"Bearer {self.profile.token}"),)
        # A hedged copy exists to be fast: connect to every node now, not at its first
        # copy, which would otherwise wait for TCP, TLS and HTTP/2 setup (measured in
        # the one-way-partition scenario: +300 ms on the first submits after the cut).
        # Each future ends when its channel is ready, or at close.
        self._connecting: list[grpc.Future] = (
            [grpc.channel_ready_future(n.channel) for n in self._nodes.values()]
            if self.hedge_after_s is not None
            else []
        )

    def close(self) -> None:
        for future in self._connecting:
            future.cancel()
        for node in self._nodes.values():
            node.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ calls

    def submit(
        self,
        function: str,
        args: Any = None,
        *,
        cpu: float = 1.0,
        memory_mb: int = 256,
        gpu: int = 0,
        priority: int = 0,
        max_attempts: int = 3,
        timeout_ms: int = 60_000,
        idempotency_key: str | None = None,
        cloud: str = "",
        region: str = "",
        isolated: bool = False,
    ) -> str:
        spec = api_pb2.TaskSpec(
            function=function,
            args_json=json.dumps(args if args is not None else {}),
            resources=api_pb2.Resources(cpu=cpu, memory_mb=memory_mb, gpu=gpu),
            priority=priority,
            max_attempts=max_attempts,
            timeout_ms=timeout_ms,
            idempotency_key=idempotency_key or str(uuid.uuid4()),
            cloud=cloud,
            region=region,
            isolated=isolated,
        )
        return self.submit_specs([spec])[0]

    def submit_specs(self, specs: list[api_pb2.TaskSpec]) -> list[str]:
        """Submit a batch (all or nothing). Every spec must carry its idempotency key
        (it is what makes the retries below safe)."""
        for spec in specs:
            if not spec.idempotency_key:
                spec.idempotency_key = str(uuid.uuid4())
        request = api_pb2.SubmitRequest(tasks=specs)
        response = self._call(
            lambda stub, t: stub.Submit.future(request, timeout=t, metadata=self._metadata)
        )
        return list(response.task_ids)

    def get(self, task_id: str) -> api_pb2.Task:
        _check_task_id(task_id)
        request = api_pb2.GetRequest(task_id=task_id)
        task: api_pb2.Task = self._call(
            lambda stub, t: stub.Get.future(request, timeout=t, metadata=self._metadata)
        )
        return task

    def list_tasks(
        self,
        state: int = 0,
        function: str = "",
        agent_id: str = "",
        limit: int = 0,
        newest_first: bool = False,
    ) -> list[api_pb2.Task]:
        """Up to `limit` tasks (0: one page of the server's default size), paging as
        needed: a limit above the server's page maximum takes several calls."""
        assert limit >= 0, limit
        found: list[api_pb2.Task] = []
        token = ""
        while True:
            want = min(limit - len(found), LIST_PAGE_MAX) if limit else 0
            page = self.list_page(
                state, function, agent_id, want, page_token=token, newest_first=newest_first
            )
            found.extend(page.tasks)
            token = page.next_page_token
            if not limit or not token or len(found) >= limit:
                return found[:limit] if limit else found

    def list_page(
        self,
        state: int = 0,
        function: str = "",
        agent_id: str = "",
        limit: int = 0,
        *,
        page_token: str = "",
        newest_first: bool = False,
        finished: bool = False,
        finished_after_seq: int = 0,
    ) -> api_pb2.ListResponse:
        """One page of List; page on with its `next_page_token` ("" on the last page)."""
        request = api_pb2.ListRequest(
            state=state,  # type: ignore[arg-type]  # the stubs want the enum type; ints are it
            function=function,
            agent_id=agent_id,
            limit=limit,
            page_token=page_token,
            newest_first=newest_first,
            finished=finished,
            finished_after_seq=finished_after_seq,
        )
        response: api_pb2.ListResponse = self._call(
            lambda stub, t: stub.List.future(request, timeout=t, metadata=self._metadata)
        )
        return response

    def ack_export(self, through_seq: int) -> int:
        """Tell the cluster every finished task up to `through_seq` is archived (an
        admin's call); returns the export watermark."""
        request = api_pb2.AckExportRequest(through_seq=through_seq)
        response: api_pb2.AckExportResponse = self._call(
            lambda stub, t: stub.AckExport.future(request, timeout=t, metadata=self._metadata)
        )
        return int(response.export_watermark_seq)

    def change_membership(
        self, kind: str, node_id: str, address: str = "", wait_ms: int = 0
    ) -> api_pb2.MembershipChangeResponse:
        """One single-server membership change on the leader (an admin's call): kind
        "add-learner" (with `address`), "promote" (waiting up to `wait_ms` for the learner
        to catch up: give this client a call timeout beyond it) or "remove"."""
        request = api_pb2.MembershipChangeRequest(
            kind=kind, node_id=node_id, address=address, wait_ms=wait_ms
        )
        response: api_pb2.MembershipChangeResponse = self._call(
            lambda stub, t: stub.ChangeMembership.future(
                request, timeout=t, metadata=self._metadata
            )
        )
        return response

    def cancel(self, task_id: str) -> api_pb2.Task:
        _check_task_id(task_id)
        request = api_pb2.CancelRequest(task_id=task_id)
        response: api_pb2.CancelResponse = self._call(
            lambda stub, t: stub.Cancel.future(request, timeout=t, metadata=self._metadata)
        )
        return response.task

    def status(self, node_id: str | None = None) -> api_pb2.StatusResponse:
        """The cluster as one node sees it (the leader unless `node_id` is given)."""
        request = api_pb2.StatusRequest(local=node_id is not None)
        if node_id is not None:
            one: api_pb2.StatusResponse = self._one(
                node_id,
                lambda stub, t: stub.Status.future(request, timeout=t, metadata=self._metadata),
            )
            return one
        response: api_pb2.StatusResponse = self._call(
            lambda stub, t: stub.Status.future(request, timeout=t, metadata=self._metadata)
        )
        return response

    def node_ids(self) -> list[str]:
        return list(self._order)

    def wait(self, task_id: str, timeout_s: float) -> api_pb2.Task:
        """Wait until the task reaches a terminal state, by watching it. A watch starts
        with the task's current state (the node registers it and reads the state in one
        step), so no Get goes first: one round less, and an end between a Get and the
        watch cannot be missed. A node that does not know the task (a wrong id, or a
        follower behind the leader) ends the watch with NOT_FOUND; then the leader is
        asked (a Get), which raises NOT_FOUND or finds it and the watch goes on."""
        _check_task_id(task_id)
        deadline = time.monotonic() + timeout_s
        known_only = True  # until the leader said it knows the task
        task: api_pb2.Task | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                state = "not seen" if task is None else api_pb2.TaskState.Name(task.state)
                raise TimeoutError(
                    f"timed out after {timeout_s:g} s waiting for task {task_id}: still "
                    f"{state} (is an agent running that fits it?)"
                )
            seen = False
            try:
                for event in self.watch(
                    [task_id], timeout_s=min(remaining, 5.0), known_only=known_only
                ):
                    seen, task = True, event.task
                    if task.state in TERMINAL_STATES:
                        return task
            except ClientError as error:
                if error.code is not grpc.StatusCode.NOT_FOUND or not known_only:
                    raise
            else:
                if seen:
                    continue
            # NOT_FOUND from the node watched, or a window without the task's state (a
            # node from before `known_only` is silent about a task it does not know).
            task = self.get(task_id)  # NOT_FOUND here is the leader's: the id is wrong
            if task.state in TERMINAL_STATES:
                return task
            known_only = False  # the leader knows it: a node behind will apply it

    def watch(
        self, task_ids: list[str], timeout_s: float, known_only: bool = False
    ) -> Iterator[api_pb2.TaskEvent]:
        """Task state changes as a node applies them (any node serves a watch), until
        `timeout_s` passes; first, each named task's current state on that node. A node
        that cannot be reached, or stops serving, is replaced by the next one the policy
        names, as for any call (the new node starts with the current states again).
        ClientError when the policy gives up (it names the node and why), or at once if
        every node fails with the same transport cause. `known_only`: a task the node
        does not know ends the watch with NOT_FOUND rather than silence."""
        if not 0 < timeout_s < math.inf:
            raise ValueError(f"timeout_s must be finite and > 0: {timeout_s!r}")
        for task_id in task_ids:
            _check_task_id(task_id)
        request = api_pb2.WatchRequest(task_ids=task_ids, known_only=known_only)
        deadline_ms = _now_ms() + _ms(timeout_s)
        # The failures in a row since the last event, as one operation of the policy.
        attempt: Attempt | None = None
        causes: dict[str, _Cause | None] = {}
        tries = 0
        while (left_ms := deadline_ms - _now_ms()) > 0:
            tries += 1
            assert tries <= self._tries_max, f"a watch failed more than {self._tries_max} times"
            with self._lock:
                node_id = self._policy.leader
            stream = self._nodes[node_id].stub.Watch(
                request, timeout=left_ms / 1000, metadata=self._metadata
            )
            try:
                for event in stream:
                    if attempt is not None:
                        with self._lock:
                            self._policy.succeeded(attempt, node_id, _now_ms())
                        attempt, causes, tries = None, {}, 0
                    yield event
                return
            except grpc.RpcError as rpc_error:
                code, error = _classify(rpc_error)
                kind = error_kind(error.code)
                if kind is ErrorKind.DEADLINE:
                    return  # the end of timeout_s: the stream's deadline is the watch's
                if kind is not ErrorKind.UNAVAILABLE:
                    raise ClientError(code, f"{node_id}: {error.message}") from rpc_error
                now_ms = _now_ms()
                attempt = attempt or Attempt(now_ms)
                with self._lock:
                    decision = self._policy.failed(attempt, node_id, kind, "", now_ms)
                if not decision.retry:
                    raise ClientError(code, _why(decision, error)) from rpc_error
                causes[node_id] = _transport_cause(code, error.message, _now_ms())
                self._give_up_if_unreachable(
                    causes, node_id, code, error, rpc_error, attempt.started_ms
                )
                self._sleep_ms(attempt, min(decision.delay_ms, deadline_ms - _now_ms()))
            finally:
                stream.cancel()  # the caller stopped early, or the call ended: no-op then

    # --------------------------------------------------------------- plumbing

    def _one(self, node_id: str, call: _Unary) -> Any:
        """One call to one node, no retry: the caller asked that node, not the cluster."""
        try:
            response = call(self._nodes[node_id].stub, self.call_timeout_s).result()
            return response
        except grpc.RpcError as rpc_error:
            code, error = _classify(rpc_error)
            raise ClientError(code, f"{node_id}: {error.message}") from rpc_error

    def _call(self, call: _Unary) -> Any:
        """`call` on the node the policy believes leads, again wherever and whenever the
        policy says, until it answers or the policy gives up (then ClientError). With
        `hedge_after_s`, a try with no answer by then is also sent to the policy's hedge
        target; the first answer wins and the copies still out are cancelled."""
        attempt = Attempt(_now_ms())
        causes: dict[str, _Cause | None] = {}  # node -> transport cause of its last failure
        for _ in range(self._tries_max):
            with self._lock:
                node_id = self._policy.leader
                timeout_ms = self._policy.call_timeout_ms(attempt, _now_ms())
            assert timeout_ms >= 1, timeout_ms
            finished = _Finished()
            out = {
                node_id: finished.start(node_id, call(self._nodes[node_id].stub, timeout_ms / 1000))
            }
            sent_ms = {node_id: _now_ms()}
            hedge_ms = self._policy.config.hedge_after_ms
            hedge_at_ms = sent_ms[node_id] + hedge_ms if hedge_ms is not None else None
            failure: tuple[grpc.RpcError, Decision, ApiError, grpc.StatusCode] | None = None
            with self._lock:
                self._waiting.add(finished)
            try:
                while out:
                    wait_ms = None if hedge_at_ms is None else max(0, hedge_at_ms - _now_ms())
                    done = finished.next(wait_ms)
                    if done is not None and done[0] == _Finished.WOKEN:
                        with self._lock:  # a node failed: is it the one this try waits on?
                            stranded = hedge_at_ms is not None and self._policy.stranded(
                                node_id, sent_ms[node_id], _now_ms()
                            )
                        if not stranded:
                            continue
                        done = None
                    if done is None:  # no answer by the hedge time (or stranded): a copy
                        hedge_at_ms = None
                        with self._lock:
                            target = self._policy.hedge_target(node_id, _now_ms())
                        if target is not None and target not in out:
                            left_ms = max(1, sent_ms[node_id] + timeout_ms - _now_ms())
                            future = call(self._nodes[target].stub, left_ms / 1000)
                            out[target] = finished.start(target, future)
                            sent_ms[target] = _now_ms()
                        continue
                    answered_by, future = done
                    del out[answered_by]
                    rpc_error = future.exception()
                    if rpc_error is None:
                        served_by = _metadata_value(future.trailing_metadata(), LEADER_ID_KEY)
                        now_ms = _now_ms()
                        with self._lock:
                            for other in out:  # asked first, still silent: slow or cut off
                                if sent_ms[other] < sent_ms[answered_by]:
                                    self._policy.outpaced(other, now_ms)
                                    self._wake_waiting()
                            self._policy.succeeded(attempt, answered_by, now_ms, served_by)
                        response = future.result()
                        return response
                    code, error = _classify(rpc_error)
                    with self._lock:
                        decision = self._policy.failed(
                            attempt, answered_by, error_kind(error.code), error.leader_id, _now_ms()
                        )
                        self._wake_waiting()
                    # A node that answered (even "not the leader") is up: it has no cause.
                    causes[answered_by] = _transport_cause(code, error.message, _now_ms())
                    failure = (rpc_error, decision, error, code)
                    # Another copy still out may yet succeed: wait for it first.
            finally:
                with self._lock:
                    self._waiting.discard(finished)
                for future in out.values():
                    future.cancel()
            assert failure is not None
            rpc_error, decision, error, code = failure
            if not decision.retry:
                raise ClientError(code, _why(decision, error)) from rpc_error
            self._give_up_if_unreachable(
                causes, answered_by, code, error, rpc_error, attempt.started_ms
            )
            self._sleep_ms(attempt, decision.delay_ms)
        raise AssertionError(f"a call took more than {self._tries_max} tries")

    def _wake_waiting(self) -> None:
        """Every waiting try rechecks whether it is stranded (the caller holds _lock)."""
        for waiting in self._waiting:
            waiting.wake()

    def _give_up_if_unreachable(
        self,
        causes: dict[str, _Cause | None],
        node_id: str,
        code: grpc.StatusCode,
        error: ApiError,
        rpc_error: grpc.RpcError,
        started_ms: int,
    ) -> None:
        """Raise ClientError if every node's last failure in this operation (`causes`;
        `node_id`'s is the one just seen) is the same transport failure: retrying for
        the rest of the budget cannot change that."""
        if not self.give_up_unreachable or set(causes) != set(self._order):
            return
        last = causes[node_id]
        if last is None:
            return
        if any(cause is None or cause.what != last.what for cause in causes.values()):
            return
        fresh_ms = started_ms + FAILURE_STALE_MS_MAX
        if any(cause is not None and cause.seen_ms < fresh_ms for cause in causes.values()):
            return  # maybe a channel's old failure repeated (module docstring): try again
        nodes = ", ".join(f"{n} at {self._nodes[n].address}" for n in self._order)
        hint = f": {last.hint}" if last.hint else ""
        raise ClientError(
            code, f"{last.what} at every node ({nodes}){hint}; last error: {error.message}"
        ) from rpc_error

    def _sleep_ms(self, attempt: Attempt, delay_ms: int) -> None:
        # The policy grants a delay only if it ends within the budget; the cut guards
        # against time that passed since it decided.
        left_ms = attempt.started_ms + self._budget_ms - _now_ms()
        delay_ms = min(delay_ms, left_ms)
        if delay_ms > 0:
            time.sleep(delay_ms / 1000)


class _Finished:
    """The calls of one try, in the order they end (a queue fed by gRPC's callbacks),
    and wake-ups (`WOKEN`, no future) when the policy has learnt of a failed node."""

    WOKEN = ""  # not a node id: node ids are never empty

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()

    def start(self, node_id: str, future: Any) -> Any:
        future.add_done_callback(lambda f: self._queue.put((node_id, f)))
        return future

    def wake(self) -> None:
        self._queue.put((self.WOKEN, None))

    def next(self, wait_ms: int | None) -> tuple[str, Any] | None:
        """The next call to end; None if none ends within `wait_ms` (None: wait on)."""
        try:
            return self._queue.get(timeout=None if wait_ms is None else wait_ms / 1000)
        except queue.Empty:
            return None


def _metadata_value(metadata: Any, key: str) -> str:
    for item_key, value in metadata or ():
        if item_key == key:
            return value if isinstance(value, str) else bytes(value).decode("utf-8", "replace")
    return ""


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def _ms(seconds: float) -> int:
    """A positive duration in whole milliseconds, rounded up (never 0)."""
    assert seconds > 0, seconds
    return max(1, math.ceil(seconds * 1000))


def _check_task_id(task_id: str) -> None:
    size_bytes = len(task_id.encode("utf-8", "surrogatepass"))
    if size_bytes > TASK_ID_BYTES_MAX:
        raise ClientError(
            grpc.StatusCode.NOT_FOUND,
            f"no task has an id of {size_bytes} bytes: ids are at most {TASK_ID_BYTES_MAX}",
        )


def _transport_cause(code: grpc.StatusCode, details: str, seen_ms: int) -> _Cause | None:
    """The transport failure an UNAVAILABLE status reports, or None (another code, or a
    node that answered UNAVAILABLE itself)."""
    if code is not grpc.StatusCode.UNAVAILABLE:
        return None
    lowered = details.lower()
    for patterns, what, hint in _TRANSPORT_CAUSES:
        if any(pattern in lowered for pattern in patterns):
            return _Cause(what, hint, seen_ms)
    return None


def _classify(rpc_error: grpc.RpcError) -> tuple[grpc.StatusCode, ApiError]:
    """A gRPC failure as its status code and the wire's API error (the leader hint of a
    NOT_LEADER answer included)."""
    if not isinstance(rpc_error, grpc.Call):  # raised by gRPC without a status
        return grpc.StatusCode.UNKNOWN, error_from_status(
            grpc.StatusCode.UNKNOWN, {}, str(rpc_error)
        )
    code: grpc.StatusCode = rpc_error.code()
    trailing = {
        str(key): value if isinstance(value, str) else value.decode("utf-8", "replace")
        for key, value in rpc_error.trailing_metadata() or ()
    }
    return code, error_from_status(code, trailing, rpc_error.details() or "")


def _why(decision: Decision, error: ApiError) -> str:
    """What a user reads when a call fails for good: the policy's reason (it names the
    node) and the last answer's message; ClientError puts the status code first."""
    assert not decision.retry
    return f"{decision.why}: {error.message}"
