"""Writes to a large post index: what one write window costs the search path, per kNN engine.

    .venv/bin/python -m benchmarks.index_writes --sizes 100000 1000000
    python -m benchmarks.index_writes --sizes 1000000 10000000 --engines faiss torch-cuda   # on a GPU host

For each engine and index size: a write of 64 posts (new ids, replaced ids, or deletes) through
`PostIndex.write`, then the first search after it (1 query, k=100), then a steady search. A `knn`
instance applies the log's writes before its next batch, so write + first search is what the batch
after a write waits for. GPU engines are measured twice: writing the device copy in place (what
ships), and dropping it for the first search to rebuild from the store (what shipped before, and
what faiss-gpu still does: it cannot remove rows).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import write_report
from benchmarks.peers import unit_vectors
from feedserve.clients.perf import machine
from feedserve.index.engines import Engine
from feedserve.index.store import PostIndex

logger = logging.getLogger("benchmarks.index_writes")

ENGINES = {
    "faiss": Engine(),
    "torch-cpu": Engine("torch", device="cpu", dtype="fp32"),
    "torch-cuda": Engine("torch", device="cuda", dtype="fp16"),
}
WRITE = 64


def _ms(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def measure(name: str, n: int, dim: int, reps: int, rng: np.random.Generator) -> list[dict[str, object]]:
    engine = ENGINES[name]
    index = PostIndex(dim, engine=engine)
    index.upsert(np.arange(n, dtype=np.int64), unit_vectors(rng, n, dim))
    # One write before measuring: the store's first append after a bulk load regrows its buffer
    # (a copy of the whole index, once per doubling), which is not a steady-state cost.
    index.upsert(np.array([n], np.int64), unit_vectors(rng, 1, dim))
    query = unit_vectors(rng, 1, dim)
    index.search(query, [100])  # builds a GPU engine's device copy
    modes = ["in place"] if engine.kind == "faiss" else ["in place", "rebuild"]
    rows = []
    next_id = n + 1
    for mode in modes:
        for kind in ("new", "replace", "delete"):
            write_ms, first_ms, steady_ms = [], [], []
            for _ in range(reps):
                if kind == "new":
                    ids = np.arange(next_id, next_id + WRITE, dtype=np.int64)
                    next_id += WRITE
                else:
                    ids = rng.choice(n, WRITE, replace=False).astype(np.int64)
                vectors = unit_vectors(rng, WRITE, dim)
                if mode == "rebuild":  # the old behaviour: writes leave it, the next search re-reads the store
                    index._device = None
                if kind == "delete":
                    write_ms.append(_ms(lambda: index.delete(ids)))
                else:
                    write_ms.append(_ms(lambda: index.upsert(ids, vectors)))
                first_ms.append(_ms(lambda: index.search(query, [100])))
                steady_ms.append(_ms(lambda: index.search(query, [100])))
                if kind == "delete":  # put them back, unmeasured, so that the size holds
                    index.upsert(ids, vectors)
                    index.search(query, [100])
            row = {
                "engine": name,
                "posts": n,
                "dim": dim,
                "write": f"{WRITE} {kind}",
                "device_copy": mode,
                "write_ms": statistics.median(write_ms),
                "first_search_ms": statistics.median(first_ms),
                "steady_search_ms": statistics.median(steady_ms),
            }
            row["write_to_served_ms"] = row["write_ms"] + row["first_search_ms"]  # type: ignore[operator]
            logger.info("%s", row)
            rows.append(row)
    return rows


def markdown(report: dict) -> str:
    lines = [
        "# Writes to a large post index",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']}",
        "",
        "Medians over the repetitions; one query, k=100. *write to served* = the write plus the first search "
        "after it: what the first batch after a write window waits for in a `knn` instance.",
        "",
        "| engine | posts | write | device copy | write ms | first search ms | steady search ms | write to served ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['engine']} | {r['posts']:,} | {r['write']} | {r['device_copy']} | {r['write_ms']:.1f} | "
            f"{r['first_search_ms']:.1f} | {r['steady_search_ms']:.1f} | {r['write_to_served_ms']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--engines", nargs="+", choices=sorted(ENGINES), default=["faiss", "torch-cpu"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/reports"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rng = np.random.default_rng(0)
    rows = [row for n in args.sizes for name in args.engines for row in measure(name, n, args.dim, args.reps, rng)]
    where = torch.cuda.get_device_name() if "torch-cuda" in args.engines else machine()
    report = {
        "command": "python -m benchmarks.index_writes " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": where,
        "rows": rows,
    }
    write_report(args.out, "index_writes", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
