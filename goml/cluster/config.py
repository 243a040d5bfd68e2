"""A control-plane node's configuration file (YAML), validated with clear errors.

Example:

    node_id: n1
    listen: 127.0.0.1:7001          # gRPC: client, agent and peer services
    metrics_listen: 127.0.0.1:9101  # Prometheus text format over HTTP (optional)
    data_dir: /var/lib/goml/n1
    peers: {n1: 127.0.0.1:7001, n2: 127.0.0.1:7002, n3: 127.0.0.1:7003}
    cluster_id: local
    tls: {ca: certs/ca.pem, cert: certs/n1.pem, key: certs/n1.key}
    secret_file: certs/cluster.secret   # the Raft cluster secret
    tokens_file: certs/tokens.txt       # accepted tokens: ROLE NAME sha256:DIGEST a line
                                        # (goml.api.auth); reloaded on change or SIGHUP
    # insecure: true                    # plaintext gRPC: local development only
    raft: {election_timeout_ms_min: 300, election_timeout_ms_max: 600, heartbeat_interval_ms: 50}
    retention: {retention_ms: 604800000, finished_tasks_max: 50000, require_export: false}
    limits: {tasks_max: 200000}         # every node the same (the leader's are applied)
    agent_lease_depth_max: 8            # agents may hold leases of up to this many times
                                        # their capacity, queued behind their runs (default
                                        # 1: none); raise it only once every node runs a
                                        # version that has it (earlier ones refuse it)
    # join: true                        # joins a running cluster (`goml node add`): the
                                        # peers are whom to reach; the node learns its
                                        # configuration from the leader

Relative paths are resolved against the config file's directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from goml.cluster.commands import LEASE_DEPTH_MAX
from goml.cluster.duties import DEFAULT_DUTIES, DEFAULT_RETENTION
from goml.cluster.manifest import DEFAULT_LIMITS
from goml.cluster.node_core import REQUEST_TIMEOUT_MS_DEFAULT
from goml.raft.replica import (
    ENTRIES_PER_MESSAGE_MAX,
    INFLIGHT_MESSAGES_MAX,
    MESSAGE_BYTES_MAX,
    UNCOMMITTED_ENTRIES_MAX,
)


class ConfigError(Exception):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsFiles(_Strict):
    ca: Path
    cert: Path
    key: Path


class RaftTiming(_Strict):
    election_timeout_ms_min: int = Field(300, gt=0)
    election_timeout_ms_max: int = Field(600, gt=0)
    heartbeat_interval_ms: int = Field(50, gt=0)
    # The core's other settings (goml.cluster.node_core.tuned_raft); defaults: goml's.
    pre_vote: bool = True
    check_quorum: bool = True
    inflight_messages_max: int = Field(INFLIGHT_MESSAGES_MAX, ge=1)
    entries_per_message_max: int = Field(ENTRIES_PER_MESSAGE_MAX, ge=1)
    uncommitted_entries_max: int = Field(UNCOMMITTED_ENTRIES_MAX, ge=1)
    message_bytes_max: int = Field(MESSAGE_BYTES_MAX, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> RaftTiming:
        if (
            not self.heartbeat_interval_ms
            < self.election_timeout_ms_min
            <= self.election_timeout_ms_max
        ):
            raise ValueError(
                "need heartbeat_interval_ms < election_timeout_ms_min <= election_timeout_ms_max"
            )
        return self


class Duties(_Strict):
    """Defaults: goml.cluster.duties.DEFAULT_DUTIES (the simulator's too)."""

    agent_timeout_ms: int = Field(DEFAULT_DUTIES.agent_timeout_ms, gt=0)
    election_grace_ms: int = Field(DEFAULT_DUTIES.election_grace_ms, ge=0)
    lease_ms: int = Field(DEFAULT_DUTIES.lease_ms, gt=0)
    renew_before_ms: int = Field(DEFAULT_DUTIES.renew_before_ms, gt=0)


class Retention(_Strict):
    """When finished tasks leave the manifest (goml.cluster.duties, module docstring).
    Defaults: goml.cluster.duties.DEFAULT_RETENTION."""

    retention_ms: int = Field(DEFAULT_RETENTION.retention_ms, gt=0)
    finished_tasks_max: int = Field(DEFAULT_RETENTION.finished_tasks_max, gt=0)
    finished_bytes_max: int = Field(DEFAULT_RETENTION.finished_bytes_max, gt=0)
    prune_tasks_max: int = Field(
        DEFAULT_RETENTION.prune_tasks_max, gt=0, le=DEFAULT_LIMITS.batch_tasks_max
    )
    tombstone_ms: int = Field(DEFAULT_RETENTION.tombstone_ms, ge=0)
    tombstones_max: int = Field(DEFAULT_RETENTION.tombstones_max, gt=0)
    require_export: bool = DEFAULT_RETENTION.require_export


class Limits(_Strict):
    """The manifest's limits (goml.cluster.manifest.ManifestLimits). They decide what
    every replica accepts, so they travel through the log: the leader proposes its own
    (SetLimits) when the manifest's differ. Give every node the same. A lower tasks_max
    than the manifest holds waits until retention has pruned enough.
    Defaults: goml.cluster.manifest.DEFAULT_LIMITS."""

    command_bytes_max: int = Field(DEFAULT_LIMITS.command_bytes_max, gt=0)
    batch_tasks_max: int = Field(DEFAULT_LIMITS.batch_tasks_max, gt=0)
    tasks_max: int = Field(DEFAULT_LIMITS.tasks_max, gt=0)
    agents_max: int = Field(DEFAULT_LIMITS.agents_max, gt=0)
    args_bytes_max: int = Field(DEFAULT_LIMITS.args_bytes_max, gt=0)
    result_bytes_max: int = Field(DEFAULT_LIMITS.result_bytes_max, gt=0)
    error_bytes_max: int = Field(DEFAULT_LIMITS.error_bytes_max, gt=0)
    name_bytes_max: int = Field(DEFAULT_LIMITS.name_bytes_max, gt=0)
    lease_tasks_max: int = Field(DEFAULT_LIMITS.lease_tasks_max, gt=0)
    renew_tasks_max: int = Field(DEFAULT_LIMITS.renew_tasks_max, gt=0)


class NodeFileConfig(_Strict):
    node_id: str = Field(min_length=1)
    listen: str
    metrics_listen: str | None = None
    data_dir: Path
    peers: dict[str, str]
    cluster_id: str = "goml"
    tls: TlsFiles | None = None
    insecure: bool = False
    secret_file: Path
    tokens_file: Path
    raft: RaftTiming = RaftTiming()
    duties: Duties = Duties()
    retention: Retention = Retention()
    limits: Limits = Limits()
    request_timeout_s: float = Field(REQUEST_TIMEOUT_MS_DEFAULT / 1000, gt=0)
    agent_lease_depth_max: int = Field(1, ge=1, le=LEASE_DEPTH_MAX)
    # False: `peers` are the bootstrap voters of a new cluster. True: this node joins a
    # running one (added by `goml node add`); it has no configuration of its own until
    # the leader sends it one, so it never campaigns by a list that may be stale.
    join: bool = False

    @model_validator(mode="before")
    @classmethod
    def _no_shared_token(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "token_file" in raw:
            raise ValueError(
                "token_file (one token shared by every client and agent) was replaced by "
                "tokens_file (a token per identity; `goml certs init` writes tokens.txt)"
            )
        return raw

    @model_validator(mode="after")
    def _consistent(self) -> NodeFileConfig:
        if self.node_id not in self.peers:
            raise ValueError(f"node_id {self.node_id!r} is not among peers {sorted(self.peers)}")
        if self.tls is None and not self.insecure:
            raise ValueError("tls is required (or set insecure: true for local development)")
        if self.tls is not None and self.insecure:
            raise ValueError("tls and insecure: true contradict each other")
        return self


def _resolve(base: Path, value: Any) -> Any:
    return (
        str((base / value).resolve())
        if isinstance(value, str) and not Path(value).is_absolute()
        else value
    )


def load_node_config(path: Path) -> NodeFileConfig:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = path.parent
    for key in ("data_dir", "secret_file", "tokens_file"):
        if key in raw:
            raw[key] = _resolve(base, raw[key])
    if isinstance(raw.get("tls"), dict):
        raw["tls"] = {k: _resolve(base, v) for k, v in raw["tls"].items()}
    try:
        return NodeFileConfig.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
            for e in error.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None


def write_node_config(path: Path, config: NodeFileConfig) -> None:
    path.write_text(
        yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False)
    )
