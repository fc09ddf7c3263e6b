"""Event sources of the ingester: a quiet pipe lets a window close (the source yields None while it
waits), and the committed position is where a restart begins."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from feedserve.clients.ingest import (
    MAX_EVENT_BYTES,
    MAX_LAGS,
    OVERSIZE,
    BadEvent,
    JsonlSource,
    SourceChanged,
    Stats,
    StdinSource,
    parse_event,
)


def test_stdin_yields_none_while_the_pipe_is_quiet(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "rb") as stream:
        writer = os.fdopen(write_end, "wb", buffering=0)
        events = StdinSource(stream, tmp_path).events()
        writer.write(b'{"type": "delete", "post_id": 1}\n')
        first = next(events)
        while first is None:
            first = next(events)
        assert first == (1, b'{"type": "delete", "post_id": 1}\n')
        start = time.monotonic()
        assert next(events) is None  # the writer is still there, and silent: no blocking read
        assert time.monotonic() - start < 1.0
        writer.write(b"\n" + b'{"type": "delete", "post_id": 2}\n')  # a blank line counts, yields nothing
        item = next(events)
        while item is None:
            item = next(events)
        assert item == (3, b'{"type": "delete", "post_id": 2}\n')
        writer.close()
        assert all(item is None for item in events)  # the pipe closed: the source ends


def test_stdin_skips_the_lines_already_committed(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b"a\nb\nc\n")
    os.close(write_end)
    with os.fdopen(read_end, "rb") as stream:
        source = StdinSource(stream, tmp_path)
        source.commit([2])
        assert [item for item in source.events() if item is not None] == [(3, b"c\n")]


def test_a_line_longer_than_any_event_is_one_bad_event_read_in_bounded_pieces(tmp_path: Path) -> None:
    """A producer's 5 MiB line (no newline for a while, as a writer mid-line): the file source waits
    for its end without rewinding, then yields one OVERSIZE at the offset past it, and the next
    event whole; standard input the same; parse_event names the limit."""
    ok = b'{"type": "delete", "post_id": 1}\n'
    huge = b'{"type": "create", "post": {"id": 2, "text": "' + b"x" * (5 << 20)
    path = tmp_path / "events.jsonl"
    path.write_bytes(ok + huge)
    events = JsonlSource(path, tmp_path / "state", follow=True, idle_exit_s=5.0).events()
    assert next(events) == (len(ok), ok)
    assert next(events) is None  # the long line's end is not written yet
    with open(path, "ab") as f:
        f.write(b'"}}\n' + ok)
    end = len(ok) + len(huge) + 4
    assert next(events) == (end, OVERSIZE)
    assert next(events) == (end + len(ok), ok)
    with pytest.raises(BadEvent, match="at most 2,097,152 bytes"):
        parse_event(OVERSIZE)
    with pytest.raises(BadEvent, match="at most"):
        parse_event(b" " * (MAX_EVENT_BYTES + 1))  # a Redis entry's field, as long

    read_end, write_end = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(write_end, ok + huge + b"\n" + ok), os.close(write_end)))
    writer.start()
    with os.fdopen(read_end, "rb") as stream:
        lines = [item for item in StdinSource(stream, tmp_path / "stdin").events() if item is not None]
    writer.join()
    assert lines == [(1, ok), (2, OVERSIZE), (3, ok)]


def test_an_event_nested_too_deeply_for_the_parser_is_a_bad_event_not_a_crash() -> None:
    with pytest.raises(BadEvent, match="nested too deeply"):
        parse_event(b"[" * 100_000)
    with pytest.raises(BadEvent, match="nested too deeply"):
        parse_event(b'{"type": "create", "post": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001)


@pytest.mark.parametrize("ts", ["1" + "0" * 400, "-1", "NaN", "Infinity", "true", '"yesterday"', "4294967296"])
def test_a_time_that_is_not_unix_seconds_is_refused_for_every_event_type(ts: str) -> None:
    """A ts no float holds (10**400) used to pass a create or delete event and then crash the
    ingester's lag arithmetic after the window was written."""
    for event in ('{"type": "delete", "post_id": 1', '{"type": "create", "post": {"id": 1}'):
        with pytest.raises(BadEvent, match="ts must be unix seconds"):
            parse_event(f'{event}, "ts": {ts}}}'.encode())
    assert parse_event(b'{"type": "delete", "post_id": 1, "ts": 1700000000.5}').ts == 1700000000.5


def test_an_event_with_a_key_twice_is_refused_not_read_as_either() -> None:
    """Python keeps a key's last value, other parsers its first: this create-then-delete was applied
    as a delete of post 3, and the counter counted likes for whichever post_id came last."""
    for line in (
        b'{"type": "create", "type": "delete", "post_id": 3, "post": {"id": 4}}',
        b'{"type": "create", "post": {"id": 1, "id": 2}}',
        b'{"type": "engage", "member_id": 1, "post_id": 5, "post_id": 6}',
    ):
        with pytest.raises(BadEvent, match="duplicate key"):
            parse_event(line)


def _read_all(source: JsonlSource) -> list[bytes]:
    lines = [item for item in source.events() if item is not None]
    if lines:
        source.commit([position for position, _ in lines])
    return [line for _, line in lines]


def test_a_file_truncated_or_replaced_since_its_offset_was_committed_is_refused_by_name(tmp_path: Path) -> None:
    """The offset committed in one file means nothing in another: reading on from it skipped the new
    file's events without a word, or began in the middle of one."""
    events = tmp_path / "events.jsonl"
    first = b"".join(b'{"type": "delete", "post_id": %d}\n' % i for i in range(20))
    events.write_bytes(first)
    assert len(_read_all(JsonlSource(events, tmp_path / "state"))) == 20
    events.write_bytes(first + b'{"type": "delete", "post_id": 20}\n')  # appended to: read on
    assert _read_all(JsonlSource(events, tmp_path / "state")) == [b'{"type": "delete", "post_id": 20}\n']
    events.write_bytes(b'{"type": "delete", "post_id": 100}\n')  # rotated: a new, shorter file
    with pytest.raises(SourceChanged, match="fewer than the offset"):
        _read_all(JsonlSource(events, tmp_path / "state"))
    events.write_bytes(first.replace(b"post_id", b"post_ID") + b"\n" * 100)  # as long, other content
    with pytest.raises(SourceChanged, match="first 704 bytes are not those"):
        _read_all(JsonlSource(events, tmp_path / "state"))
    (tmp_path / "state" / "offset.json").unlink()  # what the message says to do: read it from its start
    assert len(_read_all(JsonlSource(events, tmp_path / "state"))) == 20


def test_a_followed_file_truncated_under_the_reader_stops_it_by_name(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_bytes(b'{"type": "delete", "post_id": 1}\n' * 3)
    items = JsonlSource(events, tmp_path / "state", follow=True, idle_exit_s=30).events()
    assert [next(items) for _ in range(3)][-1] is not None
    assert next(items) is None  # waiting for more
    events.write_bytes(b"")  # copytruncate
    with pytest.raises(SourceChanged, match="truncated below offset"):
        for _ in range(100):  # bounded: raises at the next idle check
            next(items)


def test_the_stats_keep_a_bounded_window_of_lags() -> None:
    """One float per event for as long as a followed stream ran: a job up for weeks grew without end."""
    stats = Stats()
    stats.lags_s.extend(float(i) for i in range(MAX_LAGS + 5000))
    assert len(stats.lags_s) == MAX_LAGS and stats.lags_s[0] == 5000.0
    assert f"(the latest {MAX_LAGS:,} events)" in stats.line()
