"""`goml node add / remove / replace`: membership changes as an operator makes them.

The Raft core makes one single-server change at a time (goml.raft.core). Which steps
an add, a remove or a replace is, when a step counts as done and which refusals are
retried is decided once, in the sans-IO `goml.cluster.membership_plan` (the simulator and
the chaos runner drive the same plans); this module is its gRPC runtime, plus what an
operator does around it:
- add: issue the node's certificate from the cluster CA and write its config (join:
  true, the current members as its peers), then the plan (learner, promoted once caught up);
- remove: a removed node keeps running until its operator stops it (it never campaigns
  again by its own configuration);
- replace OLD NEW: add NEW, then remove OLD.
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
from goml.cluster.membership_plan import (
    Call,
    ChangeDriver,
    Failed,
    Finished,
    MembersView,
    Pause,
    PlanError,
    Refusal,
    Step,
    plan_add,
    plan_remove,
    plan_replace,
)
from goml.proto import api_pb2

CALL_MARGIN_S = 10.0  # a promotion's call waits for its learner, plus this


@dataclass(frozen=True)
class Members:
    voters: tuple[str, ...]
    learners: tuple[str, ...]
    addresses: dict[str, str]  # every member the leader knows an address for
    index: int  # the configuration's log index (0: the bootstrap one)
    committed: bool  # the leader has committed it (an uncommitted one may yet be undone)

    @property
    def view(self) -> MembersView:
        return MembersView(self.voters, self.learners, self.committed)


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


def refusal_of(code: grpc.StatusCode) -> Refusal:
    """How the plan takes a gRPC error (the client follows NOT_LEADER redirects itself)."""
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        return Refusal.PRECONDITION
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Refusal.UNAVAILABLE
    return Refusal.OTHER


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
        return self.run(plan_add(name, address), wait_s)

    def remove(self, name: str) -> Members:
        return self.run(plan_remove(name), 0.0)

    def replace(self, old: str, new: str, address: str, wait_s: float) -> Members:
        try:
            steps = plan_replace(old, new, address)
        except PlanError as error:
            raise MembershipError(str(error)) from None
        return self.run(steps, wait_s)

    def run(self, steps: tuple[Step, ...], wait_s: float) -> Members:
        """Drive `steps` (a `membership_plan` plan) to the end; MembershipError if not."""
        outcome, members = self.drive(steps, wait_s)
        if isinstance(outcome, Failed):
            raise MembershipError(outcome.why)
        assert members is not None
        return members

    def drive(
        self,
        steps: tuple[Step, ...],
        wait_s: float,
        started: Callable[[Step], None] = lambda _: None,
    ) -> tuple[Finished | Failed, Members | None]:
        """Drive `steps` over gRPC: the outcome, and the configuration last read.
        `started` hears each step as it is first sent."""
        driver = ChangeDriver(steps, int(self.timeout_s * 1000), int(wait_s * 1000))
        call_s = min(5.0, self.timeout_s) + (wait_s + CALL_MARGIN_S if wait_s else 0.0)
        said = 0
        sent: set[Step] = set()
        members: Members | None = None
        with Client(self.profile, call_timeout_s=call_s, retry_s=self.timeout_s + wait_s) as c:
            # Bounded by the driver: every step has a deadline, and the loop pauses.
            while True:
                try:
                    members = members_of(c.status())
                    view: MembersView | None = members.view
                except ClientError as error:
                    if refusal_of(error.code) is not Refusal.UNAVAILABLE:
                        return Failed(f"status: {error}"), members
                    view = None
                action = driver.next(view, _now_ms())
                for step in driver.done_steps[said:]:
                    assert members is not None
                    self.say(
                        f"{step}: done (voters {_names(members.voters)}, "
                        f"learners {_names(members.learners)})"
                    )
                said = len(driver.done_steps)
                match action:
                    case Finished() | Failed():
                        return action, members
                    case Pause(delay_ms, why):
                        if "trying again" in why:
                            self.say(why)
                        # Polling a remote cluster: nothing local to wait on.
                        time.sleep(delay_ms / 1000)
                    case Call(step, wait_ms):
                        if step not in sent:
                            sent.add(step)
                            started(step)
                        try:
                            answer = c.change_membership(
                                step.kind.value, step.node, step.address, wait_ms
                            )
                        except ClientError as error:
                            driver.refused(refusal_of(error.code), error.detail)
                            continue
                        driver.answered()
                        self.say(
                            f"{step}: committed at index {answer.index} (voters "
                            f"{_names(answer.voters)}, learners {_names(answer.learners)})"
                        )


def _now_ms() -> int:
    return int(time.monotonic() * 1000)


def _names(names: Iterable[str]) -> str:
    return ",".join(names) or "-"
