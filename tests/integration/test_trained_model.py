"""A model fine-tuned here goes through import, ONNX export and a real tritonserver unchanged.

It ships the way the bundled MovieLens fine-tune does: base checkpoint + adapter package, cut to the
layers it was trained on, merged at build time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from feedserve.artifacts import ArtifactLayout, EncoderSettings
from feedserve.clients.online import FeedClient
from feedserve.encode.pytorch import TorchEncoder
from feedserve.ops.builder import BuildOptions, build_artifacts
from feedserve.ops.launcher import TritonServer, on_free_ports
from feedserve.prompt.buckets import PercentileBuckets
from feedserve.prompt.builder import PromptBuilder
from feedserve.training.data import synthetic_feed
from feedserve.training.train import TrainConfig, train
from feedserve.triton.repository import write_repository
from tests.conftest import TINY_SETTINGS

pytestmark = pytest.mark.integration


def test_trained_artifact_serves_the_embeddings_pytorch_gives(tiny_checkpoint: Path, tmp_path: Path) -> None:
    syn = synthetic_feed(n_members=20, n_posts=40, history=4)
    buckets = PercentileBuckets.fit_posts(syn.posts)
    run = tmp_path / "run"
    cfg = TrainConfig(steps=4, batch_size=6, lr=1e-3, easy_negatives=4, lora_r=4, keep_layers=1)
    result = train(tiny_checkpoint, run, syn.train, syn.posts, buckets, TINY_SETTINGS, cfg, progress=False)

    layout = build_artifacts(BuildOptions(tmp_path / "artifacts", source=tiny_checkpoint, adapter=run / "adapter"))
    assert layout.buckets.read_text() == (run / "buckets.json").read_text()
    assert EncoderSettings.load(layout.settings) == TINY_SETTINGS
    assert json.loads((layout.hf_dir / "config.json").read_text())["num_hidden_layers"] == 1
    repo = tmp_path / "repo"
    write_repository(repo)
    opts = on_free_ports(repository=repo, artifacts=layout.root, log_file=tmp_path / "server.log")
    with TritonServer(opts) as server, FeedClient(server.grpc_url, "grpc") as client:
        served = client.embed_posts(syn.posts[:5])
        served_members = client.embed_members(syn.members[:3])

    reference = TorchEncoder(result.model_dir, TINY_SETTINGS)
    builder = PromptBuilder(Tokenizer.from_file(str(ArtifactLayout(layout.root).tokenizer)), buckets, TINY_SETTINGS)
    for got, batch in (
        (served, builder.encode_posts(syn.posts[:5])),
        (served_members, builder.encode_members(syn.members[:3])),
    ):
        want = reference.encode(batch.input_ids, batch.attention_mask)
        assert (got * want).sum(axis=1).min() > 0.9999
