"""The live index: writes while serving, durable before acknowledged, replayed after a crash,
followed by other instances; torn tails cut, damage and corrupt snapshots refused."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from feedserve.index_log import LogError, WriteAheadLog, read_records
from feedserve.knn import IndexError_
from feedserve.live_index import LiveIndex

DIM = 8


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _state(live: LiveIndex) -> dict[int, list[float]]:
    ids, vectors = live.index.snapshot()
    return {int(i): np.round(v, 6).tolist() for i, v in zip(ids, vectors, strict=True)}


def test_writes_survive_a_reopen_with_and_without_a_snapshot(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    live = LiveIndex.open(tmp_path, DIM, writer=True)
    assert live.upsert(np.arange(10), _unit(rng, 10)) == 1
    live.upsert(np.array([3]), _unit(rng, 1))  # re-embedding replaces
    live.delete(np.array([4, 999]))  # an unknown id is a no-op, still logged
    before = _state(live)
    live.close()  # no snapshot yet: everything is in the log
    again = LiveIndex.open(tmp_path, writer=True)
    assert _state(again) == before and again.lsn == 3 and 4 not in before
    again.snapshot()
    again.upsert(np.array([42]), _unit(rng, 1))
    after = _state(again)
    again.close()
    third = LiveIndex.open(tmp_path, writer=True)
    assert _state(third) == after and third.lsn == 4
    assert [r.lsn for r in read_records(tmp_path / "posts.wal")] == [4]  # the snapshot holds 1..3


def test_bad_writes_are_refused_before_they_are_logged(tmp_path: Path) -> None:
    live = LiveIndex.open(tmp_path, DIM, writer=True)
    for ids, vectors, words in [
        (np.array([1, 1]), np.ones((2, DIM), np.float32), "duplicate post ids"),
        (np.array([1]), np.ones((1, DIM + 1), np.float32), "must have shape"),
        (np.array([1]), np.full((1, DIM), np.nan, np.float32), "NaN"),
        (np.array([-1]), np.ones((1, DIM), np.float32), "reserved"),
    ]:
        with pytest.raises(IndexError_, match=words):
            live.upsert(ids, vectors)
    assert live.lsn == 0 and not list(read_records(tmp_path / "posts.wal"))
    with pytest.raises(IndexError_, match="follower"):
        LiveIndex.open(tmp_path).upsert(np.array([1]), np.ones((1, DIM), np.float32))


def test_a_torn_tail_is_cut_and_damage_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(1)
    live = LiveIndex.open(tmp_path, DIM, writer=True)
    for i in range(3):
        live.upsert(np.array([i]), _unit(rng, 1))
    live.close()
    log = tmp_path / "posts.wal"
    whole = log.read_bytes()
    log.write_bytes(whole + whole[16:60])  # a crash in the middle of a fourth append
    with caplog.at_level(logging.WARNING):
        reopened = LiveIndex.open(tmp_path, writer=True)
    assert "torn tail" in caplog.text and reopened.lsn == 3 and len(reopened.index) == 3
    assert log.read_bytes() == whole
    reopened.close()
    damaged = bytearray(whole)
    damaged[40] ^= 0xFF  # inside the first record, with two whole records after it
    log.write_bytes(bytes(damaged))
    with pytest.raises(LogError, match="damage, not a torn write"):
        WriteAheadLog(log)


def test_a_corrupt_snapshot_is_refused_not_served_empty(tmp_path: Path) -> None:
    live = LiveIndex.open(tmp_path, DIM, writer=True)
    live.upsert(np.arange(5), _unit(np.random.default_rng(2), 5))
    live.snapshot()
    live.close()
    snapshot = tmp_path / "posts.npz"
    snapshot.write_bytes(snapshot.read_bytes()[:100])
    with pytest.raises(IndexError_, match="cannot read index"):
        LiveIndex.open(tmp_path, writer=True)


def test_followers_see_every_acknowledged_write_and_snapshot(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    writer = LiveIndex.open(tmp_path, DIM, writer=True)
    writer.upsert(np.arange(20), _unit(rng, 20))
    follower = LiveIndex.open(tmp_path)
    assert _state(follower) == _state(writer)
    q = _unit(rng, 1)
    top = int(follower.index.search(q, [1])[0].ids[0])
    writer.delete(np.array([top]))
    writer.upsert(np.array([100]), q)
    assert follower.catch_up() == 2
    assert follower.index.search(q, [1])[0].ids.tolist() == [100]
    assert top not in follower.index.search(q, [25])[0].ids
    writer.snapshot()  # a new log: the follower reloads nothing it already has ...
    writer.upsert(np.array([101]), _unit(rng, 1))
    assert follower.catch_up() == 1 and _state(follower) == _state(writer)
    late = LiveIndex.open(tmp_path)  # ... and a new follower starts from the snapshot
    assert _state(late) == _state(writer) and late.lsn == writer.lsn


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from feedserve.live_index import LiveIndex
    live = LiveIndex.open(sys.argv[1], 8, writer=True)
    rng = np.random.default_rng(0)
    for i in range(100000):
        v = rng.normal(size=(4, 8)).astype(np.float32)
        lsn = live.upsert(np.arange(4 * i, 4 * i + 4), v / np.linalg.norm(v, axis=1, keepdims=True))
        if i % 50 == 49:
            live.snapshot()
        print(lsn, flush=True)  # acknowledged
""")


def test_kill_9_mid_write_loses_no_acknowledged_write(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    acked: list[int] = []
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    while len(acked) < 300 and time.monotonic() < deadline:
        acked.append(int(proc.stdout.readline()))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert len(acked) >= 300
    recovered = LiveIndex.open(tmp_path, writer=True)
    assert recovered.lsn >= acked[-1]
    ids = set(recovered.index.snapshot()[0].tolist())
    assert set(range(4 * acked[-1])) <= ids  # write n holds ids 4(n-1) .. 4n-1
