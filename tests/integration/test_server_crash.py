"""kill -9 of the whole server (tritonserver and its python stubs) in the middle of ingestion: after
a restart every acknowledged write is there, and the running ingester, retrying, finishes without
a gap."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from feedserve.artifacts import ArtifactLayout
from feedserve.clients.ingest import Ingester, JsonlSource
from feedserve.clients.online import FeedClient
from feedserve.ops.builder import SAMPLE_CORPUS
from feedserve.ops.launcher import ServerOptions, TritonServer, free_port
from feedserve.prompt.movielens import load_movielens
from feedserve.schema import ModelName
from feedserve.triton.repository import write_repository

pytestmark = pytest.mark.integration


def _present(client: FeedClient, posts: list) -> list[bool]:  # type: ignore[type-arg]
    vectors = client.embed_posts(posts)
    ids = client.infer(ModelName.KNN, {"QUERY": vectors, "K": np.ones((len(posts), 1), np.int32)}, ("IDS",))["IDS"]
    return [bool(ids.shape[1]) and row[0] == p.id for row, p in zip(ids, posts, strict=True)]


def test_kill_9_of_the_server_mid_ingestion(tiny_artifacts: ArtifactLayout, tmp_path: Path) -> None:
    # Its own server and artifacts (links to the tiny model, an index of its own).
    root = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts.root, root, ignore=shutil.ignore_patterns("index", "emb"))
    repo = tmp_path / "repository"
    write_repository(repo)
    opts = ServerOptions(
        repository=repo,
        artifacts=root,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        log_file=tmp_path / "tritonserver.log",
        startup_timeout_s=180,
    )
    server = TritonServer(opts).start()
    posts = [
        m.model_copy(update={"id": 5 * 10**11 + i}) for i, m in enumerate(load_movielens(SAMPLE_CORPUS).posts()[:60])
    ]
    events = tmp_path / "events.jsonl"
    events.write_text(
        "".join(
            json.dumps({"type": "create", "post": json.loads(p.model_dump_json(exclude_none=True))}) + "\n"
            for p in posts
        )
    )
    state = tmp_path / "state"
    source = JsonlSource(events, state)
    results: dict[str, object] = {}

    def ingest() -> None:
        with FeedClient(server.grpc_url, "grpc", timeout_s=30) as client:
            results["stats"] = Ingester(client, state, window_s=0.01, max_batch=2, retry_s=180).run(source)

    worker = threading.Thread(target=ingest)
    worker.start()
    try:
        while source.offset == 0:  # some windows acknowledged ...
            time.sleep(0.01)
        assert server.process is not None
        os.killpg(server.process.pid, signal.SIGKILL)  # ... then the server dies, stubs and all
        server.process.wait()
        acknowledged = source.offset
        assert acknowledged < events.stat().st_size, "the kill should land mid-ingestion"
        server = TritonServer(opts).start()
        with FeedClient(server.grpc_url, "grpc", timeout_s=60) as client:
            done = events.read_bytes()[:acknowledged].count(b"\n")
            assert all(_present(client, posts[:done])), "an acknowledged write was lost"
            worker.join(timeout=300)
            assert not worker.is_alive() and source.offset == events.stat().st_size
            assert all(_present(client, posts))
    finally:
        worker.join(timeout=300)
        server.stop()
