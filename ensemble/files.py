"""Writing and identifying files: the one home for the basics every artifact writer needs.

Every artifact (index snapshots, write-ahead logs, manifests, buckets, TensorRT plans, the
ingester's committed offsets, caches) is written the same way: a complete temporary file beside the
target, fsynced, renamed over the target, and the directory fsynced. A reader then sees the old file
or the new one, never half of one, and a power cut after the rename cannot bring the old one back.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, NamedTuple

HASH_CHUNK = 1 << 20
# The exporters' scratch directories beside the artifacts they write (the graphs are large, and a
# rename across file systems is a copy); a build killed mid-export leaves one, which the next removes.
EXPORT_TMP_PREFIX = ".export-"


def remove_stale_exports(directory: Path) -> None:
    """Remove the scratch directories a killed export left in `directory` (the caller holds it)."""
    for stale in Path(directory).glob(f"{EXPORT_TMP_PREFIX}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def fsync_dir(directory: Path) -> None:
    """Make the directory's entries durable: a rename is durable only once its directory is."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_path(path: Path) -> Path:
    """Where a file bound for `path` is written first (same directory, so the rename is atomic)."""
    return path.with_name(path.name + ".tmp")


@contextmanager
def temporary_file(path: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """A complete, fsynced file beside `path`, for the caller to rename onto it (`atomic_file` does
    both); removed again if writing it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write `path` through a temporary file: on a clean exit the file is fsynced and renamed over
    `path` and the directory fsynced; on an error (a full disk) the previous file stays and the
    temporary is removed."""
    path = Path(path)
    with temporary_file(path, mode) as f:
        yield f
    tmp = temporary_path(path)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def publish(staged: Path, path: Path) -> None:
    """Move a complete file, written and checked elsewhere on `path`'s filesystem (an export's
    scratch directory), onto `path` durably: the file fsynced, renamed, the directory fsynced."""
    fd = os.open(staged, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(staged, path)
    fsync_dir(Path(path).parent)


def atomic_write(path: Path, data: bytes | str) -> None:
    """`path` holds `data` (text as UTF-8), durably, or keeps what it held."""
    with atomic_file(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def hash_file(h: Any, path: Path) -> None:
    """Feed a file's bytes to a running hash (hashlib object), in chunks."""
    with open(path, "rb") as f:
        while block := f.read(HASH_CHUNK):
            h.update(block)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    hash_file(h, path)
    return h.hexdigest()


class FileIdentity(NamedTuple):
    """Which file is at a path now. Files are replaced by rename, so a new file has a new inode;
    mtime and size catch a file rewritten in place."""

    inode: int
    mtime_ns: int
    size: int


def file_identity(path: Path) -> FileIdentity | None:
    """The identity of the file at `path`, or None when there is none."""
    try:
        st = Path(path).stat()
    except FileNotFoundError:
        return None
    return FileIdentity(st.st_ino, st.st_mtime_ns, st.st_size)
