"""The GR ranker exported to ONNX (feedserve.export.rank): one graph for any history length and
number of candidates, equal to PyTorch, and refused when it is not."""

from __future__ import annotations

from dataclasses import replace
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


def _model(config: RankerConfig = CONFIG) -> GenerativeRanker:
    torch.manual_seed(0)
    model = GenerativeRanker(config, known_ids=torch.arange(0, 10**6, 7))  # most sampled ids are new
    torch.nn.init.normal_(model.ids.weight)
    if model.new_post_id is not None:
        torch.nn.init.normal_(model.new_post_id)
    return model.eval()


@pytest.mark.parametrize(
    "config",
    [CONFIG, replace(CONFIG, post_tokens="residual", id_dropout=0.1, new_post_id="learned")],
    ids=["gated", "residual-new-post-id"],
)
def test_the_exported_ranker_equals_pytorch_on_any_shape(tmp_path: Path, config: RankerConfig) -> None:
    import onnxruntime as ort

    model = _model(config)
    worst = export_ranker(model, tmp_path / "ranker.onnx")
    assert worst < 1e-4
    session = ort.InferenceSession(str(tmp_path / "ranker.onnx"), providers=["CPUExecutionProvider"])
    inputs = sample_inputs(config, 2, 12, 200, (12, 1), seed=9)  # lengths the export never saw
    (got,) = session.run(["logits"], inputs)
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()
    assert got.shape == (2, 200, len(config.tasks)) and np.abs(got - want).max() < 1e-4


def test_a_graph_that_differs_from_the_model_is_refused(tmp_path: Path) -> None:
    model = _model()
    export_ranker(model, tmp_path / "ranker.onnx")
    with torch.no_grad():
        model.towers[0].bias += 1.0  # the model moved on; the graph did not
    with pytest.raises(ParityError, match="logits differ"):
        check_parity(model, tmp_path / "ranker.onnx")
