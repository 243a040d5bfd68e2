"""`goml cluster up`: a real local cluster (separate processes on loopback, TLS on) in
the foreground. A node or agent that dies is restarted with a backoff, and given up on
when it keeps crashing (the policy: `goml.cluster.supervise`); Ctrl-C or SIGTERM stops
every process it started, restarted ones included, by PID.

The data directory keeps the certificates, each node's config and Raft store, and the
client profile; `cluster up` on an existing directory starts the same cluster again.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from goml.api.auth import Identity, Role
from goml.client import Client, ClientError, Profile, default_profile_path
from goml.cluster.certs import TOKENS_FILE, ensure_identity, init_certs, init_insecure
from goml.cluster.config import (
    Duties,
    NodeFileConfig,
    TlsFiles,
    load_node_config,
    write_node_config,
)
from goml.cluster.node_core import AGENT_LEASE_DEPTH_NEW_CLUSTER
from goml.cluster.supervise import ProcessExit, RestartPolicy, State, Supervisor

STOP_TIMEOUT_S = 10.0
# The supervision loop wakes on a signal, a child's exit or a restart due; this only
# bounds each wait in case a wake-up were ever lost.
WAKE_S_MAX = 5.0


def free_ports(count: int) -> list[int]:
    """Ports the kernel just handed out: free now (a tiny race, acceptable for local use)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass(frozen=True)
class LocalLayout:
    data_dir: Path
    node_configs: dict[str, Path]
    profile: Profile


def prepare(
    data_dir: Path, nodes: int, insecure: bool, duties: Duties | None = None
) -> LocalLayout:
    """Create (or reuse) certificates, node configs and a client profile under data_dir.

    `duties` overrides the leader's timeouts in new node configs (tests use shorter ones
    so a dead agent is noticed in a second or two); None keeps the production defaults.
    An existing data_dir keeps the configs it has.

    Every client, admin and agent has its own token (and, with TLS, certificate), so an
    agent can act only as itself. `insecure` (plaintext) keeps the tokens but protects
    nothing on the wire: anyone who can read loopback traffic can take a token, and no
    node proves who it is. Local development only."""
    data_dir = data_dir.resolve()
    config_dir = data_dir / "config"
    existing = sorted(config_dir.glob("n*.yaml")) if config_dir.is_dir() else []
    certs = data_dir / "certs"
    if existing:
        configs = {path.stem: path for path in existing}
        first = load_node_config(existing[0])
        if len(configs) != nodes:
            raise ValueError(
                f"{data_dir} holds a {len(configs)}-node cluster; use --nodes {len(configs)} "
                "or another --data-dir"
            )
    else:
        names = [f"n{i + 1}" for i in range(nodes)]
        config_dir.mkdir(parents=True, exist_ok=True)
        if not insecure:
            init_certs(certs, names, ["127.0.0.1", "localhost"])
        else:
            init_insecure(certs)
        ports = free_ports(nodes * 2)
        peers = {name: f"127.0.0.1:{ports[i]}" for i, name in enumerate(names)}
        configs = {}
        for i, name in enumerate(names):
            config = NodeFileConfig(
                node_id=name,
                listen=peers[name],
                metrics_listen=f"127.0.0.1:{ports[nodes + i]}",
                data_dir=data_dir / "nodes" / name,
                peers=peers,
                cluster_id="local",
                tls=None
                if insecure
                else TlsFiles(
                    ca=certs / "ca.pem", cert=certs / f"{name}.pem", key=certs / f"{name}.key"
                ),
                insecure=insecure,
                secret_file=certs / "cluster.secret",
                tokens_file=certs / TOKENS_FILE,
                duties=duties if duties is not None else Duties(),
                agent_lease_depth_max=AGENT_LEASE_DEPTH_NEW_CLUSTER,
            )
            path = config_dir / f"{name}.yaml"
            write_node_config(path, config)
            configs[name] = path
        first = load_node_config(configs[names[0]])
    profile = client_profile(certs, dict(first.peers), insecure=first.insecure)
    profile.save(data_dir / "profile.json")
    # The admin's (export acknowledgement and the other admin calls): `--profile` it.
    admin = certs / "admin"
    replace(
        profile,
        token=admin.with_suffix(".token").read_text().strip(),
        cert=None if first.insecure else admin.with_suffix(".pem"),
        key=None if first.insecure else admin.with_suffix(".key"),
    ).save(data_dir / "admin-profile.json")
    return LocalLayout(data_dir, configs, profile)


def client_profile(certs: Path, nodes: dict[str, str], insecure: bool = False) -> Profile:
    """The client identity `goml certs init` wrote under `certs`, calling `nodes`."""
    return Profile(
        nodes=nodes,
        token=(certs / "client.token").read_text().strip(),
        ca=None if insecure else certs / "ca.pem",
        cert=None if insecure else certs / "client.pem",
        key=None if insecure else certs / "client.key",
        insecure=insecure,
    )


def _write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path


def spawn(name: str, argv: list[str], log_path: Path) -> Process:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        # A new session: Ctrl-C in the terminal reaches `cluster up`, which then stops
        # the children in order instead of them all dying at once.
        popen = subprocess.Popen(
            argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Process(name, popen, log_path)


def stop_all(processes: list[Process], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM every process by PID, wait, then SIGKILL whatever is left."""
    for process in processes:
        if process.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.popen.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in processes:
        remaining = max(0.0, deadline - time.monotonic())
        try:
            process.popen.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.popen.pid, signal.SIGKILL)
            process.popen.wait(timeout=5)


def node_argv(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "goml", "node", "run", "--config", str(config_path)]


def wait_for_leader(
    profile: Profile, timeout_s: float, cancelled: threading.Event | None = None
) -> str:
    """The leader's name once the cluster has one; TimeoutError after `timeout_s` (or
    as soon as `cancelled` is set)."""
    # Each status call is short, so a cancel is seen soon; the deadline is the loop's.
    with Client(profile, call_timeout_s=1.0, retry_s=min(timeout_s, 2.0)) as client:
        deadline = time.monotonic() + timeout_s
        while True:
            if cancelled is not None and cancelled.is_set():
                raise TimeoutError("cancelled while waiting for a leader")
            try:
                status = client.status()
                if status.leader_id:
                    return status.leader_id
            except ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no leader elected within {timeout_s:.0f} s")
            # Polling a remote process: there is nothing to wait on locally.
            if cancelled is not None:
                cancelled.wait(0.1)
            else:
                time.sleep(0.1)


@contextlib.contextmanager
def running_cluster(
    layout: LocalLayout, extra: list[tuple[str, list[str]]] | None = None
) -> Iterator[list[Process]]:
    """Start every node (and `extra` processes); stop all of them on exit, also on error."""
    processes: list[Process] = []
    try:
        for name, path in sorted(layout.node_configs.items()):
            processes.append(spawn(name, node_argv(path), layout.data_dir / "logs" / f"{name}.log"))
        for name, argv in extra or []:
            processes.append(spawn(name, argv, layout.data_dir / "logs" / f"{name}.log"))
        yield processes
    finally:
        stop_all(processes)


def publish_profile(layout: LocalLayout) -> Path:
    """Copy the profile where the CLI looks by default, so `goml status` needs no flags."""
    target = default_profile_path()
    layout.profile.save(target)
    return target


def agent_processes(layout: LocalLayout, count: int) -> list[tuple[str, list[str]]]:
    """Configs for `count` local agents (written once) and the commands that run them."""
    import yaml

    certs = layout.data_dir / "certs"
    processes = []
    for i in range(count):
        name = f"agent-{i + 1}"
        path = layout.data_dir / "config" / f"{name}.yaml"
        # Its own identity: the nodes refuse it anyone else's agent id.
        files = ensure_identity(
            certs, Identity(Role.AGENT, name), certificate=not layout.profile.insecure
        )
        if not path.exists():
            body: dict[str, object] = {
                "agent_id": name,
                "cloud": "local",
                "region": "loopback",
                "capacity": {"cpu": 2.0, "memory_mb": 2048},
                "control_plane": dict(layout.profile.nodes),
                "token_file": str(files.token),
            }
            if layout.profile.insecure:
                body["insecure"] = True
            else:
                body["tls"] = {
                    "ca_file": str(certs / "ca.pem"),
                    "cert_file": str(files.cert),
                    "key_file": str(files.key),
                }
            path.write_text(yaml.safe_dump(body, sort_keys=False))
        argv = [sys.executable, "-m", "goml", "agent", "run", "--config", str(path)]
        processes.append((name, argv))
    return processes


# ------------------------------------------------------------------ supervision


def exit_of(returncode: int) -> ProcessExit:
    """A Popen return code as the supervision core reads it (negative: a signal)."""
    if returncode >= 0:
        return ProcessExit(returncode)
    try:
        return ProcessExit(None, signal.Signals(-returncode).name)
    except ValueError:
        return ProcessExit(None, f"signal {-returncode}")


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class ProcessSupervisor:
    """The runtime of `goml.cluster.supervise.Supervisor`: spawns the processes it names,
    waits for children to exit, for SIGINT/SIGTERM or for the next restart, and stops by
    PID. Every wake-up comes through one pipe: the signal module writes to it on a
    signal (SIGCHLD included), `wake()` from any thread; nothing is polled.

    Each process's PID is kept in `data_dir/run/NAME.pid` while it runs (`kill -9 $(cat
    goml-data/run/n2.pid)` to try a crash), its output appended to `logs/NAME.log`."""

    def __init__(
        self,
        commands: dict[str, tuple[list[str], Path]],  # name -> (argv, log path), in order
        run_dir: Path,
        policy: RestartPolicy,
        say: Callable[[str], None],
    ) -> None:
        self.commands = commands
        self.core = Supervisor(list(commands), policy, _monotonic_ms())
        self.processes: dict[str, Process] = {}  # the latest process of each name
        self.run_dir = run_dir
        self.stop_requested = threading.Event()
        self._say = say
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._pipe_lock = threading.Lock()  # wake() from a thread never writes a closed fd
        self._pipe_open = True

    def wake(self) -> None:
        """Wake the loop (from any thread): it then runs its `on_wake` callback."""
        with self._pipe_lock:
            if not self._pipe_open:
                return  # the loop has ended: nothing to wake
            with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending anyway
                os.write(self._write_fd, b"w")

    def request_stop(self) -> None:
        self.stop_requested.set()
        self.wake()

    def run(self, on_wake: Callable[[], None]) -> bool:
        """Supervise until a stop is asked (True) or every process stopped or was given
        up on (False); then stop every process still running, by PID, and wait."""
        handlers = {}
        previous_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        try:
            for signum in (signal.SIGINT, signal.SIGTERM):
                handlers[signum] = signal.signal(signum, lambda *_: self.stop_requested.set())
            # A Python handler (even one that does nothing) makes a child's exit write to
            # the wake-up pipe.
            handlers[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda *_: None)
            return self._loop(on_wake)
        finally:
            self.stop_all()
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            signal.set_wakeup_fd(previous_fd)
            with self._pipe_lock:
                self._pipe_open = False
                os.close(self._read_fd)
                os.close(self._write_fd)

    def _loop(self, on_wake: Callable[[], None]) -> bool:
        while True:
            self._start_due()
            self._print_logs()
            if self.stop_requested.is_set():
                return True
            if self.core.finished():
                return False
            deadline_ms = self.core.next_deadline_ms()
            timeout_s = WAKE_S_MAX
            if deadline_ms is not None:
                timeout_s = min(timeout_s, max(0, deadline_ms - _monotonic_ms()) / 1000)
            select.select([self._read_fd], [], [], timeout_s)
            with contextlib.suppress(BlockingIOError):
                while os.read(self._read_fd, 4096):
                    pass
            self._reap()
            self._print_logs()
            on_wake()

    def _start_due(self) -> None:
        for name in self.core.due(_monotonic_ms()):
            argv, log_path = self.commands[name]
            first = name not in self.processes
            try:
                if not first:
                    with open(log_path, "ab") as log_file:
                        log_file.write(f"--- goml cluster up: {name} restarted ---\n".encode())
                process = spawn(name, argv, log_path)
            except OSError as error:
                self.core.exited(name, ProcessExit(None, spawn_error=str(error)), _monotonic_ms())
                continue
            self.processes[name] = process
            self.core.started(name, process.popen.pid)
            self._write_pid(name, process.popen.pid)

    def _reap(self) -> None:
        for name, process in self.processes.items():
            if self.core.state(name) is not State.RUNNING:
                continue
            returncode = process.popen.poll()  # waitpid of this PID only, never -1
            if returncode is None:
                continue
            self._pid_path(name).unlink(missing_ok=True)
            self.core.exited(name, exit_of(returncode), _monotonic_ms())

    def stop_all(self) -> None:
        """Stop every process still running, by PID (SIGTERM, then SIGKILL), and wait."""
        self.core.stop()
        # Agents (started last) first: they stop while the nodes can still answer them.
        running = [p for p in reversed(self.processes.values()) if p.popen.poll() is None]
        if running:
            self._say(f"stopping {', '.join(p.name for p in running)}...")
        stop_all(running)
        for name, process in self.processes.items():
            if self.core.state(name) is State.RUNNING:
                assert process.popen.returncode is not None, name
                self.core.exited(name, exit_of(process.popen.returncode), _monotonic_ms())
            self._pid_path(name).unlink(missing_ok=True)
        self._print_logs()

    def _print_logs(self) -> None:
        for line in self.core.take_logs():
            self._say(line)

    def _pid_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def _write_pid(self, name: str, pid: int) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._pid_path(name).write_text(f"{pid}\n")


def cluster_up(
    layout: LocalLayout,
    extra: list[tuple[str, list[str]]],
    policy: RestartPolicy,
    say: Callable[[str], None],
    announce: Callable[[str], None],
    leader_timeout_s: float,
) -> int:
    """`goml cluster up`: start and supervise every node and `extra` process until
    SIGINT/SIGTERM. `announce(leader)` once a leader is elected. Exit code: 0 after a
    stop asked for, 1 when every process has stopped or been given up on, 2 when no
    leader was elected in time."""
    logs = layout.data_dir / "logs"
    commands = {
        name: (node_argv(path), logs / f"{name}.log")
        for name, path in sorted(layout.node_configs.items())
    }
    for name, argv in extra:
        commands[name] = (argv, logs / f"{name}.log")
    supervisor = ProcessSupervisor(commands, layout.data_dir / "run", policy, say)
    found: dict[str, str] = {}

    def find_leader() -> None:
        # A thread: the status calls block, and the loop must keep restarting meanwhile.
        try:
            found["leader"] = wait_for_leader(
                layout.profile, leader_timeout_s, cancelled=supervisor.stop_requested
            )
        except TimeoutError as error:
            found["error"] = str(error)
        finally:
            supervisor.wake()

    announced = False
    failed = False

    def on_wake() -> None:
        nonlocal announced, failed
        if announced or failed:
            return
        if "leader" in found:
            announced = True
            announce(found["leader"])
        elif "error" in found and not supervisor.stop_requested.is_set():
            failed = True
            say(f"error: {found['error']}; see the logs in {logs}")
            supervisor.request_stop()

    finder = threading.Thread(target=find_leader, name="find-leader", daemon=True)
    finder.start()
    try:
        asked = supervisor.run(on_wake)
    finally:
        supervisor.stop_requested.set()  # the finder gives up at its next poll
        finder.join(timeout=STOP_TIMEOUT_S)
    if failed:
        return 2
    if not asked:
        say("every process has stopped or been given up on; see the logs in " + str(logs))
        return 1
    return 0
