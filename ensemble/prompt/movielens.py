"""MovieLens (ml-latest-small, shipped in data/ with its licence) as feed records.

A movie is a post: its title and year, genres and the tags users gave it, and as engagement counts
its number of ratings and its mean rating (both become percentile tokens). A user is a member whose
history is the movies they rated >= 4.0, oldest first: engaged posts only, as in the system we
reproduce.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from feedserve.prompt.buckets import PercentileBuckets
from feedserve.prompt.records import Article, Engagement, Member, Post

logger = logging.getLogger(__name__)

_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")
MAX_TAGS = 10


@dataclass
class Rating:
    user: int
    movie: int
    rating: float
    timestamp: int


@dataclass
class MovieLens:
    movies: dict[int, Post]
    ratings: list[Rating] = field(repr=False)

    def posts(self, before: int | None = None) -> list[Post]:
        """The movies; with `before`, their counts from the ratings before it alone (the catalog as
        the training period saw it: the ranker's count features, which must not know the test
        period's ratings; retrieval prompts read the whole log's, as the encoder was trained on)."""
        if before is None:
            return list(self.movies.values())
        counts = engagement_counts(r for r in self.ratings if r.timestamp < before)
        return [m.model_copy(update={"counts": counts.get(i, {"ratings": 0.0})}) for i, m in self.movies.items()]

    def members(self, min_rating: float = 4.0) -> list[Member]:
        """Every user who liked a movie, their history the movies they rated `min_rating` or more."""
        by_user = self.ratings_by_user()
        liked = {user: [r for r in rated if r.rating >= min_rating] for user, rated in sorted(by_user.items())}
        return [self.member(user, history) for user, history in liked.items() if history]

    def cutoff(self, test_fraction: float = 0.1, positive_rating: float = 4.0) -> int:
        """The global time split's cutoff: the time of the first of the latest `test_fraction` of
        the ratings >= `positive_rating` (everything before it is the training period)."""
        positives = sorted(
            (r for r in self.ratings if r.rating >= positive_rating), key=lambda r: (r.timestamp, r.user, r.movie)
        )
        return positives[int(len(positives) * (1 - test_fraction))].timestamp

    def ratings_by_user(self, before: int | None = None) -> dict[int, list[Rating]]:
        """Each user's ratings of catalog movies (before `before`, when given), oldest first, ties by
        movie id: the order every history here is built in."""
        by_user: dict[int, list[Rating]] = defaultdict(list)
        for r in sorted(self.ratings, key=lambda r: (r.timestamp, r.movie)):
            if r.movie in self.movies and (before is None or r.timestamp < before):
                by_user[r.user].append(r)
        return by_user

    def member(self, user: int, history: list[Rating]) -> Member:
        """User `user` as a member record whose history is these ratings, in the order given: what
        the retrieval prompts show of a MovieLens user (training and evaluation build it here too)."""
        return Member(
            id=user,
            headline=f"MovieLens user {user}",
            history=[
                Engagement(
                    post_id=r.movie, engaged_at=r.timestamp, action=f"rated {r.rating:g}", post=self.movies[r.movie]
                )
                for r in history
            ],
        )

    def fit_buckets(self) -> PercentileBuckets:
        return PercentileBuckets.fit_posts(self.movies.values())


def engagement_counts(ratings: Iterable[Rating]) -> dict[int, dict[str, float]]:
    """A rated movie's counts: its number of ratings and their mean."""
    n: Counter[int] = Counter()
    total: dict[int, float] = defaultdict(float)
    for r in ratings:
        n[r.movie] += 1
        total[r.movie] += r.rating
    return {m: {"ratings": float(k), "mean_rating": round(total[m] / k, 3)} for m, k in n.items()}


def load_movielens(directory: Path) -> MovieLens:
    directory = Path(directory)
    if not (directory / "movies.csv").exists():
        raise FileNotFoundError(f"{directory} does not hold MovieLens (movies.csv missing)")
    ratings = []
    with open(directory / "ratings.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            ratings.append(Rating(int(row["userId"]), int(row["movieId"]), float(row["rating"]), int(row["timestamp"])))
    tags: dict[int, Counter[str]] = defaultdict(Counter)
    with open(directory / "tags.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            tags[int(row["movieId"])][row["tag"].strip().lower()] += 1
    counts = engagement_counts(ratings)
    movies = {}
    with open(directory / "movies.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            movie = int(row["movieId"])
            match = _YEAR.match(row["title"])
            title, year = (match.group(1), int(match.group(2))) if match else (row["title"].strip(), None)
            genres = [g for g in row["genres"].split("|") if g and g != "(no genres listed)"]
            user_tags = [t for t, _ in tags[movie].most_common(MAX_TAGS) if t not in {g.lower() for g in genres}]
            movies[movie] = Post(
                id=movie,
                format="movie",
                article=Article(title=title, source="MovieLens"),
                year=year,
                tags=genres + user_tags[: MAX_TAGS - len(genres)] if len(genres) < MAX_TAGS else genres[:MAX_TAGS],
                counts=counts.get(movie, {"ratings": 0.0}),
            )
    logger.info("MovieLens: %d movies, %d ratings from %s", len(movies), len(ratings), directory)
    return MovieLens(movies, ratings)
