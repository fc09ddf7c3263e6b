"""The `rank` backend on numpy, without a server: it ranks as the PyTorch ranker does, tolerates
what members' records really hold (no history, unknown posts, duplicates, padding, long histories)
and refuses bad tensors by name, alone in their batch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from feedserve.artifacts import ArtifactLayout
from feedserve.index.live import IndexWriter
from feedserve.index.wal import Op
from feedserve.prompt.records import parse_member
from feedserve.rank.coengagement import CoEngagement
from feedserve.rank.data import PostTable, RankExample, Tensorizer, member_interactions
from feedserve.rank.features import PostFeatures
from feedserve.rank.model import INPUTS, GenerativeRanker, load_id_owners, owns
from feedserve.rank.runtime import SERVED_ATTENTIONS
from feedserve.rank.train import DEFAULT_TASK_WEIGHTS
from feedserve.schema import ModelName
from feedserve.triton.base import RequestError
from feedserve.triton.rank import RankModel

DIM = 32
POSTS = np.arange(500, 540, dtype=np.int64)


def _unit(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


VECTORS = _unit(len(POSTS), seed=3)


@pytest.fixture(scope="module")
def layout(tiny_artifacts: ArtifactLayout, tmp_path_factory: pytest.TempPathFactory) -> ArtifactLayout:
    """The tiny artifacts with an index of their own (the session server writes to the shared one)."""
    root = tmp_path_factory.mktemp("rank-artifacts") / "a"
    shutil.copytree(tiny_artifacts.root, root, ignore=shutil.ignore_patterns("index"))
    out = ArtifactLayout(root)
    writer = IndexWriter.open(out.index_dir.root, DIM)
    writer.upsert(POSTS, VECTORS)
    writer.snapshot()
    writer.close()
    return out


@pytest.fixture(scope="module")
def rank(layout: ArtifactLayout) -> RankModel:
    model = RankModel()
    model.setup(layout, {"max_candidates": "64"})
    return model


def _member(history: list[tuple[int, str]], member_id: int = 3) -> bytes:
    items = [{"post_id": p, "engaged_at": t, "action": a} for t, (p, a) in enumerate(history)]
    return json.dumps({"id": member_id, "headline": "Engineer", "history": items}).encode()


def _request(
    members: list[bytes], candidates: list[list[int]], k: int = 5, seed: int = 0
) -> dict[str, np.ndarray | None]:
    width = max(len(c) for c in candidates)
    ids = np.full((len(members), width), -1, np.int64)
    scores = np.zeros((len(members), width), np.float32)
    rng = np.random.default_rng(seed)
    for i, c in enumerate(candidates):
        ids[i, : len(c)] = c
        scores[i, : len(c)] = np.sort(rng.random(len(c)))[::-1]
    return {
        "RECORDS": np.array([[m] for m in members], object),
        "QUERY": _unit(len(members), seed=seed + 100),
        "CANDIDATE_IDS": ids,
        "CANDIDATE_SCORES": scores,
        "K": np.full((len(members), 1), k, np.int64),
    }


def _ok(model: RankModel, request: dict[str, np.ndarray | None]) -> dict[str, np.ndarray]:
    (out,) = model.run([request])
    assert not isinstance(out, RequestError), out
    return out


HISTORY = [(501, "like"), (502, "rated 5"), (999_999, "like"), (503, "rated 1"), (504, "share")]


def _pytorch_probabilities(
    package: Path,
    layout: ArtifactLayout,
    request: dict[str, np.ndarray | None],
    history: list[tuple[int, str]],
    candidates: list[int],
) -> np.ndarray:
    """What the PyTorch ranker in `package` gives the request's first member on the artifacts'
    tables: each candidate's probability per task."""
    model = GenerativeRanker.load(package)
    features, coengagement = PostFeatures.load(layout.post_features), CoEngagement.load(layout.coengagement)
    tensorize = Tensorizer(model.config, PostTable(POSTS, VECTORS), features, coengagement)
    example = RankExample(
        3,
        member_interactions(parse_member(_member(history))),
        request["QUERY"][0],  # type: ignore[index]
        np.array(candidates, np.int64),
        request["CANDIDATE_SCORES"][0],  # type: ignore[index]
        np.zeros((len(candidates), len(model.config.tasks)), np.float32),
    )
    with torch.no_grad():
        t = tensorize.batch([example])
        return torch.sigmoid(model(**{k: t[k] for k in INPUTS}))[0].numpy()


def test_it_ranks_as_the_pytorch_ranker_does(rank: RankModel, layout: ArtifactLayout, tiny_ranker: Path) -> None:
    candidates = [505, 510, 777_777, 520, 530, 531, 539]  # 777777: not in the index
    request = _request([_member(HISTORY)], [candidates], k=4)
    out = _ok(rank, request)
    probabilities = _pytorch_probabilities(tiny_ranker, layout, request, HISTORY, candidates)
    final = probabilities @ np.array(list(DEFAULT_TASK_WEIGHTS.values()), np.float32)
    order = np.argsort(-final, kind="stable")[:4]
    assert out["IDS"][0].tolist() == np.array(candidates)[order].tolist()
    np.testing.assert_allclose(out["SCORES"][0], final[order], atol=1e-4)
    np.testing.assert_allclose(out["TASK_SCORES"][0], probabilities[order], atol=1e-4)
    assert np.all(np.diff(out["SCORES"][0]) <= 0)


def _by_id(out: dict[str, np.ndarray], row: int) -> dict[int, tuple[float, ...]]:
    """A row's ranked ids -> (final score, task probabilities...)."""
    return {
        int(i): (float(s), *map(float, t))
        for i, s, t in zip(out["IDS"][row], out["SCORES"][row], out["TASK_SCORES"][row], strict=True)
        if i != -1
    }


TORCH_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", TORCH_DEVICES)
@pytest.mark.parametrize(
    ("dtype", "attention", "atol"), [("fp32", a, 1e-4) for a in SERVED_ATTENTIONS] + [("bf16", "split", 3e-2)]
)
def test_the_pytorch_runtime_ranks_as_the_exported_graph(
    rank: RankModel, layout: ArtifactLayout, device: str, dtype: str, attention: str, atol: float
) -> None:
    """What the GPU variants run (the saved PyTorch ranker, on the instance's device) gives the
    served graph's scores: fp32 within 1e-4 whichever way it computes attention, bf16 within 3e-2;
    rows of one batch with no history, a long one and padding included."""
    params = {"max_candidates": "64", "runtime": "torch", "device": device, "dtype": dtype, "attention": attention}
    torch_rank = RankModel()
    torch_rank.setup(layout, params)
    try:
        long_history = [(int(p), "like") for p in np.resize(POSTS, 300)]
        request = _request(
            [_member(HISTORY), _member([]), _member(long_history, member_id=4)],
            [[505, 510, 777_777, 520, 530, 531, 539], [505, 506], list(range(500, 540))],
            k=40,
        )
        want, got = _ok(rank, request), _ok(torch_rank, request)
        for row in range(3):
            expected, actual = _by_id(want, row), _by_id(got, row)
            assert set(actual) == set(expected), row
            worst = max(abs(a - e) for i in expected for a, e in zip(actual[i], expected[i], strict=True))
            assert worst < atol, (row, worst)
        if dtype == "fp32":  # the same order; bf16 may swap posts whose scores are that close
            np.testing.assert_array_equal(got["IDS"], want["IDS"])
    finally:
        torch_rank.finalize()


def test_artifacts_without_the_pytorch_ranker_rank_on_the_cpu_and_a_gpu_variant_says_why(
    layout: ArtifactLayout, tmp_path: Path
) -> None:
    """Artifacts built before the GPU variants have no ranker.pt: the ONNX runtime ranks with them,
    the PyTorch one refuses to load by name."""
    root = tmp_path / "old"
    shutil.copytree(layout.root, root, ignore=shutil.ignore_patterns("ranker.pt"))
    old = ArtifactLayout(root)
    assert old.has_ranker()
    cpu = RankModel()
    cpu.setup(old, {"max_candidates": "64"})
    try:
        assert _ok(cpu, _request([_member(HISTORY)], [[505, 506, 507]]))["IDS"].shape == (1, 3)
    finally:
        cpu.finalize()
    with pytest.raises(ValueError, match=r"no .*ranker.pt \(the PyTorch ranker a GPU variant runs\)"):
        RankModel().setup(old, {"runtime": "torch", "device": "cpu"})
    with pytest.raises(ValueError, match=r"new_post_boost needs .*ranker.pt \(which posts the ranker trained on\)"):
        RankModel().setup(old, {"new_post_boost": "0.1"})


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"runtime": "tensorrt"}, "unknown runtime 'tensorrt'"),
        ({"runtime": "torch", "dtype": "fp8"}, "unknown dtype 'fp8'"),
        ({"runtime": "torch", "attention": "sparse"}, "attention 'sparse' is not served"),
        ({"runtime": "torch", "attention": "flex"}, "attention 'flex' is not served"),
    ],
)
def test_an_unknown_ranker_runtime_is_refused_at_load(
    layout: ArtifactLayout, params: dict[str, str], error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        RankModel().setup(layout, {"device": "cpu", **params})


def test_a_new_post_boost_raises_every_post_the_ranker_never_trained_on_by_exactly_it(
    rank: RankModel, layout: ArtifactLayout
) -> None:
    """Their final score gains the boost, in every row and whatever else the row holds; the trained
    posts' scores and every task probability stay the ranker's."""
    boosted = RankModel()
    boosted.setup(layout, {"max_candidates": "64", "new_post_boost": "0.25"})
    try:
        candidates = [505, 510, 777_777, 520, 530, 10**12, 531, 539, 123_999]
        request = _request([_member(HISTORY), _member([])], [candidates, candidates[3:]], k=9)
        plain, up = _ok(rank, request), _ok(boosted, request)
    finally:
        boosted.finalize()
    trained = owns(load_id_owners(layout.root), torch.tensor(candidates)).tolist()
    untrained = {c for c, t in zip(candidates, trained, strict=True) if not t}
    assert untrained == {777_777, 10**12, 123_999}  # the tiny ranker trained on 500..999
    for row in (0, 1):
        before, after = _by_id(plain, row), _by_id(up, row)
        assert before.keys() == after.keys()
        for post, (score, *tasks) in after.items():
            assert score == pytest.approx(before[post][0] + 0.25 * (post in untrained), abs=1e-6)
            assert tasks == pytest.approx(before[post][1:], abs=1e-7)
        assert np.all(np.diff(up["SCORES"][row][: len(after)]) <= 0)


@pytest.mark.parametrize("bad", ["nan", "inf", "1e39", "a lot", ""])
def test_a_new_post_boost_that_is_not_a_finite_number_is_refused_at_load(layout: ArtifactLayout, bad: str) -> None:
    with pytest.raises(ValueError, match="new_post_boost must be a finite number"):
        RankModel().setup(layout, {"new_post_boost": bad})


def test_what_real_records_hold_is_ranked_not_refused(rank: RankModel) -> None:
    long_history = [(int(p), "like") for p in np.resize(POSTS, 300)]  # beyond the 20 the tiny ranker reads
    cases = {
        "empty history": (_member([]), [505, 506, 507]),
        "unknown posts": (_member([(10**15, "like"), (10**15 + 1, "rated 2")]), [10**14, 10**14 + 1, 505]),
        "duplicates and padding": (_member(HISTORY), [505, 505, 506, 505, -1, -1]),
        "long history": (_member(long_history), [505, 506]),
        "odd actions": (_member([(501, "bookmarked"), (502, "rated x")]), [505]),
    }
    for name, (member, candidates) in cases.items():
        out = _ok(rank, _request([member], [candidates], k=10))
        ids = [i for i in out["IDS"][0].tolist() if i != -1]
        assert sorted(ids) == sorted({c for c in candidates if c != -1}), name  # each candidate once, none invented
        assert np.isfinite(out["SCORES"]).all() and np.isfinite(out["TASK_SCORES"]).all(), name
    # Rows of one request with different candidate counts: each returns what it has.
    out = _ok(rank, _request([_member([]), _member(HISTORY)], [[505], [505, 506, 507, 508]], k=3))
    assert out["IDS"].shape == (2, 3) and out["IDS"][0, 1:].tolist() == [-1, -1]


def test_history_beyond_the_ranker_changes_nothing(rank: RankModel) -> None:
    """The oldest items past max_history are dropped, as in the prompts: they cannot change a score."""
    recent = [(int(p), "like") for p in POSTS[:20]]
    older = [(int(p), "rated 1") for p in POSTS[20:35]]
    alone = _ok(rank, _request([_member(recent)], [[536, 537, 538]]))
    longer = _ok(rank, _request([_member(older + recent)], [[536, 537, 538]]))
    np.testing.assert_allclose(alone["SCORES"], longer["SCORES"], atol=1e-6)


GOOD = _request([_member(HISTORY)], [[505, 506]])


def _with(**changes: np.ndarray) -> dict[str, np.ndarray | None]:
    return {**GOOD, **changes}


@pytest.mark.parametrize(
    "inputs,words",
    [
        (_with(CANDIDATE_IDS=np.arange(500, 565, dtype=np.int64)[None]), "at most 64 (max_candidates)"),
        (_with(K=np.array([[0]], np.int64)), "k=0 is out of range"),
        (_with(K=np.array([[65]], np.int64)), "k=65 is out of range"),
        (_with(QUERY=np.zeros((1, 7), np.float32)), "QUERY: expected shape [1, 32]"),
        (_with(QUERY=np.full((1, DIM), np.nan, np.float32)), "QUERY: contains NaN"),
        (_with(CANDIDATE_SCORES=np.zeros((1, 3), np.float32)), "CANDIDATE_SCORES: expected shape [1, 2]"),
        (_with(CANDIDATE_SCORES=np.array([[np.inf, 0]], np.float32)), "CANDIDATE_SCORES: contains NaN or inf"),
        # Finite but far from what retrieval gives: NaN scores answered as a success before.
        (_with(QUERY=_unit(1, seed=100) * np.float32(1e15)), "QUERY: must be unit length"),
        (_with(QUERY=np.zeros((1, DIM), np.float32)), "row 0 has norm 0"),
        (_with(CANDIDATE_SCORES=np.array([[1e15, 0.5]], np.float32)), "CANDIDATE_SCORES: retrieval scores are cosines"),
        (_with(CANDIDATE_SCORES=np.array([[0.5, -3e38]], np.float32)), "got 3e+38"),
        (_with(CANDIDATE_IDS=np.array([[505, -7]], np.int64)), "ids must be >= 0"),
        (_with(CANDIDATE_IDS=np.array([[505, 506]], np.int32)), "CANDIDATE_IDS: expected dtype int64"),
        (_with(RECORDS=np.array([[b"{not json"]], object)), "RECORDS[0]: member: invalid JSON"),
        (_with(RECORDS=np.array([[b'{"id": 1, "history": [{"engaged_at": 1}]}']], object)), "post_id"),
        (_with(K=None), "K is missing"),
    ],
)
def test_bad_tensors_are_refused_by_name_alone(
    rank: RankModel, inputs: dict[str, np.ndarray | None], words: str
) -> None:
    good, bad, good_again = rank.run([GOOD, inputs, GOOD])
    assert isinstance(bad, RequestError) and words in str(bad), bad
    assert not isinstance(good, RequestError) and not isinstance(good_again, RequestError)
    np.testing.assert_array_equal(good["IDS"], good_again["IDS"])


def test_a_post_written_after_load_is_ranked_by_its_content(rank: RankModel, layout: ArtifactLayout) -> None:
    """The ranker follows the live index: a post upserted now has content at the next request."""
    fresh = 123_456
    before = _ok(rank, _request([_member(HISTORY)], [[fresh, 505]], k=2))
    writer = IndexWriter.open(layout.index_dir.root)
    try:
        writer.upsert(np.array([fresh], np.int64), _unit(1, seed=77))
    finally:
        writer.close()
    after = _ok(rank, _request([_member(HISTORY)], [[fresh, 505]], k=2))
    row = {i: s for i, s in zip(after["IDS"][0].tolist(), after["SCORES"][0].tolist(), strict=True)}
    old = {i: s for i, s in zip(before["IDS"][0].tolist(), before["SCORES"][0].tolist(), strict=True)}
    assert row[505] == pytest.approx(old[505], abs=1e-6) and row[fresh] != pytest.approx(old[fresh], abs=1e-6)


def test_a_post_ingested_with_its_record_is_ranked_with_its_counts(rank: RankModel, layout: ArtifactLayout) -> None:
    """The index keeps the features a post was written with (index_write computes them from the
    record the ingester sends): the next request ranks the post with them, the others as before."""
    fresh, vector = 123_457, _unit(1, seed=78)
    scores = []
    writer = IndexWriter.open(layout.index_dir.root)
    try:
        for features in (None, [{"percentiles": [1.0, 1.0], "tags": ["drama"]}], None):
            writer.write(np.array([Op.UPSERT]), np.array([fresh]), vector, features)
            out = _ok(rank, _request([_member(HISTORY)], [[fresh, 505]], k=2))
            scores.append(dict(zip(out["IDS"][0].tolist(), out["SCORES"][0].tolist(), strict=True)))
    finally:
        writer.close()
    bare, featured, bare_again = scores
    assert featured[505] == pytest.approx(bare[505], abs=1e-6)
    assert featured[fresh] != pytest.approx(bare[fresh], abs=1e-4)
    assert bare_again == pytest.approx(bare, abs=1e-6)  # written again without: back to none


def test_what_a_model_loaded_is_left_out_of_the_collectors_full_passes(layout: ArtifactLayout) -> None:
    import gc

    from feedserve.triton.base import settle_loaded_objects

    model = RankModel()
    model.setup(layout, {"max_candidates": "64"})
    loaded = model.posts.table  # the post feature table: tracked until settled
    assert gc.is_tracked(loaded) and any(o is loaded for o in gc.get_objects())
    try:
        settle_loaded_objects()
        assert gc.get_freeze_count() > 0 and not any(o is loaded for o in gc.get_objects())
        made_later = {"a request's": [1, 2]}
        assert any(o is made_later for o in gc.get_objects())  # what requests allocate is collected as before
        assert not isinstance(_ok(model, _request([_member(HISTORY)], [[505, 510]])), RequestError)
    finally:
        gc.unfreeze()


def test_an_engagement_logged_since_the_build_is_co_engaged_at_the_next_merge(
    rank: RankModel, layout: ArtifactLayout
) -> None:
    """Members who liked the history's posts and then a post the build never saw liked: once
    engage_write has logged it, the rank model's table holds it and the post is ranked with it."""
    from feedserve.rank.engagements import EngagementWriter

    fresh, other = 123_458, 505
    request = _request([_member(HISTORY)], [[fresh, other]], k=2)
    before = dict(zip(*(_ok(rank, request)[k][0].tolist() for k in ("IDS", "SCORES")), strict=True))
    assert rank.coengagement.table.scores(3, [501, 502], [fresh]).tolist() == [0.0]
    writer = EngagementWriter.open(layout.index_dir.root)
    try:
        members = np.arange(9000, 9040, dtype=np.int64)
        writer.write(members, np.full(40, 501, np.int64), np.full(40, 10, np.int64))
        writer.write(members, np.full(40, fresh, np.int64), np.full(40, 11, np.int64))
    finally:
        writer.close()
    rank.coengagement.update()  # what its thread does every second
    assert rank.coengagement.table.scores(3, [501, 502], [fresh]).tolist()[0] > 0
    after = dict(zip(*(_ok(rank, request)[k][0].tolist() for k in ("IDS", "SCORES")), strict=True))
    assert after[other] == pytest.approx(before[other], abs=1e-6)
    assert after[fresh] != pytest.approx(before[fresh], abs=1e-4)


def test_a_feed_ranker_serves_its_six_tasks_by_the_rendered_weights(layout: ArtifactLayout, tmp_path: Path) -> None:
    """A ranker trained on the feed's tasks (feedserve.training.rank_feed), exported into artifacts
    and served with `feedserve render --task-weights feed`: one probability per task, ranked by
    their weighted sum; the default weights, which name other tasks, are refused at load by name."""
    from feedserve.ops.builder import SAMPLE_CORPUS, build_ranker
    from feedserve.rank.model import COUNT_BUCKETS_FILE, RankerConfig
    from feedserve.rank.train import FEED_TASK_WEIGHTS
    from feedserve.training.feed_log import COUNTS, load_feed_log, synthetic_impressions
    from feedserve.training.rank_feed import feed_config
    from feedserve.triton.repository import RepositorySettings, render_configs, task_weights_arg

    torch.manual_seed(1)
    config = feed_config(DIM, d_model=16, n_heads=2, n_layers=1, max_history=20, id_buckets=1024, max_rank=24)
    package = tmp_path / "feed-ranker"
    GenerativeRanker(config, known_ids=torch.from_numpy(POSTS)).save(package)
    root = tmp_path / "artifacts"
    shutil.copytree(layout.root, root)
    feed_layout = ArtifactLayout(root)
    # Its counts would read 0 for every post: without its own cut points for them (the encoder's are
    # MovieLens's), and over a corpus without them (MovieLens), the build refuses by name.
    log = tmp_path / "feed-log"
    synthetic_impressions(n_members=20, n_posts=100, n_authors=6, sessions=3, shown=8).save(log)
    with pytest.raises(ValueError, match="'views'.*no cut points"):
        build_ranker(feed_layout, package, log, force=True)
    saved = load_feed_log(log)
    saved.count_buckets(saved.cutoff()).save(package / COUNT_BUCKETS_FILE)
    with pytest.raises(ValueError, match="the counts .*'views'.* has \\['ratings'"):
        build_ranker(feed_layout, package, SAMPLE_CORPUS, force=True)
    build_ranker(feed_layout, package, log, force=True)
    assert PostFeatures.load(feed_layout.post_features).counts == COUNTS
    settings = RepositorySettings(task_weights=tuple(task_weights_arg("feed").items()))
    rendered = render_configs(settings)[ModelName.RANK].parameters
    params = {"max_candidates": "64", **{k: v.string_value for k, v in rendered.items() if k != "max_candidates"}}
    # A table of other counts (built by hand, or by an older build) is refused at load by name.
    PostFeatures({}, {}).save(feed_layout.post_features)
    feed_layout.write_manifest()
    with pytest.raises(ValueError, match="views_percentile"):
        RankModel().setup(feed_layout, params)
    rng = np.random.default_rng(5)
    PostFeatures(
        {int(p): rng.random(len(COUNTS)) for p in POSTS[::2]}, {int(p): ["ml", "kafka"] for p in POSTS[::3]}, COUNTS
    ).save(feed_layout.post_features)
    feed_layout.write_manifest()
    served = RankModel()
    served.setup(feed_layout, params)
    history = [(501, "share"), (502, "long dwell"), (503, "skip"), (504, "comment"), (999_999, "click")]
    candidates = [505, 510, 777_777, 520, 530]
    request = _request([_member(history)], [candidates], k=5)
    out = _ok(served, request)
    probabilities = _pytorch_probabilities(package, feed_layout, request, history, candidates)
    final = probabilities @ np.array([FEED_TASK_WEIGHTS[task] for task in config.tasks], np.float32)
    order = np.argsort(-final, kind="stable")
    assert out["TASK_SCORES"].shape == (1, 5, 6)
    assert out["IDS"][0].tolist() == np.array(candidates)[order].tolist()
    np.testing.assert_allclose(out["SCORES"][0], final[order], atol=1e-4)
    np.testing.assert_allclose(out["TASK_SCORES"][0], probabilities[order], atol=1e-4)
    # The history's feed actions are tokens of their own: read as neutral, the scores move.
    assert {"share", "long dwell", "skip", "comment", "click"} <= set(config.actions)
    neutral = _ok(served, _request([_member([(p, "view") for p, _ in history])], [candidates], k=5))
    assert not np.allclose(np.sort(neutral["SCORES"][0]), np.sort(out["SCORES"][0]), atol=1e-6)
    with pytest.raises(ValueError, match="must weigh exactly the ranker's tasks"):
        RankModel().setup(feed_layout, {"max_candidates": "64"})
    with pytest.raises(ValueError, match="in its order"):
        RankModel().setup(feed_layout, {**params, "tasks": ",".join(reversed(config.tasks))})
    assert RankerConfig.load(feed_layout.ranker_config).tasks == config.tasks


@pytest.mark.parametrize(
    "bad", ['{"like": NaN, "love": 0.5, "dislike": -1}', '{"like": "1", "love": 0.5, "dislike": -1}']
)
def test_task_weights_that_are_not_finite_numbers_are_refused_at_load(bad: str) -> None:
    """`render` refuses them; a hand-edited config's NaN answered every final score NaN, so the feed
    came back in retrieval order as a success."""
    from feedserve.rank.model import RankerConfig
    from feedserve.triton.rank import task_weights

    config = RankerConfig(content_dim=DIM, tasks=("like", "love", "dislike"))
    assert task_weights(config, None).tolist() == [DEFAULT_TASK_WEIGHTS[t] for t in config.tasks]
    with pytest.raises(ValueError, match="finite numbers"):
        task_weights(config, bad)


def test_rank_eval_refuses_a_weight_that_is_not_a_finite_number(capsys: pytest.CaptureFixture[str]) -> None:
    from feedserve.training import rank_eval

    with pytest.raises(SystemExit):
        rank_eval.main(["--ranker", "x", "--task-weights", '{"like": NaN}'])
    assert "argument --task-weights" in capsys.readouterr().err
