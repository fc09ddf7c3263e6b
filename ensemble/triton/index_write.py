"""The `index_write` model: the live index's single writer (one instance; see feedserve.live_index).

Each request's upserts and deletes are checked, appended to the write-ahead log and fsynced, then
applied; its LSN output comes back only after that, so an acknowledged write survives a crash. The
`knn` instances follow the same log and see the write in their next batch. A bad request (an
unknown op, a wrong dimension, NaN, a duplicate id) fails alone. Every `snapshot_every` writes the
index is snapshotted and the log restarted. A rebuilt snapshot from the batch client is picked up
before the next write, so the writer never overwrites it with what it held before.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from feedserve.artifacts import ArtifactLayout, EncoderSettings
from feedserve.knn import IndexError_, file_signature
from feedserve.live_index import LiveIndex
from feedserve.schema import LSN, OP, OP_DELETE, OP_UPSERT, POST_ID, WRITE_EMBEDDING, ModelName
from feedserve.triton.base import Arrays, BatchModel, RequestError, check_2d, require

logger = logging.getLogger(__name__)


@dataclass
class Write:
    ops: np.ndarray  # int32 [n]
    ids: np.ndarray  # int64 [n]
    vectors: np.ndarray | None  # float32 [n, dim], rows of deletes ignored


class IndexWriteModel(BatchModel[Write]):
    name = ModelName.INDEX_WRITE

    def setup(self, layout: ArtifactLayout, params: dict[str, str]) -> None:
        self.layout = layout
        self.snapshot_every = int(params.get("snapshot_every", "1000"))
        self._dim = self._embedding_dim(layout)
        self._open()

    @staticmethod
    def _embedding_dim(layout: ArtifactLayout) -> int:
        settings = EncoderSettings.load(layout.settings)
        return settings.dim or int(json.loads((layout.hf_dir / "config.json").read_text())["hidden_size"])

    def _open(self) -> None:
        self.live = LiveIndex.open(self.layout.index.parent, self._dim, writer=True)
        self._signature = file_signature(self.layout.index)
        self._since_snapshot = 0

    def parse(self, inputs: dict[str, np.ndarray | None]) -> Write:
        ops = check_2d(OP.name, require(inputs, OP.name), np.int32)
        ids = check_2d(POST_ID.name, require(inputs, POST_ID.name), np.int64)
        if ops.shape[1] != 1 or ids.shape != ops.shape:
            raise RequestError(f"{OP.name} and {POST_ID.name} must both be [n, 1], got {list(ops.shape)} and {list(ids.shape)}")
        ops, ids = ops[:, 0], ids[:, 0]
        if not np.isin(ops, (OP_UPSERT, OP_DELETE)).all():
            raise RequestError(f"{OP.name}: each row must be {OP_UPSERT} (upsert) or {OP_DELETE} (delete), got {sorted(set(ops.tolist()))}")
        if len(np.unique(ids)) != len(ids):
            raise RequestError(f"{POST_ID.name}: a post appears twice in one request")
        vectors = inputs.get(WRITE_EMBEDDING.name)
        if vectors is not None:
            vectors = check_2d(WRITE_EMBEDDING.name, vectors, np.float32)
            if len(vectors) != len(ids):
                raise RequestError(f"{WRITE_EMBEDDING.name}: {len(vectors)} rows for {len(ids)} posts")
        elif (ops == OP_UPSERT).any():
            raise RequestError(f"input tensor {WRITE_EMBEDDING.name} is missing (upserts need it)")
        return Write(ops, ids, vectors)

    def compute(self, items: Sequence[Write]) -> list[Arrays | RequestError]:
        if file_signature(self.layout.index) != self._signature:
            logger.info("index_write: %s was rebuilt; reopening on it", self.layout.index)
            self.live.close()
            self._open()
        outputs: list[Arrays | RequestError] = []
        for write in items:
            try:
                outputs.append({LSN.name: self._apply(write)})
            except IndexError_ as err:  # checked before anything is logged: nothing of it was written
                outputs.append(RequestError(f"{WRITE_EMBEDDING.name}: {err}"))
        if self._since_snapshot >= self.snapshot_every:
            self.live.snapshot()
            self._signature = file_signature(self.layout.index)
            self._since_snapshot = 0
        return outputs

    def _apply(self, write: Write) -> np.ndarray:
        lsn = np.zeros((len(write.ids), 1), np.int64)
        upsert = write.ops == OP_UPSERT
        if upsert.any():
            assert write.vectors is not None
            lsn[upsert] = self.live.upsert(write.ids[upsert], write.vectors[upsert])
        if (~upsert).any():
            lsn[~upsert] = self.live.delete(write.ids[~upsert])
        self._since_snapshot += int(upsert.any()) + int((~upsert).any())
        return lsn

    def finalize(self) -> None:
        self.live.close()
        super().finalize()


TritonPythonModel = IndexWriteModel
