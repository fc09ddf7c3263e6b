"""`encoder` as a python backend: ONNX Runtime over the exported graph on CPU (`runtime:
onnxruntime`), or PyTorch bf16 on a GPU (`runtime: torch`, for GPU hosts without TensorRT; the
TensorRT variant is a `tensorrt_plan` model, no Python).

Requests in a dynamic batch may differ in length (the inputs are ragged). Rows are trimmed to their
own length, sorted, and run in groups padded to a length bucket, so one long prompt does not make
every short one pay for its padding.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from feedserve.artifacts import ArtifactLayout, EncoderSettings
from feedserve.prompts import pad_length
from feedserve.runtime import Encoder, OnnxEncoder
from feedserve.schema import ATTENTION_MASK, EMBEDDING, INPUT_IDS, ModelName
from feedserve.triton.base import Arrays, BatchModel, RequestError, check_2d, require

logger = logging.getLogger(__name__)


@dataclass
class Tokens:
    rows: list[np.ndarray]  # each row's unpadded token ids


class EncoderModel(BatchModel[Tokens]):
    name = ModelName.ENCODER

    def setup(self, layout: ArtifactLayout, params: dict[str, str]) -> None:
        self.settings = EncoderSettings.load(layout.settings)
        self.max_rows = int(params.get("max_rows_per_run", "32"))
        self.encoder = self._runtime(layout, params)
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
            return OnnxEncoder(layout.root / params.get("onnx_file", layout.onnx.name), intra_op_threads=threads)
        if runtime == "torch":
            from feedserve.encoder import TorchEncoder  # torch only in the processes that run it

            # compute() pads every group on the right, which lets the fused causal kernel run.
            return TorchEncoder(layout.hf_dir, self.settings, device=params.get("device", "cuda"), right_padded=True)
        raise ValueError(f"encoder: unknown runtime {runtime!r} (onnxruntime or torch)")

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

    def _groups(self, lengths: Sequence[int]) -> list[tuple[list[int], int]]:
        """Row indices grouped by length bucket, at most max_rows per group, with the group's width."""
        by_bucket: dict[int, list[int]] = {}
        for i in sorted(range(len(lengths)), key=lengths.__getitem__):
            by_bucket.setdefault(pad_length(lengths[i], self.settings.length_buckets), []).append(i)
        return [
            (rows[start : start + self.max_rows], width)
            for width, rows in by_bucket.items()
            for start in range(0, len(rows), self.max_rows)
        ]

    def compute(self, items: Sequence[Tokens]) -> list[Arrays | RequestError]:
        rows = [r for it in items for r in it.rows]
        embeddings: list[np.ndarray | None] = [self._cached(r) for r in rows]
        todo = [i for i, e in enumerate(embeddings) if e is None]
        for group, width in self._groups([len(rows[i]) for i in todo]):
            group = [todo[g] for g in group]
            ids = np.zeros((len(group), width), np.int64)
            mask = np.zeros((len(group), width), np.int64)
            for j, i in enumerate(group):
                ids[j, : len(rows[i])] = rows[i]
                mask[j, : len(rows[i])] = 1
            for i, vec in zip(group, self.encoder.encode(ids, mask), strict=True):
                embeddings[i] = vec
                self._remember(rows[i], vec)
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
