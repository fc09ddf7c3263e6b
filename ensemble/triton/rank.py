"""The `rank` model: the GR ranker (ONNX Runtime on CPU, PyTorch on a GPU) over a member's retrieved
candidates.

A request row is a member record (its history: post ids with their actions, oldest first), the
member's retrieval embedding (QUERY) and the candidates retrieval returned for it, with their
scores. The ranker reads history and candidate content from the live index it follows, as `knn`
does (same files, same consistency: a post acknowledged by `index_write` has its content here
too), and candidate features from the artifacts' post feature and co-engagement tables (the
latter merged with the engagements logged since the build, in the index's directory or in Milvus:
feedserve.rank.engagements). It
returns the top K candidates by the final score (a weighted sum of the task probabilities, weights
in the `task_weights` parameter, plus `new_post_boost` for a post the ranker never trained on) and
each one's probability per task.

What it tolerates rather than refuses: an empty history (ranked by profile and features), history
or candidate posts missing from the index (ranked without content), duplicate candidates (ranked
once), -1 padding, a history longer than the ranker reads (the oldest dropped, as in the prompts).
What it refuses by name: more candidates than `max_candidates`, K out of range, a QUERY of the
wrong width, with NaN or not unit length, a candidate score that is not a cosine, ids below -1,
shapes that disagree.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from feedserve.artifacts import ArtifactLayout
from feedserve.index.engines import Engine
from feedserve.prompt.records import Member, parse_member
from feedserve.rank.coengagement import CoEngagement
from feedserve.rank.data import (
    ContentSource,
    PostTable,
    RankExample,
    Tensorizer,
    count_feature,
    counts_read,
    member_interactions,
    read_history,
)
from feedserve.rank.engagements import Follower, LiveCoEngagement, MilvusEngagements, MilvusFollower
from feedserve.rank.features import FeatureReader, PostFeatures
from feedserve.rank.model import RankerConfig, load_id_owners, owns
from feedserve.rank.runtime import RUNTIMES, OnnxScorer, Scorer, TorchScorer
from feedserve.rank.train import DEFAULT_TASK_WEIGHTS, boost_untrained, final_score, finite_boost, finite_weights
from feedserve.schema import (
    CANDIDATE_IDS,
    CANDIDATE_SCORES,
    IDS,
    NO_ID,
    QUERY,
    RECORDS,
    SCORES,
    TASK_SCORES,
    K,
    ModelName,
)
from feedserve.triton.base import (
    Arrays,
    BatchModel,
    RequestError,
    ServingIndex,
    check_2d,
    check_unit_rows,
    followed_index,
    milvus_index_name,
    milvus_uri_of,
    read_records,
    require,
    retention_seconds,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_CANDIDATES = 2000
DEFAULT_ENGAGEMENT_POLL_S = 1.0
# Retrieval scores are inner products of unit vectors; an fp16 or bf16 GPU index rounds them a little
# past 1 (bf16: under 1e-2), never by this much.
MAX_RETRIEVAL_SCORE = 1.05


@dataclass
class RankRequest:
    members: list[Member]
    queries: np.ndarray  # [b, d]
    candidates: list[np.ndarray]  # per row: unique ids, retrieval order, no padding
    scores: list[np.ndarray]
    ks: list[int]


class _Posts:
    """What the ranker reads of the posts of one batch (its history and candidates), fetched once:
    their vectors from the followed index, their features from the index where the post was written
    with them (a post ingested after the build) over the build's table."""

    def __init__(self, followed: ServingIndex, dim: int, table: PostFeatures) -> None:
        self.followed, self.dim, self.table = followed, dim, table
        self._warned = False

    def fetch(self, post_ids: np.ndarray) -> tuple[ContentSource, FeatureReader]:
        ids = np.unique(post_ids)
        index = self.followed.index
        if index is not None and index.dim != self.dim and not self._warned:
            self._warned = True  # another encoder's index: every post is ranked without content
            logger.warning("rank: the index holds %d-wide vectors, the ranker reads %d", index.dim, self.dim)
        if index is None or index.dim != self.dim:
            return PostTable(ids[:0], np.zeros((0, self.dim), np.float32)), self.table
        vectors, found, rows = index.lookup_rows(ids)
        return PostTable(ids[found], vectors[found]), self.table.overlay(rows) if rows else self.table


def task_weights(config: RankerConfig, value: str | None) -> np.ndarray:
    """The weights of `config.tasks` from the JSON object `value` (None: the defaults); every task of
    the ranker needs one and no other task may be named."""
    weights = json.loads(value) if value else DEFAULT_TASK_WEIGHTS
    if not isinstance(weights, dict) or set(weights) != set(config.tasks):
        raise ValueError(f"task_weights must weigh exactly the ranker's tasks {list(config.tasks)}, got {weights}")
    floats = finite_weights(weights)  # as `render` checks them: a hand-edited config too
    return np.array([floats[t] for t in config.tasks], np.float32)


def scorer(layout: ArtifactLayout, params: dict[str, str]) -> Scorer:
    """The ranker's runtime the rendered config asks for: the exported graph on ONNX Runtime (CPU),
    or the PyTorch model on the instance's device (`device`, set for a KIND_GPU instance)."""
    runtime = params.get("runtime", "onnxruntime")
    if runtime == "onnxruntime":
        return OnnxScorer(layout.ranker_onnx, int(params.get("intra_op_threads", "0")))
    if runtime == "torch":
        if not layout.ranker_weights.exists():
            raise ValueError(
                f"rank: no {layout.ranker_weights} (the PyTorch ranker a GPU variant runs); "
                "`feedserve build` writes it beside ranker.onnx"
            )
        layout.verify(layout.ranker_weights)
        return TorchScorer(
            layout.root, params.get("device", "cpu"), params.get("dtype", "fp32"), params.get("attention", "split")
        )
    raise ValueError(f"rank: unknown runtime {runtime!r} ({', '.join(RUNTIMES)})")


def top_k(final: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k highest scores, best first (ties keep retrieval order)."""
    return np.argsort(-final, kind="stable")[:k]


class RankModel(BatchModel[RankRequest]):
    name = ModelName.RANK

    def setup(self, layout: ArtifactLayout, params: dict[str, str]) -> None:
        layout.verify(*layout.ranker_files())
        self.config = RankerConfig.load(layout.ranker_config)
        self.max_candidates = int(params.get("max_candidates", DEFAULT_MAX_CANDIDATES))
        self.weights = task_weights(self.config, params.get("task_weights"))
        if params.get("tasks") and params["tasks"].split(",") != list(self.config.tasks):
            # Clients name TASK_SCORES' columns by this parameter: it must list the ranker's own order.
            raise ValueError(
                f"the config's tasks {params['tasks']} are not the ranker's, in its order: {list(self.config.tasks)}"
            )
        self.boost = finite_boost(params.get("new_post_boost", "0"))
        self.id_owners = self._id_owners(layout) if self.boost else None
        self.scorer = scorer(layout, params)
        self.followed = followed_index(layout, params, Engine(), "rank")
        table = PostFeatures.load(layout.post_features)
        unread = [count_feature(c) for c in counts_read(self.config.features) if c not in table.counts]
        if unread:  # they would be 0 for every post: a ranker trained on other counts (another corpus's)
            raise ValueError(
                f"the ranker reads {unread}, but {layout.post_features} holds the counts {list(table.counts)}"
            )
        self.posts = _Posts(self.followed, self.config.content_dim, table)
        # Who engaged with each post: the build's table and the engagements logged since
        # (engage_write: the local index's log, or Milvus's), merged in on a thread every `engagement_poll_s`.
        log: Path | Follower = layout.index_dir.engagements
        if params.get("index", "local") != "local":
            milvus = MilvusEngagements(
                milvus_uri_of(params, "rank"), milvus_index_name(params), retention_seconds(params, "rank")
            )
            log = MilvusFollower(milvus)
        self.coengagement = LiveCoEngagement(
            CoEngagement.load(layout.coengagement),
            log,
            float(params.get("engagement_poll_s", DEFAULT_ENGAGEMENT_POLL_S)),
        )
        self.coengagement.start()
        logger.info(
            "rank: %s runtime on %s, up to %d candidates, history %d, tasks %s weighted %s, new-post boost %g",
            params.get("runtime", "onnxruntime"),
            params.get("device", "cpu"),
            self.max_candidates,
            self.config.max_history,
            list(self.config.tasks),
            self.weights.tolist(),
            self.boost,
        )

    @staticmethod
    def _id_owners(layout: ArtifactLayout) -> torch.Tensor:
        """Which posts the ranker trained on, from its PyTorch weights (the exported graph hides them)."""
        if not layout.ranker_weights.exists():
            raise ValueError(
                f"rank: new_post_boost needs {layout.ranker_weights} (which posts the ranker trained on); "
                "`feedserve build` writes it beside ranker.onnx"
            )
        layout.verify(layout.ranker_weights)
        return load_id_owners(layout.root)

    def parse(self, inputs: dict[str, np.ndarray | None]) -> RankRequest:
        raw = require(inputs, RECORDS.name)
        b = raw.shape[0]
        queries = check_2d(QUERY.name, require(inputs, QUERY.name), np.float32)
        ids = check_2d(CANDIDATE_IDS.name, require(inputs, CANDIDATE_IDS.name), np.int64)
        scores = check_2d(CANDIDATE_SCORES.name, require(inputs, CANDIDATE_SCORES.name), np.float32)
        ks = check_2d(K.name, require(inputs, K.name), np.int64)
        if ids.shape[1] > self.max_candidates:
            raise RequestError(
                f"{CANDIDATE_IDS.name}: {ids.shape[1]} candidates per row; this ranker takes at most "
                f"{self.max_candidates} (max_candidates)"
            )
        if len(ids) != b:
            raise RequestError(f"{CANDIDATE_IDS.name}: {len(ids)} rows for {b} records")
        for spec, value, shape in (
            (QUERY, queries, (b, self.config.content_dim)),
            (CANDIDATE_SCORES, scores, (b, ids.shape[1])),
            (K, ks, (b, 1)),
        ):
            if value.shape != shape:
                raise RequestError(f"{spec.name}: expected shape {list(shape)}, got {list(value.shape)}")
        if (ids < NO_ID).any():
            raise RequestError(f"{CANDIDATE_IDS.name}: ids must be >= 0 ({NO_ID} pads a row)")
        for spec, value in ((QUERY, queries), (CANDIDATE_SCORES, scores)):
            if not np.isfinite(value).all():
                raise RequestError(f"{spec.name}: contains NaN or inf")
        # The ranker reads both at the scale retrieval gives them: a member embedding is unit length and
        # a score a cosine. A finite 1e15 would overflow its logits to NaN scores answered as a success,
        # and a vector 100 times too long already reorders the feed at random.
        check_unit_rows(QUERY.name, queries)
        if scores.size and (worst := float(np.abs(scores).max())) > MAX_RETRIEVAL_SCORE:
            raise RequestError(
                f"{CANDIDATE_SCORES.name}: retrieval scores are cosines, within +-{MAX_RETRIEVAL_SCORE:g}; "
                f"got {worst:.6g}"
            )
        for k in ks[:, 0].tolist():
            if not 1 <= k <= self.max_candidates:
                raise RequestError(f"{K.name}: k={k} is out of range [1, {self.max_candidates}]")
        members = read_records(inputs, parse_member)
        candidates, candidate_scores = [], []
        for row_ids, row_scores in zip(ids, scores, strict=True):
            real = row_ids != NO_ID
            _, first = np.unique(row_ids[real], return_index=True)  # a duplicate is ranked once
            keep = np.sort(first)
            candidates.append(row_ids[real][keep])
            candidate_scores.append(row_scores[real][keep])
        return RankRequest(members, queries, candidates, candidate_scores, ks[:, 0].tolist())

    def compute(self, items: Sequence[RankRequest]) -> list[Arrays | RequestError]:
        self.followed.refresh()
        return [self._rank(item) for item in items]

    def _rank(self, item: RankRequest) -> Arrays:
        b, tasks = len(item.members), len(self.config.tasks)
        widths = [min(k, len(c)) for k, c in zip(item.ks, item.candidates, strict=True)]
        ids = np.full((b, max(widths)), NO_ID, np.int64)
        final = np.zeros((b, max(widths)), np.float32)
        per_task = np.zeros((b, max(widths), tasks), np.float32)
        rows = [i for i in range(b) if len(item.candidates[i])]
        if rows:
            examples = [
                RankExample(
                    item.members[i].id,
                    member_interactions(item.members[i]),
                    item.queries[i],
                    item.candidates[i],
                    item.scores[i],
                    np.zeros((len(item.candidates[i]), tasks), np.float32),
                )
                for i in rows
            ]
            # The posts the ranker reads: a record's history may be longer than the ranker's.
            read = [it.post_id for x in examples for it in read_history(self.config, x.history)]
            content, features = self.posts.fetch(
                np.concatenate([np.array(read, np.int64), *(x.candidates for x in examples)])
            )
            tensors = Tensorizer(self.config, content, features, self.coengagement.table).batch(examples)
            logits = self.scorer(tensors)
            probabilities, scores = final_score(logits, self.weights)
            if self.id_owners is not None:
                untrained = ~owns(self.id_owners, tensors["candidate_ids"]).numpy()
                scores = boost_untrained(scores, untrained, self.boost)
            for j, i in enumerate(rows):
                n = len(item.candidates[i])
                top = top_k(scores[j, :n], widths[i])
                ids[i, : len(top)] = item.candidates[i][top]
                final[i, : len(top)] = scores[j, top]
                per_task[i, : len(top)] = probabilities[j, top]
        return {IDS.name: ids, SCORES.name: final, TASK_SCORES.name: per_task}

    def finalize(self) -> None:
        self.coengagement.close()
        super().finalize()


TritonPythonModel = RankModel
