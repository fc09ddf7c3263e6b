"""The in-process dual-encoder scorer the quality benchmark uses, and the popularity correlation."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from feedserve.prompt.buckets import PercentileBuckets
from feedserve.training.data import synthetic_feed
from feedserve.training.evaluate import EmbeddingRetriever, popularity_correlation
from tests.conftest import TINY_SETTINGS


def test_retriever_caches_posts_and_truncates_to_matryoshka_prefixes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    syn = synthetic_feed(n_members=6, n_posts=20, history=3)
    buckets = PercentileBuckets.fit_posts(syn.posts)
    first = EmbeddingRetriever(tiny_checkpoint, TINY_SETTINGS, buckets, syn.posts, tmp_path, batch=7)
    assert len(list(tmp_path.glob("posts-*.npz"))) == 1
    again = EmbeddingRetriever(tiny_checkpoint, TINY_SETTINGS, buckets, syn.posts, tmp_path)
    np.testing.assert_array_equal(first.posts, again.posts)
    # Batching sorts prompts by length; the rows must still come back in corpus order.
    one = EmbeddingRetriever(tiny_checkpoint, TINY_SETTINGS, buckets, syn.posts[3:4], None)
    np.testing.assert_allclose(one.posts[0], first.posts[3], atol=1e-5)

    full = first.score(syn.members)
    assert full.shape == (6, 20) and np.all(np.abs(full) <= 1 + 1e-5)
    m, p = first.member_vectors(syn.members), first.posts
    prefix = first.score(syn.members, dim=16)
    want = (m[:, :16] / np.linalg.norm(m[:, :16], axis=1, keepdims=True)) @ (
        p[:, :16] / np.linalg.norm(p[:, :16], axis=1, keepdims=True)
    ).T
    np.testing.assert_allclose(prefix, want, atol=1e-5)

    # Member embeddings kept on disk come back for the same prompts, in the order asked for.
    first.save_members()
    assert len(list(tmp_path.glob("members-*.npz"))) == 1
    np.testing.assert_allclose(again.member_vectors(syn.members[::-1]), m[::-1], atol=1e-5)  # embedded anew
    reloaded = EmbeddingRetriever(tiny_checkpoint, TINY_SETTINGS, buckets, syn.posts, tmp_path)
    assert len(reloaded._members) == 6
    np.testing.assert_array_equal(reloaded.member_vectors(syn.members[::-1]), m[::-1])
    # Two runs sharing the cache: the one saving last keeps what the other saved meanwhile.
    early = EmbeddingRetriever(tiny_checkpoint, TINY_SETTINGS, buckets, syn.posts, tmp_path)
    reloaded.member_vectors([s.model_copy(update={"history": s.history[:1]}) for s in syn.members])
    reloaded.save_members()
    early.member_vectors([s.model_copy(update={"history": s.history[:2]}) for s in syn.members])
    early.save_members()
    assert len(EmbeddingRetriever(tiny_checkpoint, TINY_SETTINGS, buckets, syn.posts, tmp_path)._members) == 18
    # Nothing embedded since: no save (a validation curve asks at every point), the file untouched.
    stamp = next(tmp_path.glob("members-*.npz")).stat().st_mtime_ns
    early.member_vectors(syn.members)
    early.save_members()
    assert next(tmp_path.glob("members-*.npz")).stat().st_mtime_ns == stamp


def test_popularity_correlation() -> None:
    popularity = np.array([0, 1, 10, 100, 1000], np.float64)
    follows = np.tile(np.log1p(popularity), (3, 1)) + np.array([[0.0], [0.1], [0.2]])
    assert popularity_correlation(follows, popularity) > 0.99
    assert popularity_correlation(-follows, popularity) < -0.99
    assert popularity_correlation(np.ones((3, 5)), popularity) == 0.0


def test_an_artifact_dir_built_from_an_adapter_knows_how_it_was_trained(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from feedserve.artifacts import DEFAULT_ADAPTER
    from feedserve.training.evaluate import EncoderDir

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "hf" / "import.json").write_text(json.dumps({"adapter": str(DEFAULT_ADAPTER)}))
    for name in ("serving.json", "buckets.json"):
        (tmp_path / name).write_text((DEFAULT_ADAPTER / name).read_text())
    d = EncoderDir.load(tmp_path)
    trained = json.loads((DEFAULT_ADAPTER / "train_config.json").read_text())
    assert d.matryoshka_dims == tuple(trained["matryoshka_dims"]) and not d.history_negatives
    assert d.train_report is not None and d.train_report["steps"] == trained["steps"]
