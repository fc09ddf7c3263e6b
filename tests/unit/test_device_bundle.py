"""The bundle that carries a real checkpoint to the GPU machine: smaller, equal where it matters,
and loud where it was cut."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from feedserve.artifacts import EncoderSettings
from feedserve.encode.pytorch import TorchEncoder, keep_first_layers
from feedserve.training.device_bundle import pack, unpack

TEXTS = ["Toy Story (1995) Adventure Animation", "We are hiring machine learning engineers"]


def _encode(tokenizer: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    rows = [e.ids for e in tokenizer.encode_batch(texts)]
    width = max(map(len, rows))
    ids = np.array([r + [0] * (width - len(r)) for r in rows], np.int64)
    mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows], np.int64)
    return ids, mask


def test_bundle_keeps_layers_and_used_rows(tiny_checkpoint: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    ids, mask = _encode(tokenizer, TEXTS)
    used = set(ids.ravel().tolist())
    pack(tiny_checkpoint, tmp_path / "bundle", layers=1, token_ids=used)
    hf = unpack(tmp_path / "bundle", tmp_path / "hf")

    settings = EncoderSettings()
    got = TorchEncoder(hf, settings)
    ref = TorchEncoder(tiny_checkpoint, settings)
    keep_first_layers(ref.model.backbone, 1)
    assert len(got.model.backbone.layers) == 1
    a, b = got.encode(ids, mask), ref.encode(ids, mask)
    assert np.all((a * b).sum(axis=1) > 0.999)  # bf16 storage, fp32 compute

    # A token that was not carried poisons the embedding instead of passing for a real one.
    unused = next(i for i in range(tokenizer.get_vocab_size()) if i not in used)
    poisoned = ids.copy()
    poisoned[0, 0] = unused
    assert np.isnan(got.encode(poisoned, mask)[0]).all()
    assert np.isfinite(got.encode(poisoned, mask)[1]).all()
    assert torch.isnan(got.model.backbone.embed_tokens.weight[unused]).all()
