"""Runs task functions in child processes from asyncio: on warm workers, or one per task.

A hung or runaway function cannot wedge the agent: on timeout or cancellation its process
is killed (SIGKILL) and reaped, and the runner carries on. Processes come from a
`forkserver` that has preloaded the task library, so a process starts in milliseconds
without forking the agent's own threads (gRPC) and without re-importing NumPy.

Warm workers (the default). A pool of at most `runs_max` worker processes, each running
one task at a time and many in turn, like Dask's worker processes or Celery's prefork
pool: a task costs a message, not a process start. `warm_up` starts all of them.

Protocol. One duplex pipe (a socketpair) per worker; every message is one `send_bytes`
frame of ASCII JSON, read with a size-capped `recv_bytes`. Nothing is unpickled.
  runner -> worker: {"function": str, "args_json": str, "result_bytes_max": int}
  worker -> runner: {"ok": bool, "text": str}
`text` is the result JSON (from `run_task`, size-capped) or the error text. The runner
waits for a reply with `loop.add_reader`, so the event loop never waits on a worker.

Recycling. A worker is killed (SIGKILL), reaped and replaced lazily, on the next use, when
  * its task exceeds its timeout, or is cancelled;
  * it dies, or sends anything but one reply (too large, not JSON, the wrong shape, or a
    message while idle);
  * its peak resident memory exceeds `worker_memory_mb_max` after a task: VmHWM from
    /proc/<pid>/status. Peak, not current RSS (/proc/<pid>/statm): a large block a task
    frees is unmapped at once, so current RSS is back at the baseline when the task
    ends, yet the heap it leaves may be fragmented. Recycling resets the peak, so it
    measures the last task. Like Celery's `worker_max_memory_per_child` (ru_maxrss).
    No RLIMIT_AS: address space is not memory (OpenBLAS and glibc arenas reserve far
    more than they touch), and a cap would fail, with MemoryError, a task that is
    within what the scheduler gave it; this rule recycles after such a task instead;
  * it has run `worker_tasks_max` tasks.

Isolation. `run(..., isolated=True)` runs the task in a fresh process that sends one
reply and exits, as every task ran before warm workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import signal
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

from goml.agent.tasks import ARGS_JSON_MAX, run_task

__all__ = ["RunnerFull", "TaskOutcome", "TaskRunner"]

log = logging.getLogger("goml.agent.runner")

_CONTEXT_NAME = "forkserver"
# Idle workers found dead when handed a task, in a row, before the task fails: each is
# replaced; a task that keeps meeting dead workers says so rather than loop.
SEND_TRIES_MAX = 3
_PRELOAD = ["goml.agent.tasks"]
# json.dumps (ensure_ascii) writes at most 12 bytes per character of a str: a character
# outside the BMP becomes two \uXXXX escapes. Caps count characters, frames count bytes.
_JSON_BYTES_PER_CHAR_MAX = 12
_FRAMING_BYTES_MAX = 1024  # the keys, punctuation and the integer around the strings
_FUNCTION_CHARS_MAX = 64  # task function names are at most 64 characters (task_args)
_REQUEST_BYTES_MAX = (
    _JSON_BYTES_PER_CHAR_MAX * (ARGS_JSON_MAX + _FUNCTION_CHARS_MAX) + _FRAMING_BYTES_MAX
)
_KIB_PER_MIB = 1024


class RunnerFull(RuntimeError):
    """More runs requested than `runs_max`: the caller's accounting is wrong."""


@dataclass(frozen=True, slots=True)
class TaskOutcome:
    ok: bool
    text: str  # result JSON when ok, else the error text
    pid: int  # the worker (or isolated process) that ran the task; 0 if none did
    exit_code: int | None  # None: the process is still alive (a warm worker kept)
    cancelled: bool  # stopped by cancel(): text says so; report nothing
    timed_out: bool


# --------------------------------------------------------------------------- child side


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode("ascii")  # ensure_ascii: never fails to encode


def _reply(function: str, args_json: str, result_bytes_max: int) -> bytes:
    """Run one task; its reply frame. Within `_reply_bytes_max(result_bytes_max)`: the
    result is at most that many bytes of ASCII and the error text that many characters."""
    try:
        message = {"ok": True, "text": run_task(function, args_json, result_bytes_max)}
    except BaseException as exc:  # everything a function raises is the task's failure
        text = f"{type(exc).__name__}: {exc}"
        message = {"ok": False, "text": text[:result_bytes_max]}
    return _encode(message)


def _reply_bytes_max(result_bytes_max: int) -> int:
    return _JSON_BYTES_PER_CHAR_MAX * result_bytes_max + _FRAMING_BYTES_MAX


def _child_main(
    conn: multiprocessing.connection.Connection,
    function: str,
    args_json: str,
    result_bytes_max: int,
) -> None:
    """An isolated task: one reply, then exit."""
    try:
        conn.send_bytes(_reply(function, args_json, result_bytes_max))
    finally:
        conn.close()


def _worker_main(conn: multiprocessing.connection.Connection) -> None:
    """A warm worker: run requests one at a time until the runner closes its end."""
    # ^C in a terminal reaches the whole process group. The agent stops its workers
    # itself; a worker that died of it would report a task it never finished as failed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:  # the worker's own event loop: it ends at EOF, or when it is killed
        try:
            data = conn.recv_bytes(_REQUEST_BYTES_MAX)
        except EOFError:
            return  # the runner closed its end, or died
        request = json.loads(data)
        # The runner wrote it: anything else is a bug, and dying tells the runner.
        assert isinstance(request, dict) and len(request) == 3, request
        function, args_json = request["function"], request["args_json"]
        result_bytes_max = request["result_bytes_max"]
        assert isinstance(function, str) and isinstance(args_json, str), request
        assert isinstance(result_bytes_max, int) and result_bytes_max >= 1, request
        conn.send_bytes(_reply(function, args_json, result_bytes_max))


# --------------------------------------------------------------------------- runner side


@dataclass(frozen=True, slots=True)
class _Reply:
    ok: bool
    text: str


def _read_reply(conn: multiprocessing.connection.Connection, bytes_max: int) -> _Reply | str:
    """The reply waiting on `conn`, or why there is none: "" if the other end died (EOF),
    else what is wrong with what it sent. Call once `conn` is readable."""
    assert bytes_max >= _FRAMING_BYTES_MAX, bytes_max
    try:
        data = conn.recv_bytes(bytes_max)
    except (EOFError, ConnectionError):
        return ""
    except OSError:  # "bad message length": recv_bytes has closed the connection
        return f"a message over {bytes_max} bytes"
    try:
        message = json.loads(data)
    except ValueError:  # UnicodeDecodeError is one too
        return f"{len(data)} bytes that are not JSON"
    if not (isinstance(message, dict) and message.keys() == {"ok", "text"}):
        return "JSON that is not a reply"
    ok, text = message["ok"], message["text"]
    if not (isinstance(ok, bool) and isinstance(text, str)):
        return "a reply with the wrong types"
    return _Reply(ok, text)


def _peak_rss_mb(pid: int) -> int | None:
    """Peak resident memory of `pid` in MiB (VmHWM, /proc/<pid>/status); None if unknown."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) // _KIB_PER_MIB  # the value is in kB
    except (OSError, ValueError, IndexError):
        return None  # gone (its death shows at next use), or no /proc (not Linux)
    return None


async def _wait_readable(fd: int, timeout_s: float) -> bool:
    """True once `fd` is readable (data or EOF), False at the deadline."""
    assert fd >= 0 and timeout_s > 0, (fd, timeout_s)
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(fd, wake)
    try:
        async with asyncio.timeout(timeout_s):
            await readable
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)


@dataclass(eq=False)
class _Worker:
    process: BaseProcess
    pid: int
    conn: multiprocessing.connection.Connection  # the runner's end of the duplex pipe
    tasks_done: int = 0

    def idle_and_alive(self) -> bool:
        """An idle worker writes nothing; its pipe or sentinel ready means it died or
        wrote garbage."""
        ready = multiprocessing.connection.wait([self.conn, self.process.sentinel], 0)
        return not ready


@dataclass(eq=False)
class _Run:
    done: asyncio.Event  # set when `run` returns: close() waits for it
    process: BaseProcess | None = None  # what cancel() kills, once there is one
    pid: int | None = None
    cancelled: bool = False


def _cancelled_outcome(pid: int, exit_code: int | None) -> TaskOutcome:
    return TaskOutcome(False, "cancelled", pid, exit_code, True, False)


def _outcome(
    run: _Run,
    reply: _Reply | str,
    kind: str,
    pid: int,
    exit_code: int | None,
    *,
    timed_out: bool,
    timeout_ms: int,
) -> TaskOutcome:
    """What a run that did not keep its process comes to: cancel, then timeout, first."""
    assert kind in ("worker", "task"), kind
    assert not (timed_out and isinstance(reply, _Reply)), reply
    if run.cancelled:
        return _cancelled_outcome(pid, exit_code)
    if timed_out:
        return TaskOutcome(False, f"timed out after {timeout_ms} ms", pid, exit_code, False, True)
    if isinstance(reply, _Reply):
        return TaskOutcome(reply.ok, reply.text, pid, exit_code, False, False)
    if reply:
        text = f"{kind} process {pid} sent {reply} (exit code {exit_code})"
    else:
        text = f"{kind} process {pid} died without a result (exit code {exit_code})"
    return TaskOutcome(False, text, pid, exit_code, False, False)


class TaskRunner:
    def __init__(
        self,
        *,
        result_bytes_max: int,
        runs_max: int,
        kill_wait_ms: int,
        # The defaults are AgentConfig's; run_agent passes its config's values.
        worker_tasks_max: int = 1000,
        worker_memory_mb_max: int = 2048,
    ) -> None:
        if result_bytes_max < 1 or runs_max < 1 or kill_wait_ms < 1:
            raise ValueError("result_bytes_max, runs_max and kill_wait_ms must be >= 1")
        if worker_tasks_max < 1 or worker_memory_mb_max < 1:
            raise ValueError("worker_tasks_max and worker_memory_mb_max must be >= 1")
        self._result_bytes_max = result_bytes_max
        self._runs_max = runs_max
        self._kill_wait_ms = kill_wait_ms
        self._worker_tasks_max = worker_tasks_max
        self._worker_memory_mb_max = worker_memory_mb_max
        self._reply_bytes_max = _reply_bytes_max(result_bytes_max)
        self._context: Any = multiprocessing.get_context(_CONTEXT_NAME)
        self._context.set_forkserver_preload(_PRELOAD)
        self._runs: dict[str, _Run] = {}
        self._warm: asyncio.Future[None] | None = None
        self._idle: list[_Worker] = []  # a stack: the most recently used runs next
        # Workers alive or starting (idle, busy, in a start thread); <= runs_max.
        self._workers_count = 0

    def pid(self, run_id: str) -> int | None:
        run = self._runs.get(run_id)
        return None if run is None else run.pid

    @property
    def running(self) -> tuple[str, ...]:
        return tuple(sorted(self._runs))

    def cancel(self, run_id: str) -> bool:
        """Kill the run's process; its `run` call returns a cancelled outcome."""
        run = self._runs.get(run_id)
        if run is None:
            return False
        run.cancelled = True
        if run.process is not None:  # none yet (waiting for the warm-up or a worker): no kill
            run.process.kill()
        return True

    async def close(self) -> None:
        """Kill every run (their `run` calls return cancelled outcomes) and every worker,
        and reap them; waits at most about 2 x kill_wait_ms."""
        pending = [self._runs[run_id].done for run_id in sorted(self._runs)]
        for run_id in sorted(self._runs):
            self.cancel(run_id)
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(e.wait()) for e in pending]
        if self._warm is not None and not self._warm.done():
            waits.append(self._warm)  # its workers join the pool, killed below
        if waits:
            _, late = await asyncio.wait(waits, timeout=self._kill_wait_ms / 1000)
            for waiter in late:
                if waiter is not self._warm:
                    waiter.cancel()
            if late:
                log.warning("close: %d runs or starts still pending", len(late))
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._retire(worker) for worker in idle))

    async def warm_up(self) -> None:
        """Start the forkserver and `runs_max` workers in a thread and wait for them
        (without blocking the loop).

        Fix: the first `Process.start()` of a forkserver context blocks until the server
        has imported the preloaded task library (NumPy, pydantic): 0.5 s on an idle
        machine, over 2 s on a loaded one. Done on the event loop, that froze the agent's
        heartbeats, and a leader with a short agent_timeout_ms declared a healthy agent
        down when its first task arrived. `run` waits for this first (once)."""
        if self._warm is None:
            self._warm = asyncio.ensure_future(self._warm_up())
        with contextlib.suppress(Exception):  # a broken forkserver fails again in run()
            await asyncio.shield(self._warm)

    async def _warm_up(self) -> None:
        count = self._runs_max - self._workers_count
        assert 0 <= count <= self._runs_max, count
        self._workers_count += count
        try:
            workers = await asyncio.to_thread(self._start_workers, count)
        except BaseException:
            self._workers_count -= count
            raise
        assert len(workers) == count, (len(workers), count)
        self._idle.extend(workers)

    def _start_workers(self, count: int) -> list[_Worker]:
        """Blocking (run in a thread): `count` new workers, or none and the error."""
        workers: list[_Worker] = []
        try:
            for _ in range(count):
                workers.append(self._start_worker_blocking())
        except BaseException:
            for worker in workers:
                self._kill(worker)
            raise
        return workers

    def _start_worker_blocking(self) -> _Worker:
        mine, theirs = self._context.Pipe(duplex=True)
        process: BaseProcess = self._context.Process(
            target=_worker_main, args=(theirs,), name="goml-task-worker", daemon=True
        )
        try:
            process.start()
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()  # the worker holds the only other end: EOF here when it dies
        assert process.pid is not None
        return _Worker(process, process.pid, mine)

    async def _start_worker(self) -> _Worker:
        """A new worker, started in a thread: the forkserver may still be loading."""
        assert self._workers_count < self._runs_max, (self._workers_count, self._runs_max)
        self._workers_count += 1
        started = asyncio.ensure_future(asyncio.to_thread(self._start_worker_blocking))
        try:
            return await asyncio.shield(started)
        except asyncio.CancelledError:
            # The thread goes on; what it starts is killed on arrival and never counted.
            self._workers_count -= 1
            started.add_done_callback(self._discard_started)
            raise
        except BaseException:
            self._workers_count -= 1
            raise

    def _discard_started(self, started: asyncio.Future[_Worker]) -> None:
        """The caller of `_start_worker` was cancelled: nobody will use its worker."""
        if not started.cancelled() and started.exception() is None:
            self._kill(started.result())

    async def _take_worker(self) -> _Worker:
        """An idle worker, checked alive, or a new one."""
        while self._idle:  # bounded: every turn takes one off
            worker = self._idle.pop()
            if worker.idle_and_alive():
                return worker
            exit_code = await self._retire(worker)
            log.info("worker %d ended while idle (exit code %s)", worker.pid, exit_code)
        return await self._start_worker()

    def _kill(self, worker: _Worker) -> None:
        """SIGKILL and forget, without reaping: its parent, the forkserver, reaps it."""
        worker.process.kill()
        worker.conn.close()

    async def _retire(self, worker: _Worker) -> int | None:
        """Kill the worker, reap it, and free its place; its exit code."""
        assert worker not in self._idle
        assert self._workers_count >= 1, self._workers_count
        self._workers_count -= 1
        # SIGKILL first, then close its end: a worker that saw EOF first would exit 0
        # by itself, and a retired worker's exit would read as a clean one.
        worker.process.kill()
        worker.conn.close()
        return await self._reap(worker.process, grace_ms=0)

    async def _reap(self, process: BaseProcess, *, grace_ms: int) -> int | None:
        """Let `process` exit by itself for `grace_ms`, then SIGKILL it; wait (at most
        kill_wait_ms) until its parent has reaped it. Its exit code; None if it lingers."""
        assert grace_ms >= 0, grace_ms
        if grace_ms > 0 and process.exitcode is None:
            await _wait_readable(process.sentinel, grace_ms / 1000)
        if process.exitcode is None:
            process.kill()
            await _wait_readable(process.sentinel, self._kill_wait_ms / 1000)
        exit_code = process.exitcode  # known once the forkserver has reaped the PID
        if exit_code is None:
            log.warning("process %s outlived SIGKILL by %d ms", process.pid, self._kill_wait_ms)
        else:
            process.close()  # its sentinel fd
        return exit_code

    async def run(
        self,
        run_id: str,
        function: str,
        args_json: str,
        timeout_ms: int,
        *,
        isolated: bool = False,
    ) -> TaskOutcome:
        """Run `function` on a warm worker, or in a fresh process if `isolated`; never
        raises for anything the task does."""
        if run_id in self._runs:
            raise ValueError(f"run {run_id!r} is already running")
        if len(self._runs) >= self._runs_max:
            raise RunnerFull(f"{len(self._runs)} runs in progress; runs_max={self._runs_max}")
        assert timeout_ms >= 1, timeout_ms
        run = _Run(asyncio.Event())
        self._runs[run_id] = run
        try:
            await self.warm_up()
            if run.cancelled:  # cancelled while waiting for the warm-up: never started
                return _cancelled_outcome(0, None)
            if isolated:
                return await self._run_isolated(run, run_id, function, args_json, timeout_ms)
            return await self._run_warm(run, function, args_json, timeout_ms)
        finally:
            del self._runs[run_id]
            run.done.set()

    async def _run_warm(
        self, run: _Run, function: str, args_json: str, timeout_ms: int
    ) -> TaskOutcome:
        request = _encode(
            {
                "function": function,
                "args_json": args_json,
                "result_bytes_max": self._result_bytes_max,
            }
        )
        if len(request) > _REQUEST_BYTES_MAX:  # a peer's bad input: fail it, not the worker
            text = f"task request is {len(request)} bytes, over the limit of {_REQUEST_BYTES_MAX}"
            return TaskOutcome(False, text, 0, None, False, False)
        for _ in range(SEND_TRIES_MAX):
            worker = await self._take_worker()
            if run.cancelled:  # cancelled while a worker started: it never saw the task
                self._idle.append(worker)
                return _cancelled_outcome(0, None)
            try:
                # Never blocks for long: an idle worker is reading its pipe.
                worker.conn.send_bytes(request)
                sent = True
                break
            except OSError:
                # It died idle, after the idle check, before it saw the task: the task
                # is not to blame. Another worker takes it.
                sent = False
                exit_code = await self._retire(worker)
                log.info(
                    "worker %d was dead when given a task (exit code %s)", worker.pid, exit_code
                )
        if not sent:
            text = f"{SEND_TRIES_MAX} worker processes in a row were dead when given the task"
            return TaskOutcome(False, text, worker.pid, None, False, False)
        run.process, run.pid = worker.process, worker.pid
        owned = True  # False once the worker is back in the pool or being retired
        try:
            reply: _Reply | str = ""  # "": it died
            timed_out = not await _wait_readable(worker.conn.fileno(), timeout_ms / 1000)
            if not timed_out and not run.cancelled:
                reply = _read_reply(worker.conn, self._reply_bytes_max)
            if isinstance(reply, _Reply):
                worker.tasks_done += 1
                reason = self._recycle_reason(worker)
                if reason is None:
                    owned = False
                    self._idle.append(worker)
                    return TaskOutcome(reply.ok, reply.text, worker.pid, None, False, False)
                log.info("worker %d retired: %s", worker.pid, reason)
            owned = False  # _retire kills it before its first await
            run.process = None  # so a cancel() from now on kills nothing
            exit_code = await self._retire(worker)
            return _outcome(
                run,
                reply,
                "worker",
                worker.pid,
                exit_code,
                timed_out=timed_out,
                timeout_ms=timeout_ms,
            )
        finally:
            if owned:  # this coroutine was cancelled: never leave a worker behind
                self._workers_count -= 1
                self._kill(worker)

    def _recycle_reason(self, worker: _Worker) -> str | None:
        """Why the worker must go after the task it just finished; None: keep it."""
        assert 1 <= worker.tasks_done <= self._worker_tasks_max, worker.tasks_done
        if worker.tasks_done >= self._worker_tasks_max:
            return f"ran {worker.tasks_done} tasks (worker_tasks_max)"
        peak_mb = _peak_rss_mb(worker.pid)
        if peak_mb is not None and peak_mb > self._worker_memory_mb_max:
            return f"peak RSS {peak_mb} MiB > worker_memory_mb_max {self._worker_memory_mb_max}"
        return None

    async def _run_isolated(
        self, run: _Run, run_id: str, function: str, args_json: str, timeout_ms: int
    ) -> TaskOutcome:
        """A fresh process for this task alone; it exits after its one reply."""
        reader, writer = self._context.Pipe(duplex=False)
        process: BaseProcess = self._context.Process(
            target=_child_main,
            args=(writer, function, args_json, self._result_bytes_max),
            name=f"goml-task-{run_id}",
            daemon=True,
        )
        try:
            process.start()
            writer.close()  # the child holds the only write end: EOF when it dies
            assert process.pid is not None
            pid = process.pid
            run.process, run.pid = process, pid
            ready = await _wait_readable(reader.fileno(), timeout_ms / 1000)
            if not ready:
                process.kill()
            reply = _read_reply(reader, self._reply_bytes_max) if ready else ""
            # It sent its reply and exits by itself; killed if it lingers.
            exit_code = await self._reap(process, grace_ms=max(1, self._kill_wait_ms // 2))
            return _outcome(
                run, reply, "task", pid, exit_code, timed_out=not ready, timeout_ms=timeout_ms
            )
        finally:
            reader.close()
            writer.close()  # a no-op once closed above; here if the process never started
            run.process = None
            with contextlib.suppress(ValueError):  # ValueError: closed, so reaped
                if process.pid is not None and process.exitcode is None:
                    process.kill()  # this coroutine was cancelled: never leave a process
