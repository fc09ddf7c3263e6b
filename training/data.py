"""Training and evaluation data for the dual encoder.

An example is (member as of some moment, a post they engaged with next, hard negatives). Member
history holds engaged posts only. Hard negatives are posts the member was shown but did not engage
with (on MovieLens: movies they rated <= 2.5). Easy negatives are the other positives of the batch
plus posts sampled from the corpus (the trainer adds those).

`movielens_split` cuts at one global time: every evaluated target is later than every event trained
on, so nothing from the future leaks into training.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from feedserve.prompt.movielens import MovieLens
from feedserve.prompt.records import Author, Engagement, Member, Post

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    member: Member  # history strictly before the positive
    positive: Post
    hard_negatives: tuple[Post, ...] = ()


@dataclass
class EvalCase:
    member: Member  # history up to the cutoff
    targets: set[int]  # posts engaged with after the cutoff

    def seen(self) -> set[int]:
        """The posts never recommended to this member again: the ones their record holds."""
        return {h.post_id for h in self.member.history}


@dataclass
class Split:
    train: list[Example]
    test: list[EvalCase]
    cutoff: int
    corpus: list[Post] = field(repr=False, default_factory=list)
    train_positives: dict[int, int] = field(repr=False, default_factory=dict)  # post id -> count


def _member(base: Member, history: list[Engagement]) -> Member:
    return base.model_copy(update={"history": history})


def movielens_split(
    ml: MovieLens,
    test_fraction: float = 0.1,
    positive_rating: float = 4.0,
    negative_rating: float = 2.5,
    examples_per_member: int = 8,
    min_history: int = 1,
    seed: int = 0,
    history_negatives: bool = False,
) -> Split:
    """Global time split; training examples sample each member's positives before the cutoff.

    `history_negatives` puts the movies a member rated <= `negative_rating` into their history too
    (action "rated 2", say): the ablation of the finding that engaged-only history works better.
    """
    rng = random.Random(seed)
    cutoff = ml.cutoff(test_fraction, positive_rating)
    ml = ml.at(cutoff)  # every prompt, trained on or evaluated, describes its posts as of the cutoff
    liked: dict[int, list] = defaultdict(list)
    disliked: dict[int, list] = defaultdict(list)
    for r in sorted(ml.ratings, key=lambda r: (r.timestamp, r.movie)):
        if r.rating >= positive_rating:
            liked[r.user].append(r)
        elif r.rating <= negative_rating and r.timestamp < cutoff:
            disliked[r.user].append(r)

    def history_of(user: int, engaged: list) -> list:
        # Engaged items, plus (for the ablation) the disliked ones rated before the last of them.
        events = list(engaged)
        if history_negatives and engaged:
            events += [r for r in disliked[user] if r.timestamp <= engaged[-1].timestamp]
        return sorted(events, key=lambda r: (r.timestamp, r.movie))

    train: list[Example] = []
    test: list[EvalCase] = []
    counts: dict[int, int] = defaultdict(int)
    for user, events in liked.items():
        past = [e for e in events if e.timestamp < cutoff]
        future = [e for e in events if e.timestamp >= cutoff]
        for e in past:
            counts[e.movie] += 1
        if future:
            # Members active only after the cutoff are evaluated too: the first half of their new
            # engagements is context (never trained on), the second half the targets, still later.
            context = future[: len(future) // 2] if len(past) < min_history else []
            targets = {e.movie for e in future[len(context) :]}
            seen = ml.member(user, history_of(user, past) + context)
            if len(past) + len(context) >= min_history:
                test.append(EvalCase(seen, targets - {h.post_id for h in seen.history}))
        positions = list(range(min_history, len(past)))
        for i in rng.sample(positions, min(examples_per_member, len(positions))):
            negs = rng.sample(disliked[user], min(4, len(disliked[user])))
            train.append(
                Example(
                    ml.member(user, history_of(user, past[:i])),
                    ml.movies[past[i].movie],
                    tuple(ml.movies[r.movie] for r in negs),
                )
            )
    rng.shuffle(train)
    test = [t for t in test if t.targets]
    logger.info("MovieLens split at %d: %d training examples, %d test members", cutoff, len(train), len(test))
    return Split(train, test, cutoff, ml.posts(), dict(counts))


def validation_movielens(ml: MovieLens, test_fraction: float = 0.1) -> MovieLens:
    """MovieLens with every rating and tagging from the test period on removed: its own time split
    (`movielens_split`) then cuts a validation period out of the training period, so choices
    (steps, sizes, ablations) are made without ever looking at the test members."""
    return ml.before(ml.cutoff(test_fraction))


# --- synthetic LinkedIn-shaped data --------------------------------------------------------

TOPICS: dict[str, list[str]] = {
    "data": ["spark", "kafka", "warehouse", "pipelines", "sql"],
    "ml": ["transformers", "embeddings", "retrieval", "training", "gpus"],
    "design": ["figma", "typography", "accessibility", "prototypes", "color"],
    "finance": ["markets", "bonds", "valuation", "risk", "equity"],
    "health": ["clinical", "nursing", "patients", "trials", "care"],
    "sales": ["pipeline", "quota", "prospects", "negotiation", "crm"],
}
FIRST = ["Ada", "Lin", "Omar", "Sara", "Kenji", "Maya", "Tom", "Ines", "Ravi", "Zoe"]
LAST = ["Chen", "Okafor", "Silva", "Novak", "Haddad", "Kim", "Berg", "Rossi"]


@dataclass
class Synthetic:
    posts: list[Post]
    members: list[Member]
    train: list[Example]
    test: list[EvalCase]
    topic_of: dict[int, str]


def synthetic_feed(n_members: int = 200, n_posts: int = 400, history: int = 6, seed: int = 0) -> Synthetic:
    """Members follow one topic; they engage with posts of it and ignore (shown, not engaged) others."""
    rng = np.random.default_rng(seed)
    topics = list(TOPICS)
    posts, topic_of = [], {}
    for pid in range(n_posts):
        topic = topics[pid % len(topics)]
        words = rng.choice(TOPICS[topic], size=3, replace=False).tolist()
        author = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        posts.append(
            Post(
                id=10_000 + pid,
                format=str(rng.choice(["text", "article", "video"])),
                text=f"Thoughts on {words[0]}, {words[1]} and {words[2]} this week.",
                author=None if pid % 3 else _author(author, topic),
                counts={"views": float(rng.lognormal(7, 2)), "likes": float(rng.poisson(20))},
            )
        )
        topic_of[10_000 + pid] = topic
    by_topic: dict[str, list[Post]] = defaultdict(list)
    for p in posts:
        by_topic[topic_of[p.id]].append(p)
    members, train, test = [], [], []
    for mid in range(n_members):
        topic = topics[mid % len(topics)]
        own = rng.permutation(len(by_topic[topic]))[: history + 2]
        liked = [by_topic[topic][i] for i in own]
        others = [p for p in posts if topic_of[p.id] != topic]
        shown = [others[i] for i in rng.choice(len(others), 4, replace=False)]
        hist = [
            Engagement(post_id=p.id, engaged_at=1_700_000_000 + 60 * k, action="like", post=p)
            for k, p in enumerate(liked[:history])
        ]
        member = Member(
            id=mid,
            headline=f"{topic} professional",
            industry=topic,
            skills=rng.choice(TOPICS[topic], size=2, replace=False).tolist(),
            history=hist,
        )
        members.append(member)
        for k in range(1, history):
            train.append(Example(_member(member, hist[:k]), liked[k], tuple(shown[:2])))
        test.append(EvalCase(member, {p.id for p in liked[history:]}))
    order = rng.permutation(len(train))
    return Synthetic(posts, members, [train[i] for i in order], test, topic_of)


def _author(name: str, topic: str) -> Author:
    return Author(name=name, headline=f"{topic} lead", company="Initech", industry=topic)
