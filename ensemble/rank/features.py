"""What the ranker knows of a post besides its embedding: its counts as percentiles, and its tags.

Candidates reach the ranker as ids (the retrieval stage's answer), so these live in a table keyed
by post id, built from the post records (`feedserve build` writes one for the sample corpus as
`post_features.json`; the training command builds the same from the same records). A post missing
from the table (created after the table was built) gets percentiles 0 and no tags: it is still
ranked, by its content and whatever the history says.

A training example is a moment in the past, and the counts it reads are those of that moment: a
`CountLog` holds every engagement with its time and gives a post's counts as they stood before it,
as a request reads the counts stored before it (a post's count must not include the label the
example is trained on).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from feedserve.files import atomic_write
from feedserve.index.features import FeatureRows, Row, search_sorted
from feedserve.prompt.buckets import PercentileBuckets
from feedserve.prompt.records import Post

FORMAT = "feedserve.post_features/1"
# Counts shown to the ranker as percentiles 0..1 (the buckets the prompts use; MovieLens's counts).
COUNT_FEATURES = ("ratings", "mean_rating")


def feature_row(
    post: Post, buckets: PercentileBuckets | None, counts: Sequence[str] = COUNT_FEATURES
) -> dict[str, Any]:
    """One post's features as stored beside it: its counts as percentiles 0..1, and its tags."""
    top = (buckets.n_buckets - 1) if buckets is not None else 1
    return {
        "percentiles": [
            buckets.bucket(c, post.counts[c]) / top
            if buckets is not None and c in post.counts and c in buckets.cut_points
            else 0.0
            for c in counts
        ],
        "tags": sorted(set(post.tags)),
    }


class CountLog:
    """Each post's engagements (post id, time, value) in time order: its number of them and their
    mean value ("ratings" and "mean_rating" on MovieLens) as they stood before any moment, as
    percentiles of `buckets`."""

    # A post's row and an engagement's time in one sortable key (times are unix seconds, < 2^32).
    _SHIFT = 1 << 32

    def __init__(self, events: Iterable[tuple[int, int, float]], buckets: PercentileBuckets) -> None:
        rows = sorted(events)
        self._post_row: dict[int, int] = {}
        for p, _, _ in rows:
            self._post_row.setdefault(int(p), len(self._post_row))
        row = np.array([self._post_row[int(p)] for p, _, _ in rows], np.int64)
        time = np.array([t for _, t, _ in rows], np.int64)
        if len(time) and (time.min() < 0 or time.max() >= self._SHIFT):
            raise ValueError("count log: times must be unix seconds")
        self._keys = row * self._SHIFT + time
        self._starts = np.searchsorted(row, np.arange(len(self._post_row)))
        self._running = np.concatenate([[0.0], np.cumsum([v for _, _, v in rows])])
        self._buckets = buckets

    def percentiles(self, post_ids: Sequence[int], before: int, counts: Sequence[str]) -> np.ndarray:
        """[n, len(counts)] float32 0..1; 0 for a count with no engagement yet, and for a post the log
        does not hold."""
        rows = np.array([self._post_row.get(int(p), -1) for p in post_ids], np.int64)
        known = rows >= 0
        start = self._starts[rows[known]]
        end = np.searchsorted(self._keys, rows[known] * self._SHIFT + min(max(before, 0), self._SHIFT))
        n = (end - start).astype(np.float64)
        mean = np.round((self._running[end] - self._running[start]) / np.maximum(n, 1), 3)  # as the records hold it
        # (value, whether it is defined): a mean of no engagements is missing, as in a record's counts.
        values = {"ratings": (n, np.full(len(n), True)), "mean_rating": (mean, n > 0)}
        out = np.zeros((len(rows), len(counts)), np.float32)
        top = self._buckets.n_buckets - 1
        for j, name in enumerate(counts):
            if name in values and name in self._buckets.cut_points:
                value, defined = values[name]
                bucket = self._buckets.buckets(name, value) / top
                out[known, j] = np.where(defined, bucket, 0.0)
        return out


class EventCounts:
    """Each post's number of events of each kind (views, likes, comments, shares: a feed's counts, where
    CountLog holds MovieLens's ratings) as they stood before any moment, as percentiles of `buckets`."""

    _SHIFT = CountLog._SHIFT  # a post's row and an event's time in one sortable key

    def __init__(self, events: Iterable[tuple[int, int, str]], buckets: PercentileBuckets) -> None:
        rows = list(events)
        self._posts = np.unique(np.array([p for p, _, _ in rows], np.int64))
        time = np.array([t for _, t, _ in rows], np.int64)
        if len(time) and (time.min() < 0 or time.max() >= self._SHIFT):
            raise ValueError("event counts: times must be unix seconds")
        keys = np.searchsorted(self._posts, np.array([p for p, _, _ in rows], np.int64)) * self._SHIFT + time
        kinds = np.array([k for _, _, k in rows], dtype=object)
        # Per kind, the sorted keys: a post's events before a moment are one searchsorted run.
        self._keys = {str(k): np.sort(keys[kinds == k]) for k in set(kinds.tolist())}
        self._buckets = buckets

    def percentiles(self, post_ids: Sequence[int], before: int, counts: Sequence[str]) -> np.ndarray:
        """[n, len(counts)] float32 0..1; 0 for a post with no events of a kind yet, or none at all."""
        ids = np.asarray(post_ids, np.int64).reshape(-1)
        rows = search_sorted(ids, self._posts)
        known = rows >= 0
        start = rows[known] * self._SHIFT
        out = np.zeros((len(ids), len(counts)), np.float32)
        top = self._buckets.n_buckets - 1
        for j, name in enumerate(counts):
            keys = self._keys.get(name)
            if keys is None or name not in self._buckets.cut_points:
                continue
            n = np.searchsorted(keys, start + min(max(before, 0), self._SHIFT)) - np.searchsorted(keys, start)
            out[known, j] = np.where(n > 0, self._buckets.buckets(name, n.astype(np.float64)) / top, 0.0)
        return out


class CountHistory(Protocol):
    """Counts as they stood at a moment (CountLog, EventCounts)."""

    def percentiles(self, post_ids: Sequence[int], before: int, counts: Sequence[str]) -> np.ndarray: ...


class FeatureReader(Protocol):
    """What the ranker reads of posts' features (PostFeatures, or one overlaid with live rows)."""

    counts: tuple[str, ...]

    def percentiles(self, post_ids: Sequence[int], before: int | None = None) -> np.ndarray: ...

    def tag_union(self, post_ids: Sequence[int]) -> frozenset[str]: ...

    def affinity(self, post_ids: Sequence[int], liked: frozenset[str]) -> np.ndarray: ...


class PostFeatures:
    def __init__(
        self,
        percentiles: Mapping[int, Sequence[float] | np.ndarray] | None = None,
        tags: Mapping[int, Iterable[str]] | None = None,
        counts: Sequence[str] = COUNT_FEATURES,
        log: CountHistory | None = None,
        buckets: PercentileBuckets | None = None,
    ) -> None:
        """With a `log`, the counts can also be read as they stood at a moment (`percentiles`).
        `buckets`: the cut points the percentiles were read with, saved with the table so that a
        post written later (index_write) has its counts cut the same way."""
        self.counts = tuple(counts)
        self.log = log
        self.buckets = buckets
        width = len(self.counts)
        by_post = {int(k): np.asarray(v, np.float32) for k, v in (percentiles or {}).items()}
        for post, row in by_post.items():
            if row.shape != (width,):
                raise ValueError(f"post {post}: {row.shape[0] if row.ndim else 0} percentiles for {width} counts")
        names = {int(k): sorted(set(v)) for k, v in (tags or {}).items()}
        posts = sorted(by_post.keys() | names.keys())
        none = np.zeros(width, np.float32)
        # Held as the index's live rows are (float32 values, as the ranker reads them), read the same way.
        self._rows = FeatureRows.pack(
            np.array(posts, np.int64),
            np.array([by_post.get(p, none) for p in posts], np.float64).reshape(len(posts), width),
            [names.get(p, []) for p in posts],
        )

    def __len__(self) -> int:
        return len(self._rows.ids)

    @classmethod
    def from_posts(
        cls,
        posts: Iterable[Post],
        buckets: PercentileBuckets | None,
        counts: Sequence[str] = COUNT_FEATURES,
        log: CountHistory | None = None,
    ) -> PostFeatures:
        rows = {post.id: feature_row(post, buckets, counts) for post in posts}
        percentiles = {p: r["percentiles"] for p, r in rows.items()}
        return cls(percentiles, {p: r["tags"] for p, r in rows.items()}, counts, log, buckets)

    def overlay(self, live: FeatureRows) -> FeatureReader:
        """These features read through `live` rows (`feature_row`, stored with a post by the index):
        a post's well-formed live row speaks for it, else this table."""
        return OverlaidFeatures(self, live)

    def percentiles(self, post_ids: Sequence[int], before: int | None = None) -> np.ndarray:
        """[n, len(counts)]; zeros for a post the table does not hold. With `before` and a log, the
        counts as they stood then."""
        if not len(post_ids):
            return np.zeros((0, len(self.counts)), np.float32)
        if before is not None and self.log is not None:
            return self.log.percentiles(post_ids, before, self.counts)
        rows = self._rows.positions(np.asarray(post_ids, np.int64))
        out = np.zeros((len(rows), len(self.counts)), np.float32)
        out[rows >= 0] = self._rows.percentiles[rows[rows >= 0]]
        return out

    def tags(self, post_id: int) -> frozenset[str]:
        return self.tag_union([post_id])

    def tag_union(self, post_ids: Sequence[int]) -> frozenset[str]:
        rows = self._rows.positions(np.asarray(post_ids, np.int64))
        return self._rows.tag_union(rows[rows >= 0])

    def affinity(self, post_ids: Sequence[int], liked: frozenset[str]) -> np.ndarray:
        """[n] Jaccard similarity of each post's tags to `liked` (0 when both are empty, and for a
        post the table does not hold), vectorised: a ranker reads thousands of candidates per request."""
        rows = self._rows.positions(np.asarray(post_ids, np.int64))
        out = np.zeros(len(rows), np.float32)
        out[rows >= 0] = self._rows.affinity(rows[rows >= 0], liked)
        return out

    def save(self, path: Path) -> None:
        body: dict[str, Any] = {"format": FORMAT, "counts": list(self.counts)}
        if self.buckets is not None:
            body["buckets"] = json.loads(self.buckets.to_json())
        body["posts"] = {
            str(p): {"percentiles": list(r["percentiles"]), "tags": list(r["tags"])} for p, r in self._rows.items()
        }
        atomic_write(path, json.dumps(body, separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: Path) -> PostFeatures:
        data = _read(path)
        posts = data["posts"]
        return cls(
            {int(p): v["percentiles"] for p, v in posts.items()},
            {int(p): v["tags"] for p, v in posts.items()},
            data["counts"],
            buckets=_buckets(data),
        )


def saved_counts(path: Path) -> tuple[tuple[str, ...], PercentileBuckets | None]:
    """The counts a saved table holds and the cut points they were read with (None for a table
    saved without them), without building the table (the writer needs no more)."""
    data = _read(path)
    return tuple(data["counts"]), _buckets(data)


def _buckets(data: dict[str, Any]) -> PercentileBuckets | None:
    saved = data.get("buckets")
    return None if saved is None else PercentileBuckets.from_saved(saved, "a post feature table's buckets")


def _read(path: Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    return dict(data)


class OverlaidFeatures:
    """A table read through live rows, built per request: each read takes a post's live row where it
    has a well-formed one (as many percentiles as the table has counts) and the table's otherwise.
    The live rows are columns (`FeatureRows`), read as arrays: a request reads 2,200 posts, and
    every one of them may have a live row."""

    def __init__(self, table: PostFeatures, live: FeatureRows) -> None:
        self.table, self.counts = table, table.counts
        width = len(self.counts)
        # The columns, where their width is the table's, then the rows of other shapes that fit it
        # (ints, other keys: read as floats and names), into columns of their own.
        loose = {p: fit for p, row in live.others.items() if (fit := _loose(row, width)) is not None}
        parts = (live, FeatureRows.from_rows(loose)) if loose else (live,)
        self._parts = [rows for rows in parts if len(rows.ids) and rows.width == width]

    def _split(self, post_ids: Sequence[int]) -> tuple[np.ndarray, list[tuple[FeatureRows, np.ndarray, np.ndarray]]]:
        """(the posts without a live row, and for each part: where its posts are in `post_ids`, and
        their rows in it)."""
        ids = np.asarray(post_ids, np.int64).reshape(-1)
        rest = np.ones(len(ids), bool)
        found = []
        for part in self._parts:
            rows = part.positions(ids)
            at = np.flatnonzero((rows >= 0) & rest)
            rest[at] = False
            found.append((part, at, rows[at]))
        return rest, found

    def percentiles(self, post_ids: Sequence[int], before: int | None = None) -> np.ndarray:
        rest, found = self._split(post_ids)
        out = np.zeros((len(post_ids), len(self.counts)), np.float32)
        if rest.any():
            out[rest] = self.table.percentiles(np.asarray(post_ids, np.int64)[rest].tolist(), before)
        for part, at, rows in found:
            out[at] = part.percentiles[rows]
        return out

    def tag_union(self, post_ids: Sequence[int]) -> frozenset[str]:
        rest, found = self._split(post_ids)
        names = self.table.tag_union(np.asarray(post_ids, np.int64)[rest].tolist())
        return names.union(*(part.tag_union(rows) for part, _, rows in found))

    def affinity(self, post_ids: Sequence[int], liked: frozenset[str]) -> np.ndarray:
        """PostFeatures.affinity, a live row's tags in place of the table's."""
        rest, found = self._split(post_ids)
        out = np.zeros(len(post_ids), np.float32)
        if rest.any():
            out[rest] = self.table.affinity(np.asarray(post_ids, np.int64)[rest].tolist(), liked)
        for part, at, rows in found:
            out[at] = part.affinity(rows, liked)
        return out


def _loose(row: Row, width: int) -> dict[str, Any] | None:
    """A row of another shape as `feature_row`'s, when it has `width` numeric percentiles; else None."""
    values = dict(row)
    percentiles, tags = values.get("percentiles", ()), values.get("tags", ())
    if not isinstance(percentiles, list | tuple) or len(percentiles) != width or not isinstance(tags, list | tuple):
        return None
    try:
        return {"percentiles": [float(x) for x in percentiles], "tags": sorted({str(t) for t in tags})}
    except (TypeError, ValueError, OverflowError):
        return None
