"""Supervision of local processes (`goml cluster up`), sans-IO: when to restart a process
that died, when to give up on it. The runtime (`goml.cluster.local.supervise`) only
spawns, waits and signals, by PID.

The rule is systemd's `Restart=on-failure` (what the deploy's units use), with a backoff
and a start limit:
- A process that exits with code 0, or is ended by a signal systemd calls clean (SIGHUP,
  SIGINT, SIGTERM, SIGPIPE), was stopped on purpose: it is not restarted.
- Any other end (a non-zero exit code, SIGKILL, SIGSEGV, ...) is a crash: the process is
  started again after `delay_ms_first`, doubled for every crash in a row up to
  `delay_ms_max`. A run that lasted `stable_ms` ends the streak: the next crash waits
  `delay_ms_first` again.
- `crashes_max` crashes within `window_ms` (systemd's StartLimitBurst within
  StartLimitIntervalSec) and the supervisor gives up on that process, saying so: a
  process that cannot start (a broken config, a port taken) must not loop for ever.

Inputs carry `now_ms` (any monotonic clock); outputs are values and log lines.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

# Signals after which systemd's Restart=on-failure does not restart (systemd.service(5)).
CLEAN_SIGNALS = frozenset({"SIGHUP", "SIGINT", "SIGTERM", "SIGPIPE"})


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    delay_ms_first: int  # the wait before the first restart after a crash
    delay_ms_max: int  # the wait doubles with every crash in a row, up to this
    stable_ms: int  # a run at least this long ends a crash streak
    crashes_max: int  # this many crashes within window_ms: give up on the process
    window_ms: int

    def __post_init__(self) -> None:
        assert 0 < self.delay_ms_first <= self.delay_ms_max, self
        assert self.stable_ms > 0, self
        assert self.crashes_max >= 1, self
        assert self.window_ms > 0, self


# The deploy's units restart after 1 s (RestartSec=1); systemd's start limit is 5 starts
# in 10 s, too short a window once the waits double (1+2+4+8 s), so 5 crashes in 2 min.
DEFAULT_POLICY = RestartPolicy(
    delay_ms_first=1000, delay_ms_max=30_000, stable_ms=10_000, crashes_max=5, window_ms=120_000
)


@dataclass(frozen=True, slots=True)
class ProcessExit:
    """How a process ended, as the runtime saw it: an exit code or a signal's name
    (`spawn_error`: it could not even be started)."""

    code: int | None
    signal_name: str | None = None
    spawn_error: str | None = None

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.code, self.signal_name, self.spawn_error)]
        assert given.count(True) == 1, self

    @property
    def clean(self) -> bool:
        return self.code == 0 or self.signal_name in CLEAN_SIGNALS

    def describe(self) -> str:
        if self.spawn_error is not None:
            return f"could not be started: {self.spawn_error}"
        if self.signal_name is not None:
            return f"was killed by {self.signal_name}"
        return f"exited with code {self.code}"


@dataclass(frozen=True, slots=True)
class Restart:
    at_ms: int
    delay_ms: int
    crashes_in_window: int


@dataclass(frozen=True, slots=True)
class GiveUp:
    crashes_in_window: int


@dataclass(frozen=True, slots=True)
class Stopped:
    """A clean exit: not restarted."""


Decision = Restart | GiveUp | Stopped


@dataclass(slots=True)
class RestartTracker:
    """One process's crash history: `exited` turns an exit into a decision."""

    policy: RestartPolicy
    crashes_ms: list[int] = field(default_factory=list)  # within the window, oldest first
    streak: int = 0  # crashes in a row, each after a run shorter than stable_ms

    def exited(self, exit: ProcessExit, ran_ms: int, now_ms: int) -> Decision:
        assert ran_ms >= 0, ran_ms
        if exit.clean:
            return Stopped()
        policy = self.policy
        self.crashes_ms = [t for t in self.crashes_ms if now_ms - t < policy.window_ms]
        self.crashes_ms.append(now_ms)
        assert len(self.crashes_ms) <= policy.crashes_max, "gave up before this"
        if len(self.crashes_ms) >= policy.crashes_max:
            return GiveUp(len(self.crashes_ms))
        self.streak = 1 if ran_ms >= policy.stable_ms else self.streak + 1
        # The exponent is capped so a long streak cannot build a huge integer.
        doublings = min(self.streak - 1, 32)
        delay_ms = min(policy.delay_ms_max, policy.delay_ms_first * 2**doublings)
        assert policy.delay_ms_first <= delay_ms <= policy.delay_ms_max
        return Restart(now_ms + delay_ms, delay_ms, len(self.crashes_ms))


class State(enum.StrEnum):
    WAITING = "WAITING"  # to be started at its `start_at_ms`
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"  # exited cleanly: not restarted
    GAVE_UP = "GAVE_UP"  # crashed too often


@dataclass(slots=True)
class _Process:
    tracker: RestartTracker
    state: State
    start_at_ms: int
    started_ms: int = 0
    starts: int = 0


class Supervisor:
    """Several named processes under one policy. The runtime's loop:

    1. start every name `due(now_ms)` returns (report a failed spawn with `exited`);
    2. wait until a process exits (`exited(name, how, now_ms)`), a stop is asked
       (`stop()`, then stop every process it started, by PID) or `next_deadline_ms()`;
    3. print `take_logs()`; repeat until `stop()` or `finished()`.
    """

    def __init__(self, names: Sequence[str], policy: RestartPolicy, now_ms: int) -> None:
        assert len(set(names)) == len(names), names
        self.policy = policy
        self._processes = {
            name: _Process(RestartTracker(policy), State.WAITING, now_ms) for name in names
        }
        self._stopping = False
        self._logs: list[str] = []

    def due(self, now_ms: int) -> tuple[str, ...]:
        """The processes to start now (each counts as running from now on)."""
        if self._stopping:
            return ()
        names = []
        for name, process in self._processes.items():  # given order: nodes before agents
            if process.state is State.WAITING and process.start_at_ms <= now_ms:
                process.state = State.RUNNING
                process.started_ms = now_ms
                process.starts += 1
                names.append(name)
        return tuple(names)

    def started(self, name: str, pid: int) -> None:
        """The runtime started `name` as `pid` (logged for restarts only)."""
        process = self._processes[name]
        assert process.state is State.RUNNING, (name, process.state)
        if process.starts > 1:
            self._logs.append(f"{name} restarted (pid {pid})")

    def exited(self, name: str, how: ProcessExit, now_ms: int) -> Decision:
        process = self._processes[name]
        assert process.state is State.RUNNING, (name, process.state)
        if self._stopping:
            process.state = State.STOPPED  # stopped by us: no decision to make
            return Stopped()
        ran_ms = max(0, now_ms - process.started_ms)
        decision = process.tracker.exited(how, ran_ms, now_ms)
        window_s = self.policy.window_ms / 1000
        match decision:
            case Stopped():
                process.state = State.STOPPED
                self._logs.append(f"{name} {how.describe()}: stopped on purpose, not restarted")
            case Restart():
                process.state = State.WAITING
                process.start_at_ms = decision.at_ms
                self._logs.append(
                    f"{name} {how.describe()}; restarting in {decision.delay_ms / 1000:g} s "
                    f"(crash {decision.crashes_in_window} of {self.policy.crashes_max} "
                    f"allowed in {window_s:g} s)"
                )
            case GiveUp():
                process.state = State.GAVE_UP
                self._logs.append(
                    f"{name} {how.describe()}; it crashed {decision.crashes_in_window} times "
                    f"in {window_s:g} s: giving up on it (see its log)"
                )
        return decision

    def stop(self) -> None:
        """Stop asked: nothing is started again; the runtime stops what runs."""
        self._stopping = True

    @property
    def stopping(self) -> bool:
        return self._stopping

    def state(self, name: str) -> State:
        return self._processes[name].state

    def running(self) -> tuple[str, ...]:
        return tuple(n for n, p in self._processes.items() if p.state is State.RUNNING)

    def finished(self) -> bool:
        """Nothing runs and nothing will be started again."""
        return all(p.state in (State.STOPPED, State.GAVE_UP) for p in self._processes.values())

    def next_deadline_ms(self) -> int | None:
        """When the next restart is due (None: none is waiting)."""
        if self._stopping:
            return None
        waits = [p.start_at_ms for p in self._processes.values() if p.state is State.WAITING]
        return min(waits) if waits else None

    def take_logs(self) -> tuple[str, ...]:
        logs, self._logs = tuple(self._logs), []
        return logs
