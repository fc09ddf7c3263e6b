"""The posts' ranking features as the index holds them: columns, not a Python object per post.

What the ranker reads of a post besides its vector (`feedserve.rank.features.feature_row`: its
count percentiles, floats of one width, then its tags) is held by the post store as columns by
store row: a float64 matrix of percentiles and a matrix of tag ids into one vocabulary, -1 padding
the rows with fewer tags. A write, a delete's swap-remove, a request's read and a snapshot are
array operations. Held as a frozen tuple per post, a million posts' features cost 388 MB, a
collector-free but per-post Python read on every request, and a Python object per post to build
at every open and snapshot (benchmarks/reports/index_features.md). A row of any other shape
(another width, ints, other keys, more than MAX_TAGS tags) is kept as it came, as its pairs.

`FeatureRows` is what is read out: some posts' rows at one moment, the columns with their tags as
runs of ids (the layout a snapshot file stores, feedserve.index.snapshot) and the rows of other
shapes. It reads as a mapping of post id to row, as the rows were written.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np

# A row as written: a JSON object, or its (key, value) pairs (as the store holds a row of another
# shape: tuples drop out of the garbage collector's tracking, dicts never do).
FrozenRow = tuple[tuple[str, Any], ...]
Row = Mapping[str, Any] | FrozenRow

# Tags a row in the columns holds: the tag matrix is as wide as the row with most tags, for every
# post, so one post's many tags must not widen it for a million (a record carries up to 64).
MAX_TAGS = 16
# Tag names no row uses any more are dropped from the vocabulary (a stream of posts with new tags,
# deleted again, must not grow it for good) once it holds twice as many as after the last time, plus
# this many: a pass over the tag matrix, at most once per as many new names as are in use.
VOCABULARY_SLACK = 4096
COLUMNS = ("feature_ids", "feature_percentiles", "feature_tag_indptr", "feature_tags", "feature_vocabulary")


def freeze_row(row: Mapping[str, Any]) -> FrozenRow:
    """The row as its pairs; `dict()` of it reads it back, lists as tuples (and an object inside it
    as its pairs: the ranking features are flat)."""
    return tuple((str(k), _frozen(v)) for k, v in row.items())


def _frozen(value: Any) -> Any:
    if isinstance(value, Mapping):
        return freeze_row(value)
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def split_row(row: Row, width: int | None = None) -> tuple[tuple[float, ...], tuple[str, ...]] | None:
    """(percentiles, tags) of a row in `feature_row`'s shape (exactly those keys in that order,
    floats, `width` of them where given, and distinct strings), else None: such a row goes in the columns
    and reads back exactly as written; any other is kept as it came."""
    pairs = list(row.items()) if isinstance(row, Mapping) else list(row)
    if [k for k, _ in pairs] != ["percentiles", "tags"]:
        return None
    (_, percentiles), (_, tags) = pairs
    if (
        isinstance(percentiles, list | tuple)
        and (width is None or len(percentiles) == width)
        and all(type(x) is float for x in percentiles)
        and isinstance(tags, list | tuple)
        and all(isinstance(x, str) for x in tags)
        and len(set(tags)) == len(tags)  # a tag set: affinity counts each tag once
    ):
        return tuple(percentiles), tuple(tags)
    return None


def positions_of(wanted: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Where each of `wanted` is in `ids` (unique), -1 where absent."""
    order = np.argsort(ids)
    return search_sorted(wanted, ids[order], order)


def search_sorted(wanted: np.ndarray, sorted_ids: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """Where each of `wanted` is in `sorted_ids` (ascending, unique), -1 where absent; with `order`
    (the argsort that sorted them), its place in the ids before the sort."""
    wanted = np.asarray(wanted, np.int64).reshape(-1)
    if not len(sorted_ids):
        return np.full(len(wanted), -1, np.int64)
    at = np.minimum(np.searchsorted(sorted_ids, wanted), len(sorted_ids) - 1)
    return np.where(sorted_ids[at] == wanted, at if order is None else order[at], -1)


@dataclass(frozen=True, eq=False)
class FeatureRows(Mapping[int, Mapping[str, Any]]):
    """Some posts' features at one moment. Immutable: a reader keeps it while the store goes on."""

    ids: np.ndarray  # int64 [n]: the posts whose row is in the columns
    percentiles: np.ndarray  # float64 [n, width]
    indptr: np.ndarray  # int64 [n + 1]: row i's tags are tags[indptr[i] : indptr[i + 1]]
    tags: np.ndarray  # int32 ids into vocabulary
    vocabulary: Sequence[str]  # may name more tags than these rows use
    others: Mapping[int, Row] = field(default_factory=dict)  # the rows of other shapes, by post id

    @classmethod
    def empty(cls) -> FeatureRows:
        return cls(np.empty(0, np.int64), np.empty((0, 0)), np.zeros(1, np.int64), np.empty(0, np.int32), [])

    @classmethod
    def from_rows(cls, rows: Mapping[int, Row]) -> FeatureRows:
        """Rows by post id (empty ones: none): those of `feature_row`'s shape, in the width of the
        first of them, into the columns; the others as they are."""
        ids: list[int] = []
        percentiles: list[tuple[float, ...]] = []
        tags: list[tuple[str, ...]] = []
        others: dict[int, Row] = {}
        for post, row in rows.items():
            split = split_row(row, len(percentiles[0]) if percentiles else None) if row else None
            if split is not None:
                ids.append(int(post))
                percentiles.append(split[0])
                tags.append(split[1])
            elif row:
                others[int(post)] = row
        matrix = np.array(percentiles, np.float64).reshape(len(ids), len(percentiles[0]) if ids else 0)
        return cls.pack(np.array(ids, np.int64), matrix, tags, others)

    @classmethod
    def pack(
        cls,
        ids: np.ndarray,
        percentiles: np.ndarray,
        tags: Sequence[Sequence[str]],
        others: Mapping[int, Row] | None = None,
    ) -> FeatureRows:
        """Rows of these posts (unique), percentiles and tags, the tags numbered in sorted order."""
        vocabulary = sorted({t for names in tags for t in names})
        index = {t: i for i, t in enumerate(vocabulary)}
        return cls(
            ids,
            percentiles,
            np.concatenate([[0], np.cumsum([len(names) for names in tags])]).astype(np.int64),
            np.array([index[t] for names in tags for t in names], np.int32),
            vocabulary,
            dict(others or {}),
        )

    @classmethod
    def from_columns(cls, columns: Mapping[str, np.ndarray], others: Mapping[int, Row]) -> FeatureRows:
        """The rows a snapshot file stores (COLUMNS), checked to fit together (ValueError)."""
        ids, percentiles = columns["feature_ids"], columns["feature_percentiles"]
        indptr, tags = columns["feature_tag_indptr"], columns["feature_tags"]
        vocabulary = json.loads(columns["feature_vocabulary"].tobytes())
        if percentiles.ndim != 2 or len(percentiles) != len(ids) or indptr.shape != (len(ids) + 1,):
            raise ValueError("the feature columns do not have one row per post")
        if indptr[0] != 0 or indptr[-1] != len(tags) or (np.diff(indptr) < 0).any():
            raise ValueError("the tags' offsets do not cover the tags in order")
        if len(tags) and (tags.min() < 0 or tags.max() >= len(vocabulary)):
            raise ValueError("a tag id is outside the vocabulary")
        if not isinstance(vocabulary, list) or not all(isinstance(t, str) for t in vocabulary):
            raise ValueError("the tag vocabulary is not a list of names")
        if len(np.unique(ids)) != len(ids) or (others and others.keys() & set(ids.tolist())):
            raise ValueError("a post has two feature rows")
        return cls(
            ids.astype(np.int64),
            percentiles.astype(np.float64),
            indptr.astype(np.int64),
            tags.astype(np.int32),
            vocabulary,
            dict(others),
        )

    def columns(self) -> dict[str, np.ndarray]:
        """The columns as a snapshot file stores them (COLUMNS; {} when there are none): by post id,
        the vocabulary only the tags these rows use."""
        if not len(self.ids):
            return {}
        order = np.argsort(self.ids, kind="stable")
        entries, sizes = self._entries(order)
        used, tags = np.unique(self.tags[entries], return_inverse=True)
        names = [self.vocabulary[t] for t in used.tolist()]
        return {
            "feature_ids": self.ids[order],
            "feature_percentiles": self.percentiles[order],
            "feature_tag_indptr": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
            "feature_tags": tags.astype(np.int32).reshape(-1),
            "feature_vocabulary": np.frombuffer(json.dumps(names, ensure_ascii=False).encode(), np.uint8),
        }

    @property
    def width(self) -> int:
        return int(self.percentiles.shape[1])

    def positions(self, post_ids: np.ndarray) -> np.ndarray:
        """Each post's row in the columns, -1 where it has none there."""
        return search_sorted(post_ids, self._sorted_ids, self._order)

    def tag_union(self, positions: np.ndarray) -> frozenset[str]:
        """The names of the tags of the rows at `positions`."""
        entries, _ = self._entries(positions)
        return frozenset(self.vocabulary[t] for t in np.unique(self.tags[entries]).tolist())

    def affinity(self, positions: np.ndarray, liked: frozenset[str]) -> np.ndarray:
        """[len(positions)] Jaccard similarity of each row's tags to `liked` (0 when both are empty)."""
        entries, sizes = self._entries(positions)
        liked_ids = [self._tag_ids[t] for t in liked if t in self._tag_ids]
        hits = np.isin(self.tags[entries], liked_ids)
        inter = np.bincount(np.repeat(np.arange(len(sizes)), sizes), weights=hits, minlength=len(sizes))
        union = sizes + len(liked) - inter
        return np.where(union > 0, inter / np.maximum(union, 1), 0.0).astype(np.float32)

    def _entries(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(where the tags of the rows at `positions` are in `tags`, one run per row in that order;
        each row's number of them): only those rows are read, however many this holds."""
        positions = np.asarray(positions, np.int64)
        sizes = self.indptr[positions + 1] - self.indptr[positions]
        # Entry j of the i-th row asked for is tags[indptr[row] + j]: its place in the runs, shifted.
        shift = np.repeat(self.indptr[positions] - (np.cumsum(sizes) - sizes), sizes)
        return np.arange(int(sizes.sum())) + shift, sizes

    @cached_property
    def _order(self) -> np.ndarray:
        return np.argsort(self.ids, kind="stable")

    @cached_property
    def _sorted_ids(self) -> np.ndarray:
        return self.ids[self._order]

    @cached_property
    def _tag_ids(self) -> dict[str, int]:
        """The names of the tags these rows use (the vocabulary may be the store's, of any size)."""
        return {self.vocabulary[t]: t for t in np.unique(self.tags).tolist()}

    def __getitem__(self, post: int) -> Mapping[str, Any]:
        if post in self.others:
            return dict(self.others[post])
        try:
            at = int(self.positions(np.array([post], np.int64))[0])
        except (TypeError, ValueError, OverflowError):  # not an int64: no post's id
            at = -1
        if at < 0:
            raise KeyError(post)
        names = self.tags[self.indptr[at] : self.indptr[at + 1]].tolist()
        return {"percentiles": tuple(self.percentiles[at].tolist()), "tags": tuple(self.vocabulary[t] for t in names)}

    def __iter__(self) -> Iterator[int]:
        yield from self.ids.tolist()
        yield from self.others

    def __len__(self) -> int:
        return len(self.ids) + len(self.others)


class FeatureColumns:
    """The features of a PostIndex's posts, by store row: the store calls these as it writes its
    rows, under its lock. A row's percentiles and tags are valid where `_has` is set; `others`
    holds the rows of other shapes by post id, so a swap-remove moves only the columns."""

    def __init__(self) -> None:
        self.width: int | None = None  # percentiles per row: the first row in the columns sets it
        self._has = np.zeros(0, bool)
        self._percentiles = np.zeros((0, 0))
        self._tags = np.full((0, 0), -1, np.int32)
        self._vocabulary: list[str] = []  # replaced, never edited in place, when compacted: readers hold it
        self._tag_id: dict[str, int] = {}
        self._compact_at = VOCABULARY_SLACK
        self.others: dict[int, FrozenRow] = {}

    def write(self, rows: np.ndarray, posts: np.ndarray, features: Sequence[Mapping[str, Any]] | None) -> None:
        """Each of `posts`, at store `rows`, now has its row of `features` (None, or an empty row: none)."""
        if features is None:  # nothing per post unless some are held (a bulk load of vectors costs nothing here)
            self._has[rows[rows < len(self._has)]] = False
            for post in posts.tolist() if self.others else ():
                self.others.pop(post, None)
            return
        for row, post, feature in zip(rows.tolist(), posts.tolist(), features, strict=True):
            if row < len(self._has):
                self._has[row] = False  # replaced: what the post held goes, in the columns or not
            self.others.pop(post, None)
            split = split_row(feature) if feature else None
            if split is not None and self.width is not None and len(split[0]) != self.width and not self._has.any():
                self.width = None  # no row holds the old width (the counts changed): this row sets the new one
            if split is not None and (self.width is None or len(split[0]) == self.width) and len(split[1]) <= MAX_TAGS:
                self._put(row, *split)
            elif feature:
                self.others[post] = freeze_row(feature)

    def _put(self, row: int, percentiles: tuple[float, ...], tags: tuple[str, ...]) -> None:
        if self.width is None:
            self.width = len(percentiles)
            self._percentiles = np.zeros((len(self._has), self.width))
        self._grow(row + 1, len(tags))
        ids = []
        for tag in tags:
            if (i := self._tag_id.get(tag)) is None:
                i = self._tag_id[tag] = len(self._vocabulary)
                self._vocabulary.append(tag)  # a reader's rows name only the tags before this one
            ids.append(i)
        self._percentiles[row] = percentiles
        self._tags[row] = -1
        self._tags[row, : len(ids)] = ids
        self._has[row] = True
        if len(self._vocabulary) >= self._compact_at:
            self._compact()

    def _grow(self, rows: int, tags: int = 0) -> None:
        """Room for `rows` rows (doubling) and `tags` tags in a row."""
        capacity = max(rows, 2 * len(self._has)) if rows > len(self._has) else len(self._has)
        width = max(tags, self._tags.shape[1])
        if capacity == len(self._has) and width == self._tags.shape[1]:
            return
        n = len(self._has)
        has, percentiles = np.zeros(capacity, bool), np.zeros((capacity, self.width or 0))
        tag_ids = np.full((capacity, width), -1, np.int32)
        has[:n], percentiles[:n], tag_ids[:n, : self._tags.shape[1]] = self._has, self._percentiles, self._tags
        self._has, self._percentiles, self._tags = has, percentiles, tag_ids

    def _compact(self) -> None:
        """The vocabulary of the tags some row uses, renumbered."""
        used = np.unique(self._tags[self._has])
        used = used[used >= 0]
        remap = np.full(len(self._vocabulary) + 1, -1, np.int32)  # the last entry maps -1 to -1
        remap[used] = np.arange(len(used), dtype=np.int32)
        self._tags = remap[self._tags]
        self._set_vocabulary([self._vocabulary[t] for t in used.tolist()])

    def _set_vocabulary(self, names: list[str]) -> None:
        self._vocabulary = names
        self._tag_id = {t: i for i, t in enumerate(names)}
        self._compact_at = 2 * len(names) + VOCABULARY_SLACK

    def remove(self, posts: Sequence[int], rows: np.ndarray, holes: np.ndarray, movers: np.ndarray, end: int) -> None:
        """`posts` are deleted from store `rows`; then rows `holes` took rows `movers` and the store
        ends at `end` (PostIndex._remove's swap-remove)."""
        for post in posts:
            self.others.pop(post, None)
        if self.width is None:
            return
        self._grow(end + len(rows))  # every row the store had: a mover may lie past the columns so far
        self._has[rows] = False
        self._percentiles[holes] = self._percentiles[movers]
        self._tags[holes] = self._tags[movers]
        self._has[holes] = self._has[movers]
        self._has[end:] = False

    def take(self, rows: np.ndarray, posts: np.ndarray) -> FeatureRows:
        """The features of `posts` at store `rows`, copied out."""
        others = {p: self.others[p] for p in posts.tolist() if p in self.others} if self.others else {}
        if self.width is None:
            return replace(FeatureRows.empty(), others=others)
        posts, first = np.unique(posts, return_index=True)  # each post once, asked for twice or not
        rows = rows[first]
        inside = rows < len(self._has)
        rows, posts = rows[inside], posts[inside]
        keep = self._has[rows]
        rows = rows[keep]
        tags = self._tags[rows]
        present = tags >= 0
        return FeatureRows(
            posts[keep].astype(np.int64),
            self._percentiles[rows],
            np.concatenate([[0], np.cumsum(present.sum(axis=1))]).astype(np.int64),
            tags[present],
            self._vocabulary,
            others,
        )

    def load(self, at: np.ndarray, features: FeatureRows) -> None:
        """Hold `features` (a snapshot's, of posts the store holds; nothing held so far), the posts
        of its columns at store rows `at` (-1: a post the store does not hold, left out)."""
        sizes = np.diff(features.indptr)
        fits = (at >= 0) & (sizes <= MAX_TAGS)
        for i in np.flatnonzero((at >= 0) & ~fits).tolist():  # more tags than a column row holds
            self.others[int(features.ids[i])] = freeze_row(features[int(features.ids[i])])
        for post, row in features.others.items():
            self.others[post] = row if isinstance(row, tuple) else freeze_row(row)
        if not fits.any():
            return
        self.width = features.width
        self._set_vocabulary(list(features.vocabulary))
        self._percentiles = np.zeros((0, self.width))
        self._grow(int(at.max()) + 1, int(sizes[fits].max(initial=0)))
        self._percentiles[at[fits]] = features.percentiles[fits]
        within = np.arange(len(features.tags)) - np.repeat(features.indptr[:-1], sizes)
        entries = np.repeat(fits, sizes)
        self._tags[np.repeat(at, sizes)[entries], within[entries]] = features.tags[entries]
        self._has[at[fits]] = True
