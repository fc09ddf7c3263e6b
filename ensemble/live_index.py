"""A post index that takes upserts and deletes while it serves, and loses none it acknowledged.

One directory holds `posts.npz`, the snapshot (its metadata names the lsn of the last write it
holds and the generation: the full build it descends from), and `posts.wal`, the write-ahead log of
the writes since (`feedserve.index_log`). There is one writer and any number of followers:

- The writer (`LiveIndex.open(dir, writer=True)`) holds `writer.lock` (flock) for its life: a
  second writer on the same directory is refused. It checks a write, appends it to the log as one
  record and fsyncs, then applies it; only then is it acknowledged. `snapshot()` copies the index
  under the write lock, saves the copy atomically without it (writes go on meanwhile), and starts a
  new log based at the copy's lsn that carries over the records written during the save.
- A follower (every `knn` instance; other processes) loads the same files and calls `refresh()`
  before each batch of searches. It keeps the log it follows open: when the writer starts a new
  log, the follower first reads the old one to its end, so it reloads the snapshot only when it
  starts or when a full rebuild replaced the index (a new generation).
- A full rebuild (`rebuilding`, used by `feedserve index`; any index file without a generation
  that appears counts as one) holds `snapshot.lock` from before it reads
  its corpus until its file is in place: the writer takes no snapshot meanwhile, so every write
  logged after the rebuild started is still in the log, and is replayed on top of the rebuild by
  the writer and by every follower.

Consistency: a search that starts after a write was acknowledged sees it, on every instance and
every server sharing the directory (each refreshes first); a write request (its upserts and deletes
together) is one record applied under the index's lock, so a search sees all of it or none; a
deleted id is never returned after its delete is acknowledged. Opening replays the log past the
snapshot; a torn last record (a crash mid-append, never acknowledged) is cut off with a warning; a
corrupt snapshot or a damaged log is refused with an error, never served as an empty index.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from feedserve.index_log import HEADER, LogError, Op, Record, WriteAheadLog, logged_lsn, read_header, read_records
from feedserve.knn import Engine, IndexError_, PostIndex, Signature, file_signature, read_meta, save_arrays

logger = logging.getLogger(__name__)

SNAPSHOT = "posts.npz"
LOG = "posts.wal"
WRITER_LOCK = "writer.lock"
SNAPSHOT_LOCK = "snapshot.lock"


class LiveIndex:
    def __init__(self, directory: Path, index: PostIndex, wal: WriteAheadLog | None, writer_lock: int | None = None,
                 snapshot_signature: Signature | None = None) -> None:
        self.directory = Path(directory)
        self.index = index
        self.lsn = int(index.meta.get("lsn", 0))  # the last write this index holds
        self.reloads = 0  # snapshots loaded after opening (a rebuild, or a follower that fell behind)
        self._wal = wal
        self._writer_lock = writer_lock
        self._snapshot_signature = snapshot_signature  # of the file `index` was loaded from (taken before)
        self._rejected_signature: Signature | None = None  # a rebuilt file that could not be taken
        self._log: BinaryIO | None = None  # the log being followed, kept open across a log restart
        self._log_inode = -1
        self._offset = HEADER.size
        self._lock = threading.Lock()  # one write, refresh or snapshot copy at a time

    @property
    def snapshot_path(self) -> Path:
        return self.directory / SNAPSHOT

    @property
    def log_path(self) -> Path:
        return self.directory / LOG

    @property
    def generation(self) -> object:
        return self.index.meta.get("generation")

    @property
    def failed(self) -> bool:
        """Whether the log refuses writes after a failure it could not undo (reopen to go on)."""
        return self._wal is not None and self._wal.failed is not None

    @classmethod
    def open(cls, directory: Path, dim: int | None = None, engine: Engine = Engine(), writer: bool = False) -> LiveIndex:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        lock = _take_writer_lock(directory) if writer else None
        wal: WriteAheadLog | None = None
        try:
            snapshot = directory / SNAPSHOT
            signature = file_signature(snapshot)
            if snapshot.exists():
                index = PostIndex.load(snapshot, engine)  # IndexError_ on a corrupt file: never an empty index
            elif dim is not None:
                index = PostIndex(dim, {"lsn": 0, "generation": new_generation()}, engine)
                if writer:  # the empty snapshot records the dimension for every later open
                    index.save(snapshot)
                    signature = file_signature(snapshot)
            else:
                raise IndexError_(f"{snapshot} does not exist and no dimension was given for a new index")
            if writer:  # a file from another tool has no generation: the writer's snapshots will carry one
                index.meta.setdefault("generation", new_generation())
                wal = WriteAheadLog(directory / LOG, base_lsn=int(index.meta.get("lsn", 0)))
            live = cls(directory, index, wal, lock, signature)
            with live._lock:
                live._follow()
                if writer:  # the writer reads its log again only after taking a rebuild
                    live._forget_log()
        except BaseException:
            if wal is not None:
                wal.close()
            if lock is not None:
                os.close(lock)
            raise
        logger.info("%s: %d posts at lsn %d (%s)", directory, len(index), live.lsn, "writer" if writer else "follower")
        return live

    # --- writes (the writer only) -----------------------------------------------------------------

    def write(self, ops: np.ndarray, ids: np.ndarray, vectors: np.ndarray | None) -> int:
        """Apply one write request, upserts (a vector per upsert row, in order) and deletes together;
        returns its lsn once it is durable and applied. IndexError_ before anything is logged."""
        if self._wal is None:
            raise IndexError_(f"{self.directory} is open as a follower; writes go through the writer")
        ops = np.ascontiguousarray(ops, dtype=np.uint8).reshape(-1)
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if len(ops) != len(ids) or not np.isin(ops, list(Op)).all():
            raise IndexError_(f"a write needs one op (1 upsert, 2 delete) per id: {len(ops)} ops for {len(ids)} ids")
        if len(np.unique(ids)) != len(ids):
            raise IndexError_("duplicate post ids in one write")
        upserts = ops == Op.UPSERT
        if not upserts.any():
            vectors = None
        elif vectors is None:
            raise IndexError_("upserts need their vectors")
        else:
            _, vectors = self.index.check_write(ids[upserts], vectors)
        with self._lock:
            lsn = self._wal.append(ops, ids, vectors)  # durable first ...
            self._apply(ops, ids, vectors)  # ... then visible
            self.lsn = lsn
            return lsn

    def upsert(self, ids: np.ndarray, vectors: np.ndarray) -> int:
        """Insert or replace posts."""
        return self.write(np.full(np.size(ids), Op.UPSERT), ids, vectors)

    def delete(self, ids: np.ndarray) -> int:
        return self.write(np.full(np.size(ids), Op.DELETE), ids, None)

    def snapshot(self) -> int | None:
        """Save the index and start a new log after it; returns the snapshot's lsn, or None when a
        rebuild holds the snapshot lock or has replaced the snapshot (`refresh` picks it up)."""
        if self._wal is None:
            raise IndexError_("only the writer takes snapshots")
        with _flock(self.directory / SNAPSHOT_LOCK, blocking=False) as held:
            if not held:
                logger.info("%s: a rebuild is in progress; the snapshot waits for it", self.directory)
                return None
            if file_signature(self.snapshot_path) != self._snapshot_signature:
                return None  # a rebuild landed since we last looked: never save over it
            with self._lock:  # a copy, so writes go on while it is saved
                ids, vectors = self.index.snapshot()
                lsn, keep_from, meta = self.lsn, self._wal.end, dict(self.index.meta)
            save_arrays(self.snapshot_path, ids, vectors, {**meta, "lsn": lsn})
            self._snapshot_signature = file_signature(self.snapshot_path)
            # A crash before the log restarts leaves the old log: replay skips its records <= lsn.
            self._wal.restart(lsn, keep_from)
            return lsn

    def close(self) -> None:
        if self._wal is not None:
            self._wal.close()
        self._forget_log()
        if self._writer_lock is not None:
            os.close(self._writer_lock)
            self._writer_lock = None

    # --- following ----------------------------------------------------------------------------

    def refresh(self) -> int:
        """Catch up with what other processes did; returns how many log records were applied. A
        rebuilt snapshot (a new generation) replaces the index, with the log's records past it; a
        follower then applies the log's records past its lsn (the writer has no others)."""
        with self._lock:
            if self._take_rebuild():
                applied = self._drain()
                if self._wal is not None:  # the writer reads its log only to take a rebuild
                    self._forget_log()
                return applied
            return self._follow() if self._wal is None else 0

    def _take_rebuild(self) -> bool:
        signature = file_signature(self.snapshot_path)
        if signature in (self._snapshot_signature, self._rejected_signature) or signature is None:
            return False
        generation = read_meta(self.snapshot_path).get("generation")
        if generation is not None and generation == self.generation:
            self._snapshot_signature = signature  # the writer's own periodic snapshot: the log holds it all
            return False
        try:
            self._reload()
        except Exception:
            self._rejected_signature = signature  # reported once, not in every batch; never saved over
            raise
        return True

    def _follow(self) -> int:
        applied = self._drain()  # first the rest of the log we have open, even if it was replaced
        log = self._open_log()
        if log is None:
            return applied
        if os.fstat(log.fileno()).st_ino == self._log_inode:
            log.close()
            return applied
        try:
            base = read_header(log, self.log_path)
        except BaseException:
            log.close()
            raise
        if base > self.lsn:  # the writer snapshotted past us and the log before it is gone
            log.close()
            self._reload()
        else:
            self._forget_log()
            self._log, self._log_inode, self._offset = log, os.fstat(log.fileno()).st_ino, HEADER.size
        return applied + self._drain()

    def _drain(self) -> int:
        if self._log is None:
            return 0
        applied = 0
        for record in read_records(self._log, self._offset):
            if record.lsn > self.lsn + 1:
                raise LogError(f"{self.log_path}: record {record.lsn} follows {self.lsn}: records are missing")
            if record.lsn == self.lsn + 1:
                self._apply_record(record)
                applied += 1
            self._offset = record.end
        return applied

    def _open_log(self) -> BinaryIO | None:
        # Unbuffered: a buffered reader seeking inside its buffer would serve bytes the writer has
        # since replaced (a torn tail it cut off and wrote over).
        try:
            return open(self.log_path, "rb", buffering=0)
        except FileNotFoundError:
            return None

    def _reload(self) -> None:
        """Load the snapshot and open the log that continues it, then switch to both; on any error
        this index stays as it was (never a snapshot without the log records past it)."""
        signature = file_signature(self.snapshot_path)
        index = PostIndex.load(self.snapshot_path, self.index.engine)
        lsn = int(index.meta.get("lsn", 0))
        log = self._open_log()
        try:
            base = read_header(log, self.log_path) if log is not None else lsn
            if base > lsn:
                raise LogError(f"{self.log_path} starts after lsn {base} but the snapshot holds only up to {lsn}: "
                               f"writes {lsn + 1}..{base} are in no file")
        except BaseException:
            if log is not None:
                log.close()
            raise
        if self._wal is not None:  # a file from another tool: the writer's snapshots will carry a generation
            index.meta.setdefault("generation", new_generation())
        logger.info("%s: loaded the snapshot at lsn %d (generation %s)", self.directory, lsn, index.meta.get("generation"))
        self.index, self.lsn, self._snapshot_signature = index, lsn, signature
        self.reloads += 1
        self._forget_log()
        if log is not None:
            self._log, self._log_inode, self._offset = log, os.fstat(log.fileno()).st_ino, HEADER.size

    def _forget_log(self) -> None:
        if self._log is not None:
            self._log.close()
        self._log, self._log_inode = None, -1

    def _apply_record(self, record: Record) -> None:
        self._apply(record.ops, record.ids, record.vectors)
        self.lsn = record.lsn

    def _apply(self, ops: np.ndarray, ids: np.ndarray, vectors: np.ndarray | None) -> None:
        upserts = ops == Op.UPSERT
        self.index.write(ids[upserts], vectors, ids[~upserts])  # one lock: a search sees all of it or none


@dataclass(frozen=True)
class Rebuild:
    directory: Path
    lsn: int  # the last write logged before the rebuild started: the rebuild supersedes it and those before

    def save(self, ids: np.ndarray, vectors: np.ndarray, meta: dict[str, object] | None = None) -> PostIndex:
        index = PostIndex(int(vectors.shape[1]), {**(meta or {}), "lsn": self.lsn, "generation": new_generation()})
        index.upsert(ids, vectors)
        index.save(self.directory / SNAPSHOT)
        return index


@contextmanager
def rebuilding(directory: Path) -> Iterator[Rebuild]:
    """A full rebuild of a live index directory: enter it before the corpus is read, `save` the
    rebuilt index (a new generation) inside it. It holds the snapshot lock throughout, so the writer
    takes no snapshot meanwhile and every write logged after it started is still in the log: the
    writer and every follower replay those on top of the rebuild."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _flock(directory / SNAPSHOT_LOCK, blocking=True):
        yield Rebuild(directory, logged_lsn(directory / LOG))


def new_generation() -> str:
    return uuid.uuid4().hex


def _try_lock(path: Path, blocking: bool) -> int | None:
    """An fd holding an exclusive flock on `path`, or None when another holds it and `blocking` is
    off. The kernel releases the lock when the fd is closed or the process dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextmanager
def _flock(path: Path, blocking: bool) -> Iterator[bool]:
    """Hold the lock on `path` for the block (yields True), or yield False when another holds it."""
    fd = _try_lock(path, blocking)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)


def _take_writer_lock(directory: Path) -> int:
    fd = _try_lock(directory / WRITER_LOCK, blocking=False)
    if fd is None:
        raise IndexError_(f"{directory} already has a writer (it holds {directory / WRITER_LOCK}); a second "
                          f"server on the same index must be a follower (feedserve render --no-writer)")
    return fd
