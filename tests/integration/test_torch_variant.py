"""The gpu-torch repository on a real tritonserver, with its instances moved to the CPU: the PyTorch
encoder backend, the PyTorch kNN engine and the PyTorch ranker under the same ensembles as on a GPU
node. Only the placement differs (KIND_CPU, device "cpu", fp32 kNN storage); on a GPU host the `gpu`
tests and benchmarks/gpu.py and rank_gpu.py cover the device itself."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.model_config_pb2 as mc

from feedserve.artifacts import ArtifactLayout, EncoderSettings
from feedserve.clients.batch import index_corpus
from feedserve.clients.online import FeedClient, records_tensor
from feedserve.ops.builder import SAMPLE_CORPUS
from feedserve.ops.launcher import TritonServer, on_free_ports
from feedserve.prompt.movielens import load_movielens
from feedserve.schema import ModelName
from feedserve.triton.base import RequestError
from feedserve.triton.rank import RankModel
from feedserve.triton.repository import RepositorySettings, config_files, render_configs, write_files

pytestmark = pytest.mark.integration


def _torch_repository_on_cpu(dest: Path) -> None:
    configs = render_configs(RepositorySettings(variant="gpu-torch", knn_dtype="fp32"))
    moved = []
    for name, config in configs.items():
        for group in config.instance_group:
            if group.kind == mc.ModelInstanceGroup.KIND_GPU:
                group.kind = mc.ModelInstanceGroup.KIND_CPU
                config.parameters["device"].string_value = "cpu"
                moved.append(name)
    assert sorted(moved) == sorted([ModelName.ENCODER, ModelName.KNN, ModelName.RANK])  # what goes on the GPU
    assert configs[ModelName.ENCODER].parameters["runtime"].string_value == "torch"
    assert configs[ModelName.RANK].parameters["runtime"].string_value == "torch"
    assert configs[ModelName.KNN].parameters["engine"].string_value == "torch"
    write_files(dest, config_files(configs))


def test_the_torch_backends_serve_the_ensembles(tiny_artifacts: ArtifactLayout, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    from feedserve.encode.ort import OnnxEncoder
    from feedserve.prompt.buckets import PercentileBuckets
    from feedserve.prompt.builder import PromptBuilder

    root = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts.root, root, ignore=shutil.ignore_patterns("index", "emb"))
    layout = ArtifactLayout(root)
    _torch_repository_on_cpu(tmp_path / "repo")
    data = load_movielens(SAMPLE_CORPUS)
    posts = sorted(data.posts(), key=lambda p: -p.counts.get("ratings", 0))[:60]
    members = [m for m in data.members() if 3 <= len(m.history) <= 40][:3]
    builder = PromptBuilder(
        Tokenizer.from_file(str(layout.tokenizer)),
        PercentileBuckets.load(layout.buckets),
        EncoderSettings.load(layout.settings),
    )
    onnx = OnnxEncoder(layout.onnx)
    options = on_free_ports(
        repository=tmp_path / "repo", artifacts=root, log_file=tmp_path / "tritonserver.log", startup_timeout_s=180
    )
    with TritonServer(options) as server, FeedClient(server.grpc_url, "grpc", timeout_s=60) as client:
        # Posts embedded by the torch encoder through embed_post, indexed, and read back by the torch kNN.
        index_corpus(
            posts,
            [p.id for p in posts],
            layout.index,
            embeddings_dir=root / "emb",
            url=server.grpc_url,
            batch_size=8,
            concurrency=2,
            progress=False,
        )
        embedded = np.load(root / "emb" / "embeddings.npy")
        batch = builder.encode_posts(posts)
        reference = onnx.encode(batch.input_ids, batch.attention_mask)
        assert (embedded * reference).sum(axis=1).min() > 0.999  # right-padded fused attention vs the ONNX graph

        queries = client.embed_members(members)
        batch = builder.encode_members(members)
        assert (queries * onnx.encode(batch.input_ids, batch.attention_mask)).sum(axis=1).min() > 0.999
        ids = np.array([p.id for p in posts])
        for member, hits, q in zip(members, client.retrieve_many(members, k=10), queries, strict=True):
            seen = {h.post_id for h in member.history}
            expected = [i for i in ids[np.argsort(-(embedded @ q))] if i not in seen][:10]
            assert [h.post_id for h in hits] == expected

        # The feed: retrieval's candidates ranked by the PyTorch ranker as the ONNX graph ranks them
        # (an in-process `rank` of the cpu variant, following the same index).
        reference = RankModel()
        reference.setup(layout, {})
        try:
            for member, q in zip(members, queries, strict=True):
                hits = client.retrieve(member, k=30)
                fed = client.feed(member, n=10, candidates=30)
                (want,) = reference.run(
                    [
                        {
                            "RECORDS": records_tensor([member]),
                            "QUERY": q[None].astype(np.float32),
                            "CANDIDATE_IDS": np.array([[h.post_id for h in hits]], np.int64),
                            "CANDIDATE_SCORES": np.array([[h.score for h in hits]], np.float32),
                            "K": np.array([[10]], np.int64),
                        }
                    ]
                )
                assert not isinstance(want, RequestError), want
                assert [r.post_id for r in fed] == want["IDS"][0].tolist()
                np.testing.assert_allclose([r.score for r in fed], want["SCORES"][0], atol=1e-4)
        finally:
            reference.finalize()

        # A live write reaches the kNN's device copy in place; the next search sees it.
        target = queries[:1] / np.linalg.norm(queries[:1])
        client.infer(
            ModelName.INDEX_WRITE,
            {
                "OP": np.ones((1, 1), np.int64),
                "POST_ID": np.array([[999_999]], np.int64),
                "EMBEDDING": target.astype(np.float32),
            },
            ("LSN",),
        )
        found = client.infer(ModelName.KNN, {"QUERY": queries[:1], "K": np.array([[1]], np.int64)}, ("IDS",))["IDS"]
        assert found.tolist() == [[999_999]]
        client.infer(
            ModelName.INDEX_WRITE,
            {"OP": np.full((1, 1), 2, np.int64), "POST_ID": np.array([[999_999]], np.int64)},
            ("LSN",),
        )
        found = client.infer(ModelName.KNN, {"QUERY": queries[:1], "K": np.array([[3]], np.int64)}, ("IDS",))["IDS"]
        assert 999_999 not in found.ravel().tolist()
