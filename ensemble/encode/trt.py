"""A TensorRT plan as an `Encoder` (GPU only): the runtime of the `gpu-trt` variant's parity checks.

Triton serves the plan itself (a `tensorrt_plan` model, no Python); this class runs the same plan
in-process, with PyTorch CUDA tensors as its buffers, so `feedserve.export.tensorrt` can check it
against the PyTorch reference before the plan is served. Where TensorRT or a GPU is absent,
`unavailable_reason()` says which.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from feedserve.errors import ExportError
from feedserve.schema import ATTENTION_MASK, EMBEDDING, INPUT_IDS


class TensorRTUnavailable(ExportError):
    """TensorRT or a CUDA GPU is missing here; the message says which."""


class EngineBuildError(ExportError):
    """TensorRT refused the network or the build failed."""


def unavailable_reason(precision: str = "fp16") -> str | None:
    """None when an engine can be built here, else why not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return (
            "TensorRT is not installed (it ships in the NVIDIA Triton container, or `pip install tensorrt`); "
            "the gpu-trt variant cannot be built here"
        )
    try:
        import torch
    except ImportError:
        return "PyTorch is needed to hold the engine's buffers on the GPU and is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (TensorRT builds an engine for the GPU it runs on)"
    if precision == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        return f"fp8 needs compute capability 8.9 or newer; this GPU is {torch.cuda.get_device_capability()}"
    return None


class TensorRTEncoder:
    """Runs a plan with PyTorch CUDA tensors as its buffers; the `Encoder` interface."""

    def __init__(self, plan_path: Path) -> None:
        if reason := unavailable_reason():
            raise TensorRTUnavailable(reason)
        import tensorrt as trt
        import torch

        self._torch = torch
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise EngineBuildError(f"{plan_path}: not a TensorRT plan for this TensorRT and GPU (rebuild it)")
        self.context = self.engine.create_execution_context()
        self._dim = int(self.engine.get_tensor_shape(EMBEDDING.name)[-1])

    @property
    def dim(self) -> int:
        return self._dim

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        torch = self._torch
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, np.int64)).cuda()
        mask = torch.from_numpy(np.ascontiguousarray(attention_mask, np.int64)).cuda()
        out = torch.empty((ids.shape[0], self._dim), dtype=torch.float32, device="cuda")
        for name, tensor in ((INPUT_IDS.name, ids), (ATTENTION_MASK.name, mask)):
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        self.context.set_tensor_address(EMBEDDING.name, out.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineBuildError("TensorRT execution failed")
        stream.synchronize()
        return out.cpu().numpy()
