"""Engagements streamed in while the server runs, so co-engagement reads them before the next build.

`coengagement.npz` holds who engaged with each post before the build; a post created since, or
liked by new members since, would be scored as of the build until the next one. Here every
engagement (member, post, time) the ingester sends is logged as it comes, durable before it is
acknowledged, and every `rank` instance follows the log and serves the build's table merged with
what was logged since (`LiveCoEngagement`): the table a training example reads "as of its moment",
which the served one otherwise only approximates.

The log is `engagements.wal` in the live index's directory, framed as the post index's log is
(`feedserve.index.wal`: header, length, crc32, lsn, torn tails cut off by the writer), one record
per write request:

    payload = u32 n | u32 columns (3) | int64 members[n] | int64 posts[n] | int64 times[n]

One writer (`EngagementWriter`, the `engage_write` model) holds `engagements.lock`; followers read
whole records from where they stopped. A snapshot (`EngagementWriter.snapshot`, every
`snapshot_every` writes) folds the log into `engagements.npz` (every engagement logged up to an
lsn, each pair once: 24 bytes an engagement) and starts a new log based at it, as the post index's
writer does; a follower reads on across it, and one that starts (a `rank` instance loading) reads
the snapshot and the short log after it rather than every record ever logged. A new build does not
reset either; a retention (`EngagementWriter.snapshot`) drops old engagements from the snapshot.
A follower that starts merges all of it into the build's table; after that, each poll's records
are inserted into the table it serves (`CoEngagement.with_events`). A member
engaging with a post twice counts once, from the first time, so a batch the ingester sends again
after a crash, or a like the build's table already holds, changes nothing.

A merge costs passes over the table's arrays, whatever it adds (a fraction of a second at millions
of entries, against seconds to build the table anew: benchmarks/reports/engagements.md),
so a follower waits MERGE_SPACING times the last merge's duration before the next: merging takes at
most a tenth of a core, and an engagement reaches `rank` within a second at the sample's size,
within a few seconds at millions. At a real feed's scale a nearline job's top co-engaged neighbours
per post would take the table's place.

With `--index milvus` servers share no directory: the log is then a Milvus collection beside the
post index's (`MilvusEngagements`), written by any `engage_write` replica and followed by every
`rank` by queries (`MilvusFollower`); Milvus keeps it (there is no snapshot to take) unless a retention
is set: a window every replica computes alike from its clock (`retention_since`): writers do not
store engagements older than it and delete those that fall out of it, followers read inside it and
merge anew each time it moves.

What counts as an engagement here is what the build's table holds: an active, positive action
(`coengaged`): a like, love, comment, share, repost or save, or a rating of ENGAGED_RATING or more.
A view, a click, a dwell or a negative is not logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np

from feedserve.errors import IndexStoreError
from feedserve.files import atomic_file
from feedserve.index.layout import IndexLayout
from feedserve.index.live import wait_for_lock
from feedserve.index.milvus import WRITE_CHUNK, create_collection, now_us, query_all
from feedserve.index.snapshot import meta_count
from feedserve.index.wal import (
    HEADER,
    Codec,
    LogError,
    WriteAheadLog,
    continues,
    read_framed,
    read_header,
    read_records,
    remember,
)
from feedserve.prompt.records import ENGAGED_RATING, rating_of
from feedserve.rank.coengagement import CoEngagement, first_engagements

logger = logging.getLogger(__name__)

MAGIC = b"FSENG001"
BODY = struct.Struct("<II")  # n, columns
COLUMNS = 3
# Times are unix seconds, as the co-engagement table and the count log hold them.
MAX_TIME = (1 << 32) - 1
FUTURE_SLACK_S = 86400  # how far past the writer's clock an engagement's time may be (clocks differ)
COENGAGED_ACTIONS = frozenset({"like", "love", "comment", "share", "repost", "save"})
MERGE_SPACING = 10  # a follower merges at most every this many times its last merge took
# A Milvus follower reads again what was written this long before the latest it read: writers' clocks
# differ a little (NTP keeps them within milliseconds), and a row is stamped before its insert is
# acknowledged (within a second), so it may become visible after a row stamped later. Each poll
# reads the rows of this window again (and skips them by id): a window of 10 s is ten polls' worth.
OVERLAP_US = 10_000_000
QUERY_LIMIT = 16384  # Milvus's most rows a query returns
# A poll's query that takes longer fails, and is reported and retried: without a limit a Milvus that
# stopped answering held the follow thread (and a model unload joining it) silently, for as long.
QUERY_TIMEOUT_S = 30.0
# With a retention, a snapshot moves its `since` (what it keeps from) in steps of this share of the
# retention: every move makes each follower merge anew, so it is a step, not a slide.
RETENTION_SLACK = 0.1


def clock_s() -> int:
    """This process's clock, unix seconds (what a retention counts back from)."""
    return int(time.time())


def retention_since(retention_s: int, now_s: int) -> int:
    """A Milvus log's retention window at `now_s` (unix seconds): engagements from this time on are
    kept (0: no retention, every one). Now less the retention, in steps of RETENTION_SLACK of it:
    replicas share no snapshot to agree on a `since` through, so each computes it from its own clock
    and they agree but for the skew at a step, and followers merge anew once a step rather than on
    every poll."""
    if not retention_s:
        return 0
    step = max(1, int(retention_s * RETENTION_SLACK))
    cutoff = max(0, now_s - retention_s)
    return cutoff - cutoff % step


def coengaged(action: str) -> bool:
    """Whether a member's action counts as an engagement for co-engagement (the build's table holds
    likes: ratings of ENGAGED_RATING or more)."""
    rating = rating_of(action)
    if rating is not None:
        return rating >= ENGAGED_RATING
    return action.strip().lower() in COENGAGED_ACTIONS


@dataclass(frozen=True)
class EngagementRecord:
    lsn: int
    events: np.ndarray  # int64 [3, n]: members, posts, times (unix seconds), as the payload holds them
    end: int  # file offset just past this record


def check(members: np.ndarray, posts: np.ndarray, times: np.ndarray) -> None:
    """ValueError naming what is wrong with a batch of engagements."""
    if not (members.shape == posts.shape == times.shape) or members.ndim != 1:
        raise ValueError(
            f"engagements: one member, post and time per row, got {members.shape}, {posts.shape}, {times.shape}"
        )
    for name, values in (("member ids", members), ("post ids", posts)):
        if len(values) and values.min() < 0:
            raise ValueError(f"engagements: {name} must be >= 0, got {int(values.min())}")
    if len(times) and (times.min() < 0 or times.max() > MAX_TIME):
        raise ValueError(f"engagements: times must be unix seconds in [0, {MAX_TIME}]")
    if len(times) and times.max() > clock_s() + FUTURE_SLACK_S:
        # A retention counts back from the newest engagement (no later than the clock): one dated
        # years ahead would drop, or with Milvus delete for good, every engagement before it.
        raise ValueError(
            f"engagements: time {int(times.max())} is more than {FUTURE_SLACK_S} s past this server's clock"
        )


def encode(members: np.ndarray, posts: np.ndarray, times: np.ndarray) -> bytes:
    columns = [np.ascontiguousarray(c, "<i8").reshape(-1) for c in (members, posts, times)]
    check(*columns)
    return BODY.pack(len(columns[0]), COLUMNS) + b"".join(c.tobytes() for c in columns)


def decode(lsn: int, payload: bytes, end: int) -> EngagementRecord | None:
    """The record, or None when its lengths do not add up."""
    if len(payload) < BODY.size:
        return None
    n, columns = BODY.unpack_from(payload)
    if columns != COLUMNS or len(payload) != BODY.size + 8 * COLUMNS * n:
        return None
    events = np.frombuffer(payload, "<i8", COLUMNS * n, BODY.size).astype(np.int64).reshape(COLUMNS, n)
    return EngagementRecord(lsn, events, end)


ENGAGEMENTS: Codec[EngagementRecord] = Codec(MAGIC, (MAGIC,), decode)
SNAPSHOT_FORMAT = "feedserve.engagements/1"


@dataclass(frozen=True)
class Snapshot:
    """The engagements logged up to `lsn`, each (member, post) pair once, at its first time; with a
    retention, those at `since` or later (unix seconds; 0: every one)."""

    lsn: int
    events: np.ndarray  # int64 [3, n]: members, posts, times
    since: int = 0

    @classmethod
    def empty(cls) -> Snapshot:
        return cls(0, np.empty((3, 0), np.int64))


def _checksum(lsn: int, events: np.ndarray, since: int = 0) -> str:
    h = hashlib.sha256(f"{lsn}:{since}".encode() if since else str(lsn).encode())  # files before retention: lsn
    h.update(np.ascontiguousarray(events, "<i8").data)
    return h.hexdigest()


def save_snapshot(path: Path, snapshot: Snapshot) -> None:
    """Atomically and durably, its checksum inside it (the file is rewritten while servers run)."""
    meta: dict[str, Any] = {
        "format": SNAPSHOT_FORMAT,
        "lsn": snapshot.lsn,
        "sha256": _checksum(snapshot.lsn, snapshot.events, snapshot.since),
    }
    if snapshot.since:
        meta["since"] = snapshot.since
    with atomic_file(path) as f:
        np.savez(f, meta=np.array(json.dumps(meta)), events=np.ascontiguousarray(snapshot.events, "<i8"))


@dataclass(frozen=True)
class _Meta:
    lsn: int
    since: int
    sha256: object


def _read_meta(path: Path, data: Any) -> _Meta:
    """A snapshot's metadata, from the open file `data`; IndexStoreError when it is not a snapshot's."""
    try:
        meta = json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise IndexStoreError(f"cannot read the engagement snapshot {path}: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != SNAPSHOT_FORMAT:
        raise IndexStoreError(f"{path}: not a {SNAPSHOT_FORMAT} file")
    return _Meta(meta_count(path, meta, "lsn", None), meta_count(path, meta, "since", 0), meta.get("sha256"))


def _open_snapshot(path: Path) -> Any:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise IndexStoreError(f"cannot read the engagement snapshot {path}: {err}") from err


def load_snapshot(path: Path) -> Snapshot:
    """IndexStoreError naming the file and what is wrong with it."""
    with _open_snapshot(path) as data:
        meta = _read_meta(path, data)
        try:
            events = data["events"].astype(np.int64)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise IndexStoreError(f"cannot read the engagement snapshot {path}: {err}") from err
    if events.ndim != 2 or events.shape[0] != COLUMNS:
        raise IndexStoreError(f"{path}: not a {SNAPSHOT_FORMAT} file")
    if meta.sha256 != _checksum(meta.lsn, events, meta.since):
        raise IndexStoreError(f"{path}: the engagements do not match the checksum saved with them")
    return Snapshot(meta.lsn, events, meta.since)


def snapshot_since(path: Path) -> int:
    """The retention's `since` of a snapshot, from its metadata alone (0 when there is no file): a
    follower reads it at every new log without loading the engagements."""
    if not path.exists():
        return 0
    with _open_snapshot(path) as data:
        return _read_meta(path, data).since


class EngagementWriter:
    """The log's one writer: a batch is checked, logged and fsynced before `write` returns its lsn.
    `snapshot()` folds what was logged into `engagements.npz` and starts a new log after it."""

    def __init__(self, log: WriteAheadLog, lock: int, files: IndexLayout, retention_s: int = 0) -> None:
        self._log, self._lock, self.files = log, lock, files
        self.retention_s = retention_s  # engagements older than this are dropped at a snapshot (0: none)
        self._appending = threading.Lock()  # a snapshot reads where the log ends between two writes
        self._snapshotting = threading.Lock()

    @classmethod
    def open(cls, directory: Path, lock_wait_s: float = 0.0, retention_s: int = 0) -> EngagementWriter:
        """Take `engagements.lock` (waiting up to `lock_wait_s` for a writer going away; IndexStoreError
        when another still holds it) and open the log, a torn tail cut off; a new log continues the
        snapshot there. `retention_s`: see `snapshot`."""
        files = IndexLayout(Path(directory))
        files.root.mkdir(parents=True, exist_ok=True)
        lock = wait_for_lock(files.engagements_lock, lock_wait_s)
        if lock is None:
            raise IndexStoreError(f"{files.root} already has an engagement writer (it holds {files.engagements_lock})")
        try:
            snapshot = load_snapshot(files.engagements_snapshot) if files.engagements_snapshot.exists() else None
            base = snapshot.lsn if snapshot is not None else 0
            if base and not files.engagements.exists():
                logger.warning(
                    "%s: no log beside the snapshot %s; starting one after it (lsn %d): whatever was logged "
                    "after the snapshot is gone",
                    files.engagements,
                    files.engagements_snapshot,
                    base,
                )
            log = WriteAheadLog(files.engagements, base, codec=ENGAGEMENTS)
            if log.last_lsn < base or log.base_lsn > base:
                log.close()
                held = f"lsns {log.base_lsn + 1}..{log.last_lsn}"
                raise LogError(
                    f"{files.engagements} holds {held}, but the snapshot {files.engagements_snapshot} holds up to "
                    f"lsn {base}: engagements are missing between them, or they are not one log's; restore the "
                    "snapshot the log continues"
                )
        except BaseException:
            os.close(lock)
            raise
        logger.info("%s: engagements logged up to lsn %d (writer)", files.engagements, log.last_lsn)
        return cls(log, lock, files, retention_s)

    @property
    def path(self) -> Path:
        return self._log.path

    @property
    def failed(self) -> bool:
        return self._log.failed is not None

    def write(self, members: np.ndarray, posts: np.ndarray, times: np.ndarray) -> int:
        """Log one batch; its lsn once durable. ValueError (nothing logged) on a bad batch, LogError
        when the disk did not take it."""
        payload = encode(members, posts, times)
        with self._appending:
            return self._log.append_payload(payload)

    def snapshot(self) -> int | None:
        """Save every engagement logged so far in `engagements.npz` (the last snapshot's and the log's
        records after it, each pair once) and start a new log based after them, carrying over what
        was written meanwhile (writes go on). The snapshot's lsn; None when nothing was logged since
        the last. A follower reads on from where it is; one that starts reads the snapshot and the
        log after it instead of every record ever logged.

        With a retention, the engagements older than `retention_s` before now are dropped, in steps
        (`_since`): the snapshot keeps those at its `since` or later, and a follower that finds a
        later `since` merges anew (a follower cannot take entries out of its table), which the steps
        keep to one in a tenth of the retention. Engagements logged with times before `since` are
        dropped too."""
        with self._snapshotting:
            with self._appending:
                if self._log.failed:  # a failed append may be on disk past `end`: reopen first
                    raise LogError(f"{self.path}: no snapshot of a log that failed ({self._log.failed}); reopen it")
                lsn, end, base = self._log.last_lsn, self._log.end, self._log.base_lsn
            if lsn == base:
                return None
            path = self.files.engagements_snapshot
            previous = load_snapshot(path) if path.exists() else Snapshot.empty()
            chunks = [previous.events]
            with self._log.reader() as f:  # the file logged to, even if the path was deleted since
                for record in read_records(f, codec=ENGAGEMENTS):
                    if record.end > end:
                        break
                    if record.lsn > previous.lsn:
                        chunks.append(record.events)
            logged = np.concatenate(chunks, axis=1)
            since = self._since(previous.since, logged[2])
            # Dropped before a pair is reduced to its first time: a pair engaged with again inside
            # the retention is kept, at its latest first time within it.
            events = np.stack(first_engagements(*logged[:, logged[2] >= since]))
            save_snapshot(path, Snapshot(lsn, events, since))
            # A crash before the log restarts leaves the old log: its records <= lsn are read twice,
            # which changes nothing (a pair counts once).
            self._log.restart(lsn, end)
            logger.info(
                "%s: %d engagements snapshotted at lsn %d%s",
                path,
                events.shape[1],
                lsn,
                f" (those since {since})" if since else "",
            )
            return lsn

    def _since(self, since: int, times: np.ndarray) -> int:
        """The retention's `since` for a snapshot of engagements at `times`, the last one's `since`
        given: moved to now less the retention once that is RETENTION_SLACK of it later and some
        engagement kept falls before it; "now" never past the newest engagement logged (a clock a
        year ahead for one snapshot dropped every engagement, for good, since `since` only grows)."""
        if not self.retention_s or not len(times):
            return since
        now = min(clock_s(), int(times.max()))
        cutoff = now - self.retention_s
        step = cutoff - since >= int(self.retention_s * RETENTION_SLACK)
        return cutoff if step and ((times >= since) & (times < cutoff)).any() else since

    def close(self) -> None:
        self._log.close()
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1


class EngagementFollower:
    """Reads what was logged since the last read, as [3, n] int64 chunks (members, posts, times).

    When the writer snapshots, it starts a new log based at the snapshot: a follower reads the one
    it has open to its end and goes on in the new one. One that starts, or that finds the log based
    past what it read (it fell behind a snapshot), reads the snapshot and the log after it. A log
    based at 0 that replaces the one followed (a new index directory) starts everything again."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        self.snapshot_path = IndexLayout(self.path.parent).engagements_snapshot
        self.lsn = 0  # the last record read
        self.since = 0  # the retention's: engagements before it are dropped (the snapshot's when read)
        self._log: BinaryIO | None = None
        self._inode = -1
        self._offset = HEADER.size
        self._crcs: dict[int, int] = {}  # lsn -> checksum of the latest records read from a log

    def read(self) -> tuple[bool, list[np.ndarray]]:
        """(whether what was read before no longer holds, so the reader starts again from its base;
        the chunks read since: on a start, the snapshot's first)."""
        try:
            inode = os.stat(self.path).st_ino
            if inode == self._inode:
                return False, self._drain()
            # Unbuffered, as the post index's followers read theirs: never bytes from a stale buffer.
            log = open(self.path, "rb", buffering=0)  # noqa: SIM115 (kept open across reads)
        except FileNotFoundError:
            return False, self._drain()
        lsn, offset, crcs = self.lsn, self._offset, dict(self._crcs)
        try:
            base = read_header(log, self.path, ENGAGEMENTS)
            chunks = self._drain()  # the rest of the log followed, before the one that continues it
            # A log that does not hold the last record read was started anew by a writer that lost
            # the one before (deleted): its lsns name other engagements.
            restart = self._inode == -1 or base == 0 or not continues(log, base, self.lsn, self._crcs)
            # A snapshot that dropped old engagements: the table holds them, and only a merge anew
            # takes them out.
            restart = restart or snapshot_since(self.snapshot_path) > self.since
            snapshot = Snapshot.empty()
            if restart and base > 0:
                snapshot = load_snapshot(self.snapshot_path)
                if snapshot.lsn < base:
                    raise LogError(
                        f"{self.path} starts after lsn {base} but {self.snapshot_path} holds only up to "
                        f"{snapshot.lsn}: engagements {snapshot.lsn + 1}..{base} are in no file"
                    )
        except BaseException:
            log.close()  # the log followed so far stays, unread: a new one is taken once it reads
            self.lsn, self._offset, self._crcs = lsn, offset, crcs
            raise
        replaced = restart and self._inode != -1
        self.close()
        self._log, self._inode, self._offset = log, os.fstat(log.fileno()).st_ino, HEADER.size
        if restart:
            self.lsn, self._crcs, self.since = snapshot.lsn, {}, snapshot.since
            chunks = [snapshot.events] if snapshot.events.shape[1] else []
        return replaced, chunks + self._drain()

    def _drain(self) -> list[np.ndarray]:
        """The records of the open log past the last one read."""
        if self._log is None:
            return []
        chunks = []
        for crc, record in read_framed(self._log, self._offset, ENGAGEMENTS):
            if record.lsn > self.lsn:
                events = record.events
                chunks.append(events[:, events[2] >= self.since] if self.since else events)
                self.lsn = record.lsn
                remember(self._crcs, record.lsn, crc)
            self._offset = record.end
        return chunks

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
        self._log, self._inode = None, -1


class MilvusEngagements:
    """The engagement log as a Milvus collection, for servers that share no directory (`--index
    milvus`): `<index name>_engagements` (one underscore: the index's generations are the
    collections named `<index name>__...`, and a rebuild drops those it does not serve), one row per
    engagement (member, post, engaged_at, and written_at: microseconds since the epoch, stamped by
    the writer), an automatic id, and a placeholder vector (Milvus wants one in every collection).
    Any number of writers insert; an insert under Strong consistency is visible to every query
    after it is acknowledged. Milvus keeps every row (there is no snapshot to take) unless
    `retention_s` is set: then a write stores the engagements inside the window `retention_since`
    keeps (the rest are acknowledged and dropped, as a local snapshot drops them) and deletes those
    that fell out of it since the last delete; `since` reads inside it. A writer's "now" is never
    past the newest engagement it was given, and none is taken dated more than FUTURE_SLACK_S past
    its clock (a delete is for good: a clock or an engagement a year ahead would otherwise empty the
    log)."""

    def __init__(self, uri: str, index_name: str, retention_s: int = 0) -> None:
        from pymilvus import DataType, MilvusClient

        if retention_s < 0:
            raise ValueError(f"an engagement retention must be >= 0 seconds, got {retention_s}")
        self.retention_s = retention_s
        self._newest = 0  # the newest engagement time this writer was given
        self._deleted_to = 0  # what this writer deleted before (its last window's start)
        self.client = MilvusClient(uri)
        self.collection = f"{index_name}_engagements"
        schema = self.client.create_schema(auto_id=True, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        for name in ("member", "post", "engaged_at", "written_at"):
            schema.add_field(name, DataType.INT64)
        schema.add_field("placeholder", DataType.FLOAT_VECTOR, dim=2)
        index = self.client.prepare_index_params()
        index.add_index("placeholder", index_type="FLAT", metric_type="IP")
        index.add_index("written_at", index_type="INVERTED")  # every poll filters by it
        create_collection(self.client, self.collection, schema, index)
        self.client.load_collection(self.collection)

    def write(self, members: np.ndarray, posts: np.ndarray, times: np.ndarray) -> int:
        """Insert one batch; its written_at once Milvus has it. ValueError (nothing written) on a bad
        batch; Milvus's own error when it did not take it, and LogError when it took longer than half
        the followers' overlap: the rows may land where a follower already read past them, so the
        write is not acknowledged and the client's retry stamps them anew (a pair counts once)."""
        columns = [np.asarray(c, np.int64).reshape(-1) for c in (members, posts, times)]
        check(*columns)
        kept = 0
        if self.retention_s and len(columns[2]):
            self._newest = max(self._newest, int(columns[2].max()))
            kept = self.kept_since(self._newest)
            columns = [c[columns[2] >= kept] for c in columns]
        written = now_us()
        rows = [
            {"member": m, "post": p, "engaged_at": t, "written_at": written, "placeholder": [1.0, 0.0]}
            for m, p, t in zip(*(c.tolist() for c in columns), strict=True)
        ]
        budget_s = OVERLAP_US / 2e6
        for start in range(0, len(rows), WRITE_CHUNK):
            self.client.insert(self.collection, rows[start : start + WRITE_CHUNK], timeout=budget_s)
        if now_us() - written > OVERLAP_US // 2:
            raise LogError(f"Milvus took the engagements {(now_us() - written) / 1e6:.1f} s after they were stamped")
        if kept > self._deleted_to:
            self._delete_before(kept)
        return written

    def _delete_before(self, kept: int) -> None:
        """Delete the engagements before the window (any writer may; deleting twice changes nothing).
        One that fails is tried again at the next write: the write itself was taken, and followers
        read inside the window whatever is still stored."""
        try:
            self.client.delete(self.collection, filter=f"engaged_at < {int(kept)}", timeout=QUERY_TIMEOUT_S)
        except Exception:
            logger.exception("%s: could not delete the engagements before %d", self.collection, kept)
            return
        self._deleted_to = kept
        logger.info("%s: engagements before %d deleted (retention %d s)", self.collection, kept, self.retention_s)

    def kept_since(self, newest: int) -> int:
        """The retention window's start by this process's clock, never past `newest` (the newest
        engagement read) less the retention (0: no retention)."""
        return retention_since(self.retention_s, min(clock_s(), newest))

    def since(self, written_us: int, engaged_since: int = 0) -> list[dict[str, Any]]:
        """Every row written at `written_us` or later (id, member, post, engaged_at, written_at), of an
        engagement at `engaged_since` or later: one query for a poll's few, the iterator past its limit
        (a start reads every row)."""
        fields = ["id", "member", "post", "engaged_at", "written_at"]
        where = f"written_at >= {int(written_us)}"
        if engaged_since:
            where += f" and engaged_at >= {int(engaged_since)}"
        rows: list[dict[str, Any]] = self.client.query(
            self.collection, filter=where, output_fields=fields, limit=QUERY_LIMIT, timeout=QUERY_TIMEOUT_S
        )
        if len(rows) < QUERY_LIMIT:
            return rows
        return list(query_all(self.client, self.collection, where, fields, timeout_s=QUERY_TIMEOUT_S))

    def close(self) -> None:
        self.client.close()


class MilvusFollower:
    """Reads what was written to a `MilvusEngagements` since the last read: the rows written since the
    latest it read less OVERLAP_US, less those it read already (by id). With a retention, the rows
    inside its window alone; when the window moves, every row inside it again, as a log replaced (a
    follower cannot take entries out of the table it merged them into)."""

    def __init__(self, log: MilvusEngagements) -> None:
        self.log, self.name = log, f"Milvus collection {log.collection}"
        self.latest_us: int | None = None
        self.kept_since = 0  # the retention window's start the rows read are inside
        self._newest = 0  # the newest engagement time read
        self._recent: dict[int, int] = {}  # id -> written_at, of the rows read inside the overlap

    def read(self) -> tuple[bool, list[np.ndarray]]:
        since = 0 if self.latest_us is None else self.latest_us - OVERLAP_US
        rows = [r for r in self.log.since(since, self.kept_since) if int(r["id"]) not in self._recent]
        newest = max([self._newest, *(int(r["engaged_at"]) for r in rows)])
        # The window moves with the newest engagement read, never past it (as a writer's): a clock
        # that jumps ahead would otherwise move it past every engagement, and for good.
        kept = self.log.kept_since(newest) if newest else 0
        replaced = False
        if kept > self.kept_since:
            if self._newest:  # rows merged before fell out: read the window anew (nothing changes until read)
                rows, replaced = self.log.since(0, kept), True
                self.latest_us, self._recent = None, {}
            else:  # the first rows read: those inside the window
                rows = [r for r in rows if int(r["engaged_at"]) >= kept]
        self.kept_since, self._newest = max(kept, self.kept_since), newest
        for r in rows:
            self._recent[int(r["id"])] = int(r["written_at"])
        if rows:
            # Never past this clock: a writer whose clock runs ahead would hide the others' rows.
            latest = max(self.latest_us or 0, *(int(r["written_at"]) for r in rows))
            self.latest_us = min(latest, max(now_us(), self.latest_us or 0))
        if self.latest_us is not None:
            horizon = self.latest_us - OVERLAP_US
            self._recent = {i: w for i, w in self._recent.items() if w >= horizon}
        if not rows:
            return replaced, []
        return replaced, [
            np.array(
                [[r["member"] for r in rows], [r["post"] for r in rows], [r["engaged_at"] for r in rows]], np.int64
            )
        ]

    def close(self) -> None:
        self.log.close()


class Follower(Protocol):
    """What `LiveCoEngagement` reads engagements from (`EngagementFollower`, `MilvusFollower`)."""

    name: str

    def read(self) -> tuple[bool, list[np.ndarray]]: ...

    def close(self) -> None: ...


class LiveCoEngagement:
    """The build's co-engagement table merged with the engagements logged since it.

    `update()` reads what was appended to the log and, when there is anything, builds the merged
    table and swaps it in; `start()` runs it on a thread every `poll_s` seconds, so requests only
    read `table` (a reference: a request scores against one table from start to end) and never wait
    for a merge."""

    def __init__(self, base: CoEngagement, log: str | os.PathLike[str] | Follower, poll_s: float = 1.0) -> None:
        """`log`: the local log's path, or a follower of another log."""
        self.base, self.table, self.poll_s = base, base, poll_s
        self.follower: Follower = EngagementFollower(Path(log)) if isinstance(log, str | os.PathLike) else log
        self.logged = 0  # engagements read from the log so far
        self._unmerged: list[np.ndarray] = []  # [3, n] per record read and not yet in `table`
        self._from_base = False  # the log was replaced: the next merge starts again from `base`
        self.merges = 0
        self.last_merge_s = 0.0
        self._updating = threading.Lock()  # the thread's update and a caller's never interleave
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def update(self) -> bool:
        """Read the log; merge what was read that the table does not hold yet into it and swap the
        result in. Whether it did. A merge that fails leaves what it had to merge for the next."""
        with self._updating:
            replaced, chunks = self.follower.read()
            if replaced:
                logger.info("%s: the engagement log was replaced; merging it anew", self.follower.name)
                self._unmerged, self._from_base, self.logged = [], True, 0
            self._unmerged.extend(chunks)
            self.logged += sum(chunk.shape[1] for chunk in chunks)
            if not (self._unmerged or self._from_base):
                return False
            started = time.monotonic()
            unmerged = np.concatenate([np.empty((3, 0), np.int64), *self._unmerged], axis=1)
            self.table = (self.base if self._from_base else self.table).with_events(*unmerged)
            self._unmerged, self._from_base = [], False
            self.merges += 1
            self.last_merge_s = time.monotonic() - started
            logger.info(
                "%s: co-engagement merged with %d more logged engagements (%d in all) in %.3f s",
                self.follower.name,
                unmerged.shape[1],
                self.logged,
                self.last_merge_s,
            )
            return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="coengagement-follow", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        reported = ""  # a damaged log is reported once, not every poll, and read again; the table in use stays
        while not self._stop.is_set():
            try:
                self.update()
                reported = ""
            except Exception as err:
                if repr(err) != reported:
                    reported = repr(err)
                    logger.exception("%s: could not follow the engagement log", self.follower.name)
            self._stop.wait(max(self.poll_s, MERGE_SPACING * self.last_merge_s))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.follower.close()
