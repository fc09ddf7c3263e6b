"""Pooling, padding invariance and Matryoshka truncation on a tiny random LLaMA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from feedserve.artifacts import EncoderSettings
from feedserve.encode.pytorch import EmbeddingModel, TorchEncoder, last_token_pool, mean_pool, normalize_truncate


def _pad(rows: list[np.ndarray], side: str) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows) + 3  # extra padding beyond the longest row too
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    return ids, mask


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_same_vector_alone_or_in_a_padded_batch(tiny_checkpoint: Path, pooling: str, side: str) -> None:
    encoder = TorchEncoder(tiny_checkpoint, EncoderSettings(pooling=pooling))  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    rows = [rng.integers(4, 300, n) for n in (9, 31, 2, 17)]
    batched = encoder.encode(*_pad(rows, side))
    for i, row in enumerate(rows):
        alone = encoder.encode(row[None], np.ones((1, len(row)), np.int64))
        np.testing.assert_allclose(batched[i], alone[0], atol=1e-5)


def test_matryoshka_truncates_and_renormalises(tiny_checkpoint: Path) -> None:
    full = TorchEncoder(tiny_checkpoint, EncoderSettings())
    small = TorchEncoder(tiny_checkpoint, EncoderSettings(dim=16))
    ids = np.random.default_rng(1).integers(4, 300, (3, 12))
    mask = np.ones_like(ids)
    a, b = full.encode(ids, mask), small.encode(ids, mask)
    assert a.shape == (3, 64) and b.shape == (3, 16) and small.dim == 16
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(b, a[:, :16] / np.linalg.norm(a[:, :16], axis=1, keepdims=True), atol=1e-6)


def test_pooling_functions() -> None:
    hidden = torch.arange(12, dtype=torch.float32).reshape(1, 4, 3)
    right = torch.tensor([[1, 1, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1]])
    assert mean_pool(hidden, right).tolist() == [[1.5, 2.5, 3.5]]
    assert last_token_pool(hidden, right).tolist() == [[3.0, 4.0, 5.0]]
    assert last_token_pool(hidden, left).tolist() == [[9.0, 10.0, 11.0]]
    out = normalize_truncate(torch.tensor([[3.0, 4.0, 12.0]]), 2)
    assert torch.allclose(out, torch.tensor([[0.6, 0.8]]))


def test_bad_settings_are_refused(tiny_checkpoint: Path) -> None:
    backbone = TorchEncoder(tiny_checkpoint, EncoderSettings()).model.backbone
    with pytest.raises(ValueError, match="pooling"):
        EmbeddingModel(backbone, "max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Matryoshka dim"):
        EmbeddingModel(backbone, "mean", 1000)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_right_padded_fast_path_equals_the_masked_reference(tiny_checkpoint: Path, pooling: str) -> None:
    # The GPU encoder drops the explicit mask for right-padded batches (fused causal attention).
    settings = EncoderSettings(pooling=pooling)  # type: ignore[arg-type]
    rng = np.random.default_rng(2)
    ids, mask = _pad([rng.integers(4, 300, n) for n in (9, 31, 2, 17)], "right")
    fast = TorchEncoder(tiny_checkpoint, settings, right_padded=True)
    np.testing.assert_allclose(
        fast.encode(ids, mask), TorchEncoder(tiny_checkpoint, settings).encode(ids, mask), atol=1e-5
    )
    with pytest.raises(ValueError, match="right-padded"):
        fast.encode(*_pad([rng.integers(4, 300, n) for n in (3, 8)], "left"))
