"""The Milvus post store against the real embedded engine (Milvus Lite), never a mock: the same
answers as the in-process index through upserts, replacements, deletes and history exclusion, and
writes seen at once by another client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("milvus_lite")

from feedserve.errors import IndexStoreError
from feedserve.index import milvus
from feedserve.index.milvus import MilvusLite, MilvusStore
from feedserve.index.store import PostIndex

DIM = 16


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def lite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusLite]:
    with MilvusLite(tmp_path_factory.mktemp("milvus") / "posts.db") as server:
        yield server


def _same(store: MilvusStore, index: PostIndex, rng: np.random.Generator, exclude: list[np.ndarray]) -> None:
    queries = _unit(rng, len(exclude))
    ks = [10] * len(exclude)
    for got, want in zip(store.search(queries, ks, exclude), index.search(queries, ks, exclude), strict=True):
        assert got.ids.tolist() == want.ids.tolist()
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)


def test_the_store_answers_as_the_in_process_index(lite: MilvusLite, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    store, index = MilvusStore(lite.uri, DIM, collection="equal"), PostIndex(DIM)
    ids = np.arange(1000, 1600, dtype=np.int64)
    vectors = _unit(rng, len(ids))
    for target in (store, index):
        target.write(ids, vectors, np.empty(0, np.int64))
    assert len(store) == len(index) == 600
    replaced, deleted = ids[:50], ids[50:80]
    new_vectors = _unit(rng, 50)
    assert store.write(replaced, new_vectors, deleted) == index.write(replaced, new_vectors, deleted) == 30
    assert len(store) == len(index) == 570
    history = [np.array([], np.int64), ids[100:140], np.concatenate([ids[:5], [-1, -1, 10**12]])]
    _same(store, index, rng, history)
    monkeypatch.setattr(milvus, "MAX_LIMIT", 60)  # a history too long to over-fetch: excluded by a filter
    _same(store, index, rng, [ids[80:200], ids[300:309], ids[400:455]])
    asked = np.array([1000, 1060, 1599, 10**12], np.int64)  # replaced, deleted, kept, never written
    for (got, found), (want, want_found) in [(store.lookup(asked), index.lookup(asked))]:
        np.testing.assert_array_equal(found, want_found)
        np.testing.assert_allclose(got, want, atol=1e-7)
    assert store.write(np.empty(0, np.int64), None, np.array([10**12], np.int64)) == 0  # deletes are idempotent


def test_a_write_is_seen_at_once_through_another_client(lite: MilvusLite) -> None:
    rng = np.random.default_rng(1)
    writer, reader = MilvusStore(lite.uri, DIM, collection="fresh"), MilvusStore(lite.uri, DIM, collection="fresh")
    vector = _unit(rng, 1)
    writer.write(np.array([7], np.int64), vector, np.empty(0, np.int64))
    assert reader.search(vector, [1])[0].ids.tolist() == [7]
    writer.write(np.empty(0, np.int64), None, np.array([7], np.int64))
    assert reader.search(vector, [1])[0].ids.tolist() == []


def test_bad_writes_and_widths_are_refused(lite: MilvusLite, tmp_path: Path) -> None:
    store = MilvusStore(lite.uri, DIM, collection="strict")
    with pytest.raises(IndexStoreError, match="unit length"):
        store.write(np.array([1], np.int64), np.full((1, DIM), 3.0, np.float32), np.empty(0, np.int64))
    with pytest.raises(IndexStoreError, match="vectors of dim 16"):
        store.write(np.array([1], np.int64), np.ones((1, 3), np.float32), np.empty(0, np.int64))
    with pytest.raises(IndexStoreError, match="holds 16-wide vectors, not 32"):
        MilvusStore(lite.uri, 32, collection="strict")
    with pytest.raises(IndexStoreError, match="another process serves it"):
        MilvusLite(lite.db_file).start()  # one server a file


def test_a_rebuild_swaps_in_whole_with_the_writes_made_while_it_filled(lite: MilvusLite) -> None:
    rng = np.random.default_rng(2)
    writer, reader = MilvusStore(lite.uri, DIM, collection="rebuilt"), MilvusStore(lite.uri, DIM, collection="rebuilt")
    old = writer.collection
    writer.write(np.arange(100), _unit(rng, 100), np.empty(0, np.int64))
    with milvus.rebuilding(MilvusStore(lite.uri, DIM, collection="rebuilt")) as rebuild:
        # While the rebuild reads its corpus, the serving generation takes writes.
        late = _unit(rng, 3)
        writer.write(np.array([5, 500, 501]), late, np.array([7, 8], np.int64))
        corpus_ids = np.arange(0, 60)  # the corpus as the rebuild read it: 5, 7 and 8 among it
        corpus = _unit(rng, 60)
        assert reader.refresh() is False and len(reader) == 100  # nothing of the rebuild is seen yet
        rebuild.save(corpus_ids, corpus)
    assert reader.refresh() is True and reader.collection != old
    want = PostIndex(DIM)
    want.write(corpus_ids, corpus, np.empty(0, np.int64))
    want.write(np.array([5, 500, 501]), late, np.array([7, 8], np.int64))  # carried over on top
    assert len(reader) == len(want) == 60
    queries = np.concatenate([late, _unit(rng, 4)])
    for got, expected in zip(reader.search(queries, [10] * 7), want.search(queries, [10] * 7), strict=True):
        assert got.ids.tolist() == expected.ids.tolist()
    # The writer still pointing at the old generation moves to the new one before its next write.
    assert writer.refresh() is True
    # A second rebuild drops the generation before the one it replaces.
    with milvus.rebuilding(writer) as again:
        again.save(np.arange(3), _unit(rng, 3))
    assert old not in writer.generations() and len(writer.generations()) == 2


def test_a_write_that_races_the_swap_is_carried_over(lite: MilvusLite, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    store, writer = MilvusStore(lite.uri, DIM, collection="raced"), MilvusStore(lite.uri, DIM, collection="raced")
    store.write(np.arange(10), _unit(rng, 10), np.empty(0, np.int64))
    raced = _unit(rng, 1)
    point = MilvusStore.point

    def write_then_point(self: MilvusStore, collection: str) -> None:
        # A writer that resolved the old generation just before the swap writes there.
        writer.write(np.array([77]), raced, np.array([3], np.int64))
        point(self, collection)

    monkeypatch.setattr(MilvusStore, "point", write_then_point)
    with milvus.rebuilding(store) as rebuild:
        rebuild.save(np.arange(10), _unit(rng, 10))
    found, held = store.lookup(np.array([77, 3, 4]))
    assert held.tolist() == [True, False, True]
    np.testing.assert_allclose(found[0], raced[0], atol=1e-6)


def test_features_stored_with_a_post_reach_the_ranker_over_the_builds_table(lite: MilvusLite) -> None:
    from feedserve.index.milvus import MilvusFollowed
    from feedserve.rank.features import PostFeatures
    from feedserve.triton.rank import _Posts

    rng = np.random.default_rng(4)
    store = MilvusStore(lite.uri, DIM, collection="featured")
    live = {"percentiles": [0.9, 0.5], "tags": ["new"]}
    store.write(np.array([1, 2]), _unit(rng, 2), np.empty(0, np.int64), [live, {}])
    table = PostFeatures({2: [0.1, 0.2], 3: [0.3, 0.4]}, {2: ["old"], 3: ["kept"]})  # the build's
    posts = _Posts(MilvusFollowed(lite.uri, DIM, "featured", "rank"), DIM, table)
    content, features = posts.fetch(np.array([3, 1, 2, 1]))
    vectors, found = content.lookup(np.array([1, 2, 3]))
    assert found.tolist() == [True, True, False]  # 3 is in the table, not in the index
    np.testing.assert_allclose(features.percentiles([1, 2, 3]), [[0.9, 0.5], [0.1, 0.2], [0.3, 0.4]])
    assert [features.tag_union([p]) for p in (1, 2, 3)] == [{"new"}, {"old"}, {"kept"}]
    # A rebuild keeps the features written while it filled; the rebuilt rows have none of their own.
    with milvus.rebuilding(store) as rebuild:
        store.write(np.array([5]), _unit(rng, 1), np.empty(0, np.int64), [live])
        rebuild.save(np.array([1, 2]), _unit(rng, 2))
    _, found, rows = store.lookup_rows(np.array([1, 5]))
    assert found.all() and rows == {5: {"percentiles": (0.9, 0.5), "tags": ("new",)}}  # 1 has none
    with pytest.raises(IndexStoreError, match="feature rows"):
        store.write(np.array([6, 7]), _unit(rng, 2), np.empty(0, np.int64), [live])


def test_stores_opened_together_on_an_empty_milvus_share_one_generation(lite: MilvusLite) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:  # as the models of a server load, in parallel
        stores = list(pool.map(lambda _: MilvusStore(lite.uri, DIM, collection="together"), range(4)))
    assert len({s.collection for s in stores}) == 1 and stores[0].generations() == [stores[0].collection]
    stores[0].write(np.array([1]), _unit(np.random.default_rng(5), 1), np.empty(0, np.int64))
    assert all(len(s) == 1 for s in stores)
