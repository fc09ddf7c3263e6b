"""The six-task feed ranker through a real tritonserver, set up as a user would: a LinkedIn-shaped
log written to disk (`python -m feedserve.training.feed_log`), a ranker trained on it
(`feedserve.training.rank_feed --log`), its serving tables built from the log (`feedserve build
--corpus LOG`), the repository rendered with the feed's task weights and a new-post boost, the log's
posts indexed (`feedserve index --corpus LOG`) and feeds asked for (`feedserve feed`)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from feedserve.artifacts import ArtifactLayout
from feedserve.clients.online import FeedClient
from feedserve.ops import cli
from feedserve.ops.builder import build_ranker
from feedserve.ops.launcher import TritonServer, on_free_ports
from feedserve.prompt.records import Member, parse_member
from feedserve.rank.coengagement import CoEngagement
from feedserve.rank.data import PostTable, RankExample, Tensorizer, member_interactions
from feedserve.rank.features import PostFeatures
from feedserve.rank.model import INPUTS, GenerativeRanker
from feedserve.rank.train import FEED_TASK_WEIGHTS
from feedserve.training import feed_log, rank_feed
from feedserve.training.feed_log import FEED_TASKS, REQUESTS_FILE, load_feed_log
from feedserve.triton.repository import RepositorySettings, task_weights_arg, write_repository

pytestmark = pytest.mark.integration
BOOST = 0.5  # added to the final score of the posts the ranker never trained on


def _boosts(package: Path, ids: list[int]) -> dict[int, float]:
    """What the server adds to each post's final score: BOOST where the ranker never trained on it."""
    trained = GenerativeRanker.load(package).trained(torch.tensor(ids)).tolist()
    return {i: 0.0 if t else BOOST for i, t in zip(ids, trained, strict=True)}


@pytest.fixture(scope="module")
def served(tiny_artifacts: ArtifactLayout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    root = tmp_path_factory.mktemp("feed")
    log = root / "log"
    assert (
        feed_log.main(["--out", str(log), "--members", "30", "--posts", "150", "--sessions", "4", "--shown", "10"]) == 0
    )
    layout = ArtifactLayout(root / "artifacts")
    # The tiny encoder as built, without the index other tests wrote into it.
    shutil.copytree(tiny_artifacts.root, layout.root, ignore=shutil.ignore_patterns("index", "emb"))
    package = root / "ranker"
    train = ["--artifacts", str(layout.root), "--log", str(log), "--out", str(package), "--steps", "30"]
    assert rank_feed.main([*train, "--d-model", "16", "--cache", str(root / "cache")]) == 0
    build_ranker(layout, package, log)
    layout.write_manifest()
    repo = root / "repository"
    feed = tuple(task_weights_arg("feed").items())
    write_repository(repo, RepositorySettings(task_weights=feed, new_post_boost=BOOST))
    opts = on_free_ports(repository=repo, artifacts=layout.root, log_file=root / "server.log", startup_timeout_s=180)
    with TritonServer(opts) as server:
        args = ["--artifacts", str(layout.root), "index", "--corpus", str(log), "--url", server.grpc_url]
        assert cli.main(args) == 0
        yield {"server": server, "layout": layout, "log": log, "package": package}


def _members(log: Path, n: int) -> list[Member]:
    """Members of the log with a history, as of its cutoff (what `feed_log` writes as requests)."""
    records = [parse_member(line) for line in (log / REQUESTS_FILE).read_text().splitlines()]
    return [m for m in records if len(m.history) >= 3][:n]


def test_feedserve_feed_serves_the_six_tasks_by_the_feeds_weights(served: dict[str, object]) -> None:
    server, log, package = served["server"], served["log"], served["package"]
    assert isinstance(server, TritonServer) and isinstance(log, Path) and isinstance(package, Path)
    members = _members(log, 10)  # more than a `feed` request takes (8): the command sends several
    requests = log.parent / "ten.jsonl"
    requests.write_text("".join(m.model_dump_json() + "\n" for m in members))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["feed", str(requests), "-n", "5", "--candidates", "40", "--url", server.grpc_url]) == 0
    feeds = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(feeds) == 10
    posts = {p.id for p in load_feed_log(log).posts}
    boosts = _boosts(package, sorted(posts))
    for member, feed in zip(members, feeds, strict=True):
        assert len(feed) == 5 and {row["post_id"] for row in feed} <= posts
        assert not {row["post_id"] for row in feed} & {h.post_id for h in member.history}
        assert [row["score"] for row in feed] == sorted((row["score"] for row in feed), reverse=True)
        for row in feed:
            assert set(row) == {"post_id", "score", *FEED_TASKS}
            # Printed to 4 places: the sum of six rounded terms is within their rounding.
            weighed = sum(FEED_TASK_WEIGHTS[t] * row[t] for t in FEED_TASKS)
            assert row["score"] == pytest.approx(weighed + boosts[row["post_id"]], abs=1e-3)


def test_the_served_ranker_scores_as_pytorch_does_on_the_logs_tables(served: dict[str, object]) -> None:
    """The served scores of a member's candidates are the trained PyTorch ranker's on the tables the
    build made from the log (its counts at the cutoff, read through the ranker's own cut points), and
    the final score theirs by the feed's weights, raised by the boost where the ranker never trained
    on the post."""
    server, layout, log, package = served["server"], served["layout"], served["log"], served["package"]
    assert isinstance(server, TritonServer) and isinstance(layout, ArtifactLayout)
    assert isinstance(log, Path) and isinstance(package, Path)
    table = PostFeatures.load(layout.post_features)
    posts = load_feed_log(log).posts
    candidates = [p.id for p in posts[:30] + posts[-30:]]  # the last created: some never trained on
    boosts = _boosts(package, candidates)
    assert set(boosts.values()) == {0.0, BOOST}
    assert table.counts == feed_log.COUNTS and (table.percentiles(candidates) > 0).any(axis=0).all()
    model = GenerativeRanker.load(package)
    with FeedClient(server.grpc_url, "grpc", timeout_s=60) as client:
        assert client.ranker_tasks() == list(FEED_TASKS)
        # The index's content of every post (histories read posts beyond the candidates).
        assert len(posts) > client.max_batch("embed_post")  # sent as several requests
        content = PostTable(np.array([p.id for p in posts]), client.embed_posts(posts))
        tensorize = Tensorizer(model.config, content, table, CoEngagement.load(layout.coengagement))
        for member in _members(log, 2):
            query = client.embed_members([member])
            scores = (content.lookup(np.array(candidates))[0] @ query[0]).astype(np.float32)
            ranked = client.rank(member, candidates, scores, query)
            example = RankExample(
                member.id,
                member_interactions(member),
                query[0],
                np.array(candidates, np.int64),
                scores,
                np.zeros((len(candidates), len(FEED_TASKS)), np.float32),
            )
            with torch.no_grad():
                t = tensorize.batch([example])
                want = torch.sigmoid(model(**{k: t[k] for k in INPUTS}))[0].numpy()
            by_id = {r.post_id: r for r in ranked}
            assert sorted(by_id) == sorted(candidates)
            got = np.array([[by_id[c].tasks[task] for task in FEED_TASKS] for c in candidates])
            np.testing.assert_allclose(got, want, atol=1e-4)
            weights = np.array([FEED_TASK_WEIGHTS[t] for t in FEED_TASKS], np.float32)
            final = want @ weights + np.array([boosts[c] for c in candidates], np.float32)
            np.testing.assert_allclose([by_id[c].score for c in candidates], final, atol=1e-4)
