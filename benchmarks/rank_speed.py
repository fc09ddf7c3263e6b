"""Speed of the ranking stage: the GR ranker in-process, and `rank` and `feed` through Triton.

    .venv/bin/python -m benchmarks.rank_speed [--runs 30] [--out benchmarks/reports/rank_speed]

1. In-process, ONNX Runtime on this CPU, the shipped ranker's width and depth: one member's
   history of H items against C candidates, three ways. `split`: the served graph (the shared
   context computed once; each candidate attends to the history and itself). `dense`: the same
   attention as one masked product over every token pair (the ablation). `per-candidate`: every
   candidate scored with its own copy of the history (what ranking without shared context costs):
   measured on a sample of candidates and scaled to C, since each candidate's cost is its own.
   H=1000 needs a ranker with 1000 history positions: the same size with max_history=1000, random
   weights (speed does not depend on them).
2. Through Triton (the embedded default server, a follower of artifacts/default's index):
   perf_analyzer on `rank` with 2,000 candidates per member (retrieval's real ones) and on `feed`
   with 500 and 2,000 candidates, at concurrency 1 and 8. With `--live-features`, every indexed
   post is first written again with its record's ranking features (the rows `feedserve build` puts
   in its table, so the scores do not change): `rank` then reads each post's features from the
   index, as it does for posts ingested since the build; they are taken out again at the end.

Needs the default artifacts with the ranker (`feedserve build`) and an index (the demo builds one).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import write_report
from feedserve.artifacts import ArtifactLayout, default_artifacts_dir
from feedserve.clients.perf import machine, perf_analyzer_binary, run_perf_analyzer
from feedserve.export.rank import export_ranker, sample_inputs
from feedserve.index.wal import Op
from feedserve.rank.model import GenerativeRanker, RankerConfig

logger = logging.getLogger("benchmarks.rank_speed")

SHAPES = ((200, 500), (200, 2000), (1000, 2000))  # (history items, candidates)


def _session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _times(fn: Any, runs: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def _stats(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "runs": len(ms)}


def graphs(config: RankerConfig, tmp: Path) -> dict[str, Path]:
    """A ranker of this configuration (random weights) exported twice: split attention (as served)
    and dense masked attention."""
    torch.manual_seed(0)
    model = GenerativeRanker(config)
    out = {}
    for name in ("split", "dense"):
        model.attention = name
        out[name] = tmp / f"ranker-{config.max_history}-{name}.onnx"
        export_ranker(model, out[name])
    return out


def in_process(layout: ArtifactLayout, runs: int, sample: int, tmp: Path) -> list[dict[str, Any]]:
    shipped = RankerConfig.load(layout.ranker_config)
    rows, exported = [], {}
    for history, candidates in SHAPES:
        config = shipped if history <= shipped.max_history else replace(shipped, max_history=history)
        if config.max_history not in exported:
            exported[config.max_history] = graphs(config, tmp)
        paths = exported[config.max_history]
        # The served graph where it reads this history (its weights: what is served); else one of
        # the same size.
        split = _session(layout.ranker_onnx if config is shipped else paths["split"])
        dense = _session(paths["dense"])
        inputs = sample_inputs(config, 1, history, candidates, (history,))
        row: dict[str, Any] = {"history": history, "candidates": candidates}
        row["split"] = _stats(_times(lambda: split.run(None, inputs), runs))
        row["dense"] = _stats(_times(lambda: dense.run(None, inputs), max(3, runs // 5)))
        # Per candidate: `sample` members that are the same history each with one candidate, in
        # batches of 8 (what a server without shared context would run), scaled to C candidates.
        batch = 8
        alone = sample_inputs(config, batch, history, 1, (history,) * batch)
        per_batch = _stats(_times(lambda: split.run(None, alone), max(3, sample // batch)))
        scale = candidates / batch
        row["per_candidate"] = {
            "p50_ms": per_batch["p50_ms"] * scale,
            "p99_ms": per_batch["p99_ms"] * scale,
            "measured": f"{per_batch['runs']} runs of {batch} candidates, x{scale:g}",
        }
        row["shared_vs_per_candidate"] = row["per_candidate"]["p50_ms"] / row["split"]["p50_ms"]
        row["split_vs_dense"] = row["dense"]["p50_ms"] / row["split"]["p50_ms"]
        row["weights"] = "served graph" if config is shipped else f"same size, max_history {history}, random weights"
        logger.info("%s", row)
        rows.append(row)
    return rows


def _rank_inputs(client: Any, members: list[Any], candidates: int) -> dict[str, Any]:
    """perf_analyzer input data for `rank`: each member's record, embedding and retrieved candidates."""
    data = []
    for member in members:
        query = client.embed_members([member])[0]
        hits = client.retrieve(member, k=candidates)
        data.append(
            {
                "RECORDS": {"content": [member.model_dump_json(exclude_none=True)], "shape": [1]},
                "QUERY": {"content": query.tolist(), "shape": [len(query)]},
                "CANDIDATE_IDS": {"content": [h.post_id for h in hits], "shape": [len(hits)]},
                "CANDIDATE_SCORES": {"content": [h.score for h in hits], "shape": [len(hits)]},
                "K": {"content": [10], "shape": [1]},
            }
        )
    return {"data": data}


def _feed_inputs(members: list[Any], candidates: int) -> dict[str, Any]:
    return {
        "data": [
            {
                "RECORDS": {"content": [m.model_dump_json(exclude_none=True)], "shape": [1]},
                "K": {"content": [10], "shape": [1]},
                "CANDIDATES": {"content": [candidates], "shape": [1]},
            }
            for m in members
        ]
    }


@contextmanager
def live_features(layout: ArtifactLayout, posts: dict[int, Any]) -> Iterator[int]:
    """Every indexed post written again with its ranking features (then without them again, as the
    build left it); yields how many have them."""
    from feedserve.index.live import IndexWriter
    from feedserve.prompt.buckets import PercentileBuckets
    from feedserve.rank.features import feature_row

    buckets = PercentileBuckets.load(layout.buckets)

    def rewrite(with_features: bool) -> int:
        writer = IndexWriter.open(layout.index_dir.root)
        try:
            ids, vectors = writer.index.snapshot()
            keep = np.array([int(i) in posts for i in ids], bool)
            ids, vectors = ids[keep], vectors[keep]
            for start in range(0, len(ids), 1000):
                chunk = ids[start : start + 1000]
                rows = [feature_row(posts[int(i)], buckets) for i in chunk] if with_features else None
                writer.write(np.full(len(chunk), Op.UPSERT), chunk, vectors[start : start + 1000], rows)
            return len(ids)
        finally:
            writer.close()

    count = rewrite(True)
    try:
        yield count
    finally:
        rewrite(False)


def through_triton(
    layout: ArtifactLayout, n_members: int, window_ms: int, tmp: Path, with_live_features: bool = False
) -> list[dict[str, Any]]:
    from feedserve.clients.online import FeedClient
    from feedserve.ops.builder import SAMPLE_CORPUS
    from feedserve.ops.launcher import TritonServer, on_free_ports
    from feedserve.prompt.movielens import load_movielens
    from feedserve.prompt.records import MAX_HISTORY
    from feedserve.triton.repository import RepositorySettings, write_repository

    ml = load_movielens(SAMPLE_CORPUS)
    by_user = ml.ratings_by_user()
    # Members with at least 200 ratings: the ranker reads their 200 newest (its max_history).
    users = [u for u in sorted(by_user) if len(by_user[u]) >= 200][:n_members]
    members = [ml.member(u, by_user[u][-MAX_HISTORY:]) for u in users]
    repo = tmp / "repository"
    write_repository(repo, RepositorySettings(encoder_cache_rows=0, index_writer=False))
    points = []
    # Candidates are what retrieval returns: the index must hold well over 2,000 posts (the full
    # MovieLens catalog: `feedserve demo --full`, or `feedserve index`).
    index_posts = len(np.load(layout.index, allow_pickle=False)["ids"]) if layout.index.exists() else 0
    if index_posts < 4000:
        raise SystemExit(
            f"{layout.index} holds {index_posts} posts: index the full catalog first (feedserve demo --full)"
        )
    with ExitStack() as stack:
        featured = (
            stack.enter_context(live_features(layout, {p.id: p for p in ml.posts(ml.cutoff())}))
            if with_live_features
            else 0
        )
        server = stack.enter_context(TritonServer(on_free_ports(repository=repo, artifacts=layout.root)))
        with FeedClient(server.grpc_url, "grpc", timeout_s=120) as client:
            data = {"rank-2000": _rank_inputs(client, members, 2000)}
        data["feed-500"] = _feed_inputs(members, 500)
        data["feed-2000"] = _feed_inputs(members, 2000)
        for name, doc in data.items():
            path = tmp / f"{name}.json"
            path.write_text(json.dumps(doc))
            model = name.split("-")[0]
            for concurrency in (1, 8):
                row = run_perf_analyzer(
                    perf_analyzer_binary(),
                    server.grpc_url,
                    "grpc",
                    model,
                    path,
                    [f"--concurrency-range={concurrency}"],
                    window_ms,
                    max_trials=6,
                )
                point = {
                    "model": model,
                    "candidates": int(name.split("-")[1]),
                    "index_posts": index_posts,
                    "concurrency": concurrency,
                    "infer_per_s": float(row["Inferences/Second"]),
                    "p50_ms": float(row["p50 latency"]) / 1000,
                    "p99_ms": float(row["p99 latency"]) / 1000,
                    "members": len(members),
                    "posts_with_live_features": featured,
                }
                logger.info("%s", point)
                points.append(point)
    return points


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Ranking speed",
        "",
        f"Machine: {report['machine']}.",
        f"Command: `{report['command']}`.",
        "",
        "## In-process (ONNX Runtime, one member)",
        "",
        "| history | candidates | split p50 / p99 ms | dense p50 ms | per-candidate p50 ms | shared vs per-candidate | split vs dense | weights |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["in_process"]:
        lines.append(
            f"| {r['history']} | {r['candidates']} | {r['split']['p50_ms']:.1f} / {r['split']['p99_ms']:.1f} | "
            f"{r['dense']['p50_ms']:.1f} | {r['per_candidate']['p50_ms']:.0f} | "
            f"{r['shared_vs_per_candidate']:.0f}x | {r['split_vs_dense']:.1f}x | {r['weights']} |"
        )
    if report.get("triton"):
        lines += [
            "",
            f"## Through Triton (perf_analyzer, gRPC, K=10, {report['triton'][0]['index_posts']} posts indexed, "
            f"{report['triton'][0].get('posts_with_live_features', 0)} of them with their features in the index)",
            "",
            "| model | candidates | concurrency | inferences/s | p50 ms | p99 ms |",
            "|---|---|---|---|---|---|",
        ]
        for p in report["triton"]:
            lines.append(
                f"| {p['model']} | {p['candidates']} | {p['concurrency']} | {p['infer_per_s']:.2f} | "
                f"{p['p50_ms']:.1f} | {p['p99_ms']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=default_artifacts_dir())
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--sample", type=int, default=48, help="candidates scored one by one, scaled to C")
    p.add_argument("--members", type=int, default=16)
    p.add_argument("--window-ms", type=int, default=8000)
    p.add_argument("--skip-server", action="store_true")
    p.add_argument("--skip-in-process", action="store_true")
    p.add_argument("--live-features", action="store_true", help="every indexed post's features read from the index")
    p.add_argument("--out", type=Path, default=Path("benchmarks/reports/rank_speed"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    layout = ArtifactLayout(args.artifacts)
    if not layout.has_ranker():
        raise SystemExit(f"{layout.root} has no ranker: `feedserve build` first")
    report: dict[str, Any] = {
        "machine": machine(),
        "command": "python -m benchmarks.rank_speed " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    with tempfile.TemporaryDirectory() as tmp:
        report["in_process"] = [] if args.skip_in_process else in_process(layout, args.runs, args.sample, Path(tmp))
        if not args.skip_server:
            report["triton"] = through_triton(layout, args.members, args.window_ms, Path(tmp), args.live_features)
    write_report(args.out, "rank_speed", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
