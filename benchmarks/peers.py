"""Peers measured side by side on this machine, and how cost grows (issue 6).

    .venv/bin/python -m benchmarks.peers [--posts 128] [--sizes 10000 100000 1000000] [--out benchmarks/reports]

1. Encoders, on the same MovieLens post prompts and the same checkpoint (`artifacts/default/hf`):
   transformers in-process (AutoTokenizer + AutoModel, batches padded to their longest prompt, mean
   pooling: what a user would write), sentence-transformers over the same checkpoint (Transformer +
   mean Pooling + Normalize), the feedserve encoder alone (ONNX Runtime on the prompt library's
   length-bucketed token batches), and the `embed_post` ensemble through Triton at saturation
   (records in, embeddings out: JSON parsing, prompts, tokenising, encoder); both feedserve rows
   again with the int8 graph when `feedserve build` wrote one. The embeddings are compared, so the
   rows are known to compute the same thing (int8: nearly).
2. Exact kNN over N x 256 float32, k=100: the served `PostIndex`, faiss (IndexFlatIP), NumPy
   (matmul + argpartition), and
   hnswlib (HNSW, the smallest ef reaching recall@100 >= 0.99 against the exact answer, i.e. the
   closest an approximate index gets to equal recall); batch 1 and 64. The bound for batch 1 is one
   read of the vectors at this machine's measured read bandwidth.
3. Cost curves: `retrieve` latency through Triton as the index grows (the default model's
   dimension, random unit vectors as posts, real MovieLens members), and the encoder's latency for
   one prompt of 64 to 1,024 tokens.

Needs the default artifacts (`feedserve build`) and the benchmark requirements (`make bench`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks import write_report
from feedserve.artifacts import ArtifactLayout, EncoderSettings, default_artifacts_dir
from feedserve.clients.perf import machine

logger = logging.getLogger("benchmarks.peers")

K = 100


def _timed(fn: Callable[[], object], repeat: int) -> float:
    """Seconds per call, after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


# --- 1. encoders ----------------------------------------------------------------------------------


def encoder_peers(layout: ArtifactLayout, n_posts: int, batch: int) -> dict[str, object]:
    import torch
    from sentence_transformers import SentenceTransformer, models
    from tokenizers import Tokenizer
    from transformers import AutoModel, AutoTokenizer

    from feedserve.clients.batch import embed_records
    from feedserve.encode.ort import OnnxEncoder
    from feedserve.ops.builder import SAMPLE_CORPUS
    from feedserve.ops.launcher import TritonServer, on_free_ports
    from feedserve.prompt.buckets import PercentileBuckets
    from feedserve.prompt.builder import PromptBuilder, TokenBatch
    from feedserve.prompt.movielens import load_movielens
    from feedserve.schema import ModelName
    from feedserve.triton.encoder import padded_runs
    from feedserve.triton.repository import RepositorySettings, render_configs, write_repository

    settings = EncoderSettings.load(layout.settings)
    builder = PromptBuilder(
        Tokenizer.from_file(str(layout.tokenizer)), PercentileBuckets.load(layout.buckets), settings
    )
    posts = sorted(load_movielens(SAMPLE_CORPUS).posts(), key=lambda p: -p.counts.get("ratings", 0))[:n_posts]
    prompts = [builder.post_prompt(p) for p in posts]
    chunks = [slice(s, s + batch) for s in range(0, len(posts), batch)]
    out: dict[str, object] = {"posts": len(posts), "batch": batch, "threads": torch.get_num_threads()}

    tokenizer = AutoTokenizer.from_pretrained(layout.hf_dir)
    model = AutoModel.from_pretrained(layout.hf_dir, torch_dtype=torch.float32).eval()

    def transformers_embed() -> np.ndarray:
        rows = []
        with torch.inference_mode():
            for c in chunks:
                enc = tokenizer(
                    prompts[c],
                    padding=True,
                    truncation=True,
                    max_length=settings.max_prompt_tokens,
                    return_tensors="pt",
                )
                hidden = model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1)
                rows.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(rows)

    transformers_embed()  # warm-up, as every row gets
    start = time.perf_counter()
    reference = transformers_embed()
    out["transformers_prompts_per_s"] = len(posts) / (time.perf_counter() - start)
    out["padded_tokens_transformers"] = sum(
        int(
            tokenizer(
                prompts[c], padding=True, truncation=True, max_length=settings.max_prompt_tokens, return_tensors="np"
            )["input_ids"].size
        )
        for c in chunks
    )

    transformer = models.Transformer(str(layout.hf_dir), max_seq_length=settings.max_prompt_tokens)
    st = SentenceTransformer(
        modules=[transformer, models.Pooling(transformer.get_word_embedding_dimension(), "mean"), models.Normalize()],
        device="cpu",
    )
    st.encode(prompts[:batch], batch_size=batch, show_progress_bar=False)  # warm-up
    start = time.perf_counter()
    st_vectors = st.encode(prompts, batch_size=batch, convert_to_numpy=True, show_progress_bar=False)
    out["sentence_transformers_prompts_per_s"] = len(posts) / (time.perf_counter() - start)

    # The encoder alone gets the runs the served encoder makes of each batch (feedserve.triton.encoder),
    # with the rendered encoder's settings.
    served = render_configs()[ModelName.ENCODER].parameters
    max_rows, grouping = int(served["max_rows_per_run"].string_value), served["grouping"].string_value
    batches, order = [], []
    for c in chunks:
        tokens = builder.tokenize(prompts[c])
        rows = [ids[: int(m.sum())] for ids, m in zip(tokens.input_ids, tokens.attention_mask, strict=True)]
        for group, ids, mask in padded_runs(rows, max_rows, grouping):
            batches.append(TokenBatch(ids, mask))
            order += [c.start + i for i in group]
    out["padded_tokens_feedserve"] = sum(int(b.input_ids.size) for b in batches)
    in_prompt_order = np.argsort(order)
    graphs = {"": layout.onnx, "int8_": layout.onnx_int8} if layout.onnx_int8.exists() else {"": layout.onnx}
    vectors = {"sentence_transformers": st_vectors}
    for tag, graph in graphs.items():
        encoder = OnnxEncoder(graph)
        encoder.encode(batches[0].input_ids, batches[0].attention_mask)
        start = time.perf_counter()
        vectors[f"{tag}encoder_alone"] = np.concatenate(
            [encoder.encode(b.input_ids, b.attention_mask) for b in batches]
        )[in_prompt_order]
        out[f"{tag}encoder_alone_prompts_per_s"] = len(posts) / (time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as tmp:
            repository = Path(tmp) / "repository"
            write_repository(
                repository,
                RepositorySettings(
                    encoder_cache_rows=0, index_writer=False, encoder_precision="int8" if tag else "fp32"
                ),
            )
            opts = on_free_ports(repository=repository, artifacts=layout.root, log_file=Path(tmp) / "tritonserver.log")
            with TritonServer(opts) as server:
                embed_records(posts[:16], url=server.grpc_url, progress=False)  # warm-up
                start = time.perf_counter()
                vectors[f"{tag}pipeline"] = embed_records(
                    posts, url=server.grpc_url, batch_size=8, concurrency=4, progress=False
                )
                out[f"{tag}pipeline_prompts_per_s"] = len(posts) / (time.perf_counter() - start)

    def agreement(a: np.ndarray) -> float:
        return float(np.min(np.sum(a * reference, axis=1)))

    out["min_cosine_to_transformers"] = {name: agreement(v) for name, v in vectors.items()}
    return out


# --- 2. kNN -----------------------------------------------------------------------------------------


def read_bandwidth_gb_s() -> float:
    """The best of a NumPy and a multi-threaded torch reduction over 1 GiB: bytes read per second."""
    import torch

    x = np.ones(1 << 28, np.float32)
    t = torch.from_numpy(x)
    best = min(_timed(lambda: x.sum(), 5), _timed(lambda: t.sum(), 5))
    return x.nbytes / best / 1e9


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Random unit vectors, drawn in float32 (10M x 256 is 10 GB, not 20)."""
    v = rng.standard_normal((n, dim), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def knn_peers(sizes: list[int], dim: int, hnsw_max: int) -> dict[str, object]:
    import faiss
    import hnswlib

    from feedserve.index.store import PostIndex

    rng = np.random.default_rng(0)
    bandwidth = read_bandwidth_gb_s()
    rows = []
    for n in sizes:
        x = unit_vectors(rng, n, dim)
        queries = x[rng.choice(n, 64, replace=False)] + 0.1 * unit_vectors(rng, 64, dim)
        one = queries[:1]
        flat = faiss.IndexFlatIP(dim)
        flat.add(x)
        exact = flat.search(queries, K)[1]

        def numpy_search(q: np.ndarray) -> np.ndarray:
            scores = q @ x.T
            top = np.argpartition(-scores, K, axis=1)[:, :K]
            return np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1), axis=1)

        repeat = max(3, int(2e8 / (n * dim)))
        row: dict[str, object] = {
            "n": n,
            "gb": x.nbytes / 1e9,
            "bound_ms": x.nbytes / bandwidth / 1e6,
            "faiss_b1_ms": _timed(lambda: flat.search(one, K), repeat) * 1e3,
            "faiss_b64_ms": _timed(lambda: flat.search(queries, K), max(1, repeat // 8)) * 1e3,
            "numpy_b1_ms": _timed(lambda: numpy_search(one), repeat) * 1e3,
            "numpy_b64_ms": _timed(lambda: numpy_search(queries), max(1, repeat // 8)) * 1e3,
            "numpy_recall": _recall(numpy_search(queries), exact),
        }
        served = PostIndex(dim)  # what the knn model runs (faiss storage, searched by matmul)
        served.upsert(np.arange(n), x)
        row["feedserve_b1_ms"] = _timed(lambda: served.search(one, [K]), repeat) * 1e3
        row["feedserve_b64_ms"] = _timed(lambda: served.search(queries, [K] * len(queries)), max(1, repeat // 8)) * 1e3
        row["feedserve_recall"] = _recall(np.stack([r.ids for r in served.search(queries, [K] * len(queries))]), exact)
        if n <= hnsw_max:
            hnsw = hnswlib.Index("ip", dim)
            hnsw.init_index(n, M=16, ef_construction=200, random_seed=0)
            hnsw.set_num_threads(os.cpu_count() or 1)
            start = time.perf_counter()
            hnsw.add_items(x, np.arange(n))
            row["hnsw_build_s"] = time.perf_counter() - start
            for ef in (100, 200, 400, 800, 1600):
                hnsw.set_ef(ef)
                recall = _recall(hnsw.knn_query(queries, K)[0], exact)
                if recall >= 0.99 or ef == 1600:
                    break
            row.update(
                {
                    "hnsw_ef": ef,
                    "hnsw_recall": recall,
                    "hnsw_b1_ms": _timed(lambda: hnsw.knn_query(one, K), repeat) * 1e3,
                    "hnsw_b64_ms": _timed(lambda: hnsw.knn_query(queries, K), max(1, repeat // 8)) * 1e3,
                }
            )
        logger.info("knn %s", row)
        rows.append(row)
    return {"dim": dim, "k": K, "read_bandwidth_gb_s": bandwidth, "rows": rows}


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(e.tolist())) / len(e) for f, e in zip(found, exact, strict=True)]))


# --- 3. cost curves -----------------------------------------------------------------------------------


def retrieve_curve(layout: ArtifactLayout, sizes: list[int], n_members: int) -> list[dict[str, float]]:
    """`retrieve` latency, one request at a time, with N random unit vectors as the posts (the served
    dimension) and real MovieLens members; the prompt cache is off, so every member is encoded."""
    from benchmarks.freshness import scratch_artifacts
    from feedserve.clients.batch import build_index
    from feedserve.clients.online import FeedClient
    from feedserve.ops.builder import SAMPLE_CORPUS
    from feedserve.ops.launcher import TritonServer, on_free_ports
    from feedserve.prompt.movielens import load_movielens
    from feedserve.triton.repository import RepositorySettings, write_repository

    members = [m for m in load_movielens(SAMPLE_CORPUS).members() if 5 <= len(m.history) <= 60][:n_members]
    dim = layout.serving_dim()
    rng = np.random.default_rng(1)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = scratch_artifacts(layout, Path(tmp) / "artifacts")
        repository = Path(tmp) / "repository"
        write_repository(repository, RepositorySettings(encoder_cache_rows=0, index_writer=False))
        build_index(np.arange(sizes[0]), unit_vectors(rng, sizes[0], dim), scratch.index)
        opts = on_free_ports(repository=repository, artifacts=scratch.root, log_file=Path(tmp) / "tritonserver.log")
        with TritonServer(opts) as server, FeedClient(server.grpc_url, "grpc", timeout_s=300) as client:
            for i, n in enumerate(sizes):
                if i:  # a rebuild: knn loads it whole before its next search
                    build_index(np.arange(n), unit_vectors(rng, n, dim), scratch.index)
                client.retrieve(members[0], k=10)
                latencies = []
                for member in members:
                    start = time.perf_counter()
                    client.retrieve(member, k=10)
                    latencies.append((time.perf_counter() - start) * 1e3)
                out.append(
                    {
                        "posts": n,
                        "p50_ms": float(np.percentile(latencies, 50)),
                        "p99_ms": float(np.percentile(latencies, 99)),
                    }
                )
                logger.info("retrieve over %d posts: %s", n, out[-1])
    return out


def prompt_length_curve(layout: ArtifactLayout, lengths: list[int]) -> list[dict[str, float]]:
    """The encoder alone (ONNX Runtime), one prompt of each length: the cost of a longer member history."""
    from feedserve.encode.ort import OnnxEncoder

    encoder = OnnxEncoder(layout.onnx)
    rng = np.random.default_rng(0)
    out = []
    for length in lengths:
        ids = rng.integers(100, 40000, (1, length), dtype=np.int64)
        mask = np.ones_like(ids)
        out.append({"tokens": length, "ms": _timed(lambda: encoder.encode(ids, mask), 5) * 1e3})
        logger.info("encoder, %d tokens: %.1f ms", length, out[-1]["ms"])
    return out


# --- report -------------------------------------------------------------------------------------------


def markdown(r: dict) -> str:
    e, kn = r["encoders"], r["knn"]
    base = e["transformers_prompts_per_s"]
    lines = [
        "# Peers and cost curves (2-core CPU)",
        "",
        "Each section was measured by its own command, on the machine named beside it "
        "(absolute speeds differ between these shared VMs; compare within a section):",
        "",
        *[
            f"- {name}: `{cmd}` on {r.get('machines', {}).get(name, r['machine'])}"
            for name, cmd in r.get("commands", {"all": r["command"]}).items()
        ],
        "",
        f"## Encoders: the same {e['posts']} MovieLens post prompts, the same checkpoint, batches of {e['batch']}",
        "",
        "| path | prompts/s | x transformers | min cosine to transformers |",
        "|---|---|---|---|",
        f"| transformers in-process (pad to longest, {e['padded_tokens_transformers']} padded tokens) | {base:.2f} | 1.00 | 1 |",
    ]
    for key, label in [
        ("sentence_transformers", "sentence-transformers in-process"),
        ("encoder_alone", f"feedserve encoder alone, ONNX Runtime ({e['padded_tokens_feedserve']} padded tokens)"),
        ("pipeline", "feedserve `embed_post` through Triton (gRPC, 4 x 8 in flight)"),
        ("int8_encoder_alone", "feedserve encoder alone, int8 graph"),
        ("int8_pipeline", "feedserve `embed_post` through Triton, int8 graph (the default render)"),
    ]:
        if f"{key}_prompts_per_s" not in e:
            continue
        rate = e[f"{key}_prompts_per_s"]
        lines.append(f"| {label} | {rate:.2f} | {rate / base:.2f} | {e['min_cosine_to_transformers'][key]:.5f} |")
    lines += [
        "",
        f"Targets: `embed_post` at least 90% of the encoder alone: {e['pipeline_prompts_per_s'] / e['encoder_alone_prompts_per_s']:.0%}"
        + (
            f" (int8: {e['int8_pipeline_prompts_per_s'] / e['int8_encoder_alone_prompts_per_s']:.0%})"
            if "int8_pipeline_prompts_per_s" in e
            else ""
        )
        + f"; the pipeline at least 1.5x in-process transformers: {e['pipeline_prompts_per_s'] / base:.2f}x"
        + (f" (int8: {e['int8_pipeline_prompts_per_s'] / base:.2f}x)" if "int8_pipeline_prompts_per_s" in e else "")
        + ".",
        "",
        f"## Exact kNN, {kn['dim']} dims float32, k={kn['k']} (read bandwidth measured: {kn['read_bandwidth_gb_s']:.1f} GB/s)",
        "",
        "| posts | bound ms | feedserve index b1 ms | x bound | faiss b1 ms | x bound | NumPy b1 ms | hnswlib b1 ms (ef, recall) | feedserve b64 ms | faiss b64 ms | NumPy b64 ms | hnswlib b64 ms | hnswlib build s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in kn["rows"]:
        hnsw = (
            (
                f"{row['hnsw_b1_ms']:.2f} ({row['hnsw_ef']}, {row['hnsw_recall']:.3f})",
                f"{row['hnsw_b64_ms']:.1f}",
                f"{row['hnsw_build_s']:.0f}",
            )
            if "hnsw_ef" in row
            else ("not built", "-", "-")
        )
        lines.append(
            f"| {row['n']:,} | {row['bound_ms']:.2f} | {row['feedserve_b1_ms']:.2f} | {row['feedserve_b1_ms'] / row['bound_ms']:.2f} | "
            f"{row['faiss_b1_ms']:.2f} | {row['faiss_b1_ms'] / row['bound_ms']:.2f} | {row['numpy_b1_ms']:.2f} | {hnsw[0]} | "
            f"{row['feedserve_b64_ms']:.1f} | {row['faiss_b64_ms']:.1f} | {row['numpy_b64_ms']:.1f} | {hnsw[1]} | {hnsw[2]} |"
        )
    lines += [
        "",
        "feedserve index: the `knn` model's `PostIndex` (faiss storage searched by one BLAS matmul and a partial sort, "
        "exclusions included); its recall against faiss: "
        + ", ".join(f"{row['feedserve_recall']:.4f}" for row in kn["rows"])
        + ".",
    ]
    lines += [
        "",
        "## Cost curves",
        "",
        "`retrieve` through Triton, one request at a time (members encoded every time):",
        "",
        "| posts in the index | p50 ms | p99 ms |",
        "|---|---|---|",
    ]
    lines += [f"| {c['posts']:,} | {c['p50_ms']:.0f} | {c['p99_ms']:.0f} |" for c in r["retrieve_curve"]]
    lines += ["", "Encoder alone (ONNX Runtime), one prompt:", "", "| tokens | ms |", "|---|---|"]
    lines += [f"| {c['tokens']} | {c['ms']:.0f} |" for c in r["prompt_curve"]]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    rows = r["knn"]["rows"]
    n = [row["n"] for row in rows]
    for key, label in [
        ("feedserve_b1_ms", "feedserve index"),
        ("faiss_b1_ms", "faiss"),
        ("numpy_b1_ms", "NumPy"),
        ("bound_ms", "bandwidth bound"),
    ]:
        axes[0].loglog(n, [row[key] for row in rows], marker="o", label=label)
    hn = [row for row in rows if "hnsw_b1_ms" in row]
    if hn:
        axes[0].loglog(
            [row["n"] for row in hn], [row["hnsw_b1_ms"] for row in hn], marker="o", label="hnswlib (recall>=0.99)"
        )
    axes[0].set(title=f"kNN batch 1, {r['knn']['dim']} dims, k={r['knn']['k']}", xlabel="posts", ylabel="ms")
    axes[0].legend()
    curve = r["retrieve_curve"]
    axes[1].semilogx([c["posts"] for c in curve], [c["p50_ms"] for c in curve], marker="o", label="p50")
    axes[1].semilogx([c["posts"] for c in curve], [c["p99_ms"] for c in curve], marker="o", label="p99")
    axes[1].set(title="retrieve through Triton", xlabel="posts in the index", ylabel="ms")
    axes[1].legend()
    prompt = r["prompt_curve"]
    axes[2].plot([c["tokens"] for c in prompt], [c["ms"] for c in prompt], marker="o")
    axes[2].set(title="encoder, one prompt", xlabel="tokens", ylabel="ms")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


SECTIONS = ("encoders", "knn", "retrieve_curve", "prompt_curve")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=default_artifacts_dir())
    p.add_argument("--posts", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument(
        "--hnsw-max",
        type=int,
        default=100_000,
        help="largest index hnswlib is built for (its build is slow on 2 cores)",
    )
    p.add_argument("--members", type=int, default=30, help="members per point of the retrieve curve")
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "reports")
    p.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="re-run only these; the others are kept from the saved report, with the command that measured them",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    layout = ArtifactLayout(args.artifacts)
    command = "python -m benchmarks.peers " + " ".join(argv if argv is not None else sys.argv[1:])
    saved = args.out / "peers.json"
    report = json.loads(saved.read_text()) if set(args.sections) != set(SECTIONS) and saved.exists() else {}
    runs = {name: report.get("commands", {}).get(name, report.get("command")) for name in SECTIONS}
    machines = {name: report.get("machines", {}).get(name, report.get("machine")) for name in SECTIONS}
    measure = {
        "encoders": lambda: encoder_peers(layout, args.posts, args.batch),
        "knn": lambda: knn_peers(args.sizes, 256, args.hnsw_max),
        "retrieve_curve": lambda: retrieve_curve(layout, args.sizes, args.members),
        "prompt_curve": lambda: prompt_length_curve(layout, args.lengths),
    }
    for name in args.sections:
        report[name] = measure[name]()
        runs[name] = f"{command} ({time.strftime('%Y-%m-%d')})"
        machines[name] = machine()
    report.update(command=command, machine=machine(), commands=runs, machines=machines)
    write_report(args.out, "peers", report, markdown(report))
    plot(report, args.out / "peers.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
