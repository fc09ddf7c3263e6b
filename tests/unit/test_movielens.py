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


def test_a_movie_described_as_of_a_time_knows_only_the_log_before_it(ml: MovieLens) -> None:
    cutoff = ml.cutoff()
    then = ml.at(cutoff)
    assert then.ratings is ml.ratings and then.described_at == cutoff
    rated = [r for r in ml.ratings if r.timestamp < cutoff]
    for movie in (1, 318, max(ml.movies)):
        before = [r.rating for r in rated if r.movie == movie]
        assert then.movies[movie].counts["ratings"] == len(before)
    # A tag first given in the test period is in the whole log's description alone.
    late = {(t.movie, t.tag) for t in ml.taggings if t.timestamp >= cutoff}
    early = {(t.movie, t.tag) for t in ml.taggings if t.timestamp < cutoff}
    movie, tag = next((m, t) for m, t in sorted(late - early) if t in ml.movies[m].tags)
    assert tag not in then.movies[movie].tags and then.movies[movie].tags[: len(ml.genres[movie])] == ml.genres[movie]
    assert ml.at(None).posts() == ml.posts()  # the whole log's description is the one loaded


def test_the_log_cut_at_a_time_drops_later_ratings_and_tags(ml: MovieLens) -> None:
    cutoff = ml.cutoff()
    cut = ml.before(cutoff)
    assert max(r.timestamp for r in cut.ratings) < cutoff and max(t.timestamp for t in cut.taggings) < cutoff
    assert cut.posts() == ml.posts(cutoff) and cut.at(None).posts() == cut.posts()
