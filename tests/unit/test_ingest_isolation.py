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


def test_a_model_with_no_version_loaded_is_retried_not_refused() -> None:
    """Triton's answer for a model loading or reloading (NOT_FOUND over gRPC, 400 over HTTP): the
    same request may succeed later, so it is retried, never skipped as a refused one."""
    for status in ("StatusCode.NOT_FOUND", "400"):
        err = ClientError("engage_write: Request for unknown model: 'engage_write' has no available versions", status)
        assert err.retryable and not err.refused
    assert ClientError("index_write: post 13 refused", "400").refused


class LoadingServer(RefusingServer):
    """Not ready at first (a model loading), and engage_write not loaded: ready after the first try,
    without engage_write (a server without a ranker)."""

    def __init__(self) -> None:
        super().__init__()
        self.tries = 0

    def ready(self, model: str | None = None) -> bool:
        return model is None and self.tries > 0

    def engage(self, engagements: list[tuple[int, int, int]]) -> int:
        self.tries += 1
        raise ClientError("engage_write: Request for unknown model: 'engage_write' has no available versions", "400")


def test_engagements_sent_while_the_server_was_not_ready_are_dropped_once_it_says_it_serves_none(
    tmp_path: Path,
) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text(
        json.dumps({"type": "create", "post": {"id": 1, "text": "post 1"}})
        + "\n"
        + json.dumps({"type": "engage", "member_id": 5, "post_id": 1, "action": "like"})
        + "\n"
    )
    server = LoadingServer()
    stats = Ingester(server, tmp_path / "state", window_s=10, max_batch=4).run(JsonlSource(events, tmp_path / "state"))  # type: ignore[arg-type]
    assert server.tries == 1 and (stats.upserts, stats.engagements, stats.unserved) == (1, 0, 1)
