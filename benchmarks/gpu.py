"""GPU speed: the encoder (PyTorch eager bf16 vs the optimised path) and exact kNN over 1M and 10M
posts, each against its hardware bound.

    python -m benchmarks.gpu --config CONFIG.json --out benchmarks/reports   # on a CUDA machine

Encoder: the default model's architecture (CONFIG: an HF config.json, e.g. artifacts/default/hf)
with random weights (speed does not depend on their values), right-padded batches of B x T real
tokens. Model FLOPs per forward = 2 x (linear weights) x tokens + the causal half of attention's
2 x 2 x B x T^2 x hidden per layer; MFU is that over the time, against the GPU's dense bf16 peak
(the datasheet's, and a large matmul's measured one, both reported).

kNN: unit vectors in fp16 on the device; the bound is the time to read the index once at the
bandwidth a device-to-device copy reaches (bytes read + written per second).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import write_report
from feedserve.index.torch_engine import TorchFlatIndex

logger = logging.getLogger(__name__)

# Dense bf16 tensor-core peak from NVIDIA's datasheets (SXM parts), TFLOP/s.
DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.05}


def cuda_time(fn: Callable[[], object], repeat: int = 30, warmup: int = 5) -> float:
    """Median seconds per call, synchronised."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measured_peaks() -> dict[str, float]:
    n = 8192
    a, b = (
        torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
        torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
    )
    matmul = cuda_time(lambda: a @ b, repeat=10)
    buf = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")  # 1 GiB
    dst = torch.empty_like(buf)
    copy = cuda_time(lambda: dst.copy_(buf), repeat=20)
    return {"bf16_matmul_tflops": 2 * n**3 / matmul / 1e12, "copy_gb_per_s": 2 * buf.numel() / copy / 1e9}


def model_flops(config: dict, batch: int, tokens: int) -> float:
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    attention = layers * 2 * 2 * batch * tokens * tokens * h / 2
    return 2 * linear * batch * tokens + attention


def bench_encoder(config_path: Path, batch: int, tokens: int, peak: float) -> list[dict[str, object]]:
    from transformers import LlamaConfig, LlamaModel

    from feedserve.encode.pytorch import EmbeddingModel

    config = json.loads(config_path.read_text())
    torch.manual_seed(0)
    llama = LlamaConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    llama._attn_implementation = "sdpa"
    backbone = LlamaModel(llama).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(20, config["vocab_size"], (batch, tokens), device="cuda")
    mask = torch.ones_like(ids)
    flops = model_flops(config, batch, tokens)
    rows = []
    masked = EmbeddingModel(backbone, "mean").eval()
    causal = EmbeddingModel(backbone, "mean", right_padded=True).eval()
    paths: list[tuple[str, Callable[[], object]]] = [
        ("eager bf16, explicit mask (the CPU reference's graph)", lambda: masked(ids, mask)),
        ("eager bf16, right-padded: fused causal SDPA", lambda: causal(ids, mask)),
    ]
    # Inductor's fused kernels replayed as one CUDA graph: the model is small enough that launch
    # overhead is a large share of eager time.
    graphed = torch.compile(causal, mode="reduce-overhead")
    paths.append(("torch.compile reduce-overhead (CUDA graphs), causal SDPA", lambda: graphed(ids, mask)))
    reference = masked(ids, mask).float()
    with torch.inference_mode():
        for name, fn in paths:
            t0 = time.perf_counter()
            try:
                out = torch.as_tensor(fn()).float().clone()  # a CUDA graph reuses its output buffer
                first = time.perf_counter() - t0
                cosine = float((out * reference).sum(dim=1).min())
                seconds = cuda_time(fn)
            except Exception as err:  # a compile failure is a result to report, not a crash
                logger.exception("%s failed", name)
                rows.append({"path": name, "error": f"{type(err).__name__}: {err}"[:300]})
                continue
            rows.append(
                {
                    "path": name,
                    "batch": batch,
                    "tokens": tokens,
                    "ms_per_batch": seconds * 1e3,
                    "prompts_per_s": batch / seconds,
                    "tokens_per_s": batch * tokens / seconds,
                    "tflops": flops / seconds / 1e12,
                    "mfu": flops / seconds / 1e12 / peak,
                    "first_call_s": first,
                    "min_cosine_vs_masked": cosine,
                }
            )
            logger.info("%s", rows[-1])
    return rows


def bench_knn(sizes: list[int], dim: int, batches: list[int], k: int, copy_gb_per_s: float) -> list[dict[str, object]]:
    rows = []
    for n in sizes:
        vectors = torch.nn.functional.normalize(torch.randn(n, dim, device="cuda", dtype=torch.float16), dim=1)
        rows += _knn_rows(TorchFlatIndex(vectors, device="cuda", dtype="fp16"), dim, batches, k, copy_gb_per_s)
        del vectors
        torch.cuda.empty_cache()  # the index is gone with _knn_rows: free it before the next size
    return rows


def _knn_rows(
    index: TorchFlatIndex, dim: int, batches: list[int], k: int, copy_gb_per_s: float
) -> list[dict[str, object]]:
    rows = []
    bound = index.nbytes / (copy_gb_per_s * 1e9)
    for b in batches:
        queries = torch.nn.functional.normalize(torch.randn(b, dim, device="cuda"), dim=1)
        seconds = cuda_time(lambda: index.search_tensor(queries, k), repeat=20)
        host = queries.cpu().numpy()
        end_to_end = cuda_time(lambda: index.search(host, k), repeat=20)
        rows.append(
            {
                "posts": len(index),
                "dim": dim,
                "query_batch": b,
                "k": k,
                "index_gb": index.nbytes / 1e9,
                "ms": seconds * 1e3,
                "ms_with_host_copies": end_to_end * 1e3,
                "bound_ms": bound * 1e3,
                "x_bound": seconds / bound,
                "queries_per_s": b / seconds,
            }
        )
        logger.info("%s", rows[-1])
    return rows


def markdown(report: dict) -> str:
    lines = [
        f"# GPU speed on {report['gpu']}",
        "",
        f"Command: `{report['command']}`. torch {report['torch']}.",
        "",
        f"Measured peaks: bf16 matmul {report['peaks']['bf16_matmul_tflops']:.0f} TFLOP/s (8192^3); "
        f"device copy {report['peaks']['copy_gb_per_s']:.0f} GB/s (read + write). "
        f"MFU below is against the datasheet's dense bf16 peak, {report['peak_tflops']:.0f} TFLOP/s.",
        "",
        "## Encoder (default model architecture, random weights)",
        "",
        "| path | batch x tokens | ms/batch | prompts/s | tokens/s | TFLOP/s | MFU | cos vs masked |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["encoder"]:
        if "error" in r:
            lines.append(f"| {r['path']} | failed: {r['error']} | | | | | | |")
            continue
        lines.append(
            f"| {r['path']} | {r['batch']} x {r['tokens']} | {r['ms_per_batch']:.2f} | {r['prompts_per_s']:,.0f} | "
            f"{r['tokens_per_s']:,.0f} | {r['tflops']:.0f} | {r['mfu']:.1%} | {r['min_cosine_vs_masked']:.5f} |"
        )
    lines += [
        "",
        "## Exact kNN (PyTorch, fp16 storage, chunked matmul + top-k)",
        "",
        "| posts x dim | query batch | k | index GB | ms (on device) | ms (numpy in/out) | bound ms | x bound | queries/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["knn"]:
        lines.append(
            f"| {r['posts']:,} x {r['dim']} | {r['query_batch']} | {r['k']} | {r['index_gb']:.2f} | {r['ms']:.3f} | "
            f"{r['ms_with_host_copies']:.3f} | {r['bound_ms']:.3f} | {r['x_bound']:.2f} | {r['queries_per_s']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="HF config.json of the default model")
    p.add_argument("--batch", type=int, nargs="*", default=[64, 256])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--knn-sizes", type=int, nargs="*", default=[1_000_000, 10_000_000])
    p.add_argument("--knn-batches", type=int, nargs="*", default=[1, 64])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "reports")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    gpu = torch.cuda.get_device_name()
    peak = next((v for key, v in DATASHEET_BF16_TFLOPS.items() if key in gpu), 989.4)
    peaks = measured_peaks()
    report: dict[str, object] = {
        "gpu": gpu,
        "torch": torch.__version__,
        "peak_tflops": peak,
        "peaks": peaks,
        "command": "python -m benchmarks.gpu " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    report["encoder"] = [r for b in args.batch for r in bench_encoder(args.config, b, args.tokens, peak)]
    report["knn"] = bench_knn(args.knn_sizes, args.dim, args.knn_batches, args.k, peaks["copy_gb_per_s"])
    write_report(args.out, "gpu", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
