"""Counting: what members did (engage events) -> each post's counts -> `counts` events for the ingester.

    python -m feedserve.clients.counter --events actions.jsonl --state runs/counter --out post-events.jsonl \\
        [--seed posts.jsonl] [--follow] [--flush-s 60]
    python -m feedserve.clients.counter --redis redis://127.0.0.1:6379/0 --stream actions \\
        --state runs/counter --out-stream post-events

The prompts and the ranker read a post's counts (views, likes, comments, shares; ratings and
mean_rating on MovieLens) as percentile tokens, and `counts` events carry them into the index
(feedserve.clients.ingest). This job makes those events from the stream of what members did, the
engage events the ingester reads:

    {"type": "engage", "member_id": 3, "post_id": 7, "action": "like", "ts": 1700000001}

Each event whose action is counted adds one to the post's count for it (`--count ACTION=COUNT`; by
default a view, like, comment and share of a feed, and a MovieLens rating, `rated 4.5`, which adds
to `ratings` and moves `mean_rating`); a `delete` event forgets the post's counts (engagements after
it count from zero); other actions and other event types pass by (a shared stream).
Every `flush_s` seconds, and when the source ends, each post whose counts changed is sent as one
`counts` event with its totals: absolute, so an event sent twice changes nothing. `--seed` starts
the counts from the corpus the index was built from (its records' counts), once, into an empty
store: the counts a build made are the base the stream adds to. An empty store without it is
refused (`--from-zero` for a corpus without counts): its first events would replace the build's
counts with a handful.

Exactly once: the counts and the position of the last event counted are committed in one SQLite
transaction, then the source is committed (its offset saved, or its Redis entries acknowledged). A
restart resumes from the source's position and skips what the store has counted already (positions
only grow within a source), so a crash anywhere neither loses nor counts twice an event. Which posts
still owe a `counts` event is stored with their counts and cleared only once the output has them
(fsynced, or added to the stream): a crash in between sends them again, which is harmless.

One process per stream: a post's counts must meet in one store. Beyond one node this is a stream
processor's job keyed by post (Flink, Kafka Streams) writing the same events; we do not write one.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sqlite3
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from feedserve.clients.ingest import (
    BadEvent,
    EventSource,
    SourceChanged,
    add_source_arguments,
    parse_event,
    source_from_args,
    windows,
)
from feedserve.prompt.records import rating_of, read_posts_jsonl

logger = logging.getLogger(__name__)

# A feed's counted actions (the synthetic LinkedIn-shaped log's: feedserve.training.feed_log).
DEFAULT_COUNTED = {"view": "views", "like": "likes", "comment": "comments", "share": "shares"}
RATINGS, MEAN_RATING = "ratings", "mean_rating"
_RATING_SUM = "rating_sum"  # stored, never sent: mean_rating is sent as rating_sum / ratings
MAX_RATING = 5.0  # MovieLens's stars; a rating outside [0, 5] would send a mean no record holds
FLUSH_ROWS = 1000  # counts events written (and marked sent) at a time


def position_order(position: Any) -> tuple[int, int]:
    """A source position as a comparable pair: a file offset or line number (n, 0), a Redis entry id
    `ms-seq` (ms, seq)."""
    if isinstance(position, int):
        return position, 0
    text = position.decode() if isinstance(position, bytes) else str(position)
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class CountStore:
    """Each post's counts, which posts owe a `counts` event, and the position counted through."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path)
        with self.db:
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS counts"
                " (post INTEGER, name TEXT, value REAL NOT NULL, PRIMARY KEY (post, name))"
            )
            self.db.execute("CREATE TABLE IF NOT EXISTS dirty (post INTEGER PRIMARY KEY)")
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS position (one INTEGER PRIMARY KEY, major INTEGER, minor INTEGER)"
            )

    def counted_through(self) -> tuple[int, int] | None:
        row = self.db.execute("SELECT major, minor FROM position").fetchone()
        return (int(row[0]), int(row[1])) if row else None

    def empty(self) -> bool:
        return self.db.execute("SELECT 1 FROM counts LIMIT 1").fetchone() is None and self.counted_through() is None

    def seed(self, counts: Mapping[int, Mapping[str, float]]) -> None:
        """Start from these totals (a post's record's counts); nothing is owed for them."""
        rows: list[tuple[int, str, float]] = []
        for post, named in counts.items():
            stored = dict(named)
            if MEAN_RATING in stored:
                stored[_RATING_SUM] = stored.pop(MEAN_RATING) * stored.get(RATINGS, 0.0)
            rows.extend((post, name, float(value)) for name, value in stored.items())
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO counts VALUES (?, ?, ?)", rows)

    def add(
        self, increments: Mapping[int, Mapping[str, float]], through: tuple[int, int], deleted: Iterable[int] = ()
    ) -> None:
        """Forget the posts `deleted` (their counts and any event they owed), then add a window's
        increments (those after a post's delete) and record its last position, in one transaction."""
        with self.db:
            gone = [(post,) for post in deleted]
            self.db.executemany("DELETE FROM counts WHERE post = ?", gone)
            self.db.executemany("DELETE FROM dirty WHERE post = ?", gone)
            self.db.executemany(
                "INSERT INTO counts VALUES (?, ?, ?)"
                " ON CONFLICT (post, name) DO UPDATE SET value = value + excluded.value",
                [(post, name, value) for post, named in increments.items() for name, value in named.items()],
            )
            self.db.executemany("INSERT OR IGNORE INTO dirty VALUES (?)", [(post,) for post in increments])
            self.db.execute("INSERT OR REPLACE INTO position VALUES (0, ?, ?)", through)

    def owed(self, limit: int) -> dict[int, dict[str, float]]:
        """Up to `limit` posts that owe a `counts` event, with their totals as sent."""
        posts = [row[0] for row in self.db.execute("SELECT post FROM dirty ORDER BY post LIMIT ?", (limit,))]
        return {post: self.totals(post) for post in posts}

    def totals(self, post: int) -> dict[str, float]:
        stored = {
            name: value for name, value in self.db.execute("SELECT name, value FROM counts WHERE post = ?", (post,))
        }
        rating_sum = stored.pop(_RATING_SUM, None)
        if rating_sum is not None and stored.get(RATINGS):
            stored[MEAN_RATING] = round(rating_sum / stored[RATINGS], 3)  # as MovieLens records carry it
        # A seed of 1e308 ratings overflows their sum: a count that is not a number is left out (the
        # ingester would refuse the event for good), and said.
        if not all(math.isfinite(value) for value in stored.values()):
            logger.warning("counter: post %d: counts that overflowed are not sent: %s", post, stored)
            stored = {name: value for name, value in stored.items() if math.isfinite(value)}
        return stored

    def sent(self, posts: Iterable[int]) -> None:
        with self.db:
            self.db.executemany("DELETE FROM dirty WHERE post = ?", [(post,) for post in posts])


class Sink(Protocol):
    """Where `counts` events go; `write` returns once they are durable there."""

    def write(self, events: list[dict[str, Any]]) -> None: ...


class JsonlSink:
    """Appended to a JSONL file (the ingester's `--events`, which it may be following), fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def write(self, events: list[dict[str, Any]]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(e) + "\n" for e in events))
            f.flush()
            os.fsync(f.fileno())


class RedisSink:
    """Added to a Redis Stream (the ingester's `--stream`), one entry per event in its `event` field."""

    def __init__(self, url: str, stream: str) -> None:
        import redis

        self.redis, self.stream = redis.Redis.from_url(url), stream

    def write(self, events: list[dict[str, Any]]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for event in events:
            pipe.xadd(self.stream, {"event": json.dumps(event)})
        pipe.execute()


@dataclass
class CounterStats:
    events: int = 0
    counted: int = 0
    passed: int = 0  # events of other types, or actions not counted
    bad: int = 0
    skipped: int = 0  # counted before a restart
    deleted: int = 0  # posts forgotten at their delete event
    sent: int = 0  # counts events written

    def line(self) -> str:
        return (
            f"{self.events} events ({self.bad} bad, {self.skipped} counted before): {self.counted} counted, "
            f"{self.deleted} deletes, {self.passed} passed by; {self.sent} counts events sent"
        )


class Counter:
    def __init__(
        self,
        store: CountStore,
        sink: Sink,
        counted: Mapping[str, str] | None = None,
        flush_s: float = 60.0,
        window_s: float = 0.2,
        max_batch: int = 4096,
    ) -> None:
        self.store, self.sink, self.flush_s = store, sink, flush_s
        self.counted = {a.strip().lower(): c for a, c in (DEFAULT_COUNTED if counted is None else counted).items()}
        self.window_s, self.max_batch = window_s, max_batch
        self.stats = CounterStats()
        self._through: tuple[int, int] | None = None  # the last position the store has counted

    def increments_of(self, action: str) -> dict[str, float]:
        rating = rating_of(action)
        if rating is not None:
            if not 0.0 <= rating <= MAX_RATING:
                raise BadEvent(f"a rating must be in [0, {MAX_RATING:g}], got {action!r}")
            return {RATINGS: 1.0, _RATING_SUM: rating}
        name = self.counted.get(action.strip().lower())
        return {name: 1.0} if name else {}

    def run(self, source: EventSource) -> CounterStats:
        """Count from where the source last committed, sending what changed every `flush_s` seconds
        (on a quiet stream too) and when the source ends."""
        self._through = self.store.counted_through()
        flushed = time.monotonic()
        for window in windows(source.events(), self.window_s, self.max_batch):
            if window:
                self._add(window)
                source.commit([position for position, _ in window])  # only now: the store has them
            if time.monotonic() - flushed >= self.flush_s:
                self.flush()
                flushed = time.monotonic()
        self.flush()
        logger.info("counter: %s", self.stats.line())
        return self.stats

    def _add(self, window: list[tuple[Any, bytes]]) -> None:
        """Count a window's events the store has not counted, and commit them with its last position."""
        increments: dict[int, dict[str, float]] = {}
        deleted: set[int] = set()
        for position, line in window:
            self.stats.events += 1
            if self._through is not None and position_order(position) <= self._through:
                self.stats.skipped += 1
                continue
            self._count(position, line, increments, deleted)
        last = position_order(window[-1][0])
        if self._through is None or last > self._through:
            self.store.add(increments, last, deleted)
            self._through = last

    def _count(self, position: Any, line: bytes, increments: dict[int, dict[str, float]], deleted: set[int]) -> None:
        try:
            event = parse_event(line)
            added = self.increments_of(event.action) if event.kind == "engage" and event.action else {}
        except BadEvent as err:
            self.stats.bad += 1
            logger.warning("counter: skipping the event at %s: %s", position, err)
            return
        if event.kind == "delete":
            # The store holds live posts' counts: a deleted post's would be kept forever (and a post
            # created again under its id would go on from them). Engagements after the delete count
            # from zero.
            increments.pop(event.post_id, None)
            deleted.add(event.post_id)
            self.stats.deleted += 1
            return
        if not added:
            self.stats.passed += 1
            return
        named = increments.setdefault(event.post_id, {})
        for name, value in added.items():
            named[name] = named.get(name, 0.0) + value
        self.stats.counted += 1

    def flush(self) -> None:
        """Send every post that owes a `counts` event its totals."""
        while owed := self.store.owed(FLUSH_ROWS):
            now = time.time()
            self.sink.write([{"type": "counts", "post_id": p, "counts": c, "ts": now} for p, c in owed.items()])
            self.store.sent(owed)
            self.stats.sent += len(owed)


def parse_counted(pairs: list[str]) -> dict[str, str]:
    """`ACTION=COUNT` options as a mapping; a malformed one is named."""
    out = {}
    for pair in pairs:
        action, sep, count = pair.partition("=")
        if not sep or not action.strip() or not count.strip():
            raise argparse.ArgumentTypeError(f"--count {pair!r}: expected ACTION=COUNT, e.g. like=likes")
        out[action.strip()] = count.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m feedserve.clients.counter",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_source_arguments(p, "engage events", stream="actions", group="feedserve-counter", consumer="counter")
    p.add_argument("--state", type=Path, required=True, help="where the counts and the source's position live")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", type=Path, help="a JSONL file the counts events are appended to")
    out.add_argument("--out-stream", help="with --redis: the Redis Stream the counts events are added to")
    p.add_argument("--seed", type=Path, help="a JSONL of post records whose counts start an empty store")
    p.add_argument(
        "--from-zero", action="store_true", help="start an empty store at 0 (a corpus whose posts have no counts)"
    )
    p.add_argument(
        "--count", action="append", default=[], metavar="ACTION=COUNT", help="a counted action (default: a feed's)"
    )
    p.add_argument("--flush-s", type=float, default=60.0, help="how often the changed counts are sent")
    args = p.parse_args(argv)
    if args.out_stream and not args.redis:
        p.error("--out-stream needs --redis")
    try:
        counted = parse_counted(args.count) if args.count else None
    except argparse.ArgumentTypeError as err:
        p.error(str(err))
    store = CountStore(args.state / "counts.sqlite")
    if store.empty():
        if args.seed:
            store.seed({post.id: post.counts for post in read_posts_jsonl(args.seed) if post.counts})
        elif not args.from_zero:  # its first counts events would replace the build's with a few
            p.error(f"{store.path} is empty: --seed the posts the index was built from, or --from-zero")
    sink: Sink = RedisSink(args.redis, args.out_stream) if args.out_stream else JsonlSink(args.out)
    try:
        stats = Counter(store, sink, counted, args.flush_s).run(source_from_args(args, args.state))
    except SourceChanged as err:
        p.exit(2, f"error: {err}\n")
    print(stats.line(), flush=True)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sys.exit(main())
