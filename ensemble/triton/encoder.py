"""`encoder` as a python backend: ONNX Runtime over the exported graph on CPU (`runtime:
onnxruntime`), or PyTorch bf16 on a GPU (`runtime: torch`, for GPU hosts without TensorRT; the
TensorRT variant is a `tensorrt_plan` model, no Python).

Requests in a dynamic batch may differ in length (the inputs are ragged). Rows are trimmed to their
own length, sorted, and split into runs where a run costs less than the padding it would add
(`group_rows`), so one long prompt does not make every short one pay for its padding and rows of
nearly one length share a run.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from feedserve.artifacts import ArtifactLayout, EncoderSettings
from feedserve.encode.base import Encoder
from feedserve.encode.ort import OnnxEncoder
from feedserve.prompt.builder import pad_length
from feedserve.schema import ATTENTION_MASK, EMBEDDING, INPUT_IDS, ModelName
from feedserve.triton.base import Arrays, BatchModel, RequestError, check_2d, require

logger = logging.getLogger(__name__)


@dataclass
class Tokens:
    rows: list[np.ndarray]  # each row's unpadded token ids


# How the rows of a batch are cut into encoder runs (benchmarks/reports/tuning.md measures each):
# "longest" pads every row to the batch's longest; "buckets" pads each row to its length bucket, one
# run per bucket; "cost" (the default) cuts the sorted rows where a run costs less than the padding.
GROUPINGS = ("cost", "buckets", "longest")
# The CPU graph (RepositorySettings.encoder_precision): "auto" is int8 where `feedserve build` wrote one.
PRECISIONS = ("auto", "fp32", "int8")
# The cost model, in tokens, fitted to ONNX Runtime on the default model (fp32 and int8 alike): a run
# costs about 32 tokens of fixed overhead, and a token's cost grows with the run's width (attention)
# by width/512.
RUN_COST_TOKENS = 32.0
ATTENTION_WIDTH = 512.0


def group_rows(
    lengths: Sequence[int], max_rows: int, grouping: str = "cost", buckets: Sequence[int] = ()
) -> list[tuple[list[int], int]]:
    """Row indices in runs of at most `max_rows`, each with the width its rows are padded to."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    if grouping == "longest":
        longest = max(lengths, default=0)
        return [(order[s : s + max_rows], longest) for s in range(0, len(order), max_rows)]
    if grouping == "buckets":
        by_bucket: dict[int, list[int]] = {}
        for i in order:
            by_bucket.setdefault(pad_length(lengths[i], buckets), []).append(i)
        return [
            (rows[s : s + max_rows], width) for width, rows in by_bucket.items() for s in range(0, len(rows), max_rows)
        ]
    # Optimal cuts of the sorted rows (dynamic programming, O(n * max_rows)): a run spans sorted rows
    # i..j-1 and is padded to its longest, the last one.
    sizes = [lengths[i] for i in order]
    best = [0.0] + [float("inf")] * len(sizes)
    cut = [0] * (len(sizes) + 1)
    for j in range(1, len(sizes) + 1):
        width = sizes[j - 1]
        per_row = width * (1.0 + width / ATTENTION_WIDTH)
        for i in range(max(0, j - max_rows), j):
            cost = best[i] + (j - i) * per_row + RUN_COST_TOKENS
            if cost < best[j]:
                best[j], cut[j] = cost, i
    runs = []
    j = len(sizes)
    while j > 0:
        runs.append((order[cut[j] : j], sizes[j - 1]))
        j = cut[j]
    return runs[::-1]


def padded_runs(
    rows: Sequence[np.ndarray], max_rows: int, grouping: str = "cost", buckets: Sequence[int] = ()
) -> list[tuple[list[int], np.ndarray, np.ndarray]]:
    """Unpadded token rows as encoder runs: (row indices, input ids, attention mask), right-padded."""
    runs = []
    for group, width in group_rows([len(r) for r in rows], max_rows, grouping, buckets):
        ids = np.zeros((len(group), width), np.int64)
        mask = np.zeros((len(group), width), np.int64)
        for j, i in enumerate(group):
            ids[j, : len(rows[i])] = rows[i]
            mask[j, : len(rows[i])] = 1
        runs.append((group, ids, mask))
    return runs


class EncoderModel(BatchModel[Tokens]):
    name = ModelName.ENCODER

    def setup(self, layout: ArtifactLayout, params: dict[str, str]) -> None:
        # What it reads beside the graph, checked as the graph is: a stub reloaded after these
        # changed would otherwise serve the graph with another vocabulary or width.
        layout.verify_serving_settings()
        self.settings = EncoderSettings.load(layout.settings)
        self.max_rows = int(params.get("max_rows_per_run", "32"))
        self.grouping = params.get("grouping", "cost")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"encoder: unknown grouping {self.grouping!r} ({', '.join(GROUPINGS)})")
        self.encoder = self._runtime(layout, params)
        logger.info(
            "encoder: %s runtime, %s grouping, up to %d rows per run",
            params.get("runtime", "onnxruntime"),
            self.grouping,
            self.max_rows,
        )
        # Prompt tokens -> embedding, least recently used out first. A member retrieved again with an
        # unchanged profile and history has the same tokens and is not re-encoded; any change to
        # them (a new engaged post, a new headline) changes the tokens and misses.
        self.cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.cache_rows = int(params.get("cache_rows", "10000"))
        self.cache_hits = self.cache_misses = 0
        # Out-of-vocabulary ids would fail the whole ONNX run, so they are rejected per request.
        self.vocab_size = layout.vocab_size()

    def _runtime(self, layout: ArtifactLayout, params: dict[str, str]) -> Encoder:
        runtime = params.get("runtime", "onnxruntime")
        if runtime == "onnxruntime":
            threads = int(params.get("intra_op_threads", "0")) or os.cpu_count() or 1
            graph = self._graph(layout, params.get("precision", "fp32"))
            layout.verify(graph)
            return OnnxEncoder(graph, intra_op_threads=threads)
        if runtime == "torch":
            from feedserve.encode.pytorch import TorchEncoder  # torch only in the processes that run it

            layout.verify(layout.hf_dir)
            # compute() pads every group on the right, which lets the fused causal kernel run.
            return TorchEncoder(layout.hf_dir, self.settings, device=params.get("device", "cuda"), right_padded=True)
        raise ValueError(f"encoder: unknown runtime {runtime!r} (onnxruntime or torch)")

    @staticmethod
    def _graph(layout: ArtifactLayout, precision: str) -> Path:
        """The ONNX graph the rendered precision asks for (feedserve.triton.repository.RepositorySettings)."""
        if precision == "fp32":
            return layout.onnx
        if precision not in PRECISIONS:
            raise ValueError(f"encoder: unknown precision {precision!r} ({', '.join(PRECISIONS)})")
        if layout.onnx_int8.exists():
            return layout.onnx_int8
        if precision == "int8":
            raise ValueError(
                f"encoder: no int8 graph at {layout.onnx_int8}: `feedserve build` writes it when it passes "
                "its parity check; render with --precision fp32 or auto"
            )
        logger.info("encoder: no int8 graph was built for this model; serving fp32")
        return layout.onnx

    def parse(self, inputs: dict[str, np.ndarray | None]) -> Tokens:
        ids = check_2d(INPUT_IDS.name, require(inputs, INPUT_IDS.name), np.int64)
        mask = check_2d(ATTENTION_MASK.name, require(inputs, ATTENTION_MASK.name), np.int64)
        if ids.shape != mask.shape:
            raise RequestError(
                f"{INPUT_IDS.name} {list(ids.shape)} and {ATTENTION_MASK.name} {list(mask.shape)} differ in shape"
            )
        if ids.shape[1] > self.settings.max_prompt_tokens:
            raise RequestError(
                f"{INPUT_IDS.name}: {ids.shape[1]} tokens exceed the limit of {self.settings.max_prompt_tokens}"
            )
        if not np.isin(mask, (0, 1)).all():
            raise RequestError(f"{ATTENTION_MASK.name}: values must be 0 or 1")
        if ids.min(initial=0) < 0 or ids.max(initial=0) >= self.vocab_size:
            raise RequestError(f"{INPUT_IDS.name}: token ids must be in [0, {self.vocab_size})")
        lengths = mask.sum(axis=1)
        if (lengths == 0).any():
            raise RequestError(f"{ATTENTION_MASK.name}: a row has no tokens")
        # Right padding is the contract; a row with holes in its mask would be silently misread.
        if not (mask[:, : lengths.max()] == (np.arange(lengths.max()) < lengths[:, None])).all():
            raise RequestError(f"{ATTENTION_MASK.name}: rows must be right-padded (1s then 0s)")
        return Tokens([ids[i, : lengths[i]] for i in range(len(ids))])

    def compute(self, items: Sequence[Tokens]) -> list[Arrays | RequestError]:
        rows = [r for it in items for r in it.rows]
        embeddings: list[np.ndarray | None] = [self._cached(r) for r in rows]
        todo = [i for i, e in enumerate(embeddings) if e is None]
        for group, ids, mask in padded_runs(
            [rows[i] for i in todo], self.max_rows, self.grouping, self.settings.length_buckets
        ):
            for g, vec in zip(group, self.encoder.encode(ids, mask), strict=True):
                embeddings[todo[g]] = vec
                self._remember(rows[todo[g]], vec)
        outputs: list[Arrays | RequestError] = []
        pos = 0
        for it in items:
            outputs.append({EMBEDDING.name: np.stack(embeddings[pos : pos + len(it.rows)])})  # type: ignore[arg-type]
            pos += len(it.rows)
        return outputs

    def _cached(self, row: np.ndarray) -> np.ndarray | None:
        if not self.cache_rows:
            return None
        vec = self.cache.get(key := row.tobytes())
        if vec is None:
            self.cache_misses += 1
            return None
        self.cache.move_to_end(key)
        self.cache_hits += 1
        return vec

    def _remember(self, row: np.ndarray, vec: np.ndarray) -> None:
        if self.cache_rows:
            self.cache[row.tobytes()] = vec.copy()  # not a view that would keep its whole batch alive
            while len(self.cache) > self.cache_rows:
                self.cache.popitem(last=False)


TritonPythonModel = EncoderModel
