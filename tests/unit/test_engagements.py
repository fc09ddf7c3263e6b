"""Engagements streamed in while serving (feedserve.rank.engagements): logged durably by one writer,
followed by readers, merged into the build's co-engagement table as if it had been built with them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feedserve.errors import IndexStoreError
from feedserve.index.layout import IndexLayout
from feedserve.index.wal import HEADER, RECORD, LogError
from feedserve.rank import engagements
from feedserve.rank.coengagement import CoEngagement
from feedserve.rank.engagements import EngagementFollower, EngagementWriter, LiveCoEngagement

events_strategy = st.lists(st.tuples(st.integers(0, 6), st.integers(0, 9), st.integers(0, 50)), min_size=0, max_size=60)


def _same(a: CoEngagement, b: CoEngagement) -> None:
    for x, y in zip((a.posts, a.indptr, a.members, a.times), (b.posts, b.indptr, b.members, b.times), strict=True):
        assert x.tolist() == y.tolist()
    for x, y in zip(
        (a._place, a._last, a._post_in_order, a._time_in_order, a._member_ids, a._member_col),
        (b._place, b._last, b._post_in_order, b._time_in_order, b._member_ids, b._member_col),
        strict=True,
    ):
        assert x.tolist() == y.tolist()


def _columns(events: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = np.array(events, np.int64).reshape(-1, 3)
    return rows[:, 0], rows[:, 1], rows[:, 2]


@settings(max_examples=60, deadline=None)
@given(events_strategy, st.integers(0, 60))
def test_a_table_with_events_merged_in_is_the_table_built_from_all_of_them(
    events: list[tuple[int, int, int]], cut: int
) -> None:
    """However the engagements are split between the build and the log (a pair in both, at different
    times, included), the merged table is the one built from all of them: each pair once, from its
    first time."""
    merged = CoEngagement.from_events(events[:cut]).with_events(*_columns(events[cut:]))
    _same(merged, CoEngagement.from_events(events))
    _same(merged, CoEngagement.from_events(sorted(events, key=lambda e: (e[1], e[0], e[2]))))  # in order: no sort
    # Against a reference written as a loop: each (member, post) once, at its first time, entries
    # by post then member.
    first: dict[tuple[int, int], int] = {}
    for m, p, t in events:
        first[(p, m)] = min(t, first.get((p, m), t))
    pairs = sorted(first)
    assert merged.posts.tolist() == sorted({p for p, _ in pairs})
    assert merged.members.tolist() == [m for _, m in pairs]
    assert merged.times.tolist() == [first[k] for k in pairs]
    assert np.diff(merged.indptr).tolist() == [sum(1 for q, _ in pairs if q == p) for p in merged.posts.tolist()]


@settings(max_examples=80, deadline=None)
@given(events_strategy, st.lists(st.integers(0, 60), max_size=4), st.booleans())
def test_merging_poll_after_poll_inserts_into_the_table_and_builds_the_same_one(
    events: list[tuple[int, int, int]], cuts: list[int], later: bool
) -> None:
    """A follower merges each poll's records into the table it serves. Merged step by step, the table
    is the one built from everything, each step inserting into the table rather than building it
    anew: with every step's engagements after the table's (as streamed ones are), and with pairs the
    table holds engaged with earlier than it says (they move earlier in their member's order)."""
    if later:  # each step's engagements after everything before them
        events = [(m, p, t + 100 * sum(c <= i for c in cuts)) for i, (m, p, t) in enumerate(events)]
    bounds = [0, *sorted(cuts), len(events)]
    steps = [events[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    rebuilt: list[int] = []
    table = CoEngagement.from_events(steps[0])
    original = CoEngagement._rebuilt_with
    CoEngagement._rebuilt_with = lambda self, new: rebuilt.append(1) or original(self, new)  # type: ignore[method-assign]
    try:
        for step in steps[1:]:
            table = table.with_events(*_columns(step))
    finally:
        CoEngagement._rebuilt_with = original  # type: ignore[method-assign]
    _same(table, CoEngagement.from_events(events))
    assert not rebuilt


def test_times_beyond_what_one_key_orders_are_merged_by_building_anew(monkeypatch: pytest.MonkeyPatch) -> None:
    rebuilt: list[int] = []
    original = CoEngagement._rebuilt_with
    monkeypatch.setattr(CoEngagement, "_rebuilt_with", lambda self, new: rebuilt.append(1) or original(self, new))
    events = [(1, 5, 2**40), (2, 5, 3), (1, 6, 7)]
    table = CoEngagement.from_events(events[:1]).with_events(*_columns(events[1:]))
    _same(table, CoEngagement.from_events(events))
    assert rebuilt == [1]


def test_a_table_that_is_not_in_order_is_refused() -> None:
    with pytest.raises(ValueError, match="posts must be unique and ascending"):
        CoEngagement(np.array([5, 3]), np.array([0, 1, 2]), np.array([1, 2]))
    with pytest.raises(ValueError, match="members must be unique and ascending"):
        CoEngagement(np.array([5]), np.array([0, 2]), np.array([9, 3]))
    CoEngagement.from_arrays(np.array([1, 1]), np.array([-2, 2**63 - 1]), np.array([0, 0]))  # ids far apart


def test_the_log_is_written_once_durable_followed_and_survives_a_torn_tail(tmp_path: Path) -> None:
    writer = EngagementWriter.open(tmp_path)
    follower = EngagementFollower(IndexLayout(tmp_path).engagements)
    assert follower.read() == (False, [])
    assert writer.write(np.array([1, 2]), np.array([10, 11]), np.array([100, 101])) == 1
    assert writer.write(np.array([3]), np.array([12]), np.array([102])) == 2
    replaced, chunks = follower.read()
    assert not replaced and follower.lsn == 2
    assert [c.tolist() for c in chunks] == [[[1, 2], [10, 11], [100, 101]], [[3], [12], [102]]]
    assert follower.read() == (False, [])
    end = IndexLayout(tmp_path).engagements.stat().st_size
    # A bad batch is refused before anything is logged, naming what is wrong.
    for members, posts, times, match in (
        ([-1], [1], [1], "member ids"),
        ([1], [-5], [1], "post ids"),
        ([1], [1], [-1], "unix seconds"),
        ([1], [1], [2**40], "unix seconds"),
        ([1, 2], [1], [1], "one member, post and time"),
    ):
        with pytest.raises(ValueError, match=match):
            writer.write(np.array(members), np.array(posts), np.array(times))
    # A second writer on the same directory is refused while the first holds the lock.
    with pytest.raises(IndexStoreError, match="engagement writer"):
        EngagementWriter.open(tmp_path)
    writer.close()
    # A crash mid-append: the torn tail is cut off by the next writer, and what follows is read.
    path = IndexLayout(tmp_path).engagements
    with open(path, "ab") as f:
        f.write(b"\x30\x00\x00\x00torn")
    assert follower.read() == (False, [])  # half a record is not a record
    writer = EngagementWriter.open(tmp_path)
    assert path.stat().st_size == end
    assert writer.write(np.array([4]), np.array([13]), np.array([103])) == 3
    _, chunks = follower.read()
    assert follower.lsn == 3 and [c.tolist() for c in chunks] == [[[4], [13], [103]]]
    writer.close()


def test_damage_that_a_valid_record_follows_is_refused_not_dropped(tmp_path: Path) -> None:
    writer = EngagementWriter.open(tmp_path)
    for i in range(3):
        writer.write(np.array([i]), np.array([i]), np.array([i]))
    writer.close()
    path = IndexLayout(tmp_path).engagements
    data = bytearray(path.read_bytes())
    data[HEADER.size + 20] ^= 0xFF  # inside the first record's payload
    path.write_bytes(bytes(data))
    with pytest.raises(LogError, match="damaged"):
        EngagementWriter.open(tmp_path)
    # Not another log's: a post index log is not an engagement log.
    os.remove(path)
    path.write_bytes(b"FSWAL003" + bytes(8))
    with pytest.raises(LogError, match="bad header"):
        EngagementWriter.open(tmp_path)


def test_a_tail_crafted_to_look_like_many_records_is_refused_not_searched_for_minutes(tmp_path: Path) -> None:
    """Every 16 bytes a record header claiming half the tail, with a plausible lsn: the search for a
    valid record after damage checksummed half the tail at each (8 s at 1 MiB, quadratic)."""
    writer = EngagementWriter.open(tmp_path)
    writer.write(np.array([1]), np.array([2]), np.array([3]))
    writer.close()
    path = IndexLayout(tmp_path).engagements
    tail = 1 << 20
    with open(path, "ab") as f:
        f.write(RECORD.pack(tail // 2, 0, 2) * (tail // RECORD.size))
    with pytest.raises(LogError, match="more would-be records than a torn write leaves"):
        EngagementWriter.open(tmp_path)


def test_the_live_table_serves_the_build_merged_with_what_was_logged(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    build = [(int(m), int(p), int(t)) for m, p, t in rng.integers(0, 40, (300, 3))]
    later = [(int(m), int(p), 100 + int(t)) for m, p, t in rng.integers(0, 50, (120, 3))]  # posts 40..49: new
    base = CoEngagement.from_events(build)
    path = IndexLayout(tmp_path).engagements
    live = LiveCoEngagement(base, path)
    assert not live.update() and live.table is base  # no log yet: the build's table
    writer = EngagementWriter.open(tmp_path)
    writer.write(*_columns(later[:70]))
    writer.write(*_columns(later[70:]))
    assert live.update() and live.logged == 120 and live.merges == 1
    _same(live.table, CoEngagement.from_events(build + later))
    history, candidates = [1, 2, 3], list(range(50))
    new = live.table.scores(7, history, candidates)[40:]
    assert base.scores(7, history, candidates)[40:].sum() == 0 and new.sum() > 0  # new posts scored now
    assert not live.update() and live.merges == 1  # nothing new: no merge
    # The log replaced (a new index directory): what was read of the old one is dropped.
    writer.close()
    os.remove(path)
    writer = EngagementWriter.open(tmp_path)
    writer.write(*_columns(later[:5]))
    assert live.update() and live.logged == 5
    _same(live.table, CoEngagement.from_events(build + later[:5]))
    writer.close()
    live.close()


def test_a_replacement_or_a_merge_that_failed_is_taken_up_at_the_next_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = CoEngagement.from_events([(1, 1, 1), (2, 1, 1), (2, 2, 1)])
    path = IndexLayout(tmp_path).engagements
    live = LiveCoEngagement(base, path)
    writer = EngagementWriter.open(tmp_path)
    writer.write(np.array([3]), np.array([1]), np.array([5]))
    # A merge that fails (memory, say) leaves the records read, and the next update merges them.
    monkeypatch.setattr(CoEngagement, "with_events", lambda *a: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(MemoryError):
        live.update()
    monkeypatch.undo()
    assert live.table is base and live.update() and live.logged == 1
    # A replacement whose header cannot be read yet: the old log's engagements stay until the new
    # one is read, and then they go.
    writer.close()
    os.remove(path)
    path.write_bytes(b"garbage!" + bytes(8))
    with pytest.raises(LogError):
        live.update()
    assert live.logged == 1
    os.remove(path)
    EngagementWriter.open(tmp_path).close()
    assert (
        live.update()
        and live.logged == 0
        and live.table.scores(9, [1], [2]).tolist() == base.scores(9, [1], [2]).tolist()
    )
    live.close()


def test_a_snapshot_folds_the_log_and_followers_read_on_across_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer folds the log into engagements.npz and starts a new log after it: a follower reading
    all along goes on where it was (no merge anew), one that starts, or that slept through two
    snapshots, reads the snapshot and the log after it; a write during the snapshot is carried over;
    each serves the table built from everything."""
    rng = np.random.default_rng(1)
    build = [(int(m), int(p), int(t)) for m, p, t in rng.integers(0, 30, (200, 3))]
    later = [(int(m), int(p), 100 + int(t)) for m, p, t in rng.integers(0, 40, (300, 3))]
    later += later[:10]  # sent again after a crash: counts once
    base = CoEngagement.from_events(build)
    files = IndexLayout(tmp_path)
    awake, asleep = LiveCoEngagement(base, files.engagements), LiveCoEngagement(base, files.engagements)
    writer = EngagementWriter.open(tmp_path)
    assert writer.snapshot() is None  # nothing logged
    for i in range(0, 150, 30):
        writer.write(*_columns(later[i : i + 30]))
    assert awake.update() and asleep.update()
    # A write that lands while the snapshot is being saved is carried into the new log.
    save = engagements.save_snapshot
    monkeypatch.setattr(engagements, "save_snapshot", lambda *a: (writer.write(*_columns(later[150:160])), save(*a)))
    assert writer.snapshot() == 5
    monkeypatch.undo()
    assert engagements.load_snapshot(files.engagements_snapshot).events.shape == (
        3,
        len(set((m, p) for m, p, _ in later[:150])),
    )
    assert writer.write(*_columns(later[160:200])) == 7
    merges = awake.merges
    assert awake.update() and awake.follower.lsn == 7 and awake.merges == merges + 1 and awake.logged == 200
    _same(awake.table, CoEngagement.from_events(build + later[:200]))
    fresh = LiveCoEngagement(base, files.engagements)
    assert fresh.update() and fresh.logged == len(set((m, p) for m, p, _ in later[:150])) + 50
    _same(fresh.table, CoEngagement.from_events(build + later[:200]))
    for i in range(200, len(later), 50):
        writer.write(*_columns(later[i : i + 50]))
        assert writer.snapshot() is not None
    assert files.engagements.stat().st_size == HEADER.size  # everything is in the snapshot
    for live in (awake, asleep, fresh):
        live.update()
        _same(live.table, CoEngagement.from_events(build + later))
    # A writer reopened goes on after the snapshot, the log removed or not.
    writer.close()
    os.remove(files.engagements)
    writer = EngagementWriter.open(tmp_path)
    assert writer.write(np.array([99]), np.array([1]), np.array([500])) == awake.follower.lsn + 1
    awake.update()
    _same(awake.table, CoEngagement.from_events([*build, *later, (99, 1, 500)]))
    writer.close()
    for live in (awake, asleep, fresh):
        live.close()


def test_a_snapshot_that_did_not_finish_or_does_not_read_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = IndexLayout(tmp_path)
    writer = EngagementWriter.open(tmp_path)
    writer.write(np.array([1, 2]), np.array([5, 5]), np.array([10, 11]))
    # Saved, but the log not restarted (a crash between the two): the log still holds everything.
    monkeypatch.setattr(engagements.WriteAheadLog, "restart", lambda *a: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError):
        writer.snapshot()
    monkeypatch.undo()
    writer.write(np.array([3]), np.array([6]), np.array([12]))
    assert writer.snapshot() == 2
    live = LiveCoEngagement(CoEngagement.from_events([]), files.engagements)
    live.update()
    _same(live.table, CoEngagement.from_events([(1, 5, 10), (2, 5, 11), (3, 6, 12)]))
    writer.close()
    # A snapshot that does not match its checksum is refused by name, by the writer and a follower.
    with np.load(files.engagements_snapshot) as saved:
        meta, events = saved["meta"], saved["events"]
    events[2, 0] += 1
    with open(files.engagements_snapshot, "wb") as f:
        np.savez(f, meta=meta, events=events)
    with pytest.raises(IndexStoreError, match="engagements.npz"):
        EngagementWriter.open(tmp_path)
    with pytest.raises(IndexStoreError, match="engagements.npz"):
        LiveCoEngagement(CoEngagement.from_events([]), files.engagements).update()
    # A log that ends before the snapshot is another log's; one that starts after it (the snapshot
    # moved away, or an older one restored) would lose what the snapshot held: both refused.
    os.remove(files.engagements_snapshot)
    engagements.save_snapshot(files.engagements_snapshot, engagements.Snapshot(9, np.zeros((3, 1), np.int64)))
    with pytest.raises(LogError, match="not one log's"):
        EngagementWriter.open(tmp_path)
    os.remove(files.engagements_snapshot)
    with pytest.raises(LogError, match="missing between them"):
        EngagementWriter.open(tmp_path)
    engagements.save_snapshot(files.engagements_snapshot, engagements.Snapshot(1, np.zeros((3, 1), np.int64)))
    with pytest.raises(LogError, match="missing between them"):
        EngagementWriter.open(tmp_path)
    live.close()


def test_a_log_deleted_under_the_writer_is_put_back_and_a_log_started_anew_is_merged_anew(tmp_path: Path) -> None:
    """`rm engagements.wal` under the writer: it puts the log back before its next write or snapshot
    (engagements acknowledged into the unlinked file were lost at the next open, and their lsns
    handed out again). A writer killed before it could loses them: a follower that read them finds
    the new log does not hold its last record and merges the snapshot and the new log anew."""
    files = IndexLayout(tmp_path)
    writer = EngagementWriter.open(tmp_path)
    writer.write(np.array([1]), np.array([5]), np.array([10]))
    assert writer.snapshot() == 1
    os.remove(files.engagements)
    assert writer.write(np.array([2]), np.array([5]), np.array([11])) == 2
    live = LiveCoEngagement(CoEngagement.from_events([]), files.engagements)
    live.update()
    _same(live.table, CoEngagement.from_events([(1, 5, 10), (2, 5, 11)]))
    os.remove(files.engagements)
    assert writer.snapshot() == 2  # read from the file it logged to, then put at the path anew
    assert engagements.load_snapshot(files.engagements_snapshot).events.shape == (3, 2)
    writer.write(np.array([3]), np.array([6]), np.array([12]))
    live.update()
    assert live.follower.lsn == 3
    writer._log.close()  # killed with the log deleted: lsn 3 is lost
    os.close(writer._lock)
    os.remove(files.engagements)
    writer = EngagementWriter.open(tmp_path)
    assert writer.write(np.array([4]), np.array([7]), np.array([13])) == 3
    live.update()
    _same(live.table, CoEngagement.from_events([(1, 5, 10), (2, 5, 11), (4, 7, 13)]))
    writer.close()
    live.close()


def test_a_retention_drops_old_engagements_in_steps_and_followers_merge_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The snapshot kept every engagement ever logged (24 bytes each, merged by every follower that
    starts). With a retention it keeps those since "now" (the clock, never past the newest
    engagement) less the retention, moving that `since` in steps of a tenth of it; a follower reading
    along merges anew when it moves (its table holds what was dropped), and an old engagement logged
    later is dropped by followers and by the next snapshot alike."""
    day = 86400
    now = int(time.time())
    files = IndexLayout(tmp_path)
    build = [(1, 5, now - 400 * day), (2, 5, now - 400 * day)]  # the build's table keeps its own
    old = [(3, 6, now - 40 * day), (4, 6, now - 35 * day)]
    recent = [(5, 6, now - 2 * day), (6, 7, now - day)]
    base = CoEngagement.from_events(build)
    writer = EngagementWriter.open(tmp_path, retention_s=30 * day)
    live = LiveCoEngagement(base, files.engagements)
    writer.write(*_columns(old[1:] + recent))
    live.update()  # reading along: its table holds the old one
    _same(live.table, CoEngagement.from_events(build + old[1:] + recent))
    assert writer.snapshot() == 1
    snapshot = engagements.load_snapshot(files.engagements_snapshot)
    assert snapshot.since == now - 31 * day and snapshot.events.shape == (3, 2)  # "now": the newest, a day ago
    live.update()
    _same(live.table, CoEngagement.from_events(build + recent))
    assert live.follower.since == snapshot.since
    writer.write(*_columns(old[:1] + [(7, 7, now)]))  # 40 days old: dropped as it is read
    live.update()
    _same(live.table, CoEngagement.from_events([*build, *recent, (7, 7, now)]))
    merges = live.merges
    assert writer.snapshot() == 2  # a day later than the last `since`: less than a step, it stays
    assert engagements.load_snapshot(files.engagements_snapshot).since == snapshot.since
    writer.write(*_columns([(8, 7, now)]))
    live.update()
    assert live.merges == merges + 1 and live.logged == 4  # read on, not merged anew
    _same(live.table, CoEngagement.from_events([*build, *recent, (7, 7, now), (8, 7, now)]))
    # Ten days on, nothing kept falls before the new cutoff: no step, no follower merges anew.
    monkeypatch.setattr(engagements.time, "time", lambda: now + 10 * day)
    writer.write(*_columns([(9, 7, now + 10 * day)]))
    assert writer.snapshot() == 4
    assert engagements.load_snapshot(files.engagements_snapshot).since == snapshot.since
    fresh = LiveCoEngagement(base, files.engagements)
    fresh.update()
    live.update()
    _same(fresh.table, live.table)
    writer.close()
    # A clock a year ahead for one snapshot: "now" is the newest engagement, not the clock, else
    # `since` (which only grows) dropped every engagement for good.
    monkeypatch.setattr(engagements.time, "time", lambda: now + 365 * day)
    ahead = EngagementWriter.open(tmp_path / "ahead", retention_s=30 * day)
    ahead.write(*_columns([(3, 6, now - 40 * day), *recent]))
    ahead.snapshot()
    kept = engagements.load_snapshot(IndexLayout(tmp_path / "ahead").engagements_snapshot)
    assert kept.since <= now and kept.events.shape == (3, 2)
    ahead.close()
    monkeypatch.undo()
    # A pair engaged with again inside the retention is kept (at that time), not dropped with its
    # first engagement.
    again = EngagementWriter.open(tmp_path / "again", retention_s=30 * day)
    again.write(*_columns([(1, 7, now - 40 * day), (1, 7, now - day), (2, 8, now - day)]))
    again.snapshot()
    events = engagements.load_snapshot(IndexLayout(tmp_path / "again").engagements_snapshot).events
    assert sorted(map(tuple, events.T.tolist())) == [(1, 7, now - day), (2, 8, now - day)]
    again.close()
    # Without a retention nothing is dropped (the default).
    keep = EngagementWriter.open(tmp_path / "keep")
    keep.write(*_columns(old))
    keep.snapshot()
    assert engagements.load_snapshot(IndexLayout(tmp_path / "keep").engagements_snapshot).events.shape == (3, 2)
    keep.close()
    live.close()
    fresh.close()


@pytest.mark.parametrize("meta", ['{"format": "feedserve.engagements/1", "lsn": 1, "since": "x"}', "[1]"])
def test_an_engagement_snapshot_whose_metadata_is_damaged_is_refused_by_name(tmp_path: Path, meta: str) -> None:
    path = tmp_path / "engagements.npz"
    with open(path, "wb") as f:
        np.savez(f, meta=np.array(meta), events=np.zeros((3, 0), np.int64))
    with pytest.raises(IndexStoreError, match="engagements.npz"):
        engagements.load_snapshot(path)
    with pytest.raises(IndexStoreError, match="engagements.npz"):
        engagements.snapshot_since(path)


def test_a_log_whose_write_failed_is_not_snapshotted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed append may have reached the disk past where the log says it ends: a snapshot then
    would cut it off and its lsn be handed out again."""
    from feedserve.index import wal

    writer = EngagementWriter.open(tmp_path)
    writer.write(np.array([1]), np.array([10]), np.array([100]))
    monkeypatch.setattr(wal.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "Input/output error")))
    with pytest.raises(LogError):
        writer.write(np.array([2]), np.array([11]), np.array([101]))
    monkeypatch.undo()
    with pytest.raises(LogError, match="reopen"):
        writer.snapshot()
    assert not IndexLayout(tmp_path).engagements_snapshot.exists()
    writer.close()


def test_only_active_positive_actions_count_as_engagements() -> None:
    from feedserve.rank.engagements import coengaged

    assert all(coengaged(a) for a in ("like", "Love ", "comment", "share", "repost", "save", "rated 4", "rated 5"))
    assert not any(coengaged(a) for a in ("view", "click", "long dwell", "dislike", "skip", "rated 3.5", "liek"))


def test_the_follow_thread_swaps_tables_in_and_stops(tmp_path: Path) -> None:
    base = CoEngagement.from_events([(1, 1, 1), (2, 1, 1), (2, 2, 1)])
    live = LiveCoEngagement(base, IndexLayout(tmp_path).engagements, poll_s=0.01)
    live.start()
    writer = EngagementWriter.open(tmp_path)
    writer.write(np.array([3, 3]), np.array([1, 5]), np.array([9, 9]))
    deadline = time.monotonic() + 10
    while live.merges == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert live.merges == 1 and live.table.scores(9, [1], [5]).tolist()[0] > 0
    live.close()
    writer.close()
    assert live._thread is not None and not live._thread.is_alive()


def test_the_follow_thread_reports_a_damaged_log_once_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = IndexLayout(tmp_path).engagements
    path.write_bytes(b"garbage!" + bytes(8))
    live = LiveCoEngagement(CoEngagement.from_events([(1, 1, 1)]), path, poll_s=0.01)
    with caplog.at_level("ERROR", logger="feedserve.rank.engagements"):
        live.start()
        time.sleep(0.3)  # some thirty polls
        reports = [r for r in caplog.records if "could not follow" in r.getMessage()]
        os.remove(path)
        writer = EngagementWriter.open(tmp_path)
        writer.write(np.array([2]), np.array([1]), np.array([5]))
        deadline = time.monotonic() + 10
        while live.merges == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    live.close()
    writer.close()
    assert len(reports) == 1 and live.merges == 1 and live.logged == 1
