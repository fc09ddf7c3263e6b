"""The whole retrieval path on a real tritonserver (tiny model), over HTTP and gRPC."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from feedserve.artifacts import ArtifactLayout, EncoderSettings
from feedserve.clients.batch import index_corpus
from feedserve.clients.online import FeedClient, records_tensor
from feedserve.errors import ClientError
from feedserve.ops.builder import SAMPLE_CORPUS
from feedserve.schema import IO, ModelName

pytestmark = pytest.mark.integration

N_POSTS = 120
PROTOCOLS = ("http", "grpc")


@pytest.fixture(scope="module")
def movielens():  # type: ignore[no-untyped-def]
    from feedserve.prompt.movielens import load_movielens

    return load_movielens(SAMPLE_CORPUS)


@pytest.fixture(scope="module")
def posts(movielens):  # type: ignore[no-untyped-def]
    return sorted(movielens.posts(), key=lambda p: -p.counts.get("ratings", 0))[:N_POSTS]


@pytest.fixture(scope="module")
def members(movielens):  # type: ignore[no-untyped-def]
    return [m for m in movielens.members() if 3 <= len(m.history) <= 40][:4]


@pytest.fixture(scope="module")
def indexed(triton_server, tiny_artifacts: ArtifactLayout, posts) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Index the posts through embed_post (async gRPC batch client); returns their embeddings."""
    index_corpus(
        posts,
        [p.id for p in posts],
        tiny_artifacts.index,
        embeddings_dir=tiny_artifacts.root / "emb",
        url=triton_server.grpc_url,
        batch_size=8,
        concurrency=4,
        progress=False,
    )
    return np.load(tiny_artifacts.root / "emb" / "embeddings.npy")


def _client(server, protocol: str) -> FeedClient:  # type: ignore[no-untyped-def]
    return FeedClient(server.grpc_url if protocol == "grpc" else server.http_url, protocol, timeout_s=60)  # type: ignore[arg-type]


@pytest.fixture
def local(tiny_artifacts: ArtifactLayout):  # type: ignore[no-untyped-def]
    """The same pipeline in-process: prompt builder + ONNX Runtime, no server."""
    from tokenizers import Tokenizer

    from feedserve.encode.ort import OnnxEncoder
    from feedserve.prompt.buckets import PercentileBuckets
    from feedserve.prompt.builder import PromptBuilder

    settings = EncoderSettings.load(tiny_artifacts.settings)
    builder = PromptBuilder(
        Tokenizer.from_file(str(tiny_artifacts.tokenizer)), PercentileBuckets.load(tiny_artifacts.buckets), settings
    )
    return builder, OnnxEncoder(tiny_artifacts.onnx)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_model_is_ready(triton_server, protocol: str) -> None:  # type: ignore[no-untyped-def]
    with _client(triton_server, protocol) as client:
        assert client.ready()
        for name in ModelName:
            assert client._client.is_model_ready(name), name


def test_batch_index_embeds_like_the_local_pipeline(indexed: np.ndarray, posts, local) -> None:  # type: ignore[no-untyped-def]
    builder, encoder = local
    assert indexed.shape == (N_POSTS, 32)
    np.testing.assert_allclose(np.linalg.norm(indexed, axis=1), 1.0, atol=1e-4)
    batch = builder.encode_posts(posts[:8])
    expected = encoder.encode(batch.input_ids, batch.attention_mask)
    cos = (expected * indexed[:8]).sum(axis=1)
    assert cos.min() > 0.9999


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_embed_post_and_member(triton_server, indexed, posts, members, local, protocol: str) -> None:  # type: ignore[no-untyped-def]
    builder, encoder = local
    with _client(triton_server, protocol) as client:
        got = client.embed_posts(posts[:3])
        np.testing.assert_allclose(got, indexed[:3], atol=1e-5)
        m = client.embed_members(members[:2])
    batch = builder.encode_members(members[:2])
    expected = encoder.encode(batch.input_ids, batch.attention_mask)
    assert ((m * expected).sum(axis=1)).min() > 0.9999


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_retrieve_matches_brute_force_and_skips_history(  # type: ignore[no-untyped-def]
    triton_server, indexed, posts, members, local, protocol: str
) -> None:
    builder, encoder = local
    ids = np.array([p.id for p in posts])
    with _client(triton_server, protocol) as client:
        results = client.retrieve_many(members, k=10)
    batch = builder.encode_members(members)
    queries = encoder.encode(batch.input_ids, batch.attention_mask)
    for member, hits, q in zip(members, results, queries, strict=True):
        seen = {h.post_id for h in member.history}
        order = [i for i in ids[np.argsort(-(indexed @ q))] if i not in seen][:10]
        assert [h.post_id for h in hits] == order
        assert not seen & {h.post_id for h in hits}
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_component_models_answer_directly(triton_server, indexed, posts, protocol: str) -> None:  # type: ignore[no-untyped-def]
    with _client(triton_server, protocol) as client:
        tokens = client.infer(
            ModelName.PREPROCESS_POST, {"RECORDS": records_tensor(posts[:2])}, ("INPUT_IDS", "ATTENTION_MASK")
        )
        assert tokens["INPUT_IDS"].dtype == np.int64 and tokens["INPUT_IDS"].shape == tokens["ATTENTION_MASK"].shape
        emb = client.infer(ModelName.ENCODER, tokens, ("EMBEDDING",))["EMBEDDING"]
        np.testing.assert_allclose(emb, indexed[:2], atol=1e-5)
        out = client.infer(ModelName.KNN, {"QUERY": emb, "K": np.array([[1], [1]], np.int64)}, ("IDS", "SCORES"))
        assert out["IDS"][:, 0].tolist() == [posts[0].id, posts[1].id]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_live_writes_are_searchable_once_acknowledged(triton_server, indexed, protocol: str) -> None:  # type: ignore[no-untyped-def]
    new_id = 10**12 + PROTOCOLS.index(protocol)
    query = indexed[5:6]
    k = np.array([[1]], np.int64)
    with _client(triton_server, protocol) as client:
        write = {"OP": np.array([[1]], np.int64), "POST_ID": np.array([[new_id]], np.int64), "EMBEDDING": query}
        lsn = client.infer(ModelName.INDEX_WRITE, write, ("LSN",))["LSN"]
        assert lsn.shape == (1, 1) and lsn[0, 0] >= 1
        # The same vector as an indexed post: both score 1.0, so ask for two.
        top = client.infer(ModelName.KNN, {"QUERY": query, "K": np.array([[2]], np.int64)}, ("IDS",))["IDS"][0]
        assert new_id in top.tolist()
        delete = {"OP": np.array([[2]], np.int64), "POST_ID": np.array([[new_id]], np.int64)}
        assert client.infer(ModelName.INDEX_WRITE, delete, ("LSN",))["LSN"][0, 0] > lsn[0, 0]
        top = client.infer(ModelName.KNN, {"QUERY": query, "K": k * 50}, ("IDS",))["IDS"][0]
        assert new_id not in top.tolist()


BAD_REQUESTS = [
    # (model, inputs, words the error must contain)
    (ModelName.EMBED_POST, {"RECORDS": np.array([[b"{not json"]], object)}, "JSON"),
    (ModelName.EMBED_POST, {"RECORDS": np.array([[b'{"format": "text", "text": "no id"}']], object)}, "id"),
    (ModelName.EMBED_POST, {"RECORDS": np.array([[b'{"id": 1, "text": "x", "bogus": 1}']], object)}, "bogus"),
    (ModelName.EMBED_POST, {"RECORDS": np.array([[b'{"id": "one", "text": "x"}']], object)}, "id"),
    (
        ModelName.EMBED_MEMBER,
        {"RECORDS": np.array([[b'{"id": 5, "history": [{"engaged_at": 1}]}']], object)},
        "post_id",
    ),
    (ModelName.RETRIEVE, {"RECORDS": np.array([[b'{"id": 5}']], object), "K": np.array([[0]], np.int64)}, "k=0"),
    (
        ModelName.RETRIEVE,
        {"RECORDS": np.array([[b'{"id": 5}']], object), "K": np.array([[100000]], np.int64)},
        "out of range",
    ),
    (ModelName.KNN, {"QUERY": np.zeros((1, 7), np.float32), "K": np.array([[1]], np.int64)}, "dimension"),
    (ModelName.ENCODER, {"INPUT_IDS": np.ones((1, 4), np.int64), "ATTENTION_MASK": np.ones((1, 5), np.int64)}, "shape"),
    (
        ModelName.ENCODER,
        {"INPUT_IDS": np.full((1, 4), 10**9, np.int64), "ATTENTION_MASK": np.ones((1, 4), np.int64)},
        "token ids",
    ),
    (ModelName.INDEX_WRITE, {"OP": np.array([[3]], np.int64), "POST_ID": np.array([[1]], np.int64)}, "upsert"),
    (
        ModelName.INDEX_WRITE,
        {
            "OP": np.array([[1]], np.int64),
            "POST_ID": np.array([[1]], np.int64),
            "EMBEDDING": np.zeros((1, 7), np.float32),
        },
        "EMBEDDING: vectors must have shape",
    ),
    # Triton itself checks declared dtypes before the backend sees the request.
    (ModelName.KNN, {"QUERY": np.zeros((1, 32), np.float64), "K": np.array([[1]], np.int64)}, "FP64"),
]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("model,inputs,words", BAD_REQUESTS, ids=[f"{m}-{w}" for m, _, w in BAD_REQUESTS])
def test_bad_input_is_named_and_server_keeps_answering(  # type: ignore[no-untyped-def]
    triton_server, indexed, posts, protocol: str, model: str, inputs, words: str
) -> None:
    with _client(triton_server, protocol) as client:
        with pytest.raises(ClientError, match=words):
            client.infer(model, inputs, (IO[ModelName(model)].outputs[0].name,))
        assert client.ready()
        assert client.embed_posts(posts[:1]).shape == (1, 32)


def test_bad_requests_fail_alone_inside_a_dynamic_batch(triton_server, indexed, posts, members) -> None:  # type: ignore[no-untyped-def]
    """Good and bad requests sent together, so that the dynamic batcher groups them."""
    import tritonclient.grpc.aio as grpcaio
    from tritonclient.utils import InferenceServerException

    member_json = json.dumps(json.loads(members[0].model_dump_json())).encode()

    async def send(client, record: bytes, k: int):  # type: ignore[no-untyped-def]
        rec = grpcaio.InferInput("RECORDS", [1, 1], "BYTES")
        rec.set_data_from_numpy(np.array([[record]], object))
        kk = grpcaio.InferInput("K", [1, 1], "INT64")
        kk.set_data_from_numpy(np.array([[k]], np.int64))
        try:
            res = await client.infer("retrieve", [rec, kk])
            return res.as_numpy("IDS")
        except InferenceServerException as err:
            return err

    async def main():  # type: ignore[no-untyped-def]
        async with grpcaio.InferenceServerClient(triton_server.grpc_url) as client:
            jobs = []
            for i in range(24):
                if i % 3 == 0:
                    jobs.append(send(client, b'{"id": 1, "skills": "not a list"}', 5))
                elif i % 3 == 1:
                    jobs.append(send(client, member_json, 0))
                else:
                    jobs.append(send(client, member_json, 5))
            return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    for i, r in enumerate(results):
        if i % 3 == 2:
            assert isinstance(r, np.ndarray) and r.shape == (1, 5), r
        else:
            assert isinstance(r, InferenceServerException)
            assert ("skills" in r.message()) if i % 3 == 0 else ("k=0" in r.message())
    # Every good answer is the same: a bad neighbour in the batch changed nothing.
    good = [r for i, r in enumerate(results) if i % 3 == 2]
    assert all((g == good[0]).all() for g in good)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_feed_is_the_retrieved_candidates_ranked(triton_server, indexed, members, protocol: str) -> None:  # type: ignore[no-untyped-def]
    """`feed` = retrieve CANDIDATES, then `rank` them: the same posts and order as the two models
    called one after the other, each post's final score the weighted sum of its task scores."""
    from feedserve.rank.train import DEFAULT_TASK_WEIGHTS

    with _client(triton_server, protocol) as client:
        assert client.ranker_tasks() == list(DEFAULT_TASK_WEIGHTS)
        feeds = client.feed_many(members, n=5, candidates=40)
        for member, feed in zip(members, feeds, strict=True):
            assert feed == client.feed(member, n=5, candidates=40) or _close(feed, client.feed(member, 5, 40))
            retrieved = client.retrieve(member, k=40)
            assert len(feed) == 5 and {r.post_id for r in feed} <= {h.post_id for h in retrieved}
            assert not {r.post_id for r in feed} & {h.post_id for h in member.history}
            scores = [r.score for r in feed]
            assert scores == sorted(scores, reverse=True)
            for r in feed:
                assert r.score == pytest.approx(sum(DEFAULT_TASK_WEIGHTS[t] * p for t, p in r.tasks.items()), abs=1e-5)
            ranked = client.infer(
                ModelName.RANK,
                {
                    "RECORDS": records_tensor([member]),
                    "QUERY": client.embed_members([member]),
                    "CANDIDATE_IDS": np.array([[h.post_id for h in retrieved]], np.int64),
                    "CANDIDATE_SCORES": np.array([[h.score for h in retrieved]], np.float32),
                    "K": np.array([[5]], np.int64),
                },
                ("IDS", "SCORES"),
            )
            assert ranked["IDS"][0].tolist() == [r.post_id for r in feed]
            np.testing.assert_allclose(ranked["SCORES"][0], scores, atol=1e-4)


def _close(a, b) -> bool:  # type: ignore[no-untyped-def]
    """Two feeds alike up to float noise of batching (same posts, scores within 1e-4)."""
    return [r.post_id for r in a] == [r.post_id for r in b] and all(
        abs(x.score - y.score) < 1e-4 for x, y in zip(a, b, strict=True)
    )
