"""The embedding model in PyTorch: LLaMA + pooling + L2 norm + Matryoshka truncation.

This module is the reference: ONNX (and later TensorRT) exports are checked against it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from feedserve.artifacts import EncoderSettings, Pooling

logger = logging.getLogger(__name__)

AttnImplementation = Literal["sdpa", "eager"]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so left padding does not shift a prompt's positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def additive_causal_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[batch, 1, query, key] additive mask: causal, and no attention to padding.

    Built from tensor ops on the mask (no Python ints from shapes) so the traced ONNX graph keeps a
    dynamic sequence axis; passing it as a 4D mask also skips transformers' vmap-based mask
    builder, which the TorchScript tracer cannot follow. The fill is finfo.min, not -inf: a
    left-padding query row sees no key at all, and -inf there would make softmax NaN.
    """
    index = torch.ones_like(attention_mask).cumsum(-1)
    causal = index[:, :, None] >= index[:, None, :]
    allowed = causal & attention_mask.bool()[:, None, :]
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens. Padding rows are zeroed with `where`, not multiplied by 0, so a
    non-finite value in a padding position cannot leak into the mean."""
    hidden = hidden.float()  # a bf16 sum over hundreds of tokens loses digits; a no-op in fp32 graphs
    keep = attention_mask.bool().unsqueeze(-1)
    summed = torch.where(keep, hidden, torch.zeros_like(hidden)).sum(dim=1)
    return summed / keep.sum(dim=1).clamp(min=1).to(hidden.dtype)


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The last real token of each row, wherever the padding is (left or right)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.long() * positions).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def normalize_truncate(pooled: torch.Tensor, dim: int | None) -> torch.Tensor:
    """L2-normalise; with Matryoshka `dim`, keep the first `dim` values and renormalise."""
    out = F.normalize(pooled.float(), dim=-1)
    if dim is not None:
        out = F.normalize(out[..., :dim], dim=-1)
    return out


# A transformers LlamaModel (or a peft wrapper of one). Typed loosely: its config and layers are
# dynamic attributes, which torch's Module typing would report as Tensor | Module.
Backbone = Any


class EmbeddingModel(nn.Module):
    """(input_ids, attention_mask) [B, T] int64 -> unit-norm float32 embeddings [B, dim]."""

    backbone: Backbone

    def __init__(
        self,
        backbone: Backbone,
        pooling: Pooling = "mean",
        dim: int | None = None,
        right_padded: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        self.backbone = backbone
        self.pooling = pooling
        hidden = int(backbone.config.hidden_size)
        if dim is not None and not 0 < dim <= hidden:
            raise ValueError(f"Matryoshka dim must be in [1, {hidden}], got {dim}")
        self.dim = dim or hidden
        # A Python-level decision, so the traced graph holds no data-dependent branch.
        self._truncate = self.dim if self.dim < hidden else None
        # With right padding, causal attention alone already keeps every real token away from the
        # padding after it (padding rows are dropped by pooling), and positions are 0..n-1: no mask
        # is needed, and SDPA can take its fused causal (flash) kernel instead of a masked one.
        self.right_padded = right_padded

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.right_padded:
            hidden = self.backbone(input_ids=input_ids, use_cache=False).last_hidden_state
        else:
            hidden = self.backbone(
                input_ids=input_ids,
                attention_mask=additive_causal_mask(attention_mask, self.backbone.dtype),
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
            ).last_hidden_state
        pool = mean_pool if self.pooling == "mean" else last_token_pool
        return normalize_truncate(pool(hidden, attention_mask), self._truncate)


def is_right_padded(attention_mask: np.ndarray) -> bool:
    mask = np.asarray(attention_mask)
    return bool(np.isin(mask, (0, 1)).all() and (np.diff(mask, axis=1) <= 0).all())


def keep_first_layers(backbone: Backbone, n: int) -> None:
    """Cut a LLaMA backbone to its first `n` decoder layers, in place (config included, so the
    saved checkpoint reloads as an n-layer model). Training uses it to fit 2 CPU cores; serving
    gets the same cut when it merges an adapter trained that way."""
    layers = backbone.layers
    if not 0 < n <= len(layers):
        raise ValueError(f"cannot keep {n} layers of a {len(layers)}-layer model")
    backbone.layers = layers[:n]
    backbone.config.num_hidden_layers = n
    if getattr(backbone.config, "layer_types", None):
        backbone.config.layer_types = backbone.config.layer_types[:n]


def load_embedding_model(
    hf_dir: Path,
    settings: EncoderSettings,
    attn_implementation: AttnImplementation = "sdpa",
    dtype: torch.dtype = torch.float32,
    right_padded: bool = False,
) -> EmbeddingModel:
    """Load a checkpoint (base or causal-LM; the LM head is dropped), in eval mode.

    SDPA is faster than eager on CPU and, given our explicit float mask, traces to the same plain
    MatMul/Softmax ONNX graph, so it serves both PyTorch and export.
    """
    from transformers import AutoModel

    backbone = AutoModel.from_pretrained(hf_dir, dtype=dtype, attn_implementation=attn_implementation)
    return EmbeddingModel(backbone, settings.pooling, settings.dim, right_padded).eval()


class TorchEncoder:
    """PyTorch eager, with the same interface as `feedserve.encode.ort.OnnxEncoder`: fp32 on CPU (the
    reference), bf16 on a GPU unless `dtype` says otherwise (pooling and the norm stay fp32).

    `right_padded=True` promises right-padded batches (the Triton encoder's contract) and buys the
    fused causal attention kernel; a batch that breaks the promise is refused, not misread.
    """

    def __init__(
        self,
        hf_dir: Path,
        settings: EncoderSettings,
        threads: int | None = None,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        right_padded: bool = False,
    ) -> None:
        if threads:
            # Process-wide in torch: the last TorchEncoder created decides for all of them.
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        if dtype is None:
            dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        self.model = load_embedding_model(hf_dir, settings, dtype=dtype, right_padded=right_padded).to(self.device)

    @property
    def dim(self) -> int:
        return self.model.dim

    @torch.inference_mode()
    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if self.model.right_padded and not is_right_padded(attention_mask):
            raise ValueError("this encoder takes right-padded batches only (1s, then 0s, in every mask row)")
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)).to(self.device)
        mask = torch.from_numpy(np.ascontiguousarray(attention_mask, dtype=np.int64)).to(self.device)
        return self.model(ids, mask).cpu().numpy().astype(np.float32, copy=False)
