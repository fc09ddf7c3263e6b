"""Co-engagement: how often the members who engaged with a member's history engaged with a candidate.

The collaborative signal a content embedding does not carry: two films liked by the same people are
close here whatever their text says. The score of candidate c for a history H is ItemKNN's (item
cosine over the member x post engagement matrix X), sum over h in H of sim(h, c) with
sim(h, c) = (X^T X)[h, c] / sqrt(n_h n_c), n the posts' engagement counts; computed through the
members rather than an items x items matrix: w = X[:, H] / sqrt(n_H) summed over H, then
score = w . X[:, c] / sqrt(n_c), touching only the members of the history's and candidates' posts.

The same entries in each member's time order give a directional, sequential signal co-occurrence
lacks: transitions, how often members engaged with c among their next SEQUENCE_WINDOW engagements
after h (`Scorer.transitions`, normalised as the cosine is). A member's next like follows the one
they just made; "liked c soon after h" says more of it than "liked both, some time".

The scored member's own row is left out: in training, their own later likes (the labels) are in the
matrix, and reading them would teach the ranker to trust a score it never gets so good when serving,
where the row holds only what the member engaged with before, all of it already seen.

Each entry keeps when it happened, so a score can be read as of a moment (`before`): a training
example at a moment in the past reads the engagements before it, as the server reads a table built
before its requests, rather than other members' likes still to come.

The table is built from engagements before a cutoff (the training period; `feedserve build` ships
the sample corpus's as coengagement.npz); while serving, the engagements streamed in since are
merged into it (`with_events`, feedserve.rank.engagements), inserted into its sorted arrays rather
than sorted anew. Its size is the number of engagements; at the scale of a real feed the same score
would come from a nearline job's top co-engaged neighbours per post, which this table's interface
would hide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from feedserve.files import atomic_file
from feedserve.index.features import search_sorted

FORMAT = "feedserve.coengagement/1"
# Transitions: a post engaged with within this many engagements after another, by the same member.
SEQUENCE_WINDOW = 10
# The most entries a request reads for its history: past it, the oldest history posts are left out
# of the co-engagement read. A history's posts are the client's choice, and 2,000 of the most
# engaged-with posts read a whole table of millions (and SEQUENCE_WINDOW times as many transitions).
# Six times the bundled MovieLens table (43,722 entries): it never binds there.
MAX_HISTORY_ENTRIES = 1 << 18
# The most entries a request reads for its candidates (read once, not per history post): past it,
# the candidates last in the retrieval order (and any one larger than what is left) are scored
# without co-engagement, as a post the table does not hold. 2,000 of the most engaged-with posts
# would read a table of millions whole.
MAX_CANDIDATE_ENTRIES = 1 << 20


class CoEngagement:
    def __init__(
        self, posts: np.ndarray, indptr: np.ndarray, members: np.ndarray, times: np.ndarray | None = None
    ) -> None:
        """Post `posts[i]` (ascending) was engaged with by the members `members[indptr[i]:indptr[i + 1]]`
        (member ids), at `times` of the same entries (unix seconds; 0, before any moment, where unknown)."""
        self.posts = np.asarray(posts, np.int64)
        self.indptr = np.asarray(indptr, np.int64)
        self.members = np.asarray(members, np.int64)
        self.times = np.zeros(len(self.members), np.int64) if times is None else np.asarray(times, np.int64)
        if self.indptr.shape != (len(self.posts) + 1,) or self.indptr[-1] != len(self.members):
            raise ValueError("coengagement: indptr does not index the member lists")
        if self.times.shape != self.members.shape:
            raise ValueError("coengagement: one time per entry")
        if (self.posts[1:] <= self.posts[:-1]).any():
            raise ValueError("coengagement: posts must be unique and ascending")
        post_of = np.repeat(np.arange(len(self.posts)), np.diff(self.indptr))
        if ((post_of[1:] == post_of[:-1]) & (self.members[1:] <= self.members[:-1])).any():
            raise ValueError("coengagement: a post's members must be unique and ascending")
        self._member_ids, self._member_col = np.unique(self.members, return_inverse=True)
        order = np.lexsort((post_of, self.times, self._member_col))
        self._sequence(order, post_of)

    @classmethod
    def from_events(cls, events: Iterable[tuple[int, int, int]]) -> CoEngagement:
        """From (member id, post id, time) engagements; a member engaging with a post twice counts
        once, from the first time."""
        rows = np.array(list(events), np.int64).reshape(-1, 3)
        return cls.from_arrays(rows[:, 0], rows[:, 1], rows[:, 2])

    @classmethod
    def from_arrays(cls, members: np.ndarray, posts: np.ndarray, times: np.ndarray) -> CoEngagement:
        """From engagements as three arrays, as `from_events`, sorted rather than looped over
        (`with_events` builds the table of the engagements it inserts this way)."""
        members, posts, times = first_engagements(members, posts, times)
        unique, starts = np.unique(posts, return_index=True)
        return cls(unique, np.append(starts, len(posts)), members, times)

    def events(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(member ids, post ids, times) of every entry."""
        return self.members, np.repeat(self.posts, np.diff(self.indptr)), self.times

    def with_events(self, members: np.ndarray, posts: np.ndarray, times: np.ndarray) -> CoEngagement:
        """This table with more engagements (`from_arrays`'s arrays) merged in: the table `from_arrays`
        builds from all of them, made by inserting the new entries into this table's sorted arrays.
        A server merges each second's logged engagements into a table of millions, and inserting
        costs a few passes over its arrays where building it anew sorts them twice
        (benchmarks/reports/engagements.md)."""
        new = CoEngagement.from_arrays(members, posts, times)  # sorted, each pair once at its first time
        if not len(new) or not len(self):
            return new if not len(self) else self
        post_ids, post_shift, new_post_at = _union(self.posts, new.posts)
        member_ids, member_shift, new_member_at = _union(self._member_ids, new._member_ids)
        width = len(member_ids)
        times_fit = min(self.times.min(), new.times.min()) >= 0 and max(self.times.max(), new.times.max()) < 1 << 32
        too_many = (2 * len(self) + 1) * (len(post_ids) + 1) >= 1 << 63  # for `_order_into`'s key
        if len(post_ids) * width >= 1 << 62 or width >= 1 << 31 or not times_fit or too_many:
            return self._rebuilt_with(new)  # beyond what one int64 key orders
        # Every entry at (union row, union member column): both tables' entries are in that key's
        # order (the union's numbering keeps each table's order), so merging is inserting.
        old_rows = np.repeat(np.arange(len(self.posts)) + post_shift, np.diff(self.indptr))
        # (new ids past every one held, as streamed posts and members mostly are, move nothing)
        old_cols = self._member_col + member_shift[self._member_col] if member_shift.any() else self._member_col
        new_rows = np.repeat(new_post_at, np.diff(new.indptr))
        new_cols = new_member_at[new._member_col]
        old_keys, new_keys = old_rows * width + old_cols, new_rows * width + new_cols
        at = np.searchsorted(old_keys, new_keys)
        held = at < len(old_keys)
        held[held] = old_keys[at[held]] == new_keys[held]
        earlier = held.copy()  # a pair the table holds, engaged with before the table says: moves earlier
        earlier[held] = new.times[held] < self.times[at[held]]
        kept = ~held
        if not kept.any() and not earlier.any():
            return self
        inserted, new_rows, new_cols = at[kept], new_rows[kept], new_cols[kept]
        cols = np.insert(old_cols, inserted, new_cols)
        times = np.insert(self.times, inserted, new.times[kept])
        members = np.insert(self.members, inserted, new.members[kept])
        moved = at[earlier] + np.searchsorted(inserted, at[earlier], side="right")  # in the merged arrays
        times[moved] = new.times[earlier]
        posts_count = np.zeros(len(post_ids), np.int64)
        posts_count[np.arange(len(self.posts)) + post_shift] = np.diff(self.indptr)
        posts_count += np.bincount(new_rows, minlength=len(post_ids))
        table = CoEngagement.__new__(CoEngagement)
        table.posts, table.members, table.times = post_ids, members, times
        table.indptr = np.concatenate([[0], np.cumsum(posts_count)])
        table._member_ids, table._member_col = member_ids, cols
        added = np.concatenate([inserted + np.arange(len(inserted)), moved])  # entries, in the merged arrays
        added_rows = np.concatenate([new_rows, old_rows[at[earlier]]])
        gone = np.sort(self._place[at[earlier]])  # the places in the order of the entries that moved
        self._order_into(table, post_shift, member_shift, inserted, added, added_rows, gone)
        return table

    def _order_into(
        self,
        table: CoEngagement,
        post_shift: np.ndarray,
        member_shift: np.ndarray,
        inserted: np.ndarray,
        added: np.ndarray,
        added_rows: np.ndarray,
        gone: np.ndarray,
    ) -> None:
        """The members' time order of `table`, this table with entries merged in (`with_events`):
        this table's order, renumbered (`post_shift`, `member_shift`: how far each of its rows and
        member columns moved), less the places `gone` (entries that moved earlier), with the `added`
        entries (new ones, and those that moved; `added_rows` their rows) inserted where (member
        column, time, row) puts them; `inserted`: where the new entries went among this table's.
        Every array is edited in its own order, so that the merge is passes over memory rather than
        gathers."""
        held = np.bincount(self._member_col)  # entries per member column
        in_rows = self._post_in_order + post_shift[self._post_in_order] if post_shift.any() else self._post_in_order
        in_cols = np.repeat(np.arange(len(self._member_ids)) + member_shift, held)
        in_times = self._time_in_order
        if len(gone):
            stay = np.ones(len(in_rows), bool)
            stay[gone] = False
            in_rows, in_cols, in_times = in_rows[stay], in_cols[stay], in_times[stay]
        cols, times = table._member_col[added], table.times[added]
        by_order = np.lexsort((added_rows, times, cols))
        added, added_rows, cols, times = added[by_order], added_rows[by_order], cols[by_order], times[by_order]
        in_keys, added_keys = in_cols * (1 << 32) + in_times, cols * (1 << 32) + times
        places = np.searchsorted(in_keys, added_keys, side="left")
        if (places < np.searchsorted(in_keys, added_keys, side="right")).any():
            # An entry of the same member and time is held (times repeat): ordered by row too, in one
            # key of (the rank of (member, time) among those held, between theirs where it is not, row).
            starts = np.ones(len(in_keys), bool)
            starts[1:] = in_keys[1:] != in_keys[:-1]
            distinct = in_keys[starts]
            at = np.searchsorted(distinct, added_keys)
            present = at < len(distinct)
            present[present] = distinct[at[present]] == added_keys[present]
            width = len(table.posts) + 1  # (with_events checked that the key fits)
            in_ranks = (np.cumsum(starts) - 1) * 2 + 1
            added_ranks = np.where(present, 2 * at + 1, 2 * at)
            places = np.searchsorted(in_ranks * width + in_rows, added_ranks * width + added_rows)
        # Where each of this table's places goes: less the places removed before it, after the
        # insertions at or before it (counted along the order, then read once per entry).
        to_place = np.arange(len(self._place))
        if len(gone):
            to_place -= np.cumsum(np.bincount(gone, minlength=len(to_place)))  # (a removed place's is never read)
        to_place += np.cumsum(np.bincount(places, minlength=len(in_keys) + 1))[to_place]
        table._place = np.insert(to_place[self._place], inserted, 0)
        table._place[added] = places + np.arange(len(places))
        per_member = np.zeros(len(table._member_ids), np.int64)
        per_member[np.arange(len(self._member_ids)) + member_shift] = held
        per_member += np.bincount(table._member_col[inserted + np.arange(len(inserted))], minlength=len(per_member))
        table._last = _last_places(per_member)
        table._post_in_order = np.insert(in_rows, places, added_rows)
        table._time_in_order = np.insert(in_times, places, times)

    def _rebuilt_with(self, new: CoEngagement) -> CoEngagement:
        mine, theirs = self.events(), new.events()
        return CoEngagement.from_arrays(*(np.concatenate([a, b]) for a, b in zip(mine, theirs, strict=True)))

    @classmethod
    def from_engagements(cls, engaged: Mapping[int, Iterable[int]]) -> CoEngagement:
        """From each member's engaged post ids, times unknown."""
        return cls.from_events((m, p, 0) for m, posts in engaged.items() for p in posts)

    def __len__(self) -> int:
        return len(self.members)

    def sizes(self, post_ids: np.ndarray) -> np.ndarray:
        """How many entries the table holds for each post (0 for one it does not hold)."""
        rows = self._rows(post_ids)
        return np.where(rows >= 0, np.diff(self.indptr)[rows], 0)

    def _rows(self, post_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Each post's row, -1 where the table does not hold it."""
        return search_sorted(np.asarray(post_ids, np.int64), self.posts)

    def _entries(
        self, post_ids: Sequence[int] | np.ndarray, own: int, before: int | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For the posts of `post_ids`: each one's row (-1 where the table does not hold it), and of
        those it holds, how many entries each has, the member column of every entry, which entries
        are left out (column `own`'s, and those at `before` or later), and each post's
        1 / sqrt(engagement count) without them."""
        rows = self._rows(post_ids)
        found = rows >= 0
        positions, sizes = _ranges(self.indptr[rows[found]], np.diff(self.indptr)[rows[found]])
        columns = self._member_col[positions]
        left = columns == own
        if before is not None:
            left |= self.times[positions] >= before
        counts = sizes - np.bincount(np.repeat(np.arange(len(sizes)), sizes), weights=left, minlength=len(sizes))
        inv_norm = np.where(counts > 0, 1.0 / np.sqrt(np.maximum(counts, 1.0)), 0.0)
        return rows, sizes, columns, left, inv_norm, found

    def _sequence(self, order: np.ndarray, post_of: np.ndarray) -> None:
        """From the entries in each member's time order (`order`: by member, then time, then post
        row; `post_of`: each entry's row), each entry's place in that order, and for each place the
        last place of its member, the post row and the time there (read in runs, not gathered entry
        by entry). A transition a -> b is then b within SEQUENCE_WINDOW places after a, up to its
        member's last: found per request from the history's entries (`Scorer.transitions`) rather
        than stored as ten pairs an entry: the table three times smaller and a merge of logged
        engagements faster, a request's read slower only at millions of entries with the most
        engaged-with posts in its history (benchmarks/reports/engagements.md against
        engagements-stored-transitions.md)."""
        place = np.empty_like(order)
        place[order] = np.arange(len(order))
        self._place, self._last = place, _last_places(np.bincount(self._member_col, minlength=len(self._member_ids)))
        self._post_in_order, self._time_in_order = post_of[order], self.times[order]

    def against(self, member_id: int, candidates: Sequence[int], before: int | None = None) -> Scorer:
        """A scorer of `candidates` for member `member_id` (their own engagements left out; with
        `before`, those at that time or later too): the candidates' entries gathered once for every
        history it scores."""
        at = int(np.searchsorted(self._member_ids, member_id))
        own = at if at < len(self._member_ids) and self._member_ids[at] == member_id else -1  # -1: no column
        return Scorer(self, own, candidates, before)

    def scores(
        self, member_id: int, history: Sequence[int], candidates: Sequence[int], before: int | None = None
    ) -> np.ndarray:
        """[len(candidates)] float32: each candidate's summed item cosine to the `history` posts over
        the table without member `member_id`'s engagements (and, with `before`, without those at that
        time or later); 0 for a post the table does not hold."""
        return self.against(member_id, candidates, before).cooccurrence(history)

    def save(self, path: Path) -> None:
        with atomic_file(path) as f:
            np.savez(
                f, format=np.array(FORMAT), posts=self.posts, indptr=self.indptr, members=self.members, times=self.times
            )

    @classmethod
    def load(cls, path: Path) -> CoEngagement:
        with np.load(path, allow_pickle=False) as data:
            if "format" not in data or str(data["format"]) != FORMAT:
                raise ValueError(f"{path}: not a {FORMAT} file")
            return cls(data["posts"], data["indptr"], data["members"], data.get("times"))


def first_engagements(
    members: np.ndarray, posts: np.ndarray, times: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Engagements (member, post, time) each pair once, at its first time, ordered by post then
    member: what a table holds, as three int64 arrays."""
    members, posts, times = (np.asarray(c, np.int64).reshape(-1) for c in (members, posts, times))
    same_post, same_member = posts[1:] == posts[:-1], members[1:] == members[:-1]
    in_order = (posts[1:] > posts[:-1]) | same_post & (
        (members[1:] > members[:-1]) | same_member & (times[1:] >= times[:-1])
    )
    if not in_order.all():  # (a snapshot's engagements are in order already: no sort)
        order = np.lexsort((times, members, posts))  # by post, member, then time: a pair's first comes first
        members, posts, times = members[order], posts[order], times[order]
    first = np.ones(len(posts), bool)
    first[1:] = (posts[1:] != posts[:-1]) | (members[1:] != members[:-1])
    return members[first], posts[first], times[first]


def _union(mine: np.ndarray, theirs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two ascending unique id arrays' union, how far each of `mine` moves in it, and where each of
    `theirs` is in it; costs a pass over `mine` and a search per id of `theirs`, not a sort."""
    at = np.minimum(np.searchsorted(mine, theirs), max(len(mine) - 1, 0))
    extra = theirs[mine[at] != theirs] if len(mine) else theirs
    union = np.insert(mine, np.searchsorted(mine, extra), extra)
    return union, np.searchsorted(extra, mine), np.searchsorted(union, theirs)


def _distinct(
    history: Sequence[int], weights: np.ndarray, sizes: Callable[[np.ndarray], np.ndarray], budget: int
) -> tuple[np.ndarray, np.ndarray]:
    """A history's distinct posts and each one's summed weight, the newest first as far as their
    entries (`sizes(posts)`) fit `budget` (`_within`). A post repeated in a history is gathered once: a
    request's read is bounded by its distinct posts' entries, not multiplied by how often a popular
    post repeats, and by the budget however many popular posts it holds."""
    posts, inverse = np.unique(np.asarray(history, np.int64), return_inverse=True)
    inverse = inverse.reshape(-1)
    summed = np.bincount(inverse, weights=weights, minlength=len(posts))
    newest = np.zeros(len(posts), np.int64)
    np.maximum.at(newest, inverse, np.arange(len(inverse)))
    order = np.argsort(-newest, kind="stable")
    kept = np.sort(order[_within(sizes(posts[order]), budget)])
    return posts[kept], summed[kept]


def _within(sizes: np.ndarray, budget: int) -> np.ndarray:
    """Which of these reads (in order of preference) fit a budget of entries, taken in order and
    skipping one that does not fit (a single post past the budget does not stop the rest)."""
    if int(sizes.sum()) <= budget:
        return np.ones(len(sizes), bool)
    fits, left = np.zeros(len(sizes), bool), budget
    for i, size in enumerate(sizes.tolist()):
        if size <= left:
            fits[i], left = True, left - size
    return fits


def _last_places(per_member: np.ndarray) -> np.ndarray:
    """For each place of the members' time order (member columns ascending, `per_member` entries
    each), the last place of its member: the end of its run."""
    return np.repeat(np.cumsum(per_member) - 1, per_member)


def _ranges(starts: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The positions of the ranges [start, start + size), concatenated, and the sizes."""
    return np.repeat(starts - np.cumsum(sizes) + sizes, sizes) + np.arange(sizes.sum()), sizes


class Scorer:
    """One member's candidates scored against a table, for one or more of their histories."""

    def __init__(self, table: CoEngagement, own: int, candidates: Sequence[int], before: int | None) -> None:
        self.table, self.own, self.before, self.n = table, own, before, len(candidates)
        ids = np.asarray(candidates, np.int64).reshape(-1)
        read = _within(table.sizes(ids), MAX_CANDIDATE_ENTRIES)
        if not read.all():
            ids = np.where(read, ids, -1)  # -1: no post's id, so none of its entries are read
        self.rows, sizes, columns, left, self.inv_norm, self.found = table._entries(ids, own, before)
        self.sizes, self.columns, self.left, self.ends = sizes, columns, left, np.cumsum(sizes)

    def cooccurrence(self, history: Sequence[int]) -> np.ndarray:
        """[candidates] float32: each candidate's summed item cosine to the `history` posts (ItemKNN)."""
        out = np.zeros(self.n, np.float32)
        if not self.n or not len(history):
            return out
        table = self.table
        posts, repeats = _distinct(history, np.ones(len(history)), table.sizes, MAX_HISTORY_ENTRIES)
        _, sizes, columns, left, inv_norm, found = table._entries(posts, self.own, self.before)
        # Each member's weight: the history posts they engaged with, each by 1 / sqrt(its count) (times
        # its repeats in the history); the entries left out are not counted, so the left-out member's
        # weight is 0.
        weights = np.bincount(
            columns[~left], weights=np.repeat(inv_norm * repeats[found], sizes)[~left], minlength=len(table._member_ids)
        )
        running = np.concatenate([[0.0], np.cumsum(np.where(self.left, 0.0, weights[self.columns]))])
        out[self.found] = (running[self.ends] - running[self.ends - self.sizes]) * self.inv_norm
        return out

    def transitions(self, history: Sequence[int], decay: float = 1.0) -> np.ndarray:
        """[candidates] float32: how often other members engaged with each candidate within
        SEQUENCE_WINDOW engagements after one of the `history` posts (oldest first), each post's
        count divided by sqrt(both posts' engagement counts) and weighted decay^(how many posts of
        the history came after it): what a member engages with next follows what they just did."""
        out = np.zeros(self.n, np.float32)
        if not self.n or not len(history):
            return out
        table = self.table
        weights = decay ** np.arange(len(history) - 1, -1, -1, dtype=np.float64)
        posts, decayed = _distinct(history, weights, table.sizes, MAX_HISTORY_ENTRIES)
        rows, sizes, columns, _, inv_norm, found = table._entries(posts, self.own, self.before)
        weight = decayed[found] * inv_norm
        # Every other member's engagement with a history post, then the SEQUENCE_WINDOW engagements
        # after it in its member's time order (up to the member's last): the transitions from it.
        sources, _ = _ranges(table.indptr[rows[found]], sizes)
        others = columns != self.own
        sources, weights = sources[others], np.repeat(weight, sizes)[others]
        place = table._place[sources]
        counts = np.minimum(SEQUENCE_WINDOW, table._last[place] - place)
        targets = _ranges(place + 1, counts)[0]  # places in the members' time order
        weights = np.repeat(weights, counts)
        if self.before is not None:
            kept = table._time_in_order[targets] < self.before
            targets, weights = targets[kept], weights[kept]
        by_row = np.bincount(table._post_in_order[targets], weights=weights, minlength=len(table.posts))
        out[self.found] = by_row[self.rows[self.found]] * self.inv_norm
        return out
