from __future__ import annotations

from feedserve.ops.builder import SAMPLE_CORPUS
from feedserve.prompt.movielens import load_movielens
from feedserve.training.data import movielens_split, synthetic_feed


def test_movielens_split_never_trains_on_the_future() -> None:
    ml = load_movielens(SAMPLE_CORPUS)
    split = movielens_split(ml, test_fraction=0.1)
    when = {(r.user, r.movie): r.timestamp for r in ml.ratings}
    assert split.train and len(split.test) >= 50
    for ex in split.train:
        assert when[(ex.member.id, ex.positive.id)] < split.cutoff
        assert all(
            h.engaged_at < when[(ex.member.id, ex.positive.id)] or h.engaged_at == when[(ex.member.id, ex.positive.id)]
            for h in ex.member.history
        )
        assert all(ml.movies[n.id] for n in ex.hard_negatives)
    for case in split.test:
        assert case.targets and all(when[(case.member.id, t)] >= split.cutoff for t in case.targets)
        assert not case.targets & {h.post_id for h in case.member.history}
        latest_seen = max(h.engaged_at or 0 for h in case.member.history)
        assert all(when[(case.member.id, t)] >= latest_seen for t in case.targets)


def test_the_validation_split_lies_inside_the_training_period() -> None:
    from feedserve.training.data import validation_movielens

    ml = load_movielens(SAMPLE_CORPUS)
    test = movielens_split(ml)
    inner = validation_movielens(ml)
    validation = movielens_split(inner)
    assert all(r.timestamp < test.cutoff for r in inner.ratings) and len(inner.ratings) < len(ml.ratings)
    assert validation.cutoff < test.cutoff and len(validation.test) >= 30
    when = {(r.user, r.movie): r.timestamp for r in ml.ratings}
    for case in validation.test:  # validation targets: inside the training period, after its own cutoff
        assert all(validation.cutoff <= when[(case.member.id, t)] < test.cutoff for t in case.targets)


def test_hard_negatives_are_disliked_movies() -> None:
    ml = load_movielens(SAMPLE_CORPUS)
    rating = {(r.user, r.movie): r.rating for r in ml.ratings}
    split = movielens_split(ml)
    negs = [(ex.member.id, n.id) for ex in split.train for n in ex.hard_negatives]
    assert negs and all(rating[k] <= 2.5 for k in negs)


def test_history_with_negatives_adds_only_earlier_disliked_movies() -> None:
    ml = load_movielens(SAMPLE_CORPUS)
    rating = {(r.user, r.movie): r.rating for r in ml.ratings}
    plain, mixed = movielens_split(ml), movielens_split(ml, history_negatives=True)
    assert [(e.member.id, e.positive.id) for e in plain.train] == [(e.member.id, e.positive.id) for e in mixed.train]
    grew = 0
    for a, b in zip(plain.train, mixed.train, strict=True):
        engaged = [h.post_id for h in b.member.history if rating[(b.member.id, h.post_id)] >= 4.0]
        disliked = [h for h in b.member.history if rating[(b.member.id, h.post_id)] <= 2.5]
        assert engaged == [h.post_id for h in a.member.history]
        assert all(h.engaged_at <= a.member.history[-1].engaged_at and h.action.startswith("rated ") for h in disliked)
        grew += bool(disliked)
    assert grew > len(plain.train) // 4
    assert all(
        h.engaged_at < mixed.cutoff
        for c in mixed.test
        for h in c.member.history
        if rating[(c.member.id, h.post_id)] <= 2.5
    )


def test_synthetic_members_engage_with_their_topic() -> None:
    syn = synthetic_feed(n_members=12, n_posts=60, history=4)
    for m, case in zip(syn.members, syn.test, strict=True):
        topics = {syn.topic_of[h.post_id] for h in m.history} | {syn.topic_of[t] for t in case.targets}
        assert topics == {m.industry}
    for ex in syn.train:
        assert all(syn.topic_of[n.id] != ex.member.industry for n in ex.hard_negatives)


def test_split_prompts_describe_posts_as_of_the_cutoff() -> None:
    """Counts and tags of the test period would tell the encoder which films it rates."""
    ml = load_movielens(SAMPLE_CORPUS)
    split = movielens_split(ml)
    then = {p.id: p for p in ml.posts(split.cutoff)}
    assert {p.id: p for p in split.corpus} == then
    assert any(p != ml.movies[p.id] for p in split.corpus)  # the whole log does describe some differently
    for ex in split.train[:50]:
        assert ex.positive == then[ex.positive.id] and all(n == then[n.id] for n in ex.hard_negatives)
        assert all(h.post == then[h.post_id] for h in ex.member.history)
    for case in split.test[:20]:
        assert all(h.post == then[h.post_id] for h in case.member.history)
