"""Retrieval quality on MovieLens, full catalog, time split (issue 3's benchmark).

    .venv/bin/python -m benchmarks.quality                      # baselines + the two default models
    .venv/bin/python -m benchmarks.quality --ablation "raw counts=runs/ablation-raw" ...

Recall@10/50/100 and NDCG@10 over all 9,742 movies with the member's history excluded, overall and
on slices: cold items (targets with <= 2 training positives) and short-history members (<= 5, and
<= 15 since the small MovieLens has one test member with <= 5).

Rows: random, popularity, ItemKNN, BM25, all-MiniLM-L6-v2, and every dual encoder given with
`--encoder NAME=DIR` (default: `artifacts/untuned` and `artifacts/default`, when built). DIR is an
artifact directory (hf/, serving.json, buckets.json), an exported graph in one (scored with ONNX
Runtime: `artifacts/default/encoder.int8.onnx`), or a training run (model/, serving.json,
buckets.json, train_config.json); its prompt settings and buckets are used as saved, and a run
trained with disliked movies in its history is evaluated with them. `--ablation NAME=DIR` adds rows
to the ablation table; the last `--encoder` also gets Matryoshka rows (its embedding truncated to
`--matryoshka` dims). For every encoder the report gives the Pearson correlation between log
popularity and the mean similarity members give a post (see `popularity_correlation`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from benchmarks import write_report
from feedserve.artifacts import REPO_ROOT
from feedserve.ops.builder import SAMPLE_CORPUS
from feedserve.prompt.movielens import MovieLens, load_movielens
from feedserve.prompt.records import Member
from feedserve.training.baselines import BM25, ItemKNN, Popularity, SentenceEmbedder
from feedserve.training.data import EvalCase, Split, movielens_split
from feedserve.training.evaluate import EmbeddingRetriever, EncoderDir, metrics, popularity_correlation, rank

logger = logging.getLogger("benchmarks.quality")
KS = (10, 50, 100)
Scorer = Callable[[Sequence[Member]], np.ndarray]
DEFAULT_ENCODERS = (
    ("SmolLM2-135M untuned (30 layers)", REPO_ROOT / "artifacts" / "untuned"),
    ("SmolLM2 fine-tuned (6 layers, LoRA)", REPO_ROOT / "artifacts" / "default"),
)


def slices(cases: list[EvalCase], train_positives: dict[int, int]) -> dict[str, list[EvalCase]]:
    cold = [EvalCase(c.member, {t for t in c.targets if train_positives.get(t, 0) <= 2}) for c in cases]
    return {
        "all": cases,
        "cold items": [c for c in cold if c.targets],
        "short history": [c for c in cases if len(c.member.history) <= 5],
        # ml-latest-small has a single test member with <= 5 liked movies; this slice has about 25.
        "short history (<= 15)": [c for c in cases if len(c.member.history) <= 15],
    }


def _spec(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {value!r}")
    return name, Path(path)


class Evaluation:
    """Scores models on the split; every model is ranked over the same full catalog."""

    def __init__(self, ml: MovieLens, test_fraction: float, cache: Path) -> None:
        self.ml, self.test_fraction, self.cache = ml, test_fraction, cache
        self.split = movielens_split(ml, test_fraction=test_fraction)
        self.ids = np.array([p.id for p in self.split.corpus], np.int64)
        self.groups = slices(self.split.test, self.split.train_positives)
        self._with_negatives: Split | None = None
        # Popularity for the correlation: positives in the training period.
        self.popularity = np.array([self.split.train_positives.get(int(i), 0) for i in self.ids], np.float64)

    def scorer(self, score: Scorer, history_negatives: bool) -> Scorer:
        """`score` with members as the model was trained to see them. Targets, slices and the
        excluded history stay the plain split's for every model, so a history that also lists
        disliked movies cannot hide more candidates (and so look better) than an engaged-only one."""
        if not history_negatives:
            return score
        if self._with_negatives is None:
            self._with_negatives = movielens_split(self.ml, test_fraction=self.test_fraction, history_negatives=True)
        seen_as = {c.member.id: c.member for c in self._with_negatives.test}
        return lambda members: score([seen_as[m.id] for m in members])

    def run(self, score: Scorer, groups: dict[str, list[EvalCase]] | None = None) -> dict[str, dict[str, float]]:
        out = {}
        for slice_name, cases in (groups or self.groups).items():
            top = rank(score([c.member for c in cases]), self.ids, cases, max(KS))
            out[slice_name] = metrics(top, cases, KS)
        return out

    def encoder(self, root: Path) -> tuple[EmbeddingRetriever, EncoderDir]:
        """An artifact or run directory (PyTorch), or an exported graph inside an artifact directory
        (ONNX Runtime, e.g. `artifacts/default/encoder.int8.onnx`)."""
        onnx = root if root.suffix == ".onnx" else None
        d = EncoderDir.load(root.parent if onnx else root)
        return EmbeddingRetriever(d.hf_dir, d.settings, d.buckets, self.split.corpus, self.cache, onnx=onnx), d


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "reports")
    p.add_argument("--encoder", type=_spec, action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--ablation", type=_spec, action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--matryoshka", type=int, nargs="*", default=[256, 128, 64])
    p.add_argument("--cache", type=Path, default=Path(__file__).parent / ".cache", help="post embedding cache")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    encoders = args.encoder or [(n, d) for n, d in DEFAULT_ENCODERS if d.is_dir()]
    ml = load_movielens(SAMPLE_CORPUS)
    ev = Evaluation(ml, args.test_fraction, args.cache)
    engaged: dict[int, set[int]] = defaultdict(set)
    for r in ml.ratings:
        if r.rating >= 4.0 and r.timestamp < ev.split.cutoff:
            engaged[r.user].add(r.movie)
    rng = np.random.default_rng(0)
    baselines: dict[str, Scorer] = {
        "random": lambda ms: rng.random((len(ms), len(ev.ids))),
        "popularity": Popularity(ev.split, ev.ids).score,
        "ItemKNN": ItemKNN(engaged, ev.ids).score,
        "BM25": BM25(ev.split.corpus).score,
        "all-MiniLM-L6-v2 (mean of recent posts)": SentenceEmbedder(ev.split.corpus).score,
    }
    results: dict[str, dict[str, dict[str, float]]] = {}
    seconds: dict[str, float] = {}
    correlation: dict[str, float] = {}
    training: dict[str, dict[str, object]] = {}
    for name, score in baselines.items():
        t = time.perf_counter()
        results[name] = ev.run(score)
        seconds[name] = time.perf_counter() - t
        logger.info("%s: %s (%.1f s)", name, results[name]["all"], seconds[name])

    main_rows, ablation_rows = list(baselines), []
    for section, specs in (("main", encoders), ("ablation", args.ablation)):
        for i, (name, root) in enumerate(specs):
            t = time.perf_counter()
            retriever, d = ev.encoder(root)
            score = ev.scorer(retriever.score, d.history_negatives)
            results[name] = ev.run(score)
            correlation[name] = popularity_correlation(score([c.member for c in ev.groups["all"]]), ev.popularity)
            if d.train_report:
                training[name] = d.train_report
            seconds[name] = time.perf_counter() - t
            (main_rows if section == "main" else ablation_rows).append(name)
            logger.info(
                "%s: %s, popularity corr %.3f (%.0f s)", name, results[name]["all"], correlation[name], seconds[name]
            )
            if section == "main" and i == len(specs) - 1:
                # Prefix rows only for the sizes the model was trained for: any other prefix of an
                # embedding is not an embedding.
                for dim in (x for x in args.matryoshka if x in d.matryoshka_dims):
                    row = f"{name} @ {dim} dims"
                    results[row] = ev.run(lambda ms, dim=dim: retriever.score(ms, dim))
                    correlation[row] = popularity_correlation(
                        retriever.score([c.member for c in ev.groups["all"]], dim), ev.popularity
                    )
                    ablation_rows.append(row)

    report = {
        "split": {
            "cutoff": ev.split.cutoff,
            "train_examples": len(ev.split.train),
            **{f"test members ({k})": len(v) for k, v in ev.groups.items()},
        },
        "encoders": {n: str(d) for n, d in [*encoders, *args.ablation]},
        "results": results,
        "popularity_correlation": correlation,
        "seconds": seconds,
        "training": training,
    }
    write_report(args.out, "quality", report, markdown(report, main_rows, ablation_rows, ev.groups, argv))
    plot(results, main_rows, ablation_rows, args.out / "quality.png")
    return 0


def _table(
    results: dict[str, dict[str, dict[str, float]]], rows: list[str], slice_name: str, correlation: dict[str, float]
) -> list[str]:
    lines = ["| model | Recall@10 | Recall@50 | Recall@100 | NDCG@10 | popularity corr. |", "|---|---|---|---|---|---|"]
    for name in rows:
        r = results[name][slice_name]
        corr = f"{correlation[name]:.3f}" if name in correlation else ""
        lines.append(
            f"| {name} | {r['recall@10']:.4f} | {r['recall@50']:.4f} | {r['recall@100']:.4f} | {r['ndcg@10']:.4f} | {corr} |"
        )
    return lines + [""]


def markdown(
    report: dict,
    main_rows: list[str],
    ablation_rows: list[str],
    groups: dict[str, list[EvalCase]],
    argv: list[str] | None,
) -> str:
    command = " ".join(["python -m benchmarks.quality", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        "# Retrieval quality on MovieLens (full catalog, global time split)",
        "",
        f"Command: `{command}`. Split: {json.dumps(report['split'])}. Encoders: {json.dumps(report['encoders'])}.",
        "",
        "Popularity corr.: Pearson correlation, over all movies, between log(1 + training positives) and the "
        "mean similarity the test members give the movie.",
        "",
    ]
    for slice_name in groups:
        lines += [f"## {slice_name}", ""] + _table(
            report["results"], main_rows, slice_name, report["popularity_correlation"]
        )
    if ablation_rows:
        lines += ["## Ablations (all test members)", ""] + _table(
            report["results"], ablation_rows, "all", report["popularity_correlation"]
        )
    if report["training"]:
        lines += [
            "## Training runs",
            "",
            "| model | steps | wall time | peak RSS | first loss | last loss |",
            "|---|---|---|---|---|---|",
        ]
        for name, t in report["training"].items():
            lines.append(
                f"| {name} | {t['steps']} | {t['seconds'] / 60:.1f} min | {t['peak_rss_mb'] / 1024:.1f} GiB "
                f"| {t['first_loss']:.3f} | {t['last_loss']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(
    results: dict[str, dict[str, dict[str, float]]], main_rows: list[str], ablation_rows: list[str], path: Path
) -> None:
    """Recall@100 per model and slice, and the ablations, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("Recall@100 by slice", main_rows, ("all", "cold items", "short history (<= 15)"))]
    if ablation_rows:
        panels.append(("Ablations: Recall@100 (all members)", ablation_rows, ("all",)))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(7 * len(panels), 0.45 * max(len(main_rows), len(ablation_rows)) + 2)
    )
    for ax, (title, rows, slice_names) in zip(np.atleast_1d(axes), panels, strict=True):
        y = np.arange(len(rows))
        height = 0.8 / len(slice_names)
        for j, s in enumerate(slice_names):
            ax.barh(y + j * height, [results[r][s]["recall@100"] for r in rows], height, label=s)
        ax.set_yticks(y + height * (len(slice_names) - 1) / 2, rows, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title)
        ax.set_xlabel("Recall@100")
        if len(slice_names) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
