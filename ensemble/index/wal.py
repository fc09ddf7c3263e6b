"""The post index's write-ahead log: every write, on disk before it is acknowledged.

A log file is a header (magic, base lsn) followed by records, one per write request:

    u32 payload length | u32 crc32 of (length, lsn, payload) | u64 sequence number (lsn) | payload
    payload = u32 n | u32 dim | u8 ops[n] (1 upsert, 2 delete) | int64 ids[n] | float32 vectors[upserts, dim]
              [| u32 length | features: UTF-8 JSON, a list of one object per upsert]

The features section is there when the writer was given each upserted post's features (what the
ranking stage reads of a post besides its vector, `feedserve.rank.features.feature_row`), so that a
post ingested after the build is ranked with its counts and tags, and they survive as its vector
does. A log of the version before it (FSWAL002, vectors only) is read as it is, and rewritten under
this version's header when a writer opens it: that version refuses a log this one wrote (by its
header), never reading its records as a torn tail to cut off.

A request that mixes upserts and deletes is one record with one lsn, so it is applied, replayed and
followed whole. Lsns count up by one from the base: a record out of sequence is damage.

`WriteAheadLog.append` writes a record and fsyncs before it returns its lsn: a write acknowledged
after `append` survives a crash of the process or the machine. After a failed append the log
refuses appends until it is reopened from what reached the disk, so an lsn is never reused.
A crash in the middle of `append` leaves a torn tail: bytes after the last whole record that no
valid record follows (a partial record, or zeros where the filesystem extended the file). Opening
the log truncates a torn tail with a warning; anything else that does not check out is damage,
refused with `LogError`, never dropped. A snapshot covering everything up to lsn L starts a new
log based at L; the records written meanwhile are carried over into it.

Nothing here executes or unpickles what it reads: the payload is lengths, flat numeric arrays and
JSON objects.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, BinaryIO, Generic, Protocol, TypeVar, overload

import numpy as np

from feedserve.errors import IndexStoreError
from feedserve.files import atomic_write, fsync_dir, temporary_file, temporary_path
from feedserve.schema import OP_DELETE, OP_UPSERT

logger = logging.getLogger(__name__)

MAGIC = b"FSWAL003"
READABLE = (b"FSWAL002", MAGIC)  # the version before wrote no features section
HEADER = struct.Struct("<8sQ")  # magic, base lsn (the snapshot this log continues)
RECORD = struct.Struct("<IIQ")  # payload length, crc32, lsn
BODY = struct.Struct("<II")  # n, dim
LENGTH = struct.Struct("<I")
MAX_PAYLOAD = 1 << 30


class LogError(IndexStoreError):
    """A log that is not a feedserve log, is damaged, or can take no more writes."""


class Op(IntEnum):
    UPSERT = OP_UPSERT
    DELETE = OP_DELETE


@dataclass(frozen=True)
class LogRecord:
    lsn: int
    ops: np.ndarray  # uint8 [n]
    ids: np.ndarray  # int64 [n]
    vectors: np.ndarray  # float32 [upserts, dim], the upsert rows in order
    end: int  # file offset just past this record
    features: list[dict[str, Any]] | None = None  # one per upsert row, in order; None: none were written

    @property
    def upserts(self) -> np.ndarray:
        return self.ids[self.ops == Op.UPSERT]

    @property
    def deletes(self) -> np.ndarray:
        return self.ids[self.ops == Op.DELETE]


class Record(Protocol):
    @property
    def lsn(self) -> int: ...

    @property
    def end(self) -> int: ...


R = TypeVar("R", bound=Record)


@dataclass(frozen=True)
class Codec(Generic[R]):
    """What a log's records hold: the magic its header carries (and those of older versions it still
    reads), and how a record's payload is read (None when it does not add up). The framing (header,
    lengths, checksums, lsns, torn tails) is the same for every log."""

    magic: bytes
    readable: tuple[bytes, ...]
    decode: Callable[[int, bytes, int], R | None]


def encode(
    ops: np.ndarray, ids: np.ndarray, vectors: np.ndarray | None, features: Sequence[Mapping[str, Any]] | None = None
) -> bytes:
    ops = np.ascontiguousarray(ops, dtype=np.uint8).reshape(-1)
    ids = np.ascontiguousarray(ids, dtype="<i8").reshape(-1)
    upserts = int((ops == Op.UPSERT).sum())
    vecs = np.zeros((0, 0), "<f4") if vectors is None else np.ascontiguousarray(vectors, dtype="<f4")
    if len(ops) != len(ids) or len(vecs) != upserts or not np.isin(ops, list(Op)).all():
        raise LogError(
            f"a write needs one op per id and one vector per upsert: {len(ops)} ops, {len(ids)} ids, "
            f"{len(vecs)} vectors for {upserts} upserts"
        )
    dim = vecs.shape[1] if upserts else 0
    body = BODY.pack(len(ids), dim) + ops.tobytes() + ids.tobytes() + vecs.tobytes()
    if features is None:
        return body
    if len(features) != upserts or not all(isinstance(f, Mapping) for f in features):
        raise LogError(f"a write's features are one object per upsert: {len(features)} for {upserts} upserts")
    text = json.dumps([dict(f) for f in features], separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()
    return body + LENGTH.pack(len(text)) + text


def _crc(length: int, lsn: int, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<IQ", length, lsn)))


def record_bytes(lsn: int, payload: bytes) -> bytes:
    return RECORD.pack(len(payload), _crc(len(payload), lsn, payload), lsn) + payload


def decode(lsn: int, payload: bytes, end: int) -> LogRecord | None:
    """The record, or None when the payload's lengths and ops do not add up."""
    if len(payload) < BODY.size:
        return None
    n, dim = BODY.unpack_from(payload)
    ops = np.frombuffer(payload, np.uint8, n, BODY.size) if len(payload) >= BODY.size + n else None
    if ops is None or not np.isin(ops, list(Op)).all():
        return None
    upserts = int((ops == Op.UPSERT).sum())
    size = BODY.size + 9 * n + 4 * upserts * dim
    features = None
    if len(payload) != size:
        if len(payload) < size + LENGTH.size:
            return None
        if len(payload) != size + LENGTH.size + LENGTH.unpack_from(payload, size)[0]:
            return None
        try:
            features = json.loads(payload[size + LENGTH.size :])
        except ValueError:  # UnicodeDecodeError included
            return None
        if not isinstance(features, list) or len(features) != upserts or not all(isinstance(f, dict) for f in features):
            return None
    ids = np.frombuffer(payload, "<i8", n, BODY.size + n).astype(np.int64)
    vectors = np.frombuffer(payload, "<f4", upserts * dim, BODY.size + 9 * n).astype(np.float32)
    return LogRecord(lsn, ops.copy(), ids, vectors.reshape(upserts, dim), end, features)


POSTS: Codec[LogRecord] = Codec(MAGIC, READABLE, decode)  # the post index's log


def read_header(f: BinaryIO, name: object = "log", codec: Codec[Any] = POSTS) -> int:
    """The base lsn of the log open as `f` (read from its start); LogError if it is not a log."""
    f.seek(0)
    head = f.read(HEADER.size)
    if len(head) < HEADER.size or head[:8] not in codec.readable:
        raise LogError(f"{name}: not a feedserve write-ahead log of this version (bad header)")
    return int(HEADER.unpack(head)[1])


@overload
def read_records(f: BinaryIO, offset: int = ...) -> Iterator[LogRecord]: ...


@overload
def read_records(f: BinaryIO, offset: int = ..., *, codec: Codec[R]) -> Iterator[R]: ...


def read_records(f: BinaryIO, offset: int = HEADER.size, *, codec: Codec[Any] = POSTS) -> Iterator[Any]:
    """Whole, intact records of the log open as `f`, from `offset` on; stops quietly at the first
    incomplete or invalid one (a reader following a live log may see an append in progress)."""
    return (record for _, record in read_framed(f, offset, codec))


def read_framed(f: BinaryIO, offset: int, codec: Codec[R]) -> Iterator[tuple[int, R]]:
    """`read_records` with each record's checksum: (crc, record)."""
    f.seek(offset)
    while True:
        head = f.read(RECORD.size)
        if len(head) < RECORD.size:
            return
        length, crc, lsn = RECORD.unpack(head)
        if length > MAX_PAYLOAD:
            return
        payload = f.read(length)
        if len(payload) < length or _crc(length, lsn, payload) != crc:
            return
        record = codec.decode(lsn, payload, offset + RECORD.size + length)
        if record is None:
            return
        offset = record.end
        yield crc, record


# How many of the latest records a follower keeps the checksums of, to tell a log that continues
# what it read from another history that reuses its lsns (`continues`).
CHECKED_RECORDS = 64


def remember(crcs: dict[int, int], lsn: int, crc: int) -> None:
    """Keep record `lsn`'s checksum among a reader's latest CHECKED_RECORDS (its lsns are consecutive)."""
    crcs[lsn] = crc
    crcs.pop(lsn - CHECKED_RECORDS, None)


def continues(f: BinaryIO, base: int, lsn: int, crcs: Mapping[int, int]) -> bool:
    """Whether the log open as `f`, based at `base`, continues what a reader that read up to `lsn`
    holds: based at it, or holding that very record, and every record of it the reader has the
    checksum of (`crcs`: lsn -> crc of its latest records; none when it came from a snapshot) the
    same. One based past it lacks the records between (the reader fell behind a snapshot); one that
    ends before it, or holds other records there, is another history (its writer lost the log it
    wrote them to and started anew): its lsns name other writes."""
    if base >= lsn:
        return base == lsn
    # Record heads alone, through a buffer: a log put back after a delete may hold many records.
    with open(f.fileno(), "rb", closefd=False) as buffered:
        buffered.seek(HEADER.size)
        while len(head := buffered.read(RECORD.size)) == RECORD.size:
            length, crc, at = RECORD.unpack(head)
            if length > MAX_PAYLOAD or at > lsn or crcs.get(at, crc) != crc:
                return False
            if at == lsn:
                return True
            buffered.seek(length, os.SEEK_CUR)
    return False


def scan(path: Path, codec: Codec[Any] = POSTS) -> tuple[int, int, int]:
    """(base lsn, last lsn, end of the last whole record) of a log, checking every record is the
    one after the last. LogError on damage: bad bytes that a valid record follows."""
    with open(path, "rb") as f:
        base = read_header(f, path, codec)
        last, end = base, HEADER.size
        for record in read_records(f, codec=codec):
            if record.lsn != last + 1:
                raise LogError(
                    f"{path}: record {record.lsn} at offset {end} follows {last}: the log is out of sequence"
                )
            last, end = record.lsn, record.end
        size = os.fstat(f.fileno()).st_size
        if size > end and _valid_record_in(f, end + 1, size, last, codec):
            raise LogError(
                f"{path}: the record at offset {end} (after lsn {last}) is damaged, and a valid record "
                f"follows it: that is damage, not a torn write; refusing to drop acknowledged writes"
            )
    return base, last, end


CHECK_BUDGET_TAILS = 64  # how many times over its tail's size a damaged log's tail is checksummed at most


def _valid_record_in(f: BinaryIO, start: int, size: int, after_lsn: int, codec: Codec[Any]) -> bool:
    """Whether a valid record with an lsn past `after_lsn` starts anywhere in [start, size): the lsn
    field is searched for at every byte offset (with numpy), and each candidate's checksum checked."""
    f.seek(start)
    tail = memoryview(f.read(size - start))
    most = after_lsn + 1 + len(tail) // (RECORD.size + BODY.size)  # no more records than fit (payloads >= 8 bytes)
    # Checksummed bytes, bounded: candidates crafted to each claim half the tail would checksum it
    # again at every one of them (time quadratic in the tail); past this the damage is refused as such.
    budget = CHECK_BUDGET_TAILS * len(tail) + MAX_PAYLOAD
    for shift in range(8):
        usable = (len(tail) - shift) // 8 * 8
        if usable <= 0:
            continue
        lsns = np.frombuffer(tail, "<u8", usable // 8, shift)
        for at in (np.flatnonzero((lsns > after_lsn) & (lsns <= most)) * 8 + shift - 8).tolist():
            if at < 0:
                continue
            length, crc, lsn = RECORD.unpack_from(tail, at)
            if at + RECORD.size + length > len(tail):
                continue
            budget -= length
            if budget < 0:
                raise LogError(
                    f"{f.name}: the bytes after lsn {after_lsn} hold more would-be records than a torn write "
                    "leaves: that is damage; refusing to drop what may be acknowledged writes"
                )
            payload = bytes(tail[at + RECORD.size : at + RECORD.size + length])
            if _crc(length, lsn, payload) == crc and codec.decode(lsn, payload, 0) is not None:
                return True
    return False


class WriteAheadLog:
    """The single writer's handle: appends are serialised by a lock and fsynced. `codec`: what its
    records hold (the post index's writes by default)."""

    def __init__(self, path: Path, base_lsn: int = 0, codec: Codec[Any] = POSTS) -> None:
        self.path, self.codec = Path(path), codec
        if not self.path.exists():
            _create(self.path, base_lsn, codec.magic)
        self.base_lsn, self.last_lsn, self.end = scan(self.path, codec)
        size = self.path.stat().st_size
        if size > self.end:
            whole = _whole_record_at(self.path, self.end, self.last_lsn + 1)
            logger.log(
                logging.ERROR if whole else logging.WARNING,
                "%s: truncating a torn tail of %d bytes after lsn %d (%s)",
                self.path,
                size - self.end,
                self.last_lsn,
                "a whole record of the next lsn whose checksum fails: a write cut off by a crash, never "
                "acknowledged, or, if it was acknowledged, damage on disk (restore from a backup to keep it)"
                if whole
                else "a write cut off by a crash, never acknowledged",
            )
        self._fd = os.open(self.path, os.O_RDWR)  # read too: a log unlinked under it is put back from it
        if size > self.end:
            os.ftruncate(self._fd, self.end)
            os.fsync(self._fd)
        self._lock = threading.Lock()
        self.failed: str | None = None  # why appends are refused, after a failure that could not be undone
        with open(self.path, "rb") as f:
            magic = f.read(len(codec.magic))
        if magic != codec.magic:
            # A log of the version before is rewritten under this version's header before any record
            # of this version joins it, so that the version before refuses it instead of cutting
            # records it cannot read off as a torn tail.
            logger.info("%s: rewriting a %s log as %s", self.path, magic.decode(errors="replace"), codec.magic.decode())
            self.restart(self.base_lsn, HEADER.size)

    def append(
        self,
        ops: np.ndarray,
        ids: np.ndarray,
        vectors: np.ndarray | None,
        features: Sequence[Mapping[str, Any]] | None = None,
    ) -> int:
        """Log a write to the post index (the default codec's records); its lsn."""
        return self.append_payload(encode(ops, ids, vectors, features))

    def append_payload(self, payload: bytes) -> int:
        """Log one record of this log's codec, durable when this returns; its lsn."""
        with self._lock:
            if self.failed:
                raise LogError(
                    f"{self.path}: refusing writes since an earlier one failed ({self.failed}); reopen the log"
                )
            self._relink()
            lsn = self.last_lsn + 1
            data = record_bytes(lsn, payload)
            try:
                _write_all(self._fd, data, self.end)
                os.fsync(self._fd)
            except OSError as err:
                # The record may be on disk, whole, and a follower may already have applied it: it
                # is not cut off and its lsn never handed out again. The log takes no more writes;
                # reopened, it holds whatever reached the disk (a whole record is then replayed).
                self.failed = f"write {lsn}: {err}"
                logger.error("%s: %s; refusing writes until the log is reopened", self.path, err)
                raise LogError(f"{self.path}: write {lsn} failed and was not acknowledged: {err}") from err
            self.end += len(data)
            self.last_lsn = lsn
            return lsn

    def restart(self, base_lsn: int, keep_from: int) -> None:
        """Start a new log based at `base_lsn` (a snapshot holds everything up to it) holding this
        log's records from offset `keep_from` on (those appended while the snapshot was written).
        The new file is complete, durable and open before it replaces this one: if making it fails,
        this log stays in place and in use; a failure after the rename refuses further writes."""
        with self._lock:
            self._replace(base_lsn, keep_from)

    def _relink(self) -> None:
        """Put the log back at its path, whole, when the path no longer names the file this handle
        writes (deleted by a cleanup job or an operator's rm, moved away by a log rotation): appends
        to it would be acknowledged and lost at the next open, which would start a log after the
        snapshot and hand out their lsns again."""
        if self._fd < 0:
            return
        mine = os.fstat(self._fd)
        try:
            there = os.stat(self.path)
            if (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
                return
        except FileNotFoundError:
            pass
        logger.warning(
            "%s was deleted or moved under its writer; putting it back (lsns %d..%d)",
            self.path,
            self.base_lsn + 1,
            self.last_lsn,
        )
        try:
            self._replace(self.base_lsn, HEADER.size)
        except OSError as err:
            raise LogError(
                f"{self.path} was deleted or moved under its writer and could not be put back: {err}"
            ) from err

    def _replace(self, base_lsn: int, keep_from: int) -> None:
        """`restart`, the lock held; the records kept are read from this handle, not from the path."""
        tail = _read_all(self._fd, keep_from, self.end - keep_from)
        with temporary_file(self.path) as f:
            f.write(HEADER.pack(self.codec.magic, base_lsn) + tail)
        tmp = temporary_path(self.path)
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.replace(tmp, self.path)
        except OSError:
            os.close(fd)
            raise
        old, self._fd = self._fd, fd  # from here on, appends go to the new log
        os.close(old)
        self.base_lsn, self.end = base_lsn, HEADER.size + len(tail)
        try:
            fsync_dir(self.path.parent)
        except OSError as err:
            self.failed = f"the new log's directory entry may not be durable: {err}"
            raise LogError(f"{self.path}: {self.failed}") from err

    def reader(self) -> BinaryIO:
        """The file this handle writes, to read (the path may name another by then); close it."""
        with self._lock:
            self._relink()
            return os.fdopen(os.dup(self._fd), "rb", buffering=0)

    def close(self) -> None:
        with self._lock:
            if self._fd < 0:
                return
            try:
                self._relink()
            except LogError as err:  # reported, not raised: the caller goes on releasing its locks
                logger.error("%s", err)
            os.close(self._fd)
            self._fd = -1


def _whole_record_at(path: Path, offset: int, lsn: int) -> bool:
    """Whether the bytes at `offset` frame a whole record of `lsn` (its checksum aside): a torn write
    leaves a part, or sectors out of order; a bit flipped on disk leaves it whole."""
    with open(path, "rb") as f:
        f.seek(offset)
        head = f.read(RECORD.size)
        if len(head) < RECORD.size:
            return False
        length, _, at = RECORD.unpack(head)
        return at == lsn and length <= MAX_PAYLOAD and os.fstat(f.fileno()).st_size >= offset + RECORD.size + length


def logged_lsn(path: Path, codec: Codec[Any] = POSTS) -> int:
    """The last lsn in a log (0 when there is none)."""
    return scan(path, codec)[1] if Path(path).exists() else 0


def _create(path: Path, base_lsn: int, magic: bytes) -> None:
    atomic_write(path, HEADER.pack(magic, base_lsn))


def _read_all(fd: int, offset: int, size: int) -> bytes:
    chunks = []
    while size > 0:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            raise LogError(f"the log ends {size} bytes before its last record")
        chunks.append(chunk)
        offset, size = offset + len(chunk), size - len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
