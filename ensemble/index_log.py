"""The post index's write-ahead log: every upsert and delete, on disk before it is acknowledged.

A log file is a header (magic, base lsn) followed by records:

    u32 payload length | u32 crc32 of the payload | u64 sequence number (lsn) | payload
    payload = u8 op (1 upsert, 2 delete) | u32 n | u32 dim | int64 ids[n] | float32 vectors[n, dim]

`append` writes a record, flushes and fsyncs before it returns its lsn: a write acknowledged after
`append` survives a crash of the process or the machine. A crash in the middle of `append` leaves a
torn tail (a partial header or payload, or a checksum that does not match); `WriteAheadLog` opens
such a file by truncating it to the last whole record, with a warning. Records are read back with
`read_records`, from the start or from the offset where a reader stopped (readers that follow the
log use it). A snapshot covering everything up to lsn L starts a new log whose base is L (lsns keep
counting up from there): a follower that sees a new base reloads the snapshot instead of reading on.

Nothing here executes or unpickles what it reads: the payload is lengths and flat numeric arrays.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

MAGIC = b"FSWAL001"
HEADER = struct.Struct("<8sQ")  # magic, base lsn (the snapshot this log continues)
RECORD = struct.Struct("<IIQ")  # payload length, crc32, lsn
BODY = struct.Struct("<BII")  # op, n, dim
MAX_PAYLOAD = 1 << 30  # a length beyond this is a torn or corrupt header, not a record


class LogError(ValueError):
    """A log file that is not a feedserve log (wrong magic) or cannot be read at all."""


class Op(IntEnum):
    UPSERT = 1
    DELETE = 2


@dataclass(frozen=True)
class Record:
    lsn: int
    op: Op
    ids: np.ndarray  # int64 [n]
    vectors: np.ndarray  # float32 [n, dim]; [n, 0] for a delete
    end: int  # file offset just past this record


def encode(op: Op, ids: np.ndarray, vectors: np.ndarray | None) -> bytes:
    ids = np.ascontiguousarray(ids, dtype="<i8").reshape(-1)
    vecs = np.zeros((len(ids), 0), "<f4") if vectors is None else np.ascontiguousarray(vectors, dtype="<f4")
    return BODY.pack(int(op), len(ids), vecs.shape[1]) + ids.tobytes() + vecs.tobytes()


def decode(payload: bytes) -> tuple[Op, np.ndarray, np.ndarray]:
    op, n, dim = BODY.unpack_from(payload)
    ids = np.frombuffer(payload, "<i8", n, BODY.size).astype(np.int64)
    vectors = np.frombuffer(payload, "<f4", n * dim, BODY.size + 8 * n).astype(np.float32).reshape(n, dim)
    return Op(op), ids, vectors


def read_header(path: Path) -> int:
    """The log's base lsn; LogError if the file is not a log."""
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size or head[:8] != MAGIC:
        raise LogError(f"{path}: not a feedserve write-ahead log (bad header)")
    return int(HEADER.unpack(head)[1])


def read_records(path: Path, offset: int = HEADER.size) -> Iterator[Record]:
    """Whole, intact records from `offset` on; stops quietly at the first torn or corrupt one."""
    with open(path, "rb") as f:
        f.seek(offset)
        while True:
            head = f.read(RECORD.size)
            if len(head) < RECORD.size:
                return
            length, crc, lsn = RECORD.unpack(head)
            if length > MAX_PAYLOAD:
                return
            payload = f.read(length)
            if len(payload) < length or zlib.crc32(payload) != crc:
                return
            offset += RECORD.size + length
            op, ids, vectors = decode(payload)
            yield Record(lsn, op, ids, vectors, offset)


class WriteAheadLog:
    """The single writer's handle: appends are serialised by a lock and fsynced."""

    def __init__(self, path: Path, base_lsn: int = 0) -> None:
        self.path = Path(path)
        if not self.path.exists() or self.path.stat().st_size == 0:
            self._create(self.path, base_lsn)
        self.base_lsn = read_header(self.path)
        last, end = self.base_lsn, HEADER.size
        for record in read_records(self.path):
            last, end = record.lsn, record.end
        size = self.path.stat().st_size
        if size > end and not _torn(self.path, end, size):
            raise LogError(f"{self.path}: the record at offset {end} (after lsn {last}) is corrupt but is followed by "
                           f"{size - end} more bytes: that is damage, not a torn write; refusing to drop acknowledged writes")
        if size > end:
            logger.warning("%s: truncating a torn tail of %d bytes after lsn %d (a write that was never acknowledged)",
                           self.path, size - end, last)
            with open(self.path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        self.last_lsn = last
        self._file = open(self.path, "ab")
        self._lock = threading.Lock()

    @staticmethod
    def _create(path: Path, base_lsn: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(HEADER.pack(MAGIC, base_lsn))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)

    def append(self, op: Op, ids: np.ndarray, vectors: np.ndarray | None = None) -> int:
        payload = encode(op, ids, vectors)
        with self._lock:
            lsn = self.last_lsn + 1
            self._file.write(RECORD.pack(len(payload), zlib.crc32(payload), lsn) + payload)
            self._file.flush()
            os.fsync(self._file.fileno())
            self.last_lsn = lsn
            return lsn

    def restart(self) -> None:
        """Start an empty log based at the last lsn, once a snapshot holds everything up to it."""
        with self._lock:
            self._file.close()
            self._create(self.path, self.last_lsn)
            self.base_lsn = self.last_lsn
            self._file = open(self.path, "ab")

    def close(self) -> None:
        self._file.close()


def _torn(path: Path, offset: int, size: int) -> bool:
    """Whether the bad bytes at `offset` can be the last record cut short by a crash: its header
    is incomplete, or the payload it announces does not fit in, or runs exactly to, the file's end."""
    if size - offset < RECORD.size:
        return True
    with open(path, "rb") as f:
        f.seek(offset)
        length, _, _ = RECORD.unpack(f.read(RECORD.size))
    return length > MAX_PAYLOAD or offset + RECORD.size + length >= size


def fsync_dir(directory: Path) -> None:
    # A rename is durable only once the directory entry is.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
