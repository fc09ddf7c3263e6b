"""Where kNN searches run: an `Engine` names one, and a GPU engine holds a `DeviceCopy` of the store.

The faiss CPU index (`feedserve.index.store.PostIndex`) is the store of record for every engine
(writes, snapshots, saves). A GPU engine searches its own copy of the vectors, built by the first
search and then written with the store under the store's lock, so a search never sees half a
write. The store describes each write as a `RowWrite`; the torch engine
(`feedserve.index.torch_engine`) replays it in place, O(posts written); faiss-gpu cannot remove
rows, so its copy is rebuilt on the first search after a write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import faiss
import numpy as np

from feedserve.errors import IndexStoreError
from feedserve.schema import NO_ID

ENGINES = ("faiss", "torch", "faiss-gpu")


@dataclass(frozen=True)
class Engine:
    kind: str = "faiss"
    device: str = "cuda"  # for the torch engine ("cpu" works too, in fp32)
    dtype: str = "fp16"  # device storage of a GPU engine: fp16 halves the bytes a search scans

    def __post_init__(self) -> None:
        if self.kind not in ENGINES:
            raise ValueError(f"unknown kNN engine {self.kind!r}; expected one of {ENGINES}")


@dataclass(frozen=True)
class RowWrite:
    """One write as the store applied it to its rows, in this order: overwrite `rows` with `vectors`;
    append `new_ids` with `new_vectors`; copy rows `movers` (vectors and ids) onto rows `holes`;
    keep the first `size` rows. A device copy that replays it keeps the store's exact row layout."""

    rows: np.ndarray
    vectors: np.ndarray
    new_ids: np.ndarray
    new_vectors: np.ndarray
    holes: np.ndarray
    movers: np.ndarray
    size: int


class DeviceCopy(Protocol):
    """A GPU engine's copy of the vectors (`TorchFlatIndex`, `FaissGpuFlat`)."""

    def search(self, queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, post ids) [n, <= depth], best first; NO_ID pads."""
        ...

    def write(self, op: RowWrite) -> bool:
        """Replay a store write in place; False if this copy cannot (it is then rebuilt)."""
        ...


class FaissGpuFlat:
    """faiss-gpu flat inner product (GPU indexes cannot remove ids, so a write drops the copy and the
    next search rebuilds it from the store)."""

    MAX_K = 2048  # faiss-gpu's flat search returns at most this many per query

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, engine: Engine) -> None:
        if not hasattr(faiss, "GpuIndexFlatIP"):
            raise IndexStoreError(
                "the faiss-gpu engine needs a faiss built with GPU support (faiss-gpu); this one is CPU-only"
            )
        self._resources = faiss.StandardGpuResources()
        config = faiss.GpuIndexFlatConfig()
        config.useFloat16 = engine.dtype == "fp16"
        config.device = int(engine.device.partition(":")[2] or 0)
        self.index = faiss.GpuIndexFlatIP(self._resources, int(vectors.shape[1]), config)
        self.index.add(np.ascontiguousarray(vectors, np.float32))
        self.ids = ids.copy()

    def write(self, op: RowWrite) -> bool:
        return False

    def search(self, queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, post ids); deeper searches are cut, so a row whose exclusions eat into the cut
        returns fewer than k."""
        scores, rows = self.index.search(queries, min(depth, self.MAX_K))
        return scores, np.where(rows >= 0, self.ids[np.maximum(rows, 0)], NO_ID)


def device_copy(engine: Engine, ids: np.ndarray, vectors: np.ndarray) -> DeviceCopy:
    if engine.kind == "torch":
        from feedserve.index.torch_engine import TorchFlatIndex

        return TorchFlatIndex(vectors, engine.device, engine.dtype, ids=ids)
    return FaissGpuFlat(ids, vectors, engine)
