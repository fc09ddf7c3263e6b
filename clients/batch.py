"""Batch client: embed a post corpus through the `embed_post` ensemble and build the knn index.

Requests go out concurrently over async gRPC (`tritonclient.grpc.aio`), `concurrency` in flight,
so the server's dynamic batcher always has work queued. Embeddings are written to disk
(`ids.npy`, `embeddings.npy`) and turned into the index file that the `knn` model serves; `knn`
notices the new file and swaps it in without a restart. With a Milvus index the posts go into a
new generation of it, which replaces the serving one when it is full.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm
from tritonclient.utils import InferenceServerException

from feedserve.clients.online import Record, records_tensor
from feedserve.errors import ClientError, IndexStoreError
from feedserve.index.live import rebuilding
from feedserve.index.milvus import MilvusStore
from feedserve.index.milvus import rebuilding as milvus_rebuilding
from feedserve.index.store import PostIndex
from feedserve.schema import EMBEDDING, RECORDS, ModelName

logger = logging.getLogger(__name__)


@dataclass
class EmbedStats:
    posts: int
    seconds: float

    @property
    def posts_per_s(self) -> float:
        return self.posts / self.seconds if self.seconds else 0.0


def _chunks(items: Sequence[Record], size: int) -> Iterator[Sequence[Record]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def embed_records_async(
    records: Sequence[Record],
    url: str = "127.0.0.1:8001",
    model: str = ModelName.EMBED_POST,
    batch_size: int = 8,
    concurrency: int = 4,
    timeout_s: float = 120.0,
    progress: bool = True,
) -> np.ndarray:
    """Embeddings of `records` in order, [n, dim] float32."""
    import tritonclient.grpc.aio as grpcaio

    chunks = list(_chunks(records, batch_size))
    results: list[np.ndarray | None] = [None] * len(chunks)
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(records), unit="post", disable=not progress, desc=f"embed via {model}")
    async with grpcaio.InferenceServerClient(url) as client:

        async def one(i: int, chunk: Sequence[Record]) -> None:
            tensor = records_tensor(chunk)
            inp = grpcaio.InferInput(RECORDS.name, list(tensor.shape), "BYTES")
            inp.set_data_from_numpy(tensor)
            async with gate:
                try:
                    res = await client.infer(
                        model,
                        [inp],
                        outputs=[grpcaio.InferRequestedOutput(EMBEDDING.name)],
                        client_timeout=timeout_s,
                    )
                except InferenceServerException as err:
                    raise ClientError(f"{model}, records {i * batch_size}..: {err.message()}") from err
            results[i] = res.as_numpy(EMBEDDING.name)
            bar.update(len(chunk))

        try:
            await asyncio.gather(*(one(i, c) for i, c in enumerate(chunks)))
        finally:
            bar.close()
    if not results:
        return np.empty((0, 0), np.float32)
    return np.concatenate(results)  # type: ignore[arg-type]


def embed_records(records: Sequence[Record], **kwargs: object) -> np.ndarray:
    return asyncio.run(embed_records_async(records, **kwargs))  # type: ignore[arg-type]


def save_embeddings(out_dir: Path, ids: np.ndarray, vectors: np.ndarray) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "ids.npy", np.asarray(ids, np.int64), allow_pickle=False)
    np.save(out_dir / "embeddings.npy", np.asarray(vectors, np.float32), allow_pickle=False)


def load_embeddings(out_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.load(out_dir / "ids.npy", allow_pickle=False),
        np.load(out_dir / "embeddings.npy", allow_pickle=False),
    )


def build_index(
    ids: np.ndarray, vectors: np.ndarray, index_path: Path, meta: dict[str, object] | None = None
) -> PostIndex:
    """A full rebuild from vectors in hand: it replaces the live index as of now (the writes
    already logged are behind it; see `feedserve.index.live.rebuilding`)."""
    with rebuilding(index_path.parent) as rebuild:
        return rebuild.save(ids, vectors, meta)


def index_corpus(
    posts: Sequence[Record],
    ids: Sequence[int],
    index_path: Path | MilvusStore,
    embeddings_dir: Path | None = None,
    dim: int | None = None,
    **kwargs: object,
) -> EmbedStats:
    """Embed `posts` through the server, save the embeddings, and write the index: the local index
    file at `index_path`, or a new generation of a Milvus index that replaces the serving one
    (feedserve.index.milvus.rebuilding). The rebuild starts before the first post is embedded:
    writes acknowledged meanwhile (an ingester running beside it) are newer than this corpus and
    stay on top of it. With `dim`, vectors of another width (another encoder's server) are refused
    before the rebuild replaces anything."""
    target = milvus_rebuilding(index_path) if isinstance(index_path, MilvusStore) else rebuilding(index_path.parent)
    with target as rebuild:
        start = time.perf_counter()
        vectors = embed_records(posts, **kwargs)
        if dim is not None and vectors.shape[1] != dim:  # another encoder's server: every later write would fail
            raise IndexStoreError(f"the server embedded {vectors.shape[1]} dims; these artifacts serve {dim}")
        stats = EmbedStats(len(posts), time.perf_counter() - start)
        id_array = np.asarray(ids, np.int64)
        if embeddings_dir is not None:
            save_embeddings(embeddings_dir, id_array, vectors)
        rebuild.save(id_array, vectors)
    logger.info("indexed %d posts in %.1f s (%.1f posts/s)", stats.posts, stats.seconds, stats.posts_per_s)
    return stats
