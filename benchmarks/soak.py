"""Soak: `retrieve` at a steady request rate for a fixed time against the embedded default, with
perf_analyzer, watching for failed requests, resident-memory growth and a drifting p99 (issue 7).

    .venv/bin/python -m benchmarks.soak --minutes 10 --rate 4

The server serves the default model from a scratch copy of the artifacts with an index of 1,000
MovieLens posts (the prompt cache off, so every member is encoded). perf_analyzer runs in
back-to-back rounds of three 20 s windows at `--rate` requests/s over gRPC, cycling 32 members;
between rounds the resident memory of tritonserver and its python backend stubs is summed. A round
whose perf_analyzer fails counts as failed requests. Loopback only; the loop ends by itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import write_report
from benchmarks.freshness import scratch_artifacts
from feedserve.artifacts import ArtifactLayout, default_artifacts_dir

logger = logging.getLogger("benchmarks.soak")


def tree_rss_mb(pid: int) -> float:
    """tritonserver and its python stubs. Not the stubs' guardians (feedserve.triton.base): forked
    children whose pages are the stub's own, shared, which RSS would count twice."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=False)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def one_round(url: str, data: Path, rate: float, window_ms: int) -> dict[str, object]:
    from feedserve.clients.perf import perf_analyzer_binary, run_perf_analyzer

    try:
        # Stability 999%: every window counts, so a round is always three windows at the steady rate.
        row = run_perf_analyzer(
            perf_analyzer_binary(),
            url,
            "grpc",
            "retrieve",
            data,
            [f"--request-rate-range={rate:g}"],
            window_ms,
            stability_pct=999,
            max_trials=3,
        )
    except RuntimeError as err:
        return {"ok": False, "error": str(err)[-800:]}
    return {
        "ok": True,
        "infer_per_s": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1000,
        "p99_ms": float(row["p99 latency"]) / 1000,
    }


def markdown(r: dict) -> str:
    rounds = r["rounds"]
    ok = [x for x in rounds if x["ok"]]
    lines = [
        "# Soak: `retrieve` at a steady rate (default model, 2-core CPU)",
        "",
        f"Command: `{r['command']}`. {len(rounds)} rounds of 3 x {r['window_s']:g} s windows at {r['rate']:g} requests/s "
        f"over gRPC; prompt cache off; index of {r['posts']} posts.",
        "",
        "| round | minutes in | inferences/s | p50 ms | p99 ms | server RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    for i, x in enumerate(rounds):
        if x["ok"]:
            lines.append(
                f"| {i + 1} | {x['t_min']:.1f} | {x['infer_per_s']:.2f} | {x['p50_ms']:.0f} | {x['p99_ms']:.0f} | {x['rss_mb']:.0f} |"
            )
        else:
            lines.append(f"| {i + 1} | {x['t_min']:.1f} | FAILED | | | {x['rss_mb']:.0f} |")
    p99 = [x["p99_ms"] for x in ok]
    lines += [
        "",
        f"- Failed rounds: {len(rounds) - len(ok)} (target 0).",
        f"- Resident memory, first round to last: {r['rss_first_mb']:.0f} -> {r['rss_last_mb']:.0f} MiB "
        f"({r['rss_growth_pct']:+.1f}%, target under 5%).",
        f"- p99 over the rounds: min {min(p99):.0f}, median {np.median(p99):.0f}, max {max(p99):.0f} ms."
        if p99
        else "- no p99",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=default_artifacts_dir())
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=4.0, help="retrieve requests per second")
    p.add_argument("--window-s", type=float, default=20.0)
    p.add_argument("--posts", type=int, default=1000)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "reports")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from feedserve.clients.batch import index_corpus
    from feedserve.clients.perf_data import movielens_input
    from feedserve.ops.builder import SAMPLE_CORPUS
    from feedserve.ops.launcher import TritonServer, on_free_ports
    from feedserve.prompt.movielens import load_movielens
    from feedserve.triton.repository import RepositorySettings, write_repository

    report: dict[str, object] = {
        "command": "python -m benchmarks.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rate": args.rate,
        "window_s": args.window_s,
        "posts": args.posts,
    }
    rounds: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        layout = scratch_artifacts(ArtifactLayout(args.artifacts), Path(tmp) / "artifacts")
        repository = Path(tmp) / "repository"
        write_repository(repository, RepositorySettings(encoder_cache_rows=0))
        data = Path(tmp) / "retrieve.json"
        data.write_text(json.dumps(movielens_input("retrieve", 32)))
        opts = on_free_ports(repository=repository, artifacts=layout.root, log_file=Path(tmp) / "tritonserver.log")
        with TritonServer(opts) as server:
            posts = load_movielens(SAMPLE_CORPUS).posts()[: args.posts]
            index_corpus(posts, [q.id for q in posts], layout.index, url=server.grpc_url, progress=False)
            assert server.process is not None
            start = time.monotonic()
            deadline = start + args.minutes * 60
            while time.monotonic() < deadline:  # bounded: ends after --minutes
                result = one_round(server.grpc_url, data, args.rate, int(args.window_s * 1000))
                result.update(t_min=(time.monotonic() - start) / 60, rss_mb=tree_rss_mb(server.process.pid))
                rounds.append(result)
                logger.info("round %d: %s", len(rounds), result)
    report["rounds"] = rounds
    report["rss_first_mb"], report["rss_last_mb"] = rounds[0]["rss_mb"], rounds[-1]["rss_mb"]
    report["rss_growth_pct"] = 100 * (rounds[-1]["rss_mb"] / rounds[0]["rss_mb"] - 1)  # type: ignore[operator]
    write_report(args.out, "soak", report, markdown(report))
    return 0 if all(x["ok"] for x in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
