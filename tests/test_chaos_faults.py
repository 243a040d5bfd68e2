"""The chaos runner's disk and clock faults on real mechanisms (goml.chaos.node_faults):
a real ext4 file system on a real loop device, filled for real; the kernel's block I/O
throttle on it; the real SQLite store on it; libfaketime in a real process. No mocks.

Needs root (loop devices, mount, cgroup v1 throttles) and libfaketime for the clock
test: without them a test fails naming what is missing, as the chaos runner does.
Everything made here is undone in a `finally` (throttle removed, unmounted, detached),
and the process started is stopped by its PID, also on failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from goml.chaos.node_faults import (
    BLKIO_THROTTLE,
    LoopDisk,
    NodeFaults,
    clock_env,
    find_libfaketime,
    write_clock_offset,
    write_iops_for,
)
from goml.raft.sqlite_store import SqliteStorage, StoreFull
from goml.raft.types import Entry, EntryKind, HardState
from goml.scenario.loader import load_scenario_text

pytestmark = pytest.mark.slow

PROCESS_TIMEOUT_S = 20.0


def _loop_devices() -> str:
    return subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[LoopDisk]:
    if os.geteuid() != 0:
        pytest.fail("disk faults need root (losetup, mount): run the chaos tests as root")
    loop = LoopDisk(tmp_path / "disk.img", tmp_path / "data", size_mb=16)
    try:
        loop.create()
        yield loop
    finally:
        problems = loop.close()
        assert problems == [], problems
    assert str(tmp_path / "disk.img") not in _loop_devices()
    assert not os.path.ismount(tmp_path / "data")


def entries(first: int, count: int, size: int = 200) -> tuple[Entry, ...]:
    return tuple(
        Entry(index=first + i, term=1, kind=EntryKind.NORMAL, data=os.urandom(size))
        for i in range(count)
    )


def test_a_full_disk_is_store_full_with_a_clear_message_and_loses_nothing_stored(
    disk: LoopDisk,
) -> None:
    path = disk.mount_point / "raft.sqlite3"
    store = SqliteStorage(path)
    store.persist(None, entries(1, 20), HardState(term=1, vote="", commit=20), True)
    empty = disk.mount_point / "new-node"
    empty.mkdir()
    taken = disk.fill()
    assert taken > 0 and os.statvfs(disk.mount_point).f_bavail == 0
    with pytest.raises(StoreFull) as caught:
        # More than the WAL can hold in the space it already has.
        for batch in range(200):
            store.persist(None, entries(21 + batch * 50, 50), None, True)
    message = str(caught.value)
    assert f"{path}: disk full (database or disk is full" in message
    assert "nothing it carried was stored or acknowledged" in message
    assert "free space there and restart the node" in message
    store.close()
    # A node started on a full disk with no store yet is told so too (not "corrupted").
    with pytest.raises(StoreFull, match="disk full"):
        SqliteStorage(empty / "raft.sqlite3")
    disk.free()
    reopened = SqliteStorage(path)
    try:
        loaded = reopened.load()
        # Everything whose write returned is there; the refused write left no trace.
        assert loaded.entries[0].index == 1
        assert loaded.hard_state.commit == 20
        last = loaded.entries[-1].index
        assert last >= 20 and (last - 20) % 50 == 0  # whole writes only
        reopened.persist(None, entries(last + 1, 1), None, True)
    finally:
        reopened.close()


def test_the_throttle_stalls_every_store_commit_and_is_removed(disk: LoopDisk) -> None:
    if not BLKIO_THROTTLE.exists():
        pytest.fail(f"fsync stalls need the cgroup v1 block I/O throttle ({BLKIO_THROTTLE})")
    store = SqliteStorage(disk.mount_point / "raft.sqlite3")
    try:
        store.persist(None, entries(1, 5), HardState(term=1, vote="", commit=5), True)
        stall_ms = 300
        disk.throttle(write_iops_for(stall_ms))
        assert f"{disk.major_minor} {write_iops_for(stall_ms)}" in BLKIO_THROTTLE.read_text()
        started = time.perf_counter()
        for index in range(6, 9):
            store.persist(None, entries(index, 1), HardState(term=1, vote="", commit=index), True)
        stalled_ms = (time.perf_counter() - started) * 1000
        # A lower bound only (a busy machine makes it longer, never shorter): the
        # throttle is in force (the first commit may pass on the throttle's initial
        # budget, the next ones wait). What a commit costs is measured in the module doc.
        assert stalled_ms > stall_ms, stalled_ms
        disk.throttle(None)
        assert disk.major_minor not in BLKIO_THROTTLE.read_text()
    finally:
        store.close()


def test_write_iops_follow_the_stall() -> None:
    assert write_iops_for(200) == 30
    assert write_iops_for(6000) == 1
    assert write_iops_for(60_000) == 1  # the slowest the throttle goes: 1 I/O per second
    assert write_iops_for(1) == 6000


def test_a_wipe_deletes_the_store_and_keeps_the_mount_point(disk: LoopDisk) -> None:
    store = SqliteStorage(disk.mount_point / "raft.sqlite3")
    store.persist(None, entries(1, 3), HardState(term=1, vote="", commit=3), True)
    store.close()
    faults = NodeFaults(disk.mount_point.parent)
    faults.disks["n1"] = disk
    faults.data_dirs["n1"] = disk.mount_point
    faults.wipe("n1")
    assert sorted(p.name for p in disk.mount_point.iterdir()) == ["lost+found"]
    assert os.path.ismount(disk.mount_point)
    fresh = SqliteStorage(disk.mount_point / "raft.sqlite3")
    try:
        assert fresh.load().entries == ()
    finally:
        fresh.close()
    faults.disks.clear()  # the fixture closes the disk


def test_closing_keeps_the_store_readable_where_it_was(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("disk faults need root (losetup, mount)")
    loop = LoopDisk(tmp_path / "disk.img", tmp_path / "data", size_mb=16)
    try:
        loop.create()
        store = SqliteStorage(loop.mount_point / "raft.sqlite3")
        store.persist(None, entries(1, 7), HardState(term=1, vote="", commit=7), True)
        store.close()
        loop.fill()
    finally:
        assert loop.close() == []
    assert not os.path.ismount(tmp_path / "data")
    kept = SqliteStorage(tmp_path / "data" / "raft.sqlite3")
    try:
        assert [e.index for e in kept.load().entries] == list(range(1, 8))
    finally:
        kept.close()
    assert not (tmp_path / "data" / "goml-disk-filler").exists()


def test_setup_puts_only_the_nodes_disk_faults_may_hit_on_loop_disks(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("disk faults need root (losetup, mount)")
    scenario = load_scenario_text(
        """\
name: t
duration_s: 10
topology:
  nodes:
    - {name: a, cloud: c, region: r}
    - {name: b, cloud: c, region: r}
    - {name: d, cloud: c, region: r}
faults:
  - {at_s: 1, kind: disk, target: b, full: true, duration_s: 1}
  - {at_s: 2, kind: disk, target: a, wipe: true}
"""
    ).scenario
    data_dirs = {n: tmp_path / "nodes" / n for n in ("a", "b", "d")}
    faults = NodeFaults(tmp_path)
    try:
        notes = faults.setup(scenario, data_dirs, lambda name, env: None)
        assert sorted(faults.disks) == ["b"]  # a wipe needs no loop disk
        assert os.path.ismount(data_dirs["b"]) and not os.path.ismount(data_dirs["a"])
        assert notes == [f"b: data directory on {faults.disks['b'].device} (64 MiB ext4)"]
        assert faults.clock_files == {}  # no clock faults: no libfaketime
    finally:
        assert faults.close() == []
    assert not os.path.ismount(data_dirs["b"])


CLOCK_PROBE = """
import sys, time
for line in sys.stdin:
    print(f"{time.time():.3f} {time.monotonic():.3f}", flush=True)
"""


def test_libfaketime_moves_a_live_process_wall_clock_and_not_its_monotonic_clock(
    tmp_path: Path,
) -> None:
    library = find_libfaketime()
    offset_file = tmp_path / "clock"
    write_clock_offset(offset_file, 0)
    probe = subprocess.Popen(
        [sys.executable, "-c", CLOCK_PROBE],
        env={**os.environ, **clock_env(library, offset_file)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert probe.stdin is not None and probe.stdout is not None

        def ask() -> tuple[float, float, float, float]:
            """(its wall clock - ours, its monotonic clock - ours): read around its answer."""
            assert probe.stdin is not None and probe.stdout is not None
            wall_before, mono_before = time.time(), time.monotonic()
            probe.stdin.write("?\n")
            probe.stdin.flush()
            wall, mono = (float(x) for x in probe.stdout.readline().split())
            return (
                wall - wall_before,
                wall - time.time(),
                mono - mono_before,
                mono - time.monotonic(),
            )

        skew = ask()
        assert skew[0] > -1 and skew[1] < 1  # offset 0: its clock is ours
        write_clock_offset(offset_file, 40_000)  # changed while it runs
        wall_after_lo, wall_after_hi, mono_lo, mono_hi = ask()
        assert wall_after_lo > 39 and wall_after_hi < 41, (wall_after_lo, wall_after_hi)
        assert mono_lo > -1 and mono_hi < 1, "CLOCK_MONOTONIC must not be faked"
        write_clock_offset(offset_file, -30_000)
        back_lo, back_hi, _, _ = ask()
        assert back_lo > -31 and back_hi < -29, (back_lo, back_hi)
    finally:
        probe.kill()
        probe.wait(timeout=PROCESS_TIMEOUT_S)
