"""The six-task feed ranker served: its quality and latency through a running tritonserver.

    .venv/bin/python -m feedserve.training.feed_log --out runs/feed-log
    .venv/bin/python -m feedserve.training.rank_feed --log runs/feed-log --out runs/ranker-feed
    .venv/bin/feedserve --artifacts artifacts/feed build --corpus runs/feed-log --ranker runs/ranker-feed
    .venv/bin/python -m benchmarks.rank_served --artifacts artifacts/feed --log runs/feed-log --ranker runs/ranker-feed

(`artifacts/feed`: a copy of `artifacts/default` without its index, so that the build reuses the
encoder.) The log's test sessions (after its cutoff) are ranked five ways:

- in process, each post's counts and co-engagement read as they stood at the session (how
  `feedserve.training.rank_feed` evaluates the ranker);
- in process, read as they stood at the last refresh before the session (every `--refresh-hours`);
- in process, on the tables the build made (counts and co-engagement as of the cutoff, frozen);
- through tritonserver on the built tables: `rank` with the session's member record (history,
  actions and times), the member's embedding and the session's impressions with their retrieval
  scores, one session per request;
- through tritonserver kept fresh by the nearline jobs: at every refresh what members did since
  counted by the counter (feedserve.clients.counter), which sends the counts that changed, and the
  engagements since, ingested (feedserve.clients.ingest) through `embed_post`, `index_write` and
  `engage_write`.

Each served way should equal its in-process twin (the largest probability difference is reported:
against the ranker on the vectors the server read, float noise; on the training run's cached
vectors, a little more, as the int8 encoder embeds a post slightly differently in another batch);
between them, what counts of each age cost. Per task, the AUC and GAUC, and the final
score's NDCG@10 (as `rank_feed` reports). Then latency: `rank` for one session's impressions, and
the `feed` ensemble (retrieve 500 of the log's 2,000 posts, rank them) for members as of the
cutoff, each at concurrency 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import write_report
from benchmarks.rank_tasks import task_table
from feedserve.artifacts import ArtifactLayout
from feedserve.rank.coengagement import CoEngagement
from feedserve.rank.data import PostTable, RankExample, Tensorizer
from feedserve.rank.features import PostFeatures
from feedserve.rank.model import GenerativeRanker, RankerConfig
from feedserve.rank.train import FEED_TASK_WEIGHTS
from feedserve.training.feed_log import FEED_TASKS, FeedLog, load_feed_log
from feedserve.training.rank_feed import FeedData, load_retriever, predict, task_report

logger = logging.getLogger(__name__)
REPORT = Path(__file__).parent / "reports" / "rank_served"


def record_of(x: RankExample) -> dict[str, Any]:
    """The member record a server gets for this session: what the ranker reads of it."""
    history = [{"post_id": i.post_id, "engaged_at": i.at, "action": i.action} for i in x.history]
    return {"id": x.member_id, "history": history}


def worst(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """The largest difference between two rankings' probabilities, session by session."""
    return float(max(np.abs(x - y).max() for x, y in zip(a, b, strict=True)))


def latency(samples: list[float]) -> dict[str, float]:
    ms = np.array(samples) * 1000
    return {"requests": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def rank_sessions(client: Any, sessions: Sequence[RankExample]) -> tuple[list[np.ndarray], list[float]]:
    """Each session's impressions ranked by `rank`, one request per session: [candidates, tasks]
    probabilities in the session's order, and each request's seconds."""
    scores, seconds = [], []
    for x in sessions:
        start = time.perf_counter()
        ranked = client.rank(record_of(x), x.candidates.tolist(), x.retrieval_scores, x.member[None])
        seconds.append(time.perf_counter() - start)
        by_id = {r.post_id: r.tasks for r in ranked}
        scores.append(np.array([[by_id[c][t] for t in FEED_TASKS] for c in x.candidates.tolist()]))
    return scores, seconds


def nearline(client: Any, log: FeedLog, sessions: Sequence[RankExample], every: int, state: Path) -> list[np.ndarray]:
    """The sessions ranked as a server kept fresh by the nearline jobs would rank them: the log's
    posts first sent as `create` events with their counts at the cutoff; then every `every` seconds
    of the test period what members did since (a view per impression, and each like, comment and
    share) counted by the counter (feedserve.clients.counter, its store seeded with the cutoff's
    counts), which sends the changed counts as `counts` events, and the engagements since sent as
    `engage` events, all ingested through `embed_post`, `index_write` and `engage_write`
    (feedserve.clients.ingest); each session is ranked after the refresh before it."""
    from feedserve.clients.counter import Counter, CountStore, JsonlSink
    from feedserve.clients.ingest import Ingester, JsonlSource

    state.mkdir(parents=True)
    events, actions = state / "events.jsonl", state / "actions.jsonl"
    events.touch()
    actions.touch()
    source, ingester = JsonlSource(events, state), Ingester(client, state, window_s=0.05, max_batch=64)
    cutoff = log.cutoff()
    counts = log.counts_before(cutoff)
    store = CountStore(state / "counter" / "counts.sqlite")
    store.seed(counts)
    counter = Counter(store, JsonlSink(events), flush_s=float("inf"), max_batch=4096)

    def ingest(lines: list[dict[str, Any]]) -> None:
        with open(events, "a") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        ingester.run(source)
        # rank merges logged engagements on a thread (every engagement_poll_s, 1 s by default).
        time.sleep(2.5)

    ingest(
        [
            {"type": "create", "post": p.model_copy(update={"counts": counts.get(p.id, {})}).model_dump(mode="json")}
            for p in log.posts
        ]
    )
    strongest = {(i.member, i.post, i.at): i.action for i in log.impressions}
    scores: list[np.ndarray] = []
    refreshed = cutoff
    for x in sessions:
        assert x.at is not None
        if x.at >= refreshed + every:
            now = refreshed + every * ((x.at - refreshed) // every)
            since = [i for i in log.impressions if refreshed <= i.at < now]
            with open(actions, "a") as f:
                f.writelines(
                    json.dumps({"type": "engage", "member_id": i.member, "post_id": i.post, "action": a, "ts": i.at})
                    + "\n"
                    for i in since
                    for a in ("view", *sorted(i.actions))
                )
            sent = counter.stats.sent
            counter.run(JsonlSource(actions, state / "counter"))  # appends the counts events to `events`
            engaged = [
                {"type": "engage", "member_id": m, "post_id": p, "action": strongest[(m, p, t)], "ts": t}
                for m, p, t in log.engagements(now)
                if t >= refreshed
            ]
            ingest(engaged)
            logger.info("refreshed at %d: %d counts, %d engagements", now, counter.stats.sent - sent, len(engaged))
            refreshed = now
        scores.extend(rank_sessions(client, [x])[0])
    return scores


def served(layout: ArtifactLayout, data: FeedData, log: FeedLog, feeds: int, every: int, tmp: Path) -> dict[str, Any]:
    """The test sessions ranked by `rank` on a tritonserver serving `layout` (the build's tables,
    then kept fresh by the nearline ingester), and the `feed` latency."""
    from feedserve.clients.batch import index_corpus, load_embeddings
    from feedserve.clients.online import FeedClient
    from feedserve.ops.keys import write_key
    from feedserve.ops.launcher import TritonServer, on_free_ports
    from feedserve.triton.repository import RepositorySettings, task_weights_arg, write_repository

    repo = tmp / "repository"
    write_repository(repo, RepositorySettings(task_weights=tuple(task_weights_arg("feed").items())))
    # An earlier run's live index: its writes and logged engagements would be read as this run's.
    logger.warning("replacing %s with the log's posts", layout.index_dir.root)
    shutil.rmtree(layout.index_dir.root, ignore_errors=True)
    with TritonServer(on_free_ports(repository=repo, artifacts=layout.root, log_file=tmp / "server.log")) as server:
        start = time.perf_counter()
        index_corpus(
            log.posts, [p.id for p in log.posts], layout.index, tmp / "indexed", url=server.grpc_url, progress=False
        )
        indexed_s = time.perf_counter() - start
        with FeedClient(server.grpc_url, "grpc", timeout_s=120, write_key=write_key(layout.root)) as client:
            frozen, rank_s = rank_sessions(client, data.test)
            members = [m for m in log.members_at(log.cutoff()) if m.history][:feeds]
            feed_s = []
            for member in members:
                start = time.perf_counter()
                client.feed(member, n=10, candidates=500)
                feed_s.append(time.perf_counter() - start)
            fresh = nearline(client, log, data.test, every, tmp / "ingest")
    return {
        "indexed": load_embeddings(tmp / "indexed"),  # the vectors `rank` read on the built tables
        "frozen": frozen,
        "nearline": fresh,
        "indexed_posts": len(log.posts),
        "index_s": indexed_s,
        "rank": latency(rank_s),
        "feed": latency(feed_s),
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# The feed ranker served through tritonserver",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']}",
        "",
        f"Data: the log in `{report['log']}` ({report['test_sessions']:,} test sessions, "
        f"{report['test_impressions']:,} impressions, after the cutoff); ranker `{report['ranker']}`; "
        f"final score weights {report['weights']}.",
        "",
        "AUC over every test impression (GAUC in brackets); NDCG@10 of the final score against the value of what "
        "the member did.",
        "",
        *task_table("ranked", report["rows"]),
        "",
        f"The nearline refresh: every {report['refresh_hours']:g} h, what members did since (a view per impression, "
        "each like, comment and share) counted by the counter (`feedserve.clients.counter`) into `counts` events for "
        "the posts that changed, and the engagements since as `engage` events, through the ingester.",
    ]
    rank, feed = report["latency"]["rank"], report["latency"]["feed"]
    lines += [
        "",
        "Served against in process on the same counts and co-engagement, the largest probability difference: "
        + ", ".join(f"{k} {v:.2e}" for k, v in report["served_vs_in_process_max_abs"].items())
        + ".",
        "",
        "| request | requests | p50 ms | p99 ms |",
        "|---|---|---|---|",
        f"| `rank`, one session's {report['candidates_per_session']} impressions | {rank['requests']} | "
        f"{rank['p50_ms']:.1f} | {rank['p99_ms']:.1f} |",
        f"| `feed`, 500 retrieved of {report['indexed_posts']:,} posts, top 10 | {feed['requests']} | "
        f"{feed['p50_ms']:.1f} | {feed['p99_ms']:.1f} |",
        "",
        f"Indexing the log's {report['indexed_posts']:,} posts through the server took {report['index_s']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from feedserve.clients.perf import machine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=Path("artifacts/feed"), help="built with the feed ranker")
    p.add_argument("--log", type=Path, default=Path("runs/feed-log"))
    p.add_argument("--ranker", type=Path, default=Path("runs/ranker-feed"), help="the package the build exported")
    p.add_argument("--cache", type=Path, help="the training run's embeddings (default: RANKER/cache)")
    p.add_argument("--feeds", type=int, default=100, help="feed requests timed")
    p.add_argument("--refresh-hours", type=float, default=24.0, help="how often the nearline ingest sends counts")
    p.add_argument("--out", type=Path, default=REPORT)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    layout = ArtifactLayout(args.artifacts.resolve())
    # Checked before anything is read or replaced (the run rebuilds the artifacts' index).
    if not layout.has_ranker() or RankerConfig.load(layout.ranker_config).tasks != FEED_TASKS:
        raise SystemExit(f"{layout.root} has no feed ranker: build it with --corpus {args.log} --ranker {args.ranker}")
    log = load_feed_log(args.log)
    data = FeedData.build(log, load_retriever(layout.root, log, args.cache or args.ranker / "cache"))
    model = GenerativeRanker.load(args.ranker)
    tensorize = data.tensorizer(model.config)
    every = int(args.refresh_hours * 3600)
    refreshed = [replace(x, tables_at=data.cutoff + every * (((x.at or 0) - data.cutoff) // every)) for x in data.test]
    # The build's tables, as a server reads them: no moment.
    built = Tensorizer(
        model.config,
        tensorize.content,
        PostFeatures.load(layout.post_features),
        CoEngagement.load(layout.coengagement),
    )
    rows: list[dict[str, Any]] = []
    scores: dict[str, list[np.ndarray]] = {}

    def add(name: str, probabilities: list[np.ndarray]) -> None:
        scores[name] = probabilities
        rows.append({"name": name, "tasks": task_report(data.test, probabilities, FEED_TASKS)})
        logger.info("%s: NDCG@10 %.4f", name, rows[-1]["tasks"]["final"]["ndcg@10"])

    hours = f"{args.refresh_hours:g} h"
    add("in process, counts and co-engagement as of each session", predict(model, tensorize, data.test))
    add(f"in process, as of the last refresh (every {hours})", predict(model, tensorize, refreshed))
    as_served = [replace(x, at=None) for x in data.test]  # no moment: the tables as built
    add("in process, the built tables (as of the cutoff)", predict(model, built, as_served))
    with tempfile.TemporaryDirectory() as tmp:
        through = served(layout, data, log, args.feeds, every, Path(tmp))
    add("through tritonserver, the built tables", through["frozen"])
    # Its exact twin: the built tables and the vectors the server read. The cache's vectors differ a
    # little (the int8 encoder's dynamic quantization scales by the batch a post is embedded in).
    indexed = Tensorizer(model.config, PostTable(*through["indexed"]), built.features, built.coengagement)
    twin = predict(model, indexed, as_served)
    same_vectors = worst(twin, through["frozen"])
    add(f"through tritonserver, nearline refresh every {hours}", through["nearline"])

    report = {
        "command": "python -m benchmarks.rank_served " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "log": str(args.log),
        "ranker": str(args.ranker),
        "weights": FEED_TASK_WEIGHTS,
        "refresh_hours": args.refresh_hours,
        "test_sessions": len(data.test),
        "test_impressions": int(sum(len(x.candidates) for x in data.test)),
        "candidates_per_session": int(np.median([len(x.candidates) for x in data.test])),
        "rows": rows,
        "served_vs_in_process_max_abs": {
            "built tables, the index's vectors": same_vectors,
            "built tables, the training run's vectors": worst(scores[rows[2]["name"]], scores[rows[3]["name"]]),
            "nearline, the training run's vectors": worst(scores[rows[1]["name"]], scores[rows[4]["name"]]),
        },
        "indexed_posts": through["indexed_posts"],
        "index_s": through["index_s"],
        "latency": {"rank": through["rank"], "feed": through["feed"]},
    }
    write_report(args.out, "rank_served", report, markdown(report), "README.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
