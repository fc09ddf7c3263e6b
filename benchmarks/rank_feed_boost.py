"""What `--new-post-boost` trades on the LinkedIn-shaped feed log, where half the test impressions
are posts created after the training cutoff.

    .venv/bin/python -m benchmarks.rank_feed_boost [--log runs/feed-log] [--ranker runs/ranker-feed]

The ranker (`python -m feedserve.training.rank_feed --log LOG`, its default recipe) scores the test
sessions' impressions of the log it trained on (`python -m feedserve.training.feed_log --out LOG`); each session is ordered by the served final score (`FEED_TASK_WEIGHTS`) with every
post the ranker never trained on raised by the boost (feedserve.rank.train.boost_untrained, as `rank`
serves it), the boosts `rank_new_posts --sweep` tries (OFFSETS), in within-session standard
deviations of the final score. Reported: NDCG@10 against the value of what each member did, paired with
the unboosted order over the same sessions (95% bootstrap over members), and the untrained posts'
share of each top 10. In this log a post's chance of each action does not depend on its age
(`feedserve.training.feed_log`): a boost can gain only where the ranker scores new posts below
what their content earns.
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
from benchmarks.rank_new_posts import OFFSETS, boost_cells
from feedserve.artifacts import default_artifacts_dir
from feedserve.clients.perf import machine
from feedserve.rank.data import RankExample
from feedserve.rank.model import GenerativeRanker
from feedserve.rank.train import FEED_TASK_WEIGHTS, boost_untrained
from feedserve.training.evaluate import paired_ratio
from feedserve.training.feed_log import FEED_TASKS, load_feed_log
from feedserve.training.rank_feed import FeedData, load_retriever, ndcg_at, predict

logger = logging.getLogger(__name__)


# What a member's actions are worth, per column of FEED_TASKS (a skip nothing): NDCG@10's gains.
VALUE = np.maximum(np.array([FEED_TASK_WEIGHTS[t] for t in FEED_TASKS], np.float32), 0.0)


def sessions_at(
    examples: Sequence[RankExample], finals: Sequence[np.ndarray], untrained: Sequence[np.ndarray], boost: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per session: NDCG@10 of its final scores boosted where `untrained` (nan where the member did
    nothing of value) and the share of its top 10 the ranker never trained on."""
    ndcg, untrained_top = [], []
    for x, final, fresh in zip(examples, finals, untrained, strict=True):
        order = np.argsort(-boost_untrained(final, fresh, boost), kind="stable")
        v = ndcg_at(order, x.labels @ VALUE)
        ndcg.append(np.nan if v is None else v)
        untrained_top.append(float(fresh[order[:10]].mean()))
    return np.array(ndcg), np.array(untrained_top)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--log", type=Path, default=Path("runs/feed-log"), help="the feed log the ranker trained on")
    p.add_argument("--ranker", type=Path, default=Path("runs/ranker-feed"), help="a rank_feed ranker (default recipe)")
    p.add_argument("--artifacts", type=Path, default=default_artifacts_dir())
    p.add_argument("--cache", type=Path, help="embeddings kept between runs (default: RANKER/cache)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/reports/ranker/new-posts"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    log = load_feed_log(args.log)
    data = FeedData.build(log, load_retriever(args.artifacts, log, args.cache or args.ranker / "cache"))
    model = GenerativeRanker.load(args.ranker)
    if tuple(sorted(model.config.tasks)) != tuple(sorted(FEED_TASKS)):
        p.error(f"--ranker: a ranker of the feed's six tasks, got {list(model.config.tasks)}")
    probabilities = predict(model, data.tensorizer(model.config), data.test)
    weights = np.array([FEED_TASK_WEIGHTS[t] for t in model.config.tasks], np.float32)
    finals = [s @ weights for s in probabilities]  # the served final score, before any boost
    per_session = [~model.trained(torch.from_numpy(x.candidates)).numpy() for x in data.test]
    unit = float(np.median([np.std(f) for f in finals]))
    members = np.array([x.member_id for x in data.test])
    candidates = np.concatenate([x.candidates for x in data.test])
    untrained = np.concatenate(per_session)
    valued = np.concatenate([x.labels @ VALUE for x in data.test]) > 0
    base, _ = sessions_at(data.test, finals, per_session, 0.0)
    held = ~np.isnan(base)
    rows: list[dict[str, Any]] = []
    for k in OFFSETS:
        ndcg, top = sessions_at(data.test, finals, per_session, k * unit)
        rows.append(
            {
                "offset": k,
                "boost": k * unit,
                "ndcg@10": float(ndcg[held].mean()),
                "ndcg@10_paired": paired_ratio(base[held], ndcg[held], members[held].tolist()),
                "untrained_share_of_top10": float(top.mean()),
            }
        )
        logger.info("%s", rows[-1])
    report = {
        "command": "python -m benchmarks.rank_feed_boost " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "ranker": str(args.ranker),
        "sessions": int(held.sum()),
        "impressions": len(candidates),
        "untrained_share_of_impressions": float(untrained.mean()),
        "valued_rate_untrained": float(valued[untrained].mean()),
        "valued_rate_trained": float(valued[~untrained].mean()),
        "unit": unit,
        "rows": rows,
    }
    write_report(args.out, "feed-log", report, markdown(report))
    return 0


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# `--new-post-boost` on the feed log's test sessions",
        "",
        f"`{report['command']}`",
        "",
        f"{report['ranker']} over {report['sessions']} test sessions with something of value "
        f"({report['impressions']} impressions in all). The posts it never trained on are "
        f"{report['untrained_share_of_impressions']:.1%} of the impressions; one is acted on with value (a "
        f"positive-weight action) {report['valued_rate_untrained']:.1%} of the time, a trained one "
        f"{report['valued_rate_trained']:.1%}. Boosts in within-session standard deviations of the final score "
        f"(median {report['unit']:.4f}); NDCG@10 paired with the unboosted order, 95% bootstrap over members.",
        "",
        "| k | boost | NDCG@10 | / unboosted (paired) | untrained share of the top 10 |",
        "|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(f"{boost_cells(r)}| {r['untrained_share_of_top10']:.1%} |")
    lines += ["", f"Machine: {report['machine']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
