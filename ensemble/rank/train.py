"""Training the GR ranker: multi-task binary cross-entropy over the candidates each member was shown.

A batch holds members with their history and the candidates shown to them (impressions): the ones
they engaged with and the ones they were shown and passed over. Every task has its own label per
candidate (like, love, dislike on MovieLens); a task's weight scales its loss. The final score a
server ranks by is a weighted sum of the task probabilities (`final_score`), the weights in the
serving settings, a negative weight for a negative task (dislike).

Binary cross-entropy scores each candidate on its own; a feed is read as an order. `listwise_loss`
adds the order: a softmax over each example's candidates on the first task's logit (like), the
liked ones the target, so the loss falls only when the liked candidates rise above the others of
the same member (ListNet's top-one form, as sampled-softmax retrieval losses read a candidate set).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from feedserve.rank.model import INPUTS, GenerativeRanker

Batch = Mapping[str, torch.Tensor]

# The final score's weight per task (a negative task counts against a post); serving takes them from
# its settings (the rank config's `task_weights`), which default to these.
DEFAULT_TASK_WEIGHTS = {"like": 1.0, "love": 0.5, "dislike": -1.0}
# The same for a feed ranker's six tasks (feedserve.training.rank_feed): active engagement counts more
# than passive, a skip against.
FEED_TASK_WEIGHTS = {"click": 0.2, "long dwell": 0.5, "like": 1.0, "comment": 1.5, "share": 2.0, "skip": -1.0}


def finite_weights(weights: object) -> dict[str, float]:
    """Task weights as given (a JSON object's): a non-empty mapping of task names to finite numbers,
    ValueError otherwise. A NaN weight would answer every final score NaN, in retrieval order; `true`
    or "1" are not numbers a person meant."""
    if not isinstance(weights, dict) or not weights or any(isinstance(w, bool | str) for w in weights.values()):
        raise ValueError(f"task weights must be a non-empty object of task names to finite numbers, got {weights}")
    try:
        floats = {str(task): float(w) for task, w in weights.items()}
    except (TypeError, OverflowError) as err:
        raise ValueError(f"task weights must be finite numbers, got {weights} ({err})") from err
    if not all(math.isfinite(w) for w in floats.values()):
        raise ValueError(f"task weights must be finite numbers, got {weights}")
    return floats


def multitask_loss(
    model: GenerativeRanker, batch: Batch, task_weights: Sequence[float] | None = None, listwise: float = 0.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """(weighted loss, its parts: per-task loss, and "listwise" where `listwise` weighs it) over the
    real candidates of `batch`; its `labels` are float [B, C, tasks] in {0, 1}."""
    logits = model(**{name: batch[name] for name in INPUTS})
    real = batch["candidate_mask"]
    weights = torch.tensor(task_weights or [1.0] * logits.shape[-1], dtype=logits.dtype)
    per_task = F.binary_cross_entropy_with_logits(logits[real], batch["labels"][real], reduction="none").mean(0)
    loss = (per_task * weights).sum()
    parts = dict(zip(model.config.tasks, per_task.tolist(), strict=True))
    if listwise:
        order = listwise_loss(logits[..., 0], batch["labels"][..., 0], real)
        loss = loss + listwise * order
        parts["listwise"] = float(order.detach())
    return loss, parts


def listwise_loss(logits: torch.Tensor, labels: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Cross-entropy between each example's liked candidates (uniform over them) and the softmax of
    `logits` over its real candidates, averaged over the examples with a like: [B, C] logits and
    labels, [B, C] bool `real`. An example with no like has no order to learn and adds nothing;
    padding candidates take no share of the softmax."""
    liked = labels * real
    count = liked.sum(-1)
    # Padding far below any logit, not -inf: a row of padding alone would be nan (0/0 in its softmax).
    log_p = torch.log_softmax(logits.masked_fill(~real, -1e9), dim=-1)
    per_example = -(liked * log_p).sum(-1) / count.clamp(min=1)
    has = count > 0
    return per_example[has].mean() if bool(has.any()) else logits.sum() * 0.0


def final_score(logits: np.ndarray, weights: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probability per task [..., tasks], the score candidates are ranked by [...]: the sum over
    tasks of weight x probability). In numpy: the server and the evaluations rank by this one."""
    probabilities = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float32)))
    return probabilities, probabilities @ np.asarray(weights, np.float32)


def finite_boost(value: object) -> float:
    """`new_post_boost` as given (a number, or its text in a rendered config): finite in float32,
    ValueError otherwise. A NaN would answer every untrained post's score NaN and the order at random;
    1e39 is inf in float32."""
    if isinstance(value, bool):
        raise ValueError(f"new_post_boost must be a finite number, got {value!r}")
    try:
        boost = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError) as err:  # OverflowError: an int past any float
        raise ValueError(f"new_post_boost must be a finite number, got {value!r}") from err
    if not abs(boost) <= float(np.finfo(np.float32).max):  # NaN fails it too
        raise ValueError(f"new_post_boost must be a finite number (in float32), got {value!r}")
    return boost


def boost_untrained(scores: np.ndarray, untrained: np.ndarray, boost: float) -> np.ndarray:
    """Final scores with `boost` added to every post the ranker never trained on (`new_post_boost` in
    the serving settings): a post created since its training, one no training example showed, or one
    whose id bucket another post's id owns (GenerativeRanker.trained). The ranker reads those by their
    content alone and, on MovieLens, puts the new ones lower than retrieval did
    (benchmarks/reports/ranker/new-posts); a feed that values freshness beyond the next engagement
    raises them by a constant, in the final score's units, the same for every request."""
    return scores + np.float32(boost) * untrained.astype(np.float32)
