"""Engagement counts as percentile tokens: `views: 12345` -> `<view_percentile>71</view_percentile>`.

Raw numbers tokenise into digit soup that a language model barely relates to popularity; a bucket
on a 0-99 percentile scale, fitted on the corpus, is one small vocabulary the model learns to use
(the system we reproduce saw the popularity/similarity correlation rise ~30x with it). The cut points
are a versioned artifact (`buckets.json`) that training and serving load alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from feedserve.files import atomic_write

logger = logging.getLogger(__name__)

FORMAT = "feedserve.buckets/1"
# Tag stems for the common counts; any other feature uses its own name (`ratings` -> `ratings`).
TAG_NAMES = {"views": "view", "likes": "like", "comments": "comment", "shares": "share", "reposts": "repost"}


def tag_name(feature: str) -> str:
    return TAG_NAMES.get(feature, feature)


class PercentileBuckets:
    def __init__(self, cut_points: Mapping[str, Sequence[float]], n_buckets: int = 100) -> None:
        self.n_buckets = n_buckets
        self.cut_points = {k: np.asarray(v, dtype=np.float64) for k, v in cut_points.items()}
        for feature, cuts in self.cut_points.items():
            if len(cuts) != n_buckets - 1 or np.any(np.diff(cuts) < 0):
                raise ValueError(f"buckets for {feature!r}: need {n_buckets - 1} non-decreasing cut points")

    @classmethod
    def fit(cls, corpus: Mapping[str, Sequence[float]], n_buckets: int = 100) -> PercentileBuckets:
        """Cut points at the 1st..99th percentiles of each feature's observed values."""
        cuts = {}
        for feature, values in corpus.items():
            arr = np.asarray(values, dtype=np.float64)
            arr = arr[np.isfinite(arr)]
            if arr.size == 0:
                raise ValueError(f"no finite values to fit buckets for {feature!r}")
            cuts[feature] = np.percentile(arr, np.arange(1, n_buckets) * 100.0 / n_buckets).tolist()
        return cls(cuts, n_buckets)

    @classmethod
    def fit_posts(cls, posts: Iterable[object], n_buckets: int = 100) -> PercentileBuckets:
        """Fit on the `counts` of post records (missing counts are not zeros: they are skipped)."""
        corpus: dict[str, list[float]] = {}
        for post in posts:
            for feature, value in getattr(post, "counts", {}).items():
                corpus.setdefault(feature, []).append(value)
        return cls.fit(corpus, n_buckets)

    @property
    def features(self) -> list[str]:
        return sorted(self.cut_points)

    def bucket(self, feature: str, value: float) -> int:
        """Percentile bucket 0..n-1. With ties (many zeros), a value gets the highest bucket whose
        cut point it reaches, so equal values always share a bucket."""
        return int(self.buckets(feature, np.asarray(value)))

    def buckets(self, feature: str, values: np.ndarray) -> np.ndarray:
        """`bucket` of each of `values`, at once."""
        try:
            cuts = self.cut_points[feature]
        except KeyError:
            raise KeyError(f"no percentile buckets fitted for count {feature!r}; known: {self.features}") from None
        return np.searchsorted(cuts, values, side="right")

    def tag(self, feature: str, value: float) -> str:
        name = f"{tag_name(feature)}_percentile"
        return f"<{name}>{self.bucket(feature, value)}</{name}>"

    def to_json(self) -> str:
        body = {"n_buckets": self.n_buckets, "cut_points": {k: v.tolist() for k, v in sorted(self.cut_points.items())}}
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        return json.dumps({"format": FORMAT, "sha256": digest, **body}, indent=1, sort_keys=True) + "\n"

    def save(self, path: Path) -> None:
        atomic_write(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> PercentileBuckets:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read percentile buckets {path}: {err}") from err
        return cls.from_saved(data, str(path))

    @classmethod
    def from_saved(cls, data: object, source: str) -> PercentileBuckets:
        """Buckets from `to_json`'s object (a file's, or one kept inside another file), checked."""
        if not isinstance(data, dict) or not {"n_buckets", "cut_points"} <= data.keys():
            raise ValueError(f"cannot read percentile buckets {source}: no n_buckets and cut_points")
        body = {"n_buckets": data["n_buckets"], "cut_points": data["cut_points"]}
        if data.get("format") != FORMAT:
            raise ValueError(f"{source}: unknown buckets format {data.get('format')!r}, expected {FORMAT}")
        if hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest() != data.get("sha256"):
            raise ValueError(f"{source}: checksum mismatch, the file is corrupt or was edited by hand")
        return cls(body["cut_points"], int(body["n_buckets"]))
