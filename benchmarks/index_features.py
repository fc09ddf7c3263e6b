"""What keeping each post's ranking features in the local index costs, against vectors alone.

    .venv/bin/python -m benchmarks.index_features --sizes 100000 1000000

For each index size, twice: every post with the feature row the ingester's record gives it
(`feature_row` of a MovieLens movie's record, cycled over the catalogue: two count percentiles
and its tags), and no post with any (what an index the build wrote holds). Measured through the
real files in a temporary directory on this disk: a live write of 64 new posts (`IndexWriter.write`:
the log record, its fsync, the apply), a snapshot (`IndexWriter.snapshot`) and its file size, the
writer's open (load the snapshot, replay the log), one `rank` request's read of 2,200 posts
(`lookup_rows`, the vectors and features of its 200 history items and 2,000 candidates), what the
ranker then reads of their features (the history's tags, the candidates' percentiles and tag
affinity: through the live rows over the build's table, `PostFeatures.overlay`, or from the table
alone holding every post), the features' memory, and a full pass of the garbage collector.

And how the store finds a post's row from its id, the first step of that read, three ways over the
same random ids: a comprehension of `dict.get` (before), `map` of the dict's bound `get`, which
loops in C (`PostIndex._rows_of`), and a binary search in a sorted id array (what writes would have
to keep sorted instead of the dict).
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import write_report
from benchmarks.peers import unit_vectors
from feedserve.clients.perf import machine
from feedserve.index.features import FeatureColumns, positions_of, search_sorted
from feedserve.index.live import IndexWriter
from feedserve.index.snapshot import load_arrays
from feedserve.index.store import PostIndex
from feedserve.index.wal import Op
from feedserve.ops.builder import SAMPLE_CORPUS
from feedserve.prompt.movielens import load_movielens
from feedserve.rank.features import PostFeatures, feature_row

logger = logging.getLogger("benchmarks.index_features")

WRITE = 64
READ = 2200  # one rank request: 200 history items and 2,000 candidates


def _ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def movie_rows() -> list[dict[str, Any]]:
    """The feature rows of the sample corpus's movies, as index_write computes them from records."""
    movielens = load_movielens(SAMPLE_CORPUS)
    buckets = movielens.fit_buckets()
    return [feature_row(post, buckets) for post in movielens.posts()]


def table_of(post_ids: np.ndarray, rows: list[dict[str, Any]]) -> PostFeatures:
    """The build's table holding these posts (the rows they would have been written with)."""
    picked = {int(p): rows[int(p) % len(rows)] for p in post_ids}
    return PostFeatures({p: r["percentiles"] for p, r in picked.items()}, {p: r["tags"] for p, r in picked.items()})


def measure(n: int, dim: int, featured: bool, reps: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    label = "features" if featured else "vectors only"
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        directory = Path(tmp)
        # The starting index, saved as a snapshot (a bulk write through the log would be one record
        # of gigabytes): every post with its row, or none.
        index = PostIndex(dim)
        ids = np.arange(n, dtype=np.int64)
        index.write(
            ids, unit_vectors(rng, n, dim), ids[:0], [rows[i % len(rows)] for i in range(n)] if featured else None
        )
        index.meta.update({"lsn": 0, "generation": "bench"})
        index.save(directory / "posts.npz")
        del index
        writer = IndexWriter.open(directory)
        write_ms = []
        for r in range(reps):
            new = np.arange(n + r * WRITE, n + (r + 1) * WRITE, dtype=np.int64)
            vectors = unit_vectors(rng, WRITE, dim)
            features = [rows[int(i) % len(rows)] for i in new] if featured else None
            write_ms.append(_ms(lambda: writer.write(np.full(WRITE, Op.UPSERT), new, vectors, features)))
        snapshot_ms = _ms(writer.snapshot)
        size = (directory / "posts.npz").stat().st_size
        asked = rng.choice(n, READ, replace=False).astype(np.int64)
        lookup_ms = [_ms(lambda: writer.index.lookup_rows(asked)) for _ in range(reps)]
        _, _, live = writer.index.lookup_rows(asked)
        # What the ranker then reads: the history's tags, the candidates' percentiles and affinity.
        # With live rows, through an overlay of an empty table (the posts came after the build); else
        # from a table of every post's row, as the build writes it.
        table = PostFeatures() if featured else table_of(asked, rows)
        history, candidates = asked[:200].tolist(), asked[200:].tolist()

        def read() -> None:
            features = table.overlay(live) if live else table
            liked = features.tag_union(history)
            features.percentiles(candidates)
            features.affinity(candidates, liked)

        read_ms = [_ms(read) for _ in range(reps)]
        writer.close()
        start = time.perf_counter()
        reopened = IndexWriter.open(directory)
        open_ms = (time.perf_counter() - start) * 1e3
        for _ in range(3):  # what a served process pays once the collector has seen the rows
            gc.collect()
        gc_ms = _ms(gc.collect)
        reopened.close()
        del reopened
        saved_ids, _, _, loaded = load_arrays(directory / "posts.npz")
        tracemalloc.start()  # the columns as PostIndex.load builds them from the file's
        held = FeatureColumns()
        held.load(positions_of(loaded.ids, saved_ids), loaded)
        del loaded
        features_mb = tracemalloc.get_traced_memory()[0] / 2**20
        tracemalloc.stop()
        del held
    row = {
        "posts": n,
        "dim": dim,
        "index": label,
        "write_ms": statistics.median(write_ms),
        "snapshot_s": snapshot_ms / 1e3,
        "snapshot_mb": size / 2**20,
        "open_s": open_ms / 1e3,
        "lookup_ms": statistics.median(lookup_ms),
        "features_read_ms": statistics.median(read_ms),
        "features_held_mb": features_mb,
        "full_gc_ms": gc_ms,
    }
    logger.info("%s", row)
    return row


def id_lookup(n: int, reps: int = 61) -> dict[str, Any]:
    """Medians over `reps` draws of READ random held ids, the three ways interleaved in one process."""
    rng = np.random.default_rng(0)
    ids = rng.choice(1 << 40, n, replace=False).astype(np.int64)
    rows = dict(zip(ids.tolist(), range(n), strict=True))
    order = np.argsort(ids)
    sorted_ids = ids[order]
    get = rows.get
    ways: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "comprehension": lambda q: np.array([get(i, -1) for i in q.tolist()], np.int64),
        "map": lambda q: np.fromiter(map(get, q.tolist(), repeat(-1, len(q))), np.int64, len(q)),
        "sorted search": lambda q: search_sorted(q, sorted_ids, order),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(reps):
        wanted = ids[rng.integers(0, n, READ)]
        answers = []
        for name, way in ways.items():
            started = time.perf_counter()
            answers.append(way(wanted))
            times[name].append((time.perf_counter() - started) * 1000)
        assert all(np.array_equal(answers[0], a) for a in answers[1:])
    return {"posts": n, **{f"{name}_ms": statistics.median(t) for name, t in times.items()}}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Ranking features in the local index",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']}",
        "",
        __doc__.split("\n\n", 2)[2].strip(),
        "",
        f"Medians of {report['reps']} repetitions for the write and the reads; one snapshot and one open. "
        "*features held MB*: the features as the index holds them, every object (tracemalloc of their columns "
        "built from the snapshot's, as the writer's open builds them); *full gc ms*: one full "
        "pass of Python's garbage collector with the reopened index in memory (a pass falls on whichever "
        "request is running when it comes).",
        "",
        "| posts | index | write 64 ms | snapshot s | snapshot MB | open s | read 2,200 ms | features read ms "
        "| features held MB | full gc ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['posts']:,} | {r['index']} | {r['write_ms']:.1f} | {r['snapshot_s']:.2f} | {r['snapshot_mb']:.0f} | "
            f"{r['open_s']:.2f} | {r['lookup_ms']:.1f} | {r['features_read_ms']:.1f} | {r['features_held_mb']:.0f} | "
            f"{r['full_gc_ms']:.0f} |"
        )
    lines += [
        "",
        f"A post's row from its id, {READ:,} random held ids (medians of 61 draws, the ways interleaved):",
        "",
        "| posts | comprehension ms | map ms | sorted search ms |",
        "|---|---|---|---|",
    ]
    for r in report.get("id_lookup", []):
        lines.append(
            f"| {r['posts']:,} | {r['comprehension_ms']:.2f} | {r['map_ms']:.2f} | {r['sorted search_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=576, help="the shipped encoder's width")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/reports"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rows = movie_rows()
    report = {
        "command": "python -m benchmarks.index_features " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "reps": args.reps,
        "rows": [measure(n, args.dim, featured, args.reps, rows) for n in args.sizes for featured in (False, True)],
        "id_lookup": [id_lookup(n) for n in args.sizes],
    }
    write_report(args.out, "index_features", report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
