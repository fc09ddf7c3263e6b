"""Train the GR ranker on a LinkedIn-shaped feed: six tasks, passive and active, from one MMoE head.

    .venv/bin/python -m feedserve.training.rank_feed --artifacts artifacts/default --out runs/ranker-feed

The log is `feedserve.training.feed_log`'s: members shown posts in sessions, each impression with
what the member did (click, long dwell, like, comment, share, skip). The served encoder (the
artifacts' `encoder.int8.onnx` where built) embeds every post from its record (text, author,
format, tags; no counts) and every member from their record as of each session (profile and the
posts they acted on, as the retrieval prompt reads them). An example is a session: the member's
history before it (every impression acted on, with its strongest action: skips included), the
session's impressions as the candidates, one label per task. Counts (views, likes, comments,
shares) and co-engagement (likes, comments, shares) are read as they stood at the session.

The sessions before the log's global time cutoff are trained on, the ones after it evaluated
(`--validate`: the training period split again the same way, the test sessions never read): per
task, the AUC over every test impression and the GAUC (the AUC within each session, averaged
weighted by its impressions: what a ranker of one member's candidates is asked), and the NDCG@10 of
the final score (the sum of the task probabilities weighted by `FEED_TASK_WEIGHTS`, as served)
against the value of what the member did (the same weights, the skip's left out).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from feedserve.artifacts import ArtifactLayout, EncoderSettings, default_artifacts_dir
from feedserve.files import atomic_write
from feedserve.prompt.buckets import PercentileBuckets
from feedserve.rank.coengagement import CoEngagement
from feedserve.rank.data import PostTable, RankExample, Tensorizer, feature_names
from feedserve.rank.features import EventCounts, PostFeatures
from feedserve.rank.model import (
    COUNT_BUCKETS_FILE,
    INPUTS,
    NEUTRAL,
    NEW_POST_IDS,
    POST_TOKENS,
    GenerativeRanker,
    RankerConfig,
)
from feedserve.rank.train import FEED_TASK_WEIGHTS
from feedserve.training.evaluate import EmbeddingRetriever
from feedserve.training.feed_log import (
    COUNTS,
    FEED_TASKS,
    STRONGEST_FIRST,
    FeedLog,
    feed_examples,
    load_feed_log,
    synthetic_impressions,
)
from feedserve.training.rank import train_ranker

logger = logging.getLogger(__name__)

# The history's action tokens: the feed's actions, and neutral for any other.
FEED_ACTIONS = (*STRONGEST_FIRST, NEUTRAL)
# The candidate features (feedserve.rank.data's) with the feed's counts, without the transitions
# from the latest likes (chosen on MovieLens's validation moments, not tried here).
FEED_FEATURES = feature_names(COUNTS, sequential=False)


@dataclass
class FeedData:
    """The log, its split, and everything a ranker is trained and evaluated with."""

    log: FeedLog
    cutoff: int
    train: list[RankExample]
    test: list[RankExample]
    post_ids: np.ndarray
    post_vectors: np.ndarray
    features: PostFeatures
    coengagement: CoEngagement

    @classmethod
    def build(cls, log: FeedLog, retriever: EmbeddingRetriever, validate: bool = False) -> FeedData:
        """`validate`: the sessions after the test cutoff dropped and the rest split at their own."""
        cutoff = log.cutoff()
        if validate:
            log = FeedLog(log.posts, log.members, [i for i in log.impressions if i.at < cutoff], log.topic_of)
            cutoff = log.cutoff()
        post_ids = np.array([p.id for p in log.posts], np.int64)
        examples = feed_examples(log, retriever.member_vectors, post_ids, retriever.posts)
        retriever.save_members()
        # Percentile buckets of the counts as they stood at the cutoff (what the training period saw).
        buckets = log.count_buckets(cutoff)
        # Every event is held; an example reads those before its session (`RankExample.at`).
        tags = {p.id: p.tags for p in log.posts}
        features = PostFeatures(tags=tags, counts=COUNTS, log=EventCounts(log.count_events(), buckets), buckets=buckets)
        return cls(
            log,
            cutoff,
            [x for x in examples if x.at is not None and x.at < cutoff],
            [x for x in examples if x.at is not None and x.at >= cutoff],
            post_ids,
            retriever.posts,
            features,
            CoEngagement.from_events(log.engagements()),
        )

    def training(self, tasks: Sequence[str]) -> list[RankExample]:
        """The training sessions labelled for `tasks` alone, in that order."""
        columns = [FEED_TASKS.index(t) for t in tasks]
        return [replace(x, labels=x.labels[:, columns]) for x in self.train]

    def tensorizer(self, config: RankerConfig) -> Tensorizer:
        return Tensorizer(config, PostTable(self.post_ids, self.post_vectors), self.features, self.coengagement)

    def trained_ids(self) -> np.ndarray:
        """The post ids the training sessions show or hold in their histories (the ids with an embedding)."""
        return np.unique(
            np.concatenate(
                [x.candidates for x in self.train]
                + [np.array([i.post_id for x in self.train for i in x.history], np.int64)]
            )
        )


def feed_config(content_dim: int, tasks: Sequence[str] = FEED_TASKS, **overrides: Any) -> RankerConfig:
    """The ranker for the feed: its tasks, actions and features, any of them `overrides`' instead (an
    ablation's; callers pass max_rank, a session's impressions)."""
    fields: dict[str, Any] = {"actions": FEED_ACTIONS, "features": FEED_FEATURES, **overrides}
    return RankerConfig(content_dim=content_dim, tasks=tuple(tasks), **fields)


def predict(
    model: GenerativeRanker, tensorize: Tensorizer, examples: Sequence[RankExample], batch: int = 64
) -> list[np.ndarray]:
    """The model's probabilities per example, [candidates, tasks]."""
    model.eval()
    tasks = len(model.config.tasks)
    out: list[np.ndarray] = []
    with torch.no_grad():
        for start in range(0, len(examples), batch):
            # Unlabelled: the examples' labels are FEED_TASKS', the model may be trained on fewer.
            part = [
                replace(x, labels=np.zeros((len(x.candidates), tasks), np.float32))
                for x in examples[start : start + batch]
            ]
            t = tensorize.batch(part)
            logits = model(**{k: t[k] for k in INPUTS}).numpy()
            out.extend(1.0 / (1.0 + np.exp(-row[: len(x.candidates)])) for x, row in zip(part, logits, strict=True))
    return out


def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """The probability that a positive outscores a negative (ties count half); None without both."""
    positive = np.asarray(labels) > 0.5
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if not n_pos or not n_neg:
        return None
    values, inverse, counts = np.unique(np.asarray(scores, np.float64), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]  # 1-based, ties at their average
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def ndcg_at(order: np.ndarray, gains: np.ndarray, k: int = 10) -> float | None:
    """NDCG@k of candidates in `order` (indices) with these gains; None where no candidate has any."""
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = float(np.sort(gains)[::-1][:k] @ discount[: min(k, len(gains))])
    if ideal <= 0:
        return None
    return float(gains[order[:k]] @ discount[: min(k, len(order))]) / ideal


def per_session(
    examples: Sequence[RankExample],
    scores: Sequence[np.ndarray],
    tasks: Sequence[str],
    weights: Mapping[str, float] = FEED_TASK_WEIGHTS,
) -> dict[str, np.ndarray]:
    """Each session's AUC per task (nan where the session has no positive or no negative), and with
    every one of FEED_TASKS (in any order) the NDCG@10 of the final score against the value of what the member did
    (nan where they did nothing of value): the values a paired comparison of two rankers resamples."""
    labels = [x.labels for x in examples]
    out = {}
    for t, task in enumerate(tasks):
        column = FEED_TASKS.index(task)
        values = [auc(s[:, t], y[:, column]) for s, y in zip(scores, labels, strict=True)]
        out[task] = np.array([np.nan if v is None else v for v in values])
    if sorted(tasks) == sorted(FEED_TASKS):
        weighted = np.array([weights[t] for t in tasks], np.float32)  # the final score, as served
        value = np.maximum(np.array([weights[t] for t in FEED_TASKS], np.float32), 0.0)  # the labels' columns
        ranked = [
            ndcg_at(np.argsort(-(s @ weighted), kind="stable"), y @ value) for s, y in zip(scores, labels, strict=True)
        ]
        out["final"] = np.array([np.nan if v is None else v for v in ranked])
    return out


def task_report(
    examples: Sequence[RankExample],
    scores: Sequence[np.ndarray],
    tasks: Sequence[str],
    weights: Mapping[str, float] = FEED_TASK_WEIGHTS,
) -> dict[str, Any]:
    """Per task, AUC and GAUC of `scores` ([candidates, len(tasks)] per example: higher, likelier),
    against the examples' labels (the columns of FEED_TASKS); with probabilities of every one of
    FEED_TASKS, the final score's NDCG@10 (`per_session`)."""
    sessions = per_session(examples, scores, tasks, weights)
    sizes = np.array([len(x.candidates) for x in examples], np.float64)
    report: dict[str, Any] = {}
    for t, task in enumerate(tasks):
        column = FEED_TASKS.index(task)
        held = ~np.isnan(sessions[task])
        report[task] = {
            "auc": auc(
                np.concatenate([s[:, t] for s in scores]), np.concatenate([x.labels[:, column] for x in examples])
            ),
            "gauc": float(np.average(sessions[task][held], weights=sizes[held])) if held.any() else None,
            "positives": int(sum(x.labels[:, column].sum() for x in examples)),
        }
    if "final" in sessions:
        held = ~np.isnan(sessions["final"])
        report["final"] = {
            "ndcg@10": float(sessions["final"][held].mean()) if held.any() else None,
            "sessions": int(held.sum()),
        }
    return report


def load_retriever(artifacts: Path, log: FeedLog, cache: Path) -> EmbeddingRetriever:
    """The served encoder (the int8 graph where built), embedding the log's posts (cached)."""
    layout = ArtifactLayout(artifacts)
    graph = layout.onnx_int8 if layout.onnx_int8.exists() else layout.onnx
    settings = EncoderSettings.load(layout.settings)
    buckets = PercentileBuckets.load(layout.buckets)
    return EmbeddingRetriever(layout.hf_dir, settings, buckets, log.posts, cache, onnx=graph)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=default_artifacts_dir(), help="the retrieval stage's")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cache", type=Path, help="embeddings kept between runs (default: OUT/cache)")
    p.add_argument(
        "--log",
        type=Path,
        help="a saved feed log (`python -m feedserve.training.feed_log`) instead of "
        "generating one from the flags below",
    )
    p.add_argument("--members", type=int, default=400)
    p.add_argument("--posts", type=int, default=2000)
    p.add_argument("--sessions", type=int, default=12, help="sessions per member")
    p.add_argument("--shown", type=int, default=24, help="impressions per session")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--experts", type=int, default=RankerConfig.n_experts, help="MMoE experts (1: a shared bottom)")
    p.add_argument("--tasks", default=",".join(FEED_TASKS), help=f"comma-separated, of {', '.join(FEED_TASKS)}")
    p.add_argument("--no-action-tokens", action="store_true", help="ablation: every interaction read as neutral")
    p.add_argument("--post-tokens", choices=POST_TOKENS, default="gated", help="content and id mixed, or one alone")
    p.add_argument(
        "--id-dropout",
        type=float,
        default=0.5,
        help="share of post tokens trained as if their post were new (content alone), as half the test "
        "impressions' posts are (benchmarks/reports/rank_tasks: level with content alone, above ids alone; "
        "0 falls below both)",
    )
    p.add_argument(
        "--new-post-id",
        choices=NEW_POST_IDS,
        default="none",
        help="what a never-trained id reads as: nothing (content alone), or one stand-in learned on the dropped ids",
    )
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--validate", action="store_true", help="train and evaluate inside the training period")
    args = p.parse_args(argv)
    tasks = tuple(t for t in args.tasks.split(",") if t)
    if not tasks or not set(tasks) <= set(FEED_TASKS) or len(set(tasks)) != len(tasks):
        p.error(f"--tasks: one or more of {', '.join(FEED_TASKS)}, each once, got {args.tasks!r}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)

    if args.log is not None:
        log = load_feed_log(args.log)
    else:
        log = synthetic_impressions(
            args.members, args.posts, sessions=args.sessions, shown=args.shown, seed=args.data_seed
        )
    data = FeedData.build(log, load_retriever(args.artifacts, log, args.cache or args.out / "cache"), args.validate)
    logger.info("%d training sessions, %d evaluated (cutoff %d)", len(data.train), len(data.test), data.cutoff)
    config = feed_config(
        data.post_vectors.shape[1],
        tasks,
        d_model=args.d_model,
        n_experts=args.experts,
        max_rank=args.shown,
        post_tokens=args.post_tokens,
        id_dropout=args.id_dropout,
        new_post_id=args.new_post_id,
        **({"actions": (NEUTRAL,)} if args.no_action_tokens else {}),
    )
    torch.manual_seed(args.seed)
    model = GenerativeRanker(config)
    trained_ids = data.trained_ids()
    colliding = model.learn_ids(torch.from_numpy(trained_ids))
    tensorize = data.tensorizer(config)
    losses = train_ranker(
        model,
        tensorize,
        data.training(tasks),
        args.out,
        args.steps,
        args.batch_size,
        args.lr,
        args.seed,
        args.checkpoint_every,
        args.resume,
    )
    model.save(args.out)
    if data.features.buckets is not None:  # the counts' cut points: serving must read them the same way
        data.features.buckets.save(args.out / COUNT_BUCKETS_FILE)
    scores = predict(model, tensorize, data.test)
    report = {
        "command": "python -m feedserve.training.rank_feed " + " ".join(argv if argv is not None else sys.argv[1:]),
        "evaluated_on": "validation sessions (inside the training period)" if args.validate else "test sessions",
        "training_sessions": len(data.train),
        "test_sessions": len(data.test),
        "test_impressions": int(sum(len(x.candidates) for x in data.test)),
        "cutoff": data.cutoff,
        "loss_first_100": float(np.mean(losses[:100])) if losses else None,
        "loss_last_100": float(np.mean(losses[-100:])) if losses else None,
        # Trained post ids whose hashed bucket another id owns: read by content alone.
        "post_ids": {"trained": len(np.unique(trained_ids)), "colliding": colliding},
        "tasks": task_report(data.test, scores, tasks),
        "config": json.loads((args.out / "ranker.json").read_text()),
    }
    atomic_write(args.out / "report.json", json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["tasks"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
