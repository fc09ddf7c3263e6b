"""Searches running while a stream of upserts and deletes goes into the live index, on a real
tritonserver: no search fails, and none returns a post whose delete was acknowledged before it
started."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from feedserve.clients.online import FeedClient
from feedserve.schema import ModelName

pytestmark = pytest.mark.integration

BASE_ID = 2 * 10**11
DIM = 32


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_searches_during_writes_never_fail_or_see_a_deleted_post(triton_server) -> None:  # type: ignore[no-untyped-def]
    deleted: dict[int, float] = {}  # post id -> when its delete was acknowledged
    lock = threading.Lock()
    errors: list[str] = []
    searches = [0]
    stop = threading.Event()
    # One direction that every written post leans towards, so searches along it find them.
    axis = _unit(np.random.default_rng(0), 1)

    def write() -> None:
        rng = np.random.default_rng(1)
        with FeedClient(triton_server.grpc_url, "grpc", timeout_s=60) as client:
            for round_ in range(30):
                ids = np.arange(BASE_ID + 8 * round_, BASE_ID + 8 * round_ + 8, dtype=np.int64)
                vectors = axis + 0.2 * _unit(rng, 8)
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                client.infer(
                    ModelName.INDEX_WRITE,
                    {"OP": np.ones((8, 1), np.int64), "POST_ID": ids[:, None], "EMBEDDING": vectors.astype(np.float32)},
                    ("LSN",),
                )
                gone = ids[::2]
                client.infer(
                    ModelName.INDEX_WRITE, {"OP": np.full((4, 1), 2, np.int64), "POST_ID": gone[:, None]}, ("LSN",)
                )
                with lock:
                    deleted.update({int(i): time.monotonic() for i in gone})
        stop.set()

    def search() -> None:
        with FeedClient(triton_server.grpc_url, "grpc", timeout_s=60) as client:
            for _ in range(2000):  # bounded; stops with the writer
                if stop.is_set():
                    return
                with lock:
                    before = set(deleted)
                try:
                    ids = client.infer(ModelName.KNN, {"QUERY": axis, "K": np.array([[200]], np.int64)}, ("IDS",))[
                        "IDS"
                    ][0]
                except Exception as err:
                    errors.append(repr(err))
                    continue
                searches[0] += 1
                if seen := before & set(ids.tolist()):
                    errors.append(f"deleted posts returned: {sorted(seen)[:5]}")

    threads = [threading.Thread(target=write)] + [threading.Thread(target=search) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors[:5]
    assert searches[0] > 30 and len(deleted) == 120
    with FeedClient(triton_server.grpc_url, "grpc", timeout_s=60) as client:  # leave the index as it was
        rest = np.array([BASE_ID + i for i in range(240) if BASE_ID + i not in deleted], np.int64)
        for part in np.array_split(rest, 2):  # at most max_batch_size (64) rows a request
            client.infer(
                ModelName.INDEX_WRITE, {"OP": np.full((len(part), 1), 2, np.int64), "POST_ID": part[:, None]}, ("LSN",)
            )
