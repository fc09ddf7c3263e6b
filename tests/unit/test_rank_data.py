"""Ranker examples from MovieLens (feedserve.rank.data): inside the training period only, every
interaction in the history, labels from the ratings that followed, and the tensors the ranker reads."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feedserve.index.features import FeatureRows
from feedserve.ops.builder import SAMPLE_CORPUS
from feedserve.prompt.movielens import MovieLens, load_movielens
from feedserve.rank.data import (
    FEATURES,
    PostTable,
    RankExample,
    Tensorizer,
    action_of,
    labels_of,
    movielens_counts,
    movielens_examples,
)
from feedserve.rank.features import PostFeatures
from feedserve.rank.model import RankerConfig


@pytest.fixture(scope="module")
def ml() -> MovieLens:
    return load_movielens(SAMPLE_CORPUS)


def _table(ml: MovieLens) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array(sorted(ml.movies), np.int64)
    vectors = np.random.default_rng(0).normal(size=(len(ids), 8)).astype(np.float32)
    return ids, vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_examples_stay_before_the_cutoff_and_label_what_followed(ml: MovieLens) -> None:
    ids, vectors = _table(ml)
    rows = {int(p): i for i, p in enumerate(ids)}
    cutoff = sorted(r.timestamp for r in ml.ratings)[len(ml.ratings) * 9 // 10]

    def embed(user: int, liked: list) -> np.ndarray:  # type: ignore[type-arg]
        v = vectors[[rows[r.movie] for r in liked]].sum(0) if liked else np.zeros(8, np.float32)
        return v / max(float(np.linalg.norm(v)), 1e-6)

    examples = movielens_examples(ml, cutoff, embed, ids, vectors, per_member=2, shown=20)
    assert len(examples) > 500
    ratings = {(r.user, r.movie): r for r in ml.ratings}
    for x in examples[:200]:
        assert all(it.at < cutoff for it in x.history)
        assert not {it.post_id for it in x.history} & set(x.candidates.tolist())  # nothing seen is shown again
        for post, label in zip(x.candidates.tolist(), x.labels, strict=True):
            r = ratings.get((x.member_id, post))
            if label.any():  # a rated post: its rating came after the history and before the cutoff
                assert r is not None and r.timestamp < cutoff and tuple(label) == labels_of(r.rating, r.rating)
                assert r.timestamp >= max((it.at for it in x.history), default=0)
    actions = {it.action for x in examples for it in x.history}
    assert actions == {"love", "like", "neutral", "dislike"}  # the ranker reads negatives too


def test_a_label_horizon_labels_what_the_member_rated_soon_after(ml: MovieLens) -> None:
    ids, vectors = _table(ml)
    cutoff = sorted(r.timestamp for r in ml.ratings)[len(ml.ratings) * 9 // 10]
    by_user = ml.ratings_by_user(before=cutoff)

    def embed(user: int, liked: list) -> np.ndarray:  # type: ignore[type-arg]
        return vectors[0]

    examples = movielens_examples(ml, cutoff, embed, ids, vectors, per_member=2, shown=20, horizon=3)
    beyond = 0
    for x in examples[:300]:
        after = by_user[x.member_id][len(x.history) :]
        labelled = {int(c) for c, label in zip(x.candidates, x.labels, strict=True) if label[:3].any()}
        assert labelled <= {r.movie for r in after[:3]}
        # "like later": every like after the moment, past the horizon too.
        liked_later = {int(c) for c, label in zip(x.candidates, x.labels, strict=True) if label[3]}
        assert liked_later == {r.movie for r in after if r.rating >= 4} & set(x.candidates.tolist())
        beyond += len(liked_later - {r.movie for r in after[:3]})
    assert sum(x.labels[:, :3].any(axis=1).sum() for x in examples) > 0 and beyond > 0


def test_impressions_are_posts_that_existed_then_and_the_example_knows_when(ml: MovieLens) -> None:
    # Every member embedded the same: retrieval would show the same 50 films at every moment,
    # from 1996 on, if films not yet rated by anyone were in its index.
    ids, vectors = _table(ml)
    cutoff = sorted(r.timestamp for r in ml.ratings)[len(ml.ratings) * 9 // 10]
    by_user = ml.ratings_by_user(before=cutoff)
    first: dict[int, int] = {}
    for r in sorted((r for rs in by_user.values() for r in rs), key=lambda r: -r.timestamp):
        first[r.movie] = r.timestamp

    def embed(user: int, liked: list) -> np.ndarray:  # type: ignore[type-arg]
        return vectors[0]

    examples = movielens_examples(ml, cutoff, embed, ids, vectors, per_member=2, shown=50, horizon=3)
    sizes = set()
    for x in examples:
        window = by_user[x.member_id][len(x.history) : len(x.history) + 3]
        assert x.at == window[0].timestamp  # the first rating after the history
        assert all(first[c] <= window[-1].timestamp for c in x.candidates.tolist())
        sizes.add(len(x.candidates))
    assert min(sizes) < 50 <= max(sizes)  # early on fewer films existed than retrieval returns later


def test_actions_and_labels() -> None:
    assert [action_of(r) for r in (5, 4.5, 4, 3, 2.5, 2, 0.5)] == [
        "love",
        "like",
        "like",
        "neutral",
        "neutral",
        "dislike",
        "dislike",
    ]
    assert labels_of(5, 5) == (1.0, 1.0, 0.0, 1.0) and labels_of(1, 1) == (0.0, 0.0, 1.0, 0.0)
    assert labels_of(None) == (0, 0, 0, 0) and labels_of(None, 4.5) == (0, 0, 0, 1)  # liked past the horizon


def test_tensors_pad_and_mark_unknown_posts() -> None:
    from feedserve.rank.data import Interaction

    config = RankerConfig(content_dim=4, max_history=3, features=FEATURES)
    tensorize = Tensorizer(
        config,
        PostTable(np.array([10, 11, 12]), np.eye(3, 4, dtype=np.float32)),
        PostFeatures(tags={10: {"a"}, 12: {"a", "b"}}),
    )
    long = RankExample(
        1,
        [Interaction(p, "like", t) for t, p in enumerate([10, 11, 12, 10])],
        np.ones(4, np.float32),
        np.array([12, 99]),
        np.array([0.5, 0.1], np.float32),
        np.zeros((2, 3), np.float32),
    )
    empty = RankExample(
        2, [], np.zeros(4, np.float32), np.array([11]), np.array([0.2], np.float32), np.ones((1, 3), np.float32)
    )
    t = tensorize.batch([long, empty])
    assert t["history_ids"].tolist() == [[11, 12, 10], [0, 0, 0]]  # the newest 3, oldest first
    assert t["history_mask"].tolist() == [[True] * 3, [False] * 3]
    assert t["candidate_mask"].tolist() == [[True, True], [True, False]]
    features = dict(zip(FEATURES, t["candidate_features"][0].T.tolist(), strict=True))
    assert features["has_content"] == [1.0, 0.0]  # post 99 is not in the table: ranked without content
    assert features["retrieval_score"] == pytest.approx([0.5, 0.1])
    assert features["retrieval_log_rank"] == pytest.approx([0.0, np.log(2.0)])  # by score: first, second
    assert features["affinity"][0] == pytest.approx(1.0)  # its tags {a, b} are exactly the liked ones
    assert float(t["candidate_content"][0, 1].abs().sum()) == 0.0


def _synthetic(n: int) -> tuple[Tensorizer, list[RankExample]]:
    from feedserve.rank.data import Interaction

    rng = np.random.default_rng(5)
    config = RankerConfig(
        content_dim=8, d_model=16, n_heads=2, n_layers=1, max_history=6, id_buckets=1024, features=FEATURES
    )
    ids = np.arange(100, 160)
    tensorize = Tensorizer(config, PostTable(ids, rng.normal(size=(60, 8)).astype(np.float32)))
    examples = [
        RankExample(
            i,
            [Interaction(int(p), "like", t) for t, p in enumerate(rng.choice(ids, 4))],
            rng.normal(size=8).astype(np.float32),
            rng.choice(ids, 5, replace=False),
            rng.random(5).astype(np.float32),
            (rng.random((5, 3)) < 0.3).astype(np.float32),
        )
        for i in range(n)
    ]
    return tensorize, examples


def test_an_interrupted_run_resumes_to_the_same_losses_and_weights(tmp_path: Path) -> None:
    import torch

    from feedserve.rank.model import GenerativeRanker
    from feedserve.training.rank import train_ranker

    tensorize, examples = _synthetic(40)

    def fresh() -> GenerativeRanker:
        torch.manual_seed(0)
        return GenerativeRanker(tensorize.config)

    (tmp_path / "a").mkdir()
    whole = fresh()
    losses = train_ranker(whole, tensorize, examples, tmp_path / "a", 6, batch_size=8, checkpoint_every=3)
    part = fresh()
    (tmp_path / "b").mkdir()
    train_ranker(part, tensorize, examples, tmp_path / "b", 3, batch_size=8, checkpoint_every=3)
    resumed = fresh()
    again = train_ranker(resumed, tensorize, examples, tmp_path / "b", 6, batch_size=8, checkpoint_every=3, resume=True)
    assert again == pytest.approx(losses, abs=1e-6)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_post_features_hold_percentiles_and_tags_and_survive_a_round_trip(ml: MovieLens, tmp_path: Path) -> None:
    buckets = ml.fit_buckets()
    posts = ml.posts()[:50]
    features = PostFeatures.from_posts(posts, buckets)
    post = posts[7]
    want = [buckets.bucket(c, post.counts[c]) / (buckets.n_buckets - 1) for c in features.counts]
    np.testing.assert_allclose(features.percentiles([post.id, 10**12]), [want, [0.0, 0.0]], rtol=1e-6)
    assert features.tags(post.id) == frozenset(post.tags) and features.tags(10**12) == frozenset()
    features.save(tmp_path / "f.json")
    again = PostFeatures.load(tmp_path / "f.json")
    assert len(again) == 50 and again.counts == features.counts
    ids = [p.id for p in posts]
    np.testing.assert_array_equal(again.percentiles(ids), features.percentiles(ids))
    assert all(again.tags(p) == features.tags(p) for p in ids)
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="post_features"):
        PostFeatures.load(tmp_path / "bad.json")


def test_counts_read_as_of_a_moment_are_the_records_counts_then(ml: MovieLens) -> None:
    buckets, ids = ml.fit_buckets(), sorted(ml.movies)
    times = sorted(r.timestamp for r in ml.ratings)
    features = PostFeatures.from_posts(ml.posts(), buckets, log=movielens_counts(ml, times[-1] + 1, buckets))
    np.testing.assert_array_equal(features.percentiles(ids, times[-1] + 1), features.percentiles(ids))
    for before in (times[len(times) // 10], times[len(times) // 2]):
        then = PostFeatures.from_posts(ml.posts(before), buckets)
        np.testing.assert_allclose(features.percentiles(ids, before), then.percentiles(ids), atol=1e-6)
        assert (features.percentiles(ids, before) <= features.percentiles(ids) + 1e-6)[:, 0].all()  # only fewer
    assert not features.percentiles(ids, times[0]).any() and not features.percentiles([10**12], before).any()
    np.testing.assert_array_equal(features.percentiles(ids, 1 << 40), features.percentiles(ids))  # far later: all
    # The tensors of a training example read them at its moment; a served request (no moment) the table.
    config = RankerConfig(content_dim=4, max_history=4, features=FEATURES)
    tensorize = Tensorizer(config, PostTable(np.array(ids), np.ones((len(ids), 4), np.float32)), features)
    x = RankExample(1, [], np.ones(4, np.float32), np.array(ids[:40]), np.zeros(40, np.float32), np.zeros((40, 3)))
    column = FEATURES.index("ratings_percentile")
    early = tensorize.batch([replace(x, at=times[len(times) // 10])])["candidate_features"][0, :, column]
    np.testing.assert_allclose(early, features.percentiles(ids[:40], times[len(times) // 10])[:, 0])
    served = tensorize.batch([x])["candidate_features"][0, :, column]
    np.testing.assert_allclose(served, features.percentiles(ids[:40])[:, 0])
    assert not np.allclose(early, served)
    # An example whose tables were built before its moment reads the counts as of then.
    late = replace(x, at=times[len(times) // 2], tables_at=times[len(times) // 10])
    np.testing.assert_array_equal(tensorize.batch([late])["candidate_features"][0, :, column], early)


def test_a_table_lag_reads_tables_built_up_to_that_long_before_each_moment(ml: MovieLens) -> None:
    ids, vectors = _table(ml)
    cutoff = sorted(r.timestamp for r in ml.ratings)[len(ml.ratings) * 9 // 10]

    def embed(user: int, liked: list) -> np.ndarray:  # type: ignore[type-arg]
        return vectors[0]

    lag = 30 * 86400
    examples = movielens_examples(ml, cutoff, embed, ids, vectors, per_member=2, shown=5, table_lag=lag)
    assert all(x.at is not None and x.tables_at is not None for x in examples)
    lags = [x.at - x.tables_at for x in examples if x.at is not None and x.tables_at is not None]
    assert min(lags) >= 0 and max(lags) <= lag and len(set(lags)) > len(lags) // 2  # drawn, not one value
    plain = movielens_examples(ml, cutoff, embed, ids, vectors, per_member=2, shown=5)
    assert all(x.tables_at is None and x.tables_time() == x.at for x in plain)
    assert [(x.member_id, x.at) for x in plain] == [(x.member_id, x.at) for x in examples]  # the same moments


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(st.integers(0, 30), st.frozensets(st.sampled_from("abcdefg"), max_size=5), max_size=20),
    st.frozensets(st.sampled_from("abcdefgh"), max_size=6),
    st.lists(st.integers(0, 40), max_size=25),
)
def test_affinity_is_the_jaccard_similarity_of_tag_sets(
    tags: dict[int, frozenset[str]], liked: frozenset[str], posts: list[int]
) -> None:
    features = PostFeatures(tags=tags)
    want = [
        len(tags.get(p, frozenset()) & liked) / len(tags.get(p, frozenset()) | liked) if tags.get(p) or liked else 0.0
        for p in posts
    ]
    np.testing.assert_allclose(features.affinity(posts, liked), want, rtol=1e-6)


_ROW = st.fixed_dictionaries(
    {
        "percentiles": st.lists(st.floats(0, 1, width=32), min_size=2, max_size=2),
        "tags": st.frozensets(st.sampled_from("abcdefgh"), max_size=6).map(sorted),
    }
)


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(st.integers(0, 40), _ROW, max_size=20),
    st.dictionaries(
        st.integers(0, 40), st.one_of(_ROW, st.just({}), st.just({"percentiles": [0.5], "tags": ["z"]})), max_size=20
    ),
    st.frozensets(st.sampled_from("abcdefghz"), max_size=6),
    st.lists(st.integers(0, 40), max_size=25),
)
def test_live_rows_read_over_a_table_as_the_table_of_the_merged_rows(
    table_rows: dict[int, dict], live: dict[int, dict], liked: frozenset[str], posts: list[int]
) -> None:
    """A post's live row (well-formed: one percentile per count) replaces its table row, percentiles and
    tags alike; an empty or malformed one leaves the table's."""
    table = PostFeatures(
        {p: r["percentiles"] for p, r in table_rows.items()}, {p: r["tags"] for p, r in table_rows.items()}
    )
    merged = {**table_rows, **{p: r for p, r in live.items() if len(r.get("percentiles", ())) == 2}}
    want = PostFeatures({p: r["percentiles"] for p, r in merged.items()}, {p: r["tags"] for p, r in merged.items()})
    got = table.overlay(FeatureRows.from_rows(live))
    np.testing.assert_array_equal(got.percentiles(posts), want.percentiles(posts))
    np.testing.assert_allclose(got.affinity(posts, liked), want.affinity(posts, liked), rtol=1e-6)
    assert [got.tag_union([p]) for p in posts] == [want.tags(p) for p in posts]
    assert got.tag_union(posts) == want.tag_union(posts)


def _history_tensors(config: RankerConfig, history: list[tuple[int, str]]) -> dict[str, np.ndarray]:
    from feedserve.prompt.records import parse_member
    from feedserve.rank.data import member_interactions

    member = parse_member(
        {"id": 1, "history": [{"post_id": p, "action": a, "engaged_at": i} for i, (p, a) in enumerate(history)]}
    )
    table = PostTable(np.arange(1, 10, dtype=np.int64), np.eye(9, 4, dtype=np.float32))
    example = RankExample(
        1, member_interactions(member), np.zeros(4, np.float32), np.array([9]), np.ones(1), np.zeros((1, 0))
    )
    return {k: v.numpy() for k, v in Tensorizer(config, table).batch([example]).items()}


def test_every_action_a_record_may_carry_maps_to_a_token_the_ranker_has() -> None:
    narrow = RankerConfig(content_dim=4, actions=("like", "neutral"), tasks=())  # no love or dislike tokens
    history = [(1, "rated 5"), (2, "rated 4"), (3, "rated 1"), (4, "Like"), (5, "share"), (6, "")]
    t = _history_tensors(narrow, history)
    assert t["history_actions"][0].tolist() == [1, 0, 1, 0, 1, 1]  # love, share, unnamed: neutral
    with pytest.raises(ValueError, match="must include 'neutral'"):
        RankerConfig(content_dim=4, actions=("like", "dislike"))


def test_an_engaged_history_ranker_reads_the_engaged_interactions_alone() -> None:
    history = [(1, "rated 5"), (2, "rated 2"), (3, "rated 3"), (4, "share"), (5, "skip"), (6, "rated 4")]
    every = _history_tensors(RankerConfig(content_dim=4, tasks=()), history)
    assert every["history_ids"][0].tolist() == [1, 2, 3, 4, 5, 6]
    engaged = _history_tensors(RankerConfig(content_dim=4, tasks=(), history="engaged", max_history=2), history)
    assert engaged["history_ids"][0].tolist() == [4, 6]  # the newest two engaged, oldest first
    with pytest.raises(ValueError, match="history must be one of"):
        RankerConfig(content_dim=4, history="liked")


def test_a_ranker_of_fewer_tasks_reads_their_label_columns() -> None:
    from feedserve.rank.data import LABELS, select_tasks

    x = RankExample(
        1, [], np.zeros(4, np.float32), np.array([1, 2]), np.ones(2), np.array([[1, 0, 0, 1], [1, 1, 0, 1]], np.float32)
    )
    assert LABELS == ("like", "love", "dislike", "like later")
    select_tasks([x], ("love", "like"))
    assert x.labels.tolist() == [[0, 1], [1, 1]]


def test_the_log_rank_orders_by_score_whatever_the_order_given() -> None:
    from feedserve.rank.data import log_rank

    np.testing.assert_allclose(log_rank(np.array([0.1, 0.9, 0.5, 0.9])), np.log1p([3, 0, 2, 1]))
    assert log_rank(np.array([], np.float32)).shape == (0,)


def test_ranks_past_those_the_ranker_trained_on_read_as_its_last() -> None:
    from feedserve.rank.data import log_rank

    np.testing.assert_allclose(log_rank(np.array([0.1, 0.9, 0.5, 0.2, 0.3]), max_rank=2), np.log1p([2, 0, 1, 2, 2]))
    config = RankerConfig(content_dim=4, features=("retrieval_log_rank",), tasks=("like",), max_rank=3)
    tensorize = Tensorizer(config, PostTable(np.arange(10), np.ones((10, 4), np.float32)))
    scores = np.linspace(1.0, 0.1, 8).astype(np.float32)
    x = RankExample(1, [], np.zeros(4, np.float32), np.arange(8), scores, np.zeros((8, 1), np.float32))
    read = tensorize.batch([x])["candidate_features"][0, :, 0].numpy()
    np.testing.assert_allclose(read, np.log1p([0, 1, 2, 3, 3, 3, 3, 3]), rtol=1e-6)
    # A ranker saved before the field existed was trained on 200 impressions (the command's default).
    assert RankerConfig(content_dim=4).max_rank == 200
