"""Encoder runtimes that need no torch: ONNX Runtime on CPU (the Triton `encoder` backend)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np

from feedserve.schema import ONNX_INPUTS, ONNX_OUTPUT

logger = logging.getLogger(__name__)


class Encoder(Protocol):
    """Token batch (right- or left-padded, int64) -> L2-normalised embeddings [batch, dim]."""

    @property
    def dim(self) -> int: ...

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...


class OnnxEncoder:
    def __init__(self, path: Path, intra_op_threads: int | None = None) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"ONNX encoder not found: {path} (run `feedserve build`)")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in self.session.get_inputs()]
        if sorted(names) != sorted(ONNX_INPUTS):
            raise ValueError(f"{path}: inputs {names}, expected {list(ONNX_INPUTS)}")
        dim = self.session.get_outputs()[0].shape[-1]
        # The exporter may leave the output width symbolic; one tiny run tells it.
        self._dim = dim if isinstance(dim, int) else int(self.encode(np.ones((1, 1), np.int64), np.ones((1, 1), np.int64)).shape[1])
        logger.info("ONNX encoder %s: dim %d", path, self._dim)

    @property
    def dim(self) -> int:
        return self._dim

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = {
            ONNX_INPUTS[0]: np.ascontiguousarray(input_ids, dtype=np.int64),
            ONNX_INPUTS[1]: np.ascontiguousarray(attention_mask, dtype=np.int64),
        }
        (out,) = self.session.run([ONNX_OUTPUT], feeds)
        return np.asarray(out, dtype=np.float32)
