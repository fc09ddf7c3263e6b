"""A post index that takes upserts and deletes while it serves, and loses none it acknowledged.

One directory holds `posts.npz`, the snapshot (its metadata names the lsn of the last write it
holds and the generation: the full build it descends from), and `posts.wal`, the write-ahead log of
the writes since (`feedserve.index.wal`). There is one writer and any number of followers:

- The writer (`IndexWriter.open(dir)`) holds `writer.lock` (flock) for its life: a
  second writer on the same directory is refused. It checks a write, appends it to the log as one
  record and fsyncs, then applies it; only then is it acknowledged. `snapshot()` copies the index
  under the write lock, saves the copy atomically without it (writes go on meanwhile), and starts a
  new log based at the copy's lsn that carries over the records written during the save.
- A follower (`IndexFollower.open(dir)`: every `knn` instance; other processes) loads the same files
  and calls `refresh()` before each batch of searches. It keeps the log it follows open: when the
  writer starts a new log, the follower first reads the old one to its end, so it reloads the
  snapshot only when it starts or when a full rebuild replaced the index (a new generation).
- A full rebuild (`rebuilding`, used by `feedserve index`; any index file without a generation
  that appears counts as one) holds `snapshot.lock` from before it reads
  its corpus until its file is in place: the writer takes no snapshot meanwhile, so every write
  logged after the rebuild started is still in the log, and is replayed on top of the rebuild by
  the writer and by every follower.

A write may carry each upserted post's features (what the ranker reads of it besides its vector,
`feedserve.rank.features.feature_row`): they are logged, applied, followed and snapshotted with the
vector, and replaced or dropped with it.

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
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from feedserve.errors import IndexStoreError
from feedserve.files import FileIdentity, file_identity
from feedserve.index.engines import Engine
from feedserve.index.layout import IndexLayout
from feedserve.index.snapshot import read_meta, save_arrays
from feedserve.index.store import PostIndex, check_unit
from feedserve.index.wal import (
    HEADER,
    POSTS,
    LogError,
    LogRecord,
    Op,
    WriteAheadLog,
    continues,
    logged_lsn,
    read_framed,
    read_header,
    remember,
)

logger = logging.getLogger(__name__)


class _Replica:
    """What the writer and the followers share: an index loaded from the directory's snapshot, and
    the replay of the directory's log on it (`_follow`), or of a rebuilt snapshot (`_take_rebuild`)."""

    def __init__(self, files: IndexLayout, index: PostIndex, snapshot_identity: FileIdentity | None) -> None:
        self.files = files
        self.index = index
        self.lsn = int(index.meta.get("lsn", 0))  # the last write this index holds
        self.reloads = 0  # snapshots loaded after opening (a rebuild, or a follower that fell behind)
        self._snapshot_identity = snapshot_identity  # of the file `index` was loaded from (taken before)
        self._rejected_identity: FileIdentity | None = None  # a rebuilt file that could not be taken
        self._log: BinaryIO | None = None  # the log being followed, kept open across a log restart
        self._log_inode = -1
        self._offset = HEADER.size
        self._crcs: dict[int, int] = {}  # lsn -> checksum of the latest records applied from a log
        self._lock = threading.Lock()  # one write, refresh or snapshot copy at a time

    @property
    def directory(self) -> Path:
        return self.files.root

    @property
    def snapshot_path(self) -> Path:
        return self.files.snapshot

    @property
    def log_path(self) -> Path:
        return self.files.log

    @property
    def generation(self) -> object:
        return self.index.meta.get("generation")

    def close(self) -> None:
        self._forget_log()

    def _loaded(self, index: PostIndex) -> None:
        """A hook for an index just loaded from the snapshot, before it is served."""

    @staticmethod
    def _snapshot_or_empty(
        files: IndexLayout, dim: int | None, engine: Engine, save: bool
    ) -> tuple[PostIndex, FileIdentity | None]:
        """The directory's snapshot (IndexStoreError on a corrupt file: never an empty index in its
        place), else an empty index of `dim`, saved when `save` (the writer's empty snapshot records
        the dimension for every later open); with the identity of the file it came from."""
        identity = file_identity(files.snapshot)
        if identity is not None:
            return PostIndex.load(files.snapshot, engine), identity
        if dim is None:
            raise IndexStoreError(f"{files.snapshot} does not exist and no dimension was given for a new index")
        index = PostIndex(dim, {"lsn": 0, "generation": new_generation()}, engine)
        if save:
            index.save(files.snapshot)
            identity = file_identity(files.snapshot)
        return index, identity

    def _take_rebuild(self) -> bool:
        identity = file_identity(self.snapshot_path)
        if identity in (self._snapshot_identity, self._rejected_identity) or identity is None:
            return False
        try:
            generation = read_meta(self.snapshot_path).get("generation")
            if generation is not None and generation == self.generation:
                self._snapshot_identity = identity  # the writer's own periodic snapshot: the log holds it all
                return False
            self._reload()
        except Exception:
            # Reported once, not in every batch; the log goes on being followed past it, and the
            # writer's next snapshot replaces a file nobody can read.
            self._rejected_identity = identity
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
        if not continues(log, base, self.lsn, self._crcs):
            log.close()
            if base <= self.lsn:  # (past it: the writer snapshotted past us and the log before it is gone)
                logger.warning(
                    "%s does not hold lsn %d as this index applied it: the writer started it anew after "
                    "losing the log (deleted?); reloading the snapshot",
                    self.log_path,
                    self.lsn,
                )
            self._reload()
        else:
            self._forget_log()
            self._log, self._log_inode, self._offset = log, os.fstat(log.fileno()).st_ino, HEADER.size
        return applied + self._drain()

    def _drain(self) -> int:
        if self._log is None:
            return 0
        applied = 0
        for crc, record in read_framed(self._log, self._offset, POSTS):
            if record.lsn > self.lsn + 1:
                raise LogError(f"{self.log_path}: record {record.lsn} follows {self.lsn}: records are missing")
            if record.lsn == self.lsn + 1:
                self._apply_record(record)
                remember(self._crcs, record.lsn, crc)
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
        identity = file_identity(self.snapshot_path)
        index = PostIndex.load(self.snapshot_path, self.index.engine)
        lsn = int(index.meta.get("lsn", 0))
        log = self._open_log()
        try:
            base = read_header(log, self.log_path) if log is not None else lsn
            if base > lsn:
                raise LogError(
                    f"{self.log_path} starts after lsn {base} but the snapshot holds only up to {lsn}: "
                    f"writes {lsn + 1}..{base} are in no file"
                )
        except BaseException:
            if log is not None:
                log.close()
            raise
        self._loaded(index)
        logger.info(
            "%s: loaded the snapshot at lsn %d (generation %s)", self.directory, lsn, index.meta.get("generation")
        )
        self.index, self.lsn, self._crcs, self._snapshot_identity = index, lsn, {}, identity
        self.reloads += 1
        self._forget_log()
        if log is not None:
            self._log, self._log_inode, self._offset = log, os.fstat(log.fileno()).st_ino, HEADER.size

    def _forget_log(self) -> None:
        if self._log is not None:
            self._log.close()
        self._log, self._log_inode = None, -1

    def _apply_record(self, record: LogRecord) -> None:
        self._apply(record.ops, record.ids, record.vectors, record.features)
        self.lsn = record.lsn

    def _apply(
        self,
        ops: np.ndarray,
        ids: np.ndarray,
        vectors: np.ndarray | None,
        features: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        upserts = ops == Op.UPSERT
        # One lock: a search sees all of it or none.
        self.index.write(ids[upserts], vectors, ids[~upserts], features)


class IndexFollower(_Replica):
    """Serves searches over the directory's index and follows the writer: `refresh()` before each
    batch of searches applies what the writer acknowledged since."""

    @classmethod
    def open(cls, directory: Path, dim: int | None = None, engine: Engine = Engine()) -> IndexFollower:
        """The index in `directory`; without a snapshot there, an empty one of `dim` (in memory only:
        the writer creates the file)."""
        files = IndexLayout(Path(directory))
        files.root.mkdir(parents=True, exist_ok=True)
        index, identity = cls._snapshot_or_empty(files, dim, engine, save=False)
        follower = cls(files, index, identity)
        try:
            with follower._lock:
                follower._follow()
        except BaseException:
            follower.close()
            raise
        logger.info("%s: %d posts at lsn %d (follower)", files.root, len(index), follower.lsn)
        return follower

    def refresh(self) -> int:
        """Catch up with the writer; returns how many log records were applied. A rebuilt snapshot
        (a new generation) replaces the index, with the log's records past it."""
        with self._lock:
            if self._take_rebuild():
                return self._drain()
            return self._follow()


class FollowedIndex:
    """The index a serving model follows (`knn`, `rank`): opened once its snapshot exists, refreshed
    before each batch. At load, a bad index fails the model (better than a model that answers
    nothing); later, a bad file keeps the index it holds serving, logged once per file."""

    def __init__(self, files: IndexLayout, engine: Engine, owner: str) -> None:
        self.files, self.engine, self.owner = files, engine, owner
        self.live: IndexFollower | None = None
        self._unreadable: FileIdentity | None = None
        self.refresh(at_load=True)
        if self.index is None:
            logger.warning("%s: no index at %s yet; it holds no post until one is built", owner, files.snapshot)

    @property
    def index(self) -> PostIndex | None:
        return self.live.index if self.live is not None else None

    def refresh(self, at_load: bool = False) -> None:
        try:
            if self.live is not None:
                self.live.refresh()
            elif (identity := file_identity(self.files.snapshot)) is not None and identity != self._unreadable:
                self._unreadable = identity  # until it opens: a bad file is reported once
                live = IndexFollower.open(self.files.root, engine=self.engine)
                if len(live.index):  # build a GPU engine's device copy now, not in the first request
                    live.index.search(np.zeros((1, live.index.dim), np.float32), [1])
                self.live = live
        except Exception:
            if at_load:
                raise
            logger.exception("%s: could not follow %s; serving the index it holds", self.owner, self.files.root)


class IndexWriter(_Replica):
    """The directory's single writer: it holds the writer lock for its life, logs each write durably
    before applying it, and takes the snapshots."""

    def __init__(
        self,
        files: IndexLayout,
        index: PostIndex,
        snapshot_identity: FileIdentity | None,
        wal: WriteAheadLog,
        writer_lock: int,
    ) -> None:
        super().__init__(files, index, snapshot_identity)
        self._wal = wal
        self._writer_lock: int | None = writer_lock

    @classmethod
    def open(
        cls, directory: Path, dim: int | None = None, engine: Engine = Engine(), lock_wait_s: float = 0.0
    ) -> IndexWriter:
        """Take the writer lock of `directory`, waiting up to `lock_wait_s` for a writer that is going
        away (IndexStoreError when another writer still holds it), load the snapshot (or create an
        empty one of `dim`) and replay the log past it."""
        files = IndexLayout(Path(directory))
        files.root.mkdir(parents=True, exist_ok=True)
        lock = _take_writer_lock(files.root, lock_wait_s)
        wal: WriteAheadLog | None = None
        try:
            index, identity = cls._snapshot_or_empty(files, dim, engine, save=True)
            cls._give_generation(index)
            lsn = int(index.meta.get("lsn", 0))
            wal = WriteAheadLog(files.log, base_lsn=lsn)
            if wal.last_lsn < lsn:
                raise LogError(
                    f"{files.log} ends at lsn {wal.last_lsn}, before the snapshot {files.snapshot} (lsn {lsn}): "
                    f"its next write would reuse lsn {wal.last_lsn + 1}; move it away (the snapshot holds it all)"
                )
            writer = cls(files, index, identity, wal, lock)
            with writer._lock:
                writer._follow()
                writer._forget_log()  # the writer reads its log again only to take a rebuild
        except BaseException:
            if wal is not None:
                wal.close()
            os.close(lock)
            raise
        logger.info("%s: %d posts at lsn %d (writer)", files.root, len(index), writer.lsn)
        return writer

    @staticmethod
    def _give_generation(index: PostIndex) -> None:
        # A file from another tool has no generation: the writer's snapshots will carry one.
        index.meta.setdefault("generation", new_generation())

    def _loaded(self, index: PostIndex) -> None:
        self._give_generation(index)

    @property
    def failed(self) -> bool:
        """Whether the log refuses writes after a failure it could not undo (reopen to go on)."""
        return self._wal.failed is not None

    def refresh(self) -> int:
        """Take a rebuilt snapshot (a new generation) if one landed, with the log's records past it;
        returns how many records were applied (the writer has no others to follow)."""
        with self._lock:
            if not self._take_rebuild():
                return 0
            applied = self._drain()
            self._forget_log()
            return applied

    def write(
        self,
        ops: np.ndarray,
        ids: np.ndarray,
        vectors: np.ndarray | None,
        features: Sequence[Mapping[str, Any]] | None = None,
    ) -> int:
        """Apply one write request, upserts (a vector per upsert row, in order, and with `features` a
        feature row per upsert row, `{}` for none) and deletes together; returns its lsn once it is
        durable and applied. IndexStoreError before anything is logged."""
        ops = np.ascontiguousarray(ops, dtype=np.uint8).reshape(-1)
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if len(ops) != len(ids) or not np.isin(ops, list(Op)).all():
            raise IndexStoreError(
                f"a write needs one op (1 upsert, 2 delete) per id: {len(ops)} ops for {len(ids)} ids"
            )
        if len(np.unique(ids)) != len(ids):
            raise IndexStoreError("duplicate post ids in one write")
        upserts = ops == Op.UPSERT
        if features is not None and len(features) != int(upserts.sum()):
            raise IndexStoreError(f"expected {int(upserts.sum())} feature rows (one per upsert), got {len(features)}")
        if not upserts.any():
            vectors, features = None, None
        elif vectors is None:
            raise IndexStoreError("upserts need their vectors")
        else:
            _, vectors = self.index.check_write(ids[upserts], vectors)
            check_unit(vectors)
        with self._lock:
            lsn = self._wal.append(ops, ids, vectors, features)  # durable first ...
            self._apply(ops, ids, vectors, features)  # ... then visible
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
        with _flock(self.files.snapshot_lock, blocking=False) as held:
            if not held:
                logger.info("%s: a rebuild is in progress; the snapshot waits for it", self.directory)
                return None
            current = file_identity(self.snapshot_path)
            if current != self._snapshot_identity and (current is None or current != self._rejected_identity):
                return None  # a rebuild landed since we last looked: never save over it (one unreadable, yes)
            with self._lock:  # a copy, so writes go on while it is saved
                ids, vectors = self.index.snapshot()
                lsn, keep_from, meta, features = self.lsn, self._wal.end, dict(self.index.meta), self.index.features()
            save_arrays(self.snapshot_path, ids, vectors, {**meta, "lsn": lsn}, features)
            self._snapshot_identity = file_identity(self.snapshot_path)
            # A crash before the log restarts leaves the old log: replay skips its records <= lsn.
            self._wal.restart(lsn, keep_from)
            return lsn

    def close(self) -> None:
        self._wal.close()
        super().close()
        if self._writer_lock is not None:
            os.close(self._writer_lock)
            self._writer_lock = None


@dataclass(frozen=True)
class Rebuild:
    directory: Path
    lsn: int  # the last write logged before the rebuild started: the rebuild supersedes it and those before

    def save(self, ids: np.ndarray, vectors: np.ndarray, meta: dict[str, object] | None = None) -> PostIndex:
        index = PostIndex(int(vectors.shape[1]), {**(meta or {}), "lsn": self.lsn, "generation": new_generation()})
        index.upsert(ids, vectors)
        index.save(IndexLayout(self.directory).snapshot)
        return index


@contextmanager
def rebuilding(directory: Path) -> Iterator[Rebuild]:
    """A full rebuild of a live index directory: enter it before the corpus is read, `save` the
    rebuilt index (a new generation) inside it. It holds the snapshot lock throughout, so the writer
    takes no snapshot meanwhile and every write logged after it started is still in the log: the
    writer and every follower replay those on top of the rebuild."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _flock(IndexLayout(directory).snapshot_lock, blocking=True):
        yield Rebuild(directory, logged_lsn(IndexLayout(directory).log))


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


def wait_for_lock(path: Path, wait_s: float) -> int | None:
    """An fd holding the exclusive flock on `path`, taken within `wait_s` seconds, else None."""
    deadline = time.monotonic() + wait_s
    fd = _try_lock(path, blocking=False)
    while fd is None and time.monotonic() < deadline:
        time.sleep(0.1)
        fd = _try_lock(path, blocking=False)
    return fd


def _take_writer_lock(directory: Path, wait_s: float = 0.0) -> int:
    """The writer lock. A writer whose server was killed exits within a second or so (its stub
    watches its server, feedserve.triton.base.watch_parent), and the kernel drops its lock then: a
    restarted server waits for that instead of failing."""
    fd = wait_for_lock(IndexLayout(directory).writer_lock, wait_s)
    if fd is None:
        raise IndexStoreError(
            f"{directory} already has a writer (it holds {IndexLayout(directory).writer_lock}); a second "
            f"server on the same index must be a follower (feedserve render --no-writer)"
        )
    return fd
