"""The Python client: finds the leader, follows NOT_LEADER hints, retries across a
failover with the same idempotency key (so a retry never creates a second task), and
puts a deadline on every call.

A profile (JSON) names a cluster: its nodes, credentials and token. `goml cluster up`
writes one where `default_profile_path()` looks, so the CLI needs no flags locally.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from goml.proto import api_pb2, api_pb2_grpc

LEADER_ID_KEY = "goml-leader-id"
LEADER_ADDRESS_KEY = "goml-leader-address"
TERMINAL_STATES = frozenset({api_pb2.SUCCEEDED, api_pb2.DEAD, api_pb2.CANCELLED})
_RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
)
_Response = TypeVar("_Response")


class ClientError(Exception):
    """A call failed for good: the message says why (status code and server message)."""

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
        self._leader = self._order[0]
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
        node = self._nodes[self._leader]
        stream = node.stub.Watch(request, timeout=timeout_s, metadata=self._metadata)
        try:
            yield from stream
        except grpc.RpcError as error:
            if error.code() not in _RETRYABLE:
                raise ClientError(error.code(), error.details() or "") from error

    # --------------------------------------------------------------- plumbing

    def _one(
        self, node_id: str, call: Callable[[api_pb2_grpc.ClientStub, float], _Response]
    ) -> _Response:
        try:
            return call(self._nodes[node_id].stub, self.call_timeout_s)
        except grpc.RpcError as error:
            raise ClientError(error.code(), error.details() or "") from error

    def _call(self, call: Callable[[api_pb2_grpc.ClientStub, float], _Response]) -> _Response:
        deadline = time.monotonic() + self.retry_s
        backoff_s = 0.02
        last_error = ""
        while True:
            node_id = self._leader
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClientError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"no leader answered within {self.retry_s:.0f} s (last: {last_error})",
                )
            try:
                return call(self._nodes[node_id].stub, min(self.call_timeout_s, remaining))
            except grpc.RpcError as error:
                code = error.code()
                details = error.details() or ""
                last_error = f"{node_id}: {code.name} {details}"
                hint = _leader_hint(error)
                if code is grpc.StatusCode.FAILED_PRECONDITION and hint is not None:
                    if hint in self._nodes and hint != node_id:
                        self._leader = hint
                        continue  # redirected: no backoff
                    self._rotate(node_id)  # a follower that knows no leader yet
                elif code in _RETRYABLE:
                    self._rotate(node_id)
                else:
                    raise ClientError(code, details) from error
            time.sleep(
                min(backoff_s * (1 + self.rng.random()), max(0.0, deadline - time.monotonic()))
            )
            backoff_s = min(backoff_s * 2, 0.5)

    def _rotate(self, failed: str) -> None:
        # Only if no other thread has moved the guess on already: concurrent calls that
        # time out together would otherwise rotate it off a leader another call found.
        if self._leader == failed:
            position = self._order.index(failed)
            self._leader = self._order[(position + 1) % len(self._order)]


def _leader_hint(error: grpc.RpcError) -> str | None:
    """The leader id a follower named in its NOT_LEADER answer ('' when it knows none)."""
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == LEADER_ID_KEY:
            return str(value)
    return None
