"""The Python client: finds the leader, follows NOT_LEADER hints, retries across a
failover with the same idempotency key (so a retry never creates a second task), and
puts a deadline on every call.

Which node to ask and when to ask again is decided by the one retry policy every caller
shares (`goml.api.retry`); failures are classified by the wire's one mapping
(`goml.api.wire.error_from_status`, `goml.api.types.error_kind`). This module only moves
the bytes, reads the clock and sleeps.

A profile (JSON) names a cluster: its nodes, credentials and token. `goml cluster up`
writes one where `default_profile_path()` looks, so the CLI needs no flags locally.
"""

from __future__ import annotations

import json
import math
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from goml.api.retry import Attempt, Decision, RetryConfig, RetryPolicy
from goml.api.types import ApiError, ErrorKind, error_kind
from goml.api.wire import error_from_status
from goml.proto import api_pb2, api_pb2_grpc

TERMINAL_STATES = frozenset({api_pb2.SUCCEEDED, api_pb2.DEAD, api_pb2.CANCELLED})
# Backoff between tries of one call: short enough for a failover to be quick, capped so
# a client never waits long for a cluster that is back.
BACKOFF_MS_MIN = 20
BACKOFF_MS_MAX = 500
# A watch that ends with these just ends: `wait` asks again (through the policy).
_WATCH_ENDS = frozenset({ErrorKind.UNAVAILABLE, ErrorKind.DEADLINE})
_Response = TypeVar("_Response")


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
    whole operation including failover retries."""

    profile: Profile
    call_timeout_s: float = 5.0
    retry_s: float = 30.0
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        if not 0 < self.call_timeout_s < math.inf:
            raise ValueError(f"call_timeout_s must be finite and > 0: {self.call_timeout_s!r}")
        if not 0 < self.retry_s < math.inf:
            raise ValueError(f"retry_s must be finite and > 0: {self.retry_s!r}")
        credentials = self.profile.channel_credentials()
        self._nodes: dict[str, _Node] = {}
        for node_id, address in sorted(self.profile.nodes.items()):
            channel = (
                grpc.secure_channel(address, credentials)
                if credentials is not None
                else grpc.insecure_channel(address)
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
        )
        # One belief for every thread (the chaos runner shares a client): a leader one
        # call found is where the next call of any thread goes. The policy is a plain
        # object, so each of its steps runs under the lock; each call has its own Attempt.
        self._policy = RetryPolicy(config, self.rng, start=self._order[0])
        self._lock = threading.Lock()
        # The policy ends every operation within its budget: at most redirects_max hints
        # in a row, then a backoff of at least backoff_ms_min // 2 ms. So a call takes at
        # most this many tries; more is a bug, not a slow cluster.
        self._tries_max = (config.redirects_max + 1) * (
            self._budget_ms // (BACKOFF_MS_MIN // 2) + 2
        )
        self._metadata = (("authorization", f"Bearer {self.profile.token}"),)

    def close(self) -> None:
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
            lambda stub, t: stub.Submit(request, timeout=t, metadata=self._metadata)
        )
        return list(response.task_ids)

    def get(self, task_id: str) -> api_pb2.Task:
        request = api_pb2.GetRequest(task_id=task_id)
        task: api_pb2.Task = self._call(
            lambda stub, t: stub.Get(request, timeout=t, metadata=self._metadata)
        )
        return task

    def list_tasks(
        self,
        state: int = 0,
        function: str = "",
        agent_id: str = "",
        limit: int = 0,
    ) -> list[api_pb2.Task]:
        request = api_pb2.ListRequest(
            state=state,  # type: ignore[arg-type]  # the stubs want the enum type; ints are it
            function=function,
            agent_id=agent_id,
            limit=limit,
        )
        response = self._call(
            lambda stub, t: stub.List(request, timeout=t, metadata=self._metadata)
        )
        return list(response.tasks)

    def cancel(self, task_id: str) -> api_pb2.Task:
        request = api_pb2.CancelRequest(task_id=task_id)
        response: api_pb2.CancelResponse = self._call(
            lambda stub, t: stub.Cancel(request, timeout=t, metadata=self._metadata)
        )
        return response.task

    def status(self, node_id: str | None = None) -> api_pb2.StatusResponse:
        """The cluster as one node sees it (the leader unless `node_id` is given)."""
        request = api_pb2.StatusRequest(local=node_id is not None)
        if node_id is not None:
            one: api_pb2.StatusResponse = self._one(
                node_id, lambda stub, t: stub.Status(request, timeout=t, metadata=self._metadata)
            )
            return one
        response: api_pb2.StatusResponse = self._call(
            lambda stub, t: stub.Status(request, timeout=t, metadata=self._metadata)
        )
        return response

    def node_ids(self) -> list[str]:
        return list(self._order)

    def wait(self, task_id: str, timeout_s: float) -> api_pb2.Task:
        """Wait until the task reaches a terminal state, by watching it."""
        deadline = time.monotonic() + timeout_s
        while True:
            task = self.get(task_id)
            if task.state in TERMINAL_STATES:
                return task
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"timed out after {timeout_s:g} s waiting for task {task_id}: still "
                    f"{api_pb2.TaskState.Name(task.state)} (is an agent running that fits it?)"
                )
            for event in self.watch([task_id], timeout_s=min(remaining, 5.0)):
                if event.task.state in TERMINAL_STATES:
                    return event.task

    def watch(self, task_ids: list[str], timeout_s: float) -> Iterator[api_pb2.TaskEvent]:
        """Task state changes as a node applies them, until `timeout_s` passes."""
        request = api_pb2.WatchRequest(task_ids=task_ids)
        with self._lock:
            node_id = self._policy.leader
        stream = self._nodes[node_id].stub.Watch(
            request, timeout=timeout_s, metadata=self._metadata
        )
        try:
            yield from stream
        except grpc.RpcError as rpc_error:
            code, error = _classify(rpc_error)
            # The end of `timeout_s` (DEADLINE) or a node gone: the stream just ends.
            if error_kind(error.code) not in _WATCH_ENDS:
                raise ClientError(code, f"{node_id}: {error.message}") from rpc_error

    # --------------------------------------------------------------- plumbing

    def _one(
        self, node_id: str, call: Callable[[api_pb2_grpc.ClientStub, float], _Response]
    ) -> _Response:
        """One call to one node, no retry: the caller asked that node, not the cluster."""
        try:
            return call(self._nodes[node_id].stub, self.call_timeout_s)
        except grpc.RpcError as rpc_error:
            code, error = _classify(rpc_error)
            raise ClientError(code, f"{node_id}: {error.message}") from rpc_error

    def _call(self, call: Callable[[api_pb2_grpc.ClientStub, float], _Response]) -> _Response:
        """`call` on the node the policy believes leads, again wherever and whenever the
        policy says, until it answers or the policy gives up (then ClientError)."""
        attempt = Attempt(_now_ms())
        for _ in range(self._tries_max):
            with self._lock:
                node_id = self._policy.leader
                timeout_ms = self._policy.call_timeout_ms(attempt, _now_ms())
            assert timeout_ms >= 1, timeout_ms
            try:
                response = call(self._nodes[node_id].stub, timeout_ms / 1000)
            except grpc.RpcError as rpc_error:
                code, error = _classify(rpc_error)
                with self._lock:
                    decision = self._policy.failed(
                        attempt, node_id, error_kind(error.code), error.leader_id, _now_ms()
                    )
                if not decision.retry:
                    raise ClientError(code, _why(decision, error)) from rpc_error
                self._sleep_ms(attempt, decision.delay_ms)
                continue
            with self._lock:
                self._policy.succeeded(attempt, node_id)
            return response
        raise AssertionError(f"a call took more than {self._tries_max} tries")

    def _sleep_ms(self, attempt: Attempt, delay_ms: int) -> None:
        # The policy grants a delay only if it ends within the budget; the cut guards
        # against time that passed since it decided.
        left_ms = attempt.started_ms + self._budget_ms - _now_ms()
        delay_ms = min(delay_ms, left_ms)
        if delay_ms > 0:
            time.sleep(delay_ms / 1000)


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def _ms(seconds: float) -> int:
    """A positive duration in whole milliseconds, rounded up (never 0)."""
    assert seconds > 0, seconds
    return max(1, math.ceil(seconds * 1000))


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
