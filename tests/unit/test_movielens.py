from __future__ import annotations

import pytest

from feedserve.ops.builder import SAMPLE_CORPUS
from feedserve.prompt.movielens import MovieLens, load_movielens


@pytest.fixture(scope="module")
def ml() -> MovieLens:
    return load_movielens(SAMPLE_CORPUS)


def test_movies_become_posts(ml: MovieLens) -> None:
    posts = {p.id: p for p in ml.posts()}
    assert len(posts) == 9742
    toy = posts[1]
    assert toy.article is not None and toy.article.title == "Toy Story" and toy.year == 1995
    assert toy.tags[:5] == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    assert toy.counts["ratings"] == 215 and 3.5 < toy.counts["mean_rating"] < 4.5


def test_members_hold_liked_movies_in_time_order(ml: MovieLens) -> None:
    members = ml.members()
    liked_users = {r.user for r in ml.ratings if r.rating >= 4.0}
    assert len(members) == len(liked_users)
    m = members[0]
    ratings = {(r.user, r.movie): r for r in ml.ratings}
    times = [h.engaged_at for h in m.history]
    assert times == sorted(times)
    assert all(ratings[(m.id, h.post_id)].rating >= 4.0 for h in m.history)
    assert all(h.post is not None for h in m.history)


def test_buckets_fit_on_movie_counts(ml: MovieLens) -> None:
    buckets = ml.fit_buckets()
    assert set(buckets.features) == {"ratings", "mean_rating"}
    assert buckets.bucket("ratings", 300) == 99
