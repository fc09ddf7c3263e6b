"""Evaluating rankers (feedserve.training.rank_eval): many moments per member, strictly after the
cutoff and never before their own history; a ranker's gain over retrieval with a bootstrap interval
over members; the validation curve during training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from feedserve.ops.builder import SAMPLE_CORPUS
from feedserve.prompt.movielens import MovieLens, load_movielens
from feedserve.rank.data import LIKE
from feedserve.training.data import EvalCase, movielens_split
from feedserve.training.evaluate import metrics, paired_ratio, per_case
from feedserve.training.rank_eval import cutoff_cases, moment_cases


@pytest.fixture(scope="module")
def ml() -> MovieLens:
    return load_movielens(SAMPLE_CORPUS)


def test_moments_read_only_the_past_and_target_the_next_likes(ml: MovieLens) -> None:
    split = movielens_split(ml)
    cases = moment_cases(ml, split.cutoff, moments=5, horizon=10)
    by_user = ml.ratings_by_user()
    # The split's members (less the few whose every rating shares one moment: nothing before it).
    assert {c.member.id for c in cases} <= {c.member.id for c in split.test}
    assert len({c.member.id for c in cases}) >= 0.95 * len(split.test)
    assert len(cases) > 3 * len(split.test)  # and at several moments each
    for case in cases:
        ratings = by_user[case.member.id]
        at = min(r.timestamp for r in ratings if r.movie in case.targets)
        assert at >= split.cutoff
        moment = max(it.at for it in case.history) if case.history else 0
        assert all(it.at < at for it in case.history)
        # The retrieval record holds the liked history alone; the ranker's holds every rating.
        liked = [it.post_id for it in case.history if it.action in ("like", "love")]
        assert [h.post_id for h in case.member.history] == liked and liked
        assert not case.targets & {it.post_id for it in case.history}
        later = [r for r in ratings if r.timestamp > moment]
        assert all(r.rating >= LIKE for r in later if r.movie in case.targets)
        assert case.targets <= {r.movie for r in later}


def test_the_cutoff_protocol_is_the_splits_own(ml: MovieLens) -> None:
    """The ranker reads every rating before the cutoff, and the record's context after it: a member
    with too few likes before the cutoff was ranked from an empty history while retrieval and the
    baselines read their context likes."""
    split = movielens_split(ml)
    before = ml.ratings_by_user(before=split.cutoff)
    cases = cutoff_cases(split, before)
    assert [(c.member.id, c.targets) for c in cases] == [(c.member.id, c.targets) for c in split.test]
    with_context = 0
    for case in cases:
        read = [it.post_id for it in case.history]
        assert {h.post_id for h in case.member.history} <= set(read)  # what retrieval reads, the ranker too
        assert read[: len(before.get(case.member.id, []))] == [r.movie for r in before.get(case.member.id, [])]
        assert all(it.at >= split.cutoff for it in case.history[len(before.get(case.member.id, [])) :])
        assert not case.targets & set(read)
        with_context += any(it.at >= split.cutoff for it in case.history)
    assert with_context  # the fixture's split has members whose likes are all after the cutoff


def test_metrics_are_the_means_of_the_per_case_values() -> None:
    cases = [EvalCase(None, {1, 2}), EvalCase(None, {3})]  # type: ignore[arg-type]
    top = [np.array([1, 9, 2]), np.array([7, 8, 9])]
    each = per_case(top, cases, (1, 3))
    np.testing.assert_allclose(each["recall@3"], [1.0, 0.0])
    np.testing.assert_allclose(each["recall@1"], [0.5, 0.0])
    assert metrics(top, cases, (1, 3)) == {name: pytest.approx(float(v.mean())) for name, v in each.items()}


def test_the_gain_interval_resamples_members_not_cases() -> None:
    rng = np.random.default_rng(0)
    base = rng.random(400)
    same = paired_ratio(base, base.copy(), np.arange(400) // 10)
    assert same["ratio"] == pytest.approx(1.0) and same["low"] == pytest.approx(1.0) == same["high"]
    better = paired_ratio(base, base * 1.5, np.arange(400) // 10)
    assert better["low"] > 1.2 and better["above_1"] == 1.0
    # One member's cases alone carry the gain: over members it is uncertain, over cases it would not be.
    other = base * 0.97
    other[:100] = base[:100] * 3
    by_member = paired_ratio(base, other, [0] * 100 + list(range(1, 301)))
    by_case = paired_ratio(base, other, np.arange(400))
    assert by_member["low"] < 1.0 < by_case["low"]


def test_the_gain_over_a_zero_base_is_undefined_not_zero_or_huge() -> None:
    # New posts' slices often have no hit at all: 0 hits against 0 is no evidence either way, and
    # hits against none are no finite multiple.
    zero, everyone = np.zeros(20), np.ones(20)
    both_zero = paired_ratio(zero, zero, np.arange(20))
    assert np.isnan(both_zero["ratio"]) and np.isnan(both_zero["low"]) and both_zero["above_1"] == 0.0
    from_none = paired_ratio(zero, everyone, np.arange(20))
    assert from_none["ratio"] == np.inf and from_none["low"] == np.inf == from_none["high"]
    # Some resamples lose the base's only hit: the interval is unbounded above, not 1e12.
    base = np.zeros(20)
    base[5] = 1.0
    some = paired_ratio(base, everyone, np.arange(20))
    assert some["ratio"] == pytest.approx(20.0) and some["low"] < np.inf and some["high"] == np.inf
    # One member carries every hit of both orders: the resamples without them say nothing, and an
    # interval of that one member's ratio alone would look precise.
    one = paired_ratio(base, base * 0.5, np.arange(20))
    assert one["ratio"] == pytest.approx(0.5) and np.isnan(one["low"]) and np.isnan(one["high"])


def test_training_reports_a_validation_curve_in_eval_mode(tmp_path: Path) -> None:
    import torch

    from feedserve.rank.model import GenerativeRanker
    from feedserve.training.rank import train_ranker
    from tests.unit.test_rank_data import _synthetic

    tensorize, examples = _synthetic(40)
    torch.manual_seed(0)
    model = GenerativeRanker(tensorize.config)
    seen: list[tuple[int, bool]] = []

    def record(step: int) -> None:
        seen.append((step, model.training))

    losses = train_ranker(
        model,
        tensorize,
        examples,
        tmp_path,
        6,
        batch_size=8,
        every=2,
        on_step=lambda s: seen.append((s, model.training)),
    )
    assert seen == [(2, False), (4, False), (6, False)] and len(losses) == 6
    torch.manual_seed(0)
    plain = GenerativeRanker(tensorize.config)
    (tmp_path / "plain").mkdir()
    assert train_ranker(plain, tensorize, examples, tmp_path / "plain", 6, batch_size=8) == pytest.approx(losses)


def test_the_table_puts_retrieval_first_and_each_ranker_with_its_interval() -> None:
    from feedserve.training.rank_eval import markdown_table

    def result(ndcg: float, low: float, high: float) -> dict:  # type: ignore[type-arg]
        m = {"recall@10": 0.1, "recall@50": 0.2, "ndcg@10": ndcg}
        gain = {"ratio": ndcg / 0.05, "low": low, "high": high, "above_1": 0.5}
        retrieval = {**m, "ndcg@10": 0.05}
        return {
            "cases": 9,
            "members": 3,
            "retrieval": retrieval,
            "ranked": m,
            "ranked_over_retrieval": {"ndcg@10": gain},
        }

    reports = [
        {"ranker": "runs/a", "moments": result(0.04, 0.6, 1.1), "cutoff": result(0.06, 0.9, 1.5)},
        {"ranker": "runs/b", "moments": result(0.07, 1.1, 1.6), "cutoff": result(0.05, 0.7, 1.3)},
    ]
    lines = markdown_table(reports).splitlines()
    assert lines[0] == "9 moments of 3 members; cutoff: 9 members."
    rows = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| retrieval alone", "| a", "| b"]
    assert "0.0500 | 1.00x" in rows[0]
    assert "0.0700 | 1.40x [1.10, 1.60]" in rows[2] and "1.20x [0.90, 1.50]" in rows[1]
    assert "reached" not in markdown_table(reports)  # no slices read: no slice table

    # With the transition slices, a table of them: retrieval, then each ranker, the later ones
    # paired with the first on Recall@50.
    paired = {"recall@50": {"ratio": 1.25, "low": 1.1, "high": 1.4, "above_1": 0.99}}
    for r, recall in zip(reports, (0.3, 0.375), strict=True):
        for part, targets in (("seen_transition", 12), ("unseen_transition", 4)):
            sliced = {**result(0.04, 0.6, 1.1), "targets": targets}
            sliced["ranked"] = {**sliced["ranked"], "recall@50": recall}
            r["moments"][part] = {**sliced, **({"over_reference": paired} if r is reports[1] else {})}
    lines = markdown_table(reports).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("The moments' targets by whether"))
    assert "reached 12 in 9; not reached 4 in 9" in lines[at]
    rows = [line for line in lines[at:] if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| retrieval alone", "| a", "| b"]
    assert rows[1].count(" | -") == 2 and "0.3000" in rows[1]
    assert rows[2].count("1.250x [1.10, 1.40] P 0.99") == 2 and "0.3750" in rows[2]


def test_the_new_posts_slice_reads_only_their_targets_in_the_cases_that_have_any() -> None:
    from feedserve.prompt.records import Member
    from feedserve.training.rank_eval import RankCase, compare

    cases = [
        RankCase(Member(id=1, headline="a"), {1, 2}),  # target 2 new
        RankCase(Member(id=2, headline="b"), {3}),  # nothing new: not in the slice
        RankCase(Member(id=3, headline="c"), {4, 5}),  # target 5 new
    ]
    retrieval = [np.array([1, 9, 2]), np.array([3, 8]), np.array([5, 4])]
    ranked = [np.array([2, 1, 9]), np.array([8, 3]), np.array([4, 5])]
    report = compare(retrieval, ranked, cases, new_posts={2, 5, 99})
    new = report["new_posts"]
    assert new["cases"] == 2 and new["members"] == 2 and new["targets"] == 2
    # Recall@10 over the new targets alone: both found by both orders; NDCG@10 by their positions.
    assert new["retrieval"]["recall@10"] == new["ranked"]["recall@10"] == 1.0
    assert new["ranked"]["ndcg@10"] == pytest.approx((1.0 + 1 / np.log2(3)) / 2)
    assert new["retrieval"]["ndcg@10"] == pytest.approx((1 / np.log2(4) + 1.0) / 2)
    assert report["cases"] == 3 and "new_posts" not in compare(retrieval, ranked, cases)
    assert "new_posts" not in compare(retrieval, ranked, cases, new_posts={99})

    # A slice keeps each case's own posts: the first case's target 1, the third's 4 and 5.
    sliced = compare(retrieval, ranked, cases, slices={"mine": [{1}, set(), {4, 5, 2}]})["mine"]
    assert sliced["cases"] == 2 and sliced["targets"] == 3
    assert sliced["ranked"]["ndcg@10"] == pytest.approx((1 / np.log2(3) + 1.0) / 2)


class _Vectors:
    """The retrieval stage's vectors, fixed (what EmbeddingRetriever computes from the encoder)."""

    def __init__(self, posts: np.ndarray, members: dict[int, np.ndarray]) -> None:
        self.posts, self._members = posts, members

    def member_vectors(self, members: list) -> np.ndarray:  # type: ignore[type-arg]
        return np.stack([self._members[m.id] for m in members])

    def save_members(self) -> None:
        pass


def test_a_ranker_is_also_paired_with_a_reference_rankers_orders_of_the_same_cases() -> None:
    import torch

    from feedserve.prompt.records import Member
    from feedserve.rank.data import Interaction
    from feedserve.rank.model import GenerativeRanker
    from feedserve.training.rank_eval import RankCase, evaluate, markdown_table
    from tests.unit.test_rank_data import _synthetic

    tensorize, _ = _synthetic(1)
    ids, posts = np.arange(100, 160), tensorize.content.vectors[:-1]  # type: ignore[attr-defined]
    rng = np.random.default_rng(1)
    cases = [
        RankCase(
            Member(id=i, headline="m"),
            {int(p) for p in rng.choice(ids[10:], 6, replace=False)},
            [Interaction(int(p), "like", t) for t, p in enumerate(ids[i % 5 : i % 5 + 3])],
        )
        for i in range(24)
    ]
    vectors = _Vectors(posts, {c.member.id: rng.normal(size=8).astype(np.float32) for c in cases})
    protocols = {"moments": cases, "cutoff": cases[:8]}
    reports = []
    reference = None
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = GenerativeRanker(tensorize.config).eval()
        report, ranked = evaluate(model, tensorize, vectors, protocols, ids, 30, {int(ids[-1])}, reference)  # type: ignore[arg-type]
        reports.append({"ranker": f"runs/s{seed}", **report})
        reference = reference or ranked
    first, second = reports[0]["moments"], reports[1]["moments"]
    assert "over_reference" not in first
    paired = second["over_reference"]["ndcg@10"]
    # The paired ratio is the second ranker's mean over the first's, on the same cases.
    assert paired["ratio"] == pytest.approx(second["ranked"]["ndcg@10"] / first["ranked"]["ndcg@10"])
    assert paired["low"] <= paired["ratio"] <= paired["high"]
    # Against itself a ranker is exactly level.
    _, again = evaluate(model, tensorize, vectors, protocols, ids, 30, None, reference)  # type: ignore[arg-type]
    itself, _ = evaluate(model, tensorize, vectors, protocols, ids, 30, None, again)  # type: ignore[arg-type]
    level = itself["moments"]["over_reference"]["ndcg@10"]
    assert level["ratio"] == level["low"] == level["high"] == pytest.approx(1.0)
    table = markdown_table(reports)
    assert "Paired with `s0`" in table
    row = next(line for line in table.splitlines() if line.startswith("| s1 | ") and " P " in line)
    assert f"{paired['ratio']:.3f}x" in row


def test_the_fixed_fusion_orders_the_retrieved_posts_by_their_summed_log_ranks() -> None:
    from feedserve.training.rank_eval import fused

    ids = np.array([10, 20, 30, 40, 50])
    retrieved = [np.array([30, 10, 50, 20])]  # retrieval's order; 40 was not retrieved
    # Alone, the fusion is retrieval's order.
    np.testing.assert_array_equal(fused(retrieved, ids)[0], retrieved[0])
    # A second score ranks 20 first among the retrieved (40 scores higher, but is not a candidate):
    # 20 sums ln 4 + ln 1, 30 ln 1 + ln 4 (a tie, kept in retrieval order), 10 and 50 ln 2 + ln 3.
    other = np.array([[0.2, 0.9, 0.1, 5.0, 0.3]])
    np.testing.assert_array_equal(fused(retrieved, ids, other)[0], [30, 20, 10, 50])
    # Two scores that both put 50 first lift it over retrieval's first.
    first = np.array([[0.0, 0.0, 0.0, 0.0, 1.0]])
    np.testing.assert_array_equal(fused(retrieved, ids, first, first)[0][0], 50)


def test_a_blend_of_two_orders_sums_their_log_ranks() -> None:
    from feedserve.training.rank_eval import blended

    a, b = np.array([1, 2, 3, 4]), np.array([4, 3, 2, 1])
    # Against its reverse: 1 and 4 sum ln 1 + ln 4 (the smaller), 2 and 3 ln 2 + ln 3; ties keep the
    # first order.
    np.testing.assert_array_equal(blended([a], [b])[0], [1, 4, 2, 3])
    np.testing.assert_array_equal(blended([a], [a])[0], a)  # an order blended with itself
    np.testing.assert_array_equal(blended([a], [np.array([3, 1, 2, 4])])[0], [1, 3, 2, 4])
    with pytest.raises(ValueError, match="the same posts"):
        blended([a], [np.array([1, 2, 3, 5])])


def test_a_ranker_started_from_the_fusion_ranks_as_the_fusion_before_training() -> None:
    import torch

    from feedserve.rank.data import FEATURES
    from feedserve.rank.model import INPUTS, GenerativeRanker, RankerConfig
    from feedserve.training.rank import FUSION_FEATURES, init_wide
    from tests.unit.test_rank import _inputs

    config = RankerConfig(content_dim=16, d_model=32, max_history=12, id_buckets=4096, features=FEATURES, wide=True)
    torch.manual_seed(0)
    model = GenerativeRanker(config).eval()
    inputs = _inputs(12, 30)
    inputs["candidate_features"] = torch.rand(1, 30, len(FEATURES)) * 5
    columns = [FEATURES.index(f) for f in FUSION_FEATURES]
    fusion = -inputs["candidate_features"][0][:, columns].sum(-1)
    with torch.no_grad():
        before = model(**{k: inputs[k] for k in INPUTS})[0]
        init_wide(model, "fusion")
        after = model(**{k: inputs[k] for k in INPUTS})[0]
    # like and love are the fusion's score exactly; dislike (a negative task) starts at zero.
    assert torch.allclose(after[:, 0], fusion) and torch.allclose(after[:, 1], fusion)
    assert torch.equal(after[:, 2], torch.zeros(30))
    assert not torch.allclose(before[:, 0], fusion)  # PyTorch's own start is not it
    with torch.no_grad():
        init_wide(model, "zero")
        assert torch.equal(model.wide.weight, torch.zeros_like(model.wide.weight))  # type: ignore[union-attr]


def test_fresh_tables_are_read_as_of_each_cases_moment(ml: MovieLens) -> None:
    """A case knows its moment (a moment case's, the cutoff for the split's own); ranked with fresh
    tables (every engagement streamed in) each example reads counts and co-engagement as of the
    moment `tables_at` gives it, and as built (None) without one."""
    import torch

    from feedserve.prompt.records import Member
    from feedserve.rank.data import Interaction
    from feedserve.rank.model import GenerativeRanker
    from feedserve.training.rank_eval import RankCase, case_scores
    from tests.unit.test_rank_data import _synthetic

    split = movielens_split(ml)
    moments = moment_cases(ml, split.cutoff, moments=3)
    assert all(c.at is not None and c.at >= split.cutoff and all(it.at < c.at for it in c.history) for c in moments)
    assert {c.at for c in cutoff_cases(split, ml.ratings_by_user(before=split.cutoff))} == {split.cutoff}

    tensorize, _ = _synthetic(1)
    ids, posts = np.arange(100, 160), tensorize.content.vectors[:-1]  # type: ignore[attr-defined]
    cases = [
        RankCase(Member(id=i, headline="m"), {101}, [Interaction(100 + i, "like", 1)], at=1_000 + i) for i in range(5)
    ]
    read: list[int | None] = []
    real = tensorize.batch

    def spy(examples):  # type: ignore[no-untyped-def]
        read.extend(x.tables_time() for x in examples)
        return real(examples)

    tensorize.batch = spy  # type: ignore[method-assign]
    vectors = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    model = GenerativeRanker(tensorize.config).eval()
    torch.manual_seed(0)
    for tables_at, want in ((lambda c: c.at, [1_000 + i for i in range(5)]), (None, [None] * 5)):
        read.clear()
        case_scores(model, tensorize, vectors, cases, ids, posts, 30, tables_at=tables_at)
        assert read == want


def test_fresh_itemknn_is_itemknn_over_every_like_before_the_moment() -> None:
    """The fused rule's ItemKNN read with fresh tables: ItemKNN (the member's own row included, as
    the baseline's) over the likes before each case's moment; as built, the baseline's own table."""
    from feedserve.prompt.records import Engagement, Member
    from feedserve.rank.coengagement import CoEngagement
    from feedserve.training.baselines import ItemKNN
    from feedserve.training.rank_eval import RankCase, RankingData

    rng = np.random.default_rng(4)
    events = [(int(m), int(p), int(t)) for m, p, t in zip(*rng.integers(0, [12, 30, 100], (200, 3)).T, strict=True)]
    ids = np.arange(30)
    history = [Engagement(post_id=p, action="like") for p in (1, 2, 3)]
    cases = [
        RankCase(Member(id=m, headline="m", history=history), {5}, at=at) for m, at in ((3, 40), (3, 90), (50, 60))
    ]
    data = RankingData(None, None, None, ids, None, CoEngagement.from_events(events), fresh=True)  # type: ignore[arg-type]
    got = data.recent_itemknn(cases, None)  # type: ignore[arg-type]
    for row, case in zip(got, cases, strict=True):
        before: dict[int, set[int]] = {}
        for m, p, t in events:
            if t < (case.at or 0):
                before.setdefault(m, set()).add(p)
        assert np.abs(row - ItemKNN(before, ids).score([case.member])[0]).max() < 1e-5
    knn = ItemKNN({0: {1, 2}, 1: {2, 5}}, ids)
    data.fresh = False
    assert np.array_equal(data.recent_itemknn(cases, knn), knn.score([c.member for c in cases]))


def test_an_auxiliary_task_weighs_nothing_unless_the_weights_say_and_an_unweighed_task_is_refused() -> None:
    """A ranker also trained on "like later": by default its final score is the served tasks' alone
    (the auxiliary one at 0); `weights` can weigh it; a task the weights leave out is named."""
    from dataclasses import replace

    import torch

    from feedserve.prompt.records import Member
    from feedserve.rank.data import Interaction
    from feedserve.rank.model import GenerativeRanker
    from feedserve.training.rank_eval import RankCase, case_scores, orders
    from tests.unit.test_rank_data import _synthetic

    tensorize, _ = _synthetic(1)
    tensorize.config = replace(tensorize.config, tasks=("like", "like later"))
    ids, posts = np.arange(100, 160), tensorize.content.vectors[:-1]  # type: ignore[attr-defined]
    cases = [RankCase(Member(id=i, headline="m"), {101}, [Interaction(100 + i, "like", 1)], at=None) for i in range(4)]
    vectors = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    torch.manual_seed(0)
    model = GenerativeRanker(tensorize.config).eval()

    def order(weights: dict[str, float] | None) -> list[list[int]]:
        scored = case_scores(model, tensorize, vectors, cases, ids, posts, 30, weights=weights)
        return [o.tolist() for o in orders(scored)[1]]

    assert order(None) == order({"like": 1.0, "like later": 0.0})
    assert order({"like": 0.0, "like later": 1.0}) != order(None)
    with pytest.raises(ValueError, match="like later"):
        order({"like": 1.0})
