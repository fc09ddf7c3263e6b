"""The SASRec baseline learns a sequential pattern that a popularity or co-occurrence count cannot:
which item comes next after the last one."""

from __future__ import annotations

import numpy as np

from feedserve.training.sasrec import SASRecConfig, SASRecRecommender


def test_sasrec_learns_what_comes_next() -> None:
    items = np.arange(100, 130)  # a cycle: after item i comes item i + 1
    rng = np.random.default_rng(0)
    sequences = []
    for _ in range(200):
        start, length = int(rng.integers(0, 30)), int(rng.integers(4, 12))
        sequences.append([int(items[(start + j) % 30]) for j in range(length)])
    rec = SASRecRecommender(items, SASRecConfig(d_model=32, n_layers=1, n_heads=1, max_len=12, steps=300, dropout=0.0))
    losses = rec.fit(sequences)
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    histories = [[int(items[(s + j) % 30]) for j in range(5)] for s in range(30)]
    top = items[rec.score(histories).argmax(1)]
    want = [int(items[(s + 5) % 30]) for s in range(30)]
    assert np.mean(top == want) > 0.8
