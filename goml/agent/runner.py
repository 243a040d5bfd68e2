"""Runs task functions in child processes, one process per task, from asyncio.

A hung or runaway function cannot wedge the agent: on timeout or cancellation its process
is killed (SIGKILL) and reaped, and the runner carries on. Processes come from a
`forkserver` that has preloaded the task library, so a task starts in milliseconds without
forking the agent's own threads (gRPC) and without re-importing NumPy.

The child sends one JSON document back over a pipe, `{"ok": bool, "text": str}`; nothing
is unpickled. `text` is the result JSON (from `run_task`, size-capped) or the error text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.connection
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

from goml.agent.tasks import run_task

__all__ = ["RunnerFull", "TaskOutcome", "TaskRunner"]

_CONTEXT_NAME = "forkserver"
_PRELOAD = ["goml.agent.tasks"]
# The pipe message is the result (<= result_bytes_max) plus a little JSON framing.
_FRAMING_BYTES_MAX = 1024


class RunnerFull(RuntimeError):
    """More runs requested than `runs_max`: the caller's accounting is wrong."""


@dataclass(frozen=True, slots=True)
class TaskOutcome:
    ok: bool
    text: str  # result JSON when ok, else the error text
    pid: int
    exit_code: int | None
    cancelled: bool  # stopped by cancel(): text says so; report nothing
    timed_out: bool


def _child_main(
    conn: multiprocessing.connection.Connection,
    function: str,
    args_json: str,
    result_bytes_max: int,
) -> None:
    try:
        message = {"ok": True, "text": run_task(function, args_json, result_bytes_max)}
    except BaseException as exc:  # everything a function raises is the task's failure
        text = f"{type(exc).__name__}: {exc}"
        message = {"ok": False, "text": text[:result_bytes_max]}
    try:
        conn.send_bytes(json.dumps(message).encode("utf-8"))
    finally:
        conn.close()


def _noop() -> None:
    """The warm-up child: starting it is what makes the forkserver load the library."""


@dataclass
class _Run:
    process: BaseProcess
    cancelled: bool = False


class TaskRunner:
    def __init__(self, *, result_bytes_max: int, runs_max: int, kill_wait_ms: int) -> None:
        if result_bytes_max < 1 or runs_max < 1 or kill_wait_ms < 1:
            raise ValueError("result_bytes_max, runs_max and kill_wait_ms must be >= 1")
        self._result_bytes_max = result_bytes_max
        self._runs_max = runs_max
        self._kill_wait_ms = kill_wait_ms
        self._context: Any = multiprocessing.get_context(_CONTEXT_NAME)
        self._context.set_forkserver_preload(_PRELOAD)
        self._runs: dict[str, _Run] = {}
        self._warm: asyncio.Future[None] | None = None

    def pid(self, run_id: str) -> int | None:
        run = self._runs.get(run_id)
        return None if run is None else run.process.pid

    @property
    def running(self) -> tuple[str, ...]:
        return tuple(sorted(self._runs))

    def cancel(self, run_id: str) -> bool:
        """Kill the run's process; its `run` call returns a cancelled outcome."""
        run = self._runs.get(run_id)
        if run is None:
            return False
        run.cancelled = True
        if run.process.pid is not None:  # not started yet (waiting for the warm-up): no kill
            run.process.kill()
        return True

    async def close(self) -> None:
        """Kill every run (their `run` calls return cancelled outcomes)."""
        for run_id in sorted(self._runs):
            self.cancel(run_id)

    async def warm_up(self) -> None:
        """Start the forkserver in a worker thread and wait for it (without blocking).

        Fix: the first `Process.start()` of a forkserver context blocks until the server
        has imported the preloaded task library (NumPy, pydantic): 0.5 s on an idle
        machine, over 2 s on a loaded one. Done on the event loop, that froze the agent's
        heartbeats, and a leader with a short agent_timeout_ms declared a healthy agent
        down when its first task arrived. `run` waits for this first (once)."""
        if self._warm is None:
            self._warm = asyncio.ensure_future(asyncio.to_thread(self._start_forkserver))
        with contextlib.suppress(Exception):  # a broken forkserver fails again in run()
            await asyncio.shield(self._warm)

    def _start_forkserver(self) -> None:
        process: BaseProcess = self._context.Process(
            target=_noop, name="goml-forkserver-warm-up", daemon=True
        )
        process.start()
        process.join(self._kill_wait_ms / 1000)
        if process.exitcode is None:
            process.kill()
            process.join(self._kill_wait_ms / 1000)

    async def run(self, run_id: str, function: str, args_json: str, timeout_ms: int) -> TaskOutcome:
        """Run `function` in a fresh process; never raises for anything the task does."""
        if run_id in self._runs:
            raise ValueError(f"run {run_id!r} is already running")
        if len(self._runs) >= self._runs_max:
            raise RunnerFull(f"{len(self._runs)} runs in progress; runs_max={self._runs_max}")
        assert timeout_ms >= 1, timeout_ms
        loop = asyncio.get_running_loop()
        reader, writer = self._context.Pipe(duplex=False)
        process: BaseProcess = self._context.Process(
            target=_child_main,
            args=(writer, function, args_json, self._result_bytes_max),
            name=f"goml-task-{run_id}",
            daemon=True,
        )
        run = _Run(process)
        self._runs[run_id] = run
        try:
            await self.warm_up()
            if run.cancelled:  # cancelled while waiting for the warm-up: never started
                return TaskOutcome(False, "cancelled", 0, None, True, False)
            process.start()
            writer.close()  # the child holds the only write end: EOF when it dies
            assert process.pid is not None
            readable: asyncio.Future[None] = loop.create_future()

            def wake() -> None:
                if not readable.done():
                    readable.set_result(None)

            loop.add_reader(reader.fileno(), wake)
            timed_out = False
            try:
                async with asyncio.timeout(timeout_ms / 1000):
                    await readable
            except TimeoutError:
                timed_out = True
                process.kill()
            finally:
                loop.remove_reader(reader.fileno())
            message = None if timed_out else self._receive(reader)
            exit_code = await self._reap(process)
            return self._outcome(run, message, process.pid, exit_code, timed_out, timeout_ms)
        finally:
            reader.close()
            writer.close()  # a no-op once closed above; here if the process never started
            del self._runs[run_id]
            if process.pid is not None and process.exitcode is None:
                process.kill()  # this coroutine was cancelled: never leave a process behind
            elif process.exitcode is not None:
                process.close()

    def _receive(self, reader: multiprocessing.connection.Connection) -> dict[str, Any] | None:
        """The child's message, or None if it died without one (killed, crashed)."""
        try:
            data = reader.recv_bytes(self._result_bytes_max + _FRAMING_BYTES_MAX)
        except (EOFError, OSError):
            return None
        message = json.loads(data)
        assert isinstance(message, dict) and isinstance(message.get("text"), str), message
        return message

    async def _reap(self, process: BaseProcess) -> int | None:
        """Wait (bounded) for the process to exit; kill it if it lingers."""
        deadline_s = self._kill_wait_ms / 1000
        waited_s = 0.0
        step_s = 0.002
        while process.exitcode is None and waited_s < deadline_s:
            await asyncio.sleep(step_s)
            waited_s += step_s
            step_s = min(step_s * 2, 0.05)
            if waited_s >= deadline_s / 2:
                process.kill()  # it sent its result and still has not exited
        exit_code = process.exitcode
        if exit_code is not None:
            process.join(0)  # reap: the PID is gone once this returns
        return exit_code

    def _outcome(
        self,
        run: _Run,
        message: dict[str, Any] | None,
        pid: int,
        exit_code: int | None,
        timed_out: bool,
        timeout_ms: int,
    ) -> TaskOutcome:
        if run.cancelled:
            return TaskOutcome(False, "cancelled", pid, exit_code, True, False)
        if timed_out:
            text = f"timed out after {timeout_ms} ms"
            return TaskOutcome(False, text, pid, exit_code, False, True)
        if message is None:
            text = f"task process {pid} died without a result (exit code {exit_code})"
            return TaskOutcome(False, text, pid, exit_code, False, False)
        return TaskOutcome(bool(message["ok"]), message["text"], pid, exit_code, False, False)
