"""Offline inspection of stopped nodes: rebuild the manifest from a node's Raft store.

This is how tests and the chaos runner check "every acknowledged task is present on every
replica, none duplicated" without trusting any running process.

Which replay a checker should use
---------------------------------
A node's stored commit index may lag its real one: the runtime defers writes that only
move the commit index (`NodeConfig.defer_commit_only_writes`), and a node killed with
SIGKILL never writes the deferred value. A lagging follower may also simply not have
learnt the latest commit index yet. So `replay_store(dir)` alone (entries up to the
node's *own* stored commit) can miss acknowledged tasks that the node does hold.

Checkers should call `replay_cluster(dirs)`: it takes the highest commit index stored by
any node, and replays each node's log up to that index, but only as far as the node's log
provably agrees with the log of the node that stored that commit (same term at the same
index: by Raft's log matching property the two logs are then identical up to there, so
those entries are committed). An entry a lagging node holds from a deposed leader, never
committed, is never applied.

`replay_store(dir, replay_all_entries=True)` applies every stored entry, committed or
not: useful to look at what a node holds, wrong for checking promises (uncommitted
entries may later be overwritten).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from goml.cluster.manifest import DEFAULT_LIMITS, Manifest, ManifestLimits
from goml.raft.sqlite_store import SqliteStorage
from goml.raft.types import EntryKind, PersistedState

STORE_FILE = "raft.sqlite3"


@dataclass(frozen=True)
class StoreImage:
    """What one stopped node's store holds."""

    data_dir: Path
    persisted: PersistedState

    @property
    def commit(self) -> int:
        return self.persisted.hard_state.commit

    @property
    def snapshot_index(self) -> int:
        snapshot = self.persisted.snapshot
        return snapshot.index if snapshot is not None else 0

    @property
    def last_index(self) -> int:
        entries = self.persisted.entries
        return entries[-1].index if entries else self.snapshot_index

    def term_at(self, index: int) -> int | None:
        """The term of the stored entry at `index` (None if compacted away or absent)."""
        offset = index - self.snapshot_index - 1
        if 0 <= offset < len(self.persisted.entries):
            entry = self.persisted.entries[offset]
            assert entry.index == index
            return entry.term
        return None


def read_store(data_dir: Path) -> StoreImage:
    """Load a node's store. The node must be stopped: the store takes its lock (a running
    node makes this raise StoreLocked)."""
    path = data_dir / STORE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no Raft store (is {data_dir} a node's data_dir?)")
    with SqliteStorage(path) as storage:
        return StoreImage(data_dir, storage.load())


def replay_image(
    image: StoreImage, up_to: int, limits: ManifestLimits = DEFAULT_LIMITS
) -> Manifest:
    """Restore the snapshot (if any) and apply the NORMAL entries with index <= up_to."""
    snapshot = image.persisted.snapshot
    manifest = Manifest.restore(snapshot.data) if snapshot is not None else Manifest(limits)
    for entry in image.persisted.entries:
        if entry.index > up_to:
            break
        if entry.kind is EntryKind.NORMAL:
            manifest.apply(entry.index, entry.data)
    return manifest


def replay_store(
    data_dir: Path,
    *,
    replay_all_entries: bool = False,
    limits: ManifestLimits = DEFAULT_LIMITS,
) -> Manifest:
    """The manifest a stopped node's store describes: its snapshot plus its committed
    entries (index <= its stored commit), or every stored entry with
    `replay_all_entries=True`. See the module docstring: checkers use `replay_cluster`."""
    image = read_store(data_dir)
    return replay_image(image, image.last_index if replay_all_entries else image.commit, limits)


def agreed_prefix(image: StoreImage, reference: StoreImage, up_to: int) -> int:
    """The highest index <= up_to up to which `image`'s log is identical to `reference`'s
    (log matching: same index and term means the same entries up to there)."""
    index = min(up_to, image.last_index)
    while index > image.snapshot_index:
        term = image.term_at(index)
        ref_term = reference.term_at(index)
        if ref_term is None and index <= reference.snapshot_index:
            # Compacted on the reference: only committed entries are ever compacted,
            # and this node's own commit covers what it may apply.
            return max(min(index, image.commit), image.snapshot_index)
        if term is not None and term == ref_term:
            return index
        index -= 1
    return image.snapshot_index


def replay_cluster(
    data_dirs: Mapping[str, Path], limits: ManifestLimits = DEFAULT_LIMITS
) -> dict[str, Manifest]:
    """The committed manifest of every (stopped) node: see the module docstring."""
    images = {name: read_store(path) for name, path in data_dirs.items()}
    if not images:
        return {}
    reference = max(images.values(), key=lambda image: image.commit)
    commit = reference.commit
    return {
        name: replay_image(image, agreed_prefix(image, reference, commit), limits)
        for name, image in images.items()
    }
