"""The counter (feedserve.clients.counter): engage events -> each post's counts -> `counts` events,
exactly once across crashes at every step, on a real JSONL source and SQLite store."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from feedserve.clients.counter import Counter, CountStore, JsonlSink, main, position_order
from feedserve.clients.ingest import JsonlSource, parse_event
from feedserve.training.feed_log import synthetic_impressions


def _engage(post: int, action: str, member: int = 1) -> str:
    return json.dumps({"type": "engage", "member_id": member, "post_id": post, "action": action, "ts": 1}) + "\n"


def _sent(path: Path) -> dict[int, dict[str, float]]:
    """The totals the last counts event of each post carried, as the ingester would apply them."""
    out: dict[int, dict[str, float]] = {}
    for line in path.read_text().splitlines():
        event = parse_event(line.encode())
        assert event.kind == "counts" and event.counts is not None
        out[event.post_id] = event.counts
    return out


def _count(events: Path, state: Path, out: Path, **kwargs: Any) -> Counter:
    counter = Counter(CountStore(state / "counts.sqlite"), JsonlSink(out), flush_s=3600, **kwargs)
    counter.run(JsonlSource(events, state))
    return counter


def test_a_feed_logs_actions_become_the_counts_it_was_trained_on(tmp_path: Path) -> None:
    """Every impression a view and each like, comment or share its count, in small windows: the
    totals sent equal `FeedLog.counts_before`, what training and the build read."""
    log = synthetic_impressions(n_members=30, n_posts=120, sessions=4, shown=12)
    events = tmp_path / "actions.jsonl"
    events.write_text(
        "".join(
            _engage(i.post, action, i.member)
            for i in log.impressions
            for action in ("view", *sorted(i.actions))  # click, long dwell, skip: passed by
        )
    )
    counter = _count(events, tmp_path / "state", tmp_path / "counts.jsonl", max_batch=97)
    assert _sent(tmp_path / "counts.jsonl") == log.counts_before(log.impressions[-1].at + 1)
    assert counter.stats.bad == 0 and counter.stats.counted + counter.stats.passed == counter.stats.events


def test_ratings_move_a_seeded_mean_and_bad_events_are_skipped_by_name(tmp_path: Path) -> None:
    events = tmp_path / "actions.jsonl"
    events.write_text(
        _engage(7, "rated 5")
        + _engage(7, "rated 4")
        + "{not json\n"
        + _engage(7, "rated 9")  # outside MovieLens's stars
        + _engage(7, "rated -1")
        + json.dumps({"type": "create", "post": {"id": 9}})
        + "\n"  # another job's event: passed by
        + _engage(9, "dislike")  # not counted
        + _engage(9, "rated 2.5")
    )
    state = tmp_path / "state"
    store = CountStore(state / "counts.sqlite")
    store.seed({7: {"ratings": 10.0, "mean_rating": 3.5}})
    counter = Counter(store, JsonlSink(tmp_path / "counts.jsonl"), flush_s=3600)
    counter.run(JsonlSource(events, state))
    assert _sent(tmp_path / "counts.jsonl") == {
        7: {"ratings": 12.0, "mean_rating": round((35 + 9) / 12, 3)},
        9: {"ratings": 1.0, "mean_rating": 2.5},
    }
    assert (counter.stats.events, counter.stats.bad, counter.stats.counted, counter.stats.passed) == (8, 3, 3, 2)


class _Crash(Exception):
    pass


class _CrashingSource(JsonlSource):
    """Dies instead of committing its position after `commits` windows (the store has counted them)."""

    def __init__(self, *args: Any, commits: int) -> None:
        super().__init__(*args)
        self.commits = commits

    def commit(self, positions: list[Any]) -> None:
        if self.commits == 0:
            raise _Crash
        self.commits -= 1
        super().commit(positions)


class _CrashingSink(JsonlSink):
    """Dies after writing its events, before the store marks them sent."""

    def write(self, events: list[dict[str, Any]]) -> None:
        super().write(events)
        raise _Crash


@pytest.mark.parametrize("commits", [0, 1, 3])
def test_a_crash_between_the_stores_commit_and_the_sources_counts_nothing_twice(tmp_path: Path, commits: int) -> None:
    events = tmp_path / "actions.jsonl"
    events.write_text("".join(_engage(p % 3, "like") for p in range(40)))
    state, out = tmp_path / "state", tmp_path / "counts.jsonl"
    with pytest.raises(_Crash):
        Counter(CountStore(state / "counts.sqlite"), JsonlSink(out), max_batch=8).run(
            _CrashingSource(events, state, commits=commits)
        )
    again = _count(events, state, out, max_batch=8)
    assert again.stats.skipped == 8  # the window counted before the crash, read again, not counted
    assert _sent(out) == {0: {"likes": 14.0}, 1: {"likes": 13.0}, 2: {"likes": 13.0}}


def test_a_crash_after_sending_sends_the_same_totals_again(tmp_path: Path) -> None:
    events = tmp_path / "actions.jsonl"
    events.write_text(_engage(1, "like") + _engage(2, "share"))
    state, out = tmp_path / "state", tmp_path / "counts.jsonl"
    with pytest.raises(_Crash):
        Counter(CountStore(state / "counts.sqlite"), _CrashingSink(out)).run(JsonlSource(events, state))
    with open(events, "a") as f:
        f.write(_engage(1, "like"))
    again = _count(events, state, out)
    assert (again.stats.events, again.stats.sent) == (1, 2)  # post 2 owed still, post 1 changed
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(e["post_id"], e["counts"]) for e in lines] == [
        (1, {"likes": 1.0}),
        (2, {"shares": 1.0}),
        (1, {"likes": 2.0}),
        (2, {"shares": 1.0}),
    ]
    assert _count(events, state, out).stats.sent == 0  # nothing new, nothing owed


def test_positions_compare_as_offsets_and_as_redis_entry_ids() -> None:
    assert position_order(120) == (120, 0)
    assert position_order(b"1700000000000-2") < position_order(b"1700000000000-10") < position_order("1700000000001-0")


def test_the_command_line_seeds_once_and_refuses_a_malformed_count(tmp_path: Path) -> None:
    events, posts, out = tmp_path / "actions.jsonl", tmp_path / "posts.jsonl", tmp_path / "counts.jsonl"
    events.write_text(_engage(3, "upvote"))
    posts.write_text(json.dumps({"id": 3, "counts": {"upvotes": 4}}) + "\n")
    args = ["--events", str(events), "--state", str(tmp_path / "state"), "--out", str(out), "--seed", str(posts)]
    assert main([*args, "--count", "upvote=upvotes"]) == 0
    with open(events, "a") as f:
        f.write(_engage(3, "upvote"))
    assert main([*args, "--count", "upvote=upvotes"]) == 0  # the seed is not read again
    assert _sent(out) == {3: {"upvotes": 6.0}}
    with pytest.raises(SystemExit):
        main([*args, "--count", "upvote"])
    # Without a seed an empty store would send counts that replace the build's: refused.
    unseeded = ["--events", str(events), "--state", str(tmp_path / "other"), "--out", str(tmp_path / "other.jsonl")]
    with pytest.raises(SystemExit):
        main(unseeded)
    assert main([*unseeded, "--from-zero", "--count", "upvote=upvotes"]) == 0
    assert _sent(tmp_path / "other.jsonl") == {3: {"upvotes": 2.0}}


def test_a_quiet_stream_is_flushed_on_time_not_at_the_next_event(tmp_path: Path) -> None:
    """Following a file that stops growing: the counts go out `flush_s` after they were counted,
    while the counter waits, not only when the next event (or the end) comes."""
    events = tmp_path / "actions.jsonl"
    events.write_text(_engage(1, "like"))
    written: list[float] = []

    class Timed(JsonlSink):
        def write(self, events: list[dict[str, Any]]) -> None:
            written.append(time.monotonic())
            super().write(events)

    counter = Counter(CountStore(tmp_path / "state" / "counts.sqlite"), Timed(tmp_path / "counts.jsonl"), flush_s=0.2)
    counter.run(JsonlSource(events, tmp_path / "state", follow=True, idle_exit_s=2.0))
    assert len(written) == 1 and time.monotonic() - written[0] > 1.0  # sent while waiting, long before the end


def test_a_count_that_overflows_is_left_out_not_sent_as_infinity(tmp_path: Path) -> None:
    """A seed of 1e308 ratings at a mean of 4 overflows their sum: the mean came out Infinity, a
    counts event the ingester refuses, sent again at every flush."""
    events = tmp_path / "actions.jsonl"
    events.write_text(_engage(5, "rated 4.5") + _engage(6, "rated 4"))
    store = CountStore(tmp_path / "state" / "counts.sqlite")
    store.seed({5: {"ratings": 1e308, "mean_rating": 4.0}})
    Counter(store, JsonlSink(tmp_path / "counts.jsonl"), flush_s=3600).run(JsonlSource(events, tmp_path / "state"))
    assert _sent(tmp_path / "counts.jsonl") == {5: {"ratings": 1e308}, 6: {"ratings": 1.0, "mean_rating": 4.0}}


def test_a_deleted_post_is_forgotten_and_counts_from_zero_after_its_delete(tmp_path: Path) -> None:
    """The store kept every post ever counted, deleted ones too, and a post created again under a
    deleted one's id went on from its old counts."""
    delete = json.dumps({"type": "delete", "post_id": 5, "ts": 2}) + "\n"
    events = tmp_path / "actions.jsonl"
    events.write_text(_engage(5, "like") * 3 + _engage(6, "like") + delete + _engage(5, "like"))
    store = CountStore(tmp_path / "state" / "counts.sqlite")
    store.seed({5: {"likes": 40.0}, 7: {"likes": 2.0}})
    counter = Counter(store, JsonlSink(tmp_path / "counts.jsonl"), flush_s=3600, max_batch=2)
    counter.run(JsonlSource(events, tmp_path / "state"))  # windows of 2: the delete lands in the third
    assert _sent(tmp_path / "counts.jsonl") == {5: {"likes": 1.0}, 6: {"likes": 1.0}}
    assert counter.stats.deleted == 1
    # A delete with nothing after it: the post's rows are gone, the others stay.
    with events.open("a") as f:
        f.write(delete)
    Counter(store, JsonlSink(tmp_path / "counts.jsonl"), flush_s=3600).run(JsonlSource(events, tmp_path / "state"))
    posts = {row[0] for row in store.db.execute("SELECT post FROM counts")}
    assert posts == {6, 7} and store.owed(10) == {}
