"""GPUs for an exact post index at scale, on paper from measured numbers.

    .venv/bin/python -m benchmarks.sizing [--gpu-report benchmarks/reports/gpu.json]

An exact (brute-force) search reads the whole index for every batch of queries, so its cost is the
index's bytes over the GPU's effective scan rate. The rate is measured, not a datasheet's: the
largest exact-kNN run in `benchmarks/reports/gpu.json` at query batch 64 (10M x 256 fp16 on an H100:
5.12 GB in 4.9 ms including the top-k, about 1 TB/s per 64 queries). Posts are sharded over GPUs
so that a shard fills at most `--shard-gb` of the GPU's memory (the rest is the query batch, the
score buffer and the runtime); every query visits every shard (one replica set), and replica sets
are added until they carry the rate. Batches of 64 keep latency near one scan of a shard (tens of
milliseconds); larger batches would need fewer GPUs where the matmul, not the memory, is not yet
the bound, which this does not claim. Milvus runs the same scan on its GPU query nodes
(GPU_BRUTE_FORCE), each holding shards of the collection.

Writes benchmarks/reports/sizing.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from benchmarks import write_report

REPORTS = Path(__file__).parent / "reports"
POSTS = (100_000_000, 1_000_000_000)
DIMS = (576, 3072)
RATES = (1_000, 10_000)
BYTES_FP16 = 2


def scan_rate(gpu_report: dict[str, Any], batch: int = 64) -> tuple[float, dict[str, Any]]:
    """(bytes/s one GPU scans at this query batch, the measurement it comes from): the largest index measured."""
    rows = [r for r in gpu_report["knn"] if r["query_batch"] == batch]
    row = max(rows, key=lambda r: r["index_gb"])
    return row["index_gb"] * 1e9 / (row["ms"] / 1000), row


def size(posts: int, dim: int, rate: float, scan_bytes_per_s: float, batch: int, shard_gb: float) -> dict[str, Any]:
    index_gb = posts * dim * BYTES_FP16 / 1e9
    shards = math.ceil(index_gb / shard_gb)
    shard_bytes = index_gb * 1e9 / shards
    set_rate = batch * scan_bytes_per_s / shard_bytes  # queries/s one replica set of all shards carries
    sets = math.ceil(rate / set_rate)
    return {
        "posts": posts,
        "dim": dim,
        "retrievals_per_s": rate,
        "index_gb": index_gb,
        "shards": shards,
        "scan_ms_per_batch": shard_bytes / scan_bytes_per_s * 1000,
        "replica_sets": sets,
        "gpus": shards * sets,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu-report", type=Path, default=REPORTS / "gpu.json")
    p.add_argument("--shard-gb", type=float, default=60.0, help="index per GPU (an 80 GB H100)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", type=Path, default=REPORTS)
    args = p.parse_args(argv)
    gpu = json.loads(args.gpu_report.read_text())
    rate, measured = scan_rate(gpu, args.batch)
    rows = [size(n, d, r, rate, args.batch, args.shard_gb) for n in POSTS for d in DIMS for r in RATES]
    report = {
        "command": "python -m benchmarks.sizing " + " ".join(argv if argv is not None else sys.argv[1:]),
        "gpu": gpu["gpu"],
        "measured": measured,
        "scan_gb_per_s": rate / 1e9,
        "shard_gb": args.shard_gb,
        "batch": args.batch,
        "rows": rows,
    }
    write_report(args.out, "sizing", report, markdown(report))
    return 0


def markdown(r: dict[str, Any]) -> str:
    m = r["measured"]
    lines = [
        "# Sizing an exact post index on GPUs (on paper, from measured numbers)",
        "",
        f"Command: `{r['command']}`. Scan rate: {r['scan_gb_per_s']:,.0f} GB/s per GPU at query batch "
        f"{r['batch']}, measured on {r['gpu']} ({m['posts']:,} x {m['dim']} fp16, {m['index_gb']:.2f} GB, "
        f"{m['ms']:.2f} ms per batch with the top {m['k']}; benchmarks/reports/gpu.md). Shards of at most "
        f"{r['shard_gb']:g} GB per GPU; fp16 vectors; every query scans every shard; replica sets added for the rate.",
        "",
        "| posts | dim | index GB | retrievals/s | shards (GPUs per set) | scan per batch ms | sets | GPUs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['posts']:,} | {row['dim']} | {row['index_gb']:,.0f} | {row['retrievals_per_s']:,} | "
            f"{row['shards']} | {row['scan_ms_per_batch']:.0f} | {row['replica_sets']} | {row['gpus']} |"
        )
    gpus = {(row["posts"], row["dim"], row["retrievals_per_s"]): row["gpus"] for row in r["rows"]}
    lines += [
        "",
        "The system we reproduce serves its index from about 24 GPUs for hundreds of millions of posts. "
        f"At 100M posts and 1,000 retrievals/s this needs {gpus[(POSTS[0], DIMS[0], RATES[0])]} GPUs at "
        f"{DIMS[0]} dims and {gpus[(POSTS[0], DIMS[1], RATES[0])]} at {DIMS[1]:,}; at 10,000/s, "
        f"{gpus[(POSTS[0], DIMS[0], RATES[1])]} and {gpus[(POSTS[0], DIMS[1], RATES[1])]}. Capacity, not the "
        "rate, sets the count at 1,000/s; a smaller serving width (Matryoshka, `--dim`) or int8 vectors cut "
        "it in proportion. Not measured: Milvus's own overhead on GPU query nodes (no GPU was lent to the "
        "session that wrote this), and batches above 64, which would need fewer GPUs while the scan stays "
        "memory-bound.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
