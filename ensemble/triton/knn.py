"""The `knn` model: exact top-k over the post index, excluding posts the member has seen.

The index is a follower of the live index (`feedserve.index.live`): before each batch it applies
the writes `index_write` has acknowledged since, so a search sees every write acknowledged before
it started. A full rebuild (a new generation of the snapshot) is loaded whole before it replaces
the old index: no request sees a half-built index; the writer's periodic snapshots need no reload.
The `engine` parameter picks where searches run (faiss on CPU, torch or faiss-gpu on the
instance's GPU). A QUERY is an embedding: finite and unit length, as the encoder gives it (scores
are cosines); EXCLUDE_IDS holds at most a member's history (MAX_HISTORY ids a row).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from feedserve.artifacts import ArtifactLayout
from feedserve.index.engines import Engine
from feedserve.index.milvus import MilvusStore
from feedserve.index.store import PostIndex, SearchResult
from feedserve.prompt.records import MAX_HISTORY
from feedserve.schema import CANDIDATES, EXCLUDE_IDS, IDS, QUERY, SCORES, K, ModelName
from feedserve.triton.base import (
    Arrays,
    BatchModel,
    RequestError,
    check_2d,
    check_unit_rows,
    followed_index,
    require,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_K = 2000


@dataclass
class KnnRequest:
    queries: np.ndarray  # [b, d]
    ks: list[int]
    exclude: list[np.ndarray]


class KnnModel(BatchModel[KnnRequest]):
    name = ModelName.KNN

    def setup(self, layout: ArtifactLayout, params: dict[str, str]) -> None:
        self.max_k = int(params.get("max_k", DEFAULT_MAX_K))
        self.engine = Engine(params.get("engine", "faiss"), params.get("device", "cuda"), params.get("dtype", "fp16"))
        logger.info(
            "knn: %s engine%s",
            self.engine.kind,
            "" if self.engine.kind == "faiss" else f" on {self.engine.device}, {self.engine.dtype} storage",
        )
        self.followed = followed_index(layout, params, self.engine, "knn")

    @property
    def index(self) -> PostIndex | MilvusStore | None:
        return self.followed.index

    def parse(self, inputs: dict[str, np.ndarray | None]) -> KnnRequest:
        queries = check_2d(QUERY.name, require(inputs, QUERY.name), np.float32)
        ks_arr = check_2d(K.name, require(inputs, K.name), np.int64)
        if ks_arr.shape != (len(queries), 1):
            raise RequestError(f"{K.name}: expected shape [{len(queries)}, 1], got {list(ks_arr.shape)}")
        ks = [int(k) for k in ks_arr[:, 0]]
        for k in ks:
            if not 1 <= k <= self.max_k:
                # feed's CANDIDATES reach knn as its K: the message names both.
                raise RequestError(f"{K.name} ({CANDIDATES.name} in feed): k={k} is out of range [1, {self.max_k}]")
        if not np.isfinite(queries).all():
            raise RequestError(f"{QUERY.name}: contains NaN or inf")
        if self.index is not None and queries.shape[1] != self.index.dim:
            raise RequestError(
                f"{QUERY.name}: dimension {queries.shape[1]} does not match the index ({self.index.dim})"
            )
        check_unit_rows(QUERY.name, queries)
        excl = inputs.get(EXCLUDE_IDS.name)
        if excl is None:
            exclude = [np.empty(0, np.int64)] * len(queries)
        else:
            excl = check_2d(EXCLUDE_IDS.name, excl, np.int64)
            if len(excl) != len(queries):
                raise RequestError(f"{EXCLUDE_IDS.name}: {len(excl)} rows for {len(queries)} queries")
            # A member's history is at most MAX_HISTORY posts; one row of a million excluded ids made
            # the search of every request batched with it that much deeper.
            if excl.shape[1] > MAX_HISTORY:
                raise RequestError(
                    f"{EXCLUDE_IDS.name}: {excl.shape[1]} ids per row; at most {MAX_HISTORY} (a member's history)"
                )
            exclude = list(excl)
        return KnnRequest(queries, ks, exclude)

    def compute(self, items: Sequence[KnnRequest]) -> list[Arrays | RequestError]:
        self.followed.refresh()
        # `parse` checked the width against the index it saw; the refresh may have brought the first
        # index, or a rebuild of another width: a request that no longer fits fails alone.
        dim = self.index.dim if self.index is not None else None
        fits = [dim is None or it.queries.shape[1] == dim for it in items]
        answers = iter(self._search([it for it, ok in zip(items, fits, strict=True) if ok]) if any(fits) else [])
        return [
            next(answers)
            if ok
            else RequestError(f"{QUERY.name}: dimension {it.queries.shape[1]} does not match the index ({dim})")
            for it, ok in zip(items, fits, strict=True)
        ]

    def _search(self, items: Sequence[KnnRequest]) -> list[Arrays | RequestError]:
        queries = np.concatenate([it.queries for it in items])
        ks = [k for it in items for k in it.ks]
        exclude = [e for it in items for e in it.exclude]
        found: Sequence[SearchResult | None] = (
            [None] * len(ks) if self.index is None else self.index.search(queries, ks, exclude)
        )
        outputs: list[Arrays | RequestError] = []
        row = 0
        for it in items:
            rows = found[row : row + len(it.ks)]
            row += len(it.ks)
            # Rows of one request share a width: when posts run out, shorter rows are padded with id -1.
            width = max((0 if r is None else len(r.ids)) for r in rows)
            ids = np.full((len(rows), width), -1, np.int64)
            scores = np.zeros((len(rows), width), np.float32)
            for i, r in enumerate(rows):
                if r is not None:
                    ids[i, : len(r.ids)], scores[i, : len(r.ids)] = r.ids, r.scores
            outputs.append({IDS.name: ids, SCORES.name: scores})
        return outputs


TritonPythonModel = KnnModel
