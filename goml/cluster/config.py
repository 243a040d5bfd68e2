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
    token_file: certs/client.token      # the bearer token clients and agents present
    # insecure: true                    # plaintext gRPC: local development only
    raft: {election_timeout_ms_min: 300, election_timeout_ms_max: 600, heartbeat_interval_ms: 50}
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

from goml.cluster.duties import DEFAULT_DUTIES
from goml.cluster.node_core import REQUEST_TIMEOUT_MS_DEFAULT


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
    token_file: Path
    raft: RaftTiming = RaftTiming()
    duties: Duties = Duties()
    request_timeout_s: float = Field(REQUEST_TIMEOUT_MS_DEFAULT / 1000, gt=0)
    # False: `peers` are the bootstrap voters of a new cluster. True: this node joins a
    # running one (added by `goml node add`); it has no configuration of its own until
    # the leader sends it one, so it never campaigns by a list that may be stale.
    join: bool = False

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
    for key in ("data_dir", "secret_file", "token_file"):
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
