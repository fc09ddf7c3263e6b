"""The counter (feedserve.clients.counter): how fast it turns engage events into counts events.

    .venv/bin/python -m benchmarks.counter [--events 1000000] [--posts 100000] [--windows 4096]

A JSONL file of engage events (views, likes, comments and shares, in the proportions below, over
`--posts` posts drawn by a Zipf law as a feed's attention is) is counted from a seeded store into a
JSONL file of counts events, as `python -m feedserve.clients.counter --events ... --out ...` does:
counting (parse, add, one SQLite commit per window of `--windows` events, the source's offset
saved), then the flush (one counts event per post that changed); then a restart over the same file
after its offset was lost, which reads every event again and counts none (what a crash costs); and
the store's size on disk. Machine and command are in the report (`benchmarks/reports/counter.md`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import write_report
from feedserve.clients.counter import Counter, CountStore, JsonlSink
from feedserve.clients.ingest import JsonlSource

logger = logging.getLogger(__name__)
REPORT = Path(__file__).parent / "reports"
# The share of each action among the events (a feed: mostly views).
ACTIONS = {"view": 0.85, "like": 0.1, "comment": 0.03, "share": 0.02}


def write_events(path: Path, events: int, posts: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    post = (rng.zipf(1.2, events) - 1) % posts
    member = rng.integers(0, 1_000_000, events)
    action = rng.choice(list(ACTIONS), events, p=list(ACTIONS.values()))
    with open(path, "w") as f:
        for p, m, a in zip(post.tolist(), member.tolist(), action.tolist(), strict=True):
            f.write(f'{{"type": "engage", "member_id": {m}, "post_id": {p}, "action": "{a}", "ts": 1700000000}}\n')


class TimedCounter(Counter):
    """A counter that keeps the time its flushes took."""

    flush_seconds = 0.0

    def flush(self) -> None:
        begin = time.perf_counter()
        super().flush()
        self.flush_seconds += time.perf_counter() - begin


def run(events: int, posts: int, window: int, tmp: Path) -> dict[str, Any]:
    actions, out, state = tmp / "actions.jsonl", tmp / "counts.jsonl", tmp / "state"
    write_events(actions, events, posts)
    store = CountStore(state / "counts.sqlite")
    store.seed({p: {"views": 100.0, "likes": 10.0} for p in range(posts)})
    counter = TimedCounter(store, JsonlSink(out), flush_s=float("inf"), max_batch=window)
    start = time.perf_counter()
    stats = counter.run(JsonlSource(actions, state))
    counting = time.perf_counter() - start - counter.flush_seconds
    (state / "offset.json").unlink()  # the source's position lost: every event is read again
    again = Counter(CountStore(state / "counts.sqlite"), JsonlSink(tmp / "again.jsonl"), max_batch=window)
    begin = time.perf_counter()
    replay = again.run(JsonlSource(actions, state))
    replay_s = time.perf_counter() - begin
    assert replay.skipped == events and replay.sent == 0
    return {
        "events": events,
        "posts": posts,
        "window": window,
        "counted": stats.counted,
        "posts_changed": stats.sent,
        "count_s": counting,
        "events_per_s": events / counting,
        "flush_s": counter.flush_seconds,
        "counts_events_per_s": stats.sent / counter.flush_seconds,
        "replay_s": replay_s,
        "replay_events_per_s": events / replay_s,
        "store_mb": (state / "counts.sqlite").stat().st_size / 1e6,
        "input_mb": actions.stat().st_size / 1e6,
    }


def markdown(report: dict[str, Any]) -> str:
    r = report["result"]
    return "\n".join(
        [
            "# The counter: engage events -> counts events",
            "",
            f"Command: `{report['command']}`",
            "",
            f"Machine: {report['machine']}",
            "",
            f"{r['events']:,} engage events ({r['input_mb']:.0f} MB of JSONL; "
            + ", ".join(f"{a} {s:.0%}" for a, s in ACTIONS.items())
            + f") over {r['posts']:,} posts (Zipf 1.2), counted from a store seeded with every post's counts, "
            f"one SQLite commit per window of {r['window']:,} events:",
            "",
            "| step | seconds | rate |",
            "|---|---|---|",
            f"| counting (parse, add, commit, offset) | {r['count_s']:.1f} | {r['events_per_s']:,.0f} events/s |",
            f"| the flush: a counts event per post changed ({r['posts_changed']:,}) | {r['flush_s']:.1f} | "
            f"{r['counts_events_per_s']:,.0f} counts events/s |",
            f"| a restart that lost its offset: every event read again, none counted | {r['replay_s']:.1f} | "
            f"{r['replay_events_per_s']:,.0f} events/s |",
            "",
            f"The store on disk: {r['store_mb']:.1f} MB.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    from feedserve.clients.perf import machine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--posts", type=int, default=100_000)
    p.add_argument("--windows", type=int, default=4096, help="events per window (one commit each)")
    p.add_argument("--out", type=Path, default=REPORT)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.events, args.posts, args.windows, Path(tmp))
    report = {
        "command": " ".join(["python -m benchmarks.counter", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "result": result,
    }
    write_report(args.out, "counter", report, markdown(report))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
