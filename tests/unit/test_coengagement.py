"""The co-engagement feature (feedserve.rank.coengagement): ItemKNN's score of a candidate, without
the scored member's own engagements, from a table that survives a round trip; and as the ranker's
candidate features."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from feedserve.prompt.records import Engagement, Member
from feedserve.rank import coengagement
from feedserve.rank.coengagement import FORMAT, SEQUENCE_WINDOW, CoEngagement
from feedserve.rank.data import FEATURES, RECENT_LIKES, Interaction, PostTable, RankExample, Tensorizer
from feedserve.rank.model import RankerConfig
from feedserve.training.baselines import ItemKNN


def _engagements(seed: int = 0, members: int = 40, posts: int = 60) -> dict[int, set[int]]:
    rng = np.random.default_rng(seed)
    return {m: set(rng.choice(posts, rng.integers(1, 15), replace=False).tolist()) for m in range(members)}


def _itemknn(engaged: dict[int, set[int]], history: list[int], posts: np.ndarray) -> np.ndarray:
    member = Member(id=10**6, headline="x", history=[Engagement(post_id=p, action="like") for p in history])
    return ItemKNN(engaged, posts).score([member])[0]


def test_the_score_is_itemknns_over_the_table_without_the_members_own_row() -> None:
    engaged, posts, history = _engagements(), np.arange(70), [3, 7, 11, 55, 64]  # 64: nobody's
    table = CoEngagement.from_engagements(engaged)
    stranger = table.scores(10**6, history, posts.tolist())
    assert np.abs(stranger - _itemknn(engaged, history, posts)).max() < 1e-5
    assert stranger[60:].sum() == 0.0 and stranger.max() > 0  # a post nobody engaged with scores 0
    for member in (0, 5, 17):  # a member of the table: as if their row had never been in it
        others = {m: e for m, e in engaged.items() if m != member}
        want = _itemknn(others, history, posts)
        assert np.abs(table.scores(member, history, posts.tolist()) - want).max() < 1e-5
        assert not np.allclose(table.scores(member, history, posts.tolist()), stranger)


def test_read_as_of_a_moment_the_score_is_itemknns_over_the_engagements_before_it() -> None:
    rng = np.random.default_rng(2)
    events = [(m, p, int(rng.integers(0, 100))) for m, ps in _engagements(seed=2).items() for p in ps]
    table, posts, history = CoEngagement.from_events(events), np.arange(60), [3, 7, 11, 20]
    for before in (1, 30, 70):
        for member in (4, 10**6):
            earlier: dict[int, set[int]] = {}
            for m, p, at in events:
                if at < before and m != member:
                    earlier.setdefault(m, set()).add(p)
            got = table.scores(member, history, posts.tolist(), before)
            assert np.abs(got - _itemknn(earlier, history, posts)).max() < 1e-5
    assert table.scores(4, history, posts.tolist(), 101).tolist() == table.scores(4, history, posts.tolist()).tolist()
    assert not table.scores(4, history, posts.tolist(), 0).any()  # nothing had happened yet
    # A member who engaged twice counts once, from the first time.
    twice = CoEngagement.from_events([(1, 10, 5), (1, 10, 50), (1, 11, 5), (2, 10, 5), (2, 11, 5)])
    assert len(twice) == 4 and twice.scores(9, [10], [11], 6).tolist() == twice.scores(9, [10], [11]).tolist()


def test_nothing_to_read_scores_zero_and_a_round_trip_keeps_every_score(tmp_path: Path) -> None:
    table = CoEngagement.from_events((m, p, m) for m, ps in _engagements(seed=1).items() for p in ps)
    assert table.scores(1, [], [1, 2]).tolist() == [0.0, 0.0]
    assert table.scores(1, [10**9], [1, 2]).tolist() == [0.0, 0.0]
    assert table.scores(1, [1, 2], []).shape == (0,)
    table.save(tmp_path / "coengagement.npz")
    loaded = CoEngagement.load(tmp_path / "coengagement.npz")
    assert len(loaded) == len(table)
    for member in (1, 3, 10**6):
        assert (
            loaded.scores(member, [4, 5, 6], list(range(60))).tolist()
            == table.scores(member, [4, 5, 6], list(range(60))).tolist()
        )
        assert (
            loaded.scores(member, [4], list(range(60)), 20).tolist()
            == table.scores(member, [4], list(range(60)), 20).tolist()
        )
    # A table saved before entries kept their times reads as engaged before any moment.
    np.savez(
        tmp_path / "untimed.npz", format=np.array(FORMAT), posts=table.posts, indptr=table.indptr, members=table.members
    )
    untimed = CoEngagement.load(tmp_path / "untimed.npz")
    assert untimed.scores(1, [4], list(range(60)), 1).tolist() == table.scores(1, [4], list(range(60))).tolist()
    np.savez(tmp_path / "other.npz", posts=np.arange(3))
    with pytest.raises(ValueError, match="coengagement"):
        CoEngagement.load(tmp_path / "other.npz")


def test_the_ranker_reads_co_engagement_with_the_engaged_history_as_a_share_and_a_log_rank() -> None:
    # Members 1 and 2 both liked posts 10 and 12; member 3 liked 11 alone.
    table = CoEngagement.from_engagements({1: {10, 12}, 2: {10, 12}, 3: {11}})
    config = RankerConfig(content_dim=4, max_history=5, features=FEATURES)
    tensorize = Tensorizer(config, PostTable(np.array([10, 11, 12]), np.eye(3, 4, dtype=np.float32)), None, table)
    history = [Interaction(10, "like", 0), Interaction(11, "dislike", 1)]  # 11 is not engaged: not read
    example = RankExample(
        9,
        history,
        np.ones(4, np.float32),
        np.array([11, 12, 99]),
        np.array([0.9, 0.5, 0.4], np.float32),
        np.zeros((3, 3)),
    )
    features = dict(zip(FEATURES, tensorize.batch([example])["candidate_features"][0].T.tolist(), strict=True))
    assert features["coengagement"] == pytest.approx([0.0, 1.0, 0.0])  # 12 shares 10's members; 11 and 99 none
    assert features["coengagement_log_rank"] == pytest.approx([np.log(2.0), 0.0, np.log(3.0)])  # ties: retrieval order
    # Member 1's own row left out, 12 is still co-engaged through member 2; without a table, nothing is.
    own = RankExample(1, history, example.member, example.candidates, example.retrieval_scores, example.labels)
    assert tensorize.batch([own])["candidate_features"][0, 1, FEATURES.index("coengagement")] == pytest.approx(1.0)
    # A training example reads the table as of its moment: nobody had engaged with 12 by then.
    timed = Tensorizer(
        config, tensorize.content, None, CoEngagement.from_events([(1, 10, 5), (2, 10, 5), (1, 12, 5), (2, 12, 9)])
    )
    at = timed.batch([replace(own, at=9)])["candidate_features"][0, 1, FEATURES.index("coengagement")]
    assert at == 0.0
    assert timed.batch([replace(own, at=10)])["candidate_features"][0, 1, FEATURES.index("coengagement")] == 1.0
    bare = Tensorizer(config, tensorize.content).batch([example])["candidate_features"][0]
    assert bare[:, FEATURES.index("coengagement")].tolist() == [0.0, 0.0, 0.0]


def test_recent_co_engagement_reads_the_latest_likes_alone() -> None:
    # Post 100, liked first, is the one co-engaged with candidate 200 (member 2 liked both); the
    # RECENT_LIKES likes after it share no member with any candidate.
    recent = list(range(RECENT_LIKES))
    table = CoEngagement.from_engagements({2: {100, 200}, 3: {*recent, 300}})
    config = RankerConfig(content_dim=4, max_history=RECENT_LIKES + 5, features=FEATURES)
    tensorize = Tensorizer(config, PostTable(np.array([100]), np.ones((1, 4), np.float32)), None, table)
    history = [Interaction(p, "like", t) for t, p in enumerate([100, *recent])]
    example = RankExample(
        9, history, np.ones(4, np.float32), np.array([200, 300]), np.array([0.9, 0.5], np.float32), np.zeros((2, 3))
    )
    features = dict(zip(FEATURES, tensorize.batch([example])["candidate_features"][0].T.tolist(), strict=True))
    # Every like: 200 scores 1 (through post 100), 300 scores 1 per recent like, the request's highest.
    assert features["coengagement"] == pytest.approx([1.0 / RECENT_LIKES, 1.0])
    assert features["recent_coengagement"] == pytest.approx([0.0, 1.0])  # the latest likes: 300 alone
    assert features["recent_coengagement_log_rank"] == pytest.approx([np.log(2.0), 0.0])


def test_one_scorer_scores_several_histories_as_each_scored_alone() -> None:
    table = CoEngagement.from_events((m, p, 10 * m + p) for m, posts in _engagements(3).items() for p in posts)
    histories = [[1, 5, 7, 9], [7, 9], [], [58, 99]]
    candidates = list(range(-2, 62))
    for member, before in ((3, None), (3, 200), (10**6, 150)):
        scorer = table.against(member, candidates, before)
        for history in histories:
            alone = table.scores(member, history, candidates, before)
            np.testing.assert_array_equal(scorer.cooccurrence(history), alone)
            np.testing.assert_array_equal(
                scorer.transitions(history, 0.5), table.against(member, candidates, before).transitions(history, 0.5)
            )


def _transitions(
    events: list[tuple[int, int, int]],
    member: int,
    history: list[int],
    candidates: list[int],
    before: float,
    decay: float,
) -> np.ndarray:
    """Transitions counted the slow way: each other member's likes in time order, pairs within the window."""
    kept = [(m, p, t) for m, p, t in events if m != member and t < before]
    count: dict[int, int] = {}
    for _, p, _ in kept:
        count[p] = count.get(p, 0) + 1
    pairs: dict[tuple[int, int], int] = {}
    for m in {m for m, _, _ in events}:
        likes = [p for _, p in sorted((t, p) for mm, p, t in events if mm == m)]
        for i, a in enumerate(likes):
            for b in likes[i + 1 : i + 1 + SEQUENCE_WINDOW]:
                at = next(t for mm, p, t in events if mm == m and p == b)
                if m != member and at < before:
                    pairs[a, b] = pairs.get((a, b), 0) + 1
    out = np.zeros(len(candidates))
    for j, c in enumerate(candidates):
        for age, h in enumerate(reversed(history)):
            if pairs.get((h, c)):
                out[j] += decay**age * pairs[h, c] / np.sqrt(count[h] * count[c])
    return out


def test_transitions_count_who_engaged_with_a_candidate_soon_after_a_history_post() -> None:
    rng = np.random.default_rng(4)
    events = [(m, p, int(rng.integers(0, 1000))) for m, ps in _engagements(seed=4, members=25).items() for p in ps]
    table, candidates = CoEngagement.from_events(events), list(range(-1, 61))
    cases = ((4, None, [3, 7, 11]), (10**6, 500, [20, 3, 99, 7]), (6, 900, [5]), (4, None, [3, 7, 3, 11, 3]))
    for member, before, history in cases:  # the last: a post repeated counts at each of its places
        want = _transitions(events, member, history, candidates, np.inf if before is None else before, 0.7)
        got = table.against(member, candidates, before).transitions(history, 0.7)
        assert np.abs(got - want).max() < 1e-5 and want.max() > 0
    # Order matters: b liked right after a is a transition a -> b, never b -> a; too far apart, neither.
    ordered = CoEngagement.from_events(
        [(1, 10, 1), (1, 11, 2), *((1, 100 + i, 3 + i) for i in range(SEQUENCE_WINDOW)), (1, 12, 99)]
    )
    assert ordered.against(9, [11, 12]).transitions([10]).tolist() == [1.0, 0.0]
    assert ordered.against(9, [10]).transitions([11]).tolist() == [0.0]
    assert not ordered.against(1, [11]).transitions([10]).any()  # the member's own transitions left out
    assert not ordered.against(9, [11], before=2).transitions([10]).any()  # read before 11 was liked


def test_the_ranker_reads_transitions_from_the_latest_likes() -> None:
    # Member 2 liked 100 then 200; member 3 liked 300 then 100: from a liked 100, 200 follows and
    # 300 does not, though both share a member with 100.
    table = CoEngagement.from_events([(2, 100, 1), (2, 200, 2), (3, 300, 1), (3, 100, 2)])
    config = RankerConfig(content_dim=4, max_history=5, features=FEATURES)
    tensorize = Tensorizer(config, PostTable(np.array([100]), np.ones((1, 4), np.float32)), None, table)
    example = RankExample(
        9,
        [Interaction(100, "like", 5)],
        np.ones(4, np.float32),
        np.array([300, 200]),
        np.array([0.9, 0.5], np.float32),
        np.zeros((2, 3)),
    )
    features = dict(zip(FEATURES, tensorize.batch([example])["candidate_features"][0].T.tolist(), strict=True))
    assert features["coengagement"] == pytest.approx([1.0, 1.0])
    assert features["sequential_coengagement"] == pytest.approx([0.0, 1.0])
    assert features["sequential_coengagement_log_rank"] == pytest.approx([np.log(2.0), 0.0])


def test_a_post_repeated_in_a_history_counts_each_time_and_is_read_once() -> None:
    """A history may hold a post many times (viewed again and again); each time adds its score, and the
    table's entries for it are gathered once, so the request's memory does not grow with the repeats."""
    rng = np.random.default_rng(7)
    hot = 0  # a post 20,000 members engaged with, each also with a few others
    members = np.arange(20_000)
    events = np.concatenate(
        [
            np.stack([members, np.full(len(members), hot), rng.integers(0, 1000, len(members))]),
            np.stack([members, rng.integers(1, 200, len(members)), rng.integers(0, 1000, len(members))]),
        ],
        axis=1,
    )
    table = CoEngagement.from_arrays(*events)
    scorer = table.against(10**6, list(range(1, 200)))
    once, again = scorer.cooccurrence([hot]), scorer.cooccurrence([hot, 5, hot, hot])
    assert np.allclose(again, 3 * once + scorer.cooccurrence([5]), rtol=1e-5) and once.max() > 0

    def peak(read: Callable[[list[int]], np.ndarray], history: list[int]) -> int:
        tracemalloc.start()
        try:
            read(history)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    for read in (scorer.cooccurrence, scorer.transitions):
        single, repeated = peak(read, [hot]), peak(read, [hot] * 200)
        assert repeated < 1.5 * single, (read.__name__, single, repeated)


def test_a_history_of_many_popular_posts_reads_its_newest_within_a_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """2,000 distinct posts each engaged with by many members read the whole table (and ten times as
    many transitions): the read stops at MAX_HISTORY_ENTRIES, leaving the oldest history posts out,
    and scores as the newest posts that fit would alone."""
    rng = np.random.default_rng(8)
    members = np.repeat(np.arange(500), 10)
    table = CoEngagement.from_arrays(members, rng.integers(0, 40, len(members)), rng.integers(0, 1000, len(members)))
    history, candidates = list(range(40)), list(range(40, 80)) + list(range(40))
    scorer = table.against(10**6, candidates)
    whole = [scorer.cooccurrence(history), scorer.transitions(history, 0.9)]
    sizes = table.sizes(np.array(history))
    budget = int(sizes[-15:].sum())  # the newest 15 posts fit, the 16th does not
    monkeypatch.setattr(coengagement, "MAX_HISTORY_ENTRIES", budget)
    read: list[int] = []
    entries = table._entries
    monkeypatch.setattr(table, "_entries", lambda posts, *a: (read.append(len(posts)), entries(posts, *a))[1])
    capped = [scorer.cooccurrence(history), scorer.transitions(history, 0.9)]
    assert read == [15, 15]
    newest = history[-15:]
    assert np.allclose(capped[0], scorer.cooccurrence(newest))
    # The left-out posts' places still count in the decay (-1: a post the table does not hold).
    assert np.allclose(capped[1], scorer.transitions([-1] * 25 + newest, 0.9))
    assert not np.allclose(capped[0], whole[0]) and not np.allclose(capped[1], whole[1])


def test_candidates_past_a_budget_of_entries_are_scored_without_co_engagement(monkeypatch: pytest.MonkeyPatch) -> None:
    """Candidates' entries are read whole; 2,000 of the most engaged-with posts read a table of
    millions. Past MAX_CANDIDATE_ENTRIES the candidates last in the retrieval order are scored as
    posts the table does not hold; those before them score as they did."""
    rng = np.random.default_rng(9)
    members = np.repeat(np.arange(300), 8)
    table = CoEngagement.from_arrays(members, rng.integers(0, 30, len(members)), rng.integers(0, 1000, len(members)))
    candidates, history = list(range(30)), [0, 1, 2, 3]
    whole = table.against(10**6, candidates)
    budget = int(table.sizes(np.array(candidates[:20])).sum())
    monkeypatch.setattr(coengagement, "MAX_CANDIDATE_ENTRIES", budget)
    capped = table.against(10**6, candidates)
    for read in ("cooccurrence", "transitions"):
        full, part = getattr(whole, read)(history), getattr(capped, read)(history)
        assert np.allclose(part[:20], full[:20]) and not part[20:].any() and full[20:].any()


def test_one_post_past_the_budget_is_skipped_not_the_end_of_the_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A viral post as a member's newest engagement (or first candidate), larger than the budget
    alone, zeroed every co-engagement feature: the read stopped at it."""
    rng = np.random.default_rng(10)
    viral = np.stack([np.arange(5000), np.full(5000, 99), rng.integers(0, 1000, 5000)])
    rest = np.stack([rng.integers(0, 400, 3000), rng.integers(0, 20, 3000), rng.integers(0, 1000, 3000)])
    table = CoEngagement.from_arrays(*np.concatenate([viral, rest], axis=1))
    monkeypatch.setattr(coengagement, "MAX_HISTORY_ENTRIES", 2000)
    monkeypatch.setattr(coengagement, "MAX_CANDIDATE_ENTRIES", 2000)
    scorer = table.against(10**6, [99, *range(20)])
    older = scorer.cooccurrence([1, 2, 3])
    assert older[1:].any() and np.allclose(scorer.cooccurrence([1, 2, 3, 99]), older)
    assert scorer.cooccurrence([1, 2, 3])[0] == 0.0  # the viral candidate itself is past the budget
