"""The index's features held as columns (feedserve.index.features) read back as the rows written,
through upserts, replacements, swap-removing deletes, growth, vocabulary compaction, a snapshot and
its reload."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feedserve.index import features as columns
from feedserve.index.features import FeatureRows
from feedserve.index.store import PostIndex

DIM = 4
TAGS = st.lists(st.sampled_from(["a", "b", "c", "drama", "ml", "é", ""]), max_size=4, unique=True)
ROW = st.one_of(
    st.builds(lambda p, t: {"percentiles": p, "tags": t}, st.lists(st.floats(0, 1), min_size=2, max_size=2), TAGS),
    st.builds(lambda p, t: {"percentiles": p, "tags": t}, st.lists(st.floats(0, 1), min_size=1, max_size=1), TAGS),
    st.builds(lambda t: {"percentiles": [1, 0], "tags": t}, TAGS),  # ints: kept as they came
    st.builds(lambda t: {"tags": t, "percentiles": [0.5, 0.5]}, TAGS),  # another order
    st.builds(lambda n: {"percentiles": [0.5, 0.5], "tags": [f"t{i}" for i in range(n)]}, st.integers(15, 18)),
    st.builds(lambda t: {"percentiles": [0.5, 0.5], "tags": t, "extra": 1}, TAGS),
    st.builds(lambda t: {"percentiles": [0.5, 0.5], "tags": [*t, *t]}, TAGS),  # a tag twice: kept as written
    st.just({}),
)
STEP = st.tuples(
    st.lists(st.integers(0, 30), max_size=8, unique=True),  # upserted
    st.lists(ROW, min_size=8, max_size=8),  # their rows (the first ones)
    st.booleans(),  # written with features at all
    st.lists(st.integers(0, 30), max_size=6),  # deleted (after the upserts)
)


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _json(rows: Any) -> dict[int, Any]:
    """Rows as JSON reads them (the index gives lists back as tuples)."""
    return {int(p): json.loads(json.dumps(dict(r))) for p, r in rows.items()}


@settings(max_examples=80, deadline=None)
@given(st.lists(STEP, max_size=12), st.integers(1, 6))
def test_columns_read_back_every_row_as_written(
    tmp_path_factory: pytest.TempPathFactory, steps: list[Any], slack: int
) -> None:
    rng = np.random.default_rng(0)
    model: dict[int, dict[str, Any]] = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(columns, "VOCABULARY_SLACK", slack)  # compactions at every few new tags
        index = PostIndex(DIM)
        for upserts, rows, featured, deletes in steps:
            ups = np.array(upserts, np.int64)
            written = rows[: len(ups)] if featured else None
            index.write(ups, _unit(rng, len(ups)), np.array(deletes, np.int64), written)
            for i, post in enumerate(upserts):
                row = written[i] if written else {}
                if row:
                    model[post] = row
                else:
                    model.pop(post, None)
            for post in deletes:
                model.pop(post, None)
            _, found, got = index.lookup_rows(np.arange(-1, 32))
            assert _json(got) == _json(model)
            assert set(np.arange(-1, 32)[found].tolist()) >= set(model)
    path = tmp_path_factory.mktemp("snapshot") / "posts.npz"
    index.meta["lsn"] = 0
    index.save(path)
    again = PostIndex.load(path)
    assert _json(again.lookup_rows(np.arange(32))[2]) == _json(model)
    assert _json(again.features()) == _json(index.features()) == _json(model)


def test_a_snapshots_columns_name_only_the_tags_in_use_and_read_back_the_rows_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    index = PostIndex(DIM)
    ids = np.array([9, 3, 7])
    rows = [
        {"percentiles": [0.1, 0.2], "tags": ["z", "a"]},
        {"percentiles": [0.3, 0.4], "tags": ["gone"]},
        {"percentiles": [0.5, 0.6], "tags": []},
    ]
    index.write(ids, _unit(rng, 3), np.empty(0, np.int64), rows)
    index.delete(np.array([3]))  # swap-removed: 7 takes its row
    saved = index.features().columns()
    assert saved["feature_ids"].tolist() == [7, 9]
    assert json.loads(saved["feature_vocabulary"].tobytes()) == ["z", "a"]  # as first written; "gone" is
    read = FeatureRows.from_columns(saved, {})
    assert read[9] == {"percentiles": (0.1, 0.2), "tags": ("z", "a")}  # the order written
    assert read[7] == {"percentiles": (0.5, 0.6), "tags": ()}
    with pytest.raises(KeyError):
        read[3]
    assert read.affinity(read.positions(np.array([9, 7])), frozenset({"a", "b"})).tolist() == [
        pytest.approx(1 / 3),
        0.0,
    ]
    assert read.tag_union(read.positions(np.array([9, 7]))) == {"a", "z"}


def test_a_row_with_many_tags_is_held_whole_and_the_columns_stay_narrow() -> None:
    index = PostIndex(DIM)
    wide = {"percentiles": [0.5, 0.5], "tags": [f"t{i}" for i in range(columns.MAX_TAGS + 1)]}
    rows = [wide, {**wide, "tags": ["x"]}]
    index.write(np.array([1, 2]), _unit(np.random.default_rng(2), 2), np.empty(0, np.int64), rows)
    _, _, got = index.lookup_rows(np.array([1, 2]))
    assert _json(got) == _json({1: rows[0], 2: rows[1]})
    assert index._features._tags.shape[1] == 1 and list(got.others) == [1]


def test_a_new_width_takes_the_columns_once_no_row_holds_the_old_one() -> None:
    """The counts a build ranks by may change: once the rows of the old width are gone, rows of the
    new one go in the columns rather than being held whole for good."""
    rng = np.random.default_rng(3)
    index = PostIndex(DIM)
    index.write(np.array([1]), _unit(rng, 1), np.empty(0, np.int64), [{"percentiles": [0.5], "tags": ["a"]}])
    index.write(np.array([2]), _unit(rng, 1), np.empty(0, np.int64), [{"percentiles": [0.5, 0.1], "tags": ["b"]}])
    assert list(index.lookup_rows(np.array([1, 2]))[2].others) == [2]  # the first width holds
    index.delete(np.array([1]))
    index.write(np.array([3]), _unit(rng, 1), np.empty(0, np.int64), [{"percentiles": [0.2, 0.3], "tags": ["c"]}])
    _, _, rows = index.lookup_rows(np.array([2, 3, 3]))  # a post asked for twice is read once
    assert rows.ids.tolist() == [3] and list(rows.others) == [2] and len(rows) == 2
    assert rows[3] == {"percentiles": (0.2, 0.3), "tags": ("c",)}
    assert rows.get("x") is None and rows.get(10**30) is None  # no post's id: absent, not an error
    index.delete(np.array([2, 3]))
    index.write(np.array([4]), _unit(rng, 1), np.empty(0, np.int64), [{"percentiles": [0.1], "tags": []}])
    index.write(np.array([4]), _unit(rng, 1), np.empty(0, np.int64), [{"percentiles": [0.1, 0.2, 0.3], "tags": []}])
    assert index.lookup_rows(np.array([4]))[2].ids.tolist() == [4]  # its own replacement held the only row


def test_a_row_repeating_a_tag_is_held_as_written_and_read_as_its_set() -> None:
    from feedserve.rank.features import PostFeatures

    index = PostIndex(DIM)
    row = {"percentiles": [0.1, 0.2], "tags": ["a", "a"]}
    index.write(np.array([1]), _unit(np.random.default_rng(4), 1), np.empty(0, np.int64), [row])
    _, _, rows = index.lookup_rows(np.array([1]))
    assert _json(rows) == {1: row} and list(rows.others) == [1]
    overlaid = PostFeatures(counts=("ratings", "mean_rating")).overlay(rows)
    assert overlaid.affinity([1], frozenset({"a"})).tolist() == [1.0]  # |{a} & {a}| / |{a} | {a}|
    huge = FeatureRows.from_rows({2: {"percentiles": [10**400, 0], "tags": []}})  # no float holds it
    assert PostFeatures(counts=("ratings", "mean_rating")).overlay(huge).percentiles([2]).tolist() == [[0.0, 0.0]]
