"""Small retrievals while maximal members arrive: what one client at the record limits costs the
others (issue 16). Two clients send one-member `retrieve` requests (MovieLens users, k=10) for
`--seconds`, first alone, then while a third sends requests of 8 maximal members (every list and
string of the record at its cap: about 1 MB of JSON each, `feedserve.prompt.records.maximal_member`)
back to back. Reported: p50/p99 of the small requests in both phases and the big requests' time.

    .venv/bin/python -m benchmarks.hostile --seconds 30 --label after

The default model from a scratch copy of the artifacts, an index of 1,000 MovieLens posts, the
prompt cache off. `--label` names the run in the report, which keeps the other labels' runs (the
"before" run served the prompt builder as it was before its work was bounded). Loopback only; every
loop ends by itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks import write_report
from benchmarks.freshness import scratch_artifacts
from feedserve.artifacts import ArtifactLayout, default_artifacts_dir
from feedserve.clients.perf import machine

logger = logging.getLogger("benchmarks.hostile")


def _clients(url: str, requests: list[list[object]], k: int, seconds: float, workers: int) -> list[float]:
    """Latencies (ms) of `workers` clients sending `requests` in turn for `seconds`."""
    from feedserve.clients.online import FeedClient

    latencies: list[float] = []
    deadline = time.monotonic() + seconds

    def run(seed: int) -> None:
        with FeedClient(url, "grpc", timeout_s=300) as client:
            i = seed
            while time.monotonic() < deadline:
                t = time.perf_counter()
                client.retrieve_many(requests[i % len(requests)], k)
                latencies.append((time.perf_counter() - t) * 1000)
                i += workers

    threads = [threading.Thread(target=run, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def _stats(ms: list[float]) -> dict[str, float]:
    return {"n": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def measure(artifacts: Path, seconds: float, posts: int) -> dict[str, object]:
    from feedserve.clients.batch import index_corpus
    from feedserve.ops.builder import SAMPLE_CORPUS
    from feedserve.ops.launcher import TritonServer, on_free_ports
    from feedserve.prompt.movielens import load_movielens
    from feedserve.prompt.records import maximal_member
    from feedserve.triton.repository import RepositorySettings, write_repository

    movielens = load_movielens(SAMPLE_CORPUS)
    corpus = sorted(movielens.posts(), key=lambda p: -p.counts.get("ratings", 0))[:posts]
    small = [[m] for m in movielens.members()[:64]]
    big = [[json.dumps(maximal_member(100 * r + i)) for i in range(8)] for r in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        layout = scratch_artifacts(ArtifactLayout(artifacts), Path(tmp) / "artifacts")
        repository = Path(tmp) / "repository"
        write_repository(repository, RepositorySettings(encoder_cache_rows=0))
        opts = on_free_ports(repository=repository, artifacts=layout.root, log_file=Path(tmp) / "tritonserver.log")
        with TritonServer(opts) as server:
            index_corpus(corpus, [p.id for p in corpus], layout.index, url=server.grpc_url, progress=False)
            _clients(server.grpc_url, small, 10, 5, 2)  # warm-up
            alone = _clients(server.grpc_url, small, 10, seconds, 2)
            result: dict[str, list[float]] = {}
            hostile = threading.Thread(
                target=lambda: result.setdefault("big", _clients(server.grpc_url, big, 10, seconds, 1))
            )
            hostile.start()
            beside = _clients(server.grpc_url, small, 10, seconds, 2)
            hostile.join()
    return {
        "small_alone": _stats(alone),
        "small_beside_maximal": _stats(beside),
        "maximal_requests": _stats(result["big"]),
        "maximal_record_bytes": len(big[0][0]),
    }


def markdown(report: dict) -> str:
    lines = [
        "# Small retrievals while maximal members arrive",
        "",
        f"Command: `python -m benchmarks.hostile --seconds {report['seconds']:g} --label RUN` (one per row); "
        f"machine: {report['machine']}.",
        f"Two clients send one-member `retrieve` requests (k=10) for {report['seconds']:g} s alone, then while a",
        "third sends requests of 8 maximal members (each about "
        f"{next(iter(report['runs'].values()))['maximal_record_bytes'] / 2**20:.2f} MiB of JSON) back to back.",
        "Default model, int8 encoder, 1,000 posts, prompt cache off.",
        "",
        "| run | small alone p50 / p99 ms | small beside maximal p50 / p99 ms | maximal request (8 members) p50 / p99 ms | maximal requests |",
        "|---|---|---|---|---|",
    ]
    for label, run in sorted(report["runs"].items()):
        a, b, m = run["small_alone"], run["small_beside_maximal"], run["maximal_requests"]
        lines.append(
            f"| {label} | {a['p50_ms']:.0f} / {a['p99_ms']:.0f} | {b['p50_ms']:.0f} / {b['p99_ms']:.0f} | "
            f"{m['p50_ms']:.0f} / {m['p99_ms']:.0f} | {m['n']} |"
        )
    lines += [
        "",
        "`before`: the prompt builder before its work was bounded by the token budget; `after`: as shipped.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=default_artifacts_dir())
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--posts", type=int, default=1000)
    p.add_argument("--label", default="after")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "reports")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    path = args.out / "hostile.json"
    report = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    report.update(
        command="python -m benchmarks.hostile " + " ".join(argv if argv is not None else sys.argv[1:]),
        machine=machine(),
        seconds=args.seconds,
    )
    report["runs"][args.label] = measure(args.artifacts, args.seconds, args.posts)
    write_report(args.out, "hostile", report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
