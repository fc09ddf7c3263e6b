"""perf_analyzer harness: a matrix of models x protocols x concurrency x batch size, from real
records, saved as raw CSV, a Markdown report naming the machine, and a throughput-latency plot.

    python -m feedserve.clients.perf                      # starts the embedded default server
    python -m feedserve.clients.perf --grpc-url HOST:8001 --http-url HOST:8000   # a running one
    python -m feedserve.clients.perf --models retrieve embed_post --concurrency 1 2 4 8 --batch 1 4

Input data comes from MovieLens (`feedserve.clients.perf_data`): members for `retrieve` and
`embed_member`, movies for `embed_post`. perf_analyzer is the binary setup installs in the
virtual environment (`--perf-analyzer` for another). Its default stability rule never settles on
small shared machines, so windows are time-based with a 50% stability band (see benchmarks/README).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

from feedserve.clients.perf_data import movielens_input

logger = logging.getLogger(__name__)

MODELS = ("retrieve", "feed", "embed_post", "embed_member")


@dataclass
class Point:
    model: str
    protocol: str
    batch: int
    concurrency: int
    infer_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float


def perf_analyzer_binary() -> Path:
    return Path(sys.executable).parent / "perf_analyzer"


def run_perf_analyzer(
    binary: Path,
    url: str,
    protocol: str,
    model: str,
    data: Path,
    load: list[str],
    window_ms: int,
    stability_pct: float = 50.0,
    max_trials: int = 4,
    batch: int = 1,
) -> dict[str, str]:
    """perf_analyzer's CSV row for one load (`--concurrency-range=N` or `--request-rate-range=R`);
    RuntimeError with its output when it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "pa.csv"
        cmd = [
            str(binary),
            "-m",
            model,
            "-u",
            url,
            "-i",
            protocol,
            "--input-data",
            str(data),
            "-b",
            str(batch),
            *load,
            f"--measurement-interval={window_ms}",
            "--measurement-mode=time_windows",
            f"--stability-percentage={stability_pct:g}",
            f"--max-trials={max_trials}",
            "--percentile=99",
            "-f",
            str(report),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if out.returncode != 0 or not report.exists():
            raise RuntimeError(
                f"perf_analyzer failed for {model} over {protocol} ({' '.join(load)}, b={batch}):\n"
                f"{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
            )
        return next(csv.DictReader(io.StringIO(report.read_text())))


def measure(
    binary: Path,
    url: str,
    protocol: str,
    model: str,
    data: Path,
    batch: int,
    concurrency: int,
    window_ms: int,
    stability_pct: float = 50.0,
    max_trials: int = 4,
) -> Point:
    row = run_perf_analyzer(
        binary,
        url,
        protocol,
        model,
        data,
        [f"--concurrency-range={concurrency}"],
        window_ms,
        stability_pct,
        max_trials,
        batch,
    )
    return Point(
        model,
        protocol,
        batch,
        concurrency,
        float(row["Inferences/Second"]),
        float(row["p50 latency"]) / 1000,
        float(row["p90 latency"]) / 1000,
        float(row["p99 latency"]) / 1000,
    )


# Instruction sets that change CPU inference speed severalfold (int8 dot products above all): shared
# VMs of one name differ in them, so reports name them.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8")


def machine() -> str:
    cpu, flags = platform.processor() or "unknown CPU", set()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags")))
    except (OSError, StopIteration):
        pass
    isa = ", ".join(f for f in ISA_FLAGS if f in flags) or "none of " + "/".join(ISA_FLAGS)
    system = f"{platform.system()} {platform.release()}"
    return f"{cpu} ({isa}), {os.cpu_count()} cores, {system}, Python {platform.python_version()}"


def write_reports(points: list[Point], out: Path, command: str, where: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "perf.csv"
    with open(raw, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(points[0])))
        writer.writeheader()
        writer.writerows(asdict(p) for p in points)
    lines = [
        f"# perf_analyzer: {where}",
        "",
        f"Machine: {machine()}.",
        f"Command: `{command}`.",
        "",
        "| model | protocol | batch | concurrency | inferences/s | p50 ms | p90 ms | p99 ms | p99/p50 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        lines.append(
            f"| {p.model} | {p.protocol} | {p.batch} | {p.concurrency} | {p.infer_per_s:.2f} | {p.p50_ms:.1f} | "
            f"{p.p90_ms:.1f} | {p.p99_ms:.1f} | {p.p99_ms / p.p50_ms:.2f} |"
        )
    (out / "perf.md").write_text("\n".join(lines) + "\n")
    written = [raw, out / "perf.md"]
    try:
        written.append(plot(points, out / "perf.png"))
    except ImportError:
        logger.warning("matplotlib is not installed (scripts/setup.sh --bench): no plot")
    return written


def plot(points: list[Point], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({p.model for p in points})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for protocol, batch in sorted({(p.protocol, p.batch) for p in points if p.model == model}):
            series = sorted(
                (p for p in points if (p.model, p.protocol, p.batch) == (model, protocol, batch)),
                key=lambda p: p.concurrency,
            )
            x = [p.infer_per_s for p in series]
            ax.plot(x, [p.p50_ms for p in series], "o-", label=f"{protocol} b{batch} p50")
            ax.plot(x, [p.p99_ms for p in series], "x--", label=f"{protocol} b{batch} p99")
            for p in series:
                ax.annotate(f"c{p.concurrency}", (p.infer_per_s, p.p99_ms), fontsize=7)
        ax.set(title=model, xlabel="inferences/s", ylabel="latency (ms)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grpc-url", help="a running server's gRPC host:port (default: start the embedded default)")
    p.add_argument("--http-url", help="a running server's HTTP host:port")
    p.add_argument("--models", nargs="+", choices=MODELS, default=["retrieve", "embed_post"])
    p.add_argument("--protocols", nargs="+", choices=("grpc", "http"), default=["grpc", "http"])
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--window-ms", type=int, default=10000)
    p.add_argument("--stability-pct", type=float, default=50.0, help="perf_analyzer's band for a stable measurement")
    p.add_argument("--max-trials", type=int, default=4, help="windows perf_analyzer may take to get stable")
    p.add_argument("--records", type=int, default=32, help="distinct records per model")
    p.add_argument(
        "--prompt-cache",
        action="store_true",
        help="embedded server: keep the encoder's prompt cache on (perf_analyzer cycles through few "
        "records, so with it on the numbers measure the cache, not the model)",
    )
    p.add_argument("--perf-analyzer", type=Path, default=perf_analyzer_binary())
    p.add_argument("--out", type=Path, default=Path("benchmarks/reports/perf"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    command = "python -m feedserve.clients.perf " + " ".join(argv if argv is not None else sys.argv[1:])
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if args.grpc_url is None:
            from feedserve.ops.launcher import TritonServer, on_free_ports
            from feedserve.triton.repository import RepositorySettings, write_repository

            repo = tmp / "repository"
            # A follower of the index (it writes nothing), so it can run beside a server that writes.
            write_repository(
                repo, RepositorySettings(encoder_cache_rows=10000 if args.prompt_cache else 0, index_writer=False)
            )
            server = stack.enter_context(TritonServer(on_free_ports(repository=repo)))
            urls = {"grpc": server.grpc_url, "http": server.http_url}
            where = f"the embedded default server (prompt cache {'on' if args.prompt_cache else 'off'})"
        else:
            urls, where = {"grpc": args.grpc_url, "http": args.http_url}, f"the server at {args.grpc_url}"
        points = []
        for model in args.models:
            data = tmp / f"{model}.json"
            data.write_text(json.dumps(movielens_input(model, args.records)))
            for protocol in args.protocols:
                if urls[protocol] is None:
                    raise SystemExit(f"--{protocol}-url is needed to measure over {protocol}")
                for batch in args.batch:
                    for concurrency in args.concurrency:
                        points.append(
                            measure(
                                args.perf_analyzer,
                                urls[protocol],
                                protocol,
                                model,
                                data,
                                batch,
                                concurrency,
                                args.window_ms,
                                args.stability_pct,
                                args.max_trials,
                            )
                        )
                        logger.info("%s", points[-1])
    for path in write_reports(points, args.out, command, where):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
