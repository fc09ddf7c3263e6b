"""Step-by-step CPU tuning of the serving pipeline: what each setting buys, measured in one run.

Each server step starts the embedded default (prompt cache off, so the encoder runs every time) with
one change over the step before it, then measures with perf_analyzer over gRPC:
- `embed_post` at concurrency 8, batch 1: prompts/s at saturation, p50/p99;
- `retrieve` at concurrency 1 (p50: one member's latency) and 8 (retrievals/s, p50/p99).
Two client-side steps run against the last server: pre-tokenised requests (the client tokenises and
calls `encoder` directly, skipping `preprocess_post`) and binary vs JSON tensors over HTTP.

    .venv/bin/python -m benchmarks.tuning [--window-ms 8000] [--out benchmarks/reports]

Needs the default artifacts with the int8 graph (`feedserve build`) and an index (`make demo`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from benchmarks import write_report
from feedserve.artifacts import ArtifactLayout, EncoderSettings, default_artifacts_dir
from feedserve.clients.perf import machine, perf_analyzer_binary, run_perf_analyzer
from feedserve.clients.perf_data import movielens_input, token_input
from feedserve.ops.launcher import TritonServer, on_free_ports
from feedserve.schema import ModelName
from feedserve.triton.repository import RepositorySettings, render_configs, write_repository

logger = logging.getLogger("benchmarks.tuning")

CONCURRENCY = 8
RECORDS = 64  # distinct records cycled through by perf_analyzer


@dataclass
class Step:
    name: str
    settings: RepositorySettings


def server_steps() -> list[Step]:
    """Each step changes one thing over the one before; the last is what `feedserve render` ships."""
    s = RepositorySettings(
        encoder_cache_rows=0,
        index_writer=False,
        encoder_queue_delay_us=None,
        encoder_grouping="longest",
        encoder_precision="fp32",
    )
    steps = [Step("no dynamic batching, rows padded to the longest", s)]
    for name, change in [
        ("dynamic batching, no queue delay", {"encoder_queue_delay_us": 0}),
        ("queue delay 2 ms", {"encoder_queue_delay_us": 2000}),
        ("queue delay 10 ms", {"encoder_queue_delay_us": 10000}),
        (
            "queue delay 2 ms, preferred batch 4 and 8",
            {"encoder_queue_delay_us": 2000, "encoder_preferred_batch": (4, 8)},
        ),
        (
            "length buckets: each row padded to its bucket, one run per bucket",
            {"encoder_preferred_batch": (), "encoder_grouping": "buckets"},
        ),
        (
            "cost-based runs: each padded to its own longest row, cut where a run costs less than its padding",
            {"encoder_grouping": "cost"},
        ),
        ("2 encoder instances x 1 thread (was 1 x 2)", {"encoder_instances": 2, "encoder_threads": 1}),
        (
            "1 encoder instance again; 2 preprocess instances",
            {"encoder_instances": 1, "encoder_threads": 0, "preprocess_instances": 2},
        ),
        ("1 preprocess instance again; int8 encoder", {"preprocess_instances": 1, "encoder_precision": "int8"}),
    ]:
        s = replace(s, **change)  # type: ignore[arg-type]
        steps.append(Step(name, s))
    return steps


@dataclass
class Row:
    step: str
    changes: dict[str, object]
    measured: dict[str, float] = field(default_factory=dict)


def _pa(url: str, model: str, data: Path, concurrency: int, window_ms: int, protocol: str = "grpc") -> dict[str, float]:
    """perf_analyzer's numbers; when p99 will not settle within 50% over 5 windows (a config
    without batching queues unevenly), the band widens to 100% and the row says so."""
    load = [f"--concurrency-range={concurrency}"]
    for band in (50.0, 100.0):
        try:
            row = run_perf_analyzer(
                perf_analyzer_binary(), url, protocol, model, data, load, window_ms, band, max_trials=5
            )
            break
        except RuntimeError as err:
            if "stable" not in str(err) or band == 100.0:
                raise
            logger.warning("%s at concurrency %d did not settle within 50%%; widening the band", model, concurrency)
    return {
        "per_s": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1000,
        "p99_ms": float(row["p99 latency"]) / 1000,
        "band_pct": band,
    }


def _server(repo: Path, settings: RepositorySettings, log: Path) -> TritonServer:
    write_repository(repo, settings)
    return TritonServer(on_free_ports(repository=repo, log_file=log))


def measure_server(server: TritonServer, data: dict[str, Path], window_ms: int) -> dict[str, float]:
    post = _pa(server.grpc_url, "embed_post", data["embed_post"], CONCURRENCY, window_ms)
    one = _pa(server.grpc_url, "retrieve", data["retrieve"], 1, window_ms)
    many = _pa(server.grpc_url, "retrieve", data["retrieve"], CONCURRENCY, window_ms)
    return {
        "embed_post_per_s": post["per_s"],
        "embed_post_p50_ms": post["p50_ms"],
        "embed_post_p99_ms": post["p99_ms"],
        "retrieve_c1_p50_ms": one["p50_ms"],
        "retrieve_per_s": many["per_s"],
        "retrieve_p50_ms": many["p50_ms"],
        "retrieve_p99_ms": many["p99_ms"],
    }


def tokenised_data(layout: ArtifactLayout, out: Path) -> Path:
    """The same posts as embed_post's input, tokenised by the client with the server's prompt builder."""
    from tokenizers import Tokenizer

    from feedserve.ops.builder import SAMPLE_CORPUS
    from feedserve.prompt.buckets import PercentileBuckets
    from feedserve.prompt.builder import PromptBuilder
    from feedserve.prompt.movielens import load_movielens

    builder = PromptBuilder(
        Tokenizer.from_file(str(layout.tokenizer)),
        PercentileBuckets.load(layout.buckets),
        EncoderSettings.load(layout.settings),
    )
    batch = builder.encode_posts(load_movielens(SAMPLE_CORPUS).posts()[:RECORDS])
    out.write_text(json.dumps(token_input(batch.input_ids, batch.attention_mask)))
    return out


def grouping_in_process(
    layout: ArtifactLayout, batch: int = 8, batches: int = 24, seed: int = 0
) -> dict[str, dict[str, float]]:
    """The three groupings on the same batches of MovieLens post prompts, with the encoder alone
    (no server, so no queueing noise): padded tokens computed, runs, and ms per batch, fp32 and int8."""
    from tokenizers import Tokenizer

    from feedserve.encode.ort import OnnxEncoder
    from feedserve.ops.builder import SAMPLE_CORPUS
    from feedserve.prompt.buckets import PercentileBuckets
    from feedserve.prompt.builder import PromptBuilder
    from feedserve.prompt.movielens import load_movielens
    from feedserve.triton.encoder import GROUPINGS, padded_runs

    settings = EncoderSettings.load(layout.settings)
    builder = PromptBuilder(
        Tokenizer.from_file(str(layout.tokenizer)), PercentileBuckets.load(layout.buckets), settings
    )
    movielens = load_movielens(SAMPLE_CORPUS)
    posts = movielens.posts()
    members = [m for m in movielens.members() if 5 <= len(m.history) <= 60][:64]
    tokenise_ms = {}
    for kind, encode, records in (
        ("post", builder.encode_posts, posts[:256]),
        ("member", builder.encode_members, members),
    ):
        start = time.perf_counter()
        for record in records:
            encode([record])  # type: ignore[list-item]
        tokenise_ms[kind] = (time.perf_counter() - start) / len(records) * 1000
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batches):
        tokens = builder.encode_posts([posts[i] for i in rng.choice(len(posts), batch, replace=False)])
        rows.append([ids[: int(m.sum())] for ids, m in zip(tokens.input_ids, tokens.attention_mask, strict=True)])
    # Runs of at most the served encoder's max_rows_per_run, as in the server.
    max_rows = int(render_configs()[ModelName.ENCODER].parameters["max_rows_per_run"].string_value)
    out: dict[str, dict[str, float]] = {"prompt_and_tokens_ms": tokenise_ms}
    for precision, graph in (("fp32", layout.onnx), ("int8", layout.onnx_int8)):
        encoder = OnnxEncoder(graph)
        for grouping in GROUPINGS:
            padded = [padded_runs(batch_rows, max_rows, grouping, settings.length_buckets) for batch_rows in rows]
            encoder.encode(*padded[0][0][1:])  # warm-up
            start = time.perf_counter()
            for runs in padded:
                for _, ids, mask in runs:
                    encoder.encode(ids, mask)
            ms = (time.perf_counter() - start) / len(padded) * 1000
            out[f"{precision}_{grouping}"] = {
                "ms_per_batch": ms,
                "prompts_per_s": batch / ms * 1000,
                "runs_per_batch": sum(len(runs) for runs in padded) / len(padded),
                "padded_tokens_per_batch": sum(ids.size for runs in padded for _, ids, _ in runs) / len(padded),
                "real_tokens_per_batch": sum(len(r) for b in rows for r in b) / len(rows),
            }
            logger.info("%s %s: %s", precision, grouping, out[f"{precision}_{grouping}"])
    return out


def http_transfer(server: TritonServer, batch: int = 32, rounds: int = 6) -> dict[str, float]:
    """embed_post over HTTP with `batch` records per request: JSON tensors vs the binary extension,
    for the request and the response alike. Prompts/s and ms per request, best of two passes."""
    import tritonclient.http as http

    from feedserve.ops.builder import SAMPLE_CORPUS
    from feedserve.prompt.movielens import load_movielens

    posts = load_movielens(SAMPLE_CORPUS).posts()[:batch]
    records = np.array([[p.model_dump_json(exclude_none=True).encode()] for p in posts], dtype=object)
    result: dict[str, float] = {}
    with http.InferenceServerClient(server.http_url, network_timeout=120) as client:
        for binary in (False, True, False, True):
            inp = http.InferInput("RECORDS", list(records.shape), "BYTES")
            inp.set_data_from_numpy(records, binary_data=binary)
            out = http.InferRequestedOutput("EMBEDDING", binary_data=binary)
            client.infer("embed_post", [inp], outputs=[out])  # warm-up
            start = time.perf_counter()
            for _ in range(rounds):
                assert client.infer("embed_post", [inp], outputs=[out]).as_numpy("EMBEDDING").shape[0] == batch
            ms = (time.perf_counter() - start) / rounds * 1000
            key = "binary" if binary else "json"
            result[f"{key}_ms"] = min(ms, result.get(f"{key}_ms", ms))
    for key in ("json", "binary"):
        result[f"{key}_per_s"] = batch / result[f"{key}_ms"] * 1000
    return result


def render_markdown(report: dict[str, object]) -> str:
    rows: list[dict[str, object]] = report["steps"]  # type: ignore[assignment]
    lines = [
        "# CPU tuning, step by step",
        "",
        f"Machine: {report['machine']}. Model: the default (fine-tuned SmolLM2, 6 layers), prompt cache off, "
        f"index of {report['index_posts']} posts. perf_analyzer over gRPC, batch 1, {report['window_ms'] / 1000:.0f} s "
        f"windows; `embed_post` and `retrieve` at concurrency {CONCURRENCY}, `retrieve` also at concurrency 1.",
        f"Command: `{report['command']}`.",
        "",
        "Each step changes one thing over the step above it.",
        "",
        "| # | step | embed_post prompts/s | embed_post p50 / p99 ms | retrieve c1 p50 ms | retrieve/s c8 | retrieve p50 / p99 ms c8 |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        m = r["measured"]  # type: ignore[index]
        lines.append(
            f"| {i} | {r['step']} | {m['embed_post_per_s']:.1f} | {m['embed_post_p50_ms']:.0f} / {m['embed_post_p99_ms']:.0f} | "
            f"{m['retrieve_c1_p50_ms']:.0f} | {m['retrieve_per_s']:.1f} | {m['retrieve_p50_ms']:.0f} / {m['retrieve_p99_ms']:.0f} |"
        )
    c = report["client"]  # type: ignore[index]
    lines += [
        "",
        "## Client side (against the last server)",
        "",
        "| what | prompts/s | p50 / p99 ms |",
        "|---|---|---|",
        f"| `embed_post`: JSON records, preprocessed by the server | {c['records']['per_s']:.1f} | "
        f"{c['records']['p50_ms']:.0f} / {c['records']['p99_ms']:.0f} |",
        f"| `encoder`: the client tokenises and sends token ids | {c['tokens']['per_s']:.1f} | "
        f"{c['tokens']['p50_ms']:.0f} / {c['tokens']['p99_ms']:.0f} |",
        "",
        f"HTTP, `embed_post` with {c['http']['batch']} records per request: JSON tensors {c['http']['json_ms']:.0f} ms "
        f"per request ({c['http']['json_per_s']:.1f} prompts/s), binary tensors {c['http']['binary_ms']:.0f} ms "
        f"({c['http']['binary_per_s']:.1f} prompts/s).",
        "",
    ]
    if "grouping" in report:
        g: dict[str, dict[str, float]] = report["grouping"]  # type: ignore[assignment]
        any_row = g["fp32_cost"]
        lines += [
            "## Grouping, in-process",
            "",
            f"The encoder alone (no server, no queueing) on the same batches of 8 random MovieLens post prompts "
            f"({any_row['real_tokens_per_batch']:.0f} real tokens per batch on average)"
            + (f"; command `{report['grouping_command']}`" if "grouping_command" in report else "")
            + (f"; machine: {report['grouping_machine']}" if "grouping_machine" in report else "")
            + ".",
            "",
            "| graph | grouping | runs per batch | padded tokens per batch | ms per batch | prompts/s |",
            "|---|---|---|---|---|---|",
        ]
        for key, row in g.items():
            if key == "prompt_and_tokens_ms":
                continue
            precision, grouping = key.split("_", 1)
            lines.append(
                f"| {precision} | {grouping} | {row['runs_per_batch']:.2f} | {row['padded_tokens_per_batch']:.0f} | "
                f"{row['ms_per_batch']:.1f} | {row['prompts_per_s']:.1f} |"
            )
        if "prompt_and_tokens_ms" in g:
            t = g["prompt_and_tokens_ms"]
            lines += [
                "",
                f"Building and tokenising one prompt (what `preprocess_*` does per record): post "
                f"{t['post']:.2f} ms, member (5-60 engaged posts) {t['member']:.2f} ms.",
            ]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--window-ms", type=int, default=8000)
    p.add_argument("--steps", type=int, nargs="*", help="only these server steps (1-based), for a quick look")
    p.add_argument("--out", type=Path, default=Path("benchmarks/reports"))
    p.add_argument(
        "--grouping-only",
        action="store_true",
        help="re-measure only the in-process grouping table and keep the rest of the saved report",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    layout = ArtifactLayout(default_artifacts_dir())
    if not layout.index.exists() or not layout.onnx_int8.exists():
        raise SystemExit("needs the default artifacts with encoder.int8.onnx and an index: run `make demo` first")
    from feedserve.index.store import PostIndex

    if args.grouping_only:
        report = json.loads((args.out / "tuning.json").read_text())
        report["grouping"] = grouping_in_process(layout)
        report["grouping_command"] = "python -m benchmarks.tuning " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        report["grouping_machine"] = machine()
        return _write(report, args.out)
    report: dict[str, object] = {
        "machine": machine(),
        "window_ms": args.window_ms,
        "index_posts": len(PostIndex.load(layout.index)),
        "command": "python -m benchmarks.tuning " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    defaults = asdict(RepositorySettings())
    steps = server_steps()
    chosen = [steps[i - 1] for i in args.steps] if args.steps else steps
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        data = {}
        for model in ("embed_post", "retrieve"):
            data[model] = tmp / f"{model}.json"
            data[model].write_text(json.dumps(movielens_input(model, RECORDS)))
        for i, step in enumerate(chosen):
            changes = {k: v for k, v in asdict(step.settings).items() if v != defaults[k]}
            logger.info("step %d: %s %s", i + 1, step.name, changes)
            with _server(tmp / f"repo{i}", step.settings, tmp / f"server{i}.log") as server:
                rows.append(Row(step.name, changes, measure_server(server, data, args.window_ms)))
            logger.info("%s", rows[-1].measured)
        with _server(tmp / "repo-client", chosen[-1].settings, tmp / "server-client.log") as last:
            tokens = tokenised_data(layout, tmp / "encoder.json")
            report["client"] = {
                "records": _pa(last.grpc_url, "embed_post", data["embed_post"], CONCURRENCY, args.window_ms),
                "tokens": _pa(last.grpc_url, "encoder", tokens, CONCURRENCY, args.window_ms),
                "http": {"batch": 32, **http_transfer(last)},
            }
    report["steps"] = [asdict(r) for r in rows]
    report["grouping"] = grouping_in_process(layout)
    return _write(report, args.out)


def _write(report: dict[str, object], out: Path) -> int:
    write_report(out, "tuning", report, render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
