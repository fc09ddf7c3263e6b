"""Exact inner-product search with PyTorch, for GPU hosts (and CPU, where tests check it).

The vectors live on the device as one [n, d] matrix (fp16 by default: half the bytes to scan, and
the scan is memory-bound). A query batch is one matmul per chunk of rows and a top-k per chunk;
the chunks' candidates are merged by a last top-k. Chunking bounds the [batch, rows] score matrix,
so 10M posts x 64 queries needs a few hundred MB of scratch, not 1.2 GB.

A plain `torch.topk` over millions of scores per row is slower than the scan itself, so a chunk's
top-k goes through blocks (`exact_topk`): the maximum of each block of 128 scores, the k blocks
with the highest maxima, then a top-k over just those k x 128 candidates. It is exact: a block that
holds one of the k best scores has a maximum at least the k-th best, and at most k blocks can.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class TorchFlatIndex:
    """Rows are addressed by position; `PostIndex` maps positions to post ids."""

    def __init__(self, vectors: np.ndarray | torch.Tensor, device: str = "cuda", dtype: str = "fp16",
                 chunk_rows: int = 1 << 21, block: int = 128) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        if self.device.type == "cpu" and self.dtype != torch.float32:
            raise ValueError("on CPU the torch index is fp32 only (no fast half-precision matmul there)")
        data = torch.as_tensor(vectors)
        if data.ndim != 2:
            raise ValueError(f"vectors must be [n, d], got {list(data.shape)}")
        self.vectors = data.to(self.device, self.dtype).contiguous()
        self.chunk_rows = chunk_rows
        self.block = block

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def nbytes(self) -> int:
        return self.vectors.numel() * self.vectors.element_size()

    @torch.inference_mode()
    def search_tensor(self, queries: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores float32 [b, depth], rows int64 [b, depth]) on the device, best first."""
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
            return scores[0], rows[0]
        merged = torch.topk(torch.cat(scores, dim=1), depth, dim=1)
        return merged.values, torch.gather(torch.cat(rows, dim=1), 1, merged.indices)

    def search(self, queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self) == 0 or depth <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        scores, rows = self.search_tensor(torch.from_numpy(np.ascontiguousarray(queries, np.float32)), depth)
        return scores.cpu().numpy(), rows.cpu().numpy()


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
