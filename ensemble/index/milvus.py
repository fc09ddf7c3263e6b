"""The post index in Milvus: the distributed store of record for deployments beyond one node.

A Milvus collection holds one row per post (INT64 primary key `id`, FLOAT_VECTOR `vector` of the
serving width) with an exact `FLAT` inner-product index on CPU (`GPU_BRUTE_FORCE` on GPU query
nodes), so its answers are the in-process index's answers. Every read and write uses `Strong`
consistency: a search that starts after a write was acknowledged sees it, the promise the live
index makes on one node (feedserve.index.live), now across every server that shares the Milvus.

`MilvusStore` has the surface the serving models use of `PostIndex` (`dim`, `len`, `search`,
`lookup`, `write`), so `knn`, `rank` and `index_write` read and write it the same way.

An index is a name; its posts live in one generation, a collection `<name>__<generation>`, and the
row of the `<name>__current` collection names the generation serving. A rebuild (`rebuilding`)
fills a new generation while the current one serves and takes writes, carries over the writes
made meanwhile, then points the name at it: a reader (which resolves the name before each batch,
`refresh`) sees the old index or the new one, never a half-built one. A pointer row rather than a
Milvus alias because Milvus Lite answers the alias calls UNIMPLEMENTED; the pointer works on both.
Each row carries `written_at` (microseconds since the epoch, set by the writer) so that the rebuild
can tell the writes made while it filled, and `features` (JSON: what the ranking stage reads of the
post besides its vector, `feedserve.rank.features.feature_row`; `{}` where the writer sent none).

A URI is a Milvus server or cluster (`http://host:19530`) or, on one machine, a local file: Milvus
Lite, the real engine embedded, which one process may open at a time; `MilvusLite` runs it as a
loopback gRPC server that every Triton stub connects to (the launcher starts it).

History exclusion over-fetches: a batch's queries go to Milvus as one search (one scan for all),
each asking for its k plus its excluded ids, which are dropped here; a row past Milvus's limit on
results is searched alone with an `id not in [...]` filter.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from feedserve.errors import IndexStoreError
from feedserve.index.features import FeatureRows
from feedserve.index.store import SearchResult, check_unit
from feedserve.schema import NO_ID

logger = logging.getLogger(__name__)

DEFAULT_COLLECTION = "feedserve_posts"  # the index's name
# What serving reads: a local path is Milvus Lite (shared through `shared_lite`), else a server URI.
MILVUS_URI_ENV = "FEEDSERVE_MILVUS_URI"
# Milvus's largest `limit` per search (its topk bound).
MAX_LIMIT = 16384
# Rows per insert/upsert call: Milvus refuses messages past its gRPC size limit.
WRITE_CHUNK = 2048


@dataclass
class Row:
    written_at: int
    vector: list[float]
    features: dict[str, Any]


def now_us() -> int:
    return time.time_ns() // 1000


class MilvusStore:
    """One named post index in Milvus (`collection` is its name; see the module's docstring)."""

    def __init__(self, uri: str, dim: int, collection: str = DEFAULT_COLLECTION, index_type: str = "FLAT") -> None:
        from pymilvus import MilvusClient

        if dim <= 0:
            raise IndexStoreError(f"index dimension must be positive, got {dim}")
        self.uri, self.name, self.dim, self.index_type = uri, collection, dim, index_type
        self.client = MilvusClient(uri)
        self._ensure_pointer()
        current = self._pointed()
        if current is None:
            # A fixed name: the models of a server (and the servers) that start together on an empty
            # Milvus all create and point at the same first generation, none at one of its own.
            current = self.create_generation(f"{self.name}__initial")
            self.point(current)
        self.collection = current
        held = self._collection_dim(current)
        if held != dim:
            raise IndexStoreError(f"Milvus index {collection} at {uri} holds {held}-wide vectors, not {dim}")
        self.client.load_collection(current)

    @property
    def pointer(self) -> str:
        return f"{self.name}__current"

    def _create(self, name: str, schema: Any, index: Any) -> None:
        create_collection(self.client, name, schema, index)

    def _ensure_pointer(self) -> None:
        from pymilvus import DataType

        # Milvus wants a vector field in every collection; the pointer's is a placeholder.
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("generation", DataType.VARCHAR, max_length=256)
        schema.add_field("placeholder", DataType.FLOAT_VECTOR, dim=2)
        index = self.client.prepare_index_params()
        index.add_index("placeholder", index_type="FLAT", metric_type="IP")
        self._create(self.pointer, schema, index)
        self.client.load_collection(self.pointer)

    def _pointed(self) -> str | None:
        rows = self.client.get(self.pointer, ids=[0], output_fields=["generation"])
        return str(rows[0]["generation"]) if rows else None

    def point(self, collection: str) -> None:
        """Make `collection` the generation this index's name serves (one upsert: atomic)."""
        self.client.upsert(self.pointer, [{"id": 0, "generation": collection, "placeholder": [1.0, 0.0]}])

    def create_generation(self, name: str | None = None) -> str:
        """A new empty collection for this index (a fresh name unless given), not yet serving; its name."""
        from pymilvus import DataType

        name = name or f"{self.name}__{uuid.uuid4().hex[:12]}"
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("written_at", DataType.INT64)
        schema.add_field("features", DataType.JSON)  # Milvus Lite takes no nullable field: {} is none
        index = self.client.prepare_index_params()
        index.add_index("vector", index_type=self.index_type, metric_type="IP")
        self._create(name, schema, index)
        self.client.load_collection(name)
        logger.info("created Milvus collection %s (dim %d, %s) at %s", name, self.dim, self.index_type, self.uri)
        return name

    def generations(self) -> list[str]:
        """This index's generations: `<name>__initial` and `<name>__<12 hex digits>` (not another
        index's whose name starts with this one's, nor the engagement log's)."""
        named = re.compile(rf"{re.escape(self.name)}__(initial|[0-9a-f]{{12}})")
        return sorted(c for c in self.client.list_collections() if named.fullmatch(c))

    def refresh(self) -> bool:
        """Follow the name to the generation serving now (a rebuild may have swapped it); True if it moved."""
        current = self._pointed()
        if current is None or current == self.collection:
            return False
        self.client.load_collection(current)
        logger.info("Milvus index %s: now serving %s (was %s)", self.name, current, self.collection)
        self.collection = current
        return True

    def _collection_dim(self, collection: str) -> int:
        fields = self.client.describe_collection(collection)["fields"]
        vector = next(f for f in fields if f["name"] == "vector")
        return int(vector["params"]["dim"])

    def __len__(self) -> int:
        rows = self.client.query(self.collection, filter="", output_fields=["count(*)"], consistency_level="Strong")
        return int(rows[0]["count(*)"])

    def write(
        self,
        upsert_ids: np.ndarray,
        vectors: np.ndarray | None,
        delete_ids: np.ndarray,
        features: Sequence[Mapping[str, Any]] | None = None,
        collection: str | None = None,
    ) -> int:
        """Upserts (a post written again is replaced, features and all) then deletes, as
        PostIndex.write; returns how many of `delete_ids` were held. Vectors must be unit length, as
        the live index requires; `features` has one row per upsert (None: none)."""
        target = collection or self.collection
        ids = np.asarray(upsert_ids, np.int64).reshape(-1)
        if len(ids):
            if vectors is None or np.asarray(vectors).shape != (len(ids), self.dim):
                raise IndexStoreError(f"expected {len(ids)} vectors of dim {self.dim}")
            vectors = np.ascontiguousarray(vectors, np.float32)
            check_unit(vectors)
            if features is not None and len(features) != len(ids):
                raise IndexStoreError(f"expected {len(ids)} feature rows, got {len(features)}")
            self._upsert(target, ids, vectors, np.full(len(ids), now_us(), np.int64), features)
        gone = np.unique(np.asarray(delete_ids, np.int64).reshape(-1))
        if not len(gone):
            return 0
        held = int(self.lookup(gone, target)[1].sum())
        self.client.delete(target, ids=gone.tolist())
        return held

    def _upsert(
        self,
        collection: str,
        ids: np.ndarray,
        vectors: np.ndarray,
        written_at: np.ndarray,
        features: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        rows = features if features is not None else [{}] * len(ids)
        for start in range(0, len(ids), WRITE_CHUNK):
            end = start + WRITE_CHUNK
            batch = zip(ids[start:end], vectors[start:end], written_at[start:end], rows[start:end], strict=True)
            self.client.upsert(
                collection,
                [
                    {"id": int(i), "vector": v.tolist(), "written_at": int(t), "features": dict(f)}
                    for i, v, t, f in batch
                ],
            )

    def lookup(self, post_ids: np.ndarray, collection: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(vectors [n, dim], found [n]) as PostIndex.lookup: zeros where a post is not held."""
        vectors, found, _ = self.lookup_rows(post_ids, collection, features=False)
        return vectors, found

    def lookup_rows(
        self, post_ids: np.ndarray, collection: str | None = None, features: bool = True
    ) -> tuple[np.ndarray, np.ndarray, FeatureRows]:
        """lookup, and the features of the posts held that have any, in one call."""
        ids = np.asarray(post_ids, np.int64).reshape(-1)
        out = np.zeros((len(ids), self.dim), np.float32)
        found = np.zeros(len(ids), bool)
        wanted = sorted({int(i) for i in ids.tolist() if i != NO_ID})
        if not wanted:
            return out, found, FeatureRows.empty()
        fields = ["vector", *(["features"] if features else [])]
        rows = self.client.get(collection or self.collection, ids=wanted, output_fields=fields)
        vector_of = {int(r["id"]): r["vector"] for r in rows}
        for j, i in enumerate(ids.tolist()):
            if i in vector_of:
                out[j] = vector_of[i]
                found[j] = True
        return out, found, FeatureRows.from_rows({int(r["id"]): r["features"] or {} for r in rows} if features else {})

    def rows(self, collection: str, filter: str = "", full: bool = False) -> dict[int, Row]:
        """Every row of `collection` matching `filter`, by id (vector and features only if `full`)."""
        fields = ["id", "written_at", *(["vector", "features"] if full else [])]
        return {
            int(r["id"]): Row(int(r["written_at"]), r.get("vector", []), dict(r.get("features") or {}))
            for r in query_all(self.client, collection, filter, fields)
        }

    def search(
        self, queries: np.ndarray, ks: Sequence[int], exclude: Sequence[np.ndarray] | None = None
    ) -> list[SearchResult]:
        """Top-k per query row by inner product, skipping that row's excluded ids (NO_ID is padding).

        A batch's rows go to Milvus as one search (the engine scans the vectors once for all of
        them), each over-fetching its k plus its excluded ids, which are dropped here: one filter
        expression could not exclude a different history per row. A row that would need more than
        MAX_LIMIT results is searched alone with its exclusions as a filter instead."""
        queries = np.ascontiguousarray(queries, np.float32)
        excl = [np.asarray(e, np.int64) for e in exclude] if exclude is not None else [np.empty(0, np.int64)] * len(ks)
        skips = [sorted({int(i) for i in e.tolist() if i != NO_ID}) for e in excl]
        results: list[SearchResult | None] = [None] * len(ks)
        together = [i for i, (k, skip) in enumerate(zip(ks, skips, strict=True)) if k + len(skip) <= MAX_LIMIT]
        if together:
            limit = max(ks[i] + len(skips[i]) for i in together)
            found = self._search([queries[i] for i in together], limit, "")
            for i, hits in zip(together, found, strict=True):
                results[i] = _kept(hits, skips[i], ks[i])
        for i in sorted(set(range(len(ks))) - set(together)):
            (hits,) = self._search([queries[i]], ks[i], f"id not in {skips[i]}")
            results[i] = _kept(hits, skips[i], ks[i])
        return [r for r in results if r is not None]

    def _search(self, queries: list[np.ndarray], limit: int, filter: str) -> list[list[dict[str, Any]]]:
        return self.client.search(
            self.collection,
            data=[q.tolist() for q in queries],
            limit=limit,
            filter=filter,
            search_params={"metric_type": "IP"},
            consistency_level="Strong",
        )

    def close(self) -> None:
        self.client.close()


def create_collection(client: Any, name: str, schema: Any, index: Any) -> None:
    """Create a collection (Strong consistency) unless it exists, also when another process creates
    it meanwhile."""
    if client.has_collection(name):
        return
    try:
        client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")
    except Exception:
        if not client.has_collection(name):
            raise


def query_all(
    client: Any, collection: str, filter: str, fields: list[str], timeout_s: float | None = None
) -> Iterator[dict[str, Any]]:
    """Every row of `collection` matching `filter` (past a query's limit: through an iterator), each
    request within `timeout_s`."""
    it = client.query_iterator(collection, batch_size=4096, filter=filter, output_fields=fields, timeout=timeout_s)
    try:
        while batch := it.next():
            yield from batch
    finally:
        it.close()


def _kept(hits: list[dict[str, Any]], skip: list[int], k: int) -> SearchResult:
    skipped = set(skip)
    kept = [(int(h["id"]), float(h["distance"])) for h in hits if int(h["id"]) not in skipped][:k]
    return SearchResult(np.array([i for i, _ in kept], np.int64), np.array([s for _, s in kept], np.float32))


class MilvusRebuild:
    """A full rebuild of a Milvus index into a new generation (see `rebuilding`)."""

    def __init__(self, store: MilvusStore) -> None:
        self.store = store
        self.old = store.collection
        self.started_us = now_us()
        self.held_at_start = set(store.rows(self.old))  # to tell the deletes made while it fills

    def save(self, ids: np.ndarray, vectors: np.ndarray, meta: dict[str, object] | None = None) -> MilvusStore:
        """Fill a new generation with these posts, carry over the writes made to the serving one
        since the rebuild started, point the index at the new one, carry over the writes that raced
        the swap, and drop the generations before the old one (a reader may still be searching
        the old one in its current batch)."""
        del meta  # the collection's schema is its metadata
        store = self.store
        ids = np.asarray(ids, np.int64).reshape(-1)
        vectors = np.ascontiguousarray(vectors, np.float32)
        if vectors.shape != (len(ids), store.dim):
            raise IndexStoreError(f"expected {len(ids)} vectors of dim {store.dim}, got {list(vectors.shape)}")
        check_unit(vectors)
        new = store.create_generation()
        store._upsert(new, ids, vectors, np.full(len(ids), self.started_us, np.int64))
        seen = self._carry_over(new, self.held_at_start, self.started_us)
        store.point(new)
        store.collection = new
        # Writes that reached the old generation around the swap. A writer resolves the generation
        # before each batch, so one that resolved just before the swap and wrote after this read is
        # the window left: milliseconds, once per rebuild.
        self._carry_over(new, seen, self.started_us)
        for name in store.generations():
            if name not in (new, self.old):
                store.client.drop_collection(name)
        logger.info("Milvus index %s: rebuilt into %s (%d posts), was %s", store.name, new, len(ids), self.old)
        return store

    def _carry_over(self, new: str, held_before: set[int], since_us: int) -> set[int]:
        """Apply to `new` what the old generation took since `since_us`: the upserts newer than the
        new one's row, and the deletes (ids held before and gone now). Returns the ids held now."""
        store = self.store
        held_now = store.rows(self.old)
        gone = sorted(held_before - set(held_now))
        if gone:
            store.client.delete(new, ids=gone)
        recent = store.rows(self.old, f"written_at > {since_us}", full=True)
        if recent:
            ours = store.rows(new, f"id in {sorted(recent)}")
            newer = [i for i, row in recent.items() if i not in ours or row.written_at > ours[i].written_at]
            if newer:
                store._upsert(
                    new,
                    np.array(newer, np.int64),
                    np.array([recent[i].vector for i in newer], np.float32),
                    np.array([recent[i].written_at for i in newer], np.int64),
                    [recent[i].features for i in newer],
                )
        logger.info("carried %d upserts and %d deletes over into %s", len(recent), len(gone), new)
        return set(held_now)


@contextmanager
def rebuilding(store: MilvusStore) -> Iterator[MilvusRebuild]:
    """A rebuild of `store`'s index: enter before reading the corpus (writes made from then on are
    carried over), `save` once the vectors are in hand."""
    store.refresh()
    yield MilvusRebuild(store)


class MilvusFollowed:
    """What a serving model follows in Milvus (the counterpart of `FollowedIndex`): the index by
    its name, re-resolved before each batch so that a rebuild's swap is seen at the next one."""

    def __init__(self, uri: str, dim: int, collection: str, owner: str) -> None:
        self.owner = owner
        self.index = MilvusStore(uri, dim, collection)
        logger.info(
            "%s: Milvus index %s (%s) at %s, %d posts", owner, collection, self.index.collection, uri, len(self.index)
        )

    def refresh(self) -> None:
        try:
            self.index.refresh()
        except Exception:
            logger.exception(
                "%s: could not resolve the Milvus index %s; serving %s",
                self.owner,
                self.index.name,
                self.index.collection,
            )


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
        self.port_file.write_text(f"{self.port}\n")  # for `shared_lite` in other processes
        logger.info("Milvus Lite serving %s on %s", self.db_file, self.uri)
        return self

    @property
    def port_file(self) -> Path:
        return _port_file(self.db_file)

    def stop(self) -> None:
        if self._server is not None:
            self.port_file.unlink(missing_ok=True)
            self._server.stop()
            self._server = None
        if self._lock >= 0:
            os.close(self._lock)  # releases the flock
            self._lock = -1

    def __enter__(self) -> MilvusLite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_SHARED: dict[Path, MilvusLite] = {}


def connect(uri: str) -> str:
    """The address a client connects to for `uri`: a Milvus server's as it is; a local file (Milvus
    Lite) through `shared_lite`."""
    return uri if "://" in uri else shared_lite(Path(uri))


def _port_file(db_file: Path) -> Path:
    """Where the process serving a Milvus Lite file says on which port."""
    return db_file.with_name(db_file.name + ".port")


def shared_lite(db_file: Path, timeout_s: float = 60.0) -> str:
    """The URI of the Milvus Lite server of `db_file`: the one another process serves (the launcher,
    another Triton stub), or one this process starts and serves for its life."""
    db_file = Path(db_file).resolve()
    if db_file in _SHARED:
        return _SHARED[db_file].uri
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _SHARED[db_file] = MilvusLite(db_file).start()
            return _SHARED[db_file].uri
        except IndexStoreError:
            try:  # the port file may be missing or half-written while its server starts
                port = int(_port_file(db_file).read_text())
                with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                    return f"http://127.0.0.1:{port}"
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def milvus_uri(configured: str | None) -> str | None:
    """The Milvus to serve from: $FEEDSERVE_MILVUS_URI, else the configured one (None: the local
    index); a local file is shared through `shared_lite`."""
    uri = os.environ.get(MILVUS_URI_ENV) or configured
    return connect(uri) if uri else None
