"""Evaluate saved GR rankers: the retrieval stage's top candidates reordered by each ranker, against
the retrieval order, at many moments per member.

    .venv/bin/python -m feedserve.training.rank_eval --validate --ranker runs/abl/gated-s0 runs/abl/engaged

One global cutoff gives one case per member active after it (57 members on the validation split, 80
on the test split): too few to tell ranker configurations apart (two rankers that differed only in
their id buckets were as far apart as the gain either claimed). Here each of those members is evaluated at up
to `--moments` moments spread over their ratings after the cutoff: the history is every rating
before the moment (read as a server would read it; never trained on), the targets the movies liked
among the next `--horizon` ratings. A member's moments are correlated, so the uncertainty of a
ranker's gain over retrieval is a bootstrap over members (`paired_ratio`).

Each protocol is also read on its new posts alone (`new_posts`): the targets that nobody had rated
before the cutoff, so no ranker trained on them, no id embedding holds them and no co-engagement
counts them. There only content can rank a post, where item ids and co-engagement serve the posts
seen in training: the slice on which a gated post token is meant to beat an id-only one.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from feedserve.artifacts import ArtifactLayout, EncoderSettings, default_artifacts_dir
from feedserve.files import atomic_write
from feedserve.ops.builder import SAMPLE_CORPUS
from feedserve.prompt.buckets import PercentileBuckets
from feedserve.prompt.movielens import MovieLens, Rating, load_movielens
from feedserve.rank.coengagement import CoEngagement
from feedserve.rank.data import (
    AUXILIARY_TASKS,
    LIKE,
    RECENT_LIKES,
    SEQUENCE_DECAY,
    SEQUENCE_LIKES,
    Interaction,
    PostTable,
    RankExample,
    Tensorizer,
    interactions,
    log_rank,
    member_interactions,
    movielens_coengagement,
    movielens_counts,
    top_posts,
)
from feedserve.rank.engagements import MAX_TIME
from feedserve.rank.features import PostFeatures
from feedserve.rank.model import INPUTS, GenerativeRanker, RankerConfig
from feedserve.rank.train import DEFAULT_TASK_WEIGHTS, final_score
from feedserve.schema import NO_ID
from feedserve.training.baselines import ItemKNN
from feedserve.training.data import EvalCase, Split, movielens_split, validation_movielens
from feedserve.training.evaluate import EmbeddingRetriever, metrics, paired_ratio, per_case
from feedserve.triton.repository import task_weights_arg

logger = logging.getLogger(__name__)

KS = (10, 50)


@dataclass
class RankCase(EvalCase):
    """A member at one moment: `member` is the retrieval stage's record (the liked history),
    `history` every rating before the moment as the ranker reads it. Every rated post is seen: a
    server given the whole record excludes them all, for retrieval alone as for the ranked feed."""

    history: list[Interaction] = field(default_factory=list)
    at: int | None = None  # the moment (unix seconds); with fresh tables, counts and co-engagement as of it

    def seen(self) -> set[int]:
        return super().seen() | {it.post_id for it in self.history}

    def retrieved(
        self, member: np.ndarray, post_ids: np.ndarray, post_vectors: np.ndarray, candidates: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The retrieval stage's top `candidates` for this case, best first (ids, scores), for the
        member vector `member`: every post it has seen excluded."""
        return top_posts(member, post_ids, post_vectors, candidates, sorted(self.seen()))


@dataclass
class RankingData:
    """MovieLens as rankers are trained and evaluated on it (the whole log, or with `validate` the
    training period alone, split again), and the served encoder's embeddings of its movies."""

    ml: MovieLens
    split: Split
    retriever: EmbeddingRetriever
    post_ids: np.ndarray
    features: PostFeatures
    coengagement: CoEngagement
    # Counts and co-engagement read as of each case's moment (every engagement before it streamed
    # in, feedserve.rank.engagements), not as of the cutoff (the build's tables alone).
    fresh: bool = False

    @classmethod
    def load(cls, artifacts: Path, cache: Path, validate: bool = False, fresh: bool = False) -> RankingData:
        ml = load_movielens(SAMPLE_CORPUS)
        if validate:
            ml = validation_movielens(ml)
        layout = ArtifactLayout(artifacts)
        buckets = PercentileBuckets.load(layout.buckets)
        split = movielens_split(ml)
        ml = ml.at(split.cutoff)  # posts described as the training period saw them, prompts and tags
        graph = layout.onnx_int8 if layout.onnx_int8.exists() else layout.onnx  # what the server runs
        settings = EncoderSettings.load(layout.settings)
        retriever = EmbeddingRetriever(layout.hf_dir, settings, buckets, split.corpus, cache, onnx=graph)
        ids = np.array([p.id for p in split.corpus], np.int64)
        # The training period's counts; a training example reads them as they stood at its moment.
        # Fresh, every engagement's, read as of each case's moment (never one at or after it).
        until = MAX_TIME if fresh else split.cutoff
        features = PostFeatures.from_posts(ml.posts(), buckets, log=movielens_counts(ml, until, buckets))
        return cls(ml, split, retriever, ids, features, movielens_coengagement(ml, until), fresh)

    def tables_time(self, case: RankCase) -> int | None:
        """The moment a case reads counts and co-engagement as of (None: the tables as built)."""
        return case.at if self.fresh else None

    def new_posts(self) -> set[int]:
        """The posts nobody rated before the cutoff: new to every model trained on the period."""
        return {int(p) for p in self.post_ids.tolist()} - {
            r.movie for r in self.ml.ratings if r.timestamp < self.split.cutoff
        }

    def tensorizer(self, config: RankerConfig) -> Tensorizer:
        return Tensorizer(config, PostTable(self.post_ids, self.retriever.posts), self.features, self.coengagement)

    def itemknn(self) -> ItemKNN:
        """ItemKNN over the likes before the cutoff (what the co-engagement table holds)."""
        before = self.ml.ratings_by_user(before=self.split.cutoff)
        return ItemKNN({u: {r.movie for r in rs if r.rating >= LIKE} for u, rs in before.items()}, self.post_ids)

    def recent_itemknn(self, cases: Sequence[RankCase], knn: ItemKNN) -> np.ndarray:
        """[case, catalog]: ItemKNN (`knn`, the likes before the cutoff) from each member's
        RECENT_LIKES latest likes; fresh, ItemKNN over every like before the case's moment, read from
        the co-engagement table as of it (asked for no member: every row counts, the member's own
        too, as in ItemKNN)."""
        members = [c.member.model_copy(update={"history": c.member.history[-RECENT_LIKES:]}) for c in cases]
        if not self.fresh:
            return knn.score(members)
        catalog = self.post_ids.tolist()
        return np.stack(
            [
                self.coengagement.against(NO_ID, catalog, self.tables_time(c)).cooccurrence(
                    [h.post_id for h in m.history]
                )
                for c, m in zip(cases, members, strict=True)
            ]
        )

    def transitions(self, cases: Sequence[RankCase]) -> np.ndarray:
        """[case, catalog]: each post's transitions from the member's SEQUENCE_LIKES latest likes
        (the ranker's sequential co-engagement feature, feedserve.rank.coengagement), their own row
        left out."""
        catalog = self.post_ids.tolist()
        return np.stack(
            [
                self.coengagement.against(c.member.id, catalog, self.tables_time(c)).transitions(
                    [h.post_id for h in c.member.history][-SEQUENCE_LIKES:], SEQUENCE_DECAY
                )
                for c in cases
            ]
        )


def cutoff_cases(split: Split, before: Mapping[int, Sequence[Rating]]) -> list[RankCase]:
    """The split's own test cases (one per member, at the cutoff, every later like a target). The
    ranker reads the member's every rating before the cutoff and what the retrieval record holds
    after it: a member with too few likes before the cutoff has the first half of their later likes
    as context in the record (`movielens_split`), which retrieval and every baseline read. (Until
    2026-12-04 the ranker read the ratings before the cutoff alone: an empty history for 52 of the
    80 test members, the baselines reading their context.)"""
    return [
        RankCase(
            c.member,
            c.targets,
            [
                *interactions(before.get(c.member.id, [])),
                *(it for it in member_interactions(c.member) if it.at >= split.cutoff),
            ],
            split.cutoff,
        )
        for c in split.test
    ]


def moment_cases(ml: MovieLens, cutoff: int, moments: int = 10, horizon: int = 10) -> list[RankCase]:
    """Up to `moments` cases per member who rated after `cutoff`, at moments spread evenly over those
    ratings (the first at the cutoff): history every rating strictly earlier than the moment, targets
    the movies liked among the `horizon` ratings from it on. Moments with no liked history (nothing
    for retrieval to read) or no target are skipped."""
    cases = []
    for user, ratings in sorted(ml.ratings_by_user().items()):
        after = [j for j, r in enumerate(ratings) if r.timestamp >= cutoff]
        starts = sorted({ratings[after[q * len(after) // moments]].timestamp for q in range(min(moments, len(after)))})
        for at in starts:
            past = [r for r in ratings if r.timestamp < at]
            liked = [r for r in past if r.rating >= LIKE]
            rated = {r.movie for r in past}
            targets = {r.movie for r in [r for r in ratings if r.timestamp >= at][:horizon] if r.rating >= LIKE}
            if liked and targets - rated:
                cases.append(RankCase(ml.member(user, liked), targets - rated, interactions(past), at))
    return cases


@torch.no_grad()
def case_scores(
    model: GenerativeRanker,
    tensorize: Tensorizer,
    member_vectors: np.ndarray,
    cases: Sequence[RankCase],
    post_ids: np.ndarray,
    post_vectors: np.ndarray,
    candidates: int,
    batch: int = 16,
    tables_at: Callable[[RankCase], int | None] | None = None,
    weights: Mapping[str, float] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each case: the retrieval stage's top `candidates` (what it has seen excluded), best first,
    and the ranker's final score of each (`weights` per task: by default the served ones, an
    auxiliary task at 0), its tables read as of `tables_at(case)` (None: as they were built)."""
    weights = weights or {**{t: 0.0 for t in AUXILIARY_TASKS}, **DEFAULT_TASK_WEIGHTS}
    unweighed = [t for t in model.config.tasks if t not in weights]
    if unweighed:
        raise ValueError(f"no weight for the ranker's tasks {unweighed}")
    task_weights = [weights[task] for task in model.config.tasks]
    out = []
    for start in range(0, len(cases), batch):
        examples = []
        for case, member in zip(cases[start : start + batch], member_vectors[start : start + batch], strict=True):
            ids, scores = case.retrieved(member, post_ids, post_vectors, candidates)
            labels = np.zeros((len(ids), len(model.config.tasks)), np.float32)
            at = tables_at(case) if tables_at is not None else None
            examples.append(RankExample(case.member.id, case.history, member, ids, scores, labels, at))
        t = tensorize.batch(examples)
        _, scores = final_score(model(**{k: t[k] for k in INPUTS}).numpy(), task_weights)
        out += [(x.candidates, row[: len(x.candidates)]) for x, row in zip(examples, scores, strict=True)]
    return out


def orders(scored: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`case_scores`' cases as orders: each one's candidates in retrieval's order, and by the ranker's
    final score."""
    return [ids for ids, _ in scored], [ids[np.argsort(-row, kind="stable")] for ids, row in scored]


def fused(retrieval_top: Sequence[np.ndarray], ids: np.ndarray, *scores: np.ndarray) -> list[np.ndarray]:
    """Each case's retrieved posts (best first) reordered by ln(1 + retrieval rank) plus, for each of
    `scores` [case, catalog], ln(1 + rank by it among them), ties in retrieval order."""
    column = {int(p): j for j, p in enumerate(ids.tolist())}
    out = []
    for i, top in enumerate(retrieval_top):
        at = [column[int(p)] for p in top]
        total = np.log1p(np.arange(len(top), dtype=np.float32))  # `top` is in retrieval order
        for s in scores:
            total = total + log_rank(s[i, at])
        out.append(top[np.argsort(total, kind="stable")])
    return out


# The strongest fixed fusion of the ranker's own inputs (benchmarks/reports/ranker/quality.md): what a
# learned ranker has to beat to have learned more than adding three ranks.
FUSION = "fixed-fusion"
OVER_BUILT = "over_built"  # with --fresh: a ranker's orders over its own with the tables as built
BLEND = "+ fusion"  # a ranker's order blended with the fusion's (`blended`)


def fusion_orders(
    data: RankingData, cases: Sequence[RankCase], candidates: int, knn: ItemKNN
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """For each case: the retrieval stage's top `candidates` (what it has seen excluded), and the same
    posts reordered by `fused` with ItemKNN from the member's RECENT_LIKES latest likes and the
    transitions from their SEQUENCE_LIKES latest."""
    members = [c.member for c in cases]
    vectors = data.retriever.member_vectors(members)
    retrieval_top = [
        c.retrieved(v, data.post_ids, data.retriever.posts, candidates)[0] for c, v in zip(cases, vectors, strict=True)
    ]
    return retrieval_top, fused(retrieval_top, data.post_ids, data.recent_itemknn(cases, knn), data.transitions(cases))


def blended(first: Sequence[np.ndarray], second: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each case's posts (two orders of the same posts) by ln(1 + rank in `first`) + ln(1 + rank in
    `second`), ties in `first`'s order: `fused`'s rule over two whole orders."""
    out = []
    for a, b in zip(first, second, strict=True):
        if sorted(a.tolist()) != sorted(b.tolist()):
            raise ValueError("a blend needs two orders of the same posts")
        rank_b = {int(p): r for r, p in enumerate(b.tolist())}
        total = np.log1p(np.arange(len(a), dtype=np.float64)) + np.log1p([rank_b[int(p)] for p in a.tolist()])
        out.append(a[np.argsort(total, kind="stable")])
    return out


def compare(
    retrieval_top: Sequence[np.ndarray],
    ranked_top: Sequence[np.ndarray],
    cases: Sequence[RankCase],
    new_posts: set[int] | None = None,
    slices: Mapping[str, Sequence[set[int]]] | None = None,
) -> dict[str, Any]:
    """Both orders' metrics, and the ranked / retrieval ratio of each with its bootstrap interval;
    with `new_posts`, the same over those targets alone, in the cases that have any ("new_posts");
    and the same for each of `slices` (a set of posts per case, whose targets alone it keeps)."""
    base, ranked = per_case(retrieval_top, cases, KS), per_case(ranked_top, cases, KS)
    members = [c.member.id for c in cases]
    report: dict[str, Any] = {
        "cases": len(cases),
        "members": len(set(members)),
        "retrieval": metrics(retrieval_top, cases, KS),
        "ranked": metrics(ranked_top, cases, KS),
        "ranked_over_retrieval": {name: paired_ratio(base[name], ranked[name], members) for name in base},
    }
    parts = {**({"new_posts": [new_posts] * len(cases)} if new_posts is not None else {}), **(slices or {})}
    for name, keep in parts.items():
        at, kept = sliced_cases(cases, keep)
        if at:
            report[name] = {
                "targets": sum(len(c.targets) for c in kept),
                **compare([retrieval_top[i] for i in at], [ranked_top[i] for i in at], kept),
            }
    return report


def pair_with(
    result: dict[str, Any],
    reference: Sequence[np.ndarray],
    ranked: Sequence[np.ndarray],
    cases: Sequence[RankCase],
    slices: Mapping[str, Sequence[set[int]]],
    key: str = "over_reference",
) -> None:
    """Add to `compare`'s `result` of `ranked` its paired ratio over the `reference` orders of the same
    cases (as `key`), on the whole and on each of `slices`."""
    against = compare(reference, ranked, cases, slices=slices)
    result[key] = against["ranked_over_retrieval"]
    for part in slices.keys() & against.keys():
        result[part][key] = against[part]["ranked_over_retrieval"]


def sliced_cases(cases: Sequence[RankCase], keep: Sequence[set[int]]) -> tuple[list[int], list[RankCase]]:
    """The cases with a target in their set of `keep` (their positions, and each with those targets
    alone)."""
    at = [i for i, c in enumerate(cases) if c.targets & keep[i]]
    return at, [RankCase(cases[i].member, cases[i].targets & keep[i], cases[i].history) for i in at]


def new_post_cases(cases: Sequence[RankCase], new_posts: set[int]) -> tuple[list[int], list[RankCase]]:
    """The cases with a target among `new_posts` (their positions, and each with those targets alone)."""
    return sliced_cases(cases, [new_posts] * len(cases))


def transition_slices(data: RankingData, cases: Sequence[RankCase], new_posts: set[int]) -> dict[str, list[set[int]]]:
    """Each case's targets split by what the training period says of them: "seen_transition", posts
    someone liked soon after one of the member's latest likes (`RankingData.transitions` > 0: what
    an id embedding can memorise), and "unseen_transition", the rest of the posts rated before the
    cutoff (known, but never reached from this history; only content generalises there). New posts
    (`new_posts`, `RankingData.new_posts`) are neither."""
    column = {int(p): j for j, p in enumerate(data.post_ids.tolist())}
    old = {int(p) for p in data.post_ids.tolist()} - new_posts
    scores = data.transitions(cases)
    seen = [{t for t in c.targets if t in column and row[column[t]] > 0} for c, row in zip(cases, scores, strict=True)]
    return {
        "seen_transition": seen,
        "unseen_transition": [(c.targets & old) - s for c, s in zip(cases, seen, strict=True)],
    }


def evaluation_cases(ml: MovieLens, split: Split, moments: int = 10, horizon: int = 10) -> dict[str, list[RankCase]]:
    """The two protocols: the split's one cutoff, and many moments per member after it."""
    return {
        "cutoff": cutoff_cases(split, ml.ratings_by_user(before=split.cutoff)),
        "moments": moment_cases(ml, split.cutoff, moments, horizon),
    }


def evaluate(
    model: GenerativeRanker,
    tensorize: Tensorizer,
    retriever: EmbeddingRetriever,
    protocols: Mapping[str, Sequence[RankCase]],
    post_ids: np.ndarray,
    candidates: int,
    new_posts: set[int] | None = None,
    reference: Mapping[str, Sequence[np.ndarray]] | None = None,
    slices: Mapping[str, Mapping[str, Sequence[set[int]]]] | None = None,
    tables_at: Callable[[RankCase], int | None] | None = None,
    weights: Mapping[str, float] | None = None,
) -> tuple[dict[str, Any], dict[str, list[np.ndarray]]]:
    """`compare` for each protocol, the ranker reordering the retrieval stage's top `candidates`, and
    its ranked orders. With `reference` (another ranker's orders of the same cases), also this
    ranker's paired ratio over it ("over_reference"): two rankers of the same candidates move
    together from member to member, so their difference is measured far more tightly than either
    one's interval over retrieval suggests. (Not on the new posts: there a few members hold every
    hit, and a resample without them has nothing to divide by.) `slices` (per protocol, `compare`'s)
    are paired with the reference too. `tables_at`, `weights`: `case_scores`'."""
    report, ranked = {}, {}
    for name, cases in protocols.items():
        vectors = retriever.member_vectors([c.member for c in cases])
        retrieval_top, ranked[name] = orders(
            case_scores(
                model,
                tensorize,
                vectors,
                cases,
                post_ids,
                retriever.posts,
                candidates,
                tables_at=tables_at,
                weights=weights,
            )
        )
        parts = (slices or {}).get(name, {})
        report[name] = compare(retrieval_top, ranked[name], cases, new_posts, parts)
        if reference is not None:
            pair_with(report[name], reference[name], ranked[name], cases, parts)
    retriever.save_members()
    return report, ranked


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranker", type=Path, nargs="+", required=True, help="saved rankers (ranker.json, ranker.pt)")
    p.add_argument("--artifacts", type=Path, default=default_artifacts_dir(), help="the retrieval stage's")
    p.add_argument("--validate", action="store_true", help="the validation split (what the rankers trained on)")
    p.add_argument("--moments", type=int, default=10, help="moments per member")
    p.add_argument("--horizon", type=int, default=10, help="ratings from a moment on whose likes are its targets")
    p.add_argument("--candidates", type=int, default=200, help="retrieved candidates ranked per case")
    p.add_argument("--cache", type=Path, default=Path("runs/cache"), help="embeddings kept between runs")
    p.add_argument("--name", default="eval.json", help="the report written into each ranker's directory")
    p.add_argument("--table", type=Path, help="also write the markdown table of every ranker here")
    p.add_argument(
        "--fusion",
        action="store_true",
        help=f"pair every ranker with the fixed fusion of its inputs ({FUSION}) rather than with the first",
    )
    p.add_argument(
        "--blend",
        action="store_true",
        help=f"with --fusion, also read each ranker's order blended with the fusion's ({BLEND})",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="counts and co-engagement as of each moment (engagements streamed in), not as of the cutoff (the build's)",
    )
    p.add_argument(
        "--task-weights",
        type=task_weights_arg,  # finite numbers only: a NaN weight turned every ranker into the retrieval order
        help="the final score's weight per task, JSON (default: the served ones, an auxiliary task at 0), "
        'e.g. \'{"like": 1, "love": 0.5, "dislike": -1, "like later": 1}\'',
    )
    p.add_argument(
        "--transitions",
        action="store_true",
        help="also read each ranker on the targets a transition from the latest likes reaches and on the rest",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    data = RankingData.load(args.artifacts, args.cache, args.validate, args.fresh)
    protocols = evaluation_cases(data.ml, data.split, args.moments, args.horizon)
    new_posts = data.new_posts()
    slices = (
        {name: transition_slices(data, cases, new_posts) for name, cases in protocols.items()}
        if args.transitions
        else {}
    )
    command = "python -m feedserve.training.rank_eval " + " ".join(argv if argv is not None else sys.argv[1:])
    head = {
        "command": command,
        "evaluated_on": "validation members (inside the training period)" if args.validate else "test members",
        "cutoff": data.split.cutoff,
        "candidates": args.candidates,
        "moments": args.moments,
        "horizon": args.horizon,
        **({"task_weights": args.task_weights} if args.task_weights else {}),
        "tables": "as of each moment (streamed)" if args.fresh else "as of the cutoff (the build's)",
    }
    reports: list[dict[str, Any]] = []
    if args.blend and not args.fusion:
        p.error("--blend needs --fusion")
    reference: dict[str, list[np.ndarray]] | None = None  # the orders every later ranker is paired with
    retrieved: dict[str, list[np.ndarray]] = {}
    if args.fusion:
        knn, reference = data.itemknn(), {}
        fusion: dict[str, Any] = {"ranker": FUSION, **head}
        for name, cases in protocols.items():
            retrieved[name], reference[name] = fusion_orders(data, cases, args.candidates, knn)
            fusion[name] = compare(retrieved[name], reference[name], cases, new_posts, slices.get(name))
        reports.append(fusion)
    for directory in args.ranker:
        model = GenerativeRanker.load(directory)
        tensorize = data.tensorizer(model.config)
        paired = reference is not None
        results, ranked = evaluate(
            model,
            tensorize,
            data.retriever,
            protocols,
            data.post_ids,
            args.candidates,
            new_posts,
            reference,
            slices,
            data.tables_time,
            args.task_weights,
        )
        reference = reference or ranked
        if data.fresh:
            # The same ranker and cases with the tables as built (the cutoff's): what streaming the
            # engagements in gains, paired case by case.
            for name, cases in protocols.items():
                if all(c.at == data.split.cutoff for c in cases):
                    continue  # read at the cutoff itself: the same tables both ways
                vectors = data.retriever.member_vectors([c.member for c in cases])
                _, built = orders(
                    case_scores(
                        model,
                        tensorize,
                        vectors,
                        cases,
                        data.post_ids,
                        data.retriever.posts,
                        args.candidates,
                        tables_at=lambda c: data.split.cutoff,
                        weights=args.task_weights,
                    )
                )
                pair_with(results[name], built, ranked[name], cases, {}, key=OVER_BUILT)
        report: dict[str, Any] = {
            "ranker": str(directory),
            **head,
            **({"reference": reports[0]["ranker"]} if paired else {}),
            **results,
        }
        atomic_write(Path(directory) / args.name, json.dumps(report, indent=1) + "\n")
        reports.append(report)
        if args.blend and reference is not None:
            blend: dict[str, Any] = {"ranker": f"{Path(directory).name} {BLEND}", **head, "reference": FUSION}
            for name, cases in protocols.items():
                parts = slices.get(name, {})
                blend_orders = blended(ranked[name], reference[name])
                blend[name] = compare(retrieved[name], blend_orders, cases, new_posts, parts)
                pair_with(blend[name], reference[name], blend_orders, cases, parts)
            reports.append(blend)
    table = markdown_table(reports)
    print(table)
    if args.table is not None:
        atomic_write(args.table, table)
    return 0


def markdown_table(reports: Sequence[Mapping[str, Any]]) -> str:
    """One row per ranker (its directory's name), retrieval's first: each protocol's metrics and the
    ranked / retrieval NDCG@10 with its 95% interval over members, then the same on the moments' new
    posts where the reports have them; then the paired tables where the reports hold them (each later
    ranker over the first; the transition slices)."""
    first = reports[0]

    def parts(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        moments = report["moments"]
        return [moments, report["cutoff"], *([moments["new_posts"]] if "new_posts" in moments else [])]

    names = ["moments", "cutoff", "moments, new posts' targets"][: len(parts(first))]
    head = "| ranker | " + " | ".join(f"{p}: R@10 | R@50 | NDCG@10 | NDCG@10 / retrieval" for p in names)
    moments = first["moments"]
    counts = f"{moments['cases']} moments of {moments['members']} members; cutoff: {first['cutoff']['cases']} members"
    if "new_posts" in moments:
        counts += f"; new posts: {moments['new_posts']['targets']} targets in {moments['new_posts']['cases']} moments"
    lines = [counts + ".", "", head + " |", "|---" * (1 + 4 * len(names)) + "|"]

    def cells(result: Mapping[str, Any], key: str) -> str:
        m = result[key]
        out = f"{m['recall@10']:.4f} | {m['recall@50']:.4f} | {m['ndcg@10']:.4f}"
        if key == "retrieval":
            return out + " | 1.00x"
        g = result["ranked_over_retrieval"]["ndcg@10"]
        return out + f" | {g['ratio']:.2f}x [{g['low']:.2f}, {g['high']:.2f}]"

    lines.append("| retrieval alone | " + " | ".join(cells(p, "retrieval") for p in parts(first)) + " |")
    for r in reports:
        name = Path(r["ranker"]).name
        lines.append(f"| {name} | " + " | ".join(cells(p, "ranked") for p in parts(r)) + " |")
    if any("over_reference" in r["moments"] for r in reports[1:]):
        lines += paired_table(reports)
    if all(s in moments for s in SLICES):
        lines += slice_table(reports)
    if any(OVER_BUILT in r["moments"] for r in reports):
        lines += paired_table([r for r in reports if OVER_BUILT in r["moments"]], OVER_BUILT)
    return "\n".join(lines) + "\n"


# `transition_slices`, as the table names them.
SLICES = {"seen_transition": "reached", "unseen_transition": "not reached"}


def slice_table(reports: Sequence[Mapping[str, Any]]) -> list[str]:
    """The moments' targets by whether a transition from the member's latest likes reaches them
    (`transition_slices`): each ranker's metrics on each, and its paired Recall@50 over the first
    (the slices are small: Recall@50 has hits in most resamples of members where NDCG@10 has few)."""
    moments, first = reports[0]["moments"], Path(reports[0]["ranker"]).name
    sizes = "; ".join(f"{label} {moments[s]['targets']} in {moments[s]['cases']}" for s, label in SLICES.items())
    head = " | ".join(f"{label}: R@10 | R@50 | NDCG@10 | R@50 / {first}" for label in SLICES.values())
    lines = [
        "",
        f"The moments' targets by whether a transition from the member's latest likes in the training "
        f"period reaches them (targets in moments: {sizes}):",
        "",
    ]
    lines += [f"| ranker | {head} |", "|---" * (1 + 4 * len(SLICES)) + "|"]

    def cells(part: Mapping[str, Any], key: str) -> str:
        m = part[key]
        paired = (
            paired_text(part["over_reference"]["recall@50"]) if key == "ranked" and "over_reference" in part else "-"
        )
        return f"{m['recall@10']:.4f} | {m['recall@50']:.4f} | {m['ndcg@10']:.4f} | {paired}"

    lines.append("| retrieval alone | " + " | ".join(cells(moments[s], "retrieval") for s in SLICES) + " |")
    for r in reports:
        lines.append(
            f"| {Path(r['ranker']).name} | " + " | ".join(cells(r["moments"][s], "ranked") for s in SLICES) + " |"
        )
    return lines


def paired_table(reports: Sequence[Mapping[str, Any]], key: str = "over_reference") -> list[str]:
    """Each later ranker over the first (with `key` OVER_BUILT: each ranker with fresh tables over
    itself with the tables as built), paired case by case: the ratio, its 95% interval over
    members, and the share of resamples above 1, for NDCG@10 and Recall@10 on each part."""
    first = Path(reports[0]["ranker"]).name if key != OVER_BUILT else "as built"
    parts, measures = ("moments", "cutoff"), ("ndcg@10", "recall@10")
    head = " | ".join(f"{p}: {m} / {first}" for p in parts for m in ("NDCG@10", "R@10"))
    title = (
        f"Paired with `{first}`"
        if key != OVER_BUILT
        else "Fresh tables (every engagement before the moment) paired with the same ranker's tables as built"
    )
    lines = ["", f"{title} (the same cases, bootstrap over members; P: resamples above 1):", ""]
    lines += [f"| ranker | {head} |", "|---" * (1 + len(parts) * len(measures)) + "|"]
    for r in reports[1:] if key != OVER_BUILT else reports:
        paired = [r[p][key][m] if key in r[p] else None for p in parts for m in measures]
        cells = (paired_text(g) if g is not None else "- (the same tables)" for g in paired)
        lines.append(f"| {Path(r['ranker']).name} | " + " | ".join(cells) + " |")
    return lines


def paired_text(gain: Mapping[str, float]) -> str:
    """A paired ratio as the reports write it: ratio, 95% interval, share of resamples above 1."""
    return f"{gain['ratio']:.3f}x [{gain['low']:.2f}, {gain['high']:.2f}] P {gain['above_1']:.2f}"


if __name__ == "__main__":
    raise SystemExit(main())
