"""CPU speed of the default model, same inputs everywhere (issue 2's measurements).

1. encoder alone: prompts/s of ONNX Runtime and of PyTorch eager on the same token batches;
2. `embed_post` through Triton: prompts/s with the async gRPC batch client;
3. `retrieve` latency with perf_analyzer at concurrency 1 and 8 (p50/p99).

    .venv/bin/python -m benchmarks.speed_cpu [--posts 256] [--out benchmarks/reports]

Needs the default artifacts (`feedserve build`) and an index (the demo builds one).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import write_report
from feedserve.artifacts import ArtifactLayout, EncoderSettings, default_artifacts_dir
from feedserve.clients.perf import machine, perf_analyzer_binary, run_perf_analyzer
from feedserve.clients.perf_data import perf_input
from feedserve.ops.builder import SAMPLE_CORPUS

logger = logging.getLogger("benchmarks.speed_cpu")


def _rate(fn, batches, repeat: int = 1) -> float:  # type: ignore[no-untyped-def]
    fn(*batches[0])  # warm-up
    n = sum(len(b[0]) for b in batches) * repeat
    t = time.perf_counter()
    for _ in range(repeat):
        for ids, mask in batches:
            fn(ids, mask)
    return n / (time.perf_counter() - t)


def perf_analyzer(url: str, model: str, data: Path, concurrency: int, seconds: float = 20.0) -> dict[str, float]:
    row = run_perf_analyzer(
        perf_analyzer_binary(), url, "grpc", model, data, [f"--concurrency-range={concurrency}"], int(seconds * 1000)
    )
    return {
        "concurrency": concurrency,
        "infer_per_s": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1000,
        "p90_ms": float(row["p90 latency"]) / 1000,
        "p99_ms": float(row["p99 latency"]) / 1000,
    }


def render_markdown(r: dict[str, object]) -> str:
    lines = [
        "# CPU speed: default model (SmolLM2-135M, fp32)",
        "",
        f"Machine: {r['machine']}. Same {r['posts']} MovieLens post prompts everywhere "
        f"(mean {r['mean_prompt_tokens']:.0f} tokens, padded to {r['padded_tokens_per_prompt']:.0f}).",
        "Command: `.venv/bin/python -m benchmarks.speed_cpu --posts 128`",
        "",
        "| path | prompts/s |",
        "|---|---|",
        f"| encoder alone, ONNX Runtime (batch {r['batch']}) | {r['onnxruntime_prompts_per_s']:.2f} |",
        f"| encoder alone, PyTorch eager (batch {r['batch']}) | {r['pytorch_prompts_per_s']:.2f} |",
        f"| `embed_post` ensemble via Triton gRPC, 1 request of {r['batch']} in flight | {r['embed_post_prompts_per_s_c1']:.2f} |",
        f"| `embed_post` ensemble via Triton gRPC, 4 requests of 8 in flight | {r['embed_post_prompts_per_s_c4']:.2f} |",
        "",
        "`retrieve` (member record -> top-10), perf_analyzer over gRPC, batch 1, members with 5-60 liked movies:",
        "",
        "| concurrency | inferences/s | p50 ms | p90 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for row in r["retrieve"]:  # type: ignore[attr-defined]
        lines.append(
            f"| {row['concurrency']} | {row['infer_per_s']:.2f} | {row['p50_ms']:.0f} | {row['p90_ms']:.0f} | {row['p99_ms']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=default_artifacts_dir())
    parser.add_argument("--posts", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "reports")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from tokenizers import Tokenizer

    from feedserve.clients.batch import embed_records
    from feedserve.encode.ort import OnnxEncoder
    from feedserve.encode.pytorch import TorchEncoder
    from feedserve.ops.launcher import TritonServer, on_free_ports
    from feedserve.prompt.buckets import PercentileBuckets
    from feedserve.prompt.builder import PromptBuilder
    from feedserve.prompt.movielens import load_movielens
    from feedserve.triton.repository import write_repository

    layout = ArtifactLayout(args.artifacts)
    settings = EncoderSettings.load(layout.settings)
    builder = PromptBuilder(
        Tokenizer.from_file(str(layout.tokenizer)), PercentileBuckets.load(layout.buckets), settings
    )
    ml = load_movielens(SAMPLE_CORPUS)
    posts = sorted(ml.posts(), key=lambda p: -p.counts.get("ratings", 0))[: args.posts]
    batches = []
    for s in range(0, len(posts), args.batch):
        b = builder.encode_posts(posts[s : s + args.batch])
        batches.append((b.input_ids, b.attention_mask))
    tokens = sum(int(m.sum()) for _, m in batches)
    results: dict[str, object] = {
        "machine": machine(),
        "posts": len(posts),
        "batch": args.batch,
        "mean_prompt_tokens": tokens / len(posts),
        "padded_tokens_per_prompt": sum(i.size for i, _ in batches) / len(posts),
    }
    results["onnxruntime_prompts_per_s"] = _rate(OnnxEncoder(layout.onnx).encode, batches)
    results["pytorch_prompts_per_s"] = _rate(TorchEncoder(layout.hf_dir, settings).encode, batches)
    logger.info("encoder alone: %s", results)

    write_repository()
    opts = on_free_ports(artifacts=layout.root, log_file=layout.root.parent / "logs" / "bench-tritonserver.log")
    members = [m for m in ml.members() if 5 <= len(m.history) <= 60][:32]
    with TritonServer(opts) as server:
        embed_records(posts[:16], url=server.grpc_url, progress=False)  # warm-up
        for conc in (1, 4):
            t = time.perf_counter()
            embed_records(
                posts, url=server.grpc_url, batch_size=args.batch if conc == 1 else 8, concurrency=conc, progress=False
            )
            results[f"embed_post_prompts_per_s_c{conc}"] = len(posts) / (time.perf_counter() - t)
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "members.json"
            data.write_text(json.dumps(perf_input(members, k=10)))
            results["retrieve"] = [perf_analyzer(server.grpc_url, "retrieve", data, c) for c in (1, 8)]
    write_report(args.out, "speed_cpu", results, render_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
