"""The live index: writes while serving, durable before acknowledged, replayed after a crash,
followed by other instances; torn tails cut, damage and corrupt snapshots refused; failed appends
undone; one writer; rebuilds that keep the writes logged while they ran."""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from feedserve.errors import IndexStoreError
from feedserve.index import wal as index_log
from feedserve.index.live import IndexFollower, IndexWriter, rebuilding
from feedserve.index.snapshot import arrays_checksum, load_arrays, read_meta
from feedserve.index.wal import HEADER, LogError, Op, WriteAheadLog, read_records

DIM = 8


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _state(live: IndexFollower | IndexWriter) -> dict[int, list[float]]:
    ids, vectors = live.index.snapshot()
    return {int(i): np.round(v, 6).tolist() for i, v in zip(ids, vectors, strict=True)}


def _lsns(log: Path) -> list[int]:
    with open(log, "rb") as f:
        return [r.lsn for r in read_records(f)]


def test_writes_survive_a_reopen_with_and_without_a_snapshot(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    live = IndexWriter.open(tmp_path, DIM)
    assert live.upsert(np.arange(10), _unit(rng, 10)) == 1
    live.upsert(np.array([3]), _unit(rng, 1))  # re-embedding replaces
    live.delete(np.array([4, 999]))  # an unknown id is a no-op, still logged
    before = _state(live)
    live.close()  # no snapshot yet: everything is in the log
    again = IndexWriter.open(tmp_path)
    assert _state(again) == before and again.lsn == 3 and 4 not in before
    again.snapshot()
    again.upsert(np.array([42]), _unit(rng, 1))
    after = _state(again)
    again.close()
    third = IndexWriter.open(tmp_path)
    assert _state(third) == after and third.lsn == 4
    assert _lsns(tmp_path / "posts.wal") == [4]  # the snapshot holds 1..3


def test_bad_writes_are_refused_before_they_are_logged(tmp_path: Path) -> None:
    live = IndexWriter.open(tmp_path, DIM)
    for ids, vectors, words in [
        (np.array([1, 1]), np.ones((2, DIM), np.float32), "duplicate post ids"),
        (np.array([1]), np.ones((1, DIM + 1), np.float32), "must have shape"),
        (np.array([1]), np.full((1, DIM), np.nan, np.float32), "NaN"),
        (np.array([-1]), np.ones((1, DIM), np.float32), "reserved"),
    ]:
        with pytest.raises(IndexStoreError, match=words):
            live.upsert(ids, vectors)
    assert live.lsn == 0 and not _lsns(tmp_path / "posts.wal")
    # A follower has no write API at all: writes go through the directory's one writer.
    assert not any(hasattr(IndexFollower.open(tmp_path), name) for name in ("write", "upsert", "delete", "snapshot"))


def test_a_torn_tail_is_cut_and_damage_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(1)
    live = IndexWriter.open(tmp_path, DIM)
    for i in range(3):
        live.upsert(np.array([i]), _unit(rng, 1))
    live.close()
    log = tmp_path / "posts.wal"
    whole = log.read_bytes()
    log.write_bytes(whole + whole[16:60])  # a crash in the middle of a fourth append
    with caplog.at_level(logging.WARNING):
        reopened = IndexWriter.open(tmp_path)
    assert "torn tail" in caplog.text and reopened.lsn == 3 and len(reopened.index) == 3
    assert log.read_bytes() == whole
    reopened.close()
    zeros = whole + bytes(4096)  # the filesystem extended the file, the data never made it
    log.write_bytes(zeros)
    with caplog.at_level(logging.WARNING):
        WriteAheadLog(log).close()
    assert log.read_bytes() == whole
    # The last record whole with a byte flipped: a torn write cannot be told from damage on disk
    # to an acknowledged write, and the log says so, as an error, rather than "never acknowledged".
    flipped = bytearray(whole)
    flipped[-5] ^= 0xFF
    log.write_bytes(bytes(flipped))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        WriteAheadLog(log).close()
    assert "damage on disk" in caplog.text and any(r.levelno == logging.ERROR for r in caplog.records)
    assert _lsns(log) == [1, 2]
    log.write_bytes(whole)
    # Damage in a record that whole records follow: a payload byte, the checksummed lsn, or a
    # length field that now claims the rest of the file; each is refused, not cut off as torn.
    for at, value in [(HEADER.size + 40, None), (HEADER.size + 8, None), (HEADER.size, struct.pack("<I", len(whole)))]:
        damaged = bytearray(whole)
        if value is None:
            damaged[at] ^= 0xFF
        else:
            damaged[at : at + len(value)] = value
        log.write_bytes(bytes(damaged))
        with pytest.raises(LogError, match="damage, not a torn write"):
            WriteAheadLog(log)


def test_records_out_of_sequence_are_refused(tmp_path: Path) -> None:
    log = tmp_path / "posts.wal"
    wal = WriteAheadLog(log)
    wal.append(np.array([Op.DELETE]), np.array([1]), None)
    wal.close()
    payload = index_log.encode(np.array([Op.DELETE]), np.array([2]), None)
    log.write_bytes(log.read_bytes() + index_log.record_bytes(3, payload))  # 2 is missing
    with pytest.raises(LogError, match="out of sequence"):
        WriteAheadLog(log)


def test_a_failed_fsync_refuses_writes_and_never_reuses_the_lsn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(5)
    live = IndexWriter.open(tmp_path, DIM)
    follower = IndexFollower.open(tmp_path)
    live.upsert(np.array([1]), _unit(rng, 1))

    def disk_error(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(index_log.os, "fsync", disk_error)
    with pytest.raises(LogError, match="not acknowledged"):
        live.upsert(np.array([2]), _unit(rng, 1))  # written whole, never made durable, not acknowledged
    monkeypatch.undo()
    assert live.failed
    with pytest.raises(LogError, match="refusing writes"):
        live.upsert(np.array([3]), _unit(rng, 1))
    follower.refresh()  # it may see record 2: it stays record 2 for everyone
    live.close()
    again = IndexWriter.open(tmp_path)
    assert again.lsn == 2 and set(_state(again)) == {1, 2}
    assert again.upsert(np.array([4]), _unit(rng, 1)) == 3
    follower.refresh()
    assert _state(follower) == _state(again) and follower.lsn == 3


def test_a_half_written_record_is_cut_off_when_the_log_reopens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(6)
    live = IndexWriter.open(tmp_path, DIM)
    live.upsert(np.array([1]), _unit(rng, 1))
    real_write = index_log._write_all

    def half_then_full_disk(fd: int, data: bytes, offset: int) -> None:
        real_write(fd, data[: len(data) // 2], offset)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(index_log, "_write_all", half_then_full_disk)
    with pytest.raises(LogError):
        live.upsert(np.array([2]), _unit(rng, 1))
    monkeypatch.undo()
    live.close()
    again = IndexWriter.open(tmp_path)  # a torn tail: cut off with a warning
    assert again.upsert(np.array([3]), _unit(rng, 1)) == 2
    again.close()
    assert _lsns(tmp_path / "posts.wal") == [1, 2] and set(_state(IndexFollower.open(tmp_path))) == {1, 3}


def test_a_snapshot_whose_new_log_fails_keeps_the_old_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    live = IndexWriter.open(tmp_path, DIM)
    live.upsert(np.arange(3), _unit(rng, 3))

    def no_space(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(index_log, "temporary_file", no_space)  # before the rename: the old log stays in use
    with pytest.raises(OSError):
        live.snapshot()
    monkeypatch.undo()
    live.upsert(np.array([9]), _unit(rng, 1))
    monkeypatch.setattr(index_log, "fsync_dir", no_space)  # after the rename: the new log is in use, writes refused
    with pytest.raises(LogError, match="may not be durable"):
        live.snapshot()
    monkeypatch.undo()
    assert live.failed
    with pytest.raises(LogError, match="refusing writes"):
        live.upsert(np.array([10]), _unit(rng, 1))
    before = _state(live)
    live.close()
    again = IndexWriter.open(tmp_path)
    assert _state(again) == before and again.lsn == 2
    assert again.upsert(np.array([11]), _unit(rng, 1)) == 3


def test_one_writer_per_directory(tmp_path: Path) -> None:
    first = IndexWriter.open(tmp_path, DIM)
    with pytest.raises(IndexStoreError, match="already has a writer"):
        IndexWriter.open(tmp_path)
    IndexFollower.open(tmp_path).close()  # followers are welcome
    first.close()
    IndexWriter.open(tmp_path).close()


def test_a_request_mixing_upserts_and_deletes_is_one_record(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    live = IndexWriter.open(tmp_path, DIM)
    live.upsert(np.arange(3), _unit(rng, 3))
    lsn = live.write(np.array([Op.DELETE, Op.UPSERT, Op.UPSERT]), np.array([0, 1, 7]), _unit(rng, 2))
    assert lsn == 2 and set(_state(live)) == {1, 2, 7}
    live.close()
    with open(tmp_path / "posts.wal", "rb") as f:
        record = list(read_records(f))[-1]
    assert record.lsn == 2 and record.deletes.tolist() == [0] and record.upserts.tolist() == [1, 7]


def test_a_snapshot_taken_while_writes_go_on_loses_none(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    live = IndexWriter.open(tmp_path, DIM)
    live.upsert(np.arange(5000), _unit(rng, 5000))
    vectors = _unit(rng, 300)
    snapshots = threading.Thread(target=lambda: [live.snapshot() for _ in range(5)])
    snapshots.start()
    for i in range(300):
        live.upsert(np.array([10_000 + i]), vectors[i : i + 1])
    snapshots.join()
    before, lsn = _state(live), live.lsn
    live.close()
    again = IndexWriter.open(tmp_path)
    assert again.lsn == lsn == 301 and _state(again) == before


def test_a_corrupt_snapshot_is_refused_not_served_empty(tmp_path: Path) -> None:
    live = IndexWriter.open(tmp_path, DIM)
    live.upsert(np.arange(5), _unit(np.random.default_rng(2), 5))
    live.snapshot()
    live.close()
    snapshot = tmp_path / "posts.npz"
    snapshot.write_bytes(snapshot.read_bytes()[:100])
    with pytest.raises(IndexStoreError, match="cannot read index"):
        IndexWriter.open(tmp_path)


def test_followers_see_every_acknowledged_write_and_snapshot(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    writer = IndexWriter.open(tmp_path, DIM)
    writer.upsert(np.arange(20), _unit(rng, 20))
    follower = IndexFollower.open(tmp_path)
    assert _state(follower) == _state(writer)
    q = _unit(rng, 1)
    top = int(follower.index.search(q, [1])[0].ids[0])
    writer.delete(np.array([top]))
    writer.upsert(np.array([100]), q)
    assert follower.refresh() == 2
    assert follower.index.search(q, [1])[0].ids.tolist() == [100]
    assert top not in follower.index.search(q, [25])[0].ids
    # New logs: the follower reads the rest of the old one first, so it reloads nothing, even
    # when writes landed just before the switch.
    writer.upsert(np.array([101]), _unit(rng, 1))
    writer.snapshot()
    writer.upsert(np.array([102]), _unit(rng, 1))
    assert follower.refresh() == 2 and _state(follower) == _state(writer)
    writer.snapshot()
    writer.upsert(np.array([103]), _unit(rng, 1))
    assert follower.refresh() == 1 and _state(follower) == _state(writer) and follower.reloads == 0
    # Two switches between refreshes: the log in between is gone, so the snapshot is reloaded.
    writer.upsert(np.array([104]), _unit(rng, 1))
    writer.snapshot()
    writer.upsert(np.array([105]), _unit(rng, 1))
    writer.snapshot()
    follower.refresh()
    assert _state(follower) == _state(writer) and follower.lsn == writer.lsn and follower.reloads == 1
    late = IndexFollower.open(tmp_path)  # a new follower starts from the snapshot
    assert _state(late) == _state(writer) and late.lsn == writer.lsn


def test_a_rebuild_keeps_the_writes_logged_while_it_ran(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    writer = IndexWriter.open(tmp_path, DIM)
    follower = IndexFollower.open(tmp_path)
    writer.upsert(np.arange(3), _unit(rng, 3))  # superseded by the rebuild
    with rebuilding(tmp_path) as rebuild:  # the corpus is read and embedded in here
        assert rebuild.lsn == 1
        writer.upsert(np.array([50]), _unit(rng, 1))  # acknowledged while the rebuild ran: kept
        assert writer.snapshot() is None  # deferred: it would drop write 2 from the log
        rebuild.save(np.arange(100, 110), _unit(rng, 10))
        writer.delete(np.array([100]))  # after the save, before the writer looked: kept too
    assert writer.snapshot() is None  # never saved over a rebuild it has not taken
    writer.refresh()
    expected = set(range(101, 110)) | {50}
    assert set(_state(writer)) == expected and writer.lsn == 3
    follower.refresh()
    assert _state(follower) == _state(writer) and follower.reloads == 1
    assert writer.snapshot() == 3


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from feedserve.index.live import IndexWriter
    live = IndexWriter.open(sys.argv[1], 8)
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
    recovered = IndexWriter.open(tmp_path)
    assert recovered.lsn >= acked[-1]
    ids = set(recovered.index.snapshot()[0].tolist())
    assert set(range(4 * acked[-1])) <= ids  # write n holds ids 4(n-1) .. 4n-1


def test_restoring_a_backup_as_the_readme_says(tmp_path: Path) -> None:
    """README "Backups and restore": a copy of posts.npz taken at any time is a consistent snapshot;
    restored with the current log kept, the gap is refused by name; with the log moved away, the
    index is the backup's and takes writes again."""
    import shutil

    rng = np.random.default_rng(3)
    index_dir = tmp_path / "index"
    live = IndexWriter.open(index_dir, DIM)
    live.upsert(np.arange(5), _unit(rng, 5))
    live.snapshot()
    shutil.copy(index_dir / "posts.npz", tmp_path / "backup.npz")
    backed_up = _state(live)
    live.upsert(np.arange(5, 10), _unit(rng, 5))
    live.snapshot()
    live.upsert(np.arange(10, 12), _unit(rng, 2))
    live.close()

    shutil.copy(tmp_path / "backup.npz", index_dir / "posts.npz")
    with pytest.raises(LogError, match="are in no file"):
        IndexWriter.open(index_dir)
    (index_dir / "posts.wal").rename(tmp_path / "posts.wal.old")
    restored = IndexWriter.open(index_dir)
    assert _state(restored) == backed_up
    restored.upsert(np.array([99]), _unit(rng, 1))
    restored.close()
    assert 99 in _state(IndexFollower.open(index_dir))


def _features(live: IndexFollower | IndexWriter, ids: list[int]) -> dict[int, object]:
    """The rows the index holds for these posts, as JSON reads them (it gives lists back as tuples)."""
    return {p: json.loads(json.dumps(r)) for p, r in live.index.lookup_rows(np.array(ids))[2].items()}


def test_features_written_with_a_post_are_logged_followed_snapshotted_and_replaced_with_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    hot, cold = {"percentiles": [0.9, 0.7], "tags": ["ml"]}, {"percentiles": [0.1, 0.0], "tags": []}
    live = IndexWriter.open(tmp_path, DIM)
    follower = IndexFollower.open(tmp_path)
    live.write(np.array([Op.UPSERT] * 3), np.array([1, 2, 3]), _unit(rng, 3), [hot, cold, {}])
    follower.refresh()
    for replica in (live, follower):
        assert _features(replica, [1, 2, 3, 4]) == {1: hot, 2: cold}  # {}: none of its own
    live.close()
    replayed = IndexWriter.open(tmp_path)  # from the log alone
    assert _features(replayed, [1, 2, 3]) == {1: hot, 2: cold}
    replayed.snapshot()
    replayed.write(np.array([Op.UPSERT, Op.DELETE]), np.array([1, 2]), _unit(rng, 1), [cold])
    replayed.upsert(np.array([3]), _unit(rng, 1))  # written again without features: still none
    replayed.write(np.array([Op.UPSERT]), np.array([4]), _unit(rng, 1), [hot])
    assert _features(replayed, [1, 2, 3, 4]) == {1: cold, 4: hot}
    replayed.snapshot()
    replayed.upsert(np.array([4]), _unit(rng, 1))  # replaced, features and all
    replayed.close()
    again = IndexWriter.open(tmp_path)  # the snapshot's features, then the log's write past it
    assert _features(again, [1, 2, 3, 4]) == {1: cold}
    follower.refresh()
    assert _features(follower, [1, 2, 3, 4]) == {1: cold}
    with pytest.raises(IndexStoreError, match="one per upsert"):
        again.write(np.array([Op.UPSERT, Op.DELETE]), np.array([5, 1]), _unit(rng, 1), [hot, hot])
    assert again.lsn == 5 and _features(again, [1]) == {1: cold}  # refused before it was logged
    again.close()
    follower.close()


def test_features_in_any_script_are_stored_as_utf_8_not_as_escapes(tmp_path: Path) -> None:
    """JSON's ASCII escapes stored a tag in Japanese in three times its UTF-8 bytes (\\uXXXX per
    character), in the log, the snapshot's vocabulary and its other rows."""
    rng = np.random.default_rng(8)
    tags = ["推薦システム", "機械学習"]
    column = {"percentiles": [0.5, 0.25], "tags": tags}
    other = {"percentiles": [0.5], "tags": tags}  # another width: kept as JSON beside the columns
    live = IndexWriter.open(tmp_path, DIM)
    live.write(np.array([Op.UPSERT] * 2), np.array([1, 2]), _unit(rng, 2), [column, other])
    assert tags[0].encode() in (tmp_path / "posts.wal").read_bytes()
    live.snapshot()
    live.close()
    with np.load(tmp_path / "posts.npz") as saved:
        stored = b"".join(saved[name].tobytes() for name in saved.files)
    assert stored.count(tags[0].encode()) == 2 and b"\\u" not in stored
    again = IndexWriter.open(tmp_path)
    assert _features(again, [1, 2]) == {1: column, 2: other}
    again.close()


def test_a_snapshot_checks_its_features_against_its_checksum(tmp_path: Path) -> None:
    live = IndexWriter.open(tmp_path, DIM)
    live.write(np.array([Op.UPSERT]), np.array([1]), _unit(np.random.default_rng(8), 1), [{"tags": ["a"]}])
    live.snapshot()
    live.close()
    snapshot = tmp_path / "posts.npz"
    with np.load(snapshot) as data:
        arrays = {name: data[name] for name in data.files}
    assert bytes(arrays["features"]) == b'[[1,{"tags":["a"]}]]'
    arrays["features"] = np.frombuffer(b'[[1,{"tags":["b"]}]]', np.uint8)
    with open(snapshot, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(IndexStoreError, match="do not match the checksum"):
        IndexWriter.open(tmp_path)


def test_features_in_the_ingesters_shape_are_snapshotted_as_columns_and_others_as_json(tmp_path: Path) -> None:
    """Rows as `feature_row` writes them (percentiles of one width, then tags) go into columns, any
    other into JSON; every row reads back as written, by the writer and a follower; a column that
    does not match the checksum is refused; a file of the version before (JSON alone) still reads."""
    rng = np.random.default_rng(11)
    rows: dict[int, dict[str, object]] = {
        1: {"percentiles": [0.25, 1.0], "tags": ["drama", "new york"]},
        2: {"percentiles": [0.0, 0.0], "tags": []},
        3: {"percentiles": [1 / 3, 0.5], "tags": ["drama"]},
        4: {"percentiles": [0.5], "tags": ["drama"]},  # another width
        5: {"percentiles": [1, 0], "tags": ["x"]},  # ints: kept as they are, in JSON
        6: {"tags": ["drama"], "percentiles": [0.5, 0.5]},  # another order
        7: {"percentiles": [0.5, 0.5], "tags": ["a"], "extra": 1},
    }
    live = IndexWriter.open(tmp_path, DIM)
    ids = sorted(rows)
    live.write(np.full(len(ids), Op.UPSERT), np.array(ids), _unit(rng, len(ids)), [rows[p] for p in ids])
    live.snapshot()
    live.close()
    snapshot = tmp_path / "posts.npz"
    with np.load(snapshot) as data:
        arrays = {name: data[name] for name in data.files}
    assert arrays["feature_ids"].tolist() == [1, 2, 3]
    assert [p for p, _ in json.loads(bytes(arrays["features"]))] == [4, 5, 6, 7]
    want = json.loads(json.dumps(rows))
    for reader in (IndexWriter.open(tmp_path), IndexFollower.open(tmp_path)):
        assert _features(reader, ids) == {p: want[str(p)] for p in ids}
        assert [list(dict(reader.index.lookup_rows(np.array([p]))[2][p])) for p in (1, 6)] == [
            ["percentiles", "tags"],
            ["tags", "percentiles"],
        ]
        reader.close()
    assert json.loads(str(arrays["meta"]))["format"] == "feedserve.index/2"
    for name, changed in (
        ("feature_percentiles", arrays["feature_percentiles"] * np.array([[0.5, 1.0]])),
        ("feature_tags", arrays["feature_tags"].view(np.uint8)),  # the same bytes, read otherwise
    ):
        with open(snapshot, "wb") as f:
            np.savez(f, **{**arrays, name: changed})
        with pytest.raises(IndexStoreError, match="do not match the checksum"):
            IndexWriter.open(tmp_path)
    # The version before: every row as JSON text, format 1.
    text = json.dumps([[p, rows[p]] for p in ids], separators=(",", ":")).encode()
    meta = {"lsn": 1, "format": "feedserve.index/1", "dim": DIM, "count": len(ids)}
    meta["sha256"] = arrays_checksum(arrays["ids"], arrays["vectors"], text)
    with open(snapshot, "wb") as f:
        np.savez(
            f,
            ids=arrays["ids"],
            vectors=arrays["vectors"],
            meta=np.array(json.dumps(meta)),
            features=np.frombuffer(text, np.uint8),
        )
    old = IndexWriter.open(tmp_path)
    assert _features(old, ids) == {p: want[str(p)] for p in ids}
    # Without a row that fits the columns, the file is one of format 1 (a rolled back server reads it).
    old.write(np.full(4, Op.DELETE), np.array([1, 2, 3, 4]), None)
    old.snapshot()
    old.close()
    with np.load(snapshot) as data:
        assert json.loads(str(data["meta"]))["format"] == "feedserve.index/1" and "feature_ids" not in data.files


def test_a_log_of_the_version_before_is_replayed_and_continued_in_this_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    vectors = _unit(rng, 2)
    old = index_log.encode(np.array([Op.UPSERT, Op.UPSERT]), np.array([1, 2]), vectors)  # no features section
    (tmp_path / "posts.wal").write_bytes(HEADER.pack(b"FSWAL002", 0) + index_log.record_bytes(1, old))
    follower = IndexFollower.open(tmp_path, DIM)  # no snapshot yet: the log alone
    assert sorted(_state(follower)) == [1, 2]
    live = IndexWriter.open(tmp_path, DIM)
    assert live.lsn == 1 and sorted(_state(live)) == [1, 2] and _features(live, [1, 2]) == {}
    # Rewritten under this version's header before a record of this version joins it.
    assert (tmp_path / "posts.wal").read_bytes()[:8] == index_log.MAGIC and _lsns(tmp_path / "posts.wal") == [1]
    live.write(np.array([Op.UPSERT]), np.array([3]), _unit(rng, 1), [{"tags": ["new"]}])
    follower.refresh()  # it followed the old file, and moves to the new one as after a snapshot
    assert sorted(_state(follower)) == [1, 2, 3] and _features(follower, [3]) == {3: {"tags": ["new"]}}
    follower.close()
    live.snapshot()
    live.close()
    again = IndexWriter.open(tmp_path)
    assert sorted(_state(again)) == [1, 2, 3] and _features(again, [3]) == {3: {"tags": ["new"]}}
    again.close()


@pytest.mark.parametrize(
    "section",
    [b"[{}]", b"[{},{},{}]", b"[1,2]", b"{}", b"[{},", b"\xff\xfe", b""],
    ids=["too-few", "too-many", "not-objects", "not-a-list", "cut", "not-utf8", "empty"],
)
def test_a_features_section_that_does_not_add_up_is_no_record(section: bytes) -> None:
    body = index_log.encode(np.array([Op.UPSERT, Op.UPSERT]), np.array([1, 2]), np.zeros((2, DIM), np.float32))
    assert index_log.decode(1, body + struct.pack("<I", len(section)) + section, 0) is None
    assert index_log.decode(1, body + struct.pack("<I", 99) + b"[{},{}]", 0) is None  # a length that lies
    whole = index_log.decode(1, body + struct.pack("<I", 7) + b"[{},{}]", 0)
    assert whole is not None and whole.features == [{}, {}]


def test_the_features_an_index_holds_leave_the_collectors_passes(tmp_path: Path) -> None:
    """Rows held as dicts made a full collection walk every one of them (1.8 s for a million): the rows
    of the ingester's shape are columns, and one of another shape is held frozen, which the
    collector stops tracking, written live or loaded from a snapshot."""
    import gc

    row = {"percentiles": [0.5, 0.25], "tags": ["a", "b"], "format": 1}
    live = IndexWriter.open(tmp_path, DIM)
    live.write(np.array([Op.UPSERT]), np.array([1]), _unit(np.random.default_rng(10), 1), [row])
    live.snapshot()
    live.close()
    again = IndexWriter.open(tmp_path)
    for _ in range(3):  # a container drops out on the pass after what it holds has: a level a pass
        gc.collect()
    assert not gc.is_tracked(again.index._features.others[1])
    assert _features(again, [1]) == {1: row}
    again.close()


@pytest.mark.parametrize(
    "meta,words",
    [("[1, 2]", "not a JSON object"), ('{"format": 1}', "dim is None"), ('{"dim": 4, "lsn": "x"}', "lsn is 'x'")],
)
def test_a_snapshot_whose_metadata_is_damaged_is_refused_by_name(tmp_path: Path, meta: str, words: str) -> None:
    """The metadata is outside the checksum: a list or a missing dim surfaced as AttributeError or
    KeyError, and an lsn of "x" loaded."""
    path = tmp_path / "posts.npz"
    with open(path, "wb") as f:
        np.savez(f, ids=np.arange(2), vectors=np.zeros((2, 4), np.float32), meta=np.array(meta))
    for read in (load_arrays, read_meta):
        with pytest.raises(IndexStoreError, match=words):
            read(path)


def test_a_snapshot_damaged_while_served_is_reported_once_and_the_log_goes_on(tmp_path: Path) -> None:
    """A damaged posts.npz froze every follower at its lsn (each batch retried the file and never
    read the log) and stopped the writer's snapshots, so its log grew without end."""
    rng = np.random.default_rng(12)
    writer = IndexWriter.open(tmp_path, DIM)
    writer.upsert(np.arange(3), _unit(rng, 3))
    writer.snapshot()
    follower = IndexFollower.open(tmp_path)
    snapshot = tmp_path / "posts.npz"
    snapshot.write_bytes(snapshot.read_bytes()[:100])  # damaged in place
    writer.upsert(np.array([20, 21]), _unit(rng, 2))
    writer.delete(np.array([1]))
    with pytest.raises(IndexStoreError, match="cannot read index"):
        writer.refresh()
    assert writer.refresh() == 0  # reported once
    with pytest.raises(IndexStoreError, match="cannot read index"):
        follower.refresh()
    assert follower.refresh() == 2 and _state(follower) == _state(writer)  # the log, read on
    assert writer.snapshot() == writer.lsn  # the unreadable file is replaced
    assert _state(IndexFollower.open(tmp_path)) == _state(writer)
    writer.close()


def test_a_log_deleted_under_the_writer_is_put_back_and_no_lsn_is_handed_out_twice(tmp_path: Path) -> None:
    """`rm posts.wal` under a running writer (a cleanup job, an operator): the writer went on
    acknowledging writes into the unlinked file, which a restart lost, and the log it then created
    handed out their lsns again (followers past them skipped the new writes silently). The writer
    puts the log back at its path before its next append, snapshot or close."""
    rng = np.random.default_rng(3)
    writer = IndexWriter.open(tmp_path, DIM)
    writer.upsert(np.arange(5), _unit(rng, 5))
    writer.snapshot()
    writer.upsert(np.array([5]), _unit(rng, 1))
    follower = IndexFollower.open(tmp_path)
    assert follower.lsn == 2
    os.remove(tmp_path / "posts.wal")
    assert writer.upsert(np.array([6]), _unit(rng, 1)) == 3
    assert _lsns(tmp_path / "posts.wal") == [2, 3]  # back at its path, whole
    follower.refresh()
    assert follower.lsn == 3 and _state(follower) == _state(writer)
    os.remove(tmp_path / "posts.wal")
    writer.close()  # nothing written since: the close puts it back
    writer = IndexWriter.open(tmp_path)
    assert writer.lsn == 3 and writer.upsert(np.array([7]), _unit(rng, 1)) == 4
    os.remove(tmp_path / "posts.wal")
    assert writer.snapshot() == 4 and _lsns(tmp_path / "posts.wal") == []
    follower.refresh()
    assert _state(follower) == _state(writer)
    # Moved away (a log rotation, a backup tool) rather than deleted: the same.
    writer.upsert(np.array([8]), _unit(rng, 1))
    os.rename(tmp_path / "posts.wal", tmp_path / "posts.wal.1")
    assert writer.upsert(np.array([9]), _unit(rng, 1)) == 6
    assert _lsns(tmp_path / "posts.wal") == [5, 6]
    follower.refresh()
    assert follower.lsn == 6 and _state(follower) == _state(writer)
    writer.close()
    follower.close()


def test_a_follower_ahead_of_a_log_started_anew_reloads_instead_of_skipping_its_lsns(tmp_path: Path) -> None:
    """A log that does not hold the last record a follower applied (the writer lost it: the log was
    deleted and the writer killed before it could put it back) is not the follower's history: its
    lsns are the same numbers for other writes. The follower reloads the snapshot and that log."""
    rng = np.random.default_rng(4)
    writer = IndexWriter.open(tmp_path, DIM)
    writer.upsert(np.arange(5), _unit(rng, 5))
    writer.snapshot()
    writer.upsert(np.array([5]), _unit(rng, 1))  # lsn 2: only in the log
    follower = IndexFollower.open(tmp_path)
    assert follower.lsn == 2 and 5 in _state(follower)
    writer._wal.close()  # killed: nothing put back
    os.close(writer._writer_lock or -1)
    os.remove(tmp_path / "posts.wal")
    writer = IndexWriter.open(tmp_path)
    assert writer.lsn == 1
    assert writer.upsert(np.array([9]), _unit(rng, 1)) == 2  # the same lsn, another write
    follower.refresh()
    assert follower.reloads == 1 and _state(follower) == _state(writer) and 5 not in _state(follower)
    writer.close()
    follower.close()


def test_a_log_started_anew_whose_last_record_happens_to_match_is_still_another_history(tmp_path: Path) -> None:
    """The new history's record at the follower's lsn may be byte-identical to the one it applied (the
    same delete), its earlier records not: checked against the last record alone, the follower kept
    a post the writer lost and never got the one written in its place."""
    rng = np.random.default_rng(6)
    writer = IndexWriter.open(tmp_path, DIM)
    writer.upsert(np.arange(3), _unit(rng, 3))
    writer.snapshot()
    writer.upsert(np.array([5]), _unit(rng, 1))
    writer.delete(np.array([0]))
    follower = IndexFollower.open(tmp_path)
    assert follower.lsn == 3
    writer._wal.close()  # killed with its log deleted: lsns 2 and 3 are lost
    os.remove(tmp_path / "posts.wal")
    os.close(writer._writer_lock or -1)
    writer = IndexWriter.open(tmp_path)
    writer.upsert(np.array([7]), _unit(rng, 1))  # lsn 2: another write
    writer.delete(np.array([0]))  # lsn 3: the same bytes as the lost one
    follower.refresh()
    assert follower.reloads == 1 and _state(follower) == _state(writer) and 7 in _state(follower)
    writer.close()
    follower.close()


def test_a_writer_refuses_a_log_that_ends_before_its_snapshot(tmp_path: Path) -> None:
    """An old log restored beside a newer snapshot: appending after its last record would hand out
    lsns the snapshot already holds."""
    rng = np.random.default_rng(5)
    writer = IndexWriter.open(tmp_path, DIM)
    writer.upsert(np.arange(3), _unit(rng, 3))
    old = (tmp_path / "posts.wal").read_bytes()
    writer.upsert(np.array([3]), _unit(rng, 1))
    writer.snapshot()
    writer.close()
    (tmp_path / "posts.wal").write_bytes(old)
    with pytest.raises(LogError, match="lsn 2"):
        IndexWriter.open(tmp_path)
