"""GPU speed of the GR ranker: shared-context attention three ways, against scoring every candidate
with its own copy of the history, in fp32 and bf16, with model FLOPs and MFU.

    python -m benchmarks.rank_gpu --out benchmarks/reports/rank_gpu     # on a CUDA machine
    python -m benchmarks.rank_gpu --device cpu --quick --out /tmp/rg    # the script's own check, on a CPU

Forward passes of one batch of members (B) with H history items and C candidates each, timed on
the device (synchronised, median and p99 of `--runs` after warm-up), three ways: `split` (what
`rank` runs: the history causally, then each candidate against the history and itself; PyTorch's
SDPA for the history), `dense` (SDPA over every token pair with the shared-context mask) and
`flex` (FlexAttention with the same mask as a block mask, compiled; the block mask is built in
the pass, as `rank` would build it per request). `per-candidate`: each candidate scored alone with
its own copy of the history (a batch of `--sample` such sequences, scaled to C): what ranking
without shared context costs.

Two sizes: the shipped ranker's (d_model 64, 2 layers: the weights of models/gr-movielens where it
reads the history; max_history 1000 needs the same size with random weights), and `d512` (d_model
512, 4 layers, 8 heads, random weights): a ranker wide enough to occupy a GPU, to show where the
attention paths part. `served`: the shipped ranker as `rank` runs it on a GPU
(feedserve.rank.runtime.TorchScorer: inputs copied from host memory, logits copied back).

Model FLOPs are the split path's, as PyTorch's FlopCounterMode counts them (matrix products and
SDPA, the history's causal attention counted whole); the same count divides every path's time, so
TFLOP/s compares useful work. MFU: bf16 rows against the datasheet's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import write_report
from feedserve.artifacts import DEFAULT_RANKER
from feedserve.export.rank import sample_inputs
from feedserve.rank.model import INPUTS, GenerativeRanker, RankerConfig
from feedserve.rank.runtime import TorchScorer
from feedserve.rank.train import DEFAULT_TASK_WEIGHTS, final_score

logger = logging.getLogger("benchmarks.rank_gpu")

SHAPES = ((200, 2000), (1000, 2000))  # (history items, candidates)
BATCHES = (1, 8)
QUICK_SHAPES, QUICK_BATCHES = ((20, 50),), (1, 2)
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SKIPPED = {"skipped": "past the benchmark's time budget (--budget-s)"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timings(fn: Callable[[], object], device: torch.device, runs: int, warmup: int = 3) -> dict[str, float]:
    """p50 / p99 milliseconds of `fn` (synchronised), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    ms = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        _sync(device)
        ms.append((time.perf_counter() - start) * 1e3)
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "runs": runs}


def tensors(config: RankerConfig, batch: int, history: int, candidates: int, device: torch.device) -> list[Any]:
    """The forward pass's inputs, in INPUTS order, on the device: full histories, random content."""
    arrays = sample_inputs(config, batch, history, candidates, (history,) * batch)
    return [torch.from_numpy(arrays[name]).to(device) for name in INPUTS]


def split_flops(model: GenerativeRanker, args: list[Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    attention, model.attention = model.attention, "split"
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(*args)
    model.attention = attention
    return float(counter.get_total_flops())


def sizes(quick: bool) -> dict[str, tuple[RankerConfig, Path | None]]:
    shipped = RankerConfig.load(DEFAULT_RANKER / "ranker.json")
    if quick:
        return {"shipped": (shipped, DEFAULT_RANKER)}
    wide = replace(shipped, d_model=512, n_layers=4, n_heads=8)
    return {"shipped": (shipped, DEFAULT_RANKER), "d512": (wide, None)}


def model_of(config: RankerConfig, weights: Path | None, history: int) -> tuple[GenerativeRanker, str]:
    """The shipped weights where they read this history, else the same size with random weights."""
    if weights is not None and history <= config.max_history:
        return GenerativeRanker.load(weights), "shipped weights"
    torch.manual_seed(0)
    config = replace(config, max_history=max(history, config.max_history))
    return GenerativeRanker(config).eval(), f"random weights, max_history {config.max_history}"


def forward_rows(
    rows: list[dict[str, Any]],
    device: torch.device,
    runs: int,
    sample: int,
    quick: bool,
    deadline: float,
    peak: float,
    save: Callable[[], None],
    done: dict[tuple[Any, ...], dict[str, Any]],
) -> None:
    """Appends a row to `rows` per (size, shape, batch, dtype), calling `save` after each; a row in
    `done` (a cut-short run's, every path measured) is kept as it was."""
    shapes, batches = (QUICK_SHAPES, QUICK_BATCHES) if quick else (SHAPES, BATCHES)
    for size, (config, weights) in sizes(quick).items():
        for history, candidates in shapes:
            model, source = model_of(config, weights, history)
            model = model.to(device)
            for batch in batches:
                args = tensors(model.config, batch, history, candidates, device)
                flops = split_flops(model, args)
                for dtype_name, dtype in TORCH_DTYPES.items():
                    if (kept := done.get((size, batch, history, candidates, dtype_name))) is not None:
                        rows.append(kept)
                        continue
                    row: dict[str, Any] = {
                        "size": size,
                        "weights": source,
                        "batch": batch,
                        "history": history,
                        "candidates": candidates,
                        "dtype": dtype_name,
                        "model_gflop": flops / 1e9,
                    }
                    for attention in ("split", "dense", "flex"):
                        if time.monotonic() > deadline:
                            row[attention] = SKIPPED
                            continue
                        model.attention = attention
                        row[attention] = _measure(model, args, dtype, device, runs, flops, peak)
                    model.attention = "split"
                    if batch == 1:  # at batch 8 it would be the same candidates' cost again
                        late = time.monotonic() > deadline
                        row["per_candidate"] = (
                            SKIPPED if late else _per_candidate(model, history, candidates, dtype, device, runs, sample)
                        )
                    rows.append(row)
                    logger.info("%s", json.dumps(row))
                    save()


def _forward(
    model: GenerativeRanker, args: list[Any], dtype: torch.dtype, device: torch.device
) -> Callable[[], torch.Tensor]:
    """One forward pass of `model` on `args`, in `dtype` (bf16: autocast, as TorchScorer runs it)."""

    def forward() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return model(*args)

    return forward


def _measure(
    model: GenerativeRanker,
    args: list[Any],
    dtype: torch.dtype,
    device: torch.device,
    runs: int,
    flops: float,
    peak: float,
) -> dict[str, Any]:
    forward = _forward(model, args, dtype, device)
    try:
        start = time.perf_counter()
        forward()
        _sync(device)
        first_s = time.perf_counter() - start  # flex: its compilation
        out = timings(forward, device, runs)
    except Exception as err:  # a path that fails on this device is a result to report
        logger.exception("%s failed", model.attention)
        return {"error": f"{type(err).__name__}: {err}"[:300]}
    out["first_call_s"] = first_s
    out["tflops"] = flops / (out["p50_ms"] / 1e3) / 1e12
    if dtype == torch.bfloat16 and peak:
        out["mfu"] = out["tflops"] / peak
    return out


def _per_candidate(
    model: GenerativeRanker,
    history: int,
    candidates: int,
    dtype: torch.dtype,
    device: torch.device,
    runs: int,
    sample: int,
) -> dict[str, Any]:
    """`sample` copies of one history, one candidate each, in one batch; scaled to `candidates`."""
    args = tensors(model.config, sample, history, 1, device)
    out = timings(_forward(model, args, dtype, device), device, max(3, runs // 5))
    scale = candidates / sample
    return {
        "p50_ms": out["p50_ms"] * scale,
        "measured": f"{out['runs']} runs of {sample} candidates each with its own history, x{scale:g}",
    }


def served_rows(device: torch.device, runs: int, quick: bool) -> list[dict[str, Any]]:
    """The shipped ranker as `rank` runs it on this device: host tensors in, logits out; bf16 rows
    also say how far their final scores and top 10 are from fp32's on the same inputs."""
    rows = []
    config = RankerConfig.load(DEFAULT_RANKER / "ranker.json")
    weights = np.array([DEFAULT_TASK_WEIGHTS[t] for t in config.tasks], np.float32)
    history, candidates = (20, 50) if quick else (config.max_history, 2000)
    reference: dict[int, np.ndarray] = {}
    for dtype in ("fp32", "bf16"):
        scorer = TorchScorer(DEFAULT_RANKER, str(device), dtype)
        for batch in QUICK_BATCHES if quick else BATCHES:
            arrays = sample_inputs(config, batch, history, candidates, (history,) * batch)
            inputs = {name: torch.from_numpy(a) for name, a in arrays.items()}
            row: dict[str, Any] = {"dtype": dtype, "batch": batch, "history": history, "candidates": candidates}
            row.update(timings(lambda: scorer(inputs), device, runs))
            _, final = final_score(scorer(inputs), weights)
            if dtype == "fp32":
                reference[batch] = final
            else:
                want = reference[batch]
                row["max_final_score_diff"] = float(np.abs(final - want).max())
                top = [
                    len(set(np.argsort(-a)[:10]) & set(np.argsort(-b)[:10])) / 10
                    for a, b in zip(final, want, strict=True)
                ]
                row["top10_overlap"] = float(np.mean(top))
            rows.append(row)
            logger.info("%s", json.dumps(row))
    return rows


def _measured(report: dict[str, Any]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """A report's forward rows that measured every path, by (size, batch, history, candidates, dtype)."""
    return {
        (r["size"], r["batch"], r["history"], r["candidates"], r["dtype"]): r
        for r in report.get("forward", [])
        if not any("skipped" in r.get(path, {}) for path in ("split", "dense", "flex", "per_candidate"))
    }


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU, torch {torch.__version__}"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# The GR ranker on {report['machine']}",
        "",
        f"Command: `{report['command']}`.",
        "",
        f"Peak used for MFU: {report['peak_tflops']:.0f} TFLOP/s (dense bf16, datasheet).",
        "",
        "## Forward pass: shared-context attention three ways, and each candidate alone",
        "",
        "| size | B | history | candidates | dtype | GFLOP | split p50 / p99 ms | dense p50 ms | flex p50 ms (first call s) "
        "| per-candidate p50 ms | split vs dense | split vs flex | shared vs per-candidate | split TFLOP/s | split MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(cell: dict[str, Any] | None) -> str:
        if not cell:
            return "-"
        if "p50_ms" not in cell:
            return cell.get("error", cell.get("skipped", "-"))[:60]
        return f"{cell['p50_ms']:.2f}"

    def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
        if a and b and "p50_ms" in a and "p50_ms" in b:
            return f"{b['p50_ms'] / a['p50_ms']:.1f}x"
        return "-"

    unmeasured: dict[str, list[str]] = {}
    for r in report["forward"]:
        split = r.get("split", {})
        if "p50_ms" not in split:
            unmeasured.setdefault(ms(split), []).append(f"{r['size']} B={r['batch']} H={r['history']} {r['dtype']}")
            continue
        flex = r.get("flex", {})
        flex_cell = ms(flex) + (f" ({flex['first_call_s']:.1f})" if "first_call_s" in flex else "")
        mfu = f"{split['mfu']:.2%}" if "mfu" in split else "-"
        lines.append(
            f"| {r['size']} | {r['batch']} | {r['history']} | {r['candidates']} | {r['dtype']} | {r['model_gflop']:.3g} "
            f"| {split['p50_ms']:.2f} / {split['p99_ms']:.2f} | {ms(r.get('dense'))} | {flex_cell} "
            f"| {ms(r.get('per_candidate'))} | {ratio(split, r.get('dense'))} | {ratio(split, flex)} "
            f"| {ratio(split, r.get('per_candidate'))} | {split['tflops']:.1f} | {mfu} |"
        )
    for why, rows in unmeasured.items():
        lines += ["", f"Not measured ({why}): " + ", ".join(rows) + "."]
    lines += [
        "",
        "Weights: `shipped` reads the shipped ranker's where the history fits its 200 positions; at 1,000 "
        "the same size with random weights; `d512` random weights (speed does not depend on their values).",
        "",
        "## Served: the shipped ranker as `rank` runs it on this device (TorchScorer: host in, host out)",
        "",
        "| dtype | B | history | candidates | p50 ms | p99 ms | max final-score diff vs fp32 | top-10 overlap with fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["served"]:
        diff = f"{r['max_final_score_diff']:.2g}" if "max_final_score_diff" in r else "-"
        overlap = f"{r['top10_overlap']:.0%}" if "top10_overlap" in r else "-"
        lines.append(
            f"| {r['dtype']} | {r['batch']} | {r['history']} | {r['candidates']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {diff} | {overlap} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/reports/rank_gpu"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--sample", type=int, default=128, help="candidates scored alone per per-candidate batch")
    p.add_argument("--quick", action="store_true", help="tiny shapes and one size: the script's own check")
    p.add_argument("--budget-s", type=float, default=420.0, help="past this, the remaining paths are skipped")
    p.add_argument("--resume", type=Path, help="a cut-short run's rank_gpu.json: what it measured is kept, not rerun")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks.rank_gpu: no CUDA device here (run it on a GPU machine, or --device cpu)", file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.budget_s
    # FlexAttention is compiled per shape and dtype (then dynamically); past the default limit of
    # recompilations torch.compile would fall back to eager and time that instead.
    torch._dynamo.config.cache_size_limit = 64
    # One static compile per shape: a recompile with dynamic shapes took 158 s on an H200.
    torch._dynamo.config.automatic_dynamic_shapes = False
    previous = json.loads(args.resume.read_text()) if args.resume else {}
    from benchmarks.gpu import DATASHEET_BF16_TFLOPS

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), 0.0)
    report: dict[str, Any] = {
        "machine": machine(device),
        "command": "python -m benchmarks.rank_gpu " + " ".join(argv if argv is not None else sys.argv[1:]),
        "peak_tflops": peak,
        "forward": [],
        "served": [],
    }

    def save() -> None:  # after every row: a run cut short still leaves what it measured
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "rank_gpu.json").write_text(json.dumps(report, indent=2) + "\n")

    report["served"] = previous.get("served") or served_rows(device, args.runs, args.quick)
    save()
    done = _measured(previous)
    forward_rows(report["forward"], device, args.runs, args.sample, args.quick, deadline, peak, save, done)
    write_report(args.out, "rank_gpu", report, markdown(report), "README.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
