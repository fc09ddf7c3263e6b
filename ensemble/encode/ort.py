"""The ONNX Runtime encoder on CPU (what the Triton `encoder` backend runs by default).

Kept free of torch imports on purpose: the Triton python backend loads this module, and pulling
torch into every backend process would cost hundreds of MB and seconds of start-up.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from feedserve.schema import ONNX_INPUTS, ONNX_OUTPUT

logger = logging.getLogger(__name__)


class OnnxEncoder:
    """ONNX Runtime (CPUExecutionProvider) over the graph written by `feedserve.export.onnx`."""

    def __init__(self, path: Path, intra_op_threads: int | None = None) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX encoder not found: {path} (run `feedserve build`)")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = sorted(i.name for i in self.session.get_inputs())
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != sorted(ONNX_INPUTS) or ONNX_OUTPUT not in outputs:
            raise ValueError(
                f"{path}: graph has inputs {inputs} and outputs {outputs}, "
                f"expected inputs {list(ONNX_INPUTS)} and output {ONNX_OUTPUT!r}"
            )
        width = next(o for o in self.session.get_outputs() if o.name == ONNX_OUTPUT).shape[-1]
        if isinstance(width, int):
            self._dim = width
        else:
            # The exporter may leave the output width symbolic; one tiny run tells it.
            one = np.ones((1, 1), np.int64)
            self._dim = int(self.encode(one, one).shape[1])
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
