"""`index_write` (the live index's writer) and `knn` (its followers), on plain numpy: writes are
acknowledged with their LSN, seen by the next search, and a bad request fails alone."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from feedserve.artifacts import ArtifactLayout
from feedserve.clients.batch import build_index
from feedserve.index.engines import Engine
from feedserve.index.store import PostIndex
from feedserve.index.wal import read_records
from feedserve.ops.keys import WRITE_HEADER, WRITE_KEY_ENV
from feedserve.ops.manifest import write_manifest
from feedserve.triton.base import RequestError
from feedserve.triton.index_write import IndexWriteModel
from feedserve.triton.knn import KnnModel

DIM = 32  # the tiny artifacts' serving dimension
KEYED = {WRITE_HEADER: os.environ[WRITE_KEY_ENV]}  # the parameters Triton forwards from a keyed client


class _Writer(IndexWriteModel):
    """index_write as a client holding the write key reaches it."""

    def run(self, batch, parameters=None):  # type: ignore[no-untyped-def]
        return super().run(batch, parameters if parameters is not None else [KEYED] * len(batch))


@pytest.fixture
def layout(tiny_artifacts: ArtifactLayout, tmp_path: Path) -> ArtifactLayout:
    out = ArtifactLayout(tmp_path)
    (tmp_path / "hf").mkdir()
    shutil.copy(tiny_artifacts.hf_dir / "config.json", out.hf_dir / "config.json")
    shutil.copy(tiny_artifacts.settings, out.settings)
    write_manifest(out.root, [out.settings, out.hf_dir / "config.json"])  # what index_write checks it reads
    return out


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _write(ops: list[int], ids: list[int], vectors: np.ndarray | None) -> dict[str, np.ndarray | None]:
    return {"OP": np.array(ops, np.int64)[:, None], "POST_ID": np.array(ids, np.int64)[:, None], "EMBEDDING": vectors}


def _search(knn: KnnModel, q: np.ndarray, k: int) -> list[int]:
    out = knn.run([{"QUERY": q, "K": np.array([[k]], np.int64)}])[0]
    assert not isinstance(out, RequestError)
    return [i for i in out["IDS"][0].tolist() if i != -1]


def test_writes_are_acknowledged_then_seen_by_every_follower(layout: ArtifactLayout) -> None:
    rng = np.random.default_rng(0)
    writer = _Writer()
    writer.setup(layout, {"snapshot_every": "3"})
    followers = [KnnModel(), KnnModel()]
    for knn in followers:
        knn.setup(layout, {"max_k": "50"})
    vectors = _unit(rng, 10)
    out = writer.run([_write([1] * 10, list(range(10)), vectors)])[0]
    assert not isinstance(out, RequestError) and out["LSN"].ravel().tolist() == [1] * 10
    q = vectors[3:4]
    assert all(_search(knn, q, 1) == [3] for knn in followers)
    # A delete and a re-embedding in one request: one record, one lsn.
    moved = _unit(rng, 1)
    out = writer.run([_write([2, 1], [3, 7], np.concatenate([np.zeros((1, DIM), np.float32), moved]))])[0]
    assert out["LSN"].ravel().tolist() == [2, 2]
    for knn in followers:
        assert 3 not in _search(knn, q, 50)
        assert _search(knn, moved, 1) == [7]
    # The third write reaches snapshot_every=3: a snapshot on a background thread and a new log;
    # the followers go on following it without reloading.
    writer.run([_write([1], [11], _unit(rng, 1))])
    writer.snapshots.join()
    assert PostIndex.load(layout.index).meta["lsn"] == 3
    writer.run([_write([1], [12], _unit(rng, 1))])
    with open(layout.index.with_suffix(".wal"), "rb") as log:
        assert [r.lsn for r in read_records(log)] == [4]
    for knn in followers:
        assert set(_search(knn, q, 50)) == {0, 1, 2, 4, 5, 6, 7, 8, 9, 11, 12}
        assert knn.followed.live is not None and knn.followed.live.reloads == 0


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (_write([3], [5], np.zeros((1, DIM), np.float32)), "must be 1 (upsert) or 2 (delete)"),
        (_write([1], [5], None), "EMBEDDING is missing"),
        (_write([1], [5], np.zeros((1, DIM + 1), np.float32)), f"must have shape [n, {DIM}]"),
        (_write([1], [5], np.full((1, DIM), np.nan, np.float32)), "NaN"),
        (_write([1, 2], [5, 5], np.zeros((2, DIM), np.float32)), "appears twice"),
        (
            {"OP": np.array([[1]], np.int32), "POST_ID": np.array([[5]], np.int64), "EMBEDDING": None},
            "OP: expected dtype int64",
        ),
    ],
)
def test_a_bad_write_fails_alone_and_logs_nothing(
    layout: ArtifactLayout, bad: dict[str, np.ndarray | None], words: str
) -> None:
    writer = _Writer()
    writer.setup(layout, {})
    good = _write([1], [1], _unit(np.random.default_rng(1), 1))
    failed, ok = writer.run([bad, good])
    assert isinstance(failed, RequestError) and words in str(failed)
    assert not isinstance(ok, RequestError) and ok["LSN"].tolist() == [[1]]  # the bad one took no lsn


def test_a_rebuilt_index_is_picked_up_by_the_writer(layout: ArtifactLayout) -> None:
    rng = np.random.default_rng(2)
    writer = _Writer()
    writer.setup(layout, {})
    writer.run([_write([1], [1], _unit(rng, 1))])
    build_index(np.arange(100, 110), _unit(rng, 10), layout.index)  # what `feedserve index` does
    writer.run([_write([1], [200], _unit(rng, 1))])
    # The rebuild replaced the index as of its time: the write before it is not replayed on top.
    assert set(writer.live.index.snapshot()[0].tolist()) == set(range(100, 110)) | {200}
    follower = KnnModel()
    follower.setup(layout, {"max_k": "50"})
    assert set(_search(follower, _unit(rng, 1), 50)) == set(range(100, 110)) | {200}


def test_a_write_the_disk_failed_is_unavailable_and_the_writer_recovers(
    layout: ArtifactLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    from feedserve.index import wal as index_log
    from feedserve.triton.base import Unavailable

    rng = np.random.default_rng(3)
    writer = _Writer()
    writer.setup(layout, {})

    def disk_error(*args: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(index_log.os, "fsync", disk_error)
    monkeypatch.setattr(index_log.os, "ftruncate", disk_error)  # the undo fails too: the log refuses writes
    failed = writer.run([_write([1], [1], _unit(rng, 1))])[0]
    assert isinstance(failed, Unavailable) and "Input/output error" in str(failed)  # retryable, not "invalid"
    monkeypatch.undo()
    ok = writer.run([_write([1], [2], _unit(rng, 1))])[0]  # reopened from what is on disk
    assert not isinstance(ok, RequestError)
    assert 2 in set(writer.live.index.snapshot()[0].tolist())


def test_writes_need_the_write_key_and_unit_vectors(layout: ArtifactLayout, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    writer = _Writer()
    writer.setup(layout, {})
    write = _write([1], [5], _unit(rng, 1))
    no_key, wrong_key, keyed = writer.run([write] * 3, [{}, {WRITE_HEADER: "guess"}, KEYED])
    assert isinstance(no_key, RequestError) and "forbidden: the request carries no write key" in str(no_key)
    assert isinstance(wrong_key, RequestError) and "forbidden: the request carries a wrong write key" in str(wrong_key)
    assert not isinstance(keyed, RequestError)
    # One huge vector would rank first for every member: any vector off unit length is refused.
    for vector in (np.full((1, DIM), 3e38, np.float32), 2 * _unit(rng, 1), np.zeros((1, DIM), np.float32)):
        out = writer.run([_write([1], [6], vector)])[0]
        assert isinstance(out, RequestError) and "unit length" in str(out), out
    assert read_records_count(layout) == 1  # only the keyed, unit write was logged
    # A server started without a key refuses every write.
    monkeypatch.delenv(WRITE_KEY_ENV)
    writer.finalize()
    unkeyed = _Writer()
    unkeyed.setup(layout, {})
    out = unkeyed.run([_write([1], [7], _unit(rng, 1))])[0]
    assert isinstance(out, RequestError) and "the server has no write key" in str(out)
    unkeyed.finalize()


def read_records_count(layout: ArtifactLayout) -> int:
    with open(layout.index_dir.log, "rb") as log:
        return len(list(read_records(log)))


def test_records_sent_with_upserts_give_the_ranker_each_posts_features(
    tiny_artifacts: ArtifactLayout, layout: ArtifactLayout
) -> None:
    """The ingester sends each post's record: the local index keeps its count percentiles and tags
    beside its vector (logged, snapshotted), and `rank` reads them over the build's table."""
    import json

    from feedserve.rank.features import PostFeatures
    from feedserve.triton.base import followed_index
    from feedserve.triton.rank import _Posts

    shutil.copy(tiny_artifacts.buckets, layout.buckets)
    rng = np.random.default_rng(5)
    writer = _Writer()
    writer.setup(layout, {"snapshot_every": "1"})
    post = {"id": 7, "text": "new", "tags": ["drama", "ml"], "counts": {"ratings": 10_000, "mean_rating": 4.5}}
    records = np.array([[json.dumps(post).encode()], [b'{"id": 8}'], [b'{"id": 9}']], object)
    (out,) = writer.run([{**_write([1, 1, 2], [7, 8, 9], _unit(rng, 3)), "RECORDS": records}])
    assert not isinstance(out, RequestError)
    writer.finalize()  # the snapshot taken after the write has landed
    table = PostFeatures({8: [0.5, 0.5], 10: [0.2, 0.3]}, {8: ["old"], 10: ["kept"]})  # the build's
    posts = _Posts(followed_index(layout, {}, Engine(), "rank"), DIM, table)
    _, features = posts.fetch(np.array([7, 8, 10]))
    seven = features.percentiles([7])[0]
    assert seven.min() > 0.5 and features.tag_union([7]) == {"drama", "ml"}
    # 8 was written with a record holding no counts or tags: that is what it holds now.
    assert features.percentiles([8]).tolist() == [[0.0, 0.0]] and features.tag_union([8]) == frozenset()
    assert features.percentiles([10]).tolist() == [pytest.approx([0.2, 0.3])] and features.tag_union([10]) == {"kept"}
    assert PostIndex.load(layout.index).lookup_rows(np.array([7]))[2][7]["tags"] == ("drama", "ml")


def test_written_posts_counts_are_cut_at_the_ranker_tables_points(
    tiny_artifacts: ArtifactLayout, layout: ArtifactLayout
) -> None:
    """A feed ranker's table holds its own counts and cut points (not the prompts' MovieLens ones):
    a post written later has its counts read as that table's are."""
    import json

    from feedserve.prompt.buckets import PercentileBuckets
    from feedserve.rank.features import PostFeatures

    for path in tiny_artifacts.ranker_files():
        shutil.copy(path, layout.root / path.name)
    shutil.copy(tiny_artifacts.buckets, layout.buckets)  # the prompts': no views or likes in them
    buckets = PercentileBuckets.fit({"views": list(range(1000)), "likes": list(range(100))})
    PostFeatures({}, {}, ("views", "likes"), buckets=buckets).save(layout.post_features)
    writer = _Writer()
    writer.setup(layout, {"snapshot_every": "1"})
    post = {"id": 7, "text": "new", "counts": {"views": 500, "likes": 90}}
    records = np.array([[json.dumps(post).encode()]], object)
    (out,) = writer.run([{**_write([1], [7], _unit(np.random.default_rng(2), 1)), "RECORDS": records}])
    assert not isinstance(out, RequestError)
    writer.finalize()
    row = PostIndex.load(layout.index).lookup_rows(np.array([7]))[2][7]
    assert row["percentiles"] == pytest.approx([0.5, 0.9], abs=0.02)
