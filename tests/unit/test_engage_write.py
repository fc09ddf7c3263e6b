"""`engage_write` (the engagement log's writer) on plain numpy: a keyed request is logged and
acknowledged with its LSN; a bad one fails alone, by name, with nothing of it logged; a write the
disk failed is retryable and the writer recovers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from feedserve.artifacts import ArtifactLayout
from feedserve.index.wal import read_header
from feedserve.ops.keys import WRITE_HEADER, WRITE_KEY_ENV
from feedserve.rank.engagements import ENGAGEMENTS, EngagementFollower, load_snapshot
from feedserve.triton.base import RequestError, Unavailable
from feedserve.triton.engage_write import EngageWriteModel

KEYED = {WRITE_HEADER: os.environ[WRITE_KEY_ENV]}


def _batch(members: list[int], posts: list[int], times: list[int]) -> dict[str, np.ndarray | None]:
    return {
        "MEMBER_ID": np.array(members, np.int64)[:, None],
        "POST_ID": np.array(posts, np.int64)[:, None],
        "ENGAGED_AT": np.array(times, np.int64)[:, None],
    }


@pytest.fixture
def model(tmp_path: Path) -> Iterator[EngageWriteModel]:
    m = EngageWriteModel()
    m.setup(ArtifactLayout(tmp_path), {})
    yield m
    m.finalize()


def _logged(tmp_path: Path) -> list[tuple[int, int, int]]:
    follower = EngagementFollower(ArtifactLayout(tmp_path).index_dir.engagements)
    _, chunks = follower.read()
    follower.close()
    return [(int(m), int(p), int(t)) for c in chunks for m, p, t in c.T]


def test_keyed_engagements_are_logged_and_bad_ones_fail_alone_by_name(model: EngageWriteModel, tmp_path: Path) -> None:
    good = _batch([1, 2], [10, 11], [1_700_000_000, 1_700_000_001])
    bad = {
        "negative member": (_batch([-1], [10], [5]), "member ids must be >= 0"),
        "negative post": (_batch([1], [-3], [5]), "post ids must be >= 0"),
        "time in ms": (_batch([1], [10], [1_700_000_000_000]), "unix seconds"),
        "negative time": (_batch([1], [10], [-1]), "unix seconds"),
        "rows disagree": ({**_batch([1, 2], [10, 11], [5, 6]), "ENGAGED_AT": np.array([[5]], np.int64)}, "[n, 1]"),
        "two columns": ({**_batch([1], [10], [5]), "MEMBER_ID": np.array([[1, 2]], np.int64)}, "[n, 1]"),
        "float ids": ({**_batch([1], [10], [5]), "POST_ID": np.array([[10.0]], np.float32)}, "POST_ID: expected dtype"),
        "no time": ({k: v for k, v in _batch([1], [10], [5]).items() if k != "ENGAGED_AT"}, "ENGAGED_AT is missing"),
    }
    requests = [good, *(b for b, _ in bad.values()), good]
    out = model.run(requests, [KEYED] * len(requests))
    assert out[0]["LSN"].tolist() == [[1], [1]] and out[-1]["LSN"].tolist() == [[2], [2]]
    for result, (name, (_, match)) in zip(out[1:-1], bad.items(), strict=True):
        assert isinstance(result, RequestError) and not isinstance(result, Unavailable), name
        assert match in str(result), (name, str(result))
    assert _logged(tmp_path) == [(1, 10, 1_700_000_000), (2, 11, 1_700_000_001)] * 2
    no_key, wrong_key = model.run([good, good], [{}, {WRITE_HEADER: "guess"}])
    assert isinstance(no_key, RequestError) and "no write key" in str(no_key)
    assert isinstance(wrong_key, RequestError) and "a wrong write key" in str(wrong_key)
    assert len(_logged(tmp_path)) == 4


def test_a_write_the_disk_failed_is_unavailable_and_the_writer_recovers(
    model: EngageWriteModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from feedserve.index import wal as index_log

    def disk_error(*args: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(index_log.os, "fsync", disk_error)
    (failed,) = model.run([_batch([1], [10], [5])], [KEYED])
    assert isinstance(failed, Unavailable) and "Input/output error" in str(failed)
    # Reopening the log fails too (the disk is still gone): every request of the batch is
    # retryable, none an internal error, and the next batch tries again.
    monkeypatch.setattr(index_log.os, "open", disk_error)
    again = model.run([_batch([1], [10], [5]), _batch([2], [11], [6])], [KEYED] * 2)
    assert all(isinstance(r, Unavailable) and "could not be reopened" in str(r) for r in again), again
    monkeypatch.undo()
    (ok,) = model.run([_batch([2], [11], [6])], [KEYED])
    assert not isinstance(ok, RequestError)
    assert (2, 11, 6) in _logged(tmp_path)


def test_with_milvus_every_replica_writes_the_log_there_and_every_ranker_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two engage_write replicas (two servers) and two followers (two `rank`s) on one Milvus (the
    real engine, Milvus Lite): what either writes, each reads once, merged into its table; a bad
    batch fails alone by name; a write Milvus refuses is retryable."""
    pytest.importorskip("milvus_lite")
    from feedserve.index.milvus import MilvusLite
    from feedserve.rank.coengagement import CoEngagement
    from feedserve.rank.engagements import LiveCoEngagement, MilvusEngagements, MilvusFollower

    with MilvusLite(tmp_path / "milvus" / "db.db") as lite:
        params = {"index": "milvus", "milvus_uri": lite.uri, "milvus_collection": "posts"}
        replicas = [EngageWriteModel(), EngageWriteModel()]
        for replica in replicas:
            replica.setup(ArtifactLayout(tmp_path), params)
        base = CoEngagement.from_events([(1, 10, 5), (2, 10, 5)])
        rankers = [LiveCoEngagement(base, MilvusFollower(MilvusEngagements(lite.uri, "posts"))) for _ in range(2)]
        first = replicas[0].run([_batch([3, 4], [10, 11], [50, 51]), _batch([-1], [1], [1])], [KEYED] * 2)
        assert first[0]["LSN"].shape == (2, 1) and first[0]["LSN"][0, 0] > 0
        assert isinstance(first[1], RequestError) and "member ids must be >= 0" in str(first[1])
        (second,) = replicas[1].run([_batch([3], [12], [52])], [KEYED])
        assert not isinstance(second, RequestError)
        want = CoEngagement.from_events([(1, 10, 5), (2, 10, 5), (3, 10, 50), (4, 11, 51), (3, 12, 52)])
        for live in rankers:
            assert live.update() and live.logged == 3
            assert (
                live.table.members.tolist() == want.members.tolist()
                and live.table.times.tolist() == want.times.tolist()
            )
            assert not live.update() and live.logged == 3  # read once, though inside the overlap
        monkeypatch.setattr(replicas[0].milvus.client, "insert", lambda *a, **k: (_ for _ in ()).throw(OSError("down")))
        (failed,) = replicas[0].run([_batch([5], [13], [53])], [KEYED])
        assert isinstance(failed, Unavailable) and "Milvus" in str(failed)
        monkeypatch.undo()
        replicas[0].run([_batch([5], [13], [53])], [KEYED])
        assert rankers[0].update() and rankers[0].logged == 4
        for live in rankers:
            live.close()
        for replica in replicas:
            replica.finalize()


def test_every_snapshot_every_writes_the_log_is_folded_into_a_snapshot(tmp_path: Path) -> None:
    """On a background thread; what a follower that starts reads is the same, each pair once."""
    model = EngageWriteModel()
    model.setup(ArtifactLayout(tmp_path), {"snapshot_every": "2"})
    batches = [_batch([1, 2], [10, 11], [100, 101]), _batch([1, 3], [10, 12], [102, 103]), _batch([4], [13], [104])]
    for i, batch in enumerate(batches):
        (out,) = model.run([batch], [KEYED])
        assert not isinstance(out, RequestError)
        if i == 1:  # the second write starts the snapshot
            model.snapshots.join()
    files = ArtifactLayout(tmp_path).index_dir
    assert load_snapshot(files.engagements_snapshot).lsn == 2
    with open(files.engagements, "rb") as f:
        assert read_header(f, codec=ENGAGEMENTS) == 2
    assert sorted(_logged(tmp_path)) == [(1, 10, 100), (2, 11, 101), (3, 12, 103), (4, 13, 104)]
    model.finalize()


def test_a_milvus_follower_reads_late_rows_and_no_clock_hides_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows stamped before one already read but visible after it (inside the overlap) are read, each
    row once; a writer whose clock runs ahead hides nobody's rows; a start reads past one query's
    limit; a write Milvus took too long to acknowledge is not acknowledged (its retry is stamped anew)."""
    pytest.importorskip("milvus_lite")
    from feedserve.index.milvus import MilvusLite
    from feedserve.rank import engagements
    from feedserve.rank.engagements import OVERLAP_US, MilvusEngagements, MilvusFollower, now_us

    with MilvusLite(tmp_path / "milvus" / "db.db") as lite:
        log = MilvusEngagements(lite.uri, "posts")

        def insert(members: list[int], written: int) -> None:
            rows = [
                {"member": m, "post": 1, "engaged_at": 5, "written_at": written, "placeholder": [1.0, 0.0]}
                for m in members
            ]
            log.client.insert(log.collection, rows)

        def read(follower: MilvusFollower) -> list[int]:
            _, chunks = follower.read()
            return sorted(m for c in chunks for m in c[0].tolist())

        follower = MilvusFollower(MilvusEngagements(lite.uri, "posts"))
        now = now_us()
        insert([1], now)
        assert read(follower) == [1]
        insert([2], now - OVERLAP_US // 2)  # stamped before the row read, visible after it
        assert read(follower) == [2] and read(follower) == []
        insert([3], now + 60 * 10**6)  # a writer whose clock runs a minute ahead
        assert read(follower) == [3]
        insert([4], now_us())  # is not hidden behind it
        assert read(follower) == [4] and read(follower) == []
        monkeypatch.setattr(engagements, "QUERY_LIMIT", 3)  # a start reads more than one query returns
        assert read(MilvusFollower(MilvusEngagements(lite.uri, "posts"))) == [1, 2, 3, 4]
        clock = iter([now, now + OVERLAP_US])  # stamped, then acknowledged an overlap later
        monkeypatch.setattr(engagements, "now_us", lambda: next(clock, now + OVERLAP_US))
        with pytest.raises(engagements.LogError, match="after they were stamped"):
            log.write(np.array([5]), np.array([1]), np.array([5]))
        log.close()
        follower.log.close()


def test_a_milvus_log_with_a_retention_keeps_the_window_every_replica_computes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--engagement-retention-days` with Milvus: a write stores the engagements inside the window and
    deletes those that fell out of it; a `rank` reads inside it and, when it moves, merges anew from the
    build's table (even before any writer deleted). The window follows the clock but never passes the
    newest engagement given or read: a clock a year ahead deletes nothing, and an engagement dated a
    year ahead is refused by name."""
    pytest.importorskip("milvus_lite")
    from feedserve.index.milvus import MilvusLite
    from feedserve.rank import engagements
    from feedserve.rank.coengagement import CoEngagement
    from feedserve.rank.engagements import LiveCoEngagement, MilvusEngagements, MilvusFollower, retention_since

    day, now = 86400, 1_750_000_000
    assert retention_since(0, now) == 0 and retention_since(10 * day, now) % day == 0
    assert now - 11 * day < retention_since(10 * day, now) <= now - 10 * day
    clock = [now]
    monkeypatch.setattr(engagements, "clock_s", lambda: clock[0])
    with MilvusLite(tmp_path / "milvus" / "db.db") as lite:
        params = {"index": "milvus", "milvus_uri": lite.uri, "milvus_collection": "posts", "retention_days": "10"}
        writer = EngageWriteModel()
        writer.setup(ArtifactLayout(tmp_path), params)
        assert writer.milvus is not None and writer.milvus.retention_s == 10 * day
        keeper = MilvusEngagements(lite.uri, "posts")  # a writer with no retention: deletes nothing
        base = CoEngagement.from_events([(100, 10, 5)])  # the build's: never dropped
        live = LiveCoEngagement(base, MilvusFollower(MilvusEngagements(lite.uri, "posts", 10 * day)))

        def stored() -> list[int]:
            return sorted(r["member"] for r in keeper.since(0))

        def members() -> list[int]:
            return sorted(set(live.table.members.tolist()))

        times = [now - 20 * day, now - 5 * day, now - day]
        (out,) = writer.run([_batch([1, 2, 3], [10, 10, 10], times)], [KEYED])
        assert not isinstance(out, RequestError) and out["LSN"].shape == (3, 1)  # acknowledged, 1 dropped
        assert stored() == [2, 3]
        assert live.update() and members() == [2, 3, 100]
        clock[0] = now + 6 * day
        assert not live.update() and members() == [2, 3, 100]  # no engagement since: the window stays
        keeper.write(np.array([4]), np.array([11]), np.array([now + 6 * day]))
        assert live.update() and members() == [3, 4, 100]  # 2's fell out: merged anew, though still stored
        assert stored() == [2, 3, 4]
        writer.run([_batch([5], [11], [now + 6 * day])], [KEYED])
        assert stored() == [3, 4, 5]  # the write deleted what fell out
        clock[0] = now + 365 * day  # this process's clock jumps a year ahead
        ahead = MilvusEngagements(lite.uri, "posts", 10 * day)
        ahead.write(np.array([6]), np.array([12]), np.array([now + 6 * day]))
        assert stored() == [3, 4, 5, 6]  # "now" no later than what it was given
        assert live.update() and members() == [3, 4, 5, 6, 100]  # nor a follower's than what it read
        late = MilvusFollower(MilvusEngagements(lite.uri, "posts", 10 * day))
        replaced, chunks = late.read()  # a rank that starts a year ahead reads the window all the same
        assert not replaced and sorted(chunks[0][0].tolist()) == [3, 4, 5, 6]
        clock[0] = now + 6 * day  # and back
        (future,) = writer.run([_batch([7], [13], [now + 300 * day])], [KEYED])
        assert isinstance(future, RequestError) and "past this server's clock" in str(future)
        assert stored() == [3, 4, 5, 6]
        for log in (ahead, keeper, late):  # (clients of one Milvus share its connection: closed last)
            log.close()
        live.close()
        writer.finalize()


def test_a_milvus_that_stops_answering_fails_a_poll_on_time_rather_than_holding_the_follower(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a timeout the follow thread waited on a stopped Milvus silently, and so would a model
    unload joining it; now the poll fails, is reported once, and is tried again."""
    pytest.importorskip("milvus_lite")
    import signal

    from feedserve.index.milvus import MilvusLite
    from feedserve.rank import engagements

    monkeypatch.setattr(engagements, "QUERY_TIMEOUT_S", 1.0)
    with MilvusLite(tmp_path / "milvus" / "db.db") as lite:
        log = engagements.MilvusEngagements(lite.uri, "posts")
        log.write(np.array([1]), np.array([2]), np.array([3]))
        pid = lite._server._p.pid  # the Milvus Lite process
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(Exception, match="(?i)deadline"):
                log.since(0)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert len(log.since(0)) == 1  # answering again: read on
        log.close()
