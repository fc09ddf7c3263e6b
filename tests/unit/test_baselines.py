from __future__ import annotations

import numpy as np

from feedserve.prompt.records import Engagement, Member, Post
from feedserve.training.baselines import ItemKNN
from feedserve.training.data import EvalCase
from feedserve.training.evaluate import metrics, rank


def test_itemknn_scores_co_engaged_items() -> None:
    ids = np.array([1, 2, 3, 4])
    # Users who liked 1 also liked 2; 3 and 4 go together.
    knn = ItemKNN({10: {1, 2}, 11: {1, 2}, 12: {3, 4}, 13: {2}}, ids)
    scores = knn.score([Member(id=1, history=[Engagement(post_id=1)])])[0]
    assert scores.argmax() in (0, 1) and scores[1] > scores[2] == scores[3] == 0
    expected = 2 / np.sqrt(2 * 3)  # cosine of item columns 1 and 2
    assert np.isclose(scores[1], expected)


def test_rank_excludes_history_and_metrics_count_hits() -> None:
    ids = np.array([1, 2, 3, 4, 5])
    member = Member(id=1, history=[Engagement(post_id=1, post=Post(id=1))])
    case = EvalCase(member, {3, 5})
    top = rank(np.array([[9.0, 8.0, 7.0, 1.0, 0.5]]), ids, [case], k=2)
    assert top[0].tolist() == [2, 3]
    m = metrics(top, [case], ks=(1, 2))
    assert m["recall@1"] == 0.0 and m["recall@2"] == 0.5
    assert np.isclose(m["ndcg@10"], (1 / np.log2(3)) / (1 + 1 / np.log2(3)))
