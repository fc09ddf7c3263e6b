"""Where rankers put the posts nobody had rated before the cutoff (new posts), and why.

    .venv/bin/python -m benchmarks.rank_new_posts --ranker models/gr-movielens runs/test-id runs/test-content
        [--validate] [--candidates 500] [--out benchmarks/reports/ranker/new-posts]

On `rank_eval`'s moments protocol each ranker reorders retrieval's top `--candidates`. For the
targets among them that are new posts: their median position in retrieval's order and in the
ranker's, and how many reach its top 50 and top 100 (a finer reading than Recall@50 over a few
dozen hits); beside it NDCG@10 over every target, which a change for new posts must not lose.

Why, for rankers that mix content and id: over the catalog, the gate (how much of its id a token
mixes in) on the posts the ranker trained on, the norms of their tokens and of their id embeddings,
and the norm of an untrained post's token (every new post, and the older posts no training example
showed: the ranker reads them alike). A probe reads each such ranker once more with every untrained
post's token zeroed (as the id-only arm reads one): how much of where new posts land is their token.

And what lifting them after the ranker trades (`--sweep`, by default the first ranker): the orders
`rank` serves with `new_post_boost` set (`render --new-post-boost`: every post the ranker never
trained on has its final score raised by the boost, feedserve.rank.train.boost_untrained), the
boosts OFFSETS times the median within-case standard deviation of the final scores (each row gives
the boost itself, the number to render).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import write_report
from feedserve.artifacts import default_artifacts_dir
from feedserve.clients.perf import machine
from feedserve.rank.model import GenerativeRanker, hash_ids
from feedserve.rank.train import boost_untrained
from feedserve.training.evaluate import metrics, paired_ratio, per_case
from feedserve.training.rank_eval import RankCase, RankingData, case_scores, evaluation_cases, orders

logger = logging.getLogger(__name__)
OFFSETS = (-1.0, 0.0, 0.5, 1.0, 2.0, 4.0)  # in within-case standard deviations of the final score


class UntrainedZeroed(GenerativeRanker):
    """The probe: the same ranker with the token of every post it never trained on zeroed."""

    def post_tokens(self, ids: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        return super().post_tokens(ids, content) * self.trained(ids).unsqueeze(-1).to(content.dtype)


def new_target_positions(tops: Sequence[np.ndarray], cases: Sequence[RankCase], new: set[int]) -> np.ndarray:
    """The position (0: first) of every new-post target in its case's order, where the order has it."""
    out = []
    for top, case in zip(tops, cases, strict=True):
        at = {int(p): i for i, p in enumerate(top.tolist())}
        out += [at[t] for t in sorted(case.targets & new) if t in at]
    return np.array(out, np.int64)


def base_rates(
    tops: Sequence[np.ndarray], cases: Sequence[RankCase], group: set[int], name: str = "new", rest: str = "trained"
) -> dict[str, float]:
    """How often a candidate is a target, the posts of `group` (new ones by default) against the
    rest: what an order that knows nothing but whether a post is in the group would do with them."""
    counts = np.zeros((2, 2), np.int64)  # [in group?, target?]
    for top, case in zip(tops, cases, strict=True):
        for post in top.tolist():
            counts[int(post in group), int(post in case.targets)] += 1
    rate = counts[:, 1] / np.maximum(counts.sum(1), 1)
    return {
        f"{name}_share_of_candidates": float(counts[1].sum() / counts.sum()),
        f"{name}_share_of_targets": float(counts[1, 1] / max(counts[:, 1].sum(), 1)),
        f"target_rate_{name}": float(rate[1]),
        f"target_rate_{rest}": float(rate[0]),
    }


def placement(positions: np.ndarray) -> dict[str, Any]:
    return {
        "targets": len(positions),
        "median_position": float(np.median(positions)) if len(positions) else None,
        "top50": int(np.sum(positions < 50)),
        "top100": int(np.sum(positions < 100)),
    }


@torch.no_grad()
def token_shapes(model: GenerativeRanker, data: RankingData) -> dict[str, float] | None:
    """The gate over trained posts, the norms of their tokens and id embeddings, and of untrained
    posts' tokens, over the catalog (None for a ranker that mixes nothing)."""
    if model.config.post_tokens in ("content", "id"):
        return None
    ids = torch.as_tensor(data.post_ids)
    content = torch.as_tensor(np.asarray(data.retriever.posts), dtype=torch.float32)
    trained = model.trained(ids)
    gate = model.post_gate(ids, content)[trained, 0]
    norms = model.post_tokens(ids, content).norm(dim=-1)
    id_norms = model.ids(hash_ids(ids, model.config.id_buckets)).norm(dim=-1)
    return {
        "trained_posts": int(trained.sum()),
        "untrained_posts": int((~trained).sum()),
        "norm_id_trained": float(id_norms[trained].mean()),
        "gate_mean": float(gate.mean()),
        "gate_q10": float(gate.quantile(0.1)),
        "gate_q90": float(gate.quantile(0.9)),
        "norm_trained": float(norms[trained].mean()),
        "norm_untrained": float(norms[~trained].mean()),
    }


def new_recall(tops: Sequence[np.ndarray], cases: Sequence[RankCase], new: set[int], k: int = 50) -> float:
    """Recall@k over the new-post targets, averaged over the cases that have any."""
    hits = [
        len(set(top[:k].tolist()) & (c.targets & new)) / len(c.targets & new)
        for top, c in zip(tops, cases, strict=True)
        if c.targets & new
    ]
    return float(np.mean(hits)) if hits else 0.0


def boosted(model: GenerativeRanker, scored: Sequence[tuple[np.ndarray, np.ndarray]], boost: float) -> list[np.ndarray]:
    """Each case's candidates in the order `rank` serves them with `new_post_boost` = `boost`."""
    return orders(
        [(ids, boost_untrained(row, ~model.trained(torch.from_numpy(ids)).numpy(), boost)) for ids, row in scored]
    )[1]


def older_untrained(
    model: GenerativeRanker,
    data: RankingData,
    retrieved: Sequence[np.ndarray],
    cases: Sequence[RankCase],
    new: set[int],
) -> dict[str, Any]:
    """What a boost raises besides the new posts: the older posts the ranker reads by content alone,
    how many of them share an id bucket another post owns (hashed ids collide: training read them by
    content alone too), and how often one is a target among retrieval's candidates."""
    ids = torch.as_tensor(data.post_ids)
    untrained = ~model.trained(ids)
    colliding = untrained & (model.id_owners[hash_ids(ids, model.config.id_buckets)] >= 0)
    older = {int(p) for p in data.post_ids[untrained.numpy()]} - new
    return {
        "posts": len(older),
        "colliding": len({int(p) for p in data.post_ids[colliding.numpy()]} & older),
        **base_rates(retrieved, cases, older, "older_untrained", "other"),
    }


def read(
    model: GenerativeRanker,
    data: RankingData,
    vectors: np.ndarray,
    cases: Sequence[RankCase],
    candidates: int,
    new: set[int],
    sweep: bool = False,
) -> tuple[list[np.ndarray], dict[str, Any]]:
    scored = case_scores(
        model, data.tensorizer(model.config), vectors, cases, data.post_ids, data.retriever.posts, candidates
    )
    retrieved, unshifted = orders(scored)

    def row(tops: list[np.ndarray]) -> dict[str, Any]:
        m = metrics(tops, cases, (10, 50))
        return {
            "ndcg@10": m["ndcg@10"],
            "recall@10": m["recall@10"],
            "new_recall@50": new_recall(tops, cases, new),
            **placement(new_target_positions(tops, cases, new)),
        }

    out = row(unshifted)
    if sweep:
        unit = float(np.median([np.std(scores) for _, scores in scored]))
        base, members = per_case(unshifted, cases, (10,))["ndcg@10"], [c.member.id for c in cases]
        rows = []
        for k in OFFSETS:
            tops = boosted(model, scored, k * unit)
            # Paired with the unshifted order, case by case, resampling members.
            rows.append(
                {
                    "offset": k,
                    "boost": k * unit,
                    **row(tops),
                    "ndcg@10_paired": paired_ratio(base, per_case(tops, cases, (10,))["ndcg@10"], members),
                }
            )
        out["offsets"] = {
            "unit": unit,
            "older_untrained": older_untrained(model, data, retrieved, cases, new),
            "rows": rows,
        }
    return retrieved, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranker", type=Path, nargs="+", required=True)
    p.add_argument("--artifacts", type=Path, default=default_artifacts_dir())
    p.add_argument("--cache", type=Path, default=Path("runs/cache"))
    p.add_argument("--validate", action="store_true", help="the validation split (inside the training period)")
    p.add_argument("--candidates", type=int, default=500)
    p.add_argument("--out", type=Path, default=Path("benchmarks/reports/ranker/new-posts"))
    p.add_argument("--name", default="new-posts", help="the report's file name (without extension)")
    p.add_argument(
        "--sweep",
        type=Path,
        nargs="*",
        help="rankers served with new-post boosts, every untrained post raised (default: the first)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    data = RankingData.load(args.artifacts, args.cache, args.validate)
    cases = evaluation_cases(data.ml, data.split)["moments"]
    vectors = data.retriever.member_vectors([c.member for c in cases])
    new = data.new_posts()
    rows: list[dict[str, Any]] = []
    retrieved: list[np.ndarray] = []
    for directory in args.ranker:
        for probe, cls in (("", GenerativeRanker), (" [untrained posts' tokens zeroed]", UntrainedZeroed)):
            model = cls.load(directory)
            if probe and model.config.post_tokens not in ("gated", "residual"):
                continue  # the id arm reads a new post as zero already; content alone has no id to mix
            sweep = not probe and directory in (args.ranker[:1] if args.sweep is None else args.sweep)
            retrieved, row = read(model, data, vectors, cases, args.candidates, new, sweep)
            shapes = None if probe else token_shapes(model, data)
            rows.append(
                {
                    "ranker": f"{directory}{probe}",
                    "post_tokens": model.config.post_tokens,
                    "new_post_id": model.config.new_post_id,
                    **row,
                    **({"tokens": shapes} if shapes else {}),
                }
            )
            logger.info("%s", rows[-1])
    retrieval = {
        **placement(new_target_positions(retrieved, cases, new)),
        **base_rates(retrieved, cases, new),
        "new_recall@50": new_recall(retrieved, cases, new),
    }
    report = {
        "command": "python -m benchmarks.rank_new_posts " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "split": "validation" if args.validate else "test",
        "cases": len(cases),
        "candidates": args.candidates,
        "retrieval": retrieval,
        "rankers": rows,
    }
    write_report(args.out, args.name, report, markdown(report))
    return 0


def boost_cells(row: dict[str, Any]) -> str:
    """A boost sweep row's first cells: k, the boost, NDCG@10 and its ratio paired with no boost."""
    g = row["ndcg@10_paired"]
    return (
        f"| {row['offset']:+.1f} | {row['boost']:+.4f} | {row['ndcg@10']:.4f} "
        f"| {g['ratio']:.3f}x [{g['low']:.3f}, {g['high']:.3f}] "
    )


def markdown(report: dict[str, Any]) -> str:
    r = report["retrieval"]
    lines = [
        f"# New posts' targets among {report['candidates']} candidates ({report['split']} moments)",
        "",
        f"`{report['command']}`",
        "",
        f"{report['cases']} moments; {r['targets']} new-post targets among retrieval's candidates, at median "
        f"position {r['median_position']} in its order, {r['top50']} in its top 50 (their Recall@50 "
        f"{r['new_recall@50']:.4f}), {r['top100']} in its top 100. "
        f"New posts are {r['new_share_of_candidates']:.1%} of the candidates and {r['new_share_of_targets']:.1%} of "
        f"the targets among them: a new candidate is a target {r['target_rate_new']:.2%} of the time, a trained "
        f"one {r['target_rate_trained']:.2%}.",
        "",
        "Positions count from 0 (the top 50: positions 0-49). Gate and norms over the catalog: the gate's mean and "
        "10th-90th percentiles over the posts the ranker trained on; the mean norms of their tokens, of their id "
        "embeddings, and of the untrained posts' tokens (the new posts and any older post no training example showed).",
        "",
        "| ranker | tokens | NDCG@10 | Recall@10 | new targets: Recall@50 | median position | in top 50 | in top 100 "
        "| gate on trained posts: mean [q10, q90] | norm: trained token / its id / untrained token |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rankers"]:
        t = row.get("tokens")
        gate = f"{t['gate_mean']:.2f} [{t['gate_q10']:.2f}, {t['gate_q90']:.2f}]" if t else ""
        norms = f"{t['norm_trained']:.2f} / {t['norm_id_trained']:.2f} / {t['norm_untrained']:.2f}" if t else ""
        tokens = row["post_tokens"] + (f", new id {row['new_post_id']}" if row["new_post_id"] != "none" else "")
        lines.append(
            f"| {row['ranker']} | {tokens} | {row['ndcg@10']:.4f} | {row['recall@10']:.4f} "
            f"| {row['new_recall@50']:.4f} | {row['median_position']} | {row['top50']} | {row['top100']} | {gate} | {norms} |"
        )
    for row in report["rankers"]:
        if "offsets" not in row:
            continue
        unit, older = row["offsets"]["unit"], row["offsets"]["older_untrained"]
        lines += [
            "",
            f"{row['ranker']} served with `--new-post-boost` (every untrained post's final score raised by it) "
            f"at k within-case standard deviations of the final score (median {unit:.4f}). Besides the new posts "
            f"the boost raises {older['posts']} older untrained ones ({older['colliding']} of them in an id bucket "
            f"another post owns), {older['older_untrained_share_of_candidates']:.1%} of retrieval's candidates, a "
            f"target {older['target_rate_older_untrained']:.2%} of the time:",
            "",
            "| k | boost | NDCG@10 | / unboosted (paired) | Recall@10 | new targets: Recall@50 | median position "
            "| in top 50 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in row["offsets"]["rows"]:
            lines.append(
                f"{boost_cells(r)}| {r['recall@10']:.4f} | {r['new_recall@50']:.4f} "
                f"| {r['median_position']} | {r['top50']} |"
            )
    lines += ["", f"Machine: {report['machine']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
