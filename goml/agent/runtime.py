"""The real agent runtime: asyncio + grpc.aio around the sans-IO `AgentCore`.

It carries out the core's effects (calls to control-plane nodes, task runs in child
processes, cancellations, logs), feeds the answers back with the monotonic clock in
milliseconds, and ticks the core at `next_deadline_ms()`. It decides nothing itself.

Configuration is a YAML file (JSON is valid YAML, so a JSON file works too):

```yaml
agent_id: aws-1-agent           # required; unique in the cluster
cloud: aws                      # required labels
region: us-east-1
capacity:                       # required: what this agent offers to tasks
  cpu: 2.0                      #   cores
  memory_mb: 4096
  # gpu: 1                      #   optional; detected with nvidia-smi when absent (0 without)
control_plane:                  # required: control-plane node id -> host:port
  aws-1: 10.0.0.1:7000
  aws-2: 10.0.0.2:7000
token_file: /etc/goml/agent.token   # required; this agent's own token (`goml certs`), sent
                                #   as `authorization: Bearer <token>`; re-read when it changes
tls:                            # required unless `insecure: true`
  ca_file: /etc/goml/ca.pem     #   cluster CA
  cert_file: /etc/goml/agent.pem   # mutual TLS: both or neither; the certificate must name
  key_file: /etc/goml/agent.key    #   this agent (SAN URI goml:agent:<agent_id>)
# insecure: true                # plaintext, local development only
# Optional, with their defaults:
heartbeat_interval_ms: 1000     # until the leader's RegisterResponse says otherwise
call_timeout_ms: 2000           # deadline of Register, Heartbeat, Report
lease_wait_ms: 5000             # long-poll hold; the Lease deadline adds call_timeout_ms;
                                #   an idle agent's only call: its parked poll stands in
                                #   for heartbeats (goml.agent.core)
lease_interval_ms_min: 50
lease_tasks_max: 4
tasks_running_max: 4
lease_depth: 8                  # leases held, in multiples of capacity and of
                                #   tasks_running_max: the rest wait in a queue for a slot
                                #   (the leader grants at most its agent_lease_depth_max)
results_pending_max: 256
reports_inflight_max: 4         # report calls in flight to a leader that takes one result each
report_results_max: 32          # results one report call carries (leaders that take several:
report_bytes_max: 1048576       #   then one call in flight), and their bytes (the first always)
retry_backoff_ms_min: 50
retry_backoff_ms_max: 2000
result_bytes_max: 1048576
error_bytes_max: 8192
kill_wait_ms: 5000              # how long a killed task process may take to disappear
worker_tasks_max: 1000          # tasks a warm worker process runs before it is replaced
worker_memory_mb_max: 2048      # a worker whose peak RSS passes this after a task is replaced
seed: null                      # backoff jitter seed; null = from the OS
```

Relative paths are relative to the config file. `arch` is `platform.machine()`.
A node admits an agent's calls only for the agent its certificate and token name
(`goml.api.auth`): a config whose certificate names another agent is refused at load.
A rotated token (`goml certs token rotate`) is picked up from `token_file` without a restart.
Entry points: `main(config_path)` (for `goml agent run --config FILE`) and
`python -m goml.agent --config FILE`; `run_agent(config)` for embedding.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
import grpc.aio
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from goml import event_loop
from goml.agent.core import (
    AgentCore,
    AgentCoreConfig,
    Call,
    CancelTask,
    Effect,
    Log,
    LogLevel,
    RunTask,
)
from goml.agent.runner import TaskRunner
from goml.api.channels import reconnect_options
from goml.api.types import (
    LEADER_ID_KEY,
    LEASE_DEPTH_MAX,
    AgentRequest,
    AgentResponse,
    ErrorKind,
    HeartbeatResponse,
    LeasedTask,
    LeaseResponse,
    Method,
    RegisterResponse,
    ReportResponse,
    Resources,
    error_kind,
)
from goml.api.wire import error_from_status, request_to_pb, response_from_pb
from goml.proto import api_pb2_grpc

__all__ = [
    "AgentConfig",
    "AgentRuntime",
    "CallFailure",
    "ConfigError",
    "ControlPlane",
    "GrpcControlPlane",
    "Served",
    "classify_status",
    "detect_gpus",
    "load_config",
    "main",
    "run_agent",
]

log = logging.getLogger("goml.agent")

NVIDIA_SMI_TIMEOUT_S = 5.0
INBOX_SLACK = 16  # inbox size beyond the calls and runs that can be outstanding
DRAIN_BATCH_MAX = 64  # inputs handled per wake-up before ticking again
SHUTDOWN_WAIT_S = 10.0

AGENT_RESPONSES = (RegisterResponse, HeartbeatResponse, LeaseResponse, ReportResponse)
_LOG_LEVELS = {
    LogLevel.DEBUG: logging.DEBUG,
    LogLevel.INFO: logging.INFO,
    LogLevel.WARNING: logging.WARNING,
    LogLevel.ERROR: logging.ERROR,
}


# --------------------------------------------------------------------------- config


class ConfigError(ValueError):
    """The agent's configuration file is missing, unreadable or invalid."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CapacityConfig(_Model):
    cpu: float = Field(gt=0)
    memory_mb: int = Field(gt=0)
    gpu: int | None = Field(default=None, ge=0)  # None: detect


class TlsConfig(_Model):
    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mutual TLS)")
        return self


class AgentConfig(_Model):
    agent_id: str = Field(min_length=1, max_length=64)
    cloud: str = Field(min_length=1, max_length=64)
    region: str = Field(min_length=1, max_length=64)
    capacity: CapacityConfig
    control_plane: dict[str, str] = Field(min_length=1)
    token_file: Path
    tls: TlsConfig | None = None
    insecure: bool = False
    heartbeat_interval_ms: int = Field(default=1000, ge=1)
    call_timeout_ms: int = Field(default=2000, ge=1)
    lease_wait_ms: int = Field(default=5000, ge=1)
    lease_interval_ms_min: int = Field(default=50, ge=1)
    lease_tasks_max: int = Field(default=4, ge=1)
    tasks_running_max: int = Field(default=4, ge=1)
    lease_depth: int = Field(default=8, ge=1, le=LEASE_DEPTH_MAX)
    results_pending_max: int = Field(default=256, ge=1)
    reports_inflight_max: int = Field(default=4, ge=1)
    report_results_max: int = Field(default=32, ge=1, le=1000)
    report_bytes_max: int = Field(default=1 << 20, ge=1)
    retry_backoff_ms_min: int = Field(default=50, ge=1)
    retry_backoff_ms_max: int = Field(default=2000, ge=1)
    result_bytes_max: int = Field(default=1 << 20, ge=1)
    error_bytes_max: int = Field(default=8192, ge=64)
    kill_wait_ms: int = Field(default=5000, ge=1)
    worker_tasks_max: int = Field(default=1000, ge=1)
    worker_memory_mb_max: int = Field(default=2048, ge=1)
    seed: int | None = None

    @model_validator(mode="after")
    def _check(self) -> AgentConfig:
        if (self.tls is None) == (not self.insecure):
            raise ValueError("give exactly one of `tls` and `insecure: true`")
        if self.retry_backoff_ms_min > self.retry_backoff_ms_max:
            raise ValueError("retry_backoff_ms_min > retry_backoff_ms_max")
        for node_id, address in self.control_plane.items():
            if not node_id or not address:
                raise ValueError(f"control_plane: empty node id or address ({node_id!r})")
        return self

    def core_config(self, arch: str, gpu: int) -> AgentCoreConfig:
        return AgentCoreConfig(
            agent_id=self.agent_id,
            cloud=self.cloud,
            region=self.region,
            arch=arch,
            capacity=Resources(self.capacity.cpu, self.capacity.memory_mb, gpu),
            control_nodes=tuple(sorted(self.control_plane)),
            heartbeat_interval_ms=self.heartbeat_interval_ms,
            call_timeout_ms=self.call_timeout_ms,
            lease_wait_ms=self.lease_wait_ms,
            lease_interval_ms_min=self.lease_interval_ms_min,
            lease_tasks_max=self.lease_tasks_max,
            tasks_running_max=self.tasks_running_max,
            lease_depth=self.lease_depth,
            results_pending_max=self.results_pending_max,
            reports_inflight_max=self.reports_inflight_max,
            report_results_max=self.report_results_max,
            report_bytes_max=self.report_bytes_max,
            retry_backoff_ms_min=self.retry_backoff_ms_min,
            retry_backoff_ms_max=self.retry_backoff_ms_max,
            result_bytes_max=self.result_bytes_max,
            error_bytes_max=self.error_bytes_max,
        )


def _resolve(base: Path, path: Path | None) -> Path | None:
    if path is None:
        return None
    return path if path.is_absolute() else base / path


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate the YAML (or JSON) file; paths inside become absolute."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    try:
        config = AgentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid agent config:\n{exc}") from exc
    base = path.resolve().parent
    tls = config.tls
    if tls is not None:
        ca_file = _resolve(base, tls.ca_file)
        assert ca_file is not None
        tls = TlsConfig(
            ca_file=ca_file,
            cert_file=_resolve(base, tls.cert_file),
            key_file=_resolve(base, tls.key_file),
        )
    token_file = _resolve(base, config.token_file)
    assert token_file is not None
    return config.model_copy(update={"tls": tls, "token_file": token_file})


def read_token(config: AgentConfig) -> str:
    try:
        token = config.token_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"token_file: {exc}") from exc
    if not token:
        raise ConfigError(f"token_file {config.token_file} is empty")
    return token


class TokenSource:
    """The agent's token, read again when its file changes (one stat() a call), so a
    rotated token is used without a restart. A file that is briefly unreadable or empty
    (mid-write) keeps the token read before."""

    def __init__(self, config: AgentConfig) -> None:
        self.path = config.token_file
        self._token = read_token(config)
        self._stamp = self._stat()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            info = self.path.stat()
        except OSError:
            return None
        return (info.st_ino, info.st_size, info.st_mtime_ns)

    def __call__(self) -> str:
        stamp = self._stat()
        if stamp is not None and stamp != self._stamp:
            self._stamp = stamp
            try:
                token = self.path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                log.warning("token_file %s: %s; keeping the token read before", self.path, exc)
                return self._token
            if token and token != self._token:
                log.info("token_file %s changed: using its new token", self.path)
                self._token = token
        return self._token


def channel_credentials(config: AgentConfig) -> grpc.ChannelCredentials | None:
    """TLS credentials from the config; None when `insecure: true`. A certificate that
    names another identity than this agent's is a ConfigError (the nodes would refuse
    every call)."""
    if config.tls is None:
        return None
    tls = config.tls
    try:
        root = tls.ca_file.read_bytes()
        key = tls.key_file.read_bytes() if tls.key_file is not None else None
        chain = tls.cert_file.read_bytes() if tls.cert_file is not None else None
    except OSError as exc:
        raise ConfigError(f"tls: {exc}") from exc
    if chain is not None:
        from goml.cluster.certs import certificate_identity

        named = certificate_identity(chain)
        if isinstance(named, str):
            raise ConfigError(f"tls.cert_file {tls.cert_file}: {named}")
        if (named.role, named.name) != ("agent", config.agent_id):
            raise ConfigError(
                f"tls.cert_file {tls.cert_file} is {named}'s certificate, not that of agent "
                f"{config.agent_id!r}: use this agent's own (`goml certs issue`)"
            )
    credentials: grpc.ChannelCredentials = grpc.ssl_channel_credentials(root, key, chain)
    return credentials


# --------------------------------------------------------------------------- labels


def detect_arch() -> str:
    return platform.machine() or "unknown"


def detect_gpus(command: str = "nvidia-smi") -> int:
    """GPU count from `nvidia-smi --query-gpu=count`; 0 when absent or failing."""
    exe = shutil.which(command)
    if exe is None:
        return 0
    try:
        done = subprocess.run(
            [exe, "--query-gpu=count", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            check=True,
        )
        # One line per GPU, each holding the total count.
        first = done.stdout.strip().splitlines()[0]
        count = int(first.strip())
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        log.warning("GPU detection with %s failed (%s): assuming 0 GPUs", exe, exc)
        return 0
    return max(0, count)


# --------------------------------------------------------------------------- control plane


@dataclass(frozen=True, slots=True)
class CallFailure:
    kind: ErrorKind
    leader_hint: str
    detail: str


def classify_status(code: grpc.StatusCode, trailing: Mapping[str, str], detail: str) -> CallFailure:
    """A gRPC error as the core sees it: the wire's one mapping of status codes
    (`goml.api.wire.error_from_status`), then the retry policy's classes."""
    error = error_from_status(code, trailing, detail)
    return CallFailure(error_kind(error.code), error.leader_id, error.message)


@dataclass(frozen=True, slots=True)
class Served:
    """A node's answer. `served_by`: the leader that served it when the node asked
    forwarded the call ("" when that node served it itself)."""

    response: AgentResponse
    served_by: str = ""


class ControlPlane(Protocol):
    """How the runtime reaches control-plane nodes (gRPC here; a fake in tests)."""

    async def call(
        self, node_id: str, method: Method, request: AgentRequest, timeout_ms: int
    ) -> Served | CallFailure: ...

    async def close(self) -> None: ...


class GrpcControlPlane:
    """One grpc.aio channel per control-plane node, created on first use."""

    def __init__(
        self,
        addresses: Mapping[str, str],
        credentials: grpc.ChannelCredentials | None,
        token: str | Callable[[], str],
    ) -> None:
        assert addresses, "at least one control-plane node"
        assert token, "a token is required"
        self._addresses = dict(addresses)
        self._credentials = credentials
        self._token = token
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, Any] = {}

    def _stub(self, node_id: str) -> Any:
        stub = self._stubs.get(node_id)
        if stub is None:
            address = self._addresses[node_id]
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(address, options=reconnect_options())
            else:
                channel = grpc.aio.secure_channel(
                    address, self._credentials, options=reconnect_options()
                )
            self._channels[node_id] = channel
            stub = api_pb2_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call]
            self._stubs[node_id] = stub
        return stub

    async def call(
        self, node_id: str, method: Method, request: AgentRequest, timeout_ms: int
    ) -> Served | CallFailure:
        if node_id not in self._addresses:
            return CallFailure(ErrorKind.UNAVAILABLE, "", f"no address for node {node_id!r}")
        rpc = getattr(self._stub(node_id), method.value)
        token = self._token if isinstance(self._token, str) else self._token()
        metadata = (("authorization", f"Bearer {token}"),)
        try:
            call = rpc(request_to_pb(request), timeout=timeout_ms / 1000, metadata=metadata)
            reply = await call
            served_by = _strings(await call.trailing_metadata()).get(LEADER_ID_KEY, "")
        except grpc.aio.AioRpcError as exc:
            return classify_status(
                exc.code(), _strings(exc.trailing_metadata()), exc.details() or ""
            )
        response = response_from_pb(method, reply)
        assert isinstance(response, AGENT_RESPONSES), (method, type(response).__name__)
        return Served(response, served_by)

    async def close(self) -> None:
        for node_id in sorted(self._channels):
            await self._channels[node_id].close()
        self._channels.clear()
        self._stubs.clear()


def _strings(metadata: Any) -> dict[str, str]:
    return {
        str(k): v if isinstance(v, str) else v.decode("utf-8", "replace")
        for k, v in (metadata or ())
    }


# --------------------------------------------------------------------------- the loop


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class _Answered:
    request_id: int
    outcome: Served | CallFailure


@dataclass(frozen=True, slots=True)
class _Finished:
    task: LeasedTask
    ok: bool
    text: str


class AgentRuntime:
    """Drives one AgentCore until `stop()`; see the module docstring."""

    def __init__(
        self,
        core: AgentCore,
        control_plane: ControlPlane,
        runner: TaskRunner,
        *,
        inbox_max: int,
        clock_ms: Callable[[], int] = monotonic_ms,
    ) -> None:
        self._core = core
        self._control_plane = control_plane
        self._runner = runner
        self._clock_ms = clock_ms
        self._inbox: asyncio.Queue[_Answered | _Finished] = asyncio.Queue(maxsize=inbox_max)
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        core = self._core
        core.start(self._clock_ms())
        getter: asyncio.Task[_Answered | _Finished] | None = None
        stopper = asyncio.create_task(self._stop.wait())
        try:
            while not self._stop.is_set():
                self._carry_out(core.take_effects())
                now = self._clock_ms()
                deadline = core.next_deadline_ms()
                if deadline is not None and deadline <= now:
                    core.tick(now)
                    continue
                if getter is None:
                    getter = asyncio.create_task(self._inbox.get())
                timeout_s = None if deadline is None else (deadline - now) / 1000
                done, _ = await asyncio.wait(
                    {getter, stopper}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
                )
                if getter in done:
                    self._feed(getter.result())
                    getter = None
                    for _ in range(DRAIN_BATCH_MAX):
                        try:
                            self._feed(self._inbox.get_nowait())
                        except asyncio.QueueEmpty:
                            break
                elif not done:
                    core.tick(self._clock_ms())
            core.stop(self._clock_ms())
            self._carry_out(core.take_effects())
        finally:
            for task in (getter, stopper):
                if task is not None:
                    task.cancel()
            await self._shutdown()

    async def _shutdown(self) -> None:
        await self._runner.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=SHUTDOWN_WAIT_S)
        await self._control_plane.close()

    def _feed(self, item: _Answered | _Finished) -> None:
        now = self._clock_ms()
        match item:
            case _Answered(request_id, CallFailure() as failure):
                self._core.on_call_failed(
                    request_id, failure.kind, failure.leader_hint, failure.detail, now
                )
            case _Answered(request_id, Served(response, served_by)):
                self._core.on_response(request_id, response, now, served_by)
            case _Finished(task, ok, text):
                self._core.on_task_finished(task.task_id, task.epoch, ok, text, now)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _carry_out(self, effects: tuple[Effect, ...]) -> None:
        for effect in effects:
            match effect:
                case Call():
                    self._spawn(self._call(effect))
                case RunTask(task):
                    self._spawn(self._run(task))
                case CancelTask(task_id, epoch):
                    self._runner.cancel(_run_id(task_id, epoch))
                case Log(level, text):
                    log.log(_LOG_LEVELS[level], "%s", text)

    async def _call(self, call: Call) -> None:
        try:
            outcome = await self._control_plane.call(
                call.node_id, call.method, call.request, call.timeout_ms
            )
        except Exception as exc:  # a transport bug must not kill the agent; the core retries
            log.exception("%s call to %s raised", call.method, call.node_id)
            outcome = CallFailure(ErrorKind.UNAVAILABLE, "", f"{type(exc).__name__}: {exc}")
        await self._inbox.put(_Answered(call.request_id, outcome))

    async def _run(self, task: LeasedTask) -> None:
        try:
            outcome = await self._runner.run(
                _run_id(task.task_id, task.epoch),
                task.function,
                task.args_json,
                task.timeout_ms,
                isolated=task.isolated,
            )
        except Exception as exc:  # e.g. the process could not start: report it as failed
            log.exception("task %s could not run", task.task_id)
            await self._inbox.put(_Finished(task, False, f"agent could not run the task: {exc}"))
            return
        if task.isolated:  # what an operator checks when a task asked for isolation
            log.info(
                "task %s ran isolated in pid %d (exit %s)",
                task.task_id,
                outcome.pid,
                outcome.exit_code,
            )
        if not outcome.cancelled:
            await self._inbox.put(_Finished(task, outcome.ok, outcome.text))


def _run_id(task_id: str, epoch: int) -> str:
    return f"{task_id}@{epoch}"


async def run_agent(
    config: AgentConfig,
    *,
    control_plane: ControlPlane | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run an agent until `stop` is set (or forever). `control_plane` defaults to gRPC
    clients built from the config (credentials, token)."""
    gpu = config.capacity.gpu if config.capacity.gpu is not None else detect_gpus()
    core_config = config.core_config(detect_arch(), gpu)
    rng = random.Random(config.seed)  # seed None: from the OS
    if control_plane is None:
        control_plane = GrpcControlPlane(
            config.control_plane, channel_credentials(config), TokenSource(config)
        )
    runner = TaskRunner(
        result_bytes_max=config.result_bytes_max,
        runs_max=config.tasks_running_max,
        kill_wait_ms=config.kill_wait_ms,
        worker_tasks_max=config.worker_tasks_max,
        worker_memory_mb_max=config.worker_memory_mb_max,
    )
    runtime = AgentRuntime(
        AgentCore(core_config, rng),
        control_plane,
        runner,
        inbox_max=config.tasks_running_max + config.reports_inflight_max + INBOX_SLACK,
    )
    log.info(
        "agent %s: %s/%s arch=%s capacity=%s control plane=%s",
        config.agent_id,
        config.cloud,
        config.region,
        core_config.arch,
        core_config.capacity,
        sorted(config.control_plane),
    )

    async def watch_stop() -> None:
        if stop is not None:
            await stop.wait()
            runtime.stop()

    watcher = asyncio.create_task(watch_stop())
    # Fix: start the task forkserver now, in a thread, so the first task does not wait
    # for it (and the loop never blocks on it; see TaskRunner.warm_up).
    warm_up = asyncio.create_task(runner.warm_up())
    try:
        await runtime.run()
    finally:
        watcher.cancel()
        warm_up.cancel()


def main(config_path: str | Path) -> int:
    """`goml agent run --config FILE`: run until SIGINT or SIGTERM; returns an exit code."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await run_agent(config, stop=stop)

    try:
        event_loop.run(run())
    except (ConfigError, event_loop.EventLoopError) as exc:
        log.error("%s", exc)
        return 2
    return 0
