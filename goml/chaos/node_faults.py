"""Disk and clock faults of real node processes, with real mechanisms. The scenario
player decides when and on which node (`goml.scenario.player`); this module carries it
out for the chaos runner.

Disks: each control node that a scenario's `full` or `fsync_stall_ms` faults may hit keeps
its data directory on a small ext4 file system of its own, on a loop device (made with
`losetup`, `mkfs.ext4 -m 0`: no blocks reserved, so a root process finds it full too).
- full: a filler file takes every free block (`fallocate`, halving on ENOSPC); deleting
  it frees the space. SQLite writes into space its WAL already holds until the WAL must
  grow, so a real node may go on for a few writes after the disk fills (the simulator
  refuses the next write at once).
- fsync stall: the block layer's write throttle for that loop device alone (cgroup v1
  `blkio.throttle.write_iops_device`, set at the root cgroup, so the kernel's own
  flusher and journal threads are throttled too). Device-mapper's `delay` target would
  add a latency to each I/O, but this kernel has no device-mapper. A throttle limits
  write I/Os per second instead; measured here, one SQLite WAL commit with
  `synchronous=FULL` on ext4 is IOS_PER_COMMIT write I/Os (the WAL frames, then the
  journal's descriptor, metadata and commit blocks), so the limit is
  IOS_PER_COMMIT * 1000 / fsync_stall_ms I/Os per second. It models a slow device: every
  write waits, reads do not; it cannot stall a commit longer than IOS_PER_COMMIT seconds
  (1 I/O per second is the slowest limit), and a stall slower than the node's
  `persist_timeout_s` stops that node (as a real disk that slow would).
- wipe: every file of the stopped node's data directory is deleted (any file system).

Clocks: every control node runs under libfaketime (Debian: `libfaketime`) when the
scenario has clock faults: LD_PRELOAD of its thread-safe build with
FAKETIME_TIMESTAMP_FILE (a relative offset such as `+40.000`, rewritten atomically to
change a live process's clock), FAKETIME_NO_CACHE=1 (read on every call: a change is
seen at once) and FAKETIME_DONT_FAKE_MONOTONIC=1 (only CLOCK_REALTIME moves; the node's
timers, Raft's and asyncio's, run on CLOCK_MONOTONIC). Everything in the process that
reads the wall clock sees the offset, TLS certificate checks included.

Everything set up is undone by `close`, also when a run fails: throttles removed, file
systems unmounted, loop devices detached, images deleted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from goml.scenario.schema import LEADER, RANDOM, ClockFault, DiskFault, Scenario

# One SQLite WAL commit with synchronous=FULL on ext4 (data=ordered), in write I/Os:
# measured on this machine with blkio throttles of 5 and 20 I/Os per second (6.0 and
# 6.2 I/Os per commit, a hard-state-only commit the same).
IOS_PER_COMMIT = 6
DISK_MB = 64  # a node's store in a chaos run stays under a few MiB
COMMAND_TIMEOUT_S = 30.0
FILL_CHUNK_BYTES_MIN = 4096
BLKIO_THROTTLE = Path("/sys/fs/cgroup/blkio/blkio.throttle.write_iops_device")
LIBFAKETIME_DIRS = (
    "/usr/lib/x86_64-linux-gnu/faketime",
    "/usr/lib/aarch64-linux-gnu/faketime",
    "/usr/lib/faketime",
    "/usr/local/lib/faketime",
)
LIBFAKETIME = "libfaketimeMT.so.1"  # the build for threaded programs (gRPC's threads)


class NodeFaultsUnavailable(RuntimeError):
    """This machine cannot carry out a fault the scenario has (says what is missing)."""


def _run(argv: list[str]) -> str:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise NodeFaultsUnavailable(f"{' '.join(argv)}: {error}") from None
    if done.returncode != 0:
        raise NodeFaultsUnavailable(
            f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()[:300]}"
        )
    return done.stdout.strip()


def write_iops_for(stall_ms: float) -> int:
    """The write-I/O limit that makes one store commit take about `stall_ms`."""
    assert stall_ms > 0
    return max(1, round(IOS_PER_COMMIT * 1000 / stall_ms))


@dataclass
class LoopDisk:
    """A small ext4 file system on a loop device, mounted on `mount_point`."""

    image: Path
    mount_point: Path
    size_mb: int = DISK_MB
    device: str = ""
    mounted: bool = False
    throttled: bool = False

    def create(self) -> None:
        assert not self.device, "created once"
        for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
            if shutil.which(tool) is None:
                raise NodeFaultsUnavailable(f"disk faults need {tool} (util-linux, e2fsprogs)")
        self.image.parent.mkdir(parents=True, exist_ok=True)
        with open(self.image, "wb") as handle:
            handle.truncate(self.size_mb * 1024 * 1024)
        self.device = _run(["losetup", "--find", "--show", str(self.image)])
        _run(["mkfs.ext4", "-q", "-F", "-m", "0", self.device])
        self.mount_point.mkdir(parents=True, exist_ok=True)
        _run(["mount", self.device, str(self.mount_point)])
        self.mounted = True

    @property
    def major_minor(self) -> str:
        stat = os.stat(self.device)
        return f"{os.major(stat.st_rdev)}:{os.minor(stat.st_rdev)}"

    @property
    def filler(self) -> Path:
        return self.mount_point / "goml-disk-filler"

    def fill(self) -> int:
        """Take every free block; returns the bytes taken."""
        taken = 0
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            taken = os.fstat(fd).st_size
            stat = os.statvfs(self.mount_point)
            size = stat.f_bfree * stat.f_frsize
            while size >= FILL_CHUNK_BYTES_MIN:
                try:
                    os.posix_fallocate(fd, taken, size)
                    taken += size
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    size //= 2  # the extent tree needs blocks of its own
            os.fsync(fd)
        finally:
            os.close(fd)
        return taken

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def throttle(self, write_iops: int | None) -> None:
        """Limit the device to `write_iops` write I/Os per second (None: no limit)."""
        if not BLKIO_THROTTLE.exists():
            raise NodeFaultsUnavailable(
                f"fsync stalls need the cgroup v1 block I/O throttle ({BLKIO_THROTTLE} is missing)"
            )
        assert write_iops is None or write_iops >= 1
        BLKIO_THROTTLE.write_text(f"{self.major_minor} {write_iops or 0}\n")
        self.throttled = write_iops is not None

    def close(self) -> list[str]:
        """Undo everything, keeping what the node stored: its files are copied off the
        loop disk into the directory it was mounted on, so the store can be read after
        the run as any other node's. Returns the problems met (cleanup goes on past each)."""
        problems: list[str] = []
        kept: Path | None = None
        if self.mounted:
            self.free()
            kept = self.image.with_name(self.image.name + ".kept")
            shutil.rmtree(kept, ignore_errors=True)
            try:
                shutil.copytree(self.mount_point, kept, ignore=shutil.ignore_patterns("lost+found"))
            except OSError as error:
                problems.append(f"{self.mount_point}: store not kept: {error}")
                kept = None
        if self.throttled:
            try:
                self.throttle(None)
            except (OSError, NodeFaultsUnavailable) as error:
                problems.append(f"{self.device}: throttle not removed: {error}")
        if self.mounted:
            try:
                _run(["umount", str(self.mount_point)])
            except NodeFaultsUnavailable:
                try:  # something still holds it: detach now, freed when released
                    _run(["umount", "-l", str(self.mount_point)])
                except NodeFaultsUnavailable as error:
                    problems.append(str(error))
            self.mounted = False
        if self.device:
            try:
                _run(["losetup", "-d", self.device])
            except NodeFaultsUnavailable as error:
                problems.append(str(error))
            self.device = ""
        self.image.unlink(missing_ok=True)
        if kept is not None and not self.mounted:
            for entry in sorted(kept.iterdir()):
                os.replace(entry, self.mount_point / entry.name)
            kept.rmdir()
        return problems


def find_libfaketime() -> Path:
    for directory in LIBFAKETIME_DIRS:
        path = Path(directory) / LIBFAKETIME
        if path.exists():
            return path
    raise NodeFaultsUnavailable(
        f"clock faults need libfaketime ({LIBFAKETIME} in none of {', '.join(LIBFAKETIME_DIRS)}): "
        "apt-get install libfaketime"
    )


def clock_env(library: Path, timestamp_file: Path) -> dict[str, str]:
    """The environment that runs a process under libfaketime, its wall clock offset by
    what `timestamp_file` says and its monotonic clock untouched."""
    return {
        "LD_PRELOAD": str(library),
        "FAKETIME_TIMESTAMP_FILE": str(timestamp_file),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def write_clock_offset(timestamp_file: Path, offset_ms: int) -> None:
    """Set the offset; atomic (a process reading it meanwhile sees the old or the new)."""
    tmp = timestamp_file.with_name(timestamp_file.name + ".tmp")
    tmp.write_text(f"{offset_ms / 1000:+.3f}\n")
    os.replace(tmp, timestamp_file)


def disk_fault_targets(scenario: Scenario, action: str) -> list[str]:
    """The control nodes a disk fault of `action` may hit (all of them for `leader` or
    `random`), in topology order."""
    controls = [n.name for n in scenario.topology.control_nodes]
    named: set[str] = set()
    for fault in scenario.faults:
        if isinstance(fault, DiskFault) and fault.action == action:
            if fault.target in (LEADER, RANDOM):
                return controls
            named.add(fault.target)
    return [n for n in controls if n in named]


@dataclass
class NodeFaults:
    """Disk and clock faults of one chaos run's control nodes (see the module doc)."""

    work_dir: Path
    disks: dict[str, LoopDisk] = field(default_factory=dict)
    clock_files: dict[str, Path] = field(default_factory=dict)
    data_dirs: dict[str, Path] = field(default_factory=dict)

    def setup(
        self,
        scenario: Scenario,
        data_dirs: dict[str, Path],
        preload: Callable[[str, dict[str, str]], None],
    ) -> list[str]:
        """Before the nodes start: a loop disk on the data directory of every node a
        `full` or `fsync_stall_ms` fault may hit; libfaketime for every node when the
        scenario has clock faults (`preload(node, env)` adds it to the node's process).
        Returns notes on what was set up."""
        self.data_dirs = dict(data_dirs)
        notes: list[str] = []
        stalls = disk_fault_targets(scenario, "stall")
        if stalls and not BLKIO_THROTTLE.exists():
            raise NodeFaultsUnavailable(
                f"fsync stalls need the cgroup v1 block I/O throttle ({BLKIO_THROTTLE} is missing)"
            )
        needs_disk = sorted(set(stalls) | set(disk_fault_targets(scenario, "full")))
        for name in needs_disk:
            disk = LoopDisk(self.work_dir / "disks" / f"{name}.img", data_dirs[name])
            self.disks[name] = disk
            disk.create()
            notes.append(f"{name}: data directory on {disk.device} ({disk.size_mb} MiB ext4)")
        if any(isinstance(f, ClockFault) for f in scenario.faults):
            library = find_libfaketime()
            for node in scenario.topology.control_nodes:
                path = self.work_dir / "clocks" / node.name
                path.parent.mkdir(parents=True, exist_ok=True)
                write_clock_offset(path, 0)
                self.clock_files[node.name] = path
                preload(node.name, clock_env(library, path))
            notes.append(f"clocks: every node under {library}")
        return notes

    def _disk(self, name: str) -> LoopDisk:
        disk = self.disks.get(name)
        if disk is None:
            raise NodeFaultsUnavailable(f"{name} has no loop disk (no disk fault names it)")
        return disk

    def stall(self, name: str, stall_ms: float | None) -> None:
        self._disk(name).throttle(None if stall_ms is None else write_iops_for(stall_ms))

    def full(self, name: str, full: bool) -> None:
        disk = self._disk(name)
        if full:
            disk.fill()
        else:
            disk.free()

    def wipe(self, name: str) -> None:
        """Delete every file of the (stopped) node's data directory, keeping the
        directory itself (it may be a mount point)."""
        data_dir = self.data_dirs[name]
        for entry in sorted(data_dir.iterdir()) if data_dir.exists() else []:
            if entry.name == "lost+found" and name in self.disks:
                continue  # ext4's own, not the node's
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def set_clock(self, name: str, offset_ms: int) -> None:
        path = self.clock_files.get(name)
        if path is None:
            raise NodeFaultsUnavailable(f"{name} does not run under libfaketime")
        write_clock_offset(path, offset_ms)

    def close(self) -> list[str]:
        problems: list[str] = []
        for name in sorted(self.disks):
            problems += self.disks[name].close()
        self.disks.clear()
        return problems


@contextlib.contextmanager
def node_faults(work_dir: Path, log: Callable[[str], None]) -> Iterator[NodeFaults]:
    """A NodeFaults closed on the way out, whatever happens (problems logged)."""
    faults = NodeFaults(work_dir)
    try:
        yield faults
    finally:
        for problem in faults.close():
            log(f"cleanup: {problem}")


APT_PACKAGES = ("libfaketime", "e2fsprogs", "util-linux")
APT_TIMEOUT_S = 600.0


def ensure_tools(install: bool, log: Callable[[str], None] = print) -> list[str]:
    """What disk and clock faults need on this machine; with `install`, the missing
    Debian packages are installed with apt-get (root). Returns what is still missing."""

    def missing() -> list[str]:
        out = []
        try:
            find_libfaketime()
        except NodeFaultsUnavailable:
            out.append("libfaketime")
        if shutil.which("mkfs.ext4") is None:
            out.append("e2fsprogs")
        if shutil.which("losetup") is None:
            out.append("util-linux")
        return out

    needed = missing()
    if needed and install:
        log(f"installing {', '.join(needed)} with apt-get")
        argv = ["apt-get", "install", "-y", "--no-install-recommends", *needed]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (argv, ["apt-get", "update"], argv):  # update only if the first fails
            try:
                done = subprocess.run(command, env=env, timeout=APT_TIMEOUT_S, check=False)
            except (OSError, subprocess.TimeoutExpired) as error:
                log(f"{' '.join(command)}: {error}")
                break
            if done.returncode == 0 and command is argv:
                break
        needed = missing()
    if not BLKIO_THROTTLE.exists():
        log(f"fsync stalls are unavailable: {BLKIO_THROTTLE} is missing (cgroup v1 blkio)")
    if os.geteuid() != 0:
        log("disk faults need root (losetup, mount)")
    return needed


def main() -> int:
    """`python -m goml.chaos.node_faults`: check (and install, as root) what the chaos
    runner's disk and clock faults need."""
    still = ensure_tools(install=os.geteuid() == 0)
    if still:
        print(f"missing: {', '.join(still)} (apt-get install {' '.join(still)})")
        return 1
    print(f"disk and clock faults: ready (libfaketime at {find_libfaketime()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
