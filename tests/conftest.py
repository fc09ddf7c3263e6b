"""Shared fixtures: tiny artifacts built at test time, and a real tritonserver serving them."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from feedserve.artifacts import ArtifactLayout, EncoderSettings
from feedserve.ops.keys import WRITE_KEY_ENV
from tests.tiny import make_tiny_checkpoint, make_tiny_ranker

# Every test server and client shares one write key, as a deployment's secret would be shared.
os.environ.setdefault(WRITE_KEY_ENV, "feedserve-tests-write-key")

logger = logging.getLogger(__name__)

# Small budgets keep the tiny model fast; dim < hidden exercises Matryoshka truncation.
TINY_SETTINGS = EncoderSettings(
    dim=32,
    max_prompt_tokens=256,
    post_text_tokens=64,
    history_item_tokens=16,
    max_history_items=20,
    length_buckets=(32, 64, 128, 256),
)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="session")
def tiny_ranker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved ranker package (ranker.json, ranker.pt) for the tiny model's embeddings."""
    return make_tiny_ranker(tmp_path_factory.mktemp("ranker"), content_dim=TINY_SETTINGS.dim or 0)


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory, tiny_ranker: Path) -> ArtifactLayout:
    """A complete artifact directory (checkpoint, ONNX, buckets, settings, ranker) for the tiny model."""
    from feedserve.export.onnx import export_onnx
    from feedserve.ops.builder import SAMPLE_CORPUS, build_ranker
    from feedserve.prompt.movielens import load_movielens

    layout = ArtifactLayout(tmp_path_factory.mktemp("artifacts"))
    make_tiny_checkpoint(layout.hf_dir)
    TINY_SETTINGS.save(layout.settings)
    export_onnx(layout.hf_dir, TINY_SETTINGS, layout.onnx)
    load_movielens(SAMPLE_CORPUS).fit_buckets().save(layout.buckets)
    build_ranker(layout, tiny_ranker, SAMPLE_CORPUS)
    layout.write_manifest()
    return layout


@pytest.fixture(scope="session")
def triton_server(tiny_artifacts: ArtifactLayout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real tritonserver on free loopback ports, serving a freshly rendered repository."""
    from feedserve.ops.launcher import TritonServer, on_free_ports
    from feedserve.triton.repository import write_repository

    repo = tmp_path_factory.mktemp("model_repository")
    write_repository(repo)
    log = tmp_path_factory.mktemp("logs") / "tritonserver.log"
    server = TritonServer(
        on_free_ports(repository=repo, artifacts=tiny_artifacts.root, log_file=log, startup_timeout_s=180)
    )
    try:
        server.start()
    except Exception:
        if log.exists():
            logger.error("tritonserver log:\n%s", log.read_text()[-5000:])
        raise
    try:
        yield server
    finally:
        server.stop()
