"""kill -9 of the server (tritonserver and its python stubs, or tritonserver alone) in the middle of
ingestion: after a restart every acknowledged write is there, and the running ingester, retrying,
finishes without a gap."""

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
from feedserve.errors import ClientError
from feedserve.ops.builder import SAMPLE_CORPUS
from feedserve.ops.launcher import ServerOptions, TritonServer, on_free_ports
from feedserve.ops.watchdog import parent_of, stub_processes
from feedserve.prompt.movielens import load_movielens
from feedserve.schema import ModelName
from feedserve.triton.repository import write_repository

pytestmark = pytest.mark.integration


def _present(client: FeedClient, posts: list) -> list[bool]:  # type: ignore[type-arg]
    vectors = client.embed_posts(posts)
    ids = client.infer(ModelName.KNN, {"QUERY": vectors, "K": np.ones((len(posts), 1), np.int64)}, ("IDS",))["IDS"]
    return [bool(ids.shape[1]) and row[0] == p.id for row, p in zip(ids, posts, strict=True)]


def _alive(pid: int) -> bool:
    return parent_of(pid) is not None


@pytest.mark.parametrize("kill", ["group", "server", "server-launcher-restarts"])
def test_kill_9_of_the_server_mid_ingestion(tiny_artifacts: ArtifactLayout, tmp_path: Path, kill: str) -> None:
    """SIGKILL mid-ingestion of the whole process group (server and stubs), or of tritonserver alone,
    as a crash of the server or an outer supervisor's kill does: its python stubs, orphaned, then exit
    by themselves (they watch their server) and free the index's writer lock, so a server started at
    once takes over; or the launcher restarts tritonserver itself. Either way every acknowledged write
    is there, and the ingester, retrying, finishes without a gap."""
    # Its own server and artifacts (links to the tiny model, an index of its own).
    root = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts.root, root, ignore=shutil.ignore_patterns("index", "emb"))
    repo = tmp_path / "repository"
    write_repository(repo)
    opts = on_free_ports(
        repository=repo,
        artifacts=root,
        log_file=tmp_path / "tritonserver.log",
        startup_timeout_s=180,
        supervise=kill == "server-launcher-restarts",
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
        process = server.process
        assert process is not None
        stubs = list(stub_processes(process.pid))
        if kill == "group":
            os.killpg(process.pid, signal.SIGKILL)  # ... then the server dies, stubs and all
        else:
            os.kill(process.pid, signal.SIGKILL)  # ... then tritonserver alone dies
        process.wait()
        acknowledged = source.offset
        assert acknowledged < events.stat().st_size, "the kill should land mid-ingestion"
        if kill == "server-launcher-restarts":
            deadline = time.monotonic() + 120
            while server.restarts == 0 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert server.restarts == 1 and server.running, "the launcher did not restart tritonserver"
        else:
            server = TritonServer(opts).start()  # at once: the writer lock may still be held
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in stubs) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in stubs if _alive(pid)], "a stub outlived its server"
        with FeedClient(server.grpc_url, "grpc", timeout_s=60) as client:
            done = events.read_bytes()[:acknowledged].count(b"\n")
            assert all(_present(client, posts[:done])), "an acknowledged write was lost"
            worker.join(timeout=300)
            assert not worker.is_alive() and source.offset == events.stat().st_size
            assert all(_present(client, posts))
    finally:
        worker.join(timeout=300)
        server.stop()


def test_a_killed_servers_stubs_exit_and_a_new_server_takes_the_writer_role(
    tiny_artifacts: ArtifactLayout, tmp_path: Path
) -> None:
    """kill -9 of tritonserver alone while three clients write to the live index. Its index_write
    stub once stayed alive for minutes, reparented to init and holding the index's writer lock, so a
    server started again failed to load ("already has a writer"). Every stub now exits when its
    server is gone, a new server started at once waits for the lock and takes it, and every write
    that was acknowledged is served."""
    root = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts.root, root, ignore=shutil.ignore_patterns("index", "emb"))
    repo = tmp_path / "repository"
    write_repository(repo)

    def options() -> ServerOptions:
        return on_free_ports(
            repository=repo,
            artifacts=root,
            log_file=tmp_path / "tritonserver.log",
            startup_timeout_s=180,
            supervise=False,  # as under an outer supervisor: nothing cleans up after the kill
        )

    server = TritonServer(options()).start()
    acknowledged: list[tuple[np.ndarray, np.ndarray]] = []  # (ids, vectors) whose LSN came back
    stop = threading.Event()

    def write(worker: int) -> None:
        rng = np.random.default_rng(worker)
        with FeedClient(server.grpc_url, "grpc", timeout_s=10) as client:
            for n in range(10_000):  # bounded; the kill ends it
                if stop.is_set():
                    return
                vectors = rng.normal(size=(8, 32)).astype(np.float32)
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                ids = np.arange(8, dtype=np.int64) + 8 * n + 10**9 * (worker + 1)
                try:
                    client.infer(
                        ModelName.INDEX_WRITE,
                        {"OP": np.ones((8, 1), np.int64), "POST_ID": ids[:, None], "EMBEDDING": vectors},
                        ("LSN",),
                    )
                except ClientError:
                    return  # the server is gone
                acknowledged.append((ids, vectors))

    writers = [threading.Thread(target=write, args=(w,)) for w in range(3)]
    for t in writers:
        t.start()
    try:
        while len(acknowledged) < 30:
            time.sleep(0.05)
        process = server.process
        assert process is not None
        stubs = list(stub_processes(process.pid))
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        stop.set()
        for t in writers:
            t.join(timeout=60)
        server = TritonServer(options()).start()  # at once
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in stubs) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in stubs if _alive(pid)], "a stub outlived its server"
        ids = np.concatenate([i for i, _ in acknowledged])
        vectors = np.concatenate([v for _, v in acknowledged])
        with FeedClient(server.grpc_url, "grpc", timeout_s=60) as client:
            for start in range(0, len(ids), 64):
                found = client.infer(
                    ModelName.KNN,
                    {"QUERY": vectors[start : start + 64], "K": np.ones((len(ids[start : start + 64]), 1), np.int64)},
                    ("IDS",),
                )["IDS"][:, 0]
                assert (found == ids[start : start + 64]).all(), "an acknowledged write was lost"
            lsn = client.infer(
                ModelName.INDEX_WRITE,
                {"OP": np.array([[2]], np.int64), "POST_ID": ids[:1, None]},
                ("LSN",),
            )["LSN"]
            assert lsn[0, 0] > 0  # the new server writes
    finally:
        stop.set()
        server.stop()
