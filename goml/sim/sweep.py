"""`goml sim sweep`: many seeds of one scenario, on local processes (the default) or on an
existing Dask distributed cluster (`--executor dask://HOST:PORT`).

Every finished seed's summary (without its timeline) is one JSON line of
`OUT/sweep-NAME.jsonl`, written and flushed as it arrives, so a sweep that is interrupted
(Ctrl-C, a lost machine) continues with `--resume` and reruns no finished seed. The
totals printed at the end, and the HTML page beside the file, are computed over every
line of the file, not over what this invocation ran.

What travels to a worker is plain data: the scenario's YAML text (the worker validates it
again, with the loader's limits, as a local `goml sim run` would), the seed, and the
digest of the sweep's goml code; what comes back is the seed's summary as JSON text.
Nothing of the user's machine is pickled for a worker to trust, and the sweep unpickles no
object of goml's making (dask's own protocol, and its trust between client, scheduler and
workers, stays what it is). A worker whose goml code differs refuses the seed: the same
seed gives the same trace only with the same code.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib
import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
import shlex
import signal
import socket
import sys
import time
import traceback
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Protocol
from urllib.parse import urlsplit

import goml
from goml.report.sweep_html import SeedResult, describe, write_sweep_report
from goml.scenario.loader import ScenarioError, inline_costs, load_scenario_text
from goml.sim.runner import replay_command, simulate

# Seeds handed to the local pool ahead of the free processes: enough that no process
# waits for the next seed, few enough that Ctrl-C has little to cancel.
LOCAL_AHEAD_PER_PROCESS = 2
# Seeds handed to Dask at once. Its scheduler queues them well, but every one costs
# memory on the client and the scheduler; a thousand keep 500 worker threads busy.
DASK_IN_FLIGHT_MAX = 1000
DASK_CONNECT_TIMEOUT_S = 10  # a scheduler in another cloud answers in well under 1 s
DASK_WORKERS_TIMEOUT_S = 60  # a cluster where no worker joins by then is not running
DASK_CLOSE_TIMEOUT_S = 10
PROCESS_JOIN_TIMEOUT_S = 10
# A summary line is a few KiB; a longer line is not one the sweep wrote.
LINE_BYTES_MAX = 1 << 20
# Bytes of a scenario file read: a bound on the read alone (not /dev/zero into memory);
# the loader applies the real, smaller limit to the text.
SCENARIO_READ_BYTES_MAX = 4 << 20
CRASH_CHARS_MAX = 4000  # the end of a crashed seed's traceback, where the error is
FAILURES_SHOWN_MAX = 50  # failing seeds printed; all of them are in the JSONL file
INSTALL_HINT = "pip install 'goml[dask]' (or: pip install 'dask[distributed]')"


class SweepError(Exception):
    """A sweep that cannot start or go on (bad executor, unreachable cluster, a file of
    another sweep, a worker that refuses); the message says what to do."""


# ----------------------------------------------------------------- the worker side


# goml modules that decide nothing in a simulated run: a fix to a report must not make a
# sweep's results unresumable. Everything else counts, to be safe.
_NOT_IN_TRACE = ("report/", "chaos/", "cli.py")


@functools.cache
def code_sha256() -> str:
    """Digest of this process's goml source that can change a trace: equal digests, equal
    traces for equal seeds."""
    root = Path(goml.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root).as_posix().startswith(_NOT_IN_TRACE):
            continue
        data = path.read_bytes()
        # Name and length first, so no two different trees hash alike.
        digest.update(f"{path.relative_to(root).as_posix()}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def run_seed(scenario_text: str, source: str, seed: int, sweep_code_sha256: str) -> str:
    """Run one seed where a worker runs it (a local process or a Dask worker) and return
    its summary as JSON text, without the timeline. A crash of the simulated code is the
    seed's finding (a failed seed with its traceback), not the end of the sweep; a worker
    that cannot run the sweep's code or scenario says so in `refused`."""
    worker = f"{socket.gethostname()}:{os.getpid()}"
    mine = code_sha256()
    if mine != sweep_code_sha256:
        why = (
            f"worker {worker} runs other goml code (sha256 {mine[:12]}, the sweep's "
            f"{sweep_code_sha256[:12]}): install the same goml on every worker"
        )
        return json.dumps({"seed": seed, "refused": why, "worker": worker})
    try:
        scenario = load_scenario_text(scenario_text, source).scenario
    except ScenarioError as error:
        return json.dumps({"seed": seed, "refused": f"worker {worker}: {error}", "worker": worker})
    try:
        summary, passed = simulate(scenario, seed)
    except Exception:
        summary = {
            "scenario": scenario.name,
            "seed": seed,
            "crash": traceback.format_exc()[-CRASH_CHARS_MAX:],
        }
        passed = False
    summary.pop("timeline", None)
    assert "passed" not in summary and "worker" not in summary, "summary fields collide"
    summary["passed"] = passed
    summary["worker"] = worker
    return json.dumps(summary, sort_keys=True)


def _ignore_sigint() -> None:
    """A local worker's initializer: Ctrl-C reaches the whole process group; the sweep
    process alone decides what it means (cancel, stop the workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ----------------------------------------------------------------- executors


@dataclass(frozen=True)
class Job:
    scenario_text: str
    source: str
    seed: int
    code_sha256: str


class Executor(Protocol):
    """Runs jobs, yields (seed, JSON text) as each finishes; leaving the `with` after an
    exception (Ctrl-C included) cancels what has not finished."""

    def __enter__(self) -> Executor: ...

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def results(self, jobs: Iterable[Job]) -> Iterator[tuple[int, str]]: ...


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while worker processes are spawned: an ignored signal stays ignored
    across exec, so a worker ignores Ctrl-C from its first instruction, before its
    initializer runs (a Ctrl-C in that window is lost, not half-handled)."""
    if not _in_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class LocalExecutor:
    """A pool of `jobs` spawned processes on this machine."""

    def __init__(self, jobs: int) -> None:
        assert jobs >= 1
        self.jobs = jobs
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> LocalExecutor:
        # spawn, not fork: the parent holds threads (rich's refresh, the pool's own), and a
        # forked child must not inherit their locks.
        self._pool = ProcessPoolExecutor(
            self.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_ignore_sigint
        )
        return self

    def results(self, jobs: Iterable[Job]) -> Iterator[tuple[int, str]]:
        pool = self._pool
        assert pool is not None, "results() outside `with`"
        queue = iter(jobs)
        pending: dict[Future[str], int] = {}

        def fill() -> None:
            for job in queue:
                future = pool.submit(
                    run_seed, job.scenario_text, job.source, job.seed, job.code_sha256
                )
                pending[future] = job.seed
                if len(pending) >= self.jobs * LOCAL_AHEAD_PER_PROCESS:
                    return

        with _sigint_ignored():  # the pool spawns its processes on the first submits
            fill()
        while pending:
            # No deadline on a seed: its wall time is bounded by the simulation itself
            # (the scenario's duration and SETTLE_MS_MAX), and a worker that dies shows as
            # BrokenProcessPool, not as a wait.
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: pending[f]):
                seed = pending.pop(future)
                try:
                    yield seed, future.result()
                except BrokenProcessPool:
                    raise SweepError(
                        f"a local worker process died (killed, or out of memory) with seeds "
                        f"{_seeds_text(sorted([seed, *pending.values()]))} unfinished"
                    ) from None
            fill()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pool = self._pool
        assert pool is not None
        self._pool = None
        if kind is None:
            pool.shutdown(wait=True)
            return
        # Interrupted or failed: stop the running seeds now rather than wait for each to
        # end; the pool's processes are this process's only multiprocessing children.
        # Workers first, then shutdown(wait=True): the pool's manager thread sees them
        # gone, closes its wakeup pipe under the shutdown lock and ends, and is joined
        # here. The other order (shutdown(wait=False), then terminate) leaves that thread
        # to race CPython 3.11's exit hook, which then writes to the closed pipe
        # ("Exception ignored ... Bad file descriptor" at exit).
        children = multiprocessing.active_children()
        for child in children:
            child.terminate()
        if not _exited(children, PROCESS_JOIN_TIMEOUT_S):
            for child in children:
                child.kill()
            assert _exited(children, PROCESS_JOIN_TIMEOUT_S), "pool processes outlived SIGKILL"
        pool.shutdown(wait=True, cancel_futures=True)


def _exited(children: Sequence[multiprocessing.process.BaseProcess], timeout_s: float) -> bool:
    """True once every child has exited, False at the deadline. By their sentinels, not
    join() or is_alive(): the pool's manager thread reaps the same children meanwhile, and
    multiprocessing's poll() reads "not yet" when another thread reaped first."""
    deadline_s = time.monotonic() + timeout_s
    waiting = [child.sentinel for child in children]
    while waiting and (left_s := deadline_s - time.monotonic()) > 0:
        ready = multiprocessing.connection.wait(waiting, timeout=left_s)
        waiting = [sentinel for sentinel in waiting if sentinel not in ready]
    return not waiting


class DaskExecutor:
    """Seeds as tasks of an existing Dask distributed cluster, through its scheduler."""

    def __init__(self, address: str, in_flight_max: int) -> None:
        assert in_flight_max >= 1
        self.address = address
        self.in_flight_max = in_flight_max
        # distributed.Client; Any, as its API is typed only in part (Client(),
        # as_completed and close() are untyped) and is used in this class alone.
        self._client: Any = None
        self._pending: dict[Any, int] = {}  # distributed.Future -> seed

    def __enter__(self) -> DaskExecutor:
        try:
            distributed: Any = importlib.import_module("distributed")
        except ImportError as error:
            raise SweepError(
                f"--executor dask:// needs the distributed package ({error}): {INSTALL_HINT}"
            ) from None
        try:
            client = distributed.Client(
                self.address, timeout=DASK_CONNECT_TIMEOUT_S, set_as_default=False
            )
        except (OSError, TimeoutError) as error:
            raise SweepError(
                f"cannot reach the Dask scheduler at {self.address} within "
                f"{DASK_CONNECT_TIMEOUT_S} s: {error}"
            ) from None
        try:
            client.wait_for_workers(1, timeout=DASK_WORKERS_TIMEOUT_S)
        except (OSError, TimeoutError):
            client.close(timeout=DASK_CLOSE_TIMEOUT_S)
            raise SweepError(
                f"no worker joined the Dask scheduler at {self.address} within "
                f"{DASK_WORKERS_TIMEOUT_S} s"
            ) from None
        self._client = client
        return self

    def results(self, jobs: Iterable[Job]) -> Iterator[tuple[int, str]]:
        distributed: Any = importlib.import_module("distributed")
        client = self._client
        assert client is not None, "results() outside `with`"
        token = uuid.uuid4().hex[:8]  # this sweep's keys, readable on the dashboard
        queue = iter(jobs)

        def submit(job: Job) -> Any:
            future = client.submit(
                run_seed,
                job.scenario_text,
                job.source,
                job.seed,
                job.code_sha256,
                key=f"goml-sweep-{token}-seed-{job.seed}",
            )
            self._pending[future] = job.seed
            return future

        # islice, not zip(queue, range(n)): zip would draw seed n+1 and drop it.
        first = [submit(job) for job in itertools.islice(queue, self.in_flight_max)]
        finished = distributed.as_completed(first, loop=client.loop)  # not the default client
        for future in finished:
            seed = self._pending.pop(future)
            try:
                text = future.result()
            except Exception as error:  # the task's own error, or dask's (KilledWorker)
                raise SweepError(f"seed {seed} failed on the Dask cluster: {error!r}") from None
            if not isinstance(text, str):
                raise SweepError(f"seed {seed}: the worker returned {type(text).__name__}")
            yield seed, text
            following = next(queue, None)
            if following is not None:
                finished.add(submit(following))
            assert len(self._pending) <= self.in_flight_max
        assert not self._pending

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        client = self._client
        assert client is not None
        self._client = None
        if self._pending:
            # A seed already running on a worker runs to its end there (Dask does not
            # stop a running task); the rest are dropped from the scheduler now.
            with contextlib.suppress(Exception):
                client.cancel(list(self._pending), force=True)
            self._pending.clear()
        client.close(timeout=DASK_CLOSE_TIMEOUT_S)


def parse_executor(text: str) -> str | None:
    """`local` -> None; `dask://HOST:PORT` -> the scheduler's address `tcp://HOST:PORT`."""
    if text == "local":
        return None
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        port = None
    if (
        parts.scheme != "dask"
        or not parts.hostname
        or port is None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        raise ValueError(f"{text!r}: give local or dask://HOST:PORT (the Dask scheduler)")
    return f"tcp://{parts.netloc}"


# ----------------------------------------------------------------- the results file


def _line_result(data: dict[str, Any], scenario: Path) -> SeedResult:
    """What the report needs of one summary line; `scenario` for its replay command."""
    seed = data["seed"]
    failover = data.get("failover_s") or {}
    submit = data.get("submit_ms") or {}
    failing = [e["text"] for e in data.get("expectations", []) if not e.get("passed")]
    crash = data.get("crash")
    why = ""
    if not data["passed"]:
        if data.get("violation"):
            why = f"SAFETY VIOLATION: {str(data['violation']).splitlines()[0]}"
        elif crash:
            why = f"crashed: {str(crash).strip().splitlines()[-1]}"
        else:
            why = "; ".join(failing) or "failed"
    p99 = submit.get("p99")
    return SeedResult(
        seed=seed,
        passed=bool(data["passed"]),
        why=why,
        violation=data.get("violation"),
        crash=crash,
        failovers_s=tuple(float(v) for v in failover.get("values", [])),
        submit_p99_ms=float(p99) if p99 is not None else None,
        tasks_lost=int(data.get("tasks_lost") or 0),
        duplicate_results=int(data.get("duplicate_results") or 0),
        sim_seconds=float(data.get("sim_seconds") or 0.0),
        wall_seconds=float(data.get("wall_seconds") or 0.0),
        trace_digest=str(data.get("trace_digest", "")),
        replay=replay_command(scenario, seed),
    )


class ResultFile:
    """`OUT/sweep-NAME.jsonl`, one summary a line, held under an exclusive lock while the
    sweep runs (two sweeps appending to one file would interleave their seeds)."""

    def __init__(
        self,
        path: Path,
        scenario: Path,
        scenario_sha256: str,
        sweep_code_sha256: str,
        resume: bool,
    ) -> None:
        self.path = path
        self.scenario = scenario  # for the replay commands
        self.scenario_sha256 = scenario_sha256
        self.code_sha256 = sweep_code_sha256
        self.resume = resume
        self.done: set[int] = set()
        self._handle: IO[bytes] | None = None

    def __enter__(self) -> ResultFile:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+b")  # created if missing, never truncated by open
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise SweepError(f"another sweep is writing {self.path}") from None
        self._handle = handle
        if not self.resume:
            handle.truncate(0)
            return self
        complete_bytes = 0  # the file up to the end of its last complete line
        for line_end, data in self._lines():
            self.done.add(data["seed"])
            complete_bytes = line_end
        if complete_bytes != os.fstat(handle.fileno()).st_size:
            # The last line was cut short (the machine went down mid-write): that seed
            # runs again, and the next line starts on a line of its own.
            handle.truncate(complete_bytes)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        handle = self._handle
        assert handle is not None
        self._handle = None
        handle.close()  # flushes, and releases the lock

    def append(self, data: dict[str, Any]) -> None:
        handle = self._handle
        assert handle is not None
        assert data["seed"] not in self.done, f"seed {data['seed']} written twice"
        line = json.dumps(
            {**data, "scenario_sha256": self.scenario_sha256, "code_sha256": self.code_sha256},
            sort_keys=True,
        ).encode()
        assert b"\n" not in line and len(line) < LINE_BYTES_MAX
        handle.write(line + b"\n")  # one write: Ctrl-C lands before or after it
        handle.flush()
        self.done.add(data["seed"])

    def results(self) -> list[SeedResult]:
        """Every line of the file, one result per seed in seed order."""
        by_seed = {data["seed"]: _line_result(data, self.scenario) for _, data in self._lines()}
        assert set(by_seed) == self.done, "the file and the seeds written disagree"
        return [by_seed[seed] for seed in sorted(by_seed)]

    def _lines(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(offset after the line, its data) for each complete line; a last line without
        its newline is left out. A line that is not this sweep's is an error."""
        handle = self._handle
        assert handle is not None
        handle.seek(0)
        number = 0
        while raw := handle.readline(LINE_BYTES_MAX + 1):
            number += 1
            if not raw.endswith(b"\n"):
                if len(raw) > LINE_BYTES_MAX:
                    raise SweepError(f"{self.path}:{number}: longer than {LINE_BYTES_MAX} bytes")
                return
            where = f"{self.path}:{number}"
            try:
                data = json.loads(raw)
            except ValueError:
                raise SweepError(f"{where}: not a JSON line; is this a sweep's file?") from None
            if not isinstance(data, dict) or type(data.get("seed")) is not int:
                raise SweepError(f"{where}: not a seed's summary")
            if "passed" not in data:
                raise SweepError(f"{where}: not a seed's summary (no `passed`)")
            if data.get("scenario_sha256") != self.scenario_sha256:
                raise SweepError(
                    f"{where}: a result of another scenario text than this one: run without "
                    "--resume to start over, or give another --out"
                )
            if data.get("code_sha256") != self.code_sha256:
                raise SweepError(
                    f"{where}: a result of other goml code than this one (its traces "
                    "differ): run without --resume to start over, or give another --out"
                )
            yield handle.tell(), data


# ----------------------------------------------------------------- progress


class _Progress:
    """A rich progress bar on stderr: seeds done of all, failures, ETA, simulator speed
    (simulated seconds per wall second of one run, and of the whole sweep so far)."""

    def __init__(self, label: str, total: int, done: int, failed: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[red]{task.fields[failed]} failed"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[speed]}"),
            console=console,
            # A log (CI, a file) gets the failures as they come and the totals, not a
            # bar redrawn into it.
            disable=not console.is_terminal,
        )
        self._failed = failed
        self._sim_s = self._wall_s = 0.0
        self._started_s = time.monotonic()
        self._task = self._progress.add_task(
            label, total=total, completed=done, failed=failed, speed=""
        )
        self.failures_printed = 0

    def __enter__(self) -> _Progress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def advance(self, result: SeedResult) -> None:
        self._sim_s += result.sim_seconds
        self._wall_s += result.wall_seconds
        elapsed_s = time.monotonic() - self._started_s
        speed = ""
        if self._wall_s > 0 and elapsed_s > 0:
            speed = (
                f"{self._sim_s / self._wall_s:.1f} sim s/s per run, "
                f"{self._sim_s / elapsed_s:.1f} all runs"
            )
        if not result.passed:
            self._failed += 1
            if self.failures_printed < FAILURES_SHOWN_MAX:
                self.failures_printed += 1
                self._progress.console.print(
                    f"FAIL seed {result.seed}: {result.why}\n  replay: {result.replay}",
                    markup=False,
                    highlight=False,
                )
        self._progress.update(self._task, advance=1, failed=self._failed, speed=speed)


# ----------------------------------------------------------------- the command


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _interrupt_once() -> Iterator[None]:
    """The first SIGINT raises KeyboardInterrupt; later ones are ignored, so the cleanup
    the first one starts (cancelling seeds, stopping processes) runs to its end."""
    if not _in_main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _seeds_text(seeds: Sequence[int]) -> str:
    """Sorted seeds as `1-6,9,12-20`, as `--seeds` reads them."""
    parts: list[str] = []
    ordered = sorted(set(seeds))
    start = 0
    for i in range(1, len(ordered) + 1):
        if i == len(ordered) or ordered[i] != ordered[i - 1] + 1:
            low, high = ordered[start], ordered[i - 1]
            parts.append(str(low) if low == high else f"{low}-{high}")
            start = i
    return ",".join(parts)


def _read_scenario(path: Path) -> str:
    """The scenario's text, read once: what the workers get is what was validated here."""
    try:
        with path.open("rb") as handle:
            data = handle.read(SCENARIO_READ_BYTES_MAX)
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SweepError(f"{path}: cannot read: {error}") from None


def _print_totals(path: Path, results: Sequence[SeedResult], jsonl: Path) -> None:
    failing = [r for r in results if not r.passed]
    print(f"{path}: {len(results) - len(failing)} passed, {len(failing)} failed")
    print(
        f"  failover over all seeds: {describe([v for r in results for v in r.failovers_s], 's')}"
    )
    p99s = [r.submit_p99_ms for r in results if r.submit_p99_ms is not None]
    print(f"  submit p99 per seed: {describe(p99s, 'ms')}")
    print(f"  tasks lost (sum): {sum(r.tasks_lost for r in results)}")
    print(f"  results twice (sum): {sum(r.duplicate_results for r in results)}")
    sim_s = sum(r.sim_seconds for r in results)
    wall_s = sum(r.wall_seconds for r in results)
    if wall_s > 0:
        print(
            f"  simulator: {sim_s:.0f} simulated s in {wall_s:.0f} s of runs ({sim_s / wall_s:.1f}x)"
        )
    for r in failing[:FAILURES_SHOWN_MAX]:
        print(f"  FAIL seed {r.seed}: {r.why}\n    replay: {r.replay}")
    if len(failing) > FAILURES_SHOWN_MAX:
        print(f"  ... and {len(failing) - FAILURES_SHOWN_MAX} more failing seeds in {jsonl}")


def _accept(seed: int, text: str) -> dict[str, Any]:
    """A worker's answer for `seed`, checked: a summary, or a refusal that ends the sweep."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("seed") != seed:
        raise SweepError(f"seed {seed}: the worker's answer is not this seed's summary")
    if "refused" in data:
        raise SweepError(str(data["refused"]))
    if not isinstance(data.get("passed"), bool):
        raise SweepError(f"seed {seed}: the worker's answer has no verdict")
    return data


def sweep_command(
    path: Path, seeds: list[int], jobs: int, out: Path, executor: str, resume: bool
) -> int:
    """Run `seeds` of the scenario at `path` on `executor` (`local`: `jobs` processes;
    `dask://HOST:PORT`), appending to `OUT/sweep-STEM.jsonl` (resumed, or started over).

    Exit code: 0 every seed in the file passed, 1 some failed, 2 the sweep could not
    run (the message says why), 130 interrupted (the finished seeds are kept)."""
    assert seeds, "no seeds"
    assert len(set(seeds)) == len(seeds), "seeds repeat"
    jsonl = out / f"sweep-{path.stem}.jsonl"
    again = ["goml sim sweep", shlex.quote(str(path)), "--seeds", _seeds_text(seeds)]
    again += ["--out", shlex.quote(str(out)), "--resume", "--executor", shlex.quote(executor)]
    again += ["-j", str(jobs)] if executor == "local" else []
    store: ResultFile | None = None
    try:
        with _interrupt_once():
            try:
                address = parse_executor(executor)
            except ValueError as error:
                raise SweepError(str(error)) from None
            text = _read_scenario(path)
            try:
                loaded = load_scenario_text(text, str(path), base=path.parent)
            except ScenarioError as error:
                print(error, file=sys.stderr)
                return 2
            # Workers get the text, not the calibration file it names.
            text = inline_costs(text, loaded.scenario)
            for warning in loaded.warnings:
                print(warning, file=sys.stderr)
            sweep_code = code_sha256()
            scenario_sha = hashlib.sha256(text.encode()).hexdigest()
            with ResultFile(jsonl, path, scenario_sha, sweep_code, resume) as store:
                todo = [seed for seed in seeds if seed not in store.done]
                if resume:
                    print(
                        f"{jsonl}: {len(seeds) - len(todo)} of {len(seeds)} seeds already "
                        f"done, {len(todo)} to run",
                        file=sys.stderr,
                    )
                wanted = set(seeds)
                failed = sum(1 for r in store.results() if not r.passed and r.seed in wanted)
                pool: Executor = (
                    DaskExecutor(address, DASK_IN_FLIGHT_MAX) if address else LocalExecutor(jobs)
                )
                label = f"{path.name} on {address or f'{jobs} local processes'}"
                work = (Job(text, str(path), seed, sweep_code) for seed in todo)
                with _Progress(label, len(seeds), len(seeds) - len(todo), failed) as progress:
                    if todo:
                        with pool:
                            for seed, answer in pool.results(work):
                                data = _accept(seed, answer)
                                store.append(data)
                                progress.advance(_line_result(data, path))
                results = store.results()
            _print_totals(path, results, jsonl)
            report = write_sweep_report(
                results, loaded.scenario.name, str(path), jsonl, out / f"sweep-{path.stem}.html"
            )
            print(f"report: {report}  (every seed: {jsonl})")
            return 0 if all(r.passed for r in results) else 1
    except SweepError as error:
        print(f"error: {error}", file=sys.stderr)
        if store is not None and store.done:
            print(
                f"  seeds kept in {jsonl}: {len(store.done)}; continue with: {' '.join(again)}",
                file=sys.stderr,
            )
        return 2
    except KeyboardInterrupt:
        done = len(store.done) if store is not None else 0
        print(
            f"\ninterrupted: seeds done: {done}, kept in {jsonl}\ncontinue with: {' '.join(again)}",
            file=sys.stderr,
        )
        return 130
