"""SASRec: a self-attentive sequential recommender over item ids alone (Kang and McAuley, 2018), the
standard id-only baseline for the GR ranker.

A member is the sequence of posts they liked, oldest first; causal self-attention over the item
embeddings (plus positions) predicts the next one, trained with binary cross-entropy against one
uniformly sampled negative per position, as in the paper. A member's score for every post of the
catalog is the dot product of the state at their last position with that post's embedding. Trained
on the training period of the project's time split only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SASRecConfig:
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    max_len: int = 100
    dropout: float = 0.2
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0


class SASRec(nn.Module):
    def __init__(self, n_items: int, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.items = nn.Embedding(n_items + 1, d, padding_idx=0)  # row 0: padding; item i is row i + 1
        self.positions = nn.Embedding(config.max_len, d)
        layer = nn.TransformerEncoderLayer(
            d, config.n_heads, d, config.dropout, batch_first=True, norm_first=True, activation="relu"
        )
        self.blocks = nn.TransformerEncoder(layer, config.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(config.dropout)
        for name, weight in self.named_parameters():  # the paper's initialisation
            if weight.dim() > 1:
                nn.init.xavier_normal_(weight)
            if name == "items.weight":
                with torch.no_grad():
                    weight[0].zero_()

    def states(self, seqs: torch.Tensor) -> torch.Tensor:
        """[B, L] item rows, left-padded with 0 -> [B, L, d]. Padding is zeroed after the embedding and
        at the end (the paper's timeline mask); a causal mask keeps each position to its past."""
        length = seqs.shape[1]
        real = (seqs > 0).unsqueeze(-1).float()
        x = self.items(seqs) * self.config.d_model**0.5 + self.positions(torch.arange(length))
        x = self.dropout(x) * real
        causal = nn.Transformer.generate_square_subsequent_mask(length)
        return self.norm(self.blocks(x, mask=causal, is_causal=True)) * real

    def catalog_scores(self, seqs: torch.Tensor) -> torch.Tensor:
        """[B, n_items]: each member's score for every item, from the state at their last position."""
        return self.states(seqs)[:, -1] @ self.items.weight[1:].T


class SASRecRecommender:
    """Trains SASRec on members' liked sequences and scores the catalog `ids` for members' histories."""

    def __init__(self, ids: np.ndarray, config: SASRecConfig = SASRecConfig()) -> None:
        self.ids = np.asarray(ids, np.int64)
        self.row = {int(p): i + 1 for i, p in enumerate(self.ids.tolist())}
        self.config = config
        torch.manual_seed(config.seed)
        self.model = SASRec(len(self.ids), config)

    def _pad(self, sequences: Sequence[Sequence[int]], length: int) -> torch.Tensor:
        out = np.zeros((len(sequences), length), np.int64)
        for i, seq in enumerate(sequences):
            rows = [self.row[p] for p in seq if p in self.row][-length:]
            if rows:
                out[i, -len(rows) :] = rows
        return torch.from_numpy(out)

    def fit(self, sequences: Sequence[Sequence[int]]) -> list[float]:
        """Next-item training on these sequences (post ids, oldest first); returns the losses."""
        cfg = self.config
        seqs = [s for s in sequences if len(s) >= 2]
        padded = self._pad(seqs, cfg.max_len + 1)
        inputs, targets = padded[:, :-1], padded[:, 1:]
        optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
        rng = np.random.default_rng(cfg.seed)
        losses = []
        self.model.train()
        for _ in tqdm(range(cfg.steps), desc="sasrec", disable=None):
            batch = torch.from_numpy(rng.choice(len(seqs), min(cfg.batch_size, len(seqs)), replace=False))
            x, y = inputs[batch], targets[batch]
            negatives = torch.from_numpy(rng.integers(1, len(self.ids) + 1, y.shape))
            states = self.model.states(x)
            pos = (states * self.model.items(y)).sum(-1)
            neg = (states * self.model.items(negatives)).sum(-1)
            real = y > 0
            loss = F.binary_cross_entropy_with_logits(
                pos[real], torch.ones_like(pos[real])
            ) + F.binary_cross_entropy_with_logits(neg[real], torch.zeros_like(neg[real]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        self.model.eval()
        return losses

    @torch.no_grad()
    def score(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """[members, catalog] scores, in the order of `ids`."""
        return self.model.catalog_scores(self._pad(histories, self.config.max_len)).numpy()
