"""Nearline ingestion against a real tritonserver: events become searchable posts, bad events are
skipped by name, a restart resumes at the acknowledged offset, and kill -9 loses nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from feedserve.artifacts import ArtifactLayout
from feedserve.clients.ingest import Ingester, JsonlSource
from feedserve.clients.online import FeedClient
from feedserve.index.live import IndexFollower
from feedserve.index.wal import read_header
from feedserve.ops.builder import SAMPLE_CORPUS
from feedserve.ops.launcher import TritonServer, on_free_ports
from feedserve.prompt.buckets import PercentileBuckets
from feedserve.prompt.movielens import load_movielens
from feedserve.prompt.records import Post
from feedserve.rank.engagements import ENGAGEMENTS, load_snapshot
from feedserve.rank.features import feature_row
from feedserve.schema import ModelName
from feedserve.triton.repository import RepositorySettings, write_repository

pytestmark = pytest.mark.integration

BASE_ID = 10**11  # far from MovieLens ids: other tests' brute-force checks never see these posts


def _posts(n: int, offset: int) -> list[Post]:
    movies = load_movielens(SAMPLE_CORPUS).posts()[:n]
    return [m.model_copy(update={"id": BASE_ID + offset + i}) for i, m in enumerate(movies)]


def _event(kind: str, **fields: object) -> str:
    return json.dumps({"type": kind, "ts": time.time(), **fields}) + "\n"


def _create(post: Post) -> str:
    return _event("create", post=json.loads(post.model_dump_json(exclude_none=True)))


def _top1(client: FeedClient, vectors: np.ndarray) -> list[int]:
    k = np.ones((len(vectors), 1), np.int64)
    ids = client.infer(ModelName.KNN, {"QUERY": vectors, "K": k}, ("IDS",))["IDS"]
    return ids[:, 0].tolist() if ids.shape[1] else [-1] * len(vectors)  # an empty index: no hits at all


def _present(client: FeedClient, posts: list[Post]) -> list[bool]:
    """Whether each post is in the index under its id (its own vector's nearest neighbour is itself)."""
    return [hit == p.id for hit, p in zip(_top1(client, client.embed_posts(posts)), posts, strict=True)]


def test_events_become_posts_and_a_restart_resumes(
    triton_server, tiny_artifacts: ArtifactLayout, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    posts = _posts(8, 0)
    events = tmp_path / "events.jsonl"
    renamed = posts[1].model_copy(update={"text": "an entirely different text about sailing boats"})
    lines = [_create(p) for p in posts] + [
        _event("update", post=json.loads(renamed.model_dump_json(exclude_none=True))),
        _event("counts", post_id=posts[2].id, counts={"ratings": 5000}),
        _event("delete", post_id=posts[3].id),
        "{not json\n",
        _event("counts", post_id=BASE_ID - 1, counts={"ratings": 1}),
    ]
    events.write_text("".join(lines))
    state = tmp_path / "state"
    with FeedClient(triton_server.grpc_url, "grpc", timeout_s=60) as client:
        stats = Ingester(client, state, window_s=0.05, max_batch=4).run(JsonlSource(events, state))
        assert (stats.events, stats.bad) == (13, 2) and stats.lags_s
        counted = posts[2].model_copy(update={"counts": {**posts[2].counts, "ratings": 5000.0}})
        expected = [p for p in (posts[0], renamed, counted, *posts[4:])]
        assert all(_present(client, expected))
        # Each post's features as its last event described it, kept beside its vector for `rank`.
        follower = IndexFollower.open(tiny_artifacts.index_dir.root)
        try:
            _, _, rows = follower.index.lookup_rows(np.array([p.id for p in posts]))
        finally:
            follower.close()
        buckets = PercentileBuckets.load(tiny_artifacts.buckets)
        held = {p: json.loads(json.dumps(r)) for p, r in rows.items()}  # it gives lists back as tuples
        assert held == {p.id: feature_row(p, buckets) for p in expected}
        assert held[counted.id] != feature_row(posts[2], buckets)
        assert (
            posts[3].id
            not in client.infer(
                ModelName.KNN, {"QUERY": client.embed_posts(posts[3:4]), "K": np.array([[50]], np.int64)}, ("IDS",)
            )["IDS"][0]
        )
        # Appended events only: a new ingester on the same state starts where the last one stopped.
        with open(events, "a") as f:
            f.write("".join(_event("delete", post_id=p.id) for p in posts))
        again = Ingester(client, state, window_s=0.05).run(JsonlSource(events, state))
        assert (again.events, again.deletes) == (len(posts), len(posts))
        assert not any(_present(client, expected))


WORKER = """
import logging, sys
from feedserve.clients.ingest import main
logging.basicConfig(level=logging.WARNING)
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_mid_ingestion_then_resume_loses_nothing(triton_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    posts = _posts(40, 1000)
    events = tmp_path / "events.jsonl"
    events.write_text("".join(_create(p) for p in posts))
    state = tmp_path / "state"
    args = [
        sys.executable,
        "-c",
        WORKER,
        "--events",
        str(events),
        "--state",
        str(state),
        "--url",
        triton_server.grpc_url,
        "--window-ms",
        "10",
        "--max-batch",
        "3",
    ]
    proc = subprocess.Popen(args)
    offset_file = state / "offset.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
        offset_file.exists() and json.loads(offset_file.read_text())["offset"] > 0
    ):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done = json.loads(offset_file.read_text())["offset"]
    assert 0 < done < events.stat().st_size, "the kill should land mid-ingestion"
    subprocess.run(args, check=True, timeout=300)
    assert json.loads(offset_file.read_text())["offset"] == events.stat().st_size
    with FeedClient(triton_server.grpc_url, "grpc", timeout_s=60) as client:
        assert all(_present(client, posts))
        # Leave the shared index as it was for the other tests.
        ops = np.full((len(posts), 1), 2, np.int64)
        client.infer(
            ModelName.INDEX_WRITE, {"OP": ops, "POST_ID": np.array([[p.id] for p in posts], np.int64)}, ("LSN",)
        )


@pytest.fixture
def redis_url(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real redis-server (Debian's, installed by scripts/setup.sh) on a free loopback port."""
    import shutil as sh

    from feedserve.ops.launcher import free_port

    if sh.which("redis-server") is None:
        pytest.skip("redis-server is not installed (scripts/setup.sh installs it)")
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=20)


def test_redis_stream_events_are_acknowledged_only_once_indexed(triton_server, redis_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import redis

    from feedserve.clients.ingest import RedisSource

    posts = _posts(10, 2000)
    broker = redis.Redis.from_url(redis_url)
    for p in posts:
        broker.xadd("post-events", {"event": _create(p)})
    broker.xadd("post-events", {"event": "{not json"})
    # A consumer is delivered the entries and dies before the index has them (no XACK) ...
    crashed = RedisSource(redis_url, "post-events", idle_exit_s=0.5).events()
    assert all(next(crashed) is not None for _ in range(5))
    assert broker.xpending("post-events", "feedserve")["pending"] == 11  # delivered in one read
    # ... and, restarted under the same name, takes them back before the new ones.
    state = tmp_path / "state"
    with FeedClient(triton_server.grpc_url, "grpc", timeout_s=60) as client:
        stats = Ingester(client, state, window_s=0.05, max_batch=4).run(
            RedisSource(redis_url, "post-events", idle_exit_s=0.5)
        )
        assert (stats.events, stats.bad, stats.upserts) == (11, 1, 10)
        assert broker.xpending("post-events", "feedserve")["pending"] == 0
        assert all(_present(client, posts))
        for p in posts:
            broker.xadd("post-events", {"event": _event("delete", post_id=p.id)})
        Ingester(client, state, window_s=0.05).run(RedisSource(redis_url, "post-events", idle_exit_s=0.5))
        assert not any(_present(client, posts))


def test_counted_actions_reach_the_index_through_redis_and_a_restarted_counter_counts_once(  # type: ignore[no-untyped-def]
    triton_server, tiny_artifacts: ArtifactLayout, redis_url: str, tmp_path: Path
) -> None:
    """Ratings on an `actions` stream -> the counter (dying once, its entries unacknowledged) ->
    `counts` events on `post-events` beside the posts' creation -> the ingester: the index holds each
    post's features with its counts as the build's plus every rating once."""
    import redis

    from feedserve.clients.counter import Counter, CountStore, RedisSink
    from feedserve.clients.ingest import RedisSource

    class Gone(RedisSource):
        def commit(self, positions: list[Any]) -> None:
            raise ConnectionError("the counter died before acknowledging")

    def rated(post: Post, stars: float, n: int) -> Post:
        before = post.counts["ratings"]
        mean = (before * post.counts["mean_rating"] + stars * n) / (before + n)
        return post.model_copy(update={"counts": {"ratings": before + n, "mean_rating": round(mean, 3)}})

    posts = _posts(3, 3500)
    broker = redis.Redis.from_url(redis_url)
    for p in posts:
        broker.xadd("post-events", {"event": _create(p)})
    for post, stars, n in ((posts[0], 5, 30), (posts[1], 1, 7)):
        for _ in range(n):
            broker.xadd("actions", {"event": _event("engage", member_id=1, post_id=post.id, action=f"rated {stars}")})
    store = CountStore(tmp_path / "counter" / "counts.sqlite")
    store.seed({p.id: p.counts for p in posts})
    # Counted through its first window of 16, then gone before acknowledging: the entries come back.
    with pytest.raises(ConnectionError):
        Counter(store, RedisSink(redis_url, "post-events"), max_batch=16).run(
            Gone(redis_url, "actions", group="counter", idle_exit_s=0.5)
        )
    stats = Counter(store, RedisSink(redis_url, "post-events"), max_batch=16).run(
        RedisSource(redis_url, "actions", group="counter", idle_exit_s=0.5)
    )
    assert (stats.events, stats.skipped, stats.counted, stats.sent) == (37, 16, 21, 2)
    assert broker.xpending("actions", "counter")["pending"] == 0
    expected = {p.id: p for p in (rated(posts[0], 5, 30), rated(posts[1], 1, 7), posts[2])}
    with FeedClient(triton_server.grpc_url, "grpc", timeout_s=60) as client:
        ingested = Ingester(client, tmp_path / "ingest", window_s=0.05).run(
            RedisSource(redis_url, "post-events", idle_exit_s=0.5)
        )
        assert (ingested.events, ingested.bad) == (5, 0)
        follower = IndexFollower.open(tiny_artifacts.index_dir.root)
        try:
            _, _, rows = follower.index.lookup_rows(np.array(list(expected)))
        finally:
            follower.close()
        buckets = PercentileBuckets.load(tiny_artifacts.buckets)
        held = {p: json.loads(json.dumps(r)) for p, r in rows.items()}
        assert held == {i: feature_row(p, buckets) for i, p in expected.items()}
        assert held[posts[0].id] != feature_row(posts[0], buckets)  # 30 five-star ratings moved its tokens
        for p in posts:  # leave the shared index as it was
            broker.xadd("post-events", {"event": _event("delete", post_id=p.id)})
        Ingester(client, tmp_path / "ingest", window_s=0.05).run(RedisSource(redis_url, "post-events", idle_exit_s=0.5))


def test_events_piped_on_stdin(triton_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    posts = _posts(4, 3000)
    stream = "".join(_create(p) for p in posts) + "".join(_event("delete", post_id=p.id) for p in posts[:2])
    args = [
        sys.executable,
        "-c",
        WORKER,
        "--events",
        "-",
        "--state",
        str(tmp_path / "state"),
        "--url",
        triton_server.grpc_url,
    ]
    subprocess.run(args, input=stream.encode(), check=True, timeout=120)
    with FeedClient(triton_server.grpc_url, "grpc", timeout_s=60) as client:
        assert _present(client, posts) == [False, False, True, True]
        # The same stream again: the committed lines are skipped, the tail is new.
        subprocess.run(
            args,
            input=(stream + _event("delete", post_id=posts[2].id) + _event("delete", post_id=posts[3].id)).encode(),
            check=True,
            timeout=120,
        )
        assert not any(_present(client, posts))
    assert json.loads((tmp_path / "state" / "stdin_lines.json").read_text())["lines"] == 8


def test_every_pending_entry_is_taken_back_and_a_dead_consumers_are_claimed(redis_url: str) -> None:
    import redis

    from feedserve.clients.ingest import RedisSource

    broker = redis.Redis.from_url(redis_url)
    added = [broker.xadd("pending", {"event": f'{{"n": {i}}}'}) for i in range(600)]  # more than one read (256)

    def until_idle(source: RedisSource) -> list[bytes]:
        got = []
        for item in source.events():
            if item is None:
                return got
            got.append(item[0])
        return got

    # Delivered to a consumer that crashed before acknowledging any of them ...
    assert until_idle(RedisSource(redis_url, "pending", consumer="a")) == added
    # ... which, restarted, is given all 600 again, in order, before waiting for new ones.
    assert until_idle(RedisSource(redis_url, "pending", consumer="a")) == added
    # A consumer that never comes back: another one takes its entries over once they sat idle.
    assert until_idle(RedisSource(redis_url, "pending", consumer="b")) == []
    assert until_idle(RedisSource(redis_url, "pending", consumer="b", claim_idle_s=0.0)) == added
    assert broker.xpending("pending", "feedserve")["consumers"] == [{"name": b"b", "pending": 600}]


def _rank_scores(client: FeedClient, member: dict[str, object], candidates: list[int]) -> dict[int, float]:
    return {r.post_id: r.score for r in client.rank(member, candidates)}


def test_engage_events_reach_the_rankers_co_engagement(triton_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """New posts are ingested; then members who liked a film the member liked like one of them:
    once the ingester's engage events are acknowledged, `rank` scores that post with their
    co-engagement within seconds (its table merged with the log) and the other as before; bad
    engage events are skipped by name, and a dislike or a view is not logged."""
    posts = _posts(70, 500)
    new, other = posts[:2]
    liked = load_movielens(SAMPLE_CORPUS).posts()[0].id
    member = {"id": 10**9, "headline": "Engineer", "history": [{"post_id": liked, "action": "like", "engaged_at": 1}]}
    events, state = tmp_path / "events.jsonl", tmp_path / "state"
    fans = range(2 * 10**9, 2 * 10**9 + 40)
    with FeedClient(triton_server.grpc_url, "grpc", timeout_s=60) as client:
        # 70 posts in one window: written in requests the models take (64 rows at most).
        events.write_text("".join(_create(p) for p in posts))
        created = Ingester(client, state, window_s=5, max_batch=200).run(JsonlSource(events, state))
        assert (created.upserts, created.batches) == (70, 1) and all(_present(client, [new, other, posts[-1]]))
        before = _rank_scores(client, member, [new.id, other.id])  # both posts indexed, nobody engaged
        with open(events, "a") as f:
            f.write(
                "".join(_event("engage", member_id=m, post_id=liked, action="like") for m in fans)
                + "".join(_event("engage", member_id=m, post_id=new.id, action="rated 5") for m in fans)
                + _event("engage", member_id=7, post_id=other.id, action="dislike")
                + _event("engage", member_id=8, post_id=other.id, action="view")
                + _event("engage", member_id=-1, post_id=other.id)
                + _event("engage", member_id=7, post_id=2**63, action="like")
                + _event("engage", member_id=7, post_id=other.id, ts="yesterday")
                + _event("engage", member_id=7, post_id=other.id, action=["like"])
                + _event("engage", member_id=7, post_id=other.id, ts=2**40)
            )
        # One window of them all: 80 engagements go in requests engage_write takes (64 rows at most).
        stats = Ingester(client, state, window_s=5, max_batch=200).run(JsonlSource(events, state))
        assert (stats.events, stats.bad, stats.engagements, stats.unserved, stats.batches) == (87, 5, 80, 0, 1)
        deadline, after = time.monotonic() + 30, before
        while after[new.id] == pytest.approx(before[new.id], abs=1e-5) and time.monotonic() < deadline:
            time.sleep(0.2)
            after = _rank_scores(client, member, [new.id, other.id])
        assert after[new.id] != pytest.approx(before[new.id], abs=1e-5)
        assert after[other.id] == pytest.approx(before[other.id], abs=1e-5)  # nobody liked it


def test_engagements_survive_a_snapshot_and_a_restart_of_the_server(
    tiny_artifacts: ArtifactLayout, tmp_path: Path
) -> None:
    """With a snapshot every two engage_write requests: a `rank` that follows reads on across it,
    and after a restart `rank` reads the snapshot and the log after it, ranking as before."""
    root = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts.root, root, ignore=shutil.ignore_patterns("index", "emb"))
    repo = tmp_path / "repository"
    write_repository(repo, RepositorySettings(snapshot_every=2))
    opts = on_free_ports(repository=repo, artifacts=root, log_file=tmp_path / "tritonserver.log", startup_timeout_s=180)
    liked = load_movielens(SAMPLE_CORPUS).posts()[0].id
    member = {"id": 10**9, "headline": "Engineer", "history": [{"post_id": liked, "action": "like", "engaged_at": 1}]}
    target, control = 7 * 10**11, 7 * 10**11 + 1  # posts nobody engaged with
    fans = range(3 * 10**9, 3 * 10**9 + 30)
    files = ArtifactLayout(root).index_dir
    server = TritonServer(opts).start()
    try:
        with FeedClient(server.grpc_url, "grpc", timeout_s=60) as client:
            before = _rank_scores(client, member, [target, control])
            for step in range(3):  # three requests: the second starts a snapshot, the third follows it
                client.engage(
                    [(m, p, 1_700_000_000 + step) for m in fans[10 * step : 10 * step + 10] for p in (liked, target)]
                )
            deadline = time.monotonic() + 30
            while not files.engagements_snapshot.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert load_snapshot(files.engagements_snapshot).lsn >= 2
            time.sleep(3)  # rank's follow thread (a poll a second) has read every acknowledged write
            after = _rank_scores(client, member, [target, control])
            assert after[target] != pytest.approx(before[target], abs=1e-5)
            assert after[control] == pytest.approx(before[control], abs=1e-5)
    finally:
        server.stop()
    with open(files.engagements, "rb") as log:
        assert read_header(log, codec=ENGAGEMENTS) >= 2  # the log restarted after the snapshot
    server = TritonServer(opts).start()
    try:
        with FeedClient(server.grpc_url, "grpc", timeout_s=60) as client:
            deadline, again = time.monotonic() + 30, before
            while again != after and time.monotonic() < deadline:
                again = _rank_scores(client, member, [target, control])
                time.sleep(0.2)
            assert again == pytest.approx(after, abs=1e-6)
    finally:
        server.stop()


def test_a_server_without_a_ranker_retrieves_and_counts_engage_events_unserved(
    tiny_artifacts: ArtifactLayout, tmp_path: Path
) -> None:
    """Artifacts without a ranker: the server loads every model but rank, feed and engage_write and
    is ready; the ingester writes a window's posts and counts its engage events as unserved rather
    than retrying them or stopping."""
    root = tmp_path / "artifacts"
    ranker = [p.name for p in tiny_artifacts.ranker_files()]
    shutil.copytree(tiny_artifacts.root, root, ignore=shutil.ignore_patterns("index", "emb", *ranker))
    ArtifactLayout(root).write_manifest()
    repo = tmp_path / "repository"
    write_repository(repo)
    opts = on_free_ports(repository=repo, artifacts=root, log_file=tmp_path / "tritonserver.log", startup_timeout_s=180)
    (post,) = _posts(1, 900)
    events, state = tmp_path / "events.jsonl", tmp_path / "state"
    engage = "".join(_event("engage", member_id=m, post_id=post.id, action="like") for m in (1, 2))
    events.write_text(_create(post) + engage)
    with TritonServer(opts) as server, FeedClient(server.grpc_url, "grpc", timeout_s=60) as client:
        assert client.ready() and client.ready(ModelName.RETRIEVE)
        assert not any(client.ready(m) for m in (ModelName.RANK, ModelName.FEED, ModelName.ENGAGE_WRITE))
        stats = Ingester(client, state, window_s=5, max_batch=200).run(JsonlSource(events, state))
        assert (stats.upserts, stats.engagements, stats.unserved) == (1, 0, 2)
        assert all(_present(client, [post]))
