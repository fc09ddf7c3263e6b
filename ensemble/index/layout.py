"""The files of a live index directory, named once (the live index, the backends, the build and the
tests all find them here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SNAPSHOT = "posts.npz"  # the snapshot: ids, vectors, metadata (feedserve.index.snapshot)
LOG = "posts.wal"  # the write-ahead log of the writes since the snapshot (feedserve.index.wal)
WRITER_LOCK = "writer.lock"  # flock held by the one writer for its life
SNAPSHOT_LOCK = "snapshot.lock"  # flock held by a full rebuild; the writer takes no snapshot meanwhile
ENGAGEMENTS = "engagements.wal"  # engagements logged since the build (feedserve.rank.engagements)
ENGAGEMENTS_LOCK = "engagements.lock"  # flock held by the one engagement writer
ENGAGEMENTS_SNAPSHOT = "engagements.npz"  # the engagements logged up to an lsn, each pair once


@dataclass(frozen=True)
class IndexLayout:
    root: Path

    @property
    def snapshot(self) -> Path:
        return self.root / SNAPSHOT

    @property
    def log(self) -> Path:
        return self.root / LOG

    @property
    def writer_lock(self) -> Path:
        return self.root / WRITER_LOCK

    @property
    def snapshot_lock(self) -> Path:
        return self.root / SNAPSHOT_LOCK

    @property
    def engagements(self) -> Path:
        return self.root / ENGAGEMENTS

    @property
    def engagements_lock(self) -> Path:
        return self.root / ENGAGEMENTS_LOCK

    @property
    def engagements_snapshot(self) -> Path:
        return self.root / ENGAGEMENTS_SNAPSHOT
