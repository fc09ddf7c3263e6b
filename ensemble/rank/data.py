"""Ranker examples from an interaction log, and the tensors the ranker reads.

An example is a member at one moment: their history of (post, action) before it, oldest first, and
the posts shown to them then (impressions) with what they did with each, one label per task. The
ranker's history holds every interaction, negatives included (a retrieval prompt keeps the engaged
ones only). On MovieLens an interaction is a rating: 5 is `love`, 4 and 4.5 `like`, 2.5 to 3.5
`neutral`, 2 and below `dislike`; the tasks are like (>= 4), love (5) and dislike (<= 2), and the
impressions at a moment are the retrieval stage's top candidates then (shown: not engaged unless
the member rated them next) plus the posts the member rated next.

`movielens_examples` keeps every example inside the training period: its history and its labels
come from before the cutoff, so nothing after it is ever trained on.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from feedserve.prompt.buckets import PercentileBuckets
from feedserve.prompt.movielens import MovieLens, Rating
from feedserve.prompt.records import ENGAGED_RATING, Member, is_engaged, rating_of
from feedserve.rank.coengagement import CoEngagement, Scorer
from feedserve.rank.features import COUNT_FEATURES, CountLog, FeatureReader, PostFeatures
from feedserve.rank.model import NEUTRAL, RankerConfig

# Ratings as actions and as task labels (like, love, dislike).
LIKE, LOVE, DISLIKE = ENGAGED_RATING, 5.0, 2.0  # a like is what retrieval prompts count as engaged
# The candidate features the ranker is trained with: the retrieval score; its rank among the
# request's candidates as ln(1 + rank) (0 for retrieval's first: the top 200 of a member's scores
# span a few hundredths, which a network reads only once its weights grow a hundredfold, while the
# log rank spans 0 to 5 whatever the scores' scale, a rank past the training's impressions read as
# the last of them: RankerConfig.max_rank); the Jaccard
# similarity of the candidate's tags to those of the posts the member liked; whether its content
# vector was found; its counts as percentiles 0..1 (feedserve.rank.features); and its co-engagement
# with the member's engaged history (feedserve.rank.coengagement), as a fraction of the request's
# highest and as ln(1 + rank) among its candidates (ties in retrieval order); and the same two for
# its co-engagement with the member's RECENT_LIKES latest engaged posts alone, since what a member
# engages with next follows what they engaged with last more than their whole past (ItemKNN from the
# last 10 likes, fused with the retrieval rank, ordered the validation moments' next likes better
# than from every like: see benchmarks/reports/ranker/validation/README.md); and the same two for
# the candidate's transitions from the member's SEQUENCE_LIKES latest likes (how often other members
# liked it soon after one of them), each like weighted SEQUENCE_DECAY^(likes since): the order of
# likes, which co-occurrence ignores (chosen on the validation moments, same README).
RECENT_LIKES = 10
SEQUENCE_LIKES, SEQUENCE_DECAY = 20, 0.8


_PERCENTILE = "_percentile"


def count_feature(count: str) -> str:
    """The feature that reads a count (as its percentile)."""
    return count + _PERCENTILE


def counts_read(features: Sequence[str]) -> tuple[str, ...]:
    """The counts these features read, in their order."""
    return tuple(f[: -len(_PERCENTILE)] for f in features if f.endswith(_PERCENTILE))


def feature_names(counts: Sequence[str] = COUNT_FEATURES, sequential: bool = True) -> tuple[str, ...]:
    """The features above, in their columns' order, for a corpus with these counts (a feed's views,
    likes, comments, shares where MovieLens has ratings), with or without the transitions."""
    return (
        "retrieval_score",
        "retrieval_log_rank",
        "affinity",
        "has_content",
        *(count_feature(c) for c in counts),
        "coengagement",
        "coengagement_log_rank",
        "recent_coengagement",
        "recent_coengagement_log_rank",
        *(("sequential_coengagement", "sequential_coengagement_log_rank") if sequential else ()),
    )


FEATURES = feature_names()


def action_of(rating: float) -> str:
    """A MovieLens rating as an action: love (5), like (4, 4.5), dislike (2 or less), else neutral."""
    if rating >= LOVE:
        return "love"
    if rating >= LIKE:
        return "like"
    return "dislike" if rating <= DISLIKE else "neutral"


def action_of_record(action: str) -> str:
    """A member record's action by name: `rated 4.5` (MovieLens) by its rating, any other action
    lowercased (the ranker reads a name it has no token for as `neutral`)."""
    rating = rating_of(action)
    return action_of(rating) if rating is not None else action.strip().lower()


def member_interactions(member: Member) -> list[Interaction]:
    """A member record's history as the ranker reads it: every item, with its action, oldest first."""
    return [Interaction(h.post_id, action_of_record(h.action), h.engaged_at or 0) for h in member.history]


# The labels of a MovieLens example, in this order; a ranker trained on some of them reads its own
# (`select_tasks`). The first three label what the member did within the label horizon; "like
# later", a like at any time after the moment (before the cutoff), is an auxiliary task: a longer
# horizon's target beside the next ratings', weighted 0 in the final score unless the settings say.
LABELS = ("like", "love", "dislike", "like later")
MOVIELENS_TASKS = LABELS[:3]  # what a ranker is trained on unless told (`--tasks`)
AUXILIARY_TASKS = frozenset({"like later"})


def labels_of(rating: float | None, later: float | None = None) -> tuple[float, float, float, float]:
    """LABELS for a post rated `rating` within the label horizon (None: not rated then) and `later`
    at any time after the moment (None: never)."""
    like_later = float(later is not None and later >= LIKE)
    if rating is None:
        return (0.0, 0.0, 0.0, like_later)
    return (float(rating >= LIKE), float(rating >= LOVE), float(rating <= DISLIKE), like_later)


@dataclass(frozen=True)
class Interaction:
    post_id: int
    action: str
    at: int


@dataclass
class RankExample:
    member_id: int
    history: list[Interaction]  # oldest first
    member: np.ndarray  # the member's retrieval embedding [E]
    candidates: np.ndarray  # post ids shown [C]
    retrieval_scores: np.ndarray  # the retrieval stage's score of each [C]
    labels: np.ndarray  # [C, tasks]
    # When the impressions were shown (unix seconds): counts and co-engagement are read as they stood
    # then. None when serving, where the tables were built before the request.
    at: int | None = None
    # When the tables the example reads were built, if before `at`: a server reads tables built some
    # time before its requests, in which every post created since has no counts and no co-engagement.
    tables_at: int | None = None

    def tables_time(self) -> int | None:
        """The moment counts and co-engagement are read as of."""
        return self.at if self.tables_at is None else self.tables_at


def select_tasks(examples: Sequence[RankExample], tasks: Sequence[str], labels: Sequence[str] = LABELS) -> None:
    """Keep the label columns of `tasks` (of `labels`, the examples' columns), in that order."""
    columns = [list(labels).index(t) for t in tasks]
    for x in examples:
        x.labels = x.labels[:, columns]


def interactions(ratings: Sequence[Rating]) -> list[Interaction]:
    """Ratings as the ranker's history: every one of them, as an action."""
    return [Interaction(r.movie, action_of(r.rating), r.timestamp) for r in ratings]


def top_posts(
    member: np.ndarray,
    post_ids: np.ndarray,
    post_vectors: np.ndarray,
    k: int,
    exclude: Sequence[int],
    absent: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The retrieval stage's answer: the k posts of highest inner product, `exclude` left out, and
    the posts where `absent` (bool, one per post) is true: not in the index yet."""
    scores = post_vectors @ member
    scores[np.isin(post_ids, np.asarray(exclude, np.int64))] = -np.inf
    if absent is not None:
        scores[absent] = -np.inf
    top = np.argsort(-scores, kind="stable")[:k]
    top = top[np.isfinite(scores[top])]
    return post_ids[top], scores[top].astype(np.float32)


def movielens_examples(
    ml: MovieLens,
    cutoff: int,
    embed_member: Callable[[int, Sequence[Rating]], np.ndarray],
    post_ids: np.ndarray,
    post_vectors: np.ndarray,
    per_member: int = 4,
    shown: int = 200,
    seed: int = 0,
    horizon: int | None = None,
    table_lag: int = 0,
) -> list[RankExample]:
    """Up to `per_member` moments per member before `cutoff`. At each: the history so far; as
    impressions the top `shown` posts retrieval returned then (for the member embedded from their
    liked history by `embed_member`, with the member's id and liked ratings as the retrieval
    stage's member record holds them), labelled by the ratings the member gave them later but
    before the cutoff (shown and never rated: all labels 0), plus the posts they rated low later
    (explicit negatives). Impressions are what the ranker will be given when serving: the
    retrieval stage's candidates, not the posts the member happened to rate next, which would teach
    it that a high retrieval score means no engagement. With `horizon`, only the next `horizon`
    ratings label the impressions (what the member did soon after being shown them; a post rated
    later was shown and not engaged with then). With `table_lag` (seconds), each example reads the
    counts and co-engagement of tables built a uniformly drawn 0 to `table_lag` before its moment, as
    a server reads tables built before its requests: the posts created in between are candidates
    with no counts, as new posts are when serving.

    Retrieval then could only return the posts that existed: a post is taken to exist from its first
    rating by anyone, and is retrievable at a moment when that came no later than the last rating
    labelling it. (Over the whole catalog a fifth of the impressions were films nobody had rated yet,
    all labelled not engaged: a shortcut from "unknown then" to "passed over" that no served
    request has.)"""
    rng = random.Random(seed)
    lags = random.Random(seed + 1)  # apart: the moments drawn are the same with and without a lag
    rows = {int(p): i for i, p in enumerate(post_ids.tolist())}
    by_user = ml.ratings_by_user(before=cutoff)
    first: dict[int, int] = {}
    for ratings in by_user.values():
        for r in ratings:
            first[r.movie] = min(r.timestamp, first.get(r.movie, r.timestamp))
    unrated = np.iinfo(np.int64).max  # a post nobody rated before the cutoff: never retrievable here
    created = np.array([first.get(int(p), unrated) for p in post_ids.tolist()], np.int64)
    examples = []
    for user in sorted(by_user):
        ratings = by_user[user]
        moments = list(range(1, len(ratings) - 1))
        for i in sorted(rng.sample(moments, min(per_member, len(moments)))):
            past, window = ratings[:i], ratings[i : None if horizon is None else i + horizon]
            later = {r.movie: r.rating for r in window}
            ever = {r.movie: r.rating for r in ratings[i:]}
            member = embed_member(user, [r for r in past if r.rating >= LIKE])
            absent = created > window[-1].timestamp
            top, _ = top_posts(member, post_ids, post_vectors, shown, [r.movie for r in past], absent)
            disliked = [m for m, rating in later.items() if rating <= DISLIKE]
            candidates = np.array(list(dict.fromkeys([*top.tolist(), *disliked])), np.int64)
            scores = np.array(
                [post_vectors[rows[c]] @ member if c in rows else 0.0 for c in candidates.tolist()], np.float32
            )
            examples.append(
                RankExample(
                    user,
                    interactions(past),
                    member,
                    candidates,
                    scores,
                    np.array([labels_of(later.get(c), ever.get(c)) for c in candidates.tolist()], np.float32),
                    ratings[i].timestamp,
                    ratings[i].timestamp - lags.randint(0, table_lag) if table_lag else None,
                )
            )
    rng.shuffle(examples)
    return examples


def movielens_coengagement(ml: MovieLens, before: int) -> CoEngagement:
    """The co-engagement table of the likes before `before` (the training period's), with their times."""
    return CoEngagement.from_events(
        (user, r.movie, r.timestamp)
        for user, ratings in ml.ratings_by_user(before).items()
        for r in ratings
        if r.rating >= LIKE
    )


def movielens_counts(ml: MovieLens, before: int, buckets: PercentileBuckets) -> CountLog:
    """The count log of the ratings before `before` (the training period's)."""
    return CountLog(((r.movie, r.timestamp, r.rating) for r in ml.ratings if r.timestamp < before), buckets)


def log_rank(scores: np.ndarray, max_rank: int | None = None) -> np.ndarray:
    """ln(1 + rank) of each score among `scores`, highest first (ties in the order given), a rank
    past `max_rank` read as `max_rank`."""
    ranks = np.empty(len(scores), np.float32)
    ranks[np.argsort(-np.asarray(scores), kind="stable")] = np.arange(len(scores), dtype=np.float32)
    return np.log1p(ranks if max_rank is None else np.minimum(ranks, np.float32(max_rank)))


def read_history(config: RankerConfig, history: Sequence[Interaction]) -> Sequence[Interaction]:
    """What a ranker reads of a history: the newest max_history (the oldest go first, as in the
    prompts) of every interaction, or of the engaged ones with `history` "engaged"."""
    if config.history == "engaged":
        history = [it for it in history if is_engaged(it.action)]
    return history[-config.max_history :]


class ContentSource(Protocol):
    """Where a post's content vector comes from: a table in training, the live index when serving."""

    def lookup(self, post_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vectors float32 [n, E], found bool [n]); zeros where a post is not held."""
        ...


class PostTable:
    """Post vectors held in memory, by id (the training command's: every post of the corpus)."""

    def __init__(self, post_ids: np.ndarray, vectors: np.ndarray) -> None:
        self.row = {int(p): i for i, p in enumerate(np.asarray(post_ids).tolist())}
        self.vectors = np.concatenate([vectors.astype(np.float32), np.zeros((1, vectors.shape[1]), np.float32)])

    def lookup(self, post_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.array([self.row.get(int(p), -1) for p in np.asarray(post_ids).tolist()], np.int64)
        return self.vectors[rows], rows >= 0


class Tensorizer:
    """RankExamples (or a served request) -> the ranker's input tensors. A post's content is its
    vector in `content`; a post missing there gets zeros and `has_content` 0, and is still ranked (by
    its id, if trained on, and its features). Without a `coengagement` table every candidate's
    co-engagement is 0."""

    def __init__(
        self,
        config: RankerConfig,
        content: ContentSource,
        features: FeatureReader | None = None,
        coengagement: CoEngagement | None = None,
    ) -> None:
        self.config = config
        self.content = content
        self.features = features or PostFeatures()
        self.coengagement = coengagement
        self.actions = {a: i for i, a in enumerate(config.actions)}
        self.neutral = self.actions[NEUTRAL]
        self.column = column = {f: i for i, f in enumerate(config.features)}  # feature -> its column
        # The co-engagement features the config reads: (share column, log-rank column, the score of
        # the candidates from the engaged history), scored against one gathering of the candidates.
        readers: tuple[tuple[str, Callable[[Scorer, list[int]], np.ndarray]], ...] = (
            ("", lambda scorer, liked: scorer.cooccurrence(liked)),
            ("recent_", lambda scorer, liked: scorer.cooccurrence(liked[-RECENT_LIKES:])),
            ("sequential_", lambda scorer, liked: scorer.transitions(liked[-SEQUENCE_LIKES:], SEQUENCE_DECAY)),
        )
        self.coengaged = [
            (column.get(f"{prefix}coengagement"), column.get(f"{prefix}coengagement_log_rank"), read)
            for prefix, read in readers
            if {f"{prefix}coengagement", f"{prefix}coengagement_log_rank"} & column.keys()
        ]

    def batch(self, examples: Sequence[RankExample]) -> dict[str, torch.Tensor]:
        """Tensors for `examples`: the model's inputs, and `candidate_mask` and `labels` for the loss."""
        cfg = self.config
        dim = cfg.content_dim
        b = len(examples)
        histories = [read_history(cfg, x.history) for x in examples]
        h = max(1, max(len(history) for history in histories))
        c = max(len(x.candidates) for x in examples)
        out: dict[str, np.ndarray] = {
            "history_ids": np.zeros((b, h), np.int64),
            "history_actions": np.zeros((b, h), np.int64),
            "history_content": np.zeros((b, h, dim), np.float32),
            "history_mask": np.zeros((b, h), bool),
            "candidate_ids": np.zeros((b, c), np.int64),
            "candidate_content": np.zeros((b, c, dim), np.float32),
            "candidate_features": np.zeros((b, c, len(cfg.features)), np.float32),
            "candidate_mask": np.zeros((b, c), bool),
            "member": np.zeros((b, dim), np.float32),
            "labels": np.zeros((b, c, len(cfg.tasks)), np.float32),
        }
        column = self.column
        counts = [
            (column[count_feature(name)], j)
            for j, name in enumerate(self.features.counts)
            if count_feature(name) in column
        ]
        for i, (x, history) in enumerate(zip(examples, histories, strict=True)):
            n = len(history)
            ids = np.array([it.post_id for it in history], np.int64)
            out["history_ids"][i, :n] = ids
            out["history_actions"][i, :n] = [self.actions.get(it.action, self.neutral) for it in history]
            out["history_content"][i, :n] = self.content.lookup(ids)[0]
            out["history_mask"][i, :n] = True
            liked = self.features.tag_union([it.post_id for it in history if is_engaged(it.action)])
            m = len(x.candidates)
            content, has = self.content.lookup(x.candidates)
            out["candidate_ids"][i, :m] = x.candidates
            out["candidate_content"][i, :m] = content
            out["candidate_mask"][i, :m] = True
            out["member"][i] = x.member
            out["labels"][i, :m] = x.labels
            features = out["candidate_features"][i]
            if "retrieval_score" in column:
                features[:m, column["retrieval_score"]] = x.retrieval_scores
            if "retrieval_log_rank" in column:
                features[:m, column["retrieval_log_rank"]] = log_rank(x.retrieval_scores, cfg.max_rank)
            if "has_content" in column:
                features[:m, column["has_content"]] = has
            if "affinity" in column:
                features[:m, column["affinity"]] = self.features.affinity(x.candidates.tolist(), liked)
            if counts:
                percentiles = self.features.percentiles(x.candidates.tolist(), x.tables_time())
                for col, j in counts:
                    features[:m, col] = percentiles[:, j]
            if self.coengagement is not None and self.coengaged:
                engaged = [it.post_id for it in history if is_engaged(it.action)]
                scorer = self.coengagement.against(x.member_id, x.candidates.tolist(), x.tables_time())
                for share, ranks, read in self.coengaged:
                    shared = read(scorer, engaged)
                    if share is not None and m:
                        features[:m, share] = shared / max(float(shared.max()), 1e-9)
                    if ranks is not None:
                        features[:m, ranks] = log_rank(shared, cfg.max_rank)
        return {k: torch.from_numpy(v) for k, v in out.items()}
