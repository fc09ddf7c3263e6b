"""Nearline ingestion: post events -> `embed_post` -> `index_write` (engagements -> `engage_write`),
in time windows, resumable.

    python -m feedserve.clients.ingest --events events.jsonl --state runs/ingest [--follow] [--window-ms 200]
    python -m feedserve.clients.ingest --redis redis://127.0.0.1:6379/0 --stream post-events --state runs/ingest

One JSON event per line (or per Redis Stream entry, in its `event` field):

    {"type": "create" | "update", "post": {...a post record...}, "ts": 1700000000.5}
    {"type": "counts", "post_id": 7, "counts": {"views": 1200, "likes": 40}}   # new engagement
    {"type": "delete", "post_id": 7}
    {"type": "engage", "member_id": 3, "post_id": 7, "action": "like", "ts": 1700000001}  # who engaged

An engage event is logged through `engage_write` when its action is an engagement
(`feedserve.rank.engagements.coengaged`: a like, love, comment, share, repost or save, a rating of 4
or more; a view, a click, a dislike or a low rating is counted and not logged), so the ranker's
co-engagement reads it within seconds instead of at the next build (feedserve.rank.engagements).
Its `ts` is when the member engaged (now when left out). It does not change the post's counts:
`counts` events carry those (feedserve.clients.counter makes them from the same engage events).
A server without `engage_write` (no ranker) has them counted as unserved.

Events are gathered for up to `window_s` (or `max_batch` events), folded per post (the last event
of a post in a window wins; new counts are merged into the post's last known record, and the
server's preprocess turns them into percentile tokens with the saved buckets), embedded through
`embed_post` in one batch, and written through `index_write`. Only once the index has acknowledged
the writes (they are in its fsynced log) is the batch committed: its end offset saved atomically in
the state directory, or its stream entries acknowledged (XACK) in the consumer group. A restart
resumes there (a Redis consumer first takes back its delivered, unacknowledged entries). Events
between the saved offset and a crash are processed again; writes are idempotent (an upsert puts the
same vector, a delete of a deleted post is a
no-op), so the index ends the same as if nothing had happened: no gaps, and no duplicated posts.

A bad event (malformed JSON, a key twice in one object, an unknown type, an invalid post, counts for
a post never seen, a line over MAX_EVENT_BYTES, 2 MiB, read to its end without being kept) is logged
with its line's offset, counted, and skipped; the rest of its window goes on. An events file
truncated or replaced since its offset was committed is refused by name (`SourceChanged`): the
offset means nothing in another file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import queue
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
from pydantic import ValidationError

from feedserve.artifacts import default_artifacts_dir
from feedserve.clients.online import FeedClient, records_tensor
from feedserve.errors import ClientError
from feedserve.files import atomic_write
from feedserve.ops.keys import WRITE_KEY_ENV, WRITE_KEY_FILE, write_key
from feedserve.prompt.records import MAX_RECORD_BYTES, Post, RecordError, parse_json
from feedserve.rank.engagements import MAX_TIME, coengaged
from feedserve.schema import (
    LSN,
    MAX_BATCH,
    OP,
    OP_DELETE,
    OP_UPSERT,
    POST_ID,
    WRITE_EMBEDDING,
    WRITE_RECORDS,
    ModelName,
)

logger = logging.getLogger(__name__)

MAX_LAGS = 100_000  # event lags kept for the stats' p50 / p99
HEAD_BYTES = 4096  # of an events file's start, hashed with its committed offset
_READ_ANEW = (
    "To read the file there now from its start, move the offset file away (a rotated file: follow the new one)."
)
MAX_ACTION = 64  # characters of an engage event's action
POST_EVENTS = "post-events"  # the Redis Stream the ingester reads by default (the counter writes to it)
MAX_ID = (1 << 63) - 1  # ids are int64
# The longest event a source reads: a post record at its limit, room to spare for the event around
# it. A longer line is read to its end without being kept and stands as one bad event (OVERSIZE).
MAX_EVENT_BYTES = 2 * MAX_RECORD_BYTES
OVERSIZE = b"<an event longer than MAX_EVENT_BYTES, not kept>"


class BadEvent(ClientError, ValueError):
    """An event that cannot be applied; the message says why."""


@dataclass
class Event:
    kind: str
    post_id: int
    post: Post | None = None
    counts: dict[str, float] | None = None
    ts: float | None = None
    member_id: int | None = None  # engage events: who
    action: str | None = None  # engage events: what they did
    engaged: bool = False  # engage events: whether the action is an engagement (logged) or not


def _id(data: dict[str, Any], key: str) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadEvent(f"{key} must be an integer")
    if not 0 <= value <= MAX_ID:
        raise BadEvent(f"{key} must be in [0, {MAX_ID}], got {value}")
    return value


def parse_event(line: bytes) -> Event:
    if line == OVERSIZE or len(line) > MAX_EVENT_BYTES:
        raise BadEvent(f"an event must be at most {MAX_EVENT_BYTES:,} bytes")
    try:
        # Strict, as records are read: an event with a key twice (`"type": "create", "type": "delete"`)
        # means two things, and a parser that kept the first would apply another event than this one.
        data = parse_json(line, "event")
    except RecordError as err:
        raise BadEvent(str(err)) from err
    if not isinstance(data, dict):
        raise BadEvent("an event must be a JSON object")
    kind, ts = data.get("type"), data.get("ts")
    if ts is not None and (not isinstance(ts, int | float) or isinstance(ts, bool) or not 0 <= ts <= MAX_TIME):
        # Every event's: an engagement's is logged, and the lag is taken from any (10**400 overflows).
        raise BadEvent(f"ts must be unix seconds in [0, {MAX_TIME}]")
    try:
        if kind in ("create", "update"):
            post = Post.model_validate(data.get("post"))
            return Event(kind, post.id, post=post, ts=ts)
        if kind == "engage":
            action = data.get("action", "like")
            if not isinstance(action, str) or not action.strip() or len(action) > MAX_ACTION:
                raise BadEvent(f"action must be a non-empty string of at most {MAX_ACTION} characters")
            member = _id(data, "member_id")
            return Event(kind, _id(data, "post_id"), ts=ts, member_id=member, action=action, engaged=coengaged(action))
        if kind in ("delete", "counts"):
            post_id = _id(data, "post_id")
            counts = None
            if kind == "counts":
                # Validated the way a post's counts are: finite, non-negative numbers.
                counts = Post.model_validate({"id": post_id, "counts": data.get("counts")}).counts
            return Event(kind, post_id, counts=counts, ts=ts)
    except ValidationError as err:
        raise BadEvent(f"invalid {kind} event: {err.errors()[0]['loc']}: {err.errors()[0]['msg']}") from err
    raise BadEvent(f"unknown event type {kind!r} (create, update, counts, delete, engage)")


class PostStore:
    """The last known record of every live post (counts events need the rest of the post)."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path)
        self.db.execute("CREATE TABLE IF NOT EXISTS posts (id INTEGER PRIMARY KEY, record TEXT NOT NULL)")

    def get(self, post_id: int) -> Post | None:
        row = self.db.execute("SELECT record FROM posts WHERE id = ?", (post_id,)).fetchone()
        return Post.model_validate_json(row[0]) if row else None

    def apply(self, upserts: dict[int, Post], deletes: set[int]) -> None:
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO posts VALUES (?, ?)",
                [(i, p.model_dump_json(exclude_none=True)) for i, p in upserts.items()],
            )
            self.db.executemany("DELETE FROM posts WHERE id = ?", [(i,) for i in deletes])


@dataclass
class Stats:
    events: int = 0
    bad: int = 0
    upserts: int = 0
    deletes: int = 0
    engagements: int = 0  # logged through engage_write (engage events whose action is an engagement)
    unserved: int = 0  # engagements dropped: the server has no engage_write (no ranker)
    batches: int = 0
    seconds: float = 0.0
    # The latest events' lags (a job that runs for weeks keeps a bounded window, not one per event).
    lags_s: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_LAGS))

    def line(self) -> str:
        lag = (
            f", lag p50 {np.percentile(self.lags_s, 50):.2f} s p99 {np.percentile(self.lags_s, 99):.2f} s"
            f" (the latest {len(self.lags_s):,} events)"
            if self.lags_s
            else ""
        )
        rate = self.events / self.seconds if self.seconds else 0.0
        return (
            f"{self.events} events ({self.bad} bad) in {self.batches} batches: {self.upserts} upserts, "
            f"{self.deletes} deletes, {self.engagements} engagements ({self.unserved} unserved), "
            f"{rate:.1f} events/s{lag}"
        )


class EventSource(Protocol):
    """Where events come from: `events()` yields (position, event bytes), or None while waiting
    (so a window can close on time), and ends when the source is exhausted; `commit(position)`
    records that everything up to that position is in the index."""

    def events(self) -> Iterator[tuple[Any, bytes] | None]: ...

    def commit(self, positions: list[Any]) -> None: ...


class SourceChanged(Exception):
    """The events file is not the one its committed offset was read in (truncated, rotated, replaced):
    reading on would skip its events or start in the middle of one, so the job stops and says so."""


class JsonlSource:
    """A JSONL file (or a growing one, with `follow`); the position is a byte offset, committed to
    `offset.json` in the state directory (fsync + rename) with a hash of the file's first bytes, so
    that a file truncated or replaced since is refused by name (`SourceChanged`) instead of read
    from an offset that means nothing in it."""

    def __init__(self, path: Path, state_dir: Path, follow: bool = False, idle_exit_s: float | None = None) -> None:
        self.path, self.follow, self.idle_exit_s = Path(path), follow, idle_exit_s
        state_dir.mkdir(parents=True, exist_ok=True)
        self.offset_path = state_dir / "offset.json"
        self._head: tuple[int, str] | None = None  # (bytes, sha256) of the file's start, as last committed

    @property
    def offset(self) -> int:
        return _read_position(self.offset_path, "offset")

    def events(self) -> Iterator[tuple[int, bytes] | None]:
        committed = json.loads(self.offset_path.read_text()) if self.offset_path.exists() else {}
        offset = int(committed.get("offset", 0))
        with open(self.path, "rb") as source:
            size = os.fstat(source.fileno()).st_size
            if offset > size:
                raise SourceChanged(
                    f"{self.path} holds {size} bytes, fewer than the offset {offset} committed in "
                    f"{self.offset_path}: it was truncated or replaced since. {_READ_ANEW}"
                )
            if "head_bytes" in committed:  # (an offset committed before heads were kept has none)
                n = int(committed["head_bytes"])
                if hashlib.sha256(source.read(n)).hexdigest() != committed.get("head_sha256"):
                    raise SourceChanged(
                        f"{self.path}: its first {n} bytes are not those of the file read up to offset {offset} "
                        f"(committed in {self.offset_path}): it was replaced since. {_READ_ANEW}"
                    )
            source.seek(offset)
            yield from _lines(source, offset, self.follow, self.idle_exit_s)

    def commit(self, positions: list[Any]) -> None:
        offset = positions[-1]
        n = min(offset, HEAD_BYTES)
        if self._head is None or self._head[0] != n:  # read again until the head is whole, then kept
            with open(self.path, "rb") as f:
                self._head = (n, hashlib.sha256(f.read(n)).hexdigest())
        atomic_write(self.offset_path, json.dumps({"offset": offset, "head_bytes": n, "head_sha256": self._head[1]}))


class StdinSource:
    """Events piped in: the position is the number of lines read, committed like a file's offset.
    A restart fed the same stream again skips the lines already committed."""

    def __init__(self, stream: IO[bytes], state_dir: Path) -> None:
        self.stream = stream
        state_dir.mkdir(parents=True, exist_ok=True)
        self.offset_path = state_dir / "stdin_lines.json"

    @property
    def lines_done(self) -> int:
        return _read_position(self.offset_path, "lines")

    def events(self) -> Iterator[tuple[int, bytes] | None]:
        # A thread reads the pipe, so that while it is quiet this yields None and a window can close.
        lines: queue.Queue[bytes | None] = queue.Queue(maxsize=4096)
        threading.Thread(target=_pump, args=(self.stream, lines), name="stdin-events", daemon=True).start()
        skip, number = self.lines_done, 0
        while True:
            try:
                line = lines.get(timeout=0.05)
            except queue.Empty:
                yield None
                continue
            if line is None:
                return
            number += 1
            if number > skip and line.strip():
                yield number, line

    def commit(self, positions: list[Any]) -> None:
        atomic_write(self.offset_path, json.dumps({"lines": positions[-1]}))


class RedisSource:
    """A Redis Stream read through a consumer group; an entry's `event` field is one JSON event.
    Entries are acknowledged (XACK) only once the index has them; a restarted consumer first
    takes its own pending (delivered, never acknowledged) entries again, then new ones. With
    `claim_idle_s` it also takes over those a consumer that never came back left pending."""

    def __init__(
        self,
        url: str,
        stream: str,
        group: str = "feedserve",
        consumer: str = "ingester-1",
        idle_exit_s: float | None = None,
        block_ms: int = 100,
        claim_idle_s: float | None = None,
    ) -> None:
        import redis

        self.redis = redis.Redis.from_url(url)
        self.stream, self.group, self.consumer = stream, group, consumer
        self.idle_exit_s, self.block_ms, self.claim_idle_s = idle_exit_s, block_ms, claim_idle_s
        try:
            self.redis.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    def _read(self, start: str | bytes) -> list[tuple[bytes, dict[bytes, bytes]]]:
        reply: Any = self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: start}, count=256, block=self.block_ms if start == ">" else None
        )
        return reply[0][1] if reply else []

    def _claim(self) -> None:
        """Take over the entries other consumers of the group were given and left unacknowledged
        for `claim_idle_s` (an ingester that died for good): they join this consumer's pending."""
        start: str | bytes = "0-0"
        while True:
            # Not justid: redis-py then returns the claimed ids without the cursor this loop needs.
            reply: Any = self.redis.xautoclaim(
                self.stream, self.group, self.consumer, int((self.claim_idle_s or 0) * 1000), start_id=start, count=256
            )
            if reply[1]:
                logger.info("ingest: claimed %d idle entries from other consumers", len(reply[1]))
            start = reply[0]
            if start in (b"0-0", "0-0"):
                return

    def events(self) -> Iterator[tuple[bytes, bytes] | None]:
        if self.claim_idle_s is not None:
            self._claim()
        # Entries delivered to this consumer before a crash and never acknowledged, all of them,
        # in pages: a read from an id returns the pending entries after it.
        last: str | bytes = "0"
        while pending := self._read(last):
            for entry_id, fields in pending:
                yield entry_id, fields.get(b"event", b"")
            last = pending[-1][0]
        idle_since = time.monotonic()
        while True:
            entries = self._read(">")
            for entry_id, fields in entries:
                yield entry_id, fields.get(b"event", b"")
            if entries:
                idle_since = time.monotonic()
            elif self.idle_exit_s is not None and time.monotonic() - idle_since >= self.idle_exit_s:
                return
            else:
                yield None

    def commit(self, positions: list[Any]) -> None:
        self.redis.xack(self.stream, self.group, *positions)


class Ingester:
    def __init__(
        self, client: FeedClient, state_dir: Path, window_s: float = 0.2, max_batch: int = 64, retry_s: float = 120.0
    ) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.client, self.window_s, self.max_batch, self.retry_s = client, window_s, max_batch, retry_s
        self.store = PostStore(state_dir / "posts.sqlite")
        self.stats = Stats()
        self._engage_write: bool | None = None  # whether the server serves engage_write, once asked

    def run(self, source: EventSource) -> Stats:
        """Ingest from where the source last committed; returns when the source ends."""
        start = time.perf_counter()
        for batch in windows(source.events(), self.window_s, self.max_batch):
            if batch:
                self._process(batch)
                source.commit([position for position, _ in batch])  # only now: the index has them all
                self.stats.seconds = time.perf_counter() - start
        logger.info("ingest: %s", self.stats.line())
        return self.stats

    def _process(self, lines: list[tuple[Any, bytes]]) -> None:
        upserts: dict[int, Post] = {}
        deletes: set[int] = set()
        engagements: list[tuple[int, int, int]] = []
        stamps: list[float] = []
        for offset, line in lines:
            self.stats.events += 1
            try:
                event = parse_event(line)
                if event.kind == "engage":
                    if event.engaged:
                        assert event.member_id is not None
                        at = int(event.ts if event.ts is not None else time.time())
                        engagements.append((event.member_id, event.post_id, at))
                else:
                    self._fold(event, upserts, deletes)
            except BadEvent as err:
                self.stats.bad += 1
                logger.warning("ingest: skipping the event at %s: %s", _position(offset), err)
                continue
            if event.ts is not None:
                stamps.append(event.ts)
        ids = list(upserts)
        if ids or deletes:
            try:
                self._retrying(lambda: self._write(upserts, deletes))
            except ClientError as err:
                if not err.refused or err.forbidden:  # no post's fault: stop without committing
                    raise
                # The server refused the window (a post it will not take): write the posts one by
                # one, so the refused ones are skipped by name instead of blocking every restart.
                self._isolate(upserts, deletes)
        if engagements:  # after the posts: a like of a new post follows it
            logged: list[bool] = []
            self._retrying(lambda: logged.append(self._engage(engagements)))
            if not logged[-1]:
                self.stats.unserved += len(engagements)
                engagements = []
        self.store.apply(upserts, deletes)
        # Lag: from the event's time to its write being acknowledged, i.e. retrievable by any search.
        acknowledged = time.time()
        self.stats.lags_s.extend(acknowledged - ts for ts in stamps)
        self.stats.upserts += len(ids)
        self.stats.deletes += len(deletes)
        self.stats.engagements += len(engagements)
        self.stats.batches += 1

    def _engage(self, engagements: list[tuple[int, int, int]]) -> bool:
        """Log a window's engagements; False (dropped) when the server serves no engage_write. Asked
        at every try: a server that was not ready (a model loading) may turn out to serve none."""
        if self._engagements_served() is False:
            return False
        self.client.engage(engagements)
        return True

    def _engagements_served(self) -> bool | None:
        """Whether the server logs engagements (None: not known yet). A server without `engage_write`
        (the posts in Milvus, or no ranker) ranks with the build's co-engagement: its engage events
        are counted and dropped rather than stopping the ingester. Only a ready server's answer
        counts (with strict readiness every model it loaded is ready then), asked again to be sure:
        one unreachable, starting or reloading a stub is asked again with the next window."""
        if self._engage_write is None and self.client.ready():
            served = self.client.ready(ModelName.ENGAGE_WRITE)
            if served or self.client.ready():
                self._engage_write = served
                if not served:
                    logger.warning("ingest: the server has no engage_write: engage events are counted and dropped")
        return self._engage_write

    def _write(self, upserts: dict[int, Post], deletes: set[int]) -> None:
        """Write a window's posts, in requests of the rows the rendered models take (MAX_BATCH),
        whatever `--max-batch` is; a window is committed only once every one was acknowledged."""
        rows = [(OP_UPSERT, i) for i in upserts] + [(OP_DELETE, d) for d in sorted(deletes)]
        for start in range(0, len(rows), MAX_BATCH):
            self._write_rows(rows[start : start + MAX_BATCH], upserts)

    def _write_rows(self, rows: list[tuple[int, int]], upserts: dict[int, Post]) -> None:
        ids = [i for op, i in rows if op == OP_UPSERT]
        deleted = [i for op, i in rows if op == OP_DELETE]
        inputs: dict[str, np.ndarray] = {
            OP.name: np.array([op for op, _ in rows], np.int64)[:, None],
            POST_ID.name: np.array(ids + deleted, np.int64)[:, None],
            # Each row's record: where the posts live in Milvus, the ranker's features are stored from it.
            WRITE_RECORDS.name: records_tensor([upserts[i] for i in ids] + [{"id": d} for d in deleted]),
        }
        if ids:  # delete rows ride along with zero vectors, which the writer ignores
            embedded = self.client.embed_posts([upserts[i] for i in ids])
            inputs[WRITE_EMBEDDING.name] = np.concatenate(
                [embedded, np.zeros((len(deleted), embedded.shape[1]), np.float32)]
            )
        self.client.infer(ModelName.INDEX_WRITE, inputs, (LSN.name,))  # durable when this returns

    def _isolate(self, upserts: dict[int, Post], deletes: set[int]) -> None:
        for post_id in list(upserts):
            try:
                self._retrying(lambda: self._write({post_id: upserts[post_id]}, set()))  # noqa: B023 (called at once)
            except ClientError as err:
                if not err.refused:
                    raise  # an internal error is not the post's fault: stop without committing
                self.stats.bad += 1
                logger.warning("ingest: the server refused post %d: %s", post_id, err)
                del upserts[post_id]
        if deletes:
            self._retrying(lambda: self._write({}, deletes))

    def _retrying(self, write: Callable[[], object]) -> None:
        """A server that is down or restarting: try the same window again, with backoff, for up to
        `retry_s`; the window is committed only once a try succeeds (writes are idempotent)."""
        deadline, pause = time.monotonic() + self.retry_s, 0.2
        while True:
            try:
                write()
                return
            except ClientError as err:
                if not err.retryable or time.monotonic() + pause > deadline:
                    raise
                logger.warning("ingest: write failed (%s); retrying in %.1f s", err, pause)
                time.sleep(pause)
                pause = min(pause * 2, 5.0)

    def _fold(self, event: Event, upserts: dict[int, Post], deletes: set[int]) -> None:
        if event.kind == "delete":
            upserts.pop(event.post_id, None)
            deletes.add(event.post_id)
            return
        if event.kind == "counts":
            base = upserts.get(event.post_id) or (None if event.post_id in deletes else self.store.get(event.post_id))
            if base is None:
                raise BadEvent(f"counts for post {event.post_id}, which was never created (or was deleted)")
            post = base.model_copy(update={"counts": {**base.counts, **(event.counts or {})}})
        else:
            assert event.post is not None
            post = event.post
        deletes.discard(event.post_id)
        upserts[event.post_id] = post


def windows(
    events: Iterator[tuple[Any, bytes] | None], window_s: float, max_batch: int
) -> Iterator[list[tuple[Any, bytes]]]:
    """Windows of (position, event) from a source's `events()`: up to `max_batch` events, closed
    `window_s` after the first; an empty one whenever the source waits with no window open (a tick:
    a job's timed work runs on a quiet stream too); the last one as it stands when the source ends.
    The next window is read only once the caller is done with this one (it commits it first)."""
    batch: list[tuple[Any, bytes]] = []
    deadline = 0.0
    for item in events:
        if item is not None:
            if not batch:
                deadline = time.monotonic() + window_s
            batch.append(item)
        if batch and (len(batch) >= max_batch or time.monotonic() >= deadline):
            yield batch
            batch = []
        elif item is None and not batch:
            yield []
    if batch:
        yield batch


def _lines(
    source: IO[bytes], offset: int, follow: bool, idle_exit_s: float | None
) -> Iterator[tuple[int, bytes] | None]:
    """(offset past the line, line) for whole lines; None while following and waiting (so a
    window can close on time). A last line without its newline is not an event yet. A line longer
    than MAX_EVENT_BYTES is read to its end in pieces, none kept, and yields OVERSIZE."""
    idle_since = time.monotonic()
    long = 0  # bytes read so far of a line longer than any event
    while True:
        line = source.readline(MAX_EVENT_BYTES + 1)
        if long or len(line) > MAX_EVENT_BYTES:
            long += len(line)
            if line.endswith(b"\n"):
                offset, long = offset + long, 0
                idle_since = time.monotonic()
                yield offset, OVERSIZE
                continue
            if line:
                continue  # read on to its end
            # Its end is not written yet: wait where we are (its start is behind us, none of it kept).
        elif line.endswith(b"\n"):
            offset += len(line)
            idle_since = time.monotonic()
            if line.strip():
                yield offset, line
            continue
        elif line:  # a partial line: rewind and wait for the writer to finish it
            source.seek(offset)
        if not follow or (idle_exit_s is not None and time.monotonic() - idle_since >= idle_exit_s):
            return
        if os.fstat(source.fileno()).st_size < offset:  # truncated under us (copytruncate): never waits
            raise SourceChanged(f"{source.name} was truncated below offset {offset} while read. {_READ_ANEW}")
        yield None
        time.sleep(0.02)


def _pump(stream: IO[bytes], lines: queue.Queue[bytes | None]) -> None:
    while line := stream.readline(MAX_EVENT_BYTES + 1):
        if len(line) > MAX_EVENT_BYTES:  # read to its end, keeping none of it
            while not line.endswith(b"\n") and (line := stream.readline(MAX_EVENT_BYTES + 1)):
                pass
            line = OVERSIZE
        lines.put(line)
    lines.put(None)


def _read_position(path: Path, key: str) -> int:
    """A committed position written by `atomic_write`; 0 before the first commit."""
    return int(json.loads(path.read_text())[key]) if path.exists() else 0


def _position(position: Any) -> str:
    return f"stream entry {position.decode()}" if isinstance(position, bytes) else f"position {position}"


def add_source_arguments(p: argparse.ArgumentParser, what: str, stream: str, group: str, consumer: str) -> None:
    """The options naming where a job's events come from (`source_from_args`)."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--events", type=Path, help=f"a JSONL file of {what}, or - for standard input")
    source.add_argument("--redis", metavar="URL", help="a Redis server, e.g. redis://127.0.0.1:6379/0")
    p.add_argument("--stream", default=stream, help="with --redis: the stream's key")
    p.add_argument("--group", default=group, help="with --redis: the consumer group")
    p.add_argument("--consumer", default=consumer, help="with --redis: this consumer's name (keep it across restarts)")
    p.add_argument("--follow", action="store_true", help="with --events: keep reading as the file grows")
    p.add_argument(
        "--idle-exit-s",
        type=float,
        default=None,
        help="stop after this long without events (default: never, when following)",
    )


def source_from_args(args: argparse.Namespace, state: Path, claim_idle_s: float | None = None) -> EventSource:
    """The event source `add_source_arguments`' options name; a file's position is kept in `state`."""
    if args.redis:
        return RedisSource(
            args.redis, args.stream, args.group, args.consumer, args.idle_exit_s, claim_idle_s=claim_idle_s
        )
    if str(args.events) == "-":
        return StdinSource(sys.stdin.buffer, state)
    return JsonlSource(args.events, state, args.follow, args.idle_exit_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m feedserve.clients.ingest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_source_arguments(p, "post events", stream=POST_EVENTS, group="feedserve", consumer="ingester-1")
    p.add_argument(
        "--claim-idle-s",
        type=float,
        default=None,
        help="with --redis: take over entries other consumers left unacknowledged this long (a consumer gone for good)",
    )
    p.add_argument("--state", type=Path, required=True, help="where the offset and the post store live")
    p.add_argument("--url", default="127.0.0.1:8001", help="gRPC host:port of the server")
    p.add_argument(
        "--write-key",
        default=None,
        help=f"the server's write key (default: ${WRITE_KEY_ENV}, else {WRITE_KEY_FILE} in --artifacts)",
    )
    p.add_argument("--artifacts", type=Path, default=default_artifacts_dir(), help="where to find write.key")
    p.add_argument("--window-ms", type=float, default=200.0)
    p.add_argument("--max-batch", type=int, default=64)
    args = p.parse_args(argv)
    events = source_from_args(args, args.state, claim_idle_s=args.claim_idle_s)
    key = args.write_key or write_key(args.artifacts)
    with FeedClient(args.url, "grpc", timeout_s=60, write_key=key) as client:
        try:
            stats = Ingester(client, args.state, args.window_ms / 1000, args.max_batch).run(events)
        except SourceChanged as err:
            p.exit(2, f"error: {err}\n")
    print(stats.line(), flush=True)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sys.exit(main())
