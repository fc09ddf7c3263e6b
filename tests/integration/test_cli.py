"""The command line against the real server: index a JSONL corpus, retrieve, embed, time out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from feedserve.clients.online import FeedClient
from feedserve.errors import ClientError
from feedserve.ops.cli import main
from feedserve.prompt.records import Post, write_posts_jsonl

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "ensemble" / "prompt" / "examples"


def test_index_retrieve_and_embed_from_the_command_line(  # type: ignore[no-untyped-def]
    triton_server, tiny_artifacts, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    posts = [Post(id=500 + i, text=f"post {i} about kafka and python", counts={"ratings": float(i)}) for i in range(20)]
    corpus = tmp_path / "posts.jsonl"
    write_posts_jsonl(posts, corpus)
    base = ["--artifacts", str(tiny_artifacts.root)]
    assert (
        main(
            [
                *base,
                "index",
                "--corpus",
                str(corpus),
                "--url",
                triton_server.grpc_url,
                "--embeddings-out",
                str(tmp_path / "emb"),
            ]
        )
        == 0
    )
    assert np.load(tmp_path / "emb" / "ids.npy").tolist() == [p.id for p in posts]
    capsys.readouterr()

    member = json.loads((EXAMPLES / "member.json").read_text())
    member["history"].append({"post_id": 503})
    (tmp_path / "member.json").write_text(json.dumps(member))
    for protocol, url in (("grpc", triton_server.grpc_url), ("http", triton_server.http_url)):
        assert (
            main([*base, "retrieve", str(tmp_path / "member.json"), "-k", "5", "--url", url, "--protocol", protocol])
            == 0
        )
        hits = json.loads(capsys.readouterr().out.strip())
        assert len(hits) == 5 and 503 not in [h["post_id"] for h in hits]
        assert {h["post_id"] for h in hits} <= {p.id for p in posts}

    assert (
        main(
            [
                *base,
                "embed",
                "post",
                str(EXAMPLES / "post.json"),
                "--url",
                triton_server.grpc_url,
                "--out",
                str(tmp_path / "e.npy"),
            ]
        )
        == 0
    )
    vec = np.load(tmp_path / "e.npy")
    assert vec.shape == (1, 32) and abs(float(np.linalg.norm(vec)) - 1) < 1e-4


def test_client_timeout_is_a_clear_error(triton_server, tiny_artifacts) -> None:  # type: ignore[no-untyped-def]
    member = (EXAMPLES / "member.json").read_text()
    with (
        FeedClient(triton_server.grpc_url, "grpc", timeout_s=1e-4) as client,
        pytest.raises(ClientError, match="(?i)deadline"),
    ):
        client.retrieve(member, k=3)
    with FeedClient(triton_server.grpc_url, "grpc") as client:
        assert client.ready()


def test_index_into_milvus_from_the_command_line(triton_server, tiny_artifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`feedserve index --milvus-uri FILE` embeds through the server and fills a Milvus Lite index."""
    pytest.importorskip("milvus_lite")
    from feedserve.index.milvus import MilvusStore, shared_lite

    posts = [Post(id=700 + i, text=f"post {i} about milvus and triton") for i in range(12)]
    corpus = tmp_path / "posts.jsonl"
    write_posts_jsonl(posts, corpus)
    db = tmp_path / "milvus" / "posts.db"
    args = ["--artifacts", str(tiny_artifacts.root), "index", "--corpus", str(corpus), "--url", triton_server.grpc_url]
    assert main([*args, "--milvus-uri", str(db), "--milvus-collection", "cli_posts"]) == 0
    store = MilvusStore(shared_lite(db), tiny_artifacts.serving_dim(), "cli_posts")  # this process serves the file
    assert len(store) == 12 and store.lookup(np.array([700, 711, 712]))[1].tolist() == [True, True, False]
