"""Search engines of the post index: PyTorch (chunked matmul + top-k) against faiss, on CPU here
and on a GPU where the `gpu` tests run."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from feedserve.errors import IndexStoreError
from feedserve.index.engines import Engine
from feedserve.index.store import PostIndex
from feedserve.index.torch_engine import TorchFlatIndex, exact_topk

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _pair(engine: Engine, n: int = 3000, d: int = 32) -> tuple[PostIndex, PostIndex]:
    vectors = _unit(np.random.default_rng(0), n, d)
    ids = np.arange(n, dtype=np.int64) * 7 + 11  # ids are not positions
    reference, other = PostIndex(d), PostIndex(d, engine=engine)
    for index in (reference, other):
        index.upsert(ids, vectors)
    return reference, other


def _same_results(a: PostIndex, b: PostIndex, queries: np.ndarray, k: int, exclude: list[np.ndarray]) -> None:
    for x, y in zip(
        a.search(queries, [k] * len(queries), exclude), b.search(queries, [k] * len(queries), exclude), strict=True
    ):
        assert x.ids.tolist() == y.ids.tolist()
        np.testing.assert_allclose(x.scores, y.scores, atol=1e-5)


@pytest.mark.parametrize(("chunk_rows", "block"), [(37, 128), (1 << 20, 3), (997, 4)])
def test_chunked_blocked_topk_is_the_exact_answer(chunk_rows: int, block: int) -> None:
    rng = np.random.default_rng(1)
    vectors, queries = _unit(rng, 1000, 16), _unit(rng, 9, 16)
    index = TorchFlatIndex(vectors, device="cpu", dtype="fp32", chunk_rows=chunk_rows, block=block)
    scores, rows = index.search(queries, 25)
    expected = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :25]
    assert rows.tolist() == expected.tolist()
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ vectors.T, expected, axis=1), atol=1e-5)


def test_blocked_topk_equals_torch_topk_with_a_ragged_tail() -> None:
    scores = torch.randn(9, 10_001)  # 156 blocks of 64 and a tail of 17: >= 4k blocks, the blocked path
    values, indices = exact_topk(scores, 20, block=64)
    top = torch.topk(scores, 20, dim=1)
    assert torch.equal(values, top.values) and torch.equal(indices, top.indices)


def test_torch_engine_follows_writes_and_exclusions() -> None:
    reference, other = _pair(Engine("torch", device="cpu", dtype="fp32"))
    rng = np.random.default_rng(2)
    queries = _unit(rng, 4, 32)
    exclude = [np.array([11, 18, -1]), np.empty(0, np.int64), np.array([25]), np.empty(0, np.int64)]
    _same_results(reference, other, queries, 10, exclude)
    # A replaced vector and a deleted id are seen by the very next search.
    top = other.search(queries[:1], [1])[0].ids[0]
    for index in (reference, other):
        index.delete(np.array([top]))
        index.upsert(np.array([5]), queries[1:2])
    assert top not in other.search(queries[:1], [50])[0].ids
    assert other.search(queries[1:2], [1])[0].ids.tolist() == [5]
    _same_results(reference, other, queries, 10, exclude)


# One write: (ids to upsert, ids to delete), drawn from a small id space so that writes replace,
# delete and re-add the same posts, and the same id can be upserted and deleted in one write.
WRITES = st.lists(
    st.tuples(st.sets(st.integers(0, 40), max_size=12), st.sets(st.integers(0, 40), max_size=6)),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(WRITES, st.integers(0, 2**31))
def test_torch_device_copy_follows_writes_in_place(writes: list[tuple[set[int], set[int]]], seed: int) -> None:
    """The device copy takes each write in place (overwrite, append, regrowth, swap-remove), keeps the
    store's row layout, and answers as the store does after every write; it is never rebuilt."""
    rng = np.random.default_rng(seed)
    reference, other = PostIndex(8), PostIndex(8, engine=Engine("torch", device="cpu", dtype="fp32"))
    for index in (reference, other):
        index.upsert(np.array([100, 101]), _unit(np.random.default_rng(0), 2, 8))
    queries = _unit(rng, 3, 8)
    other.search(queries, [1] * 3)  # builds the device copy
    device = other._device
    with mock.patch.object(TorchFlatIndex, "MIN_CAPACITY", 1):  # regrow often
        for upserts, deletes in writes:
            ids = np.array(sorted(upserts), np.int64)
            vectors = _unit(rng, len(ids), 8)
            for index in (reference, other):
                index.write(ids, vectors, np.array(sorted(deletes), np.int64))
            assert len(device) == len(reference)  # type: ignore[arg-type]
            # Row for row the store's layout, so that every engine and replica breaks exact ties alike.
            assert device.ids.tolist() == other._ids[: len(other)].tolist()  # type: ignore[union-attr]
            np.testing.assert_array_equal(device.vectors.numpy(), other._vectors())  # type: ignore[union-attr]
            _same_results(reference, other, queries, 50, [np.empty(0, np.int64)] * 3)
    assert other._device is device
    # The device copy's own writes never reach the store it was built from.
    (ids, vectors), (other_ids, other_vectors) = reference.snapshot(), other.snapshot()
    assert dict(zip(ids.tolist(), vectors.tolist(), strict=True)) == dict(
        zip(other_ids.tolist(), other_vectors.tolist(), strict=True)
    )


def test_a_failed_device_write_keeps_the_store_write_and_rebuilds_the_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    reference, other = _pair(Engine("torch", device="cpu", dtype="fp32"), n=300)
    queries = _unit(np.random.default_rng(5), 2, 32)
    other.search(queries, [1, 1])

    def out_of_memory(*args: object) -> bool:
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(TorchFlatIndex, "write", out_of_memory)
    for index in (reference, other):
        index.upsert(np.array([3]), queries[:1])
        index.delete(np.array([11]))
    assert other._device is None  # dropped: the next search rebuilds it from the store
    monkeypatch.undo()
    _same_results(reference, other, queries, 20, [np.empty(0, np.int64)] * 2)
    assert other.search(queries[:1], [1])[0].ids.tolist() == [3]


def test_a_store_write_that_fails_halfway_drops_the_device_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """An upsert overwrites present posts before appending new ones; if the append fails, the store
    holds half the write and the device copy, which saw none of it, must not be served."""
    index = PostIndex(4, engine=Engine("torch", device="cpu", dtype="fp32"))
    index.upsert(np.array([1, 2]), np.eye(4, dtype=np.float32)[:2])
    query = np.eye(4, dtype=np.float32)[:1]
    index.search(query, [1])

    def out_of_memory(*args: object) -> None:
        raise MemoryError("growing the store")

    monkeypatch.setattr(index, "_append", out_of_memory)
    with pytest.raises(MemoryError):
        index.upsert(np.array([1, 3]), np.eye(4, dtype=np.float32)[[3, 2]])
    assert index._device is None
    monkeypatch.undo()
    top = index.search(np.eye(4, dtype=np.float32)[3:], [1])[0]  # post 1's new vector, which the store holds
    assert top.ids.tolist() == [1] and top.scores[0] == 1


def test_engine_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown kNN engine"):
        Engine("annoy")
    with pytest.raises(ValueError, match="fp32 only"):
        TorchFlatIndex(np.zeros((2, 4), np.float32), device="cpu", dtype="fp16")
    index = PostIndex(4, engine=Engine("faiss-gpu"))
    index.upsert(np.array([1]), np.ones((1, 4), np.float32) / 2)
    if not hasattr(__import__("faiss"), "GpuIndexFlatIP"):
        with pytest.raises(IndexStoreError, match="faiss-gpu"):
            index.search(np.ones((1, 4), np.float32), [1])


@pytest.mark.gpu
@CUDA
def test_gpu_torch_engine_fp32_returns_the_faiss_ids() -> None:
    reference, gpu = _pair(Engine("torch", device="cuda", dtype="fp32"), n=200_000, d=256)
    queries = _unit(np.random.default_rng(3), 64, 256)
    _same_results(reference, gpu, queries, 100, [np.empty(0, np.int64)] * 64)


@pytest.mark.gpu
@CUDA
def test_gpu_torch_engine_fp16_agrees_with_faiss_up_to_rounding() -> None:
    reference, gpu = _pair(Engine("torch", device="cuda", dtype="fp16"), n=200_000, d=256)
    queries = _unit(np.random.default_rng(4), 64, 256)
    none = [np.empty(0, np.int64)] * 64
    overlap = []
    for x, y in zip(reference.search(queries, [100] * 64, none), gpu.search(queries, [100] * 64, none), strict=True):
        overlap.append(len(set(x.ids.tolist()) & set(y.ids.tolist())) / 100)
        # fp16 storage moves a score by about 1e-3; the k-th best scores agree to that.
        assert abs(x.scores[-1] - y.scores[-1]) < 2e-3
    assert np.mean(overlap) >= 0.99


@pytest.mark.gpu
@CUDA
def test_gpu_torch_engine_takes_writes_in_place() -> None:
    reference, gpu = _pair(Engine("torch", device="cuda", dtype="fp32"), n=200_000, d=256)
    rng = np.random.default_rng(6)
    queries = _unit(rng, 64, 256)
    none = [np.empty(0, np.int64)] * 64
    gpu.search(queries, [1] * 64)
    device = gpu._device
    for index in (reference, gpu):
        index.upsert(np.arange(5_000_000, 5_000_064), queries)  # new posts: each query's best match
        index.upsert(np.arange(11, 11 + 7 * 64, 7), _unit(np.random.default_rng(7), 64, 256))  # replaced
        index.delete(np.arange(11 + 7 * 100, 11 + 7 * 200, 7))
    _same_results(reference, gpu, queries, 100, none)
    assert gpu._device is device


def test_a_batch_is_searched_as_deep_as_its_deepest_row_not_its_largest_k_plus_its_widest_exclusion() -> None:
    """A row of k=1 excluding a member's 1,000 history posts batched with a row of k=1,000: 1,001 deep
    (each row's k plus its own exclusions), not 2,000; every row still gets its k."""
    rng = np.random.default_rng(3)
    index = PostIndex(16)
    index.upsert(np.arange(3000), _unit(rng, 3000, 16))
    queries = _unit(rng, 2, 16)
    history = index.search(queries[:1], [1000])[0].ids  # the first row's best 1,000, excluded
    with mock.patch.object(index, "_search", wraps=index._search) as search:
        first, second = index.search(queries, [1, 1000], [history, np.empty(0, np.int64)])
    assert search.call_args.args[1] == 1001
    assert len(first.ids) == 1 and first.ids[0] not in history and len(second.ids) == 1000
