"""The one place that names every Triton model, tensor, dtype and dimension of the pipeline.

Configs (`feedserve.triton.repository`), backends (`feedserve.triton`) and clients (`feedserve.clients`)
all read these specs, so a renamed tensor or a changed dtype is a one-line change here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

import numpy as np


class ModelName(StrEnum):
    PREPROCESS_POST = "preprocess_post"
    PREPROCESS_MEMBER = "preprocess_member"
    ENCODER = "encoder"
    KNN = "knn"
    EMBED_POST = "embed_post"
    EMBED_MEMBER = "embed_member"
    RETRIEVE = "retrieve"
    INDEX_WRITE = "index_write"
    ENGAGE_WRITE = "engage_write"
    RANK = "rank"
    FEED = "feed"


class RecordKind(StrEnum):
    POST = "post"
    MEMBER = "member"


# Triton datatype (as in config.pbtxt TYPE_*, and as the KServe v2 protocol spells it) -> numpy.
_NP_DTYPES: Final[dict[str, type]] = {
    "BYTES": np.object_,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP32": np.float32,
    "FP16": np.float16,
    "BOOL": np.bool_,
}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as one request sees it, without the batch dimension Triton adds in front."""

    name: str
    datatype: str  # KServe v2 spelling: BYTES, INT64, FP32...
    dims: tuple[int, ...]
    optional: bool = False
    # Let the dynamic batcher group requests whose shapes differ in this input (the backend pads).
    ragged: bool = False

    @property
    def np_dtype(self) -> type:
        return _NP_DTYPES[self.datatype]

    @property
    def config_dtype(self) -> str:
        return "TYPE_STRING" if self.datatype == "BYTES" else f"TYPE_{self.datatype}"


# One JSON record (post or member) per batch row.
RECORDS = TensorSpec("RECORDS", "BYTES", (1,))
# Token ids and mask of one prompt per row; rows of one request share a length (right-padded).
INPUT_IDS = TensorSpec("INPUT_IDS", "INT64", (-1,), ragged=True)
ATTENTION_MASK = TensorSpec("ATTENTION_MASK", "INT64", (-1,), ragged=True)
# Post ids a member already engaged with: never retrieved again. -1 pads rows to a common length.
EXCLUDE_IDS = TensorSpec("EXCLUDE_IDS", "INT64", (-1,), optional=True, ragged=True)
# L2-normalised embedding (after Matryoshka truncation): inner product == cosine similarity.
EMBEDDING = TensorSpec("EMBEDDING", "FP32", (-1,))
QUERY = TensorSpec("QUERY", "FP32", (-1,))
# How many posts to return for this row, 1..max_k (max_k is in the knn config's parameters).
K = TensorSpec("K", "INT64", (1,))
IDS = TensorSpec("IDS", "INT64", (-1,))
SCORES = TensorSpec("SCORES", "FP32", (-1,))

# Writes to the live index (`index_write`), one post per row: OP 1 upserts POST_ID with its EMBEDDING
# (re-embedding replaces), OP 2 deletes it (EMBEDDING may be left out of delete-only requests).
# LSN: the write's sequence number in the index's log, returned once it is durable and applied.
OP = TensorSpec("OP", "INT64", (1,))
POST_ID = TensorSpec("POST_ID", "INT64", (1,))
WRITE_EMBEDDING = TensorSpec("EMBEDDING", "FP32", (-1,), optional=True)
LSN = TensorSpec("LSN", "INT64", (1,))
# index_write: each row's post record (optional; the ingester sends it). Where the posts live in
# Milvus, the ranking stage's features of the post are computed from it and stored beside it.
WRITE_RECORDS = TensorSpec("RECORDS", "BYTES", (1,), optional=True)
# Engagements (`engage_write`), one per row: MEMBER_ID engaged with POST_ID at ENGAGED_AT (unix
# seconds); LSN: the batch's sequence number in the engagement log, returned once it is durable.
MEMBER_ID = TensorSpec("MEMBER_ID", "INT64", (1,))
ENGAGED_AT = TensorSpec("ENGAGED_AT", "INT64", (1,))
ENGAGE_COLUMNS: Final[tuple[TensorSpec, ...]] = (MEMBER_ID, POST_ID, ENGAGED_AT)
OP_UPSERT: Final[int] = 1
OP_DELETE: Final[int] = 2

# The ranker (`rank`): a member's retrieved candidates, -1-padded, with their retrieval scores; it
# returns the top K of them (IDS, SCORES: the final score) and each one's probability per task
# (TASK_SCORES [K, tasks], tasks in the order of the rank config's `tasks` parameter). `feed` retrieves
# CANDIDATES posts and ranks them: retrieval and ranking in one request.
CANDIDATE_IDS = TensorSpec("CANDIDATE_IDS", "INT64", (-1,), ragged=True)
CANDIDATE_SCORES = TensorSpec("CANDIDATE_SCORES", "FP32", (-1,), ragged=True)
TASK_SCORES = TensorSpec("TASK_SCORES", "FP32", (-1, -1))
CANDIDATES = TensorSpec("CANDIDATES", "INT64", (1,))

# Rows per request the rendered models take by default (their config's max_batch_size).
MAX_BATCH: Final[int] = 64

# Padding value for EXCLUDE_IDS and for IDS when fewer than k posts exist.
NO_ID: Final[int] = -1


@dataclass(frozen=True)
class ModelIO:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


IO: Final[dict[ModelName, ModelIO]] = {
    ModelName.PREPROCESS_POST: ModelIO((RECORDS,), (INPUT_IDS, ATTENTION_MASK)),
    ModelName.PREPROCESS_MEMBER: ModelIO((RECORDS,), (INPUT_IDS, ATTENTION_MASK, EXCLUDE_IDS)),
    ModelName.ENCODER: ModelIO((INPUT_IDS, ATTENTION_MASK), (EMBEDDING,)),
    ModelName.KNN: ModelIO((QUERY, K, EXCLUDE_IDS), (IDS, SCORES)),
    ModelName.EMBED_POST: ModelIO((RECORDS,), (EMBEDDING,)),
    ModelName.EMBED_MEMBER: ModelIO((RECORDS,), (EMBEDDING,)),
    ModelName.RETRIEVE: ModelIO((RECORDS, K), (IDS, SCORES)),
    ModelName.INDEX_WRITE: ModelIO((OP, POST_ID, WRITE_EMBEDDING, WRITE_RECORDS), (LSN,)),
    ModelName.ENGAGE_WRITE: ModelIO(ENGAGE_COLUMNS, (LSN,)),
    ModelName.RANK: ModelIO((RECORDS, QUERY, CANDIDATE_IDS, CANDIDATE_SCORES, K), (IDS, SCORES, TASK_SCORES)),
    ModelName.FEED: ModelIO((RECORDS, K, CANDIDATES), (IDS, SCORES, TASK_SCORES)),
}

# Names of the ONNX graph's inputs/outputs (the exporter and the ONNX Runtime encoder share them).
ONNX_INPUTS: Final[tuple[str, str]] = ("input_ids", "attention_mask")
ONNX_OUTPUT: Final[str] = "embedding"
