"""Fine-tuning on the lent GPU: the speed-up over the 2 CPU cores, and a longer recipe chosen on a
validation split that the test members never enter.

    python -m benchmarks.gpu_train speed    --base HF --out DIR   # the CPU recipe, a few steps
    python -m benchmarks.gpu_train validate --base HF --out DIR   # recipes x steps on validation
    python -m benchmarks.gpu_train final    --base HF --out DIR --recipe b8 --steps 800
    python -m benchmarks.gpu_train ablate   --base HF --out DIR   # one change each, 100 steps

`HF` is a checkpoint unpacked by `feedserve.training.device_bundle`. Validation splits the training period
once more by time (the members' last 10% of positives before the test cutoff are the targets), so
choosing a recipe and a step count never looks at the test period. `final` trains the chosen recipe
on the full training split and writes the adapter package; its quality is then measured on the CPU
by `benchmarks.quality`, with the fp32 base, like every other row of the report.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from feedserve.artifacts import DEFAULT_ADAPTER, EncoderSettings
from feedserve.ops.builder import SAMPLE_CORPUS
from feedserve.prompt.movielens import MovieLens, load_movielens
from feedserve.training.data import Split, movielens_split, validation_movielens
from feedserve.training.evaluate import EmbeddingRetriever, metrics, popularity_correlation, rank
from feedserve.training.train import TrainConfig, train

logger = logging.getLogger(__name__)

# The shipped recipe's fixed parts: 6 layers + LoRA r8 keep the served model fast on CPU and the
# adapter a few MB; what the GPU buys is steps and batch size.
BASE = TrainConfig(
    batch_size=8,
    lr=5e-4,
    lora_r=8,
    keep_layers=6,
    matryoshka_dims=(256, 128, 64),
    hard_negatives=2,
    easy_negatives=16,
    checkpoint_every=100,
    extra={"data": "movielens", "history": "engaged"},
)
RECIPES = {
    "b8": BASE,  # the 2-core recipe, run longer
    "b32": replace(BASE, batch_size=32),  # 4x the in-batch negatives
    "b32-lr2e-4": replace(BASE, batch_size=32, lr=2e-4),  # b32's loss was unsteady at 5e-4
}
EVAL_AT = {"b8": (400, 800, 1200, 1600, 2000), "b32": (200, 400, 600, 800, 1000, 1200), "b32-lr2e-4": (400, 800, 1200)}


# The paper-style ablations: each changes one thing against the reference, at the same step count.
ABLATIONS: dict[str, tuple[dict[str, object], dict[str, object], bool]] = {  # config, settings, history negatives
    "reference (percentile tokens, 2 hard negatives, engaged-only history)": ({}, {}, False),
    "raw counts instead of percentile tokens": ({}, {"count_format": "raw"}, False),
    "0 hard negatives": ({"hard_negatives": 0}, {}, False),
    "1 hard negative": ({"hard_negatives": 1}, {}, False),
    "history with disliked movies too": ({}, {"prompt_history": "all"}, True),
}


def settings() -> EncoderSettings:
    return EncoderSettings.load(DEFAULT_ADAPTER / "serving.json")


def ablate(base: Path, out: Path, ml: MovieLens, steps: int) -> dict[str, dict[str, float]]:
    plain = movielens_split(ml)
    ids = np.array([p.id for p in plain.corpus], np.int64)
    popularity = np.array([plain.train_positives.get(int(i), 0) for i in ids], np.float64)
    rows: dict[str, dict[str, float]] = {}
    for n, (name, (cfg_changes, settings_changes, negatives)) in enumerate(ABLATIONS.items()):
        split = movielens_split(ml, history_negatives=negatives) if negatives else plain
        members = {c.member.id: c.member for c in split.test}
        run_settings = replace(settings(), **settings_changes)  # type: ignore[arg-type]
        cfg = replace(BASE, steps=steps, **cfg_changes)  # type: ignore[arg-type]
        result = train(
            base,
            out / f"ablation-{n}",
            split.train,
            split.corpus,
            ml.fit_buckets(),
            run_settings,
            cfg,
            progress=False,
            device="cuda",
        )
        retriever = EmbeddingRetriever(
            result.model_dir, run_settings, ml.fit_buckets(), plain.corpus, batch=256, device="cuda"
        )
        # Members are embedded as this variant sees them; targets and the excluded history are the
        # plain split's for every row, so a longer history cannot hide more candidates.
        scores = retriever.score([members[c.member.id] for c in plain.test])
        rows[name] = {
            **metrics(rank(scores, ids, plain.test, 100), plain.test),
            "popularity_corr": popularity_correlation(scores, popularity),
            "train_seconds": result.seconds,
        }
        logger.info("%s: %s", name, rows[name])
    return rows


def validation_split(ml: MovieLens) -> Split:
    return movielens_split(validation_movielens(ml))


def evaluate(model_dir: Path, split: Split, ml: MovieLens) -> dict[str, float]:
    retriever = EmbeddingRetriever(model_dir, settings(), ml.fit_buckets(), split.corpus, batch=256, device="cuda")
    cases = split.test
    ids = np.array([p.id for p in split.corpus], np.int64)
    return metrics(rank(retriever.score([c.member for c in cases]), ids, cases, 100), cases)


def run(base: Path, out: Path, split: Split, ml: MovieLens, cfg: TrainConfig) -> dict[str, float]:
    result = train(
        base, out, split.train, split.corpus, ml.fit_buckets(), settings(), cfg, progress=False, device="cuda"
    )
    report = json.loads((out / "train_report.json").read_text())
    return {
        "steps": cfg.steps,
        "seconds": result.seconds,
        "resumed_from": result.resumed_from,
        "peak_gpu_mb": report.get("peak_gpu_mb"),
        "last_loss": result.losses[-1],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("speed", "validate", "final", "ablate"))
    p.add_argument("--base", type=Path, required=True, help="HF checkpoint dir (unpacked bundle)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="b32")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--speed-steps", type=int, default=60)
    p.add_argument("--recipes", nargs="*", choices=sorted(RECIPES), default=sorted(RECIPES), help="validate only these")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ml = load_movielens(SAMPLE_CORPUS)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    if args.command == "speed":
        split = movielens_split(ml)
        # Steps after the first 10 (CUDA warm-up, allocator growth) are timed.
        warm = run(base=args.base, out=args.out / "speed", split=split, ml=ml, cfg=replace(BASE, steps=10))
        timed = run(args.base, args.out / "speed", split, ml, replace(BASE, steps=10 + args.speed_steps))
        report |= {
            "recipe": "b8 (the CPU recipe)",
            "warmup": warm,
            "timed": timed,
            "seconds_per_step": timed["seconds"] / args.speed_steps,
        }
    elif args.command == "validate":
        split = validation_split(ml)
        report["split"] = {
            "cutoff": split.cutoff,
            "train_examples": len(split.train),
            "validation_members": len(split.test),
        }
        curves: dict[str, list[dict[str, object]]] = {}
        for name in args.recipes:
            cfg, curves[name] = RECIPES[name], []
            for steps in EVAL_AT[name]:
                t = time.perf_counter()
                trained = run(args.base, args.out / name, split, ml, replace(cfg, steps=steps))
                point = {
                    **trained,
                    **evaluate(args.out / name / "model", split, ml),
                    "eval_seconds": time.perf_counter() - t - trained["seconds"],
                }
                logger.info("%s @ %d: %s", name, steps, point)
                curves[name].append(point)
                (args.out / "validate-partial.json").write_text(json.dumps(report | {"curves": curves}, indent=2))
        report["curves"] = curves
    elif args.command == "ablate":
        report |= {
            "steps": 100,
            "evaluated_on": "GPU, bf16, full catalog, the 80 test members",
            "rows": ablate(args.base, args.out, ml, 100),
        }
    else:
        split = movielens_split(ml)
        cfg = replace(RECIPES[args.recipe], steps=args.steps)
        report |= {
            "recipe": args.recipe,
            "train": run(args.base, args.out / "run", split, ml, cfg),
            "test_gpu_bf16": evaluate(args.out / "run" / "model", split, ml),
        }
    (args.out / f"{args.command}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
