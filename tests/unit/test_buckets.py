from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feedserve.prompt.buckets import PercentileBuckets


@pytest.fixture
def buckets() -> PercentileBuckets:
    rng = np.random.default_rng(0)
    return PercentileBuckets.fit(
        {"views": rng.lognormal(8, 2, 5000), "likes": np.r_[np.zeros(4000), rng.integers(1, 500, 1000)]}
    )


def test_tag_format_and_range(buckets: PercentileBuckets) -> None:
    tag = buckets.tag("views", 12345)
    assert tag.startswith("<view_percentile>") and tag.endswith("</view_percentile>")
    assert 0 <= int(tag.split(">")[1].split("<")[0]) <= 99
    assert buckets.bucket("views", -1) == 0 and buckets.bucket("views", 1e18) == 99


def test_ties_share_a_bucket(buckets: PercentileBuckets) -> None:
    # 80% of posts have zero likes: they all land in one bucket, the others above it.
    assert buckets.bucket("likes", 0) == buckets.bucket("likes", 0.0)
    assert buckets.bucket("likes", 1) > buckets.bucket("likes", 0)


def test_unknown_feature_is_named(buckets: PercentileBuckets) -> None:
    with pytest.raises(KeyError, match="reposts"):
        buckets.bucket("reposts", 1)


@given(st.lists(st.floats(0, 1e9), min_size=1, max_size=200), st.floats(0, 1e9), st.floats(0, 1e9))
def test_bucketing_is_monotone(values: list[float], a: float, b: float) -> None:
    fitted = PercentileBuckets.fit({"views": values})
    lo, hi = sorted((a, b))
    assert 0 <= fitted.bucket("views", lo) <= fitted.bucket("views", hi) <= 99


def test_round_trip_and_corruption(buckets: PercentileBuckets, tmp_path: Path) -> None:
    path = tmp_path / "buckets.json"
    buckets.save(path)
    loaded = PercentileBuckets.load(path)
    assert loaded.tag("views", 777) == buckets.tag("views", 777)
    data = json.loads(path.read_text())
    data["cut_points"]["views"][10] += 1.0
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        PercentileBuckets.load(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="cannot read percentile buckets"):
        PercentileBuckets.load(path)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1e9), min_size=1, max_size=200), st.floats(0, 1e9))
def test_buckets_span_the_corpus_and_survive_a_save(values: list[float], x: float) -> None:
    """The most-engaged post of the fitted corpus is in the top bucket, anything below the least
    engaged one in bucket 0, and a saved and loaded copy buckets every value the same."""
    fitted = PercentileBuckets.fit({"views": values})
    assert fitted.bucket("views", max(values)) == 99
    assert fitted.bucket("views", min(values) - 1.0) == 0
    with tempfile.TemporaryDirectory() as tmp:
        fitted.save(Path(tmp) / "b.json")
        reloaded = PercentileBuckets.load(Path(tmp) / "b.json")
    assert reloaded.bucket("views", x) == fitted.bucket("views", x)
