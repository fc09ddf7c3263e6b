"""Faults on a real tritonserver (tiny model): a python backend stub killed under load, and
damaged artifacts refused at start with the file named."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from feedserve.artifacts import ArtifactLayout
from feedserve.clients.online import FeedClient
from feedserve.errors import ClientError
from feedserve.ops.launcher import ServerError, ServerOptions, TritonServer, on_free_ports
from feedserve.ops.watchdog import stub_processes

pytestmark = pytest.mark.integration

POST = {"id": 7, "text": "We are hiring ML engineers for feed retrieval.", "counts": {"likes": 12}}


def _options(artifacts: Path, repo: Path, log: Path) -> ServerOptions:
    return on_free_ports(repository=repo, artifacts=artifacts, log_file=log, startup_timeout_s=180)


@pytest.fixture
def artifacts(tiny_artifacts: ArtifactLayout, tmp_path: Path) -> ArtifactLayout:
    copy = ArtifactLayout(tmp_path / "artifacts")
    shutil.copytree(tiny_artifacts.root, copy.root, ignore=shutil.ignore_patterns("index", "emb"))
    return copy


@pytest.fixture
def server(artifacts: ArtifactLayout, tmp_path: Path) -> Iterator[TritonServer]:
    from feedserve.triton.repository import write_repository

    write_repository(tmp_path / "repo")
    with TritonServer(_options(artifacts.root, tmp_path / "repo", tmp_path / "server.log")) as s:
        yield s


@pytest.fixture(params=["launcher", "standalone"])
def watched_server(request: pytest.FixtureRequest, artifacts: ArtifactLayout, tmp_path: Path) -> Iterator[TritonServer]:
    """A server whose stubs are watched by its launcher's thread, or, as in the GPU container, by
    `python -m feedserve.ops.watchdog` running beside a server it did not start."""
    import subprocess
    import sys

    from feedserve.ops.keys import ADMIN_KEY_ENV
    from feedserve.triton.repository import write_repository

    write_repository(tmp_path / "repo")
    options = _options(artifacts.root, tmp_path / "repo", tmp_path / "server.log")
    options.watch_stubs = request.param == "launcher"
    with TritonServer(options) as s:
        if request.param == "launcher":
            yield s
            return
        assert s.process is not None
        with open(tmp_path / "watchdog.log", "w") as log:
            watcher = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "feedserve.ops.watchdog",
                    "--server-pid",
                    str(s.process.pid),
                    "--http-url",
                    s.http_url,
                    "--interval-s",
                    "0.5",
                    "--artifacts",
                    str(artifacts.root),
                    "--repository",
                    str(tmp_path / "repo"),
                ],
                env={**os.environ, ADMIN_KEY_ENV: options.admin_key},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                deadline = time.monotonic() + 60  # it takes the stub counts once it saw the server ready
                while (
                    "watching the stubs" not in (tmp_path / "watchdog.log").read_text() and time.monotonic() < deadline
                ):
                    time.sleep(0.1)
                yield s
            finally:
                watcher.terminate()
                watcher.wait(timeout=30)


def stub_pids(server: TritonServer, model: str) -> list[int]:
    assert server.process is not None
    return [pid for pid, name in stub_processes(server.process.pid).items() if name == model]


def test_a_killed_stub_under_load_recovers(watched_server: TritonServer) -> None:
    """SIGKILL the encoder's stub while three clients embed posts: the requests it held fail with a
    retryable error, and embed_post answers again. Usually the server stays up and the watchdog
    reloads the encoder (this Triton neither restarts the stub nor reports the model unready); in
    about 1 kill of 14 tritonserver itself aborts (the python backend's lock_exception, an upstream
    crash), and then the launcher restarts it: both are recoveries, and the test says which ran."""
    server = watched_server
    [pid] = stub_pids(server, "encoder")
    results: list[bool] = []
    errors: list[ClientError] = []
    stop = threading.Event()

    def load() -> None:
        deadline = time.monotonic() + 120  # bounded: stops by itself
        with FeedClient(server.grpc_url, "grpc", timeout_s=30) as client:
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    client.embed_posts([POST])
                    results.append(True)
                except ClientError as err:
                    results.append(False)
                    errors.append(err)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    os.kill(pid, signal.SIGKILL)
    killed_at = len(results)

    def recovered() -> bool:  # ten answers in a row after the kill
        after = results[killed_at:]
        return any(all(after[i : i + 10]) for i in range(len(after) - 9))

    deadline = time.monotonic() + 120  # a restart of tritonserver takes longer than a reload
    while time.monotonic() < deadline and not recovered():
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert server.running and server.process is not None and server.process.poll() is None
    assert recovered(), f"encoder did not recover: {errors[-3:]}"
    assert not all(results[killed_at:]), "no request failed: was the stub killed?"
    # What the requests caught by the death get is worth retrying (the ingester does): not bad input.
    assert all(err.retryable and not err.refused for err in errors), [str(e) for e in errors if not e.retryable][:3]
    assert stub_pids(server, "encoder") != [pid]  # a new stub serves
    if server.restarts:  # tritonserver aborted with its stub and the launcher brought it back
        logging.getLogger(__name__).warning("tritonserver died with the stub and was restarted (the upstream abort)")
    elif server.watchdog is not None:  # the launcher's; the standalone one logs its reload instead
        assert server.watchdog.reloads == {"encoder": 1}
    with FeedClient(server.http_url, "http") as client:
        assert client.ready()
        for _ in range(5):
            assert client.embed_posts([POST]).shape == (1, 32)


def test_a_truncated_onnx_graph_is_refused_at_start(artifacts: ArtifactLayout, tmp_path: Path) -> None:
    from feedserve.triton.repository import write_repository

    write_repository(tmp_path / "repo")
    artifacts.onnx.write_bytes(artifacts.onnx.read_bytes()[:1000])
    with pytest.raises(ServerError, match=r"encoder\.onnx.*truncated"):
        TritonServer(_options(artifacts.root, tmp_path / "repo", tmp_path / "server.log")).start()


def test_tritonserver_started_directly_refuses_a_corrupt_graph(artifacts: ArtifactLayout, tmp_path: Path) -> None:
    """As the container's entrypoint runs it, without feedserve's launcher and its check: the encoder
    backend's own check fails the model's load, and the log names the file."""
    from feedserve.triton.repository import write_repository

    write_repository(tmp_path / "repo")
    data = bytearray(artifacts.onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifacts.onnx.write_bytes(bytes(data))
    server = TritonServer(_options(artifacts.root, tmp_path / "repo", tmp_path / "server.log"))
    server.check_artifacts = lambda: None  # type: ignore[method-assign]
    with pytest.raises(ServerError, match="exited"):
        server.start()
    log = (tmp_path / "server.log").read_text()
    assert "encoder.onnx: checksum differs" in log


def test_a_damaged_index_file_is_refused_and_the_last_good_one_keeps_serving(
    server: TritonServer, tmp_path: Path
) -> None:
    """A snapshot replaced on disk by one whose vectors do not match its checksum: the knn model
    refuses to reload it and answers from the index it had."""
    from feedserve.index.snapshot import save_arrays

    layout = ArtifactLayout(server.options.artifacts)
    vectors = np.random.default_rng(0).normal(size=(10, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    query = {"QUERY": vectors[:1], "K": np.array([[3]], np.int64)}
    with FeedClient(server.grpc_url, "grpc") as client:
        client.infer(
            "index_write",
            {"OP": np.ones((10, 1), np.int64), "POST_ID": np.arange(10, dtype=np.int64)[:, None], "EMBEDDING": vectors},
            ("LSN",),
        )
        before = client.infer("knn", query, ("IDS",))["IDS"]
        # A new generation (as a rebuild writes), so every follower tries to load it.
        save_arrays(tmp_path / "good.npz", np.arange(10), vectors, {"generation": "rebuilt", "lsn": 0})
        with np.load(tmp_path / "good.npz", allow_pickle=False) as data:
            meta = str(data["meta"])
        damaged = vectors.copy()
        damaged[0] *= -1
        with open(tmp_path / "bad.npz", "wb") as f:
            np.savez(f, ids=np.arange(10), vectors=damaged, meta=np.array(meta))
        os.replace(tmp_path / "bad.npz", layout.index)
        for _ in range(3):
            assert (client.infer("knn", query, ("IDS",))["IDS"] == before).all()
        assert client.ready()
    assert "checksum" in server.options.log_file.read_text()  # type: ignore[union-attr]
