"""The LinkedIn-shaped feed: its impression log, the examples and counts read from it, the per-task
metrics, and the six-task ranker trained on it end to end with the tiny encoder."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from feedserve.artifacts import ArtifactLayout
from feedserve.prompt.buckets import PercentileBuckets
from feedserve.prompt.records import Member, is_engaged
from feedserve.rank.coengagement import CoEngagement
from feedserve.rank.features import EventCounts
from feedserve.rank.model import GenerativeRanker
from feedserve.rank.train import FEED_TASK_WEIGHTS
from feedserve.training.feed_log import FEED_TASKS, feed_examples, synthetic_impressions
from feedserve.training.rank_feed import FEED_ACTIONS, auc, main, ndcg_at, task_report

LOG = synthetic_impressions(n_members=60, n_posts=300, n_authors=12, sessions=6, shown=12, seed=1)


def test_the_log_is_in_time_order_and_shows_only_posts_that_exist() -> None:
    created = {p.id: p.created_at for p in LOG.posts}
    times = [i.at for i in LOG.impressions]
    assert times == sorted(times)
    assert all(created[i.post] < i.at for i in LOG.impressions)
    assert all(p.counts == {} for p in LOG.posts)  # the encoder never reads counts from the future
    sessions = Counter((i.member, i.at) for i in LOG.impressions)
    assert set(sessions.values()) == {12}  # a post shown once per session


def test_actions_have_their_causes() -> None:
    """Members act on their own topic more, and skip it less; a skip is never an engagement too."""
    topic = {m.id: m.industry for m in LOG.members}
    rate: dict[tuple[str, bool], list[float]] = defaultdict(list)
    for i in LOG.impressions:
        assert i.actions <= set(FEED_TASKS)
        assert not ("skip" in i.actions and len(i.actions) > 1)
        own = LOG.topic_of[i.post] == topic[i.member]
        for task in FEED_TASKS:
            rate[(task, own)].append(float(task in i.actions))
    for task in ("click", "long dwell", "like"):
        assert np.mean(rate[(task, True)]) > 1.5 * np.mean(rate[(task, False)]), task
    assert np.mean(rate[("skip", True)]) < np.mean(rate[("skip", False)])
    assert 0 < np.mean(rate[("comment", True)] + rate[("comment", False)]) < 0.1  # active tasks are rare
    # Each action is drawn from the chance the impression carries (the benchmark's ceiling).
    chances = np.array([i.chances for i in LOG.impressions])
    taken = np.array([[t in i.actions for t in FEED_TASKS] for i in LOG.impressions])
    np.testing.assert_allclose(chances.mean(0), taken.mean(0), atol=0.02)
    assert all(auc(chances[:, t], taken[:, t]) > 0.7 for t in range(len(FEED_TASKS)))  # type: ignore[operator]


def test_examples_read_only_the_past() -> None:
    seen: list[Member] = []

    def vectors(records: list[Member]) -> np.ndarray:
        seen.extend(records)
        return np.ones((len(records), 4), np.float32)

    ids = np.array([p.id for p in LOG.posts], np.int64)
    examples = feed_examples(LOG, vectors, ids, np.ones((len(ids), 4), np.float32))
    assert len(examples) == len({(i.member, i.at) for i in LOG.impressions}) == len(seen)
    by_session = defaultdict(list)
    for i in LOG.impressions:
        by_session[(i.member, i.at)].append(i)
    for x, record in zip(examples, seen, strict=True):
        assert x.at is not None
        shown = by_session[(x.member_id, x.at)]
        assert x.candidates.tolist() == [i.post for i in shown]
        assert x.labels.tolist() == [[float(t in i.actions) for t in FEED_TASKS] for i in shown]
        assert all(it.at < x.at for it in x.history)  # the history is strictly before the session
        assert [h.post_id for h in record.history] == [it.post_id for it in x.history]
        assert {it.action for it in x.history} <= set(FEED_ACTIONS)
    # The history holds negatives (skips) for the ranker; the retrieval prompt keeps engaged ones.
    assert any(it.action == "skip" for x in examples for it in x.history)
    assert not is_engaged("skip")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5), st.integers(0, 50), st.sampled_from(["views", "likes"])), max_size=40),
    st.integers(-5, 60),
)
def test_event_counts_are_the_events_before_the_moment(events: list[tuple[int, int, str]], before: int) -> None:
    buckets = PercentileBuckets.fit({"views": [0, 1, 2, 3, 5, 8], "likes": [0, 1, 2]}, n_buckets=4)
    counts = EventCounts([(10**15 + p, t, k) for p, t, k in events], buckets)
    posts = [10**15 + p for p in range(7)] + [3]
    got = counts.percentiles(posts, before, ("views", "likes", "shares"))
    for row, post in zip(got, posts, strict=True):
        for j, kind in enumerate(("views", "likes")):
            n = sum(1 for p, t, k in events if 10**15 + p == post and k == kind and t < before)
            expected = buckets.bucket(kind, n) / 3 if n else 0.0
            assert row[j] == pytest.approx(expected), (post, kind)
        assert row[2] == 0.0  # a count the log does not hold


def test_auc_is_the_pairwise_probability() -> None:
    rng = np.random.default_rng(0)
    scores, labels = rng.integers(0, 4, 50).astype(float), rng.random(50) < 0.3
    pairs = [
        1.0 if s > t else 0.5 if s == t else 0.0
        for s, y in zip(scores, labels, strict=True)
        if y
        for t, z in zip(scores, labels, strict=True)
        if not z
    ]
    assert auc(scores, labels) == pytest.approx(np.mean(pairs))
    assert auc(scores, np.zeros(50)) is None
    gains = np.array([1.0, 0.0, 3.0])
    assert ndcg_at(np.array([2, 0, 1]), gains) == pytest.approx(1.0)
    assert ndcg_at(np.array([0, 2, 1]), gains) == pytest.approx((1 + 3 / np.log2(3)) / (3 + 1 / np.log2(3)))
    assert ndcg_at(np.array([0, 1]), np.zeros(2)) is None


def test_the_report_reads_the_final_score_as_served() -> None:
    ids = np.array([p.id for p in LOG.posts], np.int64)
    examples = feed_examples(LOG, lambda r: np.ones((len(r), 2), np.float32), ids, np.ones((len(ids), 2)))
    oracle = [x.labels.copy() for x in examples]  # knows what each member will do
    report = task_report(examples, oracle, FEED_TASKS, FEED_TASK_WEIGHTS)
    assert all(report[t]["auc"] == 1.0 for t in FEED_TASKS)
    assert report["final"]["ndcg@10"] == pytest.approx(1.0)
    inverted = task_report(examples, [-s for s in oracle], FEED_TASKS)
    assert inverted["final"]["ndcg@10"] < 0.7


def test_the_six_task_ranker_trains_and_evaluates_end_to_end(tiny_artifacts: ArtifactLayout, tmp_path: Path) -> None:
    """The training command on the tiny encoder: it trains, saves a ranker of the feed's tasks and
    actions, reports every task, and resumes to the same weights."""
    args = [
        "--artifacts", str(tiny_artifacts.root), "--members", "40", "--posts", "200", "--sessions", "5",
        "--shown", "10", "--steps", "40", "--d-model", "16", "--checkpoint-every", "20",
        "--cache", str(tmp_path / "cache"),
    ]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["config"]["tasks"] == list(FEED_TASKS) and report["config"]["actions"] == list(FEED_ACTIONS)
    losses = torch.load(tmp_path / "a" / "state.pt", weights_only=True)["losses"]
    assert len(losses) == 40 and np.mean(losses[-10:]) < np.mean(losses[:10])
    assert all(report["tasks"][t]["auc"] is not None for t in FEED_TASKS)
    assert report["training_sessions"] > 0 and report["test_sessions"] > 0
    model = GenerativeRanker.load(tmp_path / "a")
    assert 0 <= report["post_ids"]["colliding"] < report["post_ids"]["trained"]
    assert int(model.id_owners.ge(0).sum()) == report["post_ids"]["trained"] - report["post_ids"]["colliding"]
    assert model.config.tasks == FEED_TASKS
    # Stopped at 20 and resumed: the same weights as the run straight through.
    assert main([*args, "--out", str(tmp_path / "b"), "--steps", "20"]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--resume"]) == 0
    resumed = GenerativeRanker.load(tmp_path / "b")
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


class _MeanOfPosts:
    """Stands in for the encoder where the split, not the embedding, is tested: a member is the mean
    of the posts they acted on."""

    def __init__(self, posts: list[int]) -> None:
        self.row = {p: i for i, p in enumerate(posts)}
        self.posts = np.random.default_rng(0).normal(size=(len(posts), 8)).astype(np.float32)

    def member_vectors(self, members: list[Member]) -> np.ndarray:
        return np.stack(
            [
                self.posts[[self.row[h.post_id] for h in m.history]].mean(0) if m.history else np.zeros(8)
                for m in members
            ]
        )

    def save_members(self) -> None:
        pass


def test_the_split_trains_before_the_cutoff_and_counts_only_what_came_before() -> None:
    from feedserve.training.rank_feed import FeedData

    retriever = _MeanOfPosts([p.id for p in LOG.posts])
    data = FeedData.build(LOG, retriever)  # type: ignore[arg-type]
    assert data.train and data.test
    assert max(x.at or 0 for x in data.train) < data.cutoff <= min(x.at or 0 for x in data.test)
    valid = FeedData.build(LOG, retriever, validate=True)  # type: ignore[arg-type]
    assert max(x.at or 0 for x in valid.train + valid.test) < data.cutoff and valid.cutoff < data.cutoff
    # A session's counts are those before it: its own impressions and everything later are unread.
    x = data.test[0]
    views = data.features.percentiles(x.candidates.tolist(), x.at)[:, data.features.counts.index("views")]
    shown_before = Counter(i.post for i in LOG.impressions if x.at is not None and i.at < x.at)
    assert [v > 0 for v in views] == [shown_before[c] > 0 for c in x.candidates.tolist()]
    for tasks in (("skip", "like"), ("comment",), FEED_TASKS):
        columns = [FEED_TASKS.index(t) for t in tasks]
        for x, y in zip(data.training(tasks), data.train, strict=True):
            np.testing.assert_array_equal(x.labels, y.labels[:, columns])
    assert data.train[0].labels.shape[1] == len(FEED_TASKS)  # relabelling copies


def test_a_ranker_of_some_tasks_predicts_and_is_reported_by_name() -> None:
    from feedserve.training.rank_feed import FeedData, feed_config, per_session, predict

    data = FeedData.build(LOG, _MeanOfPosts([p.id for p in LOG.posts]))  # type: ignore[arg-type]
    config = feed_config(8, ("skip", "like"), d_model=16, n_heads=2, n_layers=1, max_history=20, max_rank=12)
    assert feed_config(8, actions=("neutral",)).actions == ("neutral",)  # an ablation's fields win
    model = GenerativeRanker(config)
    scores = predict(model, data.tensorizer(config), data.test[:5])
    assert [s.shape for s in scores] == [(len(x.candidates), 2) for x in data.test[:5]]
    assert set(task_report(data.test[:5], scores, config.tasks)) == {"skip", "like"}  # no final score of two tasks
    # Every task in another order: the same final score, read by name.
    six = [np.random.default_rng(i).random((len(x.candidates), 6)) for i, x in enumerate(data.test[:20])]
    order = [5, 2, 0, 4, 1, 3]
    shuffled = per_session(data.test[:20], [s[:, order] for s in six], [FEED_TASKS[i] for i in order])
    np.testing.assert_allclose(shuffled["final"], per_session(data.test[:20], six, FEED_TASKS)["final"])


def test_a_saved_log_reads_back_and_is_named_where_malformed(tmp_path: Path) -> None:
    from feedserve.training.feed_log import is_feed_log, load_feed_log

    LOG.save(tmp_path / "log")
    assert is_feed_log(tmp_path / "log") and not is_feed_log(tmp_path)
    back = load_feed_log(tmp_path / "log")
    assert back.posts == LOG.posts and back.members == LOG.members
    assert [(i.member, i.post, i.at, i.actions) for i in back.impressions] == [
        (i.member, i.post, i.at, i.actions) for i in LOG.impressions
    ]
    assert back.cutoff() == LOG.cutoff()
    lines = (tmp_path / "log" / "impressions.jsonl").read_text().splitlines()
    for bad, named in (
        ('{"member": 1, "post": 2}', '"at"'),
        ('{"member": 1, "post": 2, "at": 3, "actions": ["x"]}', "x"),
        # Read as something else before (1.9 as 1, "12" as 12, a dict as its keys), or crashing later.
        ('{"member": 1, "post": 2, "at": 1.9, "actions": []}', r"impression.at: 1.9 is not an integer"),
        ('{"member": 1, "post": 2, "at": "12", "actions": []}', "impression.at: '12'"),
        ('{"member": 1, "post": 2, "at": 1180591620717411303424, "actions": []}', "impression.at"),
        ('{"member": 1, "post": 2, "at": -5, "actions": []}', "impression.at: -5"),
        ('{"member": 1e400, "post": 2, "at": 3, "actions": []}', "impression.member: inf"),
        ('{"member": 1, "post": 2, "at": 3, "actions": {"like": 0}}', "impression.actions"),
        ('{"member": 1, "member": 2, "post": 2, "at": 3, "actions": []}', "duplicate key 'member'"),
        ("[" * 100_000, "nested too deeply"),
    ):
        (tmp_path / "log" / "impressions.jsonl").write_text("\n".join([*lines[:5], bad, *lines[5:]]) + "\n")
        with pytest.raises(ValueError, match=f"impressions.jsonl:6: .*{named}"):
            load_feed_log(tmp_path / "log")
    (tmp_path / "log" / "impressions.jsonl").write_text("\n".join(lines) + "\n")
    members = (tmp_path / "log" / "members.jsonl").read_text()
    (tmp_path / "log" / "members.jsonl").write_text(members + '{"id": "x"}\n')
    with pytest.raises(ValueError, match=f"members.jsonl:{len(LOG.members) + 1}: "):
        load_feed_log(tmp_path / "log")
    first = members.splitlines()[0]  # a member twice: two people in one id
    (tmp_path / "log" / "members.jsonl").write_text(members + first + "\n")
    with pytest.raises(ValueError, match=f"members.jsonl:{len(LOG.members) + 1}: id .* again \\(first at line 1\\)"):
        load_feed_log(tmp_path / "log")


def test_members_at_a_moment_hold_what_they_acted_on_before_it() -> None:
    moment = LOG.cutoff()
    records = {m.id: m for m in LOG.members_at(moment)}
    assert set(records) == {m.id for m in LOG.members}
    for member, record in records.items():
        acted = [i for i in LOG.impressions if i.member == member and i.at < moment and i.action]
        assert [(h.post_id, h.engaged_at, h.action) for h in record.history] == [
            (i.post, i.at, i.action) for i in acted
        ]
        assert all(h.post is not None and h.post.id == h.post_id for h in record.history)


def test_the_served_tables_are_what_training_reads_at_the_cutoff() -> None:
    """`feedserve build --corpus LOG` serves the counts and co-engagement of the training period: a
    request at the cutoff reads the features a training example at that moment reads."""
    from feedserve.training.rank_feed import FeedData

    data = FeedData.build(LOG, _MeanOfPosts([p.id for p in LOG.posts]))  # type: ignore[arg-type]
    assert data.features.buckets is not None
    table, engaged = LOG.serving_tables(data.features.buckets)
    ids = [p.id for p in LOG.posts]
    served = table.percentiles(ids)
    np.testing.assert_array_equal(served, data.features.percentiles(ids, data.cutoff))
    assert (served > 0).any(axis=0).all()  # every count is read
    assert table.tag_union(ids[:3]) == data.features.tag_union(ids[:3])
    before = CoEngagement.from_events(LOG.engagements(data.cutoff)).events()
    for served_column, column in zip(engaged.events(), before, strict=True):
        np.testing.assert_array_equal(served_column, column)
    assert 0 < len(before[0]) < len(data.coengagement.events()[0])  # the test period's are not served
