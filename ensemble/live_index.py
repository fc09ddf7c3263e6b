"""A post index that takes upserts and deletes while it serves, and loses none it acknowledged.

One directory holds `posts.npz`, the snapshot (`PostIndex.save`; its metadata names the lsn of the
last write it holds), and `posts.wal`, the write-ahead log of the writes since
(`feedserve.index_log`). There is one writer and any number of followers:

- The writer (`LiveIndex.open(dir, writer=True)`) checks a write, appends it to the log and fsyncs,
  then applies it; only then is it acknowledged. `snapshot()` saves the index atomically (temporary
  file, fsync, rename) and starts an empty log based at the snapshot's lsn.
- A follower (every `knn` instance; other processes) loads the same files and calls `catch_up()`
  before each batch of searches: it applies the records it has not seen, and reloads the snapshot
  when the writer has started a new log.

Consistency: a search that starts after a write was acknowledged sees it, on every instance (each
catches up first); a write is applied under the index's lock, so a search sees all of it or none;
a deleted id is never returned after the delete is acknowledged. Opening replays the log past the
snapshot; a torn last record (a crash mid-append, never acknowledged) is cut off with a warning; a
corrupt snapshot or a damaged log is refused with an error, never served as an empty index.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from feedserve.index_log import HEADER, Op, WriteAheadLog, fsync_dir, read_header, read_records
from feedserve.knn import Engine, IndexError_, PostIndex

logger = logging.getLogger(__name__)

SNAPSHOT = "posts.npz"
LOG = "posts.wal"


class LiveIndex:
    def __init__(self, directory: Path, index: PostIndex, wal: WriteAheadLog | None) -> None:
        self.directory = Path(directory)
        self.index = index
        self.lsn = int(index.meta.get("lsn", 0))  # the last write this index holds
        self._wal = wal
        self._log_id: tuple[int, int] | None = None  # (inode, base lsn) of the log being followed
        self._offset = HEADER.size
        self._lock = threading.Lock()  # one write, or one catch-up, at a time

    @property
    def snapshot_path(self) -> Path:
        return self.directory / SNAPSHOT

    @property
    def log_path(self) -> Path:
        return self.directory / LOG

    @classmethod
    def open(cls, directory: Path, dim: int | None = None, engine: Engine = Engine(), writer: bool = False) -> LiveIndex:
        directory = Path(directory)
        snapshot = directory / SNAPSHOT
        if snapshot.exists():
            index = PostIndex.load(snapshot, engine)  # IndexError_ on a corrupt file: never an empty index
        elif dim is not None:
            index = PostIndex(dim, {"lsn": 0}, engine)
            if writer:  # the empty snapshot records the dimension for every later open
                index.save(snapshot)
        else:
            raise IndexError_(f"{snapshot} does not exist and no dimension was given for a new index")
        wal = WriteAheadLog(directory / LOG, base_lsn=int(index.meta.get("lsn", 0))) if writer else None
        live = cls(directory, index, wal)
        live.catch_up()
        logger.info("%s: %d posts at lsn %d (%s)", directory, len(index), live.lsn, "writer" if writer else "follower")
        return live

    # --- writes (the writer only) -----------------------------------------------------------------

    def upsert(self, ids: np.ndarray, vectors: np.ndarray) -> int:
        """Insert or replace posts; returns the write's lsn once it is durable and applied."""
        ids, vectors = self.index.check_write(ids, vectors)
        return self._write(Op.UPSERT, ids, vectors)

    def delete(self, ids: np.ndarray) -> int:
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        return self._write(Op.DELETE, ids, None)

    def _write(self, op: Op, ids: np.ndarray, vectors: np.ndarray | None) -> int:
        if self._wal is None:
            raise IndexError_(f"{self.directory} is open as a follower; writes go through the writer")
        with self._lock:
            lsn = self._wal.append(op, ids, vectors)  # durable first ...
            self._apply(op, ids, vectors)  # ... then visible
            self.lsn = lsn
            return lsn

    def snapshot(self) -> int:
        """Save the index atomically and start an empty log after it; returns the snapshot's lsn."""
        if self._wal is None:
            raise IndexError_("only the writer takes snapshots")
        with self._lock:
            self.index.meta["lsn"] = self.lsn
            self.index.save(self.snapshot_path)
            fsync_dir(self.directory)
            self._wal.restart()  # a crash before this line leaves the old log: its records are <= lsn
            self._log_id, self._offset = None, HEADER.size
            return self.lsn

    def close(self) -> None:
        if self._wal is not None:
            self._wal.close()

    # --- following ----------------------------------------------------------------------------

    def catch_up(self) -> int:
        """Apply the log's records past this index's lsn; returns how many were applied."""
        with self._lock:
            try:
                stat = self.log_path.stat()
                base = read_header(self.log_path)
            except FileNotFoundError:
                return 0
            if (stat.st_ino, base) != self._log_id:
                if base > self.lsn:
                    # The writer took a snapshot past what we hold: that snapshot replaces ours.
                    self._reload()
                self._log_id, self._offset = (stat.st_ino, base), HEADER.size
            applied = 0
            for record in read_records(self.log_path, self._offset):
                if record.lsn > self.lsn:
                    self._apply(record.op, record.ids, record.vectors)
                    self.lsn = record.lsn
                    applied += 1
                self._offset = record.end
            return applied

    def _reload(self) -> None:
        index = PostIndex.load(self.snapshot_path, self.index.engine)
        logger.info("%s: reloaded the snapshot at lsn %s", self.directory, index.meta.get("lsn"))
        self.index, self.lsn = index, int(index.meta.get("lsn", 0))

    def _apply(self, op: Op, ids: np.ndarray, vectors: np.ndarray | None) -> None:
        if op == Op.UPSERT:
            assert vectors is not None
            self.index.upsert(ids, vectors)
        else:
            self.index.delete(ids)


def logged_lsn(directory: Path) -> int:
    """The last lsn in a directory's log (0 without one): a full rebuild saved with it supersedes
    every write logged so far."""
    path = Path(directory) / LOG
    if not path.exists():
        return 0
    last = read_header(path)
    for record in read_records(path):
        last = record.lsn
    return last
