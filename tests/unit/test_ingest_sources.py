"""Event sources of the ingester: a quiet pipe lets a window close (the source yields None while it
waits), and the committed position is where a restart begins."""

from __future__ import annotations

import os
import time
from pathlib import Path

from feedserve.clients.ingest import StdinSource


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
