"""A LinkedIn-shaped impression log: what members were shown, and what they did with each post.

MovieLens has one kind of interaction, a rating. A professional feed has several, passive and
active, and a ranker predicts each of them: a click, a long dwell, a like, a comment, a share, or a
skip (scrolled past without stopping). They have different causes, which is why one multi-task
model with shared experts and a gate per task (MMoE) is built for them rather than one score:

- topic: members follow one main topic and a second one; every action is likelier on a post of
  theirs (a skip less likely);
- author: members follow a few authors; comments come mostly from followers (and from members who
  comment a lot), likes partly;
- format: a video or an article holds attention (long dwell), an article gets clicked;
- quality: a post's hidden quality drives shares most, likes and clicks less; the ranker sees it
  only through the post's counts so far (views, likes, comments, shares as percentiles);
- questions: a post that asks one draws comments.

Sessions are spread over TIMELINE_DAYS; in each the member is shown `shown` posts created before it
(the earlier stages' pick: mostly of the member's topics, recent and good ones first, with some
exploration), and each impression gets the actions drawn from those causes. Posts are created
throughout, so the newest ones have few counts and no history with anyone when first shown.

`FeedLog.cutoff` is the global time split: training reads what happened before it, evaluation the
sessions after it. Post records carry no counts (their text, author, format and tags are what the
encoder embeds: counts in the prompt would leak the future into a training moment); the counts as
they stood at any moment come from the log (`FeedLog.count_events`).

On disk a log is a directory of three JSON-lines files (`FeedLog.save`, `load_feed_log`), the
shape a real feed's log would be exported in: `posts.jsonl` (post records), `members.jsonl`
(member profiles, no history) and `impressions.jsonl` (member, post, time, actions). It is what
`feedserve build --corpus DIR` builds a feed ranker's serving tables from and `feedserve index
--corpus DIR` indexes. `python -m feedserve.training.feed_log --out DIR` writes the synthetic one,
with `requests.jsonl` beside it: every member's record as of the cutoff, a feed request each.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from feedserve.errors import RecordError
from feedserve.files import atomic_write
from feedserve.prompt.buckets import PercentileBuckets
from feedserve.prompt.records import (
    INT64_MAX,
    MAX_HISTORY,
    Author,
    Engagement,
    Member,
    Post,
    parse_json,
    parse_member,
    read_jsonl,
    read_posts_jsonl,
)
from feedserve.rank.coengagement import CoEngagement
from feedserve.rank.data import RankExample, member_interactions
from feedserve.rank.engagements import MAX_TIME, coengaged
from feedserve.rank.features import PostFeatures
from feedserve.training.data import FIRST, LAST, TOPICS

# The tasks, and the one action a history item is read as when a member took several (the
# strongest first): the ranker's history tokens are these actions.
FEED_TASKS = ("click", "long dwell", "like", "comment", "share", "skip")
STRONGEST_FIRST = ("share", "comment", "like", "long dwell", "click", "skip")
FORMATS = ("text", "article", "video", "image")
COUNTS = ("views", "likes", "comments", "shares")  # what the count features read, as percentiles
START = 1_700_000_000
TIMELINE_DAYS = 60
# Each post's time on the feed: shown only in the days after it was created.
FRESH_DAYS = 14


@dataclass(frozen=True)
class Impression:
    member: int
    post: int
    at: int  # unix seconds
    actions: frozenset[str]
    # The chance of each of FEED_TASKS the log drew the actions from: what no ranker can beat.
    chances: tuple[float, ...] = ()

    @property
    def action(self) -> str | None:
        """The strongest action taken (the history reads it), None for a post shown and passed over."""
        return next((a for a in STRONGEST_FIRST if a in self.actions), None)


@dataclass
class FeedLog:
    posts: list[Post]  # content only: no counts
    members: list[Member]  # profiles: no history
    impressions: list[Impression]  # in time order
    # The simulation's hidden truth (each post's topic), for tests; not part of a saved log.
    topic_of: dict[int, str] = field(default_factory=dict)

    def cutoff(self, test_fraction: float = 0.2) -> int:
        """The time after which the last `test_fraction` of the impressions fall (sessions are whole:
        a session's impressions share its time)."""
        times = np.array([i.at for i in self.impressions], np.int64)
        return int(np.quantile(times, 1.0 - test_fraction, method="higher"))

    def count_events(self) -> list[tuple[int, int, str]]:
        """(post, time, count) per impression and per action counted (`COUNTS`)."""
        named = {"like": "likes", "comment": "comments", "share": "shares"}
        events = []
        for i in self.impressions:
            events.append((i.post, i.at, "views"))
            events.extend((i.post, i.at, named[a]) for a in i.actions if a in named)
        return events

    def counts_before(self, moment: int) -> dict[int, dict[str, float]]:
        """Each post's counts (`COUNTS`, those it has) from the events before `moment`."""
        out: dict[int, dict[str, float]] = {}
        for post, time, count in self.count_events():
            if time < moment:
                counts = out.setdefault(post, {})
                counts[count] = counts.get(count, 0.0) + 1.0
        return out

    def count_buckets(self, moment: int) -> PercentileBuckets:
        """Percentile cut points of the posts' counts as they stood at `moment` (a count no post has
        yet: all at 0)."""
        counts = self.counts_before(moment).values()
        return PercentileBuckets.fit({c: [n[c] for n in counts if c in n] or [0.0] for c in COUNTS})

    def engagements(self, before: int | None = None) -> list[tuple[int, int, int]]:
        """(member, post, time) of each impression a co-engagement counts (a like, comment or share),
        those before `before` where given."""
        return [
            (i.member, i.post, i.at)
            for i in self.impressions
            if (before is None or i.at < before) and any(coengaged(a) for a in i.actions)
        ]

    def serving_tables(
        self, buckets: PercentileBuckets, counts: Sequence[str] = COUNTS
    ) -> tuple[PostFeatures, CoEngagement]:
        """What a ranker trained on this log serves with, as of the cutoff (the test period unseen, as
        in training): every post's `counts` as percentiles of `buckets` and its tags, and who engaged
        with each post."""
        cutoff = self.cutoff()
        held = self.counts_before(cutoff)
        posts = [p.model_copy(update={"counts": held.get(p.id, {})}) for p in self.posts]
        return PostFeatures.from_posts(posts, buckets, counts), CoEngagement.from_events(self.engagements(cutoff))

    def members_at(self, moment: int) -> list[Member]:
        """Every member's record as it stood at `moment`: the profile, and the posts acted on before
        it (oldest first, with the strongest action, skips included; the newest MAX_HISTORY)."""
        posts = {p.id: p for p in self.posts}
        acted: dict[int, list[Engagement]] = {}
        for i in self.impressions:
            if i.at < moment and i.action is not None:
                item = Engagement(post_id=i.post, engaged_at=i.at, action=i.action, post=posts[i.post])
                acted.setdefault(i.member, []).append(item)
        return [m.model_copy(update={"history": acted.get(m.id, [])[-MAX_HISTORY:]}) for m in self.members]

    def save(self, directory: Path) -> None:
        """The log's three files; the simulation's hidden truth (chances, topics) is not part of them."""
        directory.mkdir(parents=True, exist_ok=True)
        _write_lines(directory / POSTS_FILE, (p.model_dump_json(exclude_defaults=True) for p in self.posts))
        _write_lines(directory / MEMBERS_FILE, (m.model_dump_json(exclude_defaults=True) for m in self.members))
        _write_lines(
            directory / IMPRESSIONS_FILE,
            (
                json.dumps({"member": i.member, "post": i.post, "at": i.at, "actions": sorted(i.actions)})
                for i in self.impressions
            ),
        )


POSTS_FILE, MEMBERS_FILE, IMPRESSIONS_FILE = "posts.jsonl", "members.jsonl", "impressions.jsonl"
REQUESTS_FILE = "requests.jsonl"  # the synthetic log's members as of its cutoff (`main`)


def is_feed_log(directory: Path) -> bool:
    """Whether `directory` holds a saved log (rather than, say, MovieLens)."""
    return (directory / IMPRESSIONS_FILE).is_file()


def load_feed_log(directory: Path) -> FeedLog:
    """A saved log (`FeedLog.save`); a malformed line is named by file and line number."""
    posts = read_posts_jsonl(directory / POSTS_FILE)
    members = read_jsonl(directory / MEMBERS_FILE, parse_member, key=lambda member: member.id)
    post_ids, member_ids = {p.id for p in posts}, {m.id for m in members}

    def impression(line: bytes) -> Impression:
        row = parse_json(line, "impression")
        if not isinstance(row, dict) or set(row) != {"member", "post", "at", "actions"}:
            raise RecordError('impression: expected {"member", "post", "at", "actions"}')
        # As strict as what reads them later: ids are ints (never 1.9 or "12" read as one), a time is
        # unix seconds as the co-engagement table and engage_write take it.
        for name, most in (("member", INT64_MAX), ("post", INT64_MAX), ("at", MAX_TIME)):
            value = row[name]
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= most:
                raise RecordError(f"impression.{name}: {value!r} is not an integer in [0, {most}]")
        actions = row["actions"]
        if not isinstance(actions, list) or not all(isinstance(a, str) for a in actions):
            raise RecordError(f"impression.actions: {actions!r} is not a list of strings")
        i = Impression(row["member"], row["post"], row["at"], frozenset(actions))
        checks = (
            (i.actions <= set(FEED_TASKS), f"actions {sorted(i.actions)} not of {FEED_TASKS}"),
            (i.member in member_ids, f"member {i.member} not in {MEMBERS_FILE}"),
            (i.post in post_ids, f"post {i.post} not in {POSTS_FILE}"),
        )
        for holds, wrong in checks:
            if not holds:
                raise RecordError(wrong)
        return i

    impressions = read_jsonl(directory / IMPRESSIONS_FILE, impression)
    impressions.sort(key=lambda i: (i.at, i.member, i.post))
    return FeedLog(posts, members, impressions)


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    atomic_write(path, "".join(f"{line}\n" for line in lines))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def synthetic_impressions(
    n_members: int = 400,
    n_posts: int = 2000,
    n_authors: int = 60,
    sessions: int = 12,
    shown: int = 24,
    seed: int = 0,
) -> FeedLog:
    """A log of `n_members` x `sessions` sessions of `shown` impressions each (see the module)."""
    rng = np.random.default_rng(seed)
    topics = list(TOPICS)
    day = 86400
    # Authors write mostly on their own topic.
    author_topic = rng.integers(len(topics), size=n_authors)
    author_names = [f"{FIRST[a % len(FIRST)]} {LAST[(a // len(FIRST)) % len(LAST)]} {a}" for a in range(n_authors)]
    # Posts, created over the timeline (a few before it starts, so the first sessions have a feed).
    post_author = rng.integers(n_authors, size=n_posts)
    post_topic = np.where(
        rng.random(n_posts) < 0.85, author_topic[post_author], rng.integers(len(topics), size=n_posts)
    )
    post_format = rng.integers(len(FORMATS), size=n_posts)
    quality = rng.normal(size=n_posts)
    question = rng.random(n_posts) < 0.2
    created = START + rng.integers(-FRESH_DAYS * day, TIMELINE_DAYS * day, size=n_posts)
    posts, topic_of = [], {}
    for i in range(n_posts):
        topic = topics[post_topic[i]]
        words = rng.choice(TOPICS[topic], size=3, replace=False).tolist()
        text = (
            f"What is your take on {words[0]} and {words[1]} for {words[2]}?"
            if question[i]
            else f"Notes on {words[0]}, {words[1]} and {words[2]} from this week."
        )
        a = int(post_author[i])
        author = Author(
            name=author_names[a], headline=f"{topics[author_topic[a]]} lead", industry=topics[author_topic[a]]
        )
        pid = 50_000 + i
        posts.append(
            Post(
                id=pid,
                format=FORMATS[post_format[i]],
                text=text,
                author=author,
                tags=sorted({topic, *words[:2]}),
                created_at=int(created[i]),
            )
        )
        topic_of[pid] = topic
    # Members: a main topic and a second one, a few authors followed (most of the main topic), how
    # much they comment.
    main = rng.integers(len(topics), size=n_members)
    second = (main + rng.integers(1, len(topics), size=n_members)) % len(topics)
    follows = np.zeros((n_members, n_authors), bool)
    for m in range(n_members):
        own = np.flatnonzero(author_topic == main[m])
        pool = own if len(own) >= 3 and rng.random() < 0.8 else np.arange(n_authors)
        follows[m, rng.choice(pool, size=min(3, len(pool)), replace=False)] = True
    talkative = rng.normal(size=n_members)
    members = [
        Member(
            id=m,
            headline=f"{topics[main[m]]} professional",
            industry=topics[main[m]],
            skills=rng.choice(TOPICS[topics[main[m]]], size=2, replace=False).tolist()
            + rng.choice(TOPICS[topics[second[m]]], size=1).tolist(),
        )
        for m in range(n_members)
    ]
    impressions = []
    times = START + np.sort(rng.integers(0, TIMELINE_DAYS * day, size=(n_members, sessions)), axis=1)
    is_video, is_article = post_format == FORMATS.index("video"), post_format == FORMATS.index("article")
    for m in range(n_members):
        for at in times[m].tolist():
            live = np.flatnonzero((created < at) & (created >= at - FRESH_DAYS * day))
            if len(live) < shown:
                continue
            topical = 1.5 * (post_topic[live] == main[m]) + 0.6 * (post_topic[live] == second[m])
            fresh = (at - created[live]) / day
            pick = np.exp(topical + 0.4 * quality[live] - 0.1 * fresh)
            chosen = live[rng.choice(len(live), size=shown, replace=False, p=pick / pick.sum())]
            follow = follows[m, post_author[chosen]]
            interest = 1.5 * (post_topic[chosen] == main[m]) + 0.7 * (post_topic[chosen] == second[m]) - 1.0
            q = quality[chosen]
            draw = {
                "click": interest + 0.5 * q + 0.8 * is_article[chosen] - 2.0,
                "long dwell": interest + 1.3 * is_video[chosen] + 0.7 * is_article[chosen] + 0.3 * q - 2.4,
                "like": interest + 0.8 * q + 0.8 * follow - 2.4,
                "comment": 1.8 * follow + 1.5 * question[chosen] + 0.5 * interest + 0.7 * talkative[m] - 4.6,
                "share": 1.6 * q + 0.4 * interest - 4.6,
            }
            chance = {a: _sigmoid(x) for a, x in draw.items()}
            taken = {a: rng.random(shown) < p for a, p in chance.items()}
            engaged = np.logical_or.reduce(list(taken.values()))
            # A skip: passed over quickly, likelier the less the post is of the member's interests.
            skip = _sigmoid(0.5 - interest)
            taken["skip"] = ~engaged & (rng.random(shown) < skip)
            chance["skip"] = np.prod([1.0 - p for p in chance.values()], axis=0) * skip
            for j, post in enumerate(chosen.tolist()):
                actions = frozenset(a for a, did in taken.items() if did[j])
                odds = tuple(float(chance[t][j]) for t in FEED_TASKS)
                impressions.append(Impression(m, 50_000 + post, int(at), actions, odds))
    impressions.sort(key=lambda i: (i.at, i.member, i.post))
    return FeedLog(posts, members, impressions, topic_of)


def feed_examples(
    log: FeedLog,
    member_vectors: Callable[[Sequence[Member]], np.ndarray],
    post_ids: np.ndarray,
    post_vectors: np.ndarray,
    tasks: Sequence[str] = FEED_TASKS,
) -> list[RankExample]:
    """One example per session, in time order: the member's history before it (every impression
    they acted on, its strongest action, skips included), the session's impressions as the
    candidates, one label per task, and the retrieval stage's score of each (the member, embedded
    from their record as of the session by `member_vectors`, against the post's vector). The
    example reads counts and co-engagement as of the session."""
    posts = {p.id: p for p in log.posts}
    rows = {int(p): i for i, p in enumerate(np.asarray(post_ids).tolist())}
    profiles = {m.id: m for m in log.members}
    sessions: dict[tuple[int, int], list[Impression]] = {}
    for i in log.impressions:
        sessions.setdefault((i.at, i.member), []).append(i)
    acted: dict[int, list[Engagement]] = {}  # each member's history so far
    records, shown = [], []
    for (_, member), impressions in sorted(sessions.items()):
        history = acted.setdefault(member, [])
        records.append(profiles[member].model_copy(update={"history": list(history[-MAX_HISTORY:])}))
        shown.append(impressions)
        history.extend(
            Engagement(post_id=i.post, engaged_at=i.at, action=i.action, post=posts[i.post])
            for i in impressions
            if i.action is not None
        )
    vectors = member_vectors(records)
    examples = []
    for record, impressions, member in zip(records, shown, vectors, strict=True):
        candidates = np.array([i.post for i in impressions], np.int64)
        content = np.stack([post_vectors[rows[c]] for c in candidates.tolist()])
        examples.append(
            RankExample(
                record.id,
                member_interactions(record),
                member,
                candidates,
                (content @ member).astype(np.float32),
                np.array([[float(t in i.actions) for t in tasks] for i in impressions], np.float32),
                impressions[0].at,
            )
        )
    return examples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the log's directory")
    p.add_argument("--members", type=int, default=400)
    p.add_argument("--posts", type=int, default=2000)
    p.add_argument("--sessions", type=int, default=12, help="sessions per member")
    p.add_argument("--shown", type=int, default=24, help="impressions per session")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    log = synthetic_impressions(args.members, args.posts, sessions=args.sessions, shown=args.shown, seed=args.seed)
    log.save(args.out)
    requests = log.members_at(log.cutoff())
    _write_lines(args.out / REQUESTS_FILE, (m.model_dump_json(exclude_defaults=True) for m in requests))
    print(f"wrote {len(log.posts)} posts, {len(log.members)} members, {len(log.impressions)} impressions to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
