"""The `index_write` model: the live index's single writer (one instance; see feedserve.index.live).

Each request's upserts and deletes are checked, appended to the write-ahead log as one record and
fsynced, then applied; its LSN output comes back only after that, so an acknowledged write survives
a crash. The `knn` instances follow the same log and see the write in their next batch. A bad
request (an unknown op, a wrong dimension, NaN, a duplicate id) fails alone. Every `snapshot_every`
writes a snapshot is taken on a background thread (writes go on meanwhile) and the log restarted.
A rebuilt index from the batch client is picked up before the next write. A log that failed in a
way it could not undo (a disk error) is reopened from what is on disk before the next write.

With the `milvus` index (parameter `index`), Milvus is the store of record: each request's upserts
then deletes are written there under Strong consistency, and acknowledged once Milvus has them; the
LSN output is then the write's time in microseconds since the epoch (Milvus keeps the log). This
server then holds no index state: any number of replicas may write and serve the same index.

A request may carry each row's post record (RECORDS, optional; the ingester sends them): the
ranking stage's features of each upserted post (count percentiles, tags) are then stored beside its
vector, in the local index's log and snapshots as in Milvus, so `rank` reads a post's features as
of its last write (a post written without its record has none of its own: the build's table, if it
has the post, speaks for it).

Writes need the write key (feedserve.ops.keys, feedserve.triton.base.WriteModel). Vectors must be unit
length (feedserve.index.store.NORM_TOLERANCE): they are refused, not normalised, since a vector of
another length came from something other than the encoder.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from feedserve.artifacts import ArtifactLayout
from feedserve.errors import IndexStoreError
from feedserve.index.engines import Engine
from feedserve.index.live import IndexWriter
from feedserve.index.milvus import MilvusFollowed, MilvusStore, now_us
from feedserve.index.wal import LogError
from feedserve.prompt.buckets import PercentileBuckets
from feedserve.prompt.records import Post, parse_post
from feedserve.rank.features import COUNT_FEATURES, feature_row, saved_counts
from feedserve.schema import LSN, OP, OP_DELETE, OP_UPSERT, POST_ID, WRITE_EMBEDDING, WRITE_RECORDS, ModelName
from feedserve.triton.base import (
    Arrays,
    RequestError,
    Snapshots,
    Unavailable,
    WriteModel,
    check_2d,
    followed_index,
    read_records,
    require,
)

logger = logging.getLogger(__name__)


@dataclass
class Write:
    ops: np.ndarray  # int64 [n]
    ids: np.ndarray  # int64 [n]
    vectors: np.ndarray | None  # float32 [n, dim], rows of deletes ignored
    posts: list[Post] | None = None  # each row's record (RECORDS), when the writer sent them


class IndexWriteModel(WriteModel[Write]):
    name = ModelName.INDEX_WRITE

    def setup(self, layout: ArtifactLayout, params: dict[str, str]) -> None:
        self.layout = layout
        self.snapshot_every = int(params.get("snapshot_every", "1000"))
        self._dim = layout.verified_serving_dim()
        self.load_write_key()
        self.lock_wait_s = float(params.get("writer_lock_wait_s", "30"))
        # The ranking stage's features of each written post, from its record, as the build's table has
        # them: its counts, cut at its points (a feed ranker's counts are not the prompts').
        self.buckets = PercentileBuckets.load(layout.buckets) if layout.buckets.exists() else None
        self.counts: tuple[str, ...] = COUNT_FEATURES
        if layout.has_ranker():
            self.counts, cut = saved_counts(layout.post_features)
            self.buckets = cut or self.buckets
        self.milvus: MilvusStore | None = None
        if params.get("index", "local") != "local":
            followed = followed_index(layout, params, Engine(), "index_write")
            assert isinstance(followed, MilvusFollowed)
            self.milvus = followed.index
            return
        self.live = IndexWriter.open(layout.index_dir.root, self._dim, lock_wait_s=self.lock_wait_s)
        self.snapshots = Snapshots(lambda: self.live.snapshot(), self.snapshot_every, "index-snapshot")

    def parse(self, inputs: dict[str, np.ndarray | None]) -> Write:
        ops = check_2d(OP.name, require(inputs, OP.name), np.int64)
        ids = check_2d(POST_ID.name, require(inputs, POST_ID.name), np.int64)
        if ops.shape[1] != 1 or ids.shape != ops.shape:
            raise RequestError(
                f"{OP.name} and {POST_ID.name} must both be [n, 1], got {list(ops.shape)} and {list(ids.shape)}"
            )
        ops, ids = ops[:, 0], ids[:, 0]
        if not np.isin(ops, (OP_UPSERT, OP_DELETE)).all():
            raise RequestError(
                f"{OP.name}: each row must be {OP_UPSERT} (upsert) or {OP_DELETE} (delete), "
                f"got {sorted(set(ops.tolist()))}"
            )
        if len(np.unique(ids)) != len(ids):
            raise RequestError(f"{POST_ID.name}: a post appears twice in one request")
        if (ids < 0).any():  # as in records (feedserve.prompt.records.PostId); -1 also pads search results
            raise RequestError(f"{POST_ID.name}: post ids must be >= 0, got {int(ids.min())}")
        vectors = inputs.get(WRITE_EMBEDDING.name)
        if vectors is not None:
            vectors = check_2d(WRITE_EMBEDDING.name, vectors, np.float32)
            if len(vectors) != len(ids):
                raise RequestError(f"{WRITE_EMBEDDING.name}: {len(vectors)} rows for {len(ids)} posts")
        elif (ops == OP_UPSERT).any():
            raise RequestError(f"input tensor {WRITE_EMBEDDING.name} is missing (upserts need it)")
        posts = None
        if inputs.get(WRITE_RECORDS.name) is not None:
            posts = read_records(inputs, parse_post)
            if len(posts) != len(ids):
                raise RequestError(f"{WRITE_RECORDS.name}: {len(posts)} rows for {len(ids)} posts")
            for i, (post, post_id) in enumerate(zip(posts, ids.tolist(), strict=True)):
                if post.id != post_id:
                    raise RequestError(f"{WRITE_RECORDS.name}[{i}]: the record is post {post.id}, the row {post_id}")
        return Write(ops, ids, vectors, posts)

    def compute(self, items: Sequence[Write]) -> list[Arrays | RequestError]:
        if self.milvus is not None:
            return [self._write_milvus(self.milvus, write) for write in items]
        if self.live.failed:
            logger.warning("index_write: reopening %s after a failed write", self.live.log_path)
            self.snapshots.join()
            self.live.close()
            self.live = IndexWriter.open(self.layout.index_dir.root, self._dim, lock_wait_s=self.lock_wait_s)
        try:
            self.live.refresh()  # a rebuilt index replaces ours, with our writes since replayed on it
        except IndexStoreError:  # LogError included
            logger.exception("index_write: could not take the rebuilt index; writing on the one it holds")
        outputs: list[Arrays | RequestError] = []
        for write in items:
            upserts = write.ops == OP_UPSERT
            try:
                lsn = self.live.write(
                    write.ops,
                    write.ids,
                    None if write.vectors is None else write.vectors[upserts],
                    self._features(write, upserts),
                )
                outputs.append({LSN.name: np.full((len(write.ids), 1), lsn, np.int64)})
                self.snapshots.wrote()
            except LogError as err:  # not acknowledged; the next batch reopens the log if it must
                outputs.append(Unavailable(f"index_write: {err}"))
            except IndexStoreError as err:  # checked before anything is logged: nothing of it was written
                outputs.append(RequestError(f"{WRITE_EMBEDDING.name}: {err}"))
        return outputs

    def _write_milvus(self, store: MilvusStore, write: Write) -> Arrays | RequestError:
        upserts = write.ops == OP_UPSERT
        try:
            store.refresh()  # a rebuild swapped the generation: write to the one serving
            vectors = None if write.vectors is None else write.vectors[upserts]
            store.write(write.ids[upserts], vectors, write.ids[~upserts], self._features(write, upserts))
        except IndexStoreError as err:  # checked before anything is written
            return RequestError(f"{WRITE_EMBEDDING.name}: {err}")
        except Exception as err:  # Milvus did not take it: not acknowledged, the client retries
            logger.exception("index_write: Milvus write failed")
            return Unavailable(f"index_write: Milvus: {type(err).__name__}: {err}")
        return {LSN.name: np.full((len(write.ids), 1), now_us(), np.int64)}

    def _features(self, write: Write, upserts: np.ndarray) -> list[dict[str, Any]] | None:
        """Each upserted post's feature row from its record, in order; None when the writer sent no records."""
        if write.posts is None:
            return None
        return [feature_row(p, self.buckets, self.counts) for p, up in zip(write.posts, upserts, strict=True) if up]

    def finalize(self) -> None:
        if self.milvus is not None:
            self.milvus.close()
            return super().finalize()
        self.snapshots.join()
        self.live.close()
        super().finalize()


TritonPythonModel = IndexWriteModel
