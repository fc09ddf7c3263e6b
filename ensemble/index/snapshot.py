"""The index's snapshot file: one `.npz` of ids, vectors, metadata as JSON text and, where the
live writes carried them, the posts' features (what the ranker reads of a post besides its vector)
as JSON text.

Written atomically and durably (feedserve.files), read with `allow_pickle=False`, so loading an
index never executes code. The file carries the SHA-256 of its contents in its own metadata:
it is rewritten while the server runs, so its checksum cannot live in the artifact manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from feedserve.errors import IndexStoreError
from feedserve.files import atomic_file

logger = logging.getLogger(__name__)

FORMAT = "feedserve.index/1"
# Keys the file format owns; the rest of the metadata belongs to the index (lsn, generation, ...).
OWN_KEYS = ("format", "dim", "count", "sha256")


# A post's features: a JSON object, or its (key, value) pairs (as the index holds them); by post id,
# a post without any absent.
Row = Mapping[str, Any] | tuple[tuple[str, Any], ...]
Features = Mapping[int, Row]


def arrays_checksum(ids: np.ndarray, vectors: np.ndarray, features: bytes = b"") -> str:
    """SHA-256 over the ids and vectors as saved (int64, float32, C order), then the features' JSON
    text (none: the checksum of the files saved before features were): an index file is rewritten
    while the server runs, so its checksum travels inside it instead of in the artifact manifest."""
    h = hashlib.sha256(np.ascontiguousarray(ids, np.int64).data)  # hashed through the buffer: no copy
    h.update(np.ascontiguousarray(vectors, np.float32).data)
    h.update(features)
    return h.hexdigest()


def save_arrays(
    path: Path, ids: np.ndarray, vectors: np.ndarray, meta: dict[str, object], features: Features | None = None
) -> None:
    """Write an index file atomically and durably: readers see the old file or the new one, and a
    failed write (a full disk) leaves the previous file and no temporary."""
    ids, vectors = np.ascontiguousarray(ids, np.int64), np.ascontiguousarray(vectors, np.float32)
    rows = sorted((int(p), dict(f)) for p, f in (features or {}).items())
    text = json.dumps(rows, separators=(",", ":"), allow_nan=False).encode() if rows else b""
    header = json.dumps(
        {
            **meta,
            "format": FORMAT,
            "dim": int(vectors.shape[1]),
            "count": len(ids),
            "sha256": arrays_checksum(ids, vectors, text),
        }
    )
    with atomic_file(path) as f:
        extra = {"features": np.frombuffer(text, np.uint8)} if text else {}  # bytes: a str array is UTF-32
        np.savez(f, ids=ids, vectors=vectors, meta=np.array(header), **extra)
    logger.info("saved %d posts (dim %d) to %s", len(ids), vectors.shape[1], path)


def load_arrays(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any], dict[int, dict[str, Any]]]:
    """(ids, vectors, the index's own metadata, the posts' features) of an index file, checked
    against its checksum; IndexStoreError names the file and what is wrong with it."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            ids, vectors = data["ids"], data["vectors"]
            text = data["features"].tobytes() if "features" in data.files else b""
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise IndexStoreError(f"cannot read index {path}: {err}") from err
    if meta.get("format") != FORMAT:
        raise IndexStoreError(f"{path}: unknown index format {meta.get('format')!r}")
    if vectors.ndim != 2 or len(ids) != len(vectors) or vectors.shape[1] != meta["dim"]:
        raise IndexStoreError(f"{path}: ids {ids.shape} and vectors {vectors.shape} do not match")
    if "sha256" not in meta:  # saved before checksums existed: the zip's CRCs still guard it
        logger.warning("%s has no checksum (an older feedserve saved it); the next snapshot adds one", path)
    elif meta["sha256"] != arrays_checksum(ids, vectors, text):
        raise IndexStoreError(
            f"{path}: ids, vectors and features do not match the checksum saved with them (corrupted or "
            'written by another program); restore a backup of the snapshot (README, "Backups '
            'and restore"), or rebuild with `feedserve index` (live writes since are lost)'
        )
    try:
        rows = json.loads(text) if text else []
        features = {int(p): dict(f) for p, f in rows}
    except (ValueError, TypeError) as err:  # checksummed: only another program writes this
        raise IndexStoreError(f"{path}: the posts' features are not [[id, {{...}}], ...]: {err}") from err
    return ids, vectors, meta, features


def read_meta(path: Path) -> dict[str, object]:
    """An index file's metadata, without reading its vectors."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return dict(json.loads(str(data["meta"])))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise IndexStoreError(f"cannot read index {path}: {err}") from err
