"""Cluster time (goml.cluster.clock) and the manifest's record of it.

The node-level behaviour (a new leader whose wall clock is a minute ahead or behind does
not expire an inherited lease early or late) is in tests/testdata/cluster/clock_*.txt."""

from __future__ import annotations

import json
import random

import pytest

from goml.cluster.clock import SLEW_PER_MILLE, ClusterClock
from goml.cluster.commands import RegisterAgent, Resources, SubmitTasks, TaskSpec, encode_command
from goml.cluster.manifest import DEFAULT_LIMITS, Manifest


def test_the_first_leader_of_a_new_cluster_starts_on_its_wall_clock() -> None:
    clock = ClusterClock(None, now_ms=5)
    clock.start_leading(now_ms=10, wall_ms=1_700_000_000_000)
    assert clock.now_ms(10, 1_700_000_000_000) == 1_700_000_000_000
    assert clock.now_ms(510, 1_700_000_000_500) == 1_700_000_000_500


@pytest.mark.parametrize("skew_ms", [-3_600_000, -60_000, 60_000, 3_600_000])
def test_a_new_leader_continues_from_the_last_command_whatever_its_wall_clock(
    skew_ms: int,
) -> None:
    clock = ClusterClock(None, now_ms=0)
    clock.applied(50_000, now_ms=1_000)  # a command stamped 50 000, applied here at mono 1000
    clock.start_leading(now_ms=1_300, wall_ms=50_300 + skew_ms)
    # The last command's time plus the 300 ms that passed here since: not the wall clock.
    assert clock.now_ms(1_300, 50_300 + skew_ms) == 50_300


@pytest.mark.parametrize("seed", range(20))
def test_cluster_time_never_goes_back_and_gains_at_most_one_percent(seed: int) -> None:
    """Wall clocks that jump both ways at random: while leading, cluster time advances at
    least as fast as the monotonic clock and at most SLEW_PER_MILLE faster."""
    rng = random.Random(seed)
    clock = ClusterClock(1_000, now_ms=0)
    clock.start_leading(now_ms=0, wall_ms=0)
    start = last = clock.now_ms(0, 0)
    now_ms, offset_ms = 0, 0
    for _ in range(2_000):
        now_ms += rng.randint(0, 50)
        if rng.random() < 0.02:
            offset_ms = rng.randint(-3_600_000, 3_600_000)  # a jump, either way
        reading = clock.now_ms(now_ms, now_ms + offset_ms)
        assert reading >= last + 0, (reading, last)
        last = reading
    elapsed_ms = now_ms
    assert last - start >= elapsed_ms
    assert last - start <= elapsed_ms + elapsed_ms * SLEW_PER_MILLE // 1000 + 1


def test_cluster_time_catches_up_with_a_wall_clock_ahead_at_one_percent() -> None:
    clock = ClusterClock(10_000, now_ms=0)
    clock.start_leading(now_ms=0, wall_ms=20_000)  # 10 s behind wall (an outage)
    for now_ms in range(20, 100_001, 20):
        reading = clock.now_ms(now_ms, 20_000 + now_ms)
    assert reading == 10_000 + 100_000 + 1_000  # 100 s of leading gained 1 s
    for now_ms in range(100_020, 1_200_001, 20):
        reading = clock.now_ms(now_ms, 20_000 + now_ms)
    assert reading == 20_000 + 1_200_000  # caught up, then it follows wall exactly


def test_a_command_applied_while_leading_never_makes_time_go_back() -> None:
    clock = ClusterClock(1_000, now_ms=0)
    clock.start_leading(now_ms=0, wall_ms=0)
    assert clock.now_ms(10, 0) == 1_010
    clock.applied(5_000, now_ms=10)  # an earlier term's entry, stamped later than we think
    assert clock.now_ms(20, 0) == 5_000
    assert clock.now_ms(30, 0) == 5_010


def _register(now_ms: int) -> bytes:
    return encode_command(RegisterAgent(now_ms, "a1", "aws", "r1", "amd64", Resources(1, 64, 0)))


def test_the_manifest_keeps_the_latest_command_time_across_snapshots() -> None:
    manifest = Manifest(DEFAULT_LIMITS)
    assert manifest.latest_command_ms is None
    manifest.apply(1, _register(7_000))
    manifest.apply(2, _register(6_000))  # refused or not, time never goes back
    assert manifest.latest_command_ms == 7_000
    restored = Manifest.restore(manifest.snapshot())
    assert restored.latest_command_ms == 7_000
    assert json.loads(manifest.snapshot())["format"] >= 2  # the format that added the time


def test_a_format_1_snapshot_is_read_with_the_latest_time_it_holds() -> None:
    """Stores written before cluster time was kept still load (a rolling upgrade)."""
    manifest = Manifest(DEFAULT_LIMITS)
    manifest.apply(1, _register(7_000))
    spec = TaskSpec("k", "matmul", '{"n":4}', Resources(1, 64, 0), 0, 3, 60_000, None, None)
    manifest.apply(2, encode_command(SubmitTasks(9_000, (spec,))))
    old = manifest._snapshot(1)  # what a store written by that version holds
    assert "latest_command_ms" not in json.loads(old)
    restored = Manifest.restore(old)
    assert restored.latest_command_ms == 9_000
    assert restored.list_tasks(limit=10) == manifest.list_tasks(limit=10)
