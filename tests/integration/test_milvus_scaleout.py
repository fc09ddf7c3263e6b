"""Scale-out on one machine: two tritonservers rendered with `--index milvus` share one Milvus (the
real engine, Milvus Lite on loopback) and hold no index state of their own. A rebuild through one
is served by both; a write acknowledged through one (index_write, or the nearline ingester) is
retrievable through the other at its next search, an engagement ranked with by the other's `rank`
within seconds; both answer retrievals and feeds identically;
and when one is killed, a client that retries on the other loses no request."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("milvus_lite")

from feedserve.artifacts import ArtifactLayout
from feedserve.clients.batch import index_corpus
from feedserve.clients.ingest import Ingester, JsonlSource
from feedserve.clients.online import FeedClient
from feedserve.errors import ClientError
from feedserve.index.milvus import MilvusLite, MilvusStore
from feedserve.ops.builder import SAMPLE_CORPUS
from feedserve.ops.launcher import ServerOptions, TritonServer, free_port
from feedserve.prompt.movielens import MovieLens, load_movielens
from feedserve.prompt.records import Member, Post
from feedserve.schema import ModelName
from feedserve.triton.repository import RepositorySettings, write_repository

pytestmark = pytest.mark.integration

N_POSTS = 80


@pytest.fixture(scope="module")
def movielens() -> MovieLens:
    return load_movielens(SAMPLE_CORPUS)


@pytest.fixture(scope="module")
def cluster(
    tiny_artifacts: ArtifactLayout, tmp_path_factory: pytest.TempPathFactory, movielens: MovieLens
) -> Iterator[tuple[MilvusLite, list[TritonServer]]]:
    tmp = tmp_path_factory.mktemp("scaleout")
    root = tmp / "artifacts"
    # No local index: the servers must serve from Milvus alone.
    shutil.copytree(tiny_artifacts.root, root, ignore=shutil.ignore_patterns("index", "emb"))
    write_repository(tmp / "repo", RepositorySettings(index="milvus"))
    ports: set[int] = set()
    while len(ports) < 6:
        ports.add(free_port())
    p = sorted(ports)
    with MilvusLite(tmp / "milvus" / "posts.db") as lite:
        servers = [
            TritonServer(
                ServerOptions(
                    repository=tmp / "repo",
                    artifacts=root,
                    http_port=p[3 * i],
                    grpc_port=p[3 * i + 1],
                    metrics_port=p[3 * i + 2],
                    log_file=tmp / f"server{i}.log",
                    startup_timeout_s=180,
                    supervise=False,  # a killed server stays dead
                    milvus_uri=lite.uri,
                )
            )
            for i in range(2)
        ]
        try:
            for server in servers:
                server.start()
            posts = sorted(movielens.posts(), key=lambda q: -q.counts.get("ratings", 0))[:N_POSTS]
            store = MilvusStore(lite.uri, ArtifactLayout(root).serving_dim())
            index_corpus(posts, [q.id for q in posts], store, url=servers[0].grpc_url, progress=False)
            yield lite, servers
        finally:
            for server in servers:
                server.stop()


def _members(movielens: MovieLens) -> list[Member]:
    return [m for m in movielens.members() if 3 <= len(m.history) <= 40][:4]


def test_both_servers_answer_alike_and_see_each_others_writes(
    cluster: tuple[MilvusLite, list[TritonServer]], movielens: MovieLens, tmp_path: Path
) -> None:
    lite, (a, b) = cluster
    members = _members(movielens)
    with FeedClient(a.grpc_url, "grpc") as one, FeedClient(b.grpc_url, "grpc") as other:
        for member in members:
            got, want = one.retrieve(member, 10), other.retrieve(member, 10)
            assert len(got) == 10 and [h.post_id for h in got] == [h.post_id for h in want]
            np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)
            fed, fed_too = one.feed(member, 5, candidates=40), other.feed(member, 5, candidates=40)
            assert [r.post_id for r in fed] == [r.post_id for r in fed_too]

        # A write through one server is searched by the other at once.
        dim = ArtifactLayout(a.options.artifacts).serving_dim()
        vector = np.full((1, dim), 1 / np.sqrt(dim), np.float32)
        one.infer(
            ModelName.INDEX_WRITE,
            {"OP": np.ones((1, 1), np.int64), "POST_ID": np.array([[990_001]], np.int64), "EMBEDDING": vector},
            ("LSN",),
        )
        found = other.infer(ModelName.KNN, {"QUERY": vector, "K": np.array([[1]], np.int64)}, ("IDS",))["IDS"]
        assert found.tolist() == [[990_001]]
        other.infer(
            ModelName.INDEX_WRITE,
            {"OP": np.full((1, 1), 2, np.int64), "POST_ID": np.array([[990_001]], np.int64)},
            ("LSN",),
        )
        found = one.infer(ModelName.KNN, {"QUERY": vector, "K": np.array([[5]], np.int64)}, ("IDS",))["IDS"]
        assert 990_001 not in found.ravel().tolist()

        # The nearline ingester writes through one server; the post is retrievable through the other.
        post = Post(id=990_002, text="A brand new documentary about deep sea octopus", tags=["documentary"])
        events = tmp_path / "events.jsonl"
        events.write_text(json.dumps({"type": "create", "post": post.model_dump(mode="json")}) + "\n")
        Ingester(one, tmp_path / "ingest").run(JsonlSource(events, tmp_path / "ingest"))
        embedded = other.embed_posts([post])
        found = other.infer(ModelName.KNN, {"QUERY": embedded, "K": np.array([[1]], np.int64)}, ("IDS",))["IDS"]
        assert found.tolist() == [[990_002]]
        # Its features went into Milvus with it (what `rank` reads over the build's table), and a
        # counts event updates them.
        store = MilvusStore(lite.uri, dim)
        assert store.lookup_rows(np.array([990_002]))[2][990_002] == {
            "percentiles": (0.0, 0.0),
            "tags": ("documentary",),
        }
        counts = {"type": "counts", "post_id": 990_002, "counts": {"ratings": 10_000, "mean_rating": 5.0}}
        # Engagements go into Milvus through one server, and the other's `rank` reads them: members
        # who liked a film the ranked member liked now like the new post, and its score moves there.
        liked = members[0].history[-1].post_id
        member = {"id": 10**9, "headline": "x", "history": [{"post_id": liked, "action": "like", "engaged_at": 1}]}
        before = {r.post_id: r.score for r in other.rank(member, [990_002, 990_003])}
        fans = range(4 * 10**9, 4 * 10**9 + 30)
        engage = [
            {"type": "engage", "member_id": m, "post_id": p, "action": "like"} for m in fans for p in (liked, 990_002)
        ]
        events.write_text(events.read_text() + "".join(json.dumps(e) + "\n" for e in [counts, *engage]))
        stats = Ingester(one, tmp_path / "ingest").run(JsonlSource(events, tmp_path / "ingest"))
        assert (stats.events, stats.bad, stats.engagements, stats.unserved) == (61, 0, 60, 0)
        percentiles = store.lookup_rows(np.array([990_002]))[2][990_002]["percentiles"]
        assert percentiles == (1.0, 1.0)  # the top buckets of both counts
        deadline, after = time.monotonic() + 30, before
        while after[990_002] == pytest.approx(before[990_002], abs=1e-5) and time.monotonic() < deadline:
            time.sleep(0.2)
            after = {r.post_id: r.score for r in other.rank(member, [990_002, 990_003])}
        assert after[990_002] != pytest.approx(before[990_002], abs=1e-5)
        assert after[990_003] == pytest.approx(before[990_003], abs=1e-5)  # nobody liked it


def test_a_client_that_retries_on_the_other_server_loses_nothing_when_one_dies(
    cluster: tuple[MilvusLite, list[TritonServer]], movielens: MovieLens
) -> None:
    _, (a, b) = cluster
    members = _members(movielens)
    answered = 0
    with FeedClient(a.grpc_url, "grpc", timeout_s=30) as one, FeedClient(b.grpc_url, "grpc", timeout_s=30) as other:
        for i in range(40):  # bounded: stops by itself
            if i == 10:
                assert a.process is not None
                a.process.kill()  # mid-run, without warning
                a.process.wait(timeout=30)
            member = members[i % len(members)]
            try:
                hits = one.retrieve(member, 10)
            except ClientError:
                hits = other.retrieve(member, 10)  # the retry on the other replica
            assert len(hits) == 10
            answered += 1
    assert answered == 40
