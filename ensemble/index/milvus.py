"""The post index in Milvus: the distributed store of record for deployments beyond one node.

A Milvus collection holds one row per post (INT64 primary key `id`, FLOAT_VECTOR `vector` of the
serving width) with an exact `FLAT` inner-product index on CPU (`GPU_BRUTE_FORCE` on GPU query
nodes), so its answers are the in-process index's answers. Every read and write uses `Strong`
consistency: a search that starts after a write was acknowledged sees it, the promise the live
index makes on one node (feedserve.index.live), now across every server that shares the Milvus.

`MilvusStore` has the surface the serving models use of `PostIndex` (`dim`, `len`, `search`,
`lookup`, `write`), so `knn`, `rank` and `index_write` read and write it the same way.

A URI is a Milvus server or cluster (`http://host:19530`) or, on one machine, a local file: Milvus
Lite, the real engine embedded, which one process may open at a time; `MilvusLite` runs it as a
loopback gRPC server that every Triton stub connects to (the launcher starts it).

History exclusion is a filter (`id not in [...]`) for up to MAX_FILTER_IDS ids; a longer history is
excluded by over-fetching k plus its length and filtering here.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from feedserve.errors import IndexStoreError
from feedserve.index.store import SearchResult, check_unit
from feedserve.schema import NO_ID

logger = logging.getLogger(__name__)

DEFAULT_COLLECTION = "feedserve_posts"
# Ids excluded by the search filter itself; past this, the search over-fetches instead (a filter
# expression is parsed per query; thousands of literals cost more than the rows they save).
MAX_FILTER_IDS = 1024
# Milvus's largest `limit` per search (its topk bound).
MAX_LIMIT = 16384
# Rows per insert/upsert call: Milvus refuses messages past its gRPC size limit.
WRITE_CHUNK = 2048


class MilvusStore:
    def __init__(self, uri: str, dim: int, collection: str = DEFAULT_COLLECTION, index_type: str = "FLAT") -> None:
        from pymilvus import DataType, MilvusClient

        if dim <= 0:
            raise IndexStoreError(f"index dimension must be positive, got {dim}")
        self.uri, self.collection, self.dim = uri, collection, dim
        self.client = MilvusClient(uri)
        if self.client.has_collection(collection):
            held = self._collection_dim()
            if held != dim:
                raise IndexStoreError(f"Milvus collection {collection} at {uri} holds {held}-wide vectors, not {dim}")
        else:
            schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            index = self.client.prepare_index_params()
            index.add_index("vector", index_type=index_type, metric_type="IP")
            self.client.create_collection(collection, schema=schema, index_params=index, consistency_level="Strong")
            logger.info("created Milvus collection %s (dim %d, %s) at %s", collection, dim, index_type, uri)
        self.client.load_collection(collection)

    def _collection_dim(self) -> int:
        fields = self.client.describe_collection(self.collection)["fields"]
        vector = next(f for f in fields if f["name"] == "vector")
        return int(vector["params"]["dim"])

    def __len__(self) -> int:
        rows = self.client.query(self.collection, filter="", output_fields=["count(*)"], consistency_level="Strong")
        return int(rows[0]["count(*)"])

    def write(self, upsert_ids: np.ndarray, vectors: np.ndarray | None, delete_ids: np.ndarray) -> int:
        """Upserts (a post written again is replaced) then deletes, as PostIndex.write; returns how
        many of `delete_ids` were held. Vectors must be unit length, as the live index requires."""
        ids = np.asarray(upsert_ids, np.int64).reshape(-1)
        if len(ids):
            if vectors is None or np.asarray(vectors).shape != (len(ids), self.dim):
                raise IndexStoreError(f"expected {len(ids)} vectors of dim {self.dim}")
            vectors = np.ascontiguousarray(vectors, np.float32)
            check_unit(vectors)
            for start in range(0, len(ids), WRITE_CHUNK):
                rows = [
                    {"id": int(i), "vector": v.tolist()}
                    for i, v in zip(ids[start : start + WRITE_CHUNK], vectors[start : start + WRITE_CHUNK], strict=True)
                ]
                self.client.upsert(self.collection, rows)
        gone = np.unique(np.asarray(delete_ids, np.int64).reshape(-1))
        if not len(gone):
            return 0
        held = int(self.lookup(gone)[1].sum())
        self.client.delete(self.collection, ids=gone.tolist())
        return held

    def lookup(self, post_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vectors [n, dim], found [n]) as PostIndex.lookup: zeros where a post is not held."""
        ids = np.asarray(post_ids, np.int64).reshape(-1)
        out = np.zeros((len(ids), self.dim), np.float32)
        found = np.zeros(len(ids), bool)
        wanted = sorted({int(i) for i in ids.tolist() if i != NO_ID})
        if not wanted:
            return out, found
        rows = self.client.get(self.collection, ids=wanted, output_fields=["vector"])
        vector_of = {int(r["id"]): r["vector"] for r in rows}
        for j, i in enumerate(ids.tolist()):
            if i in vector_of:
                out[j] = vector_of[i]
                found[j] = True
        return out, found

    def search(
        self, queries: np.ndarray, ks: Sequence[int], exclude: Sequence[np.ndarray] | None = None
    ) -> list[SearchResult]:
        """Top-k per query row by inner product, skipping that row's excluded ids (NO_ID is padding)."""
        queries = np.ascontiguousarray(queries, np.float32)
        excl = [np.asarray(e, np.int64) for e in exclude] if exclude is not None else [np.empty(0, np.int64)] * len(ks)
        results = []
        for query, k, row_excluded in zip(queries, ks, excl, strict=True):
            skip = sorted({int(i) for i in row_excluded.tolist() if i != NO_ID})
            in_filter = skip if len(skip) <= MAX_FILTER_IDS else []
            limit = min(MAX_LIMIT, k + (len(skip) - len(in_filter)))
            hits = self.client.search(
                self.collection,
                data=[query.tolist()],
                limit=limit,
                filter=f"id not in {in_filter}" if in_filter else "",
                search_params={"metric_type": "IP"},
                consistency_level="Strong",
            )[0]
            skipped = set(skip)
            kept = [(int(h["id"]), float(h["distance"])) for h in hits if int(h["id"]) not in skipped][:k]
            results.append(
                SearchResult(np.array([i for i, _ in kept], np.int64), np.array([s for _, s in kept], np.float32))
            )
        return results

    def close(self) -> None:
        self.client.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MilvusLite:
    """Milvus Lite (the embedded engine) over one local file, served on a loopback port so that
    several processes (Triton's stubs, the ingester) share it: Milvus Lite lets one process open a
    file. `uri` is what MilvusStore connects to."""

    def __init__(self, db_file: Path, port: int | None = None) -> None:
        self.db_file = Path(db_file)
        self.port = port or _free_port()
        self._server: Any = None
        self._lock = -1

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> MilvusLite:
        from milvus_lite.server import Server

        self.db_file.parent.mkdir(parents=True, exist_ok=True)
        # Served on a port, Milvus Lite takes no lock of its own: two servers would write one file.
        self._lock = os.open(self.db_file.with_name(self.db_file.name + ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock)
            self._lock = -1
            raise IndexStoreError(f"could not start Milvus Lite on {self.db_file}: another process serves it") from None
        server = Server(str(self.db_file), f"127.0.0.1:{self.port}")
        if not server.init() or not server.start():
            self.stop()
            raise IndexStoreError(f"could not start Milvus Lite on {self.db_file}")
        self._server = server
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise IndexStoreError(f"Milvus Lite on {self.db_file} did not listen on {self.port}") from None
                time.sleep(0.05)
        logger.info("Milvus Lite serving %s on %s", self.db_file, self.uri)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._lock >= 0:
            os.close(self._lock)  # releases the flock
            self._lock = -1

    def __enter__(self) -> MilvusLite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
