"""Quality of the ranked feed on MovieLens: the GR ranker against retrieval alone and the baselines.

    .venv/bin/python -m benchmarks.rank_quality [--ranker models/gr-movielens] [--candidates 500]

The project's global time split, full catalog, every movie a member rated before the moment
excluded (as a server given the whole record excludes them), on two protocols
(`feedserve.training.rank_eval`): at the cutoff, the 80 test members of the retrieval benchmark
(`benchmarks/reports/quality.md`) with every movie they liked after it as targets; and at up to
`--moments` moments per member after the cutoff, targets the likes among the next `--horizon` ratings:

- retrieval: the served encoder (the int8 graph), top `--candidates` by cosine (by default as many
  as `feed` retrieves by default: the served configuration);
- feed: the same candidates ordered by the GR ranker's final score (what `feed` serves; the served
  graph equals PyTorch, tests/unit/test_rank_backend.py), history every rating before the moment,
  with a bootstrap interval over members for its gain over retrieval;
- popularity and ItemKNN (from every like, and from the latest likes) over the whole catalog
  (`feedserve.training.baselines`);
- a fixed fusion of the ranker's two strongest inputs: retrieval's candidates ordered by the sum of
  their log ranks by retrieval score and by ItemKNN score (what a learned ranker has to beat to
  have learned more than adding the two); and the same with ItemKNN read from the member's latest
  likes alone (`--recent-likes`; the ranker's recent co-engagement feature reads `RECENT_LIKES`), and
  that plus the rank by transitions from the latest likes (the ranker's sequential feature);
- transitions from the latest likes alone (who liked a post soon after one of them), over the whole
  catalog;
- SASRec: an id-only causal transformer over each member's liked sequence, trained here on the
  training period (`feedserve.training.sasrec`), over the whole catalog.

Every row is also read on the new posts alone: the targets nobody had rated before the cutoff
(`RankingData.new_posts`), which no id embedding, co-engagement or SASRec has seen.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import write_report
from feedserve.artifacts import DEFAULT_RANKER, default_artifacts_dir
from feedserve.clients.online import DEFAULT_CANDIDATES
from feedserve.clients.perf import machine
from feedserve.rank.data import LIKE, RECENT_LIKES, SEQUENCE_LIKES
from feedserve.rank.model import GenerativeRanker
from feedserve.training.baselines import Popularity
from feedserve.training.evaluate import metrics, rank
from feedserve.training.rank_eval import (
    RankingData,
    case_scores,
    compare,
    evaluation_cases,
    fused,
    new_post_cases,
    orders,
    paired_text,
)
from feedserve.training.sasrec import SASRecConfig, SASRecRecommender

logger = logging.getLogger("benchmarks.rank_quality")

KS = (10, 50)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=default_artifacts_dir())
    p.add_argument("--ranker", type=Path, default=DEFAULT_RANKER)
    p.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES, help="retrieved, then ranked")
    p.add_argument("--moments", type=int, default=10, help="moments per member (training.rank_eval)")
    p.add_argument("--horizon", type=int, default=10, help="ratings from a moment on whose likes are its targets")
    p.add_argument(
        "--recent-likes",
        type=int,
        nargs="+",
        default=[RECENT_LIKES],
        help="ItemKNN (alone and fused) from each member's latest K likes, for each K",
    )
    p.add_argument("--sasrec-steps", type=int, default=SASRecConfig.steps)
    p.add_argument("--cache", type=Path, default=Path("benchmarks/.cache/rank_quality"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/reports/ranker"))
    p.add_argument(
        "--validate",
        action="store_true",
        help="the validation split inside the training period (for choosing a ranker; the test members are not read)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    data = RankingData.load(args.artifacts, args.cache, args.validate)
    ml, split, retriever, ids = data.ml, data.split, data.retriever, data.post_ids
    model = GenerativeRanker.load(args.ranker)
    tensorize = data.tensorizer(model.config)
    before = ml.ratings_by_user(before=split.cutoff)
    t = time.perf_counter()
    sasrec = SASRecRecommender(ids, SASRecConfig(steps=args.sasrec_steps))
    losses = sasrec.fit([[r.movie for r in before[u] if r.rating >= LIKE] for u in sorted(before)])
    sasrec_s = time.perf_counter() - t
    popularity, itemknn = Popularity(split, ids), data.itemknn()
    new_posts = data.new_posts()
    results: dict[str, Any] = {}
    for protocol, cases in evaluation_cases(ml, split, args.moments, args.horizon).items():
        members = [c.member for c in cases]
        retrieval_top, feed_top = orders(
            case_scores(
                model, tensorize, retriever.member_vectors(members), cases, ids, retriever.posts, args.candidates
            )
        )
        tops: dict[str, list[np.ndarray]] = {
            f"retrieval (served int8 encoder, top {args.candidates})": retrieval_top,
            f"feed: retrieval top {args.candidates} ranked by the GR ranker": feed_top,
        }
        histories: Sequence[Sequence[int]] = [[h.post_id for h in m.history] for m in members]
        knn = itemknn.score(members)
        recent = {
            k: itemknn.score([m.model_copy(update={"history": m.history[-k:]}) for m in members])
            for k in args.recent_likes
        }
        sequential = data.transitions(cases)
        fusions = {
            f"retrieval top {args.candidates} by retrieval + ItemKNN log rank (fixed fusion)": fused(
                retrieval_top, ids, knn
            )
        }
        for k, scores in recent.items():
            fusions[f"the same, ItemKNN from the {k} latest likes"] = fused(retrieval_top, ids, scores)
        if RECENT_LIKES in recent:
            fusions[f"the same, + transitions from the {SEQUENCE_LIKES} latest likes"] = fused(
                retrieval_top, ids, recent[RECENT_LIKES], sequential
            )
        tops.update(fusions)
        for name, scores in (
            ("popularity", popularity.score(members)),
            ("ItemKNN", knn),
            *((f"ItemKNN from the {k} latest likes", scores) for k, scores in recent.items()),
            (f"transitions from the {SEQUENCE_LIKES} latest likes", sequential),
            (f"SASRec (id only, {args.sasrec_steps} steps)", sasrec.score(histories)),
        ):
            tops[name] = rank(scores, ids, cases, max(KS))
        # The same rows on the targets nobody had rated before the cutoff (rank_eval's new posts).
        new, new_cases = new_post_cases(cases, new_posts)
        results[protocol] = {
            "cases": len(cases),
            "members": len({m.id for m in members}),
            "rows": {name: metrics(top, cases, KS) for name, top in tops.items()},
            "feed_over_retrieval": compare(retrieval_top, feed_top, cases)["ranked_over_retrieval"],
            # The learned ranker against each fixed fusion of its own inputs, paired case by case.
            "feed_over_fusions": {
                name: compare(top, feed_top, cases)["ranked_over_retrieval"] for name, top in fusions.items()
            },
            "new_posts": {
                "cases": len(new_cases),
                "targets": sum(len(c.targets) for c in new_cases),
                "rows": {name: metrics([top[i] for i in new], new_cases, KS) for name, top in tops.items()},
            },
        }
    report = {
        "command": "python -m benchmarks.rank_quality " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "ranker": str(args.ranker),
        "evaluated_on": "validation members (inside the training period)" if args.validate else "test members",
        "ranker_config": json.loads((args.ranker / "ranker.json").read_text()),
        "cutoff": split.cutoff,
        "moments": args.moments,
        "horizon": args.horizon,
        "sasrec": {
            "seconds": sasrec_s,
            "loss_first_100": float(np.mean(losses[:100])),
            "loss_last_100": float(np.mean(losses[-100:])),
        },
        **results,
    }
    lines = [
        "# Ranked feed quality on MovieLens",
        "",
        f"Command: `{report['command']}`. Machine: {report['machine']}.",
        f"Global time split at {split.cutoff}, full catalog, every movie a member rated before the moment excluded.",
        f"Evaluated on the {report['evaluated_on']}.",
    ]
    titles = {
        "cutoff": "At the cutoff: one case per member, every later like a target",
        "moments": f"At up to {args.moments} moments per member after the cutoff, targets the likes among "
        f"the next {args.horizon} ratings",
    }
    for protocol, result in results.items():
        base = next(iter(result["rows"].values()))
        lines += [
            "",
            f"## {titles[protocol]} ({result['cases']} cases, {result['members']} members)",
            "",
            f"New posts: the {result['new_posts']['targets']} targets nobody had rated before the cutoff, "
            f"in the {result['new_posts']['cases']} cases that have any.",
            "",
            "| model | Recall@10 | Recall@50 | NDCG@10 | NDCG@10 / retrieval | new posts: Recall@10 | Recall@50 | NDCG@10 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, m in result["rows"].items():
            n = result["new_posts"]["rows"][name]
            lines.append(
                f"| {name} | {m['recall@10']:.4f} | {m['recall@50']:.4f} | {m['ndcg@10']:.4f} | "
                f"{m['ndcg@10'] / base['ndcg@10']:.2f}x | {n['recall@10']:.4f} | {n['recall@50']:.4f} | "
                f"{n['ndcg@10']:.4f} |"
            )
        gain = result["feed_over_retrieval"]
        lines += [
            "",
            "feed / retrieval, 95% bootstrap interval over members: "
            + "; ".join(f"{k} {v['ratio']:.2f}x [{v['low']:.2f}, {v['high']:.2f}]" for k, v in gain.items()),
            "",
            "feed / each fixed fusion, paired case by case (interval over members; P: resamples above 1):",
            "",
        ]
        for name, over in result["feed_over_fusions"].items():
            lines.append(
                f"- {name}: "
                + "; ".join(f"{k} {paired_text(v)}" for k, v in over.items() if k in ("recall@10", "ndcg@10"))
            )
    write_report(args.out, "quality", report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
