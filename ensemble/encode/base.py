"""The one interface every encoder runtime serves: token batches in, unit-norm embeddings out.

Satisfied by `feedserve.encode.pytorch.TorchEncoder` (the reference, and the GPU runtime),
`feedserve.encode.ort.OnnxEncoder` (CPU serving) and `feedserve.encode.trt.TensorRTEncoder`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Encoder(Protocol):
    """Token batch (right- or left-padded, int64) -> L2-normalised embeddings [batch, dim]."""

    @property
    def dim(self) -> int: ...

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...
