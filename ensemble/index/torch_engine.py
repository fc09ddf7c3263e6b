"""Exact inner-product search with PyTorch, for GPU hosts (and CPU, where tests check it).

The vectors live on the device as one [n, d] matrix (fp16 by default: half the bytes to scan, and
the scan is memory-bound). A query batch is one matmul per chunk of rows and a top-k per chunk;
the chunks' candidates are merged by a last top-k. Chunking bounds the [batch, rows] score matrix,
so 10M posts x 64 queries needs a few hundred MB of scratch, not 1.2 GB.

A plain `torch.topk` over millions of scores per row is slower than the scan itself, so a chunk's
top-k goes through blocks (`exact_topk`): the maximum of each block of 128 scores, the k blocks
with the highest maxima, then a top-k over just those k x 128 candidates. It is exact: a block that
holds one of the k best scores has a maximum at least the k-th best, and at most k blocks can.

Writes change the device copy in place, so a live index stays fresh without re-uploading it: the
copy replays the rows the store changed (`feedserve.index.engines.RowWrite`: rows overwritten, rows appended
into spare capacity grown a quarter at a time, removed rows filled from the end), so it keeps the
store's row layout, and a write of m posts costs O(m) where rebuilding the copy meant uploading
every vector (seconds at 10M posts).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from feedserve.index.engines import RowWrite

logger = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class TorchFlatIndex:
    """Vectors and their int64 ids on one device; `ids` defaults to the row positions."""

    MIN_CAPACITY = 1024  # rows allocated at the first growth

    def __init__(
        self,
        vectors: np.ndarray | torch.Tensor,
        device: str = "cuda",
        dtype: str = "fp16",
        chunk_rows: int = 1 << 21,
        block: int = 128,
        ids: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        if self.device.type == "cpu" and self.dtype != torch.float32:
            raise ValueError("on CPU the torch index is fp32 only (no fast half-precision matmul there)")
        data = torch.as_tensor(vectors)
        if data.ndim != 2:
            raise ValueError(f"vectors must be [n, d], got {list(data.shape)}")
        # Always copies: the arrays given may be another index's live memory (PostIndex passes
        # views of its store), which this copy's in-place writes must never touch.
        self._vectors = data.to(self.device, self.dtype, copy=True).contiguous()
        self._ids = (torch.arange(len(data)) if ids is None else torch.as_tensor(ids)).to(
            self.device, torch.int64, copy=True
        )
        if self._ids.shape != (len(data),):
            raise ValueError(f"{len(self._ids)} ids for {len(data)} vectors")
        self._n = len(data)  # rows in use; the tensors may hold spare capacity beyond them
        self.chunk_rows = chunk_rows
        self.block = block

    def __len__(self) -> int:
        return self._n

    @property
    def vectors(self) -> torch.Tensor:
        return self._vectors[: self._n]

    @property
    def ids(self) -> torch.Tensor:
        return self._ids[: self._n]

    @property
    def nbytes(self) -> int:
        return self.vectors.numel() * self.vectors.element_size()

    @torch.inference_mode()
    def write(self, op: RowWrite) -> bool:
        """Replay a `PostIndex` write on the device: the same rows change as in the store, O(write)."""
        if len(op.rows):
            self._vectors[torch.as_tensor(op.rows).to(self.device)] = torch.as_tensor(op.vectors).to(
                self.device, self.dtype
            )
        if len(op.new_ids):
            self._append(torch.as_tensor(op.new_ids).to(self.device), torch.as_tensor(op.new_vectors))
        if len(op.holes):
            holes, movers = torch.as_tensor(op.holes).to(self.device), torch.as_tensor(op.movers).to(self.device)
            self._vectors[holes] = self._vectors[movers]
            self._ids[holes] = self._ids[movers]
        self._n = op.size
        return True

    def _append(self, ids: torch.Tensor, vectors: torch.Tensor) -> None:
        n, m = self._n, len(ids)
        if n + m > len(self._ids):
            capacity = max(
                n + m, len(self._ids) * 5 // 4, self.MIN_CAPACITY
            )  # geometric growth: O(1) per row, 25% spare
            grown = torch.empty((capacity, self._vectors.shape[1]), dtype=self.dtype, device=self.device)
            grown[:n] = self._vectors[:n]
            grown_ids = torch.empty(capacity, dtype=torch.int64, device=self.device)
            grown_ids[:n] = self._ids[:n]
            self._vectors, self._ids = grown, grown_ids
        self._vectors[n : n + m] = vectors.to(self.device, self.dtype)
        self._ids[n : n + m] = ids
        self._n = n + m

    @torch.inference_mode()
    def search_tensor(self, queries: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores float32 [b, depth], ids int64 [b, depth]) on the device, best first."""
        q = queries.to(self.device, self.dtype)
        depth = min(depth, len(self))
        scores, rows = [], []
        for start in range(0, len(self), self.chunk_rows):
            chunk = self.vectors[start : start + self.chunk_rows]
            # Scores stay in the storage dtype through the top-k: a float32 copy of a [64, 2M]
            # score block would cost more memory traffic than scanning the vectors themselves.
            values, indices = exact_topk(q @ chunk.T, min(depth, chunk.shape[0]), self.block)
            scores.append(values.float())
            rows.append(indices + start)
        if len(scores) == 1:
            return scores[0], self._ids[rows[0]]
        merged = torch.topk(torch.cat(scores, dim=1), depth, dim=1)
        return merged.values, self._ids[torch.gather(torch.cat(rows, dim=1), 1, merged.indices)]

    def search(self, queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self) == 0 or depth <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        scores, ids = self.search_tensor(torch.from_numpy(np.ascontiguousarray(queries, np.float32)), depth)
        return scores.cpu().numpy(), ids.cpu().numpy()


def exact_topk(scores: torch.Tensor, k: int, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk(scores, k, dim=1)` for [b, n] scores, through block maxima (see the module doc)."""
    b, n = scores.shape
    blocks = n // block
    if blocks < 4 * k or b < 8:  # few blocks, or few rows: one radix select is faster (measured)
        top = torch.topk(scores, k, dim=1)
        return top.values, top.indices
    body = scores[:, : blocks * block].view(b, blocks, block)
    best = body.amax(dim=2).topk(k, dim=1).indices  # [b, k] block numbers
    offsets = torch.arange(block, device=scores.device)
    candidates = torch.gather(body, 1, best[:, :, None].expand(-1, -1, block)).reshape(b, k * block)
    positions = (best[:, :, None] * block + offsets).reshape(b, k * block)
    if blocks * block < n:  # the ragged tail joins the candidates as it is
        candidates = torch.cat([candidates, scores[:, blocks * block :]], dim=1)
        tail = torch.arange(blocks * block, n, device=scores.device).expand(b, -1)
        positions = torch.cat([positions, tail], dim=1)
    top = torch.topk(candidates, k, dim=1)
    return top.values, torch.gather(positions, 1, top.indices)
