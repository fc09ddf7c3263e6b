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
class Tagging:
    user: int
    movie: int
    tag: str
    timestamp: int


@dataclass
class MovieLens:
    """The catalog and its log. `movies` describe each film as of `described_at` (None: the whole
    log): its counts and user tags come from the ratings and taggings before that time alone."""

    movies: dict[int, Post]
    ratings: list[Rating] = field(repr=False)
    taggings: list[Tagging] = field(repr=False, default_factory=list)
    genres: dict[int, list[str]] = field(repr=False, default_factory=dict)
    described_at: int | None = None

    def at(self, time: int | None) -> MovieLens:
        """Every rating kept, each movie described as it stood before `time`: what a model trained
        on the period before `time` may read of a post. Counts and tags taken from the whole log
        would tell an evaluation which films the test period rates (a fifth of the taggings fall
        after the benchmarks' cutoff, often by the members being evaluated, on their own targets)."""
        counts = engagement_counts(r for r in self.ratings if time is None or r.timestamp < time)
        tags: dict[int, Counter[str]] = defaultdict(Counter)
        for t in self.taggings:
            if time is None or t.timestamp < time:
                tags[t.movie][t.tag] += 1
        movies = {
            i: m.model_copy(
                update={
                    "counts": counts.get(i, {"ratings": 0.0}),
                    "tags": movie_tags(self.genres.get(i, []), tags[i]),
                }
            )
            for i, m in self.movies.items()
        }
        return MovieLens(movies, self.ratings, self.taggings, self.genres, time)

    def before(self, time: int) -> MovieLens:
        """The log cut at `time` (ratings and taggings before it), the movies described as of it."""
        log = MovieLens(
            self.movies,
            [r for r in self.ratings if r.timestamp < time],
            [t for t in self.taggings if t.timestamp < time],
            self.genres,
        )
        return log.at(time)

    def posts(self, before: int | None = None) -> list[Post]:
        """The movies as described here; with `before`, as they stood before it."""
        if before is None:
            return list(self.movies.values())
        return self.at(before).posts()

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
    with open(directory / "tags.csv", newline="", encoding="utf-8") as f:
        taggings = [
            Tagging(int(row["userId"]), int(row["movieId"]), row["tag"].strip().lower(), int(row["timestamp"]))
            for row in csv.DictReader(f)
        ]
    movies, genres = {}, {}
    with open(directory / "movies.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            movie = int(row["movieId"])
            match = _YEAR.match(row["title"])
            title, year = (match.group(1), int(match.group(2))) if match else (row["title"].strip(), None)
            genres[movie] = [g for g in row["genres"].split("|") if g and g != "(no genres listed)"]
            movies[movie] = Post(id=movie, format="movie", article=Article(title=title, source="MovieLens"), year=year)
    logger.info("MovieLens: %d movies, %d ratings from %s", len(movies), len(ratings), directory)
    return MovieLens(movies, ratings, taggings, genres).at(None)


def movie_tags(genres: list[str], tags: Counter[str]) -> list[str]:
    """A movie's genres, then its most frequent user tags that are not a genre, `MAX_TAGS` in all."""
    user_tags = [t for t, _ in tags.most_common(MAX_TAGS) if t not in {g.lower() for g in genres}]
    return (genres + user_tags)[:MAX_TAGS]
