"""The GR ranker exported to ONNX (feedserve.export.rank): one graph for any history length and
number of candidates, equal to PyTorch, and refused when it is not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from feedserve.export.onnx import ParityError
from feedserve.export.rank import check_parity, export_ranker, sample_inputs
from feedserve.rank.model import GenerativeRanker, RankerConfig

# wide: the linear feature term exported too (the shipped ranker, exported in the integration tests, has none).
CONFIG = RankerConfig(
    content_dim=16, d_model=32, n_heads=4, n_layers=2, max_history=12, id_buckets=4096, dropout=0.0, wide=True
)


def _model() -> GenerativeRanker:
    torch.manual_seed(0)
    model = GenerativeRanker(CONFIG, known_ids=torch.arange(0, 10**6, 7))
    torch.nn.init.normal_(model.ids.weight)
    return model.eval()


def test_the_exported_ranker_equals_pytorch_on_any_shape(tmp_path: Path) -> None:
    import onnxruntime as ort

    model = _model()
    worst = export_ranker(model, tmp_path / "ranker.onnx")
    assert worst < 1e-4
    session = ort.InferenceSession(str(tmp_path / "ranker.onnx"), providers=["CPUExecutionProvider"])
    inputs = sample_inputs(CONFIG, 2, 12, 200, (12, 1), seed=9)  # lengths the export never saw
    (got,) = session.run(["logits"], inputs)
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()
    assert got.shape == (2, 200, len(CONFIG.tasks)) and np.abs(got - want).max() < 1e-4


def test_a_graph_that_differs_from_the_model_is_refused(tmp_path: Path) -> None:
    model = _model()
    export_ranker(model, tmp_path / "ranker.onnx")
    with torch.no_grad():
        model.towers[0].bias += 1.0  # the model moved on; the graph did not
    with pytest.raises(ParityError, match="logits differ"):
        check_parity(model, tmp_path / "ranker.onnx")
