"""What runs the ranker's forward pass for `rank`: the exported graph on ONNX Runtime (the CPU
variant), or the saved PyTorch model on a device (the GPU variants, where `rank` is a KIND_GPU
instance). Both take the Tensorizer's tensors (feedserve.rank.data) and return the logits
[batch, candidates, tasks] as float32 numpy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from feedserve.rank.model import INPUTS, OUTPUT, GenerativeRanker

RUNTIMES = ("onnxruntime", "torch")
# How the served ranker computes attention (feedserve.rank.model.ATTENTIONS): FlexAttention is not
# served, since it compiles on the first call of each input shape (20 s to 4 min on an H200) and ran
# slower than split attention at every shape measured (benchmarks/reports/rank_gpu).
SERVED_ATTENTIONS = ("split", "dense")
# The PyTorch ranker's compute precision: fp32 (scores within 1e-4 of the exported graph's), or bf16
# autocast (the matrix products in bf16; scores move by about 1e-2, see the GPU tests).
DTYPES = ("fp32", "bf16")


class Scorer(Protocol):
    def __call__(self, inputs: dict[str, torch.Tensor]) -> np.ndarray: ...


class OnnxScorer:
    """The exported graph (feedserve.export.rank) on ONNX Runtime's CPU provider."""

    def __init__(self, graph: Path, intra_op_threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    def __call__(self, inputs: dict[str, torch.Tensor]) -> np.ndarray:
        (logits,) = self.session.run([OUTPUT], {name: inputs[name].numpy() for name in INPUTS})
        return np.asarray(logits)


class TorchScorer:
    """A saved GenerativeRanker (ranker.json + ranker.pt in `directory`) on `device`, in eval mode."""

    def __init__(self, directory: Path, device: str = "cuda", dtype: str = "fp32", attention: str = "split") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"rank: unknown dtype {dtype!r} ({', '.join(DTYPES)})")
        if attention not in SERVED_ATTENTIONS:
            raise ValueError(f"rank: attention {attention!r} is not served ({', '.join(SERVED_ATTENTIONS)})")
        self.device = torch.device(device)
        self.model = GenerativeRanker.load(directory).to(self.device)
        self.model.attention = attention
        self.autocast = dtype == "bf16"

    @torch.inference_mode()
    def __call__(self, inputs: dict[str, torch.Tensor]) -> np.ndarray:
        args: list[Any] = [inputs[name].to(self.device, non_blocking=True) for name in INPUTS]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(*args)
        return logits.float().cpu().numpy()
