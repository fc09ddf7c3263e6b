"""A window the server refuses is written post by post, so one refused post is skipped by name
instead of blocking the ingester on every restart. (The refusal is simulated: the real server
takes every post the ingester's own validation lets through; the real paths are in
tests/integration/test_ingest.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from feedserve.clients.ingest import Ingester, JsonlSource
from feedserve.errors import ClientError


class RefusingServer:
    """Embeds anything; refuses, as INVALID_ARGUMENT, any write that contains post 13."""

    def __init__(self) -> None:
        self.written: list[int] = []

    def embed_posts(self, posts: list) -> np.ndarray:  # type: ignore[type-arg]
        return np.ones((len(posts), 4), np.float32)

    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        ids = inputs["POST_ID"].ravel().tolist()
        if 13 in ids:
            raise ClientError("index_write: post 13 refused", "StatusCode.INVALID_ARGUMENT")
        self.written += ids
        return {"LSN": np.ones((len(ids), 1), np.int64)}


def test_a_refused_post_is_skipped_and_the_rest_of_its_window_written(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text(
        "".join(json.dumps({"type": "create", "post": {"id": i, "text": f"post {i}"}}) + "\n" for i in (11, 12, 13, 14))
    )
    server = RefusingServer()
    stats = Ingester(server, tmp_path / "state", window_s=10, max_batch=4).run(JsonlSource(events, tmp_path / "state"))  # type: ignore[arg-type]
    assert sorted(server.written) == [11, 12, 14] and stats.bad == 1
    assert JsonlSource(events, tmp_path / "state").offset == events.stat().st_size  # committed: no retry loop
