"""Retrieval from Milvus (embedded, Milvus Lite) against the in-process index, at 10k, 100k and 1M posts.

    .venv/bin/python -m benchmarks.milvus [--sizes 10000,100000,1000000] [--window-ms 4000]

For each size the posts are random unit vectors of the default model's serving width (embedding a
million posts through the encoder would take days on 2 cores, and an exact index's cost does not
depend on what its vectors mean), held (a) in the local live index (`feedserve.index.live`, what
one node serves) and (b) in a Milvus collection (FLAT, inner product, Strong consistency) served by
Milvus Lite on a loopback port, the engine a Milvus cluster's query nodes run.

1. In-process: one query's exact top 10 (history of 20 excluded), PostIndex (faiss) against
   MilvusStore (gRPC to Milvus Lite), p50/p99 over `--queries` queries; the answers must agree.
2. Through Triton (artifacts/default, one server per engine, the repository rendered with
   `--index local` or `--index milvus`): perf_analyzer on `knn` (a query vector in, the index
   alone) and on `retrieve` (32 MovieLens members; the encoder's prompt cache holds them after the
   first pass, so the time is the member's preprocessing plus the kNN) at concurrency 1 and 8.

Writes the report to benchmarks/reports/milvus.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.freshness import scratch_artifacts
from feedserve.artifacts import ArtifactLayout, default_artifacts_dir
from feedserve.clients.batch import build_index
from feedserve.clients.online import FeedClient
from feedserve.clients.perf import machine, perf_analyzer_binary, run_perf_analyzer
from feedserve.clients.perf_data import movielens_input
from feedserve.index.milvus import MilvusLite, MilvusStore
from feedserve.index.store import PostIndex
from feedserve.ops.launcher import TritonServer, on_free_ports
from feedserve.triton.repository import RepositorySettings, write_repository

logger = logging.getLogger("benchmarks.milvus")

K, HISTORY = 10, 20


def unit_vectors(rng: np.random.Generator, n: int, dim: int, chunk: int = 100_000) -> np.ndarray:
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        v = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
        out[start : start + len(v)] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def _percentiles(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def in_process(index: PostIndex, store: MilvusStore, queries: np.ndarray, ids: np.ndarray) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    local_ms, milvus_ms, agree = [], [], 0
    for query in queries:
        history = [rng.choice(ids, HISTORY, replace=False)]
        t = time.perf_counter()
        want = index.search(query[None], [K], history)[0]
        local_ms.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        got = store.search(query[None], [K], history)[0]
        milvus_ms.append((time.perf_counter() - t) * 1000)
        agree += int(got.ids.tolist() == want.ids.tolist())
    return {"local": _percentiles(local_ms), "milvus": _percentiles(milvus_ms), "same_top10": agree / len(queries)}


def through_triton(
    layout: ArtifactLayout, repo: Path, milvus_uri: str | None, data: dict[str, Path], window_ms: int
) -> list[dict[str, Any]]:
    points = []
    with TritonServer(on_free_ports(repository=repo, artifacts=layout.root, milvus_uri=milvus_uri)) as server:
        # Each member once first: the encoder's prompt cache then holds them all, in both servers alike.
        requests = json.loads(data["retrieve"].read_text())["data"]
        with FeedClient(server.grpc_url, "grpc", timeout_s=120) as client:
            for request in requests:
                client.retrieve(request["RECORDS"]["content"][0], K)
        for model, path in data.items():
            for concurrency in (1, 8):
                row = _measure(server.grpc_url, model, path, concurrency, window_ms)
                point = {
                    "model": model,
                    "concurrency": concurrency,
                    "infer_per_s": float(row["Inferences/Second"]),
                    "p50_ms": float(row["p50 latency"]) / 1000,
                    "p99_ms": float(row["p99 latency"]) / 1000,
                }
                logger.info("%s %s", "milvus" if milvus_uri else "local", point)
                points.append(point)
    return points


def _measure(url: str, model: str, path: Path, concurrency: int, window_ms: int) -> dict[str, str]:
    """perf_analyzer's row; a load too noisy to settle in its windows is measured again in longer ones."""
    for attempt in range(3):
        try:
            return run_perf_analyzer(
                perf_analyzer_binary(),
                url,
                "grpc",
                model,
                path,
                [f"--concurrency-range={concurrency}"],
                window_ms * 2**attempt,
                max_trials=5,
            )
        except RuntimeError:
            if attempt == 2:
                raise
            logger.warning("%s at concurrency %d did not settle; longer windows", model, concurrency)
    raise AssertionError("unreachable")


def knn_input(queries: np.ndarray) -> dict[str, object]:
    return {
        "data": [
            {"QUERY": {"content": q.tolist(), "shape": [len(q)]}, "K": {"content": [K], "shape": [1]}} for q in queries
        ]
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=default_artifacts_dir())
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--queries", type=int, default=200, help="in-process queries per size")
    p.add_argument("--window-ms", type=int, default=4000)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "reports")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    report: dict[str, Any] = {
        "command": "python -m benchmarks.milvus " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "engine": "Milvus Lite 2.5.1 (pymilvus 2.5.18), FLAT / IP, Strong consistency, loopback gRPC",
        "sizes": [],
    }
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        layout = scratch_artifacts(ArtifactLayout(args.artifacts), tmp / "artifacts")
        dim = layout.serving_dim()
        repos = {"local": tmp / "repo-local", "milvus": tmp / "repo-milvus"}
        write_repository(repos["local"], RepositorySettings())
        write_repository(repos["milvus"], RepositorySettings(index="milvus"))
        queries = unit_vectors(rng, args.queries, dim)
        data = {"knn": tmp / "knn.json", "retrieve": tmp / "retrieve.json"}
        data["knn"].write_text(json.dumps(knn_input(queries[:64])))
        data["retrieve"].write_text(json.dumps(movielens_input("retrieve", 32, K)))
        for n in (int(s) for s in args.sizes.split(",")):
            ids = np.arange(n, dtype=np.int64)
            vectors = unit_vectors(rng, n, dim)
            row: dict[str, Any] = {"posts": n, "dim": dim}
            t = time.perf_counter()
            build_index(ids, vectors, layout.index)
            row["local_build_s"] = time.perf_counter() - t
            index = PostIndex.load(layout.index)
            with MilvusLite(tmp / f"milvus-{n}" / "posts.db") as lite:
                store = MilvusStore(lite.uri, dim)
                t = time.perf_counter()
                store.write(ids, vectors, np.empty(0, np.int64))
                row["milvus_load_s"] = time.perf_counter() - t
                del vectors
                row["in_process"] = in_process(index, store, queries, ids)
                del index
                logger.info("%d posts: %s", n, row)
                row["triton_local"] = through_triton(layout, repos["local"], None, data, args.window_ms)
                row["triton_milvus"] = through_triton(layout, repos["milvus"], lite.uri, data, args.window_ms)
                store.close()
            report["sizes"].append(row)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "milvus.json").write_text(json.dumps(report, indent=2) + "\n")  # each size as it ends
    (args.out / "milvus.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Milvus (embedded) against the in-process index",
        "",
        f"Command: `{r['command']}`. Engine: {r['engine']}. Posts: random unit vectors of the serving width.",
        "",
        f"Machine: {r['machine']}",
        "",
        "## In-process: one query, exact top 10, 20 history ids excluded",
        "",
        "| posts | local p50 / p99 ms | Milvus p50 / p99 ms | same top 10 | Milvus load s (rows/s) |",
        "|---|---|---|---|---|",
    ]
    for s in r["sizes"]:
        ip = s["in_process"]
        lines.append(
            f"| {s['posts']:,} | {ip['local']['p50_ms']:.2f} / {ip['local']['p99_ms']:.2f} | "
            f"{ip['milvus']['p50_ms']:.2f} / {ip['milvus']['p99_ms']:.2f} | {ip['same_top10']:.3f} | "
            f"{s['milvus_load_s']:.0f} ({s['posts'] / s['milvus_load_s']:,.0f}) |"
        )
    lines += [
        "",
        "## Through Triton (perf_analyzer, gRPC, batch 1): p50 / p99 ms, inferences/s",
        "",
        "| posts | model | concurrency | local index | Milvus |",
        "|---|---|---|---|---|",
    ]
    for s in r["sizes"]:
        for local, milvus in zip(s["triton_local"], s["triton_milvus"], strict=True):
            lines.append(
                f"| {s['posts']:,} | {local['model']} | {local['concurrency']} | "
                f"{local['p50_ms']:.1f} / {local['p99_ms']:.1f}, {local['infer_per_s']:.1f}/s | "
                f"{milvus['p50_ms']:.1f} / {milvus['p99_ms']:.1f}, {milvus['infer_per_s']:.1f}/s |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
