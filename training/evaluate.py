"""Full-catalog retrieval metrics: Recall@k and NDCG@k, the member's history excluded."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from feedserve.records import Member, Post
from feedserve.training.data import EvalCase

EmbedPosts = Callable[[Sequence[Post]], np.ndarray]
EmbedMembers = Callable[[Sequence[Member]], np.ndarray]


def rank(scores: np.ndarray, ids: np.ndarray, cases: Sequence[EvalCase], k: int) -> list[np.ndarray]:
    """Top-k post ids per case, skipping posts already in that member's history."""
    out = []
    for row, case in zip(scores, cases, strict=True):
        seen = {h.post_id for h in case.member.history}
        order = np.argsort(-row, kind="stable")
        out.append(np.array([i for i in ids[order[: k + len(seen)]] if i not in seen][:k], np.int64))
    return out


def metrics(top: Sequence[np.ndarray], cases: Sequence[EvalCase], ks: Sequence[int] = (10, 50, 100)) -> dict[str, float]:
    result: dict[str, float] = {}
    for k in ks:
        result[f"recall@{k}"] = float(np.mean([len(set(t[:k].tolist()) & c.targets) / len(c.targets) for t, c in zip(top, cases, strict=True)]))
    ndcg = []
    for t, c in zip(top, cases, strict=True):
        gains = [1.0 / np.log2(i + 2) for i, pid in enumerate(t[:10]) if pid in c.targets]
        ideal = sum(1.0 / np.log2(i + 2) for i in range(min(10, len(c.targets))))
        ndcg.append(sum(gains) / ideal)
    result["ndcg@10"] = float(np.mean(ndcg))
    return result


def evaluate_embeddings(
    embed_posts: EmbedPosts, embed_members: EmbedMembers, corpus: Sequence[Post], cases: Sequence[EvalCase],
    ks: Sequence[int] = (10, 50, 100), batch: int = 32,
) -> dict[str, float]:
    post_vecs = np.concatenate([embed_posts(corpus[i : i + batch]) for i in range(0, len(corpus), batch)])
    members = [c.member for c in cases]
    member_vecs = np.concatenate([embed_members(members[i : i + batch]) for i in range(0, len(members), batch)])
    ids = np.array([p.id for p in corpus], np.int64)
    top = rank(member_vecs @ post_vecs.T, ids, cases, max(ks))
    return metrics(top, cases, ks)
