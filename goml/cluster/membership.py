"""`goml node add / remove / replace`: membership changes as an operator makes them.

The Raft core makes one single-server change at a time (goml.raft.core); this module
strings them together the way the dissertation (4.2.1) and etcd's runbooks do:
- add: issue the node's certificate from the cluster CA and write its config (join:
  true, the current members as its peers), add it as a learner, then promote it once it
  has caught up (the leader waits for that: no availability is lost while it copies);
- remove: one change; a removed node keeps running until its operator stops it (it
  never campaigns again by its own configuration);
- replace OLD NEW: add NEW (learner, then voter), then remove OLD. Adding first never
  lowers the number of failures the cluster tolerates, also when OLD is dead already.

Each step is safe to run again: before a change and after a refusal, the configuration
is read back, and a change already made counts as done (a retried call whose first
answer was lost). Refusals that pass (a change still committing, a new leader that has
not committed in its term yet) are retried until the deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from goml.api.auth import Identity, Role
from goml.client import Client, ClientError, Profile
from goml.cluster.certs import identity_files, issue_identity
from goml.cluster.config import NodeFileConfig, TlsFiles, write_node_config
from goml.proto import api_pb2

ADD_LEARNER, PROMOTE, REMOVE = "add-learner", "promote", "remove"
# A refusal that goes away by itself (goml.raft.core's messages): retried.
_PASSING = ("retry shortly", "not committed yet", "has not caught up", "did not catch up")
STEP_PAUSE_S = 0.2  # between tries of a refused step: the cluster needs a commit or two
CALL_MARGIN_S = 10.0  # a promotion's call waits for its learner, plus this


@dataclass(frozen=True)
class Members:
    voters: tuple[str, ...]
    learners: tuple[str, ...]
    addresses: dict[str, str]  # every member the leader knows an address for
    index: int  # the configuration's log index (0: the bootstrap one)
    committed: bool  # the leader has committed it (an uncommitted one may yet be undone)


def members_of(status: api_pb2.StatusResponse) -> Members:
    return Members(
        tuple(status.voters),
        tuple(status.learners),
        {m.id: m.address for m in status.members if m.address},
        int(status.membership_index),
        int(status.membership_index) <= int(status.commit_index),
    )


def join_config(
    template: NodeFileConfig,
    name: str,
    address: str,
    data_dir: Path,
    peers: dict[str, str],
    tls: TlsFiles | None,
    metrics_listen: str | None = None,
) -> NodeFileConfig:
    """The config of a node that joins the cluster `template` (any member's config) is
    part of: the same cluster id, secret, tokens, timing and limits; its own address,
    data directory, certificate; the current members as its peers."""
    if (tls is None) != (template.tls is None):
        raise ValueError("the joining node needs TLS files exactly when the cluster uses TLS")
    # Validated as a file's would be (model_copy would skip the validators).
    return NodeFileConfig.model_validate(
        {
            **template.model_dump(),
            "node_id": name,
            "listen": address,
            "metrics_listen": metrics_listen,
            "data_dir": data_dir,
            "peers": {**{k: v for k, v in peers.items() if k != name}, name: address},
            "tls": tls.model_dump() if tls is not None else None,
            "join": True,
        }
    )


def prepare_node(
    certs_dir: Path,
    template: NodeFileConfig,
    name: str,
    address: str,
    data_dir: Path,
    config_out: Path,
    peers: dict[str, str],
    hosts: list[str],
    metrics_listen: str | None = None,
) -> Path:
    """Issue `name`'s node certificate from the CA in `certs_dir` (kept when it exists:
    a node replaced under its own name keeps its identity) and write its config."""
    tls = None
    if template.tls is not None:
        files = identity_files(certs_dir, Identity(Role.NODE, name))
        if not files.cert.exists():
            host = address.rpartition(":")[0]
            issue_identity(certs_dir, Identity(Role.NODE, name), [host, *hosts])
        tls = TlsFiles(ca=template.tls.ca, cert=files.cert, key=files.key)
    config = join_config(template, name, address, data_dir, peers, tls, metrics_listen)
    config_out.parent.mkdir(parents=True, exist_ok=True)
    write_node_config(config_out, config)
    return config_out


class MembershipError(Exception):
    """A change the cluster refused for good (the message says why), or a deadline."""


class Operator:
    """Membership changes through the admin profile `profile`, each step bounded by
    `timeout_s`; `say` hears one line per step."""

    def __init__(
        self, profile: Profile, timeout_s: float, say: Callable[[str], None] = lambda _: None
    ) -> None:
        self.profile = profile
        self.timeout_s = timeout_s
        self.say = say

    def members(self) -> Members:
        with Client(self.profile, call_timeout_s=5.0, retry_s=self.timeout_s) as client:
            return members_of(client.status())

    def add(self, name: str, address: str, wait_s: float) -> Members:
        """`name` as a learner at `address`, then a voter once it caught up."""
        self._step(ADD_LEARNER, name, address, 0, done=lambda m: name in m.members_all)
        return self._step(
            PROMOTE, name, "", int(wait_s * 1000), done=lambda m: name in m.voters, wait_s=wait_s
        )

    def remove(self, name: str) -> Members:
        return self._step(REMOVE, name, "", 0, done=lambda m: name not in m.members_all)

    def replace(self, old: str, new: str, address: str, wait_s: float) -> Members:
        if old == new:
            raise MembershipError(
                f"replace {old} by itself: remove it, wipe its disk, add it again"
            )
        self.add(new, address, wait_s)
        return self.remove(old)

    def _step(
        self,
        kind: str,
        name: str,
        address: str,
        wait_ms: int,
        done: Callable[[_View], bool],
        wait_s: float = 0.0,
    ) -> Members:
        deadline = time.monotonic() + self.timeout_s + wait_s
        call_s = min(5.0, self.timeout_s) + (wait_s + CALL_MARGIN_S if wait_ms else 0.0)
        with Client(self.profile, call_timeout_s=call_s, retry_s=self.timeout_s + wait_s) as c:
            while True:
                view = _View(members_of(c.status()))
                if done(view) and not view.members.committed and time.monotonic() < deadline:
                    time.sleep(STEP_PAUSE_S)  # made, not committed yet: wait for it
                    continue
                if done(view):
                    self.say(
                        f"{kind} {name}: done (voters {_names(view.voters)}, "
                        f"learners {_names(view.learners)})"
                    )
                    return view.members
                try:
                    answer = c.change_membership(kind, name, address, wait_ms)
                    self.say(
                        f"{kind} {name}: committed at index {answer.index} (voters "
                        f"{_names(answer.voters)}, learners {_names(answer.learners)})"
                    )
                    continue  # read it back: done() decides
                except ClientError as error:
                    passing = error.code is grpc.StatusCode.FAILED_PRECONDITION and any(
                        p in error.detail for p in _PASSING
                    )
                    if error.code is grpc.StatusCode.FAILED_PRECONDITION and not passing:
                        view = _View(members_of(c.status()))
                        if done(view):  # made by an earlier try whose answer was lost
                            continue
                        raise MembershipError(f"{kind} {name}: {error.detail}") from None
                    if error.code not in (
                        grpc.StatusCode.FAILED_PRECONDITION,
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    ):
                        raise MembershipError(f"{kind} {name}: {error}") from None
                    if time.monotonic() > deadline:
                        raise MembershipError(
                            f"{kind} {name}: not done in time; last: {error.detail}"
                        ) from None
                    self.say(f"{kind} {name}: {error.detail}; trying again")
                # Polling a remote cluster: nothing local to wait on.
                time.sleep(STEP_PAUSE_S)


@dataclass(frozen=True)
class _View:
    members: Members

    @property
    def voters(self) -> tuple[str, ...]:
        return self.members.voters

    @property
    def learners(self) -> tuple[str, ...]:
        return self.members.learners

    @property
    def members_all(self) -> tuple[str, ...]:
        return (*self.members.voters, *self.members.learners)


def _names(names: Iterable[str]) -> str:
    return ",".join(names) or "-"
