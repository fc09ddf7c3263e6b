"""The index's snapshot file: one `.npz` of ids, vectors, metadata as JSON text and, where the
live writes carried them, the posts' features (what the ranker reads of a post besides its vector).

Features in the shape the ingester writes them (`feedserve.rank.features.feature_row`: exactly
`percentiles`, floats of one width, then `tags`, strings) are stored as columns: the posts' ids, a
float64 matrix of their percentiles, and their tags as runs of ids into a vocabulary (JSON text),
the layout the index holds them in (feedserve.index.features): saving and reading them back are
passes over arrays rather than a JSON object per post, the cost that dominated opening and
snapshotting an index of a million posts with features (benchmarks/reports/index_features.md).
Any other row is kept as JSON text, as it came. A file of the version before (features as JSON
text alone) is read as it is.

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
from feedserve.index.features import COLUMNS, FeatureRows

logger = logging.getLogger(__name__)

FORMAT = "feedserve.index/2"
READABLE = ("feedserve.index/1", FORMAT)  # the version before held every post's features as JSON text
# Keys the file format owns; the rest of the metadata belongs to the index (lsn, generation, ...).
OWN_KEYS = ("format", "dim", "count", "sha256")


def arrays_checksum(
    ids: np.ndarray, vectors: np.ndarray, features: bytes = b"", columns: Mapping[str, np.ndarray] | None = None
) -> str:
    """SHA-256 over the ids and vectors as saved (int64, float32, C order), the features' JSON text
    (none: the checksum of the files saved before features were), then each feature column's name,
    dtype, shape and bytes (the same bytes read as another dtype or shape are another column): an
    index file is rewritten while the server runs, so its checksum travels inside it instead of in
    the artifact manifest."""
    h = hashlib.sha256(np.ascontiguousarray(ids, np.int64).data)  # hashed through the buffer: no copy
    h.update(np.ascontiguousarray(vectors, np.float32).data)
    h.update(features)
    for name, column in sorted((columns or {}).items()):
        h.update(f"{name}:{column.dtype.str}:{list(column.shape)}".encode())
        h.update(np.ascontiguousarray(column).data)
    return h.hexdigest()


def save_arrays(
    path: Path, ids: np.ndarray, vectors: np.ndarray, meta: dict[str, object], features: FeatureRows | None = None
) -> None:
    """Write an index file atomically and durably: readers see the old file or the new one, and a
    failed write (a full disk) leaves the previous file and no temporary."""
    ids, vectors = np.ascontiguousarray(ids, np.int64), np.ascontiguousarray(vectors, np.float32)
    columns = features.columns() if features is not None else {}
    others = sorted((int(p), dict(row)) for p, row in features.others.items()) if features is not None else []
    text = json.dumps(others, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode() if others else b""
    extra = {**columns, **({"features": np.frombuffer(text, np.uint8)} if text else {})}  # bytes: a str array is UTF-32
    header = json.dumps(
        {
            **meta,
            # A file without columns is one the version before reads: a server rolled back opens it.
            "format": FORMAT if columns else READABLE[0],
            "dim": int(vectors.shape[1]),
            "count": len(ids),
            "sha256": arrays_checksum(ids, vectors, text, columns),
        }
    )
    with atomic_file(path) as f:
        np.savez(f, ids=ids, vectors=vectors, meta=np.array(header), **extra)
    logger.info("saved %d posts (dim %d) to %s", len(ids), vectors.shape[1], path)


def load_arrays(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any], FeatureRows]:
    """(ids, vectors, the index's own metadata, the posts' features) of an index file, checked
    against its checksum; IndexStoreError names the file and what is wrong with it."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            ids, vectors = data["ids"], data["vectors"]
            sections = {k: data[k] for k in (*COLUMNS, "features") if k in data.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise IndexStoreError(f"cannot read index {path}: {err}") from err
    _check_meta(path, meta)
    if meta.get("format") not in READABLE:
        raise IndexStoreError(f"{path}: unknown index format {meta.get('format')!r}")
    if vectors.ndim != 2 or len(ids) != len(vectors) or vectors.shape[1] != meta["dim"]:
        raise IndexStoreError(f"{path}: ids {ids.shape} and vectors {vectors.shape} do not match")
    text = sections["features"].tobytes() if "features" in sections else b""
    columns = {k: sections[k] for k in COLUMNS if k in sections}
    if "sha256" not in meta:  # saved before checksums existed: the zip's CRCs still guard it
        logger.warning("%s has no checksum (an older feedserve saved it); the next snapshot adds one", path)
    elif meta["sha256"] != arrays_checksum(ids, vectors, text, columns):
        raise IndexStoreError(
            f"{path}: ids, vectors and features do not match the checksum saved with them (corrupted or "
            'written by another program); restore a backup of the snapshot (README, "Backups '
            'and restore"), or rebuild with `feedserve index` (live writes since are lost)'
        )
    try:
        rows = {int(p): dict(f) for p, f in json.loads(text)} if text else {}
        # A file of format 1 held every row as JSON: those of feature_row's shape go in the columns now.
        features = FeatureRows.from_columns(columns, rows) if columns else FeatureRows.from_rows(rows)
    except (ValueError, TypeError, KeyError, IndexError) as err:  # checksummed: only another program writes this
        raise IndexStoreError(f"{path}: the posts' features do not read back: {err}") from err
    return ids, vectors, meta, features


def read_meta(path: Path) -> dict[str, object]:
    """An index file's metadata, without reading its vectors."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise IndexStoreError(f"cannot read index {path}: {err}") from err
    _check_meta(path, meta)
    return dict(meta)


def _check_meta(path: Path, meta: Any) -> None:
    """IndexStoreError unless the metadata is an object whose dim (and lsn, where held) are integers:
    the metadata is outside the checksum, and a damaged one must not surface as a KeyError."""
    if not isinstance(meta, dict):
        raise IndexStoreError(f"{path}: its metadata is not a JSON object")
    meta_count(path, meta, "dim", None)
    meta_count(path, meta, "lsn", 0)


def meta_count(path: Path, meta: dict[str, Any], name: str, default: int | None) -> int:
    """A snapshot metadata's `name` (`default` where it is absent): an integer >= 0, else
    IndexStoreError naming the file (the engagement snapshot's metadata is checked the same way)."""
    value = meta.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise IndexStoreError(f"{path}: its metadata's {name} is {value!r}, not a non-negative integer")
    return value
