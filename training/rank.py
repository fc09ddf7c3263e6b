"""Train the GR ranker on MovieLens, on the retrieval stage's own embeddings and candidates.

    .venv/bin/python -m feedserve.training.rank --artifacts artifacts/default --out runs/ranker --steps 1500

The retrieval encoder the server runs (`encoder.int8.onnx` where built) embeds every movie and every
member; training examples are members at moments before the split's cutoff (the retrieval stage's
global time split: nothing after it is trained on), each with every rating before the moment as
history, and as impressions the top retrieved movies then plus the movies rated next
(`feedserve.rank.data`). The loss is multi-task binary cross-entropy (like, love, dislike), with
`--listwise W` plus W times a softmax over each example's candidates (`feedserve.rank.train`).
Batches depend only on the seed and the step, and a checkpoint is kept every `--checkpoint-every`
steps: `--resume` continues a run exactly. At the end the test members (after the cutoff) are
ranked: the retrieval stage's top `--candidates` for each, reordered by the ranker's final score,
against the retrieval order (Recall@10/50, NDCG@10), at the cutoff (every later like a target) and
at `--moments` moments per member after it (`feedserve.training.rank_eval`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from feedserve.artifacts import default_artifacts_dir
from feedserve.files import atomic_file, atomic_write
from feedserve.prompt.movielens import Rating
from feedserve.rank.data import (
    FEATURES,
    LABELS,
    MOVIELENS_TASKS,
    RankExample,
    Tensorizer,
    movielens_examples,
    select_tasks,
)
from feedserve.rank.model import HISTORIES, NEUTRAL, NEW_POST_IDS, POST_TOKENS, GenerativeRanker, RankerConfig
from feedserve.rank.train import DEFAULT_TASK_WEIGHTS, multitask_loss
from feedserve.training.rank_eval import RankingData, evaluate, evaluation_cases

logger = logging.getLogger(__name__)


# How the wide term starts: PyTorch's default (uniform, about +-0.3 per feature: the bundled ranker's
# learned weights are no larger, so its start is still in it), "zero" (it adds only what training
# puts there), or "fusion": rank_eval's fixed fusion (minus the sum of the three log ranks it adds)
# in the tasks that count for a post, with the MMoE's towers zeroed, so training starts from that
# very ranking and learns corrections to it.
WIDE_INITS = ("default", "zero", "fusion")
FUSION_FEATURES = ("retrieval_log_rank", "recent_coengagement_log_rank", "sequential_coengagement_log_rank")


def init_wide(model: GenerativeRanker, how: str) -> None:
    if model.wide is None or how == "default":
        return
    with torch.no_grad():
        model.wide.weight.zero_()
        model.wide.bias.zero_()
        if how == "fusion":
            for weight in model.towers.parameters():
                weight.zero_()
            for t, task in enumerate(model.config.tasks):
                if DEFAULT_TASK_WEIGHTS.get(task, 0.0) > 0:
                    for f in FUSION_FEATURES:
                        if f in model.config.features:
                            model.wide.weight[t, model.config.features.index(f)] = -1.0


def train_ranker(
    model: GenerativeRanker,
    tensorize: Tensorizer,
    examples: list[RankExample],
    out: Path,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    checkpoint_every: int = 500,
    resume: bool = False,
    every: int = 0,
    on_step: Callable[[int], None] | None = None,
    weight_decay: float = 0.0,
    listwise: float = 0.0,
) -> list[float]:
    """AdamW on multitask_loss (Adam without `weight_decay`); returns the losses of the steps run.
    The batch of step s is drawn from `seed + s` alone, so a resumed run takes the same batches as
    an uninterrupted one. Every `every` steps `on_step(step)` sees the model in eval mode (a
    validation curve). `listwise` weighs the listwise term of `multitask_loss`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    state_path = out / "state.pt"
    start, losses = 0, []
    if resume and state_path.exists():
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, losses = int(state["step"]), list(state["losses"])
    model.train()
    for step in tqdm(range(start, steps), initial=start, total=steps, desc="ranker", disable=None):
        rng = np.random.default_rng(seed + step)
        torch.manual_seed(seed + step)
        batch = tensorize.batch([examples[i] for i in rng.choice(len(examples), batch_size, replace=False)])
        loss, _ = multitask_loss(model, batch, listwise=listwise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None and every and (step + 1) % every == 0:
            model.eval()
            on_step(step + 1)
            model.train()
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            with atomic_file(state_path) as f:
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "step": step + 1,
                        "losses": losses,
                    },
                    f,
                )
    model.eval()
    return losses


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=default_artifacts_dir(), help="the retrieval stage's")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    p.add_argument("--dropout", type=float, default=RankerConfig.dropout)
    p.add_argument(
        "--listwise", type=float, default=0.0, help="weight of the listwise loss over each member's candidates"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-member", type=int, default=6, help="training moments per member")
    p.add_argument("--shown", type=int, default=200, help="retrieved impressions per moment")
    p.add_argument(
        "--label-horizon", type=int, help="ratings after a training moment that label its impressions (default: all)"
    )
    p.add_argument(
        "--table-lag-days",
        type=float,
        default=0.0,
        help="examples read counts and co-engagement from tables built up to this long before their moment",
    )
    p.add_argument("--candidates", type=int, default=200, help="retrieved candidates ranked per test member")
    p.add_argument("--max-history", type=int, default=200)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--id-buckets", type=int, default=RankerConfig.id_buckets, help="hashed post-id embeddings")
    p.add_argument("--post-tokens", choices=POST_TOKENS, default="gated", help="content and id gated, or one alone")
    p.add_argument(
        "--id-dropout", type=float, default=0.0, help="share of post tokens trained as new posts (content alone)"
    )
    p.add_argument(
        "--new-post-id",
        choices=NEW_POST_IDS,
        default="none",
        help="what a never-trained id reads as: nothing, or one learned stand-in (needs --id-dropout)",
    )
    p.add_argument("--history", choices=HISTORIES, default="all", help="what the ranker reads of a member's history")
    p.add_argument("--no-action-tokens", action="store_true", help="ablation: every interaction read as neutral")
    p.add_argument("--no-features", action="store_true", help="ablation: no candidate features fused late")
    p.add_argument("--no-coengagement", action="store_true", help="ablation: no co-engagement features")
    p.add_argument("--no-recent", action="store_true", help="ablation: no co-engagement with the latest likes alone")
    p.add_argument("--no-sequential", action="store_true", help="ablation: no transitions from the latest likes")
    p.add_argument("--wide", action="store_true", help="a linear term of the candidate features in every logit")
    p.add_argument("--wide-init", choices=WIDE_INITS, default="default", help="how the wide term starts")
    p.add_argument("--tasks", default=",".join(MOVIELENS_TASKS), help=f"comma-separated, of {', '.join(LABELS)}")
    p.add_argument("--moments", type=int, default=10, help="evaluation moments per member (rank_eval)")
    p.add_argument("--horizon", type=int, default=10, help="ratings from a moment on whose likes are its targets")
    p.add_argument("--eval-every", type=int, default=0, help="steps between validation-curve points (0: none)")
    p.add_argument("--cache", type=Path, help="embeddings kept between runs (default: OUT/cache)")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--resume", action="store_true")
    p.add_argument(
        "--validate",
        action="store_true",
        help="train and evaluate inside the training period (a validation split); the test members are never read",
    )
    args = p.parse_args(argv)
    tasks = tuple(t for t in args.tasks.split(",") if t)
    if not tasks or not set(tasks) <= set(LABELS):
        p.error(f"--tasks: one or more of {', '.join(LABELS)}, got {args.tasks!r}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)

    data = RankingData.load(args.artifacts, args.cache or args.out / "cache", args.validate)
    ml, split, retriever, post_ids = data.ml, data.split, data.retriever, data.post_ids
    post_vectors = retriever.posts

    def embed(user: int, liked: Sequence[Rating]) -> np.ndarray:
        return retriever.member_vectors([ml.member(user, list(liked))])[0]

    examples = movielens_examples(
        ml,
        split.cutoff,
        embed,
        post_ids,
        post_vectors,
        per_member=args.per_member,
        shown=args.shown,
        seed=args.seed,
        horizon=args.label_horizon,
        table_lag=int(args.table_lag_days * 86400),
    )
    retriever.save_members()
    logger.info("%d ranker examples before the cutoff %d", len(examples), split.cutoff)
    select_tasks(examples, tasks)
    trained_ids = np.unique(
        np.concatenate([x.candidates for x in examples] + [np.array([i.post_id for x in examples for i in x.history])])
    )
    dropped = ((args.no_recent, "recent_"), (args.no_sequential, "sequential_"))
    config = RankerConfig(
        content_dim=post_vectors.shape[1],
        d_model=args.d_model,
        max_history=args.max_history,
        id_buckets=args.id_buckets,
        post_tokens=args.post_tokens,
        id_dropout=args.id_dropout,
        new_post_id=args.new_post_id,
        history=args.history,
        actions=(NEUTRAL,) if args.no_action_tokens else RankerConfig.actions,
        features=()
        if args.no_features
        else tuple(
            f
            for f in FEATURES
            if not (args.no_coengagement and "coengagement" in f)
            and not any(off and f.startswith(prefix) for off, prefix in dropped)
        ),
        tasks=tasks,
        wide=args.wide,
        dropout=args.dropout,
        max_rank=args.shown,
    )
    torch.manual_seed(args.seed)
    model = GenerativeRanker(config)
    colliding = model.learn_ids(torch.from_numpy(trained_ids))
    init_wide(model, args.wide_init)
    tensorize = data.tensorizer(config)
    protocols = evaluation_cases(ml, split, args.moments, args.horizon)
    curve: list[dict[str, object]] = []

    def validate(step: int) -> None:
        at, _ = evaluate(model, tensorize, retriever, {"moments": protocols["moments"]}, post_ids, args.candidates)
        gain = at["moments"]["ranked_over_retrieval"]
        curve.append(
            {"step": step, **at["moments"]["ranked"], **{f"{k}/retrieval": v["ratio"] for k, v in gain.items()}}
        )
        logger.info("step %d: %s", step, curve[-1])

    losses = train_ranker(
        model,
        tensorize,
        examples,
        args.out,
        args.steps,
        args.batch_size,
        args.lr,
        args.seed,
        args.checkpoint_every,
        args.resume,
        args.eval_every,
        validate,
        args.weight_decay,
        args.listwise,
    )
    model.save(args.out)

    # Every member with targets after the cutoff, ranked from the retrieval stage's candidates: at
    # the cutoff, and at many moments after it (feedserve.training.rank_eval).
    evaluation, _ = evaluate(model, tensorize, retriever, protocols, post_ids, args.candidates, data.new_posts())
    report = {
        "command": "python -m feedserve.training.rank " + " ".join(argv if argv is not None else sys.argv[1:]),
        "evaluated_on": "validation members (inside the training period)" if args.validate else "test members",
        "examples": len(examples),
        "test_members": len(split.test),
        "cutoff": split.cutoff,
        "loss_first_100": float(np.mean(losses[:100])) if losses else None,
        "loss_last_100": float(np.mean(losses[-100:])) if losses else None,
        # Trained post ids whose hashed bucket another id owns: read by content alone.
        "post_ids": {"trained": len(np.unique(trained_ids)), "colliding": colliding},
        "retrieval": evaluation["cutoff"]["retrieval"],
        "ranked": evaluation["cutoff"]["ranked"],
        **evaluation,
        "curve": curve,
        "config": json.loads((args.out / "ranker.json").read_text()),
    }
    atomic_write(args.out / "report.json", json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("retrieval", "ranked", "loss_first_100", "loss_last_100")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
