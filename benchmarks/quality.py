"""Retrieval quality on MovieLens, full catalog, time split (issue 3's benchmark; baselines so far).

    .venv/bin/python -m benchmarks.quality [--test-fraction 0.1]

Recall@10/50/100 and NDCG@10 over all 9,742 movies with the member's history excluded, overall and
on two slices: cold items (targets with <= 2 training positives) and short-history members (<= 5).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from feedserve.build import SAMPLE_CORPUS
from feedserve.movielens import load_movielens
from feedserve.training.baselines import BM25, ItemKNN, Popularity, SentenceEmbedder
from feedserve.training.data import EvalCase, movielens_split
from feedserve.training.evaluate import metrics, rank

logger = logging.getLogger("benchmarks.quality")
KS = (10, 50, 100)


def slices(cases: list[EvalCase], train_positives: dict[int, int]) -> dict[str, list[EvalCase]]:
    cold = [EvalCase(c.member, {t for t in c.targets if train_positives.get(t, 0) <= 2}) for c in cases]
    return {
        "all": cases,
        "cold items": [c for c in cold if c.targets],
        "short history": [c for c in cases if len(c.member.history) <= 5],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "reports")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ml = load_movielens(SAMPLE_CORPUS)
    split = movielens_split(ml, test_fraction=args.test_fraction)
    ids = np.array([p.id for p in split.corpus], np.int64)
    engaged: dict[int, set[int]] = defaultdict(set)
    for r in ml.ratings:
        if r.rating >= 4.0 and r.timestamp < split.cutoff:
            engaged[r.user].add(r.movie)
    rng = np.random.default_rng(0)
    models = {
        "random": lambda ms: rng.random((len(ms), len(ids))),
        "popularity": Popularity(split, ids).score,
        "ItemKNN": ItemKNN(engaged, ids).score,
        "BM25": BM25(split.corpus).score,
        "all-MiniLM-L6-v2 (mean of recent posts)": SentenceEmbedder(split.corpus).score,
    }
    groups = slices(split.test, split.train_positives)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, score in models.items():
        t = time.perf_counter()
        results[name] = {}
        for slice_name, cases in groups.items():
            top = rank(score([c.member for c in cases]), ids, cases, max(KS))
            results[name][slice_name] = metrics(top, cases, KS)
        logger.info("%s: %s (%.1f s)", name, results[name]["all"], time.perf_counter() - t)
    report = {
        "split": {"cutoff": split.cutoff, "train_examples": len(split.train),
                  **{f"test members ({k})": len(v) for k, v in groups.items()}},
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Retrieval quality on MovieLens (full catalog, global time split)", "",
             f"Command: `.venv/bin/python -m benchmarks.quality --test-fraction {args.test_fraction}`. "
             f"Split: {json.dumps(report['split'])}.", ""]
    for slice_name in groups:
        lines += [f"## {slice_name}", "", "| model | Recall@10 | Recall@50 | Recall@100 | NDCG@10 |", "|---|---|---|---|---|"]
        for name in models:
            r = results[name][slice_name]
            lines.append(f"| {name} | {r['recall@10']:.4f} | {r['recall@50']:.4f} | {r['recall@100']:.4f} | {r['ndcg@10']:.4f} |")
        lines.append("")
    (args.out / "quality.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
