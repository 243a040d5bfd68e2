"""The supervision core of `goml cluster up` (`goml.cluster.supervise`): which exits are
restarted, after how long, and when a process is given up on. Pure: times are numbers.

The real processes (kill -9 under `goml cluster up`, Ctrl-C) are in tests/test_ops.py.
"""

from __future__ import annotations

import pytest

from goml.cluster.supervise import (
    DEFAULT_POLICY,
    GiveUp,
    ProcessExit,
    Restart,
    RestartPolicy,
    RestartTracker,
    State,
    Stopped,
    Supervisor,
)

POLICY = RestartPolicy(
    delay_ms_first=1000, delay_ms_max=8000, stable_ms=10_000, crashes_max=5, window_ms=60_000
)
KILLED = ProcessExit(None, "SIGKILL")


@pytest.mark.parametrize(
    ("how", "clean"),
    [
        (ProcessExit(0), True),
        (ProcessExit(None, "SIGTERM"), True),
        (ProcessExit(None, "SIGINT"), True),
        (ProcessExit(None, "SIGHUP"), True),
        (ProcessExit(None, "SIGPIPE"), True),
        (ProcessExit(1), False),
        (ProcessExit(2), False),
        (ProcessExit(None, "SIGKILL"), False),
        (ProcessExit(None, "SIGSEGV"), False),
        (ProcessExit(None, "SIGABRT"), False),
        (ProcessExit(None, spawn_error="No such file"), False),
    ],
)
def test_on_failure_as_systemd(how: ProcessExit, clean: bool) -> None:
    """systemd's Restart=on-failure: exit 0 and the clean signals are not restarted."""
    decision = RestartTracker(POLICY).exited(how, ran_ms=100, now_ms=100)
    assert isinstance(decision, Stopped) == clean
    if not clean:
        assert isinstance(decision, Restart)


def test_exit_described_for_the_log() -> None:
    assert ProcessExit(3).describe() == "exited with code 3"
    assert KILLED.describe() == "was killed by SIGKILL"
    assert ProcessExit(None, spawn_error="boom").describe() == "could not be started: boom"
    with pytest.raises(AssertionError):
        ProcessExit(None)  # neither a code nor a signal: a runtime bug
    with pytest.raises(AssertionError):
        ProcessExit(1, "SIGKILL")


def test_backoff_doubles_up_to_the_cap() -> None:
    """Quick crashes in a row wait 1, 2, 4, 8, 8 ... s (the policy never gives up here:
    a window too short to hold five crashes)."""
    policy = RestartPolicy(
        delay_ms_first=1000, delay_ms_max=8000, stable_ms=10_000, crashes_max=5, window_ms=1
    )
    tracker = RestartTracker(policy)
    now_ms, delays = 0, []
    for _ in range(7):
        decision = tracker.exited(KILLED, ran_ms=50, now_ms=now_ms)
        assert isinstance(decision, Restart)
        assert decision.at_ms == now_ms + decision.delay_ms
        delays.append(decision.delay_ms)
        now_ms = decision.at_ms + 50
    assert delays == [1000, 2000, 4000, 8000, 8000, 8000, 8000]


def test_a_stable_run_resets_the_backoff() -> None:
    tracker = RestartTracker(POLICY)
    first = tracker.exited(KILLED, ran_ms=100, now_ms=100)
    second = tracker.exited(KILLED, ran_ms=100, now_ms=1200)
    assert isinstance(first, Restart) and isinstance(second, Restart)
    assert (first.delay_ms, second.delay_ms) == (1000, 2000)
    # It then ran 10 s (stable_ms): the next crash is a first one again.
    third = tracker.exited(KILLED, ran_ms=10_000, now_ms=13_200)
    assert isinstance(third, Restart)
    assert third.delay_ms == 1000
    assert third.crashes_in_window == 3  # still counted towards the start limit


def test_gives_up_after_crashes_max_in_the_window() -> None:
    tracker = RestartTracker(POLICY)
    now_ms = 0
    decisions = []
    for _ in range(5):
        decision = tracker.exited(ProcessExit(2), ran_ms=30, now_ms=now_ms)
        decisions.append(decision)
        if isinstance(decision, Restart):
            now_ms = decision.at_ms + 30
    assert [type(d) for d in decisions] == [Restart] * 4 + [GiveUp]
    assert decisions[-1] == GiveUp(5)
    assert now_ms < POLICY.window_ms  # 1 + 2 + 4 + 8 s of waits: all inside the window


def test_old_crashes_leave_the_window() -> None:
    """Crashes spread wider than the window are never five at once: restarted for ever."""
    tracker = RestartTracker(POLICY)
    for n in range(20):
        decision = tracker.exited(KILLED, ran_ms=20_000, now_ms=n * 20_000)
        assert isinstance(decision, Restart), n
        assert decision.crashes_in_window <= 3


def test_default_policy_gives_up_within_its_window() -> None:
    """The shipped policy can reach its limit: the waits before the fifth crash fit."""
    p = DEFAULT_POLICY
    waits_ms = sum(min(p.delay_ms_max, p.delay_ms_first * 2**n) for n in range(p.crashes_max - 1))
    assert waits_ms < p.window_ms


def test_supervisor_restarts_then_gives_up_and_logs_why() -> None:
    sup = Supervisor(["n1", "n2"], POLICY, now_ms=0)
    assert sup.due(0) == ("n1", "n2")
    sup.started("n1", 101)
    sup.started("n2", 102)
    assert sup.take_logs() == ()  # first starts are not news
    assert sup.due(0) == ()  # running: not started twice
    assert sup.next_deadline_ms() is None

    decision = sup.exited("n2", KILLED, now_ms=5000)
    assert decision == Restart(6000, 1000, 1)
    assert sup.state("n2") is State.WAITING
    assert sup.take_logs() == (
        "n2 was killed by SIGKILL; restarting in 1 s (crash 1 of 5 allowed in 60 s)",
    )
    assert sup.next_deadline_ms() == 6000
    assert sup.due(5999) == ()
    assert sup.due(6000) == ("n2",)
    sup.started("n2", 103)
    assert sup.take_logs() == ("n2 restarted (pid 103)",)

    now_ms = 6000
    for _ in range(4):
        now_ms += 10
        decision = sup.exited("n2", ProcessExit(2), now_ms)
        if isinstance(decision, GiveUp):
            break
        assert isinstance(decision, Restart)
        now_ms = decision.at_ms
        assert sup.due(now_ms) == ("n2",)
        sup.started("n2", 200)
    assert isinstance(decision, GiveUp)
    assert sup.state("n2") is State.GAVE_UP
    assert sup.take_logs()[-1] == (
        "n2 exited with code 2; it crashed 5 times in 60 s: giving up on it (see its log)"
    )
    assert sup.due(now_ms + 100_000) == ()  # never started again
    assert sup.running() == ("n1",)
    assert not sup.finished()


def test_supervisor_clean_exit_is_not_restarted() -> None:
    sup = Supervisor(["agent-1"], POLICY, now_ms=0)
    assert sup.due(0) == ("agent-1",)
    sup.started("agent-1", 7)
    assert sup.exited("agent-1", ProcessExit(0), 50) == Stopped()
    assert sup.take_logs() == ("agent-1 exited with code 0: stopped on purpose, not restarted",)
    assert sup.finished()
    assert sup.next_deadline_ms() is None


def test_supervisor_stop_starts_nothing_and_counts_no_crash() -> None:
    """After stop(), a pending restart is dropped and exits (our SIGTERM, or a SIGKILL
    after the stop timeout) are no crashes."""
    sup = Supervisor(["n1", "n2"], POLICY, now_ms=0)
    assert sup.due(0) == ("n1", "n2")
    sup.started("n1", 1)
    sup.started("n2", 2)
    assert isinstance(sup.exited("n1", KILLED, 100), Restart)
    sup.stop()
    assert sup.stopping
    assert sup.next_deadline_ms() is None
    assert sup.due(10_000) == ()
    assert sup.exited("n2", ProcessExit(None, "SIGKILL"), 200) == Stopped()
    assert sup.state("n2") is State.STOPPED
    assert sup.running() == ()


def test_runtime_misuse_asserts() -> None:
    sup = Supervisor(["n1"], POLICY, now_ms=0)
    with pytest.raises(AssertionError):
        sup.exited("n1", KILLED, 0)  # never started
    with pytest.raises(AssertionError):
        Supervisor(["n1", "n1"], POLICY, now_ms=0)
    with pytest.raises(AssertionError):
        RestartPolicy(delay_ms_first=0, delay_ms_max=1, stable_ms=1, crashes_max=1, window_ms=1)
