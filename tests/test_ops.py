"""Operability (issue 11, items 4 and 13): `goml cluster up` supervises its processes; a
node stops cleanly on SIGTERM; the rough edges users met: `task watch` with the first
node down or nothing happening, status omitting FAILED, the agent forgotten when a task
finishes, enum reprs in messages, a 100 KB id echoed back, a bad `--seeds`.

Real processes are started for real and stopped by PID, also when a test fails; waits
poll the remote processes with deadlines, never bare sleeps. The supervision policy's
rules are unit-tested in tests/test_supervise.py; the submit-time refusal of a task no
agent can run, FAILED in status and a long id quoted are golden cases in
tests/testdata/cluster/unplaceable.txt.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import inspect
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from goml.client import Client, ClientError, Profile
from goml.cluster import local
from goml.cluster.manifest import QUOTE_CHARS_MAX, Manifest, quote
from goml.cluster.node_core import task_view
from goml.cluster.supervise import RestartPolicy
from goml.proto import api_pb2, api_pb2_grpc
from tests.node_interaction import NodeEnv

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 60.0
GOML = (sys.executable, "-m", "goml")


def wait_until(predicate: Callable[[], T | None], timeout_s: float, what: str) -> T:
    """Poll until `predicate` returns something truthy (client errors count as "not
    yet"); fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (ClientError, grpc.RpcError, OSError, ValueError) as error:
            last = repr(error)
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what} {last}")
        time.sleep(0.05)  # polling a remote process: nothing local to wait on


def alive(pid: int, marker: str) -> bool:
    """Whether `pid` still runs and is ours (its command line names `marker`): a PID
    the kernel gave to an unrelated process since does not count."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    zombie = stat.rsplit(")", 1)[-1].split()[0] == "Z"
    return not zombie and marker.encode() in cmdline


def kill_by_pid(pids: set[int], marker: str) -> None:
    for pid in sorted(pids):
        if alive(pid, marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------- cores, no processes


def _env_with_finished_task(ok: bool) -> NodeEnv:
    env = NodeEnv()
    for command in (
        "add-nodes 3",
        "elect n1",
        "request n1 1 register agent=a1",
        "request n1 2 submit key=k",
        "stabilize",
        "request n1 3 lease agent=a1",
        "stabilize",
        f"request n1 4 report agent=a1 task=t-3-0 epoch=1 ok={'true' if ok else 'false'}",
        "stabilize",
        "run 200",  # a heartbeat: the followers learn the commit and apply it
    ):
        env.run(command)
    return env


def test_a_finished_task_keeps_the_agent_that_ran_it() -> None:
    env = _env_with_finished_task(ok=True)
    for node in ("n1", "n2", "n3"):  # applied alike on every replica
        task = env.core(node).manifest.get_task("t-3-0")
        assert task is not None and task.state == "SUCCEEDED"
        assert task.lease is None
        assert task_view(task).agent_id == "a1"
    # A failed attempt back in PENDING says who tried it (and FAILED counts it).
    failed = _env_with_finished_task(ok=False).core("n1").manifest
    task = failed.get_task("t-3-0")
    assert task is not None and task.state == "PENDING" and task.attempts == 1
    assert task_view(task).agent_id == "a1"
    assert failed.status_counts()["FAILED"] == 1
    assert failed.status_counts()["PENDING"] == 0


def test_last_agent_survives_snapshots_and_old_snapshots_still_read() -> None:
    manifest = _env_with_finished_task(ok=True).core("n1").manifest
    data = manifest.snapshot()
    assert b'"last_agent_id":"a1"' in data
    restored = Manifest.restore(data)
    task = restored.get_task("t-3-0")
    assert task is not None and task.last_agent_id == "a1"
    # A snapshot of an earlier version has no such key: it reads back byte for byte.
    older = data.replace(b',"last_agent_id":"a1"', b"").replace(b'"last_agent_id":"a1",', b"")
    assert b"last_agent_id" not in older
    again = Manifest.restore(older)
    task = again.get_task("t-3-0")
    assert task is not None and task.last_agent_id is None
    assert again.snapshot() == older


def test_status_counts_every_state_each_task_once() -> None:
    env = _env_with_finished_task(ok=True)
    counts = env.core("n1").manifest.status_counts()
    assert list(counts) == [
        name for name, _ in api_pb2.TaskState.items() if name != "TASK_STATE_UNSPECIFIED"
    ]
    assert counts["SUCCEEDED"] == 1
    assert sum(counts.values()) == 1


# Enums that never reach a message a user reads (internal states, wire numbers).
INTERNAL_ENUMS = {
    "goml.raft.types.Role",  # printed with .value where it is printed
    "goml.raft.types.EntryKind",
    "goml.raft.types.MessageType",
    "goml.raft.core.ProgressState",
    "goml.cluster.node_core._Stage",
}
ENUM_MODULES = (
    "goml.api.types",
    "goml.cluster.manifest",
    "goml.cluster.node_core",
    "goml.cluster.supervise",
    "goml.agent.core",
    "goml.raft.types",
    "goml.raft.core",
)


@pytest.mark.parametrize("module_name", ENUM_MODULES)
def test_enums_format_as_their_names(module_name: str) -> None:
    """A message formats states and codes with f"{x}": every enum that can reach one
    prints as `CANCELLED`, never `TaskState.CANCELLED` (a plain Enum would)."""
    module = importlib.import_module(module_name)
    found = 0
    for name, kind in inspect.getmembers(module, inspect.isclass):
        if not issubclass(kind, enum.Enum) or kind.__module__ != module_name:
            continue
        found += 1
        qualified = f"{module_name}.{name}"
        if qualified in INTERNAL_ENUMS:
            continue
        for member in kind:
            assert f"{member}" == str(member.value), (qualified, member)
            assert f"is {member}; " == f"is {member.value}; "
    assert found, module_name


def test_quote_bounds_what_errors_echo() -> None:
    assert quote("t-3-0") == "'t-3-0'"
    long = quote("x" * 100_000)
    assert long.endswith("... (100000 characters)")
    assert len(long) < QUOTE_CHARS_MAX + 40
    # Escapes count towards the repr, not the cut: still bounded.
    assert len(quote("\U0001f600" * 100_000)) < 20 * QUOTE_CHARS_MAX


@pytest.mark.parametrize("bad", ["abc", "5-1", "1-99999999999", "", "1-2-3", "-3"])
def test_harness_bad_seeds_is_a_usage_error(bad: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "goml.raft.harness", f"--seeds={bad}"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr
    assert "error: argument --seeds:" in done.stderr
    assert done.stdout == ""


# ------------------------------------------------- the supervisor's runtime, for real


def test_process_supervisor_restarts_with_backoff_then_gives_up(tmp_path: Path) -> None:
    """A real child that exits 3 at once: restarted after 20, 40 ms, then given up on
    at the third crash; a child that exits 0 is not restarted. The loop wakes on
    SIGCHLD, so this takes milliseconds, not the policy's window."""
    policy = RestartPolicy(
        delay_ms_first=20, delay_ms_max=1000, stable_ms=10_000, crashes_max=3, window_ms=60_000
    )
    commands = {
        "crasher": ([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "crasher.log"),
        "quitter": ([sys.executable, "-c", "pass"], tmp_path / "quitter.log"),
    }
    lines: list[str] = []
    # What the process had (default_int_handler, or SIG_IGN in a job started in the
    # background by a non-interactive shell, as CI scripts may start it).
    sigint_before = signal.getsignal(signal.SIGINT)
    supervisor = local.ProcessSupervisor(commands, tmp_path / "run", policy, lines.append)
    # A watchdog, so a hang fails the test instead of stalling the suite.
    watchdog = threading.Timer(DEADLINE_S, supervisor.request_stop)
    watchdog.start()
    try:
        asked = supervisor.run(lambda: None)
    finally:
        watchdog.cancel()
    assert asked is False, lines  # it finished by itself: nothing left to supervise
    assert (
        "crasher exited with code 3; restarting in 0.02 s (crash 1 of 3 allowed in 60 s)" in lines
    ), lines
    assert "quitter exited with code 0: stopped on purpose, not restarted" in lines
    assert any(line.startswith("crasher restarted (pid ") for line in lines)
    assert (
        "crasher exited with code 3; restarting in 0.04 s (crash 2 of 3 allowed in 60 s)" in lines
    )
    assert lines[-1] == (
        "crasher exited with code 3; it crashed 3 times in 60 s: giving up on it (see its log)"
    )
    assert list((tmp_path / "run").glob("*.pid")) == []
    assert (tmp_path / "crasher.log").read_text().count("crasher restarted") == 2
    # The process's handlers are back as they were.
    assert signal.getsignal(signal.SIGINT) is sigint_before


# ------------------------------------------------------------------ `goml cluster up`


@pytest.mark.slow
def test_cluster_up_restarts_a_killed_node_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = {**os.environ, "GOML_PROFILE": str(tmp_path / "profile.json")}
    out, err = tmp_path / "up.out", tmp_path / "up.err"
    seen: set[int] = set()  # every PID of a node or agent we saw, restarted ones too
    marker = str(data_dir)
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        up = subprocess.Popen(
            [*GOML, "cluster", "up", "--nodes", "3", "--agents", "1", "--data-dir", str(data_dir)],
            stdout=stdout,
            stderr=stderr,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
    run_dir = data_dir / "run"

    def pids() -> dict[str, int]:
        found = {p.stem: int(p.read_text()) for p in run_dir.glob("*.pid")}
        seen.update(found.values())
        return found

    def all_four() -> dict[str, int] | None:
        found = pids()
        return found if len(found) == 4 else None

    def n2_replaced() -> dict[str, int] | None:
        found = pids()
        return found if found.get("n2", before["n2"]) != before["n2"] else None

    try:
        wait_until(lambda: "Ctrl-C stops" in out.read_text(), DEADLINE_S, "the banner")
        before = wait_until(all_four, DEADLINE_S, "4 PID files")
        profile = Profile.load(data_dir / "profile.json")
        with Client(profile, call_timeout_s=2.0, retry_s=10.0) as client:
            os.kill(before["n2"], signal.SIGKILL)
            wait_until(
                lambda: "n2 was killed by SIGKILL; restarting in 1 s" in err.read_text(),
                DEADLINE_S,
                "the supervisor to log the crash",
            )
            after = wait_until(n2_replaced, DEADLINE_S, "n2 restarted under a new PID")
            assert f"n2 restarted (pid {after['n2']})" in err.read_text()
            assert not alive(before["n2"], marker)

            # Back in the cluster: n2 answers itself, and follows the leader.
            def n2_follows() -> api_pb2.StatusResponse | None:
                status = client.status("n2")
                return status if status.leader_id else None

            status = wait_until(n2_follows, DEADLINE_S, "the restarted n2 to know the leader")
            assert status.node_id == "n2"
            assert {k: v for k, v in after.items() if k != "n2"} == {
                k: v for k, v in before.items() if k != "n2"
            }
            # Every state is shown by the CLI, FAILED included, in lifecycle order.
            shown = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "goml",
                    "status",
                    "--profile",
                    str(data_dir / "profile.json"),
                ],
                capture_output=True,
                text=True,
                timeout=DEADLINE_S,
                cwd=ROOT,
                env={**env, "COLUMNS": "200"},
            )
            assert shown.returncode == 0, shown
            rows = [r for r in ("PENDING", "SUCCEEDED", "FAILED", "DEAD") if r in shown.stdout]
            assert rows == ["PENDING", "SUCCEEDED", "FAILED", "DEAD"], shown.stdout
            assert shown.stdout.index("SUCCEEDED") < shown.stdout.index("FAILED")

        # Ctrl-C: the terminal sends SIGINT to `cluster up` (its children are in their
        # own sessions, so it alone decides how they stop).
        os.kill(up.pid, signal.SIGINT)
        assert up.wait(timeout=DEADLINE_S) == 0, err.read_text()
        assert "stopped" in out.read_text()
        still = sorted(pid for pid in seen if alive(pid, marker))
        assert still == [], f"left running: {still}"
        assert list(run_dir.glob("*.pid")) == []
        for log in sorted((data_dir / "logs").glob("n*.log")):
            assert "Traceback" not in log.read_text(), log
    finally:
        if up.poll() is None:
            os.kill(up.pid, signal.SIGKILL)
            up.wait(timeout=10)
        kill_by_pid(seen, marker)


# ----------------------------------------------------- one cluster, several checks


@dataclass
class Running:
    layout: local.LocalLayout
    processes: list[local.Process]  # the list running_cluster stops on exit

    @property
    def profile(self) -> Profile:
        return self.layout.profile

    @property
    def profile_path(self) -> Path:
        return self.layout.data_dir / "profile.json"

    def process(self, name: str) -> local.Process:
        (found,) = [p for p in self.processes if p.name == name]
        return found

    def restart(self, name: str) -> None:
        position = self.processes.index(self.process(name))
        assert self.processes[position].popen.poll() is not None, f"{name} still runs"
        self.processes[position] = local.spawn(
            name,
            local.node_argv(self.layout.node_configs[name]),
            self.layout.data_dir / "logs" / f"{name}.log",
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """A 3-node TLS cluster without agents; every process stopped by PID on exit."""
    layout = local.prepare(tmp_path_factory.mktemp("ops"), 3, insecure=False)
    with local.running_cluster(layout) as processes:
        local.wait_for_leader(layout.profile, DEADLINE_S)
        yield Running(layout, processes)


def _leader(client: Client, not_in: tuple[str, ...] = ()) -> str:
    def elected() -> str | None:
        leader = str(client.status().leader_id)
        return leader if leader and leader not in not_in else None

    return wait_until(elected, DEADLINE_S, f"a leader not in {not_in}")


@pytest.mark.slow
def test_a_100kb_id_gets_not_found_with_a_bounded_message(cluster: Running) -> None:
    """Straight to the node (the client library refuses such an id itself)."""
    profile = cluster.profile
    with Client(profile, call_timeout_s=5.0, retry_s=30.0) as client:
        leader = _leader(client)
    credentials = profile.channel_credentials()
    assert credentials is not None
    metadata = (("authorization", f"Bearer {profile.token}"),)
    huge = "x" * 100_000
    with grpc.secure_channel(profile.nodes[leader], credentials) as channel:
        stub = api_pb2_grpc.ClientStub(channel)  # type: ignore[no-untyped-call]
        for call, request in (
            (stub.Get, api_pb2.GetRequest(task_id=huge)),
            (stub.Cancel, api_pb2.CancelRequest(task_id=huge)),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call(request, timeout=10, metadata=metadata)
            error = caught.value
            assert error.code() is grpc.StatusCode.NOT_FOUND, error
            details = error.details() or ""
            assert details.startswith("no task 'xxxx"), details
            assert details.endswith("... (100000 characters)"), details
            assert len(details) < 200, details
        spec = api_pb2.TaskSpec(function="f" * 100_000, args_json="{}", idempotency_key="k")
        spec.resources.cpu = 1
        with pytest.raises(grpc.RpcError) as caught:
            stub.Submit(api_pb2.SubmitRequest(tasks=[spec]), timeout=10, metadata=metadata)
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value
        details = caught.value.details() or ""
        assert "tasks[0].function 'ffff" in details and "name_bytes_max=256" in details
        assert len(details) < 300, details


class Watch:
    """`goml task watch` as a process; its stdout lines collected as they come."""

    def __init__(self, profile_path: Path, seconds: float, *ids: str) -> None:
        self.popen = subprocess.Popen(
            [
                *GOML,
                "task",
                "watch",
                *ids,
                "--seconds",
                f"{seconds:g}",
                "--profile",
                str(profile_path),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.lines: list[str] = []
        self.got_line = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))
            self.got_line.set()

    def first_stderr_line(self) -> str:
        assert self.popen.stderr is not None
        return self.popen.stderr.readline()

    def finish(self) -> tuple[int, str]:
        """Wait for its end (its --seconds); the exit code and the rest of stderr."""
        assert self.popen.stderr is not None
        err = self.popen.stderr.read()
        code = self.popen.wait(timeout=DEADLINE_S)
        self._reader.join(timeout=DEADLINE_S)
        return code, err

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=10)


@pytest.mark.slow
def test_task_watch_everything_with_the_first_node_down(cluster: Running) -> None:
    """No ids: every task is watched. With n1 (first in the profile) killed, the client
    rotates to a node that answers and the events come; an idle watch says so."""
    first = sorted(cluster.profile.nodes)[0]
    process = cluster.process(first)
    os.kill(process.popen.pid, signal.SIGKILL)
    process.popen.wait(timeout=10)
    watch: Watch | None = None
    try:
        with Client(cluster.profile, call_timeout_s=2.0, retry_s=30.0) as client:
            _leader(client, not_in=(first,))
            watch = Watch(cluster.profile_path, 10.0)
            # What it does is said before anything happens (on stderr).
            assert watch.first_stderr_line().startswith("watching every task for 10 s")
            # Events applied before the stream is open are not replayed: submit until
            # one shows, or the watch ends.
            submitted: list[str] = []
            deadline = time.monotonic() + 8.0
            while not watch.lines and time.monotonic() < deadline:
                key = f"watch-{len(submitted)}"
                submitted.append(client.submit("matmul", {"n": 4}, idempotency_key=key))
                watch.got_line.wait(0.3)
        code, err = watch.finish()
        assert code == 0, err
        assert "Traceback" not in err
        assert watch.lines, f"the watch printed no event; stderr: {err}"
        watched = {line.split()[1] for line in watch.lines}
        assert watched & set(submitted), (submitted, watch.lines)
        assert f"watch ended after 10 s: {len(watch.lines)} event(s)" in err
        # Nothing happening: still not silent.
        idle = Watch(cluster.profile_path, 1.0, "t-no-such-0")
        assert idle.first_stderr_line().startswith("watching 1 task(s) for 1 s")
        idle_code, idle_err = idle.finish()
        assert idle_code == 0, idle_err
        assert idle.lines == []
        assert "watch ended after 1 s: 0 event(s)" in idle_err
    finally:
        if watch is not None:
            watch.kill()
        cluster.restart(first)


@pytest.mark.slow
def test_sigterm_stops_a_node_cleanly(cluster: Running) -> None:
    """SIGTERM of the leader (peers stream into it, a watch is open on it): exit code 0,
    one INFO line, no ERROR and no traceback in its log."""
    with Client(cluster.profile, call_timeout_s=2.0, retry_s=30.0) as client:
        leader = _leader(client)
        client.submit("matmul", {"n": 4}, idempotency_key="before-sigterm")
    process = cluster.process(leader)
    log_path = process.log_path
    start = log_path.stat().st_size
    watch = Watch(cluster.profile_path, 30.0)
    try:
        assert watch.first_stderr_line().startswith("watching every task")
        os.kill(process.popen.pid, signal.SIGTERM)
        assert process.popen.wait(timeout=DEADLINE_S) == 0
    finally:
        watch.kill()
    with open(log_path, encoding="utf-8") as handle:
        handle.seek(start)
        text = handle.read()
    assert "Traceback" not in text, text
    assert " ERROR " not in text, text
    stops = [line for line in text.splitlines() if "stopped cleanly" in line]
    assert len(stops) == 1, text
    assert f" {leader} INFO " in stops[0] and stops[0].endswith("on SIGTERM"), stops
    cluster.restart(leader)
    with Client(cluster.profile, call_timeout_s=2.0, retry_s=30.0) as client:
        wait_until(lambda: client.status(leader).leader_id, DEADLINE_S, f"{leader} back")
