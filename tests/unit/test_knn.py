from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feedserve.errors import IndexStoreError
from feedserve.index.store import PostIndex
from feedserve.triton.base import RequestError
from feedserve.triton.knn import KnnModel


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def index() -> PostIndex:
    idx = PostIndex(16)
    idx.upsert(np.arange(1000, 1200), _unit(np.random.default_rng(0), 200, 16))
    return idx


def test_search_matches_brute_force(index: PostIndex) -> None:
    ids, vectors = index.snapshot()
    queries = _unit(np.random.default_rng(1), 5, 16)
    results = index.search(queries, [10] * 5)
    expected = ids[np.argsort(-(queries @ vectors.T), axis=1)[:, :10]]
    for r, e in zip(results, expected, strict=True):
        assert r.ids.tolist() == e.tolist()
        assert np.all(np.diff(r.scores) <= 1e-6)


@pytest.mark.parametrize("n_queries", [1, 7, 300])
def test_the_matmul_search_returns_what_faiss_returns(
    index: PostIndex, n_queries: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import faiss

    rng = np.random.default_rng(2)
    index.delete(np.arange(1000, 1200, 3))  # rows move (swap-remove): the view must follow
    index.upsert(np.array([5, 1001]), _unit(rng, 2, 16))
    queries = _unit(rng, n_queries, 16)
    monkeypatch.setattr("feedserve.index.store.SCORE_BUDGET", 1000)  # several chunks of queries
    for depth in (1, 10, len(index)):  # depth == every post: a full sort
        scores, ids = index._blas_search(queries, depth)
        want_scores, want_rows = index._flat.search(queries, depth)
        assert (ids == index._ids[want_rows]).mean() > 0.999 and np.allclose(scores, want_scores, atol=1e-5)
    assert isinstance(index._flat, faiss.IndexFlatIP) and index._flat.ntotal == len(index) == 200 - 67 + 1


# One write: (ids to upsert, ids to delete), from a small id space so that writes replace, delete and
# re-add the same posts, and one write may upsert and delete the same id (the delete wins).
WRITES = st.lists(
    st.tuples(st.sets(st.integers(0, 30), max_size=10), st.lists(st.integers(0, 30), max_size=6)),
    min_size=1,
    max_size=15,
)


@settings(max_examples=80, deadline=None)
@given(WRITES, st.integers(0, 2**31))
def test_writes_keep_the_index_equal_to_a_dict_of_vectors(writes: list[tuple[set[int], list[int]]], seed: int) -> None:
    """Against the plainest model of the index, a dict: every post, its vector and the search order,
    after each write of replaced, new and deleted rows (swap-remove moves rows around)."""
    rng = np.random.default_rng(seed)
    index, model = PostIndex(4), {}
    query = _unit(rng, 1, 4)
    for upserts, deletes in writes:
        ids = np.array(sorted(upserts), np.int64)
        vectors = _unit(rng, len(ids), 4)
        removed = index.write(ids, vectors, np.array(deletes, np.int64))
        model.update(zip(ids.tolist(), vectors, strict=True))
        assert removed == sum(model.pop(i, None) is not None for i in set(deletes))
        got_ids, got_vectors = index.snapshot()
        assert sorted(got_ids.tolist()) == sorted(model) and len(index) == len(model)
        for i, v in zip(got_ids.tolist(), got_vectors, strict=True):
            np.testing.assert_array_equal(v, model[i])
        asked = np.array([*model, *deletes, 10**12], np.int64)  # held, deleted, never written
        vectors_found, found_mask = index.lookup(asked)
        for i, v, hit in zip(asked.tolist(), vectors_found, found_mask, strict=True):
            assert hit == (i in model)
            np.testing.assert_array_equal(v, model[i] if hit else np.zeros(4, np.float32))
        found = index.search(query, [len(model)])[0]
        assert sorted(found.ids.tolist()) == sorted(model)
        true_scores = np.array([model[i] @ query[0] for i in found.ids.tolist()])
        np.testing.assert_allclose(found.scores, true_scores, atol=1e-6)
        assert np.all(np.diff(true_scores) <= 1e-6)  # best first (exact ties may come in any order)


def test_exclusion_still_returns_k(index: PostIndex) -> None:
    q = _unit(np.random.default_rng(2), 1, 16)
    top = index.search(q, [20])[0].ids
    excluded = np.concatenate([top[:15], [-1, -1]])  # -1 is padding, not an id
    got = index.search(q, [10], [excluded])[0].ids
    assert len(got) == 10 and not set(got) & set(top[:15])
    assert got[:5].tolist() == top[15:20].tolist()


def test_upsert_replaces_and_delete_removes(index: PostIndex) -> None:
    v = _unit(np.random.default_rng(3), 1, 16)
    index.upsert(np.array([1005]), v)
    assert len(index) == 200
    assert index.search(v, [1])[0].ids.tolist() == [1005]
    assert index.delete(np.array([1005])) == 1
    assert 1005 not in index.search(v, [200])[0].ids


def test_bad_writes_are_refused(index: PostIndex) -> None:
    with pytest.raises(IndexStoreError, match="shape"):
        index.upsert(np.array([1]), np.zeros((1, 8), np.float32))
    with pytest.raises(IndexStoreError, match="duplicate"):
        index.upsert(np.array([1, 1]), np.zeros((2, 16), np.float32))
    with pytest.raises(IndexStoreError, match="NaN"):
        index.upsert(np.array([1]), np.full((1, 16), np.nan, np.float32))
    assert len(index) == 200


def test_save_load_round_trip_and_corruption(index: PostIndex, tmp_path: Path) -> None:
    path = tmp_path / "posts.npz"
    index.save(path)
    loaded = PostIndex.load(path)
    assert sorted(loaded.snapshot()[0].tolist()) == sorted(index.snapshot()[0].tolist())
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(IndexStoreError, match="cannot read index"):
        PostIndex.load(path)


def _knn_model(tmp_path: Path, index: PostIndex) -> KnnModel:
    from feedserve.artifacts import ArtifactLayout

    layout = ArtifactLayout(tmp_path)
    index.save(layout.index)
    model = KnnModel()
    model.setup(layout, {"max_k": "50"})
    return model


def test_knn_model_isolates_bad_requests(index: PostIndex, tmp_path: Path) -> None:
    model = _knn_model(tmp_path, index)
    q = _unit(np.random.default_rng(4), 2, 16)
    good = {"QUERY": q, "K": np.array([[5], [3]], np.int64), "EXCLUDE_IDS": None}
    results = model.run(
        [
            {"QUERY": q[:1], "K": np.array([[0]], np.int64)},
            good,
            {"QUERY": q[:1], "K": np.array([[51]], np.int64)},
            {"QUERY": q[:1].astype(np.float64), "K": np.array([[1]], np.int64)},
            {"QUERY": np.zeros((1, 8), np.float32), "K": np.array([[1]], np.int64)},
            {"QUERY": np.full((1, 16), np.nan, np.float32), "K": np.array([[1]], np.int64)},
            {"K": np.array([[1]], np.int64)},
            # Finite but not an embedding: scores of inf in an arbitrary order before.
            {"QUERY": np.full((1, 16), 3e38, np.float32), "K": np.array([[1]], np.int64)},
            # One row of a million exclusions made every request batched with it search that deep.
            {"QUERY": q[:1], "K": np.array([[1]], np.int64), "EXCLUDE_IDS": np.full((1, 2001), 7, np.int64)},
        ]
    )
    assert isinstance(results[0], RequestError) and "k=0 is out of range [1, 50]" in str(results[0])
    assert not isinstance(results[1], RequestError)
    assert results[1]["IDS"].shape == (2, 5) and (results[1]["IDS"][1, 3:] == -1).all()
    assert "k=51" in str(results[2])
    assert "QUERY: expected dtype float32" in str(results[3])
    assert "dimension 8 does not match the index (16)" in str(results[4])
    assert "NaN" in str(results[5])
    assert "QUERY is missing" in str(results[6])
    assert "QUERY: must be unit length" in str(results[7])
    assert "EXCLUDE_IDS: 2001 ids per row; at most 2000" in str(results[8])


def test_a_vector_of_nan_is_refused_by_the_unit_check() -> None:
    """NaN compares false with the tolerance: the check passed it, and the Milvus index_write, which
    relies on it alone, acknowledged and stored NaN vectors."""
    from feedserve.index.store import check_unit

    unit = np.eye(2, 16, dtype=np.float32)
    check_unit(unit)
    with pytest.raises(IndexStoreError, match="row 1 has NaN or inf"):
        check_unit(np.stack([unit[0], np.full(16, np.nan, np.float32)]))


def test_knn_model_picks_up_a_rebuilt_index(index: PostIndex, tmp_path: Path) -> None:
    model = _knn_model(tmp_path, index)
    v = _unit(np.random.default_rng(5), 1, 16)
    fresh = PostIndex(16)
    fresh.upsert(np.array([7]), v)
    fresh.save(tmp_path / "index" / "posts.npz")
    out = model.run([{"QUERY": v, "K": np.array([[3]], np.int64)}])[0]
    assert out["IDS"].tolist() == [[7]]


def test_knn_model_refuses_a_bad_index_at_load_and_keeps_a_good_one_later(index: PostIndex, tmp_path: Path) -> None:
    import os

    from feedserve.artifacts import ArtifactLayout

    model = _knn_model(tmp_path, index)
    path = tmp_path / "index" / "posts.npz"
    path.write_bytes(b"not an index")
    os.utime(path, ns=(1, 1))  # a new signature even within the filesystem's timestamp resolution
    q = _unit(np.random.default_rng(6), 1, 16)
    out = model.run([{"QUERY": q, "K": np.array([[3]], np.int64)}])[0]
    assert not isinstance(out, RequestError) and out["IDS"].shape == (1, 3)  # the old index still serves
    with pytest.raises(IndexStoreError, match="cannot read index"):
        KnnModel().setup(ArtifactLayout(tmp_path), {"max_k": "50"})  # a model that would answer nothing fails to load


def test_a_query_that_no_longer_fits_after_the_refresh_fails_alone(tmp_path: Path) -> None:
    """Loaded before any index existed, knn checked no width at parse; the refresh before the search
    brought a 16-wide index, and a 7-wide query failed the whole batch with numpy's error."""
    from feedserve.artifacts import ArtifactLayout

    layout = ArtifactLayout(tmp_path)
    model = KnnModel()
    model.setup(layout, {"max_k": "50"})
    assert model.index is None
    index = PostIndex(16)
    v = _unit(np.random.default_rng(6), 1, 16)
    index.upsert(np.array([7]), v)
    index.save(layout.index)
    good, bad = model.run(
        [
            {"QUERY": v, "K": np.array([[1]], np.int64)},
            {"QUERY": _unit(np.random.default_rng(7), 1, 7), "K": np.array([[1]], np.int64)},
        ]
    )
    assert not isinstance(good, RequestError) and good["IDS"].tolist() == [[7]]
    assert isinstance(bad, RequestError) and "dimension 7 does not match the index (16)" in str(bad)
