"""The post store: an exhaustive inner-product index over post embeddings, keyed by int64 post id.

Embeddings are L2-normalised, so inner product is cosine similarity. The index is exact (a faiss
`IndexFlatIP`): at the sizes served here an exhaustive scan is fast and gives perfect recall, which
is also what the system we reproduce runs on GPU. This store is the store of record; searches can
run on it (faiss-cpu memory, one BLAS matmul) or on a GPU engine's copy (feedserve.index.engines).
On disk it is a snapshot file (feedserve.index.snapshot). Beside each vector it may hold the post's
features (what the ranker reads of it besides the vector: count percentiles and tags, as columns
by row: feedserve.index.features), written with the post by the live writer and replaced or
dropped with it, so that a post ingested after the build is ranked as it was described.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import repeat
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from feedserve.errors import IndexStoreError
from feedserve.index.engines import DeviceCopy, Engine, RowWrite, device_copy
from feedserve.index.features import FeatureColumns, FeatureRows, positions_of
from feedserve.index.snapshot import OWN_KEYS, load_arrays, save_arrays
from feedserve.schema import NO_ID

logger = logging.getLogger(__name__)

SCORE_BUDGET = 1 << 26  # floats of query x post scores computed at once (256 MiB)
# Stored vectors are unit length (inner product = cosine): any other norm would rank a post by its
# length, not its content (a vector of 3e38s would come first for every member). float32 rounding
# of an L2-normalised vector is far inside this.
NORM_TOLERANCE = 1e-3


def off_unit(vectors: np.ndarray) -> tuple[int, float] | None:
    """(row, its L2 norm) of a row that is not unit length within NORM_TOLERANCE (a non-finite one
    first: NaN compares false with the tolerance and would pass), None when every row is."""
    norms = np.linalg.norm(np.asarray(vectors, np.float64), axis=1)
    if not np.isfinite(norms).all():
        row = int(np.flatnonzero(~np.isfinite(norms))[0])
        return row, float(norms[row])
    if len(norms) and (off := np.abs(norms - 1.0)).max() > NORM_TOLERANCE:
        row = int(off.argmax())
        return row, float(norms[row])
    return None


def check_unit(vectors: np.ndarray) -> None:
    """IndexStoreError unless every row is unit length within NORM_TOLERANCE (live writes are checked:
    the store takes what a snapshot or a rebuild from the encoder holds as it is)."""
    if (bad := off_unit(vectors)) is None:
        return
    row, norm = bad
    if not np.isfinite(norm):
        raise IndexStoreError(f"vectors must be finite: row {row} has NaN or inf")
    raise IndexStoreError(f"vectors must be unit length (L2 norm 1 +- {NORM_TOLERANCE}): row {row} has norm {norm:.6g}")


@dataclass
class SearchResult:
    ids: np.ndarray  # int64 [n], n <= k
    scores: np.ndarray  # float32 [n]


class PostIndex:
    """Thread-safe: faiss must not search while it is being written, so one lock guards both.

    The vectors are rows of a faiss `IndexFlatIP`; `_ids` names each row's post and `_rows` finds a
    post's row. A write costs O(posts written), whatever the index size: a replaced post is
    overwritten in its row, a new one appended, and a deleted row is filled by the last row
    (swap-remove). faiss's own `remove_ids` would compact every row behind the first one removed,
    O(index) on the path of the next search. The map costs Python objects per post (its size is in
    benchmarks/reports/index_writes.md).
    """

    def __init__(self, dim: int, meta: dict[str, object] | None = None, engine: Engine = Engine()) -> None:
        if dim <= 0:
            raise IndexStoreError(f"index dimension must be positive, got {dim}")
        self.dim = dim
        self.meta: dict[str, Any] = dict(meta or {})
        self.engine = engine
        self._flat = faiss.IndexFlatIP(dim)
        self._ids = np.empty(0, np.int64)  # row -> post id; spare capacity past len(self)
        self._rows: dict[int, int] = {}  # post id -> row
        self._features = FeatureColumns()  # by row, as the vectors
        self._lock = threading.Lock()
        self._device: DeviceCopy | None = None  # a GPU engine's copy; None until a search needs it

    def __len__(self) -> int:
        return int(self._flat.ntotal)

    def check_write(self, ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The write as contiguous int64 ids and float32 vectors, or IndexStoreError naming what is wrong
        (a durable index checks before it logs, so a logged write always applies)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise IndexStoreError(f"vectors must have shape [n, {self.dim}], got {list(vectors.shape)}")
        if len(ids) != len(vectors):
            raise IndexStoreError(f"{len(ids)} ids for {len(vectors)} vectors")
        if len(np.unique(ids)) != len(ids):
            raise IndexStoreError("duplicate post ids in one write")
        if (ids == NO_ID).any():
            raise IndexStoreError(f"post id {NO_ID} is reserved (it pads results)")
        if not np.isfinite(vectors).all():
            raise IndexStoreError("vectors contain NaN or inf")
        return ids, vectors

    def upsert(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add posts; a post id already present gets its vector replaced."""
        self.write(ids, vectors, np.empty(0, np.int64))

    def delete(self, ids: np.ndarray) -> int:
        return self.write(np.empty(0, np.int64), None, ids)

    def write(
        self,
        upsert_ids: np.ndarray,
        vectors: np.ndarray | None,
        delete_ids: np.ndarray,
        features: Sequence[Mapping[str, Any]] | None = None,
    ) -> int:
        """Upserts and deletes under one lock hold, so a search sees all of them or none; returns how
        many posts the deletes removed. `features` has one row per upsert (None: none); a post written
        again is replaced, features and all (an empty row or none: it has none)."""
        if len(upsert_ids):
            upsert_ids, vectors = self.check_write(
                upsert_ids, vectors if vectors is not None else np.empty((0, self.dim))
            )
        if features is not None and len(features) != len(upsert_ids):
            raise IndexStoreError(f"expected {len(upsert_ids)} feature rows, got {len(features)}")
        delete_ids = np.asarray(delete_ids, dtype=np.int64).reshape(-1)
        with self._lock:
            try:
                op, removed = self._write_store(upsert_ids, vectors, delete_ids, features)
            except BaseException:
                self._device = None  # the store may hold part of this write: the copy must not differ from it
                raise
            self._write_device(op)
            return removed

    def _write_store(
        self,
        upsert_ids: np.ndarray,
        vectors: np.ndarray | None,
        delete_ids: np.ndarray,
        features: Sequence[Mapping[str, Any]] | None = None,
    ) -> tuple[RowWrite, int]:
        """The write on the store's rows: (what was done to them, how many posts the deletes removed)."""
        if not len(upsert_ids) or vectors is None:
            vectors = np.empty((0, self.dim), np.float32)
        at = self._rows_of(upsert_ids) if self._rows else np.full(len(upsert_ids), -1, np.int64)
        new = at < 0
        rows, replaced = at[~new], vectors[~new]
        if len(rows):
            self._vectors()[rows] = replaced
        # All new (a bulk load): appended without a copy of the vectors.
        new_ids, new_vectors = (upsert_ids, vectors) if new.all() else (upsert_ids[new], vectors[new])
        at[new] = np.arange(len(self), len(self) + len(new_ids))
        if len(new_ids):
            self._append(new_ids, new_vectors)
        self._features.write(at, upsert_ids, features)  # before the deletes move rows
        size = len(self)
        holes, movers = self._remove(delete_ids)
        return RowWrite(rows, replaced, new_ids, new_vectors, holes, movers, len(self)), size - len(self)

    def _vectors(self) -> np.ndarray:
        """faiss's rows as a writable [n, dim] view (no copy); valid until the next append."""
        n = len(self)
        return faiss.rev_swig_ptr(self._flat.get_xb(), n * self.dim).reshape(n, self.dim)

    def _append(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        n, m = len(self), len(ids)
        if n + m > len(self._ids):
            grown = np.empty(max(n + m, 2 * len(self._ids)), np.int64)
            grown[:n] = self._ids[:n]
            self._ids = grown
        self._flat.add(vectors)
        self._ids[n : n + m] = ids
        self._rows.update(zip(ids.tolist(), range(n, n + m), strict=True))

    def _remove(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Swap-remove: each removed row below the new end takes one of the kept rows past it;
        returns (holes, movers): rows filled and the rows they were filled from."""
        posts = ids.tolist()
        rows = np.array([self._rows.pop(i, -1) for i in posts], np.int64)  # an id twice pops once
        rows = rows[rows >= 0]
        if not len(rows):
            return rows, rows
        n = len(self)
        end = n - len(rows)
        holes = np.sort(rows[rows < end])
        tail = np.arange(end, n)
        movers = tail[~np.isin(tail, rows)]
        vectors = self._vectors()
        vectors[holes] = vectors[movers]
        self._ids[holes] = self._ids[movers]
        self._rows.update(zip(self._ids[holes].tolist(), holes.tolist(), strict=True))
        # Public fields of faiss's flat index: its rows are `codes` (code_size bytes each) and `ntotal`.
        self._flat.codes.resize(end * self._flat.code_size)
        self._flat.ntotal = end
        self._features.remove(posts, rows, holes, movers, end)
        return holes, movers

    def _write_device(self, op: RowWrite) -> None:
        """The device copy follows the store, or is dropped for the next search to rebuild: the write
        itself has landed in the store of record, so a device failure (out of memory) must not fail it."""
        if self._device is None:
            return
        try:
            if not self._device.write(op):
                self._device = None
        except Exception:
            logger.exception(
                "kNN %s: could not apply a write to the device copy; rebuilding it on the next search", self.engine.kind
            )
            self._device = None

    def _search(self, queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, post ids) [n, depth]; the lock is held."""
        if self.engine.kind == "faiss":
            return self._blas_search(queries, depth)
        if self._device is None:  # built from the store's own memory: the engine copies it once
            self._device = device_copy(self.engine, self._ids[: len(self)], self._vectors())
        return self._device.search(queries, depth)

    def _blas_search(self, queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-`depth` over faiss's own storage, viewed without a copy, by one BLAS matmul and a
        partial sort. faiss-cpu scans a single query on one thread; the matmul reads the vectors
        with every core (the same ids; benchmarks/reports/peers.md compares them). Queries go in
        chunks so that the score matrix stays within SCORE_BUDGET floats."""
        vectors, ids = self._vectors(), self._ids[: len(self)]
        n = len(ids)
        step = max(1, SCORE_BUDGET // n)
        scores_out, ids_out = [], []
        for start in range(0, len(queries), step):
            scores = queries[start : start + step] @ vectors.T
            top = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
            top_scores = np.take_along_axis(scores, top, axis=1)
            order = np.argsort(-top_scores, axis=1, kind="stable")
            scores_out.append(np.take_along_axis(top_scores, order, axis=1))
            ids_out.append(ids[np.take_along_axis(top, order, axis=1)])
        return np.concatenate(scores_out), np.concatenate(ids_out)

    def search(
        self, queries: np.ndarray, ks: Sequence[int], exclude: Sequence[np.ndarray] | None = None
    ) -> list[SearchResult]:
        """Top-k per query row, skipping that row's excluded ids (NO_ID entries are padding)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n = len(queries)
        excl = [np.asarray(e, dtype=np.int64) for e in exclude] if exclude is not None else [np.empty(0, np.int64)] * n
        excl = [e[e != NO_ID] for e in excl]
        with self._lock:
            total = len(self)
            if total == 0 or n == 0:
                return [SearchResult(np.empty(0, np.int64), np.empty(0, np.float32)) for _ in range(n)]
            # One search for the whole batch, deep enough that every row still has k after its own
            # exclusions (not the batch's largest k plus its widest exclusion list).
            depth = min(total, max(k + len(e) for k, e in zip(ks, excl, strict=True)))
            scores, ids = self._search(queries, depth)
        results = []
        for row, (k, e) in enumerate(zip(ks, excl, strict=True)):
            keep = ids[row] != NO_ID
            if len(e):
                keep &= ~np.isin(ids[row], e)
            row_ids, row_scores = ids[row][keep][:k], scores[row][keep][:k]
            results.append(SearchResult(row_ids.astype(np.int64), row_scores.astype(np.float32)))
        return results

    def lookup(self, post_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vectors float32 [n, dim], found bool [n]) of these posts; a row of zeros where a post is not
        in the index (the ranker reads history and candidates by id, and ranks unknown ones too)."""
        ids = np.asarray(post_ids, np.int64).reshape(-1)
        with self._lock:
            vectors, rows = self._lookup(ids)
        return vectors, rows >= 0

    def lookup_rows(self, post_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, FeatureRows]:
        """lookup, and the features of the posts held that have any, as of one moment."""
        ids = np.asarray(post_ids, np.int64).reshape(-1)
        with self._lock:
            vectors, rows = self._lookup(ids)
            found = rows >= 0
            return vectors, found, self._features.take(rows[found], ids[found])

    def _lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, each post's row or -1)."""
        out = np.zeros((len(ids), self.dim), np.float32)
        rows = self._rows_of(ids)
        found = rows >= 0
        if found.any():
            out[found] = self._vectors()[rows[found]]
        return out, rows

    def _rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Each post's row, -1 where it is not held. `map` over the dict's bound `get` loops in C; a
        search in a sorted id array, which every write would have to keep sorted, is faster only
        while the array stays in cache (benchmarks/reports/index_features.md)."""
        posts = ids.tolist()
        return np.fromiter(map(self._rows.get, posts, repeat(-1, len(posts))), np.int64, len(posts))

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) currently in the index."""
        with self._lock:
            return self._snapshot()

    def features(self) -> FeatureRows:
        """The features of every post that has any, copied out (the writer takes this under its
        lock, which holds its writes back meanwhile)."""
        with self._lock:
            return self._all_features()

    def _all_features(self) -> FeatureRows:
        n = len(self)
        return self._features.take(np.arange(n), self._ids[:n])

    def _snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        vectors = self._flat.reconstruct_n(0, n) if n else np.empty((0, self.dim), np.float32)
        return self._ids[:n].copy(), vectors

    def save(self, path: Path) -> None:
        with self._lock:  # the vectors and the features of one moment
            (ids, vectors), features = self._snapshot(), self._all_features()
        save_arrays(path, ids, vectors, self.meta, features)

    @classmethod
    def load(cls, path: Path, engine: Engine = Engine()) -> PostIndex:
        ids, vectors, meta, features = load_arrays(path)
        index = cls(int(meta["dim"]), {k: v for k, v in meta.items() if k not in OWN_KEYS}, engine)
        if len(ids):
            index.upsert(ids, vectors)
        # The store's rows are the file's order (its ids are unique: a write refuses duplicates).
        held = {p: r for p, r in features.others.items() if p in index._rows}
        index._features.load(positions_of(features.ids, ids), replace(features, others=held))
        logger.info("loaded %d posts (dim %d) from %s", len(index), index.dim, path)
        return index
