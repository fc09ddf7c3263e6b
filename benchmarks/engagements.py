"""Streamed engagements (feedserve.rank.engagements): what logging them costs, what merging them into
the co-engagement table costs as it grows, and how soon `rank` reads an acknowledged engagement.

    .venv/bin/python -m benchmarks.engagements [--sizes 1000000 10000000] [--starts 1000000] [--trials 20]

1. The log: `EngagementWriter.write` of 64-row batches (each fsynced before it returns), per batch.
2. The merge a `rank` instance runs on its follow thread: the table it serves with L engagements
   logged since (after the table's last time), `CoEngagement.with_events` (the new entries deduped
   and inserted into the table's arrays and each member's time order), against building the same
   table anew from all of them (`from_arrays`: sorts), for the sample corpus's table (the training
   period's 43,722 likes) and for synthetic tables of N entries (members and Zipf-distributed posts,
   times spread over a year), L = 1,000 and N / 10. Median of `--runs`.
   With each, what one request reads of the merged table (2,000 candidates' co-occurrence with and
   transitions from 20 history posts, the 200 most engaged-with posts' or any).
3. A start (`--starts`: engagements logged before it, in 64-row records): the writer's open (it
   scans its log) and a `rank` follower's first update (it reads them all, then merges them into the
   sample corpus's table), from the log alone, then after `EngagementWriter.snapshot` folded it into
   `engagements.npz` (the snapshot's duration and the files' sizes too).
4. Through Triton (the default artifacts served from a scratch directory on loopback, as
   benchmarks/freshness.py does, rank's default `engagement_poll_s` of 1 s): a trial logs 30
   members' likes of a film the ranked member liked and of a post nobody engaged with before (one
   `engage_write` request), then asks `rank` every 20 ms until that post's score moves; the lag is
   from the acknowledgement to the first answer that reads it. Then the same with the server
   rendered with `--index milvus` (Milvus Lite on loopback): the log a Milvus collection, followed
   by queries.

Needs `artifacts/default` with the ranker (`feedserve build`).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import write_report
from benchmarks.freshness import scratch_artifacts
from feedserve.artifacts import ArtifactLayout, default_artifacts_dir
from feedserve.clients.online import FeedClient
from feedserve.clients.perf import machine
from feedserve.index.layout import IndexLayout
from feedserve.ops.launcher import TritonServer, on_free_ports
from feedserve.rank.coengagement import CoEngagement
from feedserve.rank.engagements import EngagementWriter, LiveCoEngagement
from feedserve.schema import MAX_BATCH
from feedserve.triton.repository import RepositorySettings, write_repository

logger = logging.getLogger("benchmarks.engagements")

BATCH = MAX_BATCH  # rows per engage_write request (what the rendered model takes)


def _synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n engagements: n / 20 members, posts drawn from a Zipf law over n / 5 posts, times over a year."""
    rng = np.random.default_rng(seed)
    members = rng.integers(0, max(n // 20, 1), n)
    posts = (rng.zipf(1.3, n) - 1) % max(n // 5, 1)
    times = rng.integers(1_600_000_000, 1_600_000_000 + 365 * 86400, n)
    return members, posts, times


def _table_mb(table: CoEngagement) -> float:
    """Every array the table holds (whatever its layout: this measured the one before it too)."""
    held = [v for v in vars(table).values() if isinstance(v, np.ndarray)]
    held += [a for v in vars(table).values() if isinstance(v, tuple) for a in v if isinstance(a, np.ndarray)]
    return sum(a.nbytes for a in held) / 1e6


def _request_ms(table: CoEngagement, draws: int = 5, runs: int = 10) -> dict[str, float]:
    """What a request reads of the table: 2,000 candidates' co-occurrence with and transitions from
    20 history posts, drawn from the 200 most engaged-with posts ("popular": the costliest) or from
    all of them ("any"); the mean over `draws` draws of the median of `runs` reads, ms."""
    rng = np.random.default_rng(0)
    by_count = table.posts[np.argsort(-np.diff(table.indptr), kind="stable")]
    out = {}
    for name, pool in (("popular", by_count[:200]), ("any", table.posts)):
        medians = []
        for _ in range(draws):
            candidates = rng.choice(table.posts, min(2000, len(table.posts)), replace=False).tolist()
            history = rng.choice(pool, 20, replace=False).tolist()
            took = []
            for _ in range(runs):
                t = time.perf_counter()
                scorer = table.against(10**12, candidates)
                scorer.cooccurrence(history)
                scorer.transitions(history, 0.8)
                took.append(time.perf_counter() - t)
            medians.append(statistics.median(took))
        out[name] = 1000 * statistics.mean(medians)
    return out


def log_writes(batches: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        writer = EngagementWriter.open(Path(tmp))
        members, posts, times = _synthetic(batches * BATCH, seed=1)
        took = []
        for start in range(0, len(members), BATCH):
            t = time.perf_counter()
            writer.write(members[start : start + BATCH], posts[start : start + BATCH], times[start : start + BATCH])
            took.append(time.perf_counter() - t)
        writer.close()
    ms = np.array(took) * 1000
    return {
        "batches": batches,
        "rows": BATCH,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "engagements_per_s": BATCH / float(np.mean(took)),
    }


def merges(base: CoEngagement, name: str, runs: int) -> list[dict[str, Any]]:
    """The follow thread's merge of L engagements logged since the table was built (after its last
    time, as streamed ones are; members and posts drawn as `_synthetic`'s, most of them held), and
    the same table built anew from all of them, as merges were before they inserted."""
    out = []
    for logged in (1000, max(len(base) // 10, 1)):
        members, posts, times = _synthetic(logged, seed=2)
        times = times - times.min() + int(base.times.max()) + 1
        took, anew = [], []
        for _ in range(runs):
            t = time.perf_counter()
            merged = base.with_events(members, posts, times)
            took.append(time.perf_counter() - t)
        for _ in range(runs):
            t = time.perf_counter()
            rebuilt = CoEngagement.from_arrays(
                *(np.concatenate([a, b]) for a, b in zip(base.events(), (members, posts, times), strict=True))
            )
            anew.append(time.perf_counter() - t)
        assert np.array_equal(rebuilt.members, merged.members) and np.array_equal(rebuilt.times, merged.times)
        out.append(
            {
                "table": name,
                "entries": len(base),
                "logged": logged,
                "merged_entries": len(merged),
                "merge_s": statistics.median(took),
                "built_anew_s": statistics.median(anew),
                "table_mb": _table_mb(merged),
                **{f"request_ms_{k}": v for k, v in _request_ms(merged).items()},
            }
        )
        logger.info("%s + %d logged: %.3f s (built anew %.3f s)", name, logged, out[-1]["merge_s"], min(anew))
    return out


def starts(base: CoEngagement, logged: int) -> dict[str, Any]:
    """What a `rank` that starts reads: `logged` engagements written in 64-row records, the writer's
    open (it scans the log) and a follower's first update (read, then merge into `base`), from the
    log alone and then after a snapshot folded it (its duration and sizes too)."""
    members, posts, times = _synthetic(logged, seed=3)
    times = times - times.min() + int(base.times.max()) + 1
    with tempfile.TemporaryDirectory() as tmp:
        files = IndexLayout(Path(tmp))
        writer = EngagementWriter.open(files.root)
        for start in range(0, logged, BATCH):
            writer.write(*(c[start : start + BATCH] for c in (members, posts, times)))
        writer.close()
        out: dict[str, Any] = {"logged": logged, "log_mb": files.engagements.stat().st_size / 1e6}

        def opened() -> tuple[float, float]:
            t = time.perf_counter()
            writer = EngagementWriter.open(files.root)
            open_s = time.perf_counter() - t
            live = LiveCoEngagement(base, files.engagements)
            t = time.perf_counter()
            live.update()
            update_s = time.perf_counter() - t
            live.close()
            writer.close()
            return open_s, update_s

        out["from_log"] = opened()
        writer = EngagementWriter.open(files.root)
        t = time.perf_counter()
        writer.snapshot()
        out["snapshot_s"] = time.perf_counter() - t
        writer.close()
        out["snapshot_mb"] = files.engagements_snapshot.stat().st_size / 1e6
        out["log_after_mb"] = files.engagements.stat().st_size / 1e6
        out["from_snapshot"] = opened()
    logger.info("start with %d logged: %s", logged, out)
    return out


def _rank_score(client: FeedClient, member: dict[str, Any], query: np.ndarray, post: int, other: int) -> float:
    return next(r.score for r in client.rank(member, [post, other], query=query) if r.post_id == post)


def lag_through_triton(artifacts: Path, trials: int, milvus: bool = False) -> dict[str, Any]:
    """With `milvus`, the server rendered with `--index milvus` on Milvus Lite: the log is the Milvus
    collection, and `rank` follows it by queries."""
    layout = ArtifactLayout(artifacts)
    liked = int(CoEngagement.load(layout.coengagement).posts[0])
    member = {"id": 10**9, "headline": "Engineer", "history": [{"post_id": liked, "action": "like", "engaged_at": 1}]}
    lags, requests = [], []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = scratch_artifacts(layout, Path(tmp) / "artifacts")
        repository = Path(tmp) / "repository"
        write_repository(repository, RepositorySettings(index="milvus" if milvus else "local"))
        opts = on_free_ports(
            repository=repository,
            artifacts=scratch.root,
            log_file=Path(tmp) / "tritonserver.log",
            milvus_uri=str(Path(tmp) / "milvus" / "posts.db") if milvus else None,
        )
        with (
            TritonServer(opts) as server,
            FeedClient(server.grpc_url, "grpc", timeout_s=60, write_key=server.write_key) as client,
        ):
            query = client.embed_members([member])
            for trial in range(trials):
                post = 10**12 + trial  # nobody engaged with it before this trial
                before = _rank_score(client, member, query, post, liked + 1)
                fans = range(3 * 10**9 + 100 * trial, 3 * 10**9 + 100 * trial + 30)
                client.engage([(m, liked, 1_700_000_000) for m in fans] + [(m, post, 1_700_000_001) for m in fans])
                acknowledged, asked = time.perf_counter(), 0
                deadline = acknowledged + 30
                while time.perf_counter() < deadline:
                    asked += 1
                    if abs(_rank_score(client, member, query, post, liked + 1) - before) > 1e-6:
                        lags.append(time.perf_counter() - acknowledged)
                        break
                    time.sleep(0.02)
                requests.append(asked)
                time.sleep(0.3 * (trial % 4))  # spread the acknowledgements over the follow thread's period
    seen = np.array(lags)
    return {
        "trials": trials,
        "read": len(lags),
        "lag_p50_s": float(np.percentile(seen, 50)) if len(seen) else None,
        "lag_p99_s": float(np.percentile(seen, 99)) if len(seen) else None,
        "lag_max_s": float(seen.max()) if len(seen) else None,
        "rank_requests_per_trial": float(np.mean(requests)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=default_artifacts_dir())
    p.add_argument("--sizes", type=int, nargs="*", default=[1_000_000, 10_000_000], help="synthetic table entries")
    p.add_argument("--runs", type=int, default=3, help="merges timed per size (median)")
    p.add_argument("--batches", type=int, default=500, help="64-row log writes timed")
    p.add_argument("--trials", type=int, default=20, help="engagements followed through Triton")
    p.add_argument("--milvus-trials", type=int, default=20, help="the same with --index milvus (Milvus Lite)")
    p.add_argument("--starts", type=int, nargs="*", default=[1_000_000], help="engagements logged before a start")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "reports")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    report: dict[str, Any] = {
        "command": "python -m benchmarks.engagements " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "log_writes": log_writes(args.batches),
    }
    sample = CoEngagement.load(ArtifactLayout(args.artifacts).coengagement)
    rows = merges(sample, "sample corpus (coengagement.npz)", args.runs)
    for n in args.sizes:
        rows += merges(CoEngagement.from_arrays(*_synthetic(n)), f"synthetic {n:,}", args.runs)
    report["merges"] = rows
    report["starts"] = [starts(sample, n) for n in args.starts]
    if args.trials:
        report["through_triton"] = lag_through_triton(args.artifacts, args.trials)
    if args.milvus_trials:
        report["through_triton_milvus"] = lag_through_triton(args.artifacts, args.milvus_trials, milvus=True)
    write_report(args.out, "engagements", report, markdown(report))
    return 0


def markdown(r: dict[str, Any]) -> str:
    w = r["log_writes"]
    lines = [
        "# Streamed engagements (2-core CPU)",
        "",
        f"Command: `{r['command']}`.",
        "",
        f"Machine: {r['machine']}",
        "",
        f"Log writes ({w['batches']} batches of {w['rows']}, each fsynced): p50 {w['p50_ms']:.2f} ms, "
        f"p99 {w['p99_ms']:.2f} ms per batch, {w['engagements_per_s']:,.0f} engagements/s from one writer.",
        "",
        "The merge `rank`'s follow thread runs when the log has grown (the table it serves + what was logged since;"
        " *built anew*: the same table sorted from all of them, as merges were made before they inserted):",
        "",
        "| table | entries | logged | merged entries | merge s | built anew s | table MB | a request's read, popular / any history, ms |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {m['table']} | {m['entries']:,} | {m['logged']:,} | {m['merged_entries']:,} | {m['merge_s']:.3f} "
            f"| {m['built_anew_s']:.3f} | {m['table_mb']:.0f} | {m['request_ms_popular']:.2f} / {m['request_ms_any']:.2f} |"
            for m in r["merges"]
        ),
        "",
    ]
    if r.get("starts"):
        lines += [
            "A start (`engage_write`'s writer opening: it scans its log; a `rank` follower's first update: it reads,"
            " then merges into the sample corpus's table), with the engagements logged in 64-row records, from the"
            " log alone and after a snapshot folded it into `engagements.npz`:",
            "",
            "| logged | log MB | writer open s | follower's first update s | snapshot s | snapshot MB | log after MB"
            " | writer open s | follower's first update s |",
            "|---|---|---|---|---|---|---|---|---|",
            *(
                f"| {x['logged']:,} | {x['log_mb']:.1f} | {x['from_log'][0]:.2f} | {x['from_log'][1]:.2f} "
                f"| {x['snapshot_s']:.2f} | {x['snapshot_mb']:.1f} | {x['log_after_mb']:.3f} "
                f"| {x['from_snapshot'][0]:.3f} | {x['from_snapshot'][1]:.2f} |"
                for x in r["starts"]
            ),
            "",
        ]
    lags = [(name, r.get(key)) for name, key in (("local log", "through_triton"), ("Milvus", "through_triton_milvus"))]
    if any(t for _, t in lags):
        lines += [
            "Through Triton (engage_write acknowledged -> the first `rank` answer that reads it; follow period 1 s;"
            " *Milvus*: the server rendered with `--index milvus` on Milvus Lite, the log a Milvus collection):",
            "",
            "| log | trials | read | lag p50 s | lag p99 s | lag max s | rank requests per trial |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {name} | {t['trials']} | {t['read']} | {t['lag_p50_s']:.2f} | {t['lag_p99_s']:.2f} "
                f"| {t['lag_max_s']:.2f} | {t['rank_requests_per_trial']:.1f} |"
                for name, t in lags
                if t
            ),
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
