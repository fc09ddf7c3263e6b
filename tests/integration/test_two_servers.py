"""Two servers on one index directory (shared storage): one renders `index_write`, the other only
follows. A write acknowledged by the first is seen by the second's next search; a delete too."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from feedserve.artifacts import ArtifactLayout
from feedserve.clients.online import FeedClient
from feedserve.errors import ClientError
from feedserve.ops.launcher import ServerOptions, TritonServer, free_port
from feedserve.schema import ModelName
from feedserve.triton.repository import RepositorySettings, write_repository

pytestmark = pytest.mark.integration


def _server(root: Path, repo: Path, log: Path, ports: list[int]) -> TritonServer:
    return TritonServer(
        ServerOptions(
            repository=repo,
            artifacts=root,
            http_port=ports[0],
            grpc_port=ports[1],
            metrics_port=ports[2],
            log_file=log,
            startup_timeout_s=180,
        )
    )


def _distinct_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def test_a_follower_server_sees_the_writer_servers_writes(tiny_artifacts: ArtifactLayout, tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts.root, root, ignore=shutil.ignore_patterns("index", "emb"))
    write_repository(tmp_path / "writer", RepositorySettings())
    write_repository(tmp_path / "follower", RepositorySettings(index_writer=False))
    vector = np.full((1, 32), 1 / np.sqrt(32), np.float32)
    ports = _distinct_ports(6)
    with (
        _server(root, tmp_path / "writer", tmp_path / "a.log", ports[:3]) as a,
        _server(root, tmp_path / "follower", tmp_path / "b.log", ports[3:]) as b,
        FeedClient(a.grpc_url, "grpc") as writer,
        FeedClient(b.grpc_url, "grpc") as reader,
    ):
        with pytest.raises(ClientError):  # the follower takes no writes
            reader.infer(
                ModelName.INDEX_WRITE, {"OP": np.array([[2]], np.int64), "POST_ID": np.array([[1]], np.int64)}, ("LSN",)
            )
        writer.infer(
            ModelName.INDEX_WRITE,
            {"OP": np.ones((1, 1), np.int64), "POST_ID": np.array([[77]], np.int64), "EMBEDDING": vector},
            ("LSN",),
        )
        found = reader.infer(ModelName.KNN, {"QUERY": vector, "K": np.array([[1]], np.int64)}, ("IDS",))["IDS"]
        assert found.tolist() == [[77]]
        writer.infer(
            ModelName.INDEX_WRITE, {"OP": np.full((1, 1), 2, np.int64), "POST_ID": np.array([[77]], np.int64)}, ("LSN",)
        )
        found = reader.infer(ModelName.KNN, {"QUERY": vector, "K": np.array([[1]], np.int64)}, ("IDS",))["IDS"]
        assert 77 not in found.ravel().tolist()
