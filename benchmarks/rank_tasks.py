"""The feed ranker's six tasks: one MMoE head against a shared bottom, one model per task, the
ranker without its action tokens, and its post tokens of content alone or of ids alone rather than
gated, or mixed as content plus a gated id (`residual`), each mix also trained with half its ids
dropped (`id_dropout`; every gated ranker is paired against both arms); retrieval and popularity as
the floor, and the chances the log drew each action from (what no ranker can beat) as the ceiling.

    .venv/bin/python -m benchmarks.rank_tasks [--steps 800] [--out benchmarks/reports/rank_tasks]

On `feedserve.training.feed_log`'s LinkedIn-shaped log (400 members, 2,000 posts, 12 sessions of 24
impressions each), embedded by the served encoder of `artifacts/default` (`make demo`), trained on
the sessions before the global cutoff and evaluated on the sessions after it
(`feedserve.training.rank_feed`). Every ranker gets the same steps, batches and seed. Reported per
task: the AUC over every test impression and the GAUC (within each session, weighted by its
impressions); and the NDCG@10 of the final score (the served weighted sum, `FEED_TASK_WEIGHTS`)
against the value of what each member did. Against the MMoE: paired ratios with 95% intervals from
a bootstrap over members (`feedserve.training.evaluate.paired_ratio`).
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
from feedserve.rank.model import NEUTRAL, GenerativeRanker
from feedserve.training.evaluate import paired_ratio
from feedserve.training.feed_log import FEED_TASKS, synthetic_impressions
from feedserve.training.rank import train_ranker
from feedserve.training.rank_feed import FeedData, feed_config, load_retriever, per_session, predict, task_report

logger = logging.getLogger(__name__)
REPORT = Path(__file__).parent / "reports" / "rank_tasks"


# The rankers that mix a post's content and id, and the two arms they mix (by row name).
ARMS = ("MMoE, post tokens of content alone", "MMoE, post tokens of ids alone")
GATED = (
    "MMoE, 4 experts",
    "MMoE, content plus a gated id",
    "MMoE, gated, half the ids dropped in training (rank_feed's default)",
    "MMoE, content plus a gated id, half the ids dropped in training",
)


def train_and_predict(
    data: FeedData, out: Path, steps: int, tasks: Sequence[str], **overrides: Any
) -> list[np.ndarray]:
    """A ranker of `tasks` trained on the training sessions; its probabilities on the test sessions."""
    config = feed_config(data.post_vectors.shape[1], tasks, max_rank=24, **overrides)
    torch.manual_seed(0)
    model = GenerativeRanker(config, known_ids=torch.from_numpy(data.trained_ids()))
    tensorize = data.tensorizer(config)
    # A checkpoint that has run all its steps is read back rather than trained again (`--runs`).
    train_ranker(model, tensorize, data.training(tasks), out, steps, checkpoint_every=steps, resume=True)
    return predict(model, tensorize, data.test)


def baseline(data: FeedData, score: str) -> list[np.ndarray]:
    """One score for every task (its opposite for the skip): the retrieval score, or the likes so far."""
    sign = np.array([-1.0 if t == "skip" else 1.0 for t in FEED_TASKS])
    out = []
    for x in data.test:
        if score == "retrieval":
            s = x.retrieval_scores.astype(np.float64)
        else:
            s = data.features.percentiles(x.candidates.tolist(), x.at)[:, data.features.counts.index("likes")]
        out.append(s[:, None] * sign[None, :])
    return out


def task_table(first: str, rows: Sequence[dict[str, Any]]) -> list[str]:
    """A markdown table of `task_report`s: a row's AUC (GAUC) per task and its NDCG@10."""
    lines = ["| " + " | ".join([first, *FEED_TASKS, "NDCG@10"]) + " |", "|---|" + "---|" * (len(FEED_TASKS) + 1)]
    for row in rows:
        cells = [f"{row['tasks'][t]['auc']:.4f} ({row['tasks'][t]['gauc']:.4f})" for t in FEED_TASKS]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + f" | {row['tasks']['final']['ndcg@10']:.4f} |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    tasks = list(FEED_TASKS)
    lines = [
        "# The feed ranker's tasks: MMoE, shared bottom, one model per task",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']}",
        "",
        f"Data: `synthetic_impressions()` (seed 0): {report['training_sessions']:,} training sessions and "
        f"{report['test_sessions']:,} test sessions ({report['test_impressions']:,} impressions) after the cutoff. "
        f"Every ranker: {report['steps']} steps of 32 sessions, seed 0, d 64, 2 layers, 200 history items.",
        "",
        "AUC over every test impression (GAUC: within each session, weighted by its impressions, in brackets); "
        "NDCG@10: the final score's order of each session against the value of what the member did.",
        "",
        *task_table("model", report["rows"]),
    ]
    lines += [
        "",
        "Paired against the MMoE (ratio of means over the same sessions, 95% bootstrap interval over members):",
        "",
        "| model | " + " | ".join(f"{t} GAUC" for t in tasks) + " | NDCG@10 |",
        "|---|" + "---|" * (len(tasks) + 1),
    ]
    for row in report["rows"][1:]:
        cells = [
            f"{g['ratio']:.3f} [{g['low']:.3f}, {g['high']:.3f}]"
            for g in (row["over_mmoe"][k] for k in [*tasks, "final"])
        ]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "The gate against its arms (NDCG@10, the ratio to content alone and to ids alone, paired as above):",
        "",
        "| model | / content alone | / ids alone |",
        "|---|---|---|",
    ]
    for row in report["rows"]:
        if "over_arms" in row:
            cells = [f"{g['ratio']:.3f} [{g['low']:.3f}, {g['high']:.3f}]" for g in row["over_arms"].values()]
            lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    lines.append("")
    positives = ", ".join(f"{t} {report['rows'][0]['tasks'][t]['positives']:,}" for t in tasks)
    lines.append(f"Positives among the test impressions: {positives}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from feedserve.clients.perf import machine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=default_artifacts_dir())
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--runs", type=Path, default=Path("runs/rank_tasks"), help="checkpoints and the embedding cache")
    p.add_argument("--out", type=Path, default=REPORT)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    log = synthetic_impressions()
    data = FeedData.build(log, load_retriever(args.artifacts, log, args.runs / "cache"))
    members = [x.member_id for x in data.test]
    rows: list[dict[str, Any]] = []
    probabilities: dict[str, list[np.ndarray]] = {}

    def add(name: str, scores: list[np.ndarray]) -> None:
        probabilities[name] = scores
        rows.append({"name": name, "tasks": task_report(data.test, scores, FEED_TASKS)})
        logger.info("%s: %s", name, rows[-1]["tasks"])

    variants: list[tuple[str, list[tuple[str, tuple[str, ...], dict[str, Any]]]]] = [
        ("MMoE, 4 experts", [("mmoe", FEED_TASKS, {})]),
        ("shared bottom (1 expert)", [("shared-bottom", FEED_TASKS, {"n_experts": 1})]),
        ("one model per task", [(f"single-{t}".replace(" ", "-"), (t,), {}) for t in FEED_TASKS]),
        ("MMoE, no action tokens", [("no-actions", FEED_TASKS, {"actions": (NEUTRAL,)})]),
        ("MMoE, post tokens of content alone", [("content-only", FEED_TASKS, {"post_tokens": "content"})]),
        ("MMoE, post tokens of ids alone", [("id-only", FEED_TASKS, {"post_tokens": "id"})]),
        ("MMoE, content plus a gated id", [("residual", FEED_TASKS, {"post_tokens": "residual"})]),
        (
            "MMoE, gated, half the ids dropped in training (rank_feed's default)",
            [("id-dropout", FEED_TASKS, {"id_dropout": 0.5})],
        ),
        (
            "MMoE, content plus a gated id, half the ids dropped in training",
            [("residual-id-dropout", FEED_TASKS, {"post_tokens": "residual", "id_dropout": 0.5})],
        ),
    ]
    for name, runs in variants:
        parts = [train_and_predict(data, args.runs / run, args.steps, tasks, **over) for run, tasks, over in runs]
        # One model per task: each task's column from its own model.
        add(name, [np.concatenate([p[i] for p in parts], axis=1) for i in range(len(data.test))])
    chances = {(i.member, i.at, i.post): i.chances for i in log.impressions}
    add(
        "the log's own chances (the ceiling)",
        [np.array([chances[(x.member_id, x.at, c)] for c in x.candidates.tolist()]) for x in data.test],
    )
    add("retrieval score", baseline(data, "retrieval"))
    add("popularity (likes so far)", baseline(data, "likes"))

    sizes = np.array([len(x.candidates) for x in data.test], np.float64)
    sessions = {name: per_session(data.test, scores, FEED_TASKS) for name, scores in probabilities.items()}

    def over(reference: str, other: str, keys: Sequence[str]) -> dict[str, dict[str, float]]:
        """`other` against `reference` per key: the ratio of means over the same sessions (GAUCs
        weighted by the sessions' impressions), with its interval over members."""
        out = {}
        for key in keys:
            held = ~np.isnan(sessions[reference][key])
            w = sizes[held] if key != "final" else np.ones(int(held.sum()))
            out[key] = paired_ratio(
                sessions[reference][key][held] * w,
                sessions[other][key][held] * w,
                [members[i] for i in np.flatnonzero(held)],
            )
        return out

    for row in rows[1:]:
        row["over_mmoe"] = over(rows[0]["name"], row["name"], [*FEED_TASKS, "final"])
    # The target for the gate: above both of its arms.
    for row in rows:
        if row["name"] in GATED:
            row["over_arms"] = {arm: over(arm, row["name"], ["final"])["final"] for arm in ARMS}
    report = {
        "command": "python -m benchmarks.rank_tasks " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "steps": args.steps,
        "training_sessions": len(data.train),
        "test_sessions": len(data.test),
        "test_impressions": int(sizes.sum()),
        "rows": rows,
    }
    write_report(args.out, "rank_tasks", report, markdown(report), "README.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
