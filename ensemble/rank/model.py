"""The Generative Recommender (GR) ranker, in PyTorch.

A member's history is a sequence of (post, action) pairs, oldest first, read by a causal
transformer: post tokens and action tokens interleave, `p1 a1 p2 a2 ...`. A post token mixes the
post's content (its retrieval embedding, the one the index stores, projected down) with a hashed
post-id embedding, through a learned per-token gate; a post whose id was never trained on (created
a second ago) gets the content alone. Candidates are scored in one pass with the history
(shared-context batching): they follow the history in the same sequence, all at the position the
next post would take, and the attention mask lets each candidate see the whole history and itself,
never another candidate, so the history is computed once for any number of candidates and every
candidate's score equals the score it would get alone.

The transformer's output at a candidate is fused late with what attention would gain little from:
the member's profile embedding (the retrieval query) and the candidate's features (count
percentiles, the retrieval score, affinity to the history). A multi-gate mixture of experts (MMoE)
with DCNv2 cross-network experts and one gate per task gives one logit per task.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

logger = logging.getLogger(__name__)

FORMAT = "feedserve.rank/1"
# The forward pass's inputs, in order: the exported graph's input names too.
INPUTS = (
    "history_ids",
    "history_actions",
    "history_content",
    "history_mask",
    "candidate_ids",
    "candidate_content",
    "candidate_features",
    "member",
)
OUTPUT = "logits"
POST_TOKENS = ("gated", "content", "id", "residual")
# How shared-context attention is computed (`GenerativeRanker.attention`); each gives the same scores.
# "split": the history causally, then each candidate against the history and itself (never the
# candidate x candidate block); "dense": one masked product over every token pair (the reference);
# "flex": PyTorch's FlexAttention with a block mask (blocks nothing may see are skipped; compiled
# on a GPU).
ATTENTIONS = ("split", "dense", "flex")
HISTORIES = ("all", "engaged")
# What stands for the id of a post the ranker never trained on (NEW_POST_IDS): "none", nothing (the
# token is the content alone in the gated mix, zero in the id arm), or "learned", one trained
# embedding for every such id, mixed by the gate as a known post's id is.
NEW_POST_IDS = ("none", "learned")
# The action every interaction the ranker has no token for is read as (seen, neither liked nor not).
NEUTRAL = "neutral"
# A saved ranker: its configuration and its weights; and, where its counts are not cut at the
# encoder's buckets (a feed's views, likes, ...), the cut points it was trained with.
CONFIG_FILE, WEIGHTS_FILE, COUNT_BUCKETS_FILE = "ranker.json", "ranker.pt", "count_buckets.json"


@dataclass(frozen=True)
class RankerConfig:
    content_dim: int  # width of the retrieval embeddings (the index's vectors)
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    max_history: int = 200  # (post, action) pairs read; older ones are dropped
    id_buckets: int = 1 << 16  # hashed post-id embeddings
    actions: tuple[str, ...] = ("like", "love", "dislike", "neutral")
    features: tuple[str, ...] = ("retrieval_score", "affinity", "has_content")
    tasks: tuple[str, ...] = ("like", "love", "dislike")
    # How a post token is made: "gated" (content and id mixed by a learned gate, the default),
    # "content" (the retrieval embedding alone) or "id" (the id embedding alone; zero for an id never
    # trained on): the last two are the ablations of the first. "residual": the content whole, plus
    # the id embedding as far as the gate lets it (a mix that cannot lose the content's scale).
    post_tokens: str = "gated"
    # The history the ranker reads: "all" interactions, negatives included (the default), or the
    # "engaged" ones alone (as retrieval prompts show them): the ablation of the first.
    history: str = "all"
    n_experts: int = 4
    cross_layers: int = 2
    dropout: float = 0.1
    # In training, the share of post tokens read as if their id were never trained on (content
    # alone, or with `new_post_id` the stand-in): at serving, every post created since the training
    # cutoff is (half the feed log's test impressions), a token the ranker otherwise never sees while
    # it learns.
    id_dropout: float = 0.0
    # What a new post's id reads as (NEW_POST_IDS). With "none" a new post's gated token is its
    # content whole, while every trained post's mixes in its id and so holds part of its content:
    # a token of another kind than any the ranker trained on, and the shipped MovieLens ranker put
    # new posts' targets at a lower median position than retrieval (benchmarks/reports/ranker/new-posts/).
    # "learned" trains the stand-in on the tokens `id_dropout` drops, so it needs id_dropout > 0.
    new_post_id: str = "none"
    # A linear term of the candidate features added to every task's logit beside the MMoE's (the
    # "wide" part of wide & deep): the retrieval score reaches the final score directly, so the
    # ranker learns a correction of the retrieval order rather than a replacement for it.
    wide: bool = False
    # The most candidates per example in training (`shown`): the log-rank features read a rank past
    # it as that rank. Served 500 or 2,000 candidates, ln(1 + rank) would otherwise reach values the
    # ranker never saw, which its linear terms extrapolate: the posts nothing co-engages with (every
    # new post) fell far below where retrieval put them (benchmarks/reports/ranker/validation/).
    max_rank: int = 200
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def positions(self) -> int:
        return 2 * self.max_history + 1  # the history's tokens, then the candidates' one position

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, path: Path) -> RankerConfig:
        data = json.loads(Path(path).read_text())
        if data.pop("format", None) != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} ranker configuration")
        for name in ("actions", "features", "tasks"):
            data[name] = tuple(data[name])
        return cls(**data)

    def __post_init__(self) -> None:
        if self.post_tokens not in POST_TOKENS:
            raise ValueError(f"post_tokens must be one of {POST_TOKENS}, got {self.post_tokens!r}")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"id_dropout must be in [0, 1), got {self.id_dropout}")
        if self.new_post_id not in NEW_POST_IDS:
            raise ValueError(f"new_post_id must be one of {NEW_POST_IDS}, got {self.new_post_id!r}")
        if self.new_post_id == "learned" and (not self.id_dropout or self.post_tokens not in ("gated", "residual")):
            raise ValueError(
                "new_post_id 'learned' is mixed by the gate and trained on the tokens id_dropout drops: it needs "
                f"gated or residual post tokens and id_dropout > 0, got {self.post_tokens!r} and {self.id_dropout}"
            )
        if self.history not in HISTORIES:
            raise ValueError(f"history must be one of {HISTORIES}, got {self.history!r}")
        if NEUTRAL not in self.actions:
            raise ValueError(f"actions must include {NEUTRAL!r}, the token of any action not listed: {self.actions}")


def hash_ids(ids: torch.Tensor, buckets: int) -> torch.Tensor:
    """A post id's bucket: a multiplicative hash, the same in PyTorch and in the exported graph."""
    return torch.remainder(ids * 0x9E3779B1, buckets)


def owns(id_owners: torch.Tensor, ids: torch.Tensor, buckets: torch.Tensor | None = None) -> torch.Tensor:
    """Whether each post id owns its bucket of `id_owners` (a ranker's buffer): whether the ranker
    trained its id embedding. `buckets`: the ids' hashed buckets, where the caller has them."""
    return id_owners[hash_ids(ids, id_owners.shape[0]) if buckets is None else buckets] == ids


def load_id_owners(directory: Path) -> torch.Tensor:
    """The id owners of the ranker saved in `directory` (its ranker.pt), without building the model:
    what a server running the exported graph asks which posts its ranker trained on."""
    weights = torch.load(Path(directory) / WEIGHTS_FILE, weights_only=True, map_location="cpu", mmap=True)
    return weights["id_owners"].clone()  # the rest of the file (the embeddings) is never read in


def shared_context_mask(history_mask: torch.Tensor, candidate_mask: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] boolean attention mask (True: may attend) over T = 2H history tokens followed by C
    candidates: a history token attends to the real history tokens up to itself (causal), a candidate
    to every real history token and to itself, never to another candidate. Padding attends to itself
    only through the diagonal (its row is never read)."""
    return shared_context_mask_tokens(_twice(history_mask), candidate_mask)


def shared_context_mask_tokens(history_tokens: torch.Tensor, candidate_mask: torch.Tensor) -> torch.Tensor:
    """shared_context_mask over history tokens [B, 2H] (a post and its action each) rather than items."""
    t_hist = history_tokens.shape[1]
    index = torch.arange(t_hist + candidate_mask.shape[1], device=history_tokens.device)
    real_history_key = torch.cat([history_tokens, torch.zeros_like(candidate_mask)], dim=1)[:, None, :]  # [B, 1, T]
    causal = index[:, None] >= index[None, :]  # [T, T]: candidates come after the whole history
    itself = index[:, None] == index[None, :]
    return ((real_history_key & causal) | itself)[:, None]


def _twice(mask: torch.Tensor) -> torch.Tensor:
    """[B, H] -> [B, 2H], each entry repeated (stack + reshape: exports where repeat_interleave may not)."""
    return torch.stack([mask, mask], dim=2).reshape(mask.shape[0], 2 * mask.shape[1])


class _Block(nn.Module):
    """Pre-norm transformer block over [history tokens | candidates].

    `split` attention (the default) computes what the shared-context mask allows and nothing else:
    the history attends causally within itself, and each candidate attends to the history keys and
    to its own key, never to another candidate's, so its cost grows as C x T_history instead of
    (T_history + C)^2 (with `bias`, as the exported graph computes it). `dense` runs the same
    attention as one masked product over every pair: the reference the other paths are tested
    against, and the ablation their speed is measured against. `flex` takes a FlexAttention block
    mask (`shared_context_block_mask`)."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        history_tokens: torch.Tensor,
        attention: str = "split",
        bias: torch.Tensor | None = None,
        history_out: bool = True,
        block_mask: BlockMask | None = None,
    ) -> torch.Tensor:
        """x [B, T + C, d]; history_tokens bool [B, T]: the real (not padding) history tokens;
        `bias` (`key_bias`): split attention as the exported graph computes it; `block_mask`: the
        flex path's. Returns [B, T + C, d], or the candidates' [B, C, d] alone without
        `history_out`: the last block's history outputs are never read, and with split attention
        they are never computed."""
        b, t, d = x.shape
        th = history_tokens.shape[1]
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if bias is not None:
            attended = _graph_split_attention(q, k, v, bias, history_out)
        elif attention == "split":
            attended = _split_attention(q, k, v, history_tokens, history_out)
        else:
            if attention == "flex":
                assert block_mask is not None, "flex attention needs the forward pass's block mask"
                attended = _flex_attention(q, k, v, block_mask)
            else:
                candidates = torch.ones_like(x[:, th:, 0], dtype=torch.bool)
                mask = shared_context_mask_tokens(history_tokens, candidates)
                attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            attended = attended if history_out else attended[:, :, th:]
        x = x if history_out else x[:, th:]
        x = x + self.dropout(self.out(attended.transpose(1, 2).reshape(b, x.shape[1], d)))
        return x + self.dropout(self.mlp(self.norm2(x)))


def shared_context_block_mask(history_tokens: torch.Tensor, candidates: int) -> BlockMask:
    """The shared-context mask (`shared_context_mask_tokens`) as a FlexAttention block mask over T
    history tokens and `candidates` candidates: the blocks above the history's diagonal and the
    candidate x candidate blocks off the diagonal are never computed."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, th = history_tokens.shape
    real_key = torch.cat([history_tokens, history_tokens.new_zeros(b, candidates)], dim=1)

    def visible(batch: torch.Tensor, head: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (real_key[batch, kv] & (q >= kv)) | (q == kv)

    n = th + candidates
    # Compiled on a GPU: built eagerly, the mask is evaluated as a dense [B, n, n] tensor first.
    compiled = history_tokens.is_cuda
    return create_block_mask(visible, b, None, n, n, device=str(history_tokens.device), _compile=compiled)


_compiled_flex: Callable[..., torch.Tensor] | None = None
# FlexAttention's GPU kernel needs heads at least this wide (d_model / n_heads; the shipped ranker's are 16).
FLEX_MIN_HEAD_DIM = 16


def _flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """FlexAttention: compiled on a GPU (its kernel is generated there; eager, it materialises
    every score), eager elsewhere (the CPU tests' reference check)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if not q.is_cuda:
        return flex_attention(q, k, v, block_mask=block_mask)
    if q.shape[-1] < FLEX_MIN_HEAD_DIM:
        raise ValueError(
            f"flex attention on a GPU needs heads of at least {FLEX_MIN_HEAD_DIM} dimensions, got {q.shape[-1]}"
        )
    if _compiled_flex is None:
        # Compiled once per input shape and dtype, which is why `rank` does not serve it
        # (feedserve.rank.runtime.SERVED_ATTENTIONS).
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex(q, k, v, block_mask=block_mask)


def _split_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, history_tokens: torch.Tensor, history_out: bool = True
) -> torch.Tensor:
    """Shared-context attention without the candidate x candidate block ([B, heads, T + C, dh] each;
    the candidates' rows alone without `history_out`)."""
    th = history_tokens.shape[1]
    qh, kh, vh = q[:, :, :th], k[:, :, :th], v[:, :, :th]
    qc, kc, vc = q[:, :, th:], k[:, :, th:], v[:, :, th:]
    real_key = history_tokens[:, None, None, :]  # [B, 1, 1, T]
    scale = q.shape[-1] ** -0.5
    to_history = torch.matmul(qc, kh.transpose(-1, -2)) * scale  # [B, heads, C, T]
    to_history = to_history.masked_fill(~real_key, float("-inf"))
    to_itself = (qc * kc).sum(-1, keepdim=True) * scale  # [B, heads, C, 1]
    weights = torch.softmax(torch.cat([to_history, to_itself], dim=-1), dim=-1)
    candidates = torch.matmul(weights[..., :th], vh) + weights[..., th:] * vc
    if not history_out:
        return candidates
    index = torch.arange(th, device=q.device)
    history_mask = (real_key & (index[:, None] >= index[None, :])) | (index[:, None] == index[None, :])
    history = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=history_mask)
    return torch.cat([history, candidates], dim=2)


# A masked score: its exp() is 0, and unlike -inf it never turns a row into NaN.
MASKED = -1e9
# The exported graph computes attention in this many blocks of queries, each block's scores small
# enough to stay in the CPU's cache between its product, softmax and product with the values (at
# 2,000 candidates, a block is 4 heads x 125 x 2,000 scores, 4 MB), and a history block reads only
# the keys up to its own end (causal).
GRAPH_BLOCKS = 16


def key_bias(history_tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, T, 1]: 0 at a real history token's key, MASKED at padding; the additive key mask of
    `_graph_split_attention`, built once per forward pass for every layer."""
    zero = torch.zeros((), dtype=dtype, device=history_tokens.device)
    return zero.masked_fill(~history_tokens[:, None, :, None], MASKED)


def _blocks(n: int) -> list[tuple[int, int]]:
    """GRAPH_BLOCKS (start, end) pairs covering range(n); n may be a traced size (the graph's are dynamic)."""
    bounds = [(n * i) // GRAPH_BLOCKS for i in range(GRAPH_BLOCKS + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _graph_split_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, history_out: bool = True
) -> torch.Tensor:
    """`_split_attention` as the exported graph computes it; the export's parity check holds the two
    equal. Written for ONNX Runtime, where the eager version's masked scaled_dot_product_attention
    spends most of its time on mask selects and a NaN guard over every [heads, T, T] score, and
    every pass over a [heads, C, T] tensor goes to memory: here the keys' mask and a candidate's own
    key ride in the queries' product with the keys, and the queries go in blocks (GRAPH_BLOCKS)."""
    th = bias.shape[2]
    b, heads, _, dh = k.shape
    q = q * dh**-0.5
    qh, kh, vh = q[:, :, :th], k[:, :, :th], v[:, :, :th]
    qc, kc, vc = q[:, :, th:], k[:, :, th:], v[:, :, th:]
    # Keys [kh, bias, 0] and one more [0, 0, 1] against queries [q, 1, own]: q . kh + bias for the
    # history (its mask added in the product) and, for a candidate, its own score qc . kc at the
    # last key, whose value (zero here) is the candidate's own, added after. The last key is never
    # masked, so an empty history's row is not empty either (a reduction over no keys is an empty
    # tensor in ONNX Runtime, not -inf).
    bias = bias.expand(-1, heads, -1, -1)  # [B, heads, T, 1]
    keys = torch.cat([kh, bias, torch.zeros_like(bias)], dim=-1)
    keys = torch.cat([keys, torch.cat([kh.new_zeros(b, heads, 1, dh + 1), kh.new_ones(b, heads, 1, 1)], dim=-1)], 2)
    keys = keys.transpose(-1, -2)  # [B, heads, dh + 2, T + 1]
    values = torch.cat([vh, vh.new_zeros(b, heads, 1, dh)], dim=2)
    own = (qc * kc).sum(-1, keepdim=True)  # [B, heads, C, 1]
    queries = torch.cat([qc, torch.ones_like(own), own], dim=-1)
    candidates = []
    for start, end in _blocks(qc.shape[2]):
        weights = torch.softmax(torch.matmul(queries[:, :, start:end], keys), dim=-1)
        # Every weight against the values, the last one zero (slicing the weights would copy them).
        candidates.append(torch.matmul(weights, values) + weights[..., th:] * vc[:, :, start:end])
    if not history_out:
        return torch.cat(candidates, dim=2)
    # A history token sees the real history tokens up to itself: a block of queries reads the keys
    # up to its own end, the later ones among them masked.
    queries = torch.cat([qh, torch.ones_like(qh[..., :1]), torch.zeros_like(qh[..., :1])], dim=-1)
    index = torch.arange(th, device=q.device)
    history = []
    for start, end in _blocks(th):
        later = torch.where(index[None, :end] > index[start:end, None], MASKED, 0.0).to(q.dtype)
        scores = torch.matmul(queries[:, :, start:end], keys[..., :end]) + later
        history.append(torch.matmul(torch.softmax(scores, dim=-1), vh[:, :, :end]))
    return torch.cat(history + candidates, dim=2)


class _CrossExpert(nn.Module):
    """A DCNv2 cross network (x_{l+1} = x_0 * (W_l x_l + b_l) + x_l), then a projection."""

    def __init__(self, width: int, layers: int, out: int) -> None:
        super().__init__()
        self.cross = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.project = nn.Sequential(nn.Linear(width, out), nn.ReLU())

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.cross:
            x = x0 * layer(x) + x
        return self.project(x)


class GenerativeRanker(nn.Module):
    """Scores candidates for every task in one pass over (history, candidates).

    Inputs (B members, H history slots right-padded, C candidate slots, E = content_dim):
      history_ids int64 [B, H], history_actions int64 [B, H], history_content float [B, H, E],
      history_mask bool [B, H]; candidate_ids int64 [B, C], candidate_content float [B, C, E],
      candidate_features float [B, C, len(features)]; padded candidate slots are scored and ignored;
      member float [B, E] (the member's retrieval embedding).
    Output: logits [B, C, len(tasks)].
    """

    def __init__(self, config: RankerConfig, known_ids: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        d, e = config.d_model, config.content_dim
        self.content = nn.Linear(e, d)
        self.ids = nn.Embedding(config.id_buckets, d)
        nn.init.zeros_(self.ids.weight)  # an id never trained on adds nothing
        self.gate = nn.Linear(2 * d, 1)
        # Registered only where configured, so rankers saved before it load as they were.
        self.new_post_id = nn.Parameter(torch.zeros(d)) if config.new_post_id == "learned" else None
        self.actions = nn.Embedding(len(config.actions), d)
        self.candidate_token = nn.Parameter(torch.zeros(d))  # marks the slots being scored
        self.positions = nn.Embedding(config.positions, d)
        self.blocks = nn.ModuleList(_Block(d, config.n_heads, config.dropout) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(d)
        self.member = nn.Linear(e, d)
        width = 2 * d + len(config.features)
        self.experts = nn.ModuleList(_CrossExpert(width, config.cross_layers, d) for _ in range(config.n_experts))
        self.gates = nn.ModuleList(nn.Linear(width, config.n_experts) for _ in config.tasks)
        self.towers = nn.ModuleList(nn.Linear(d, 1) for _ in config.tasks)
        self.wide = nn.Linear(len(config.features), len(config.tasks)) if config.wide and config.features else None
        # How shared-context attention is computed (ATTENTIONS; see _Block): the exported graph
        # always takes the split path.
        self.attention = "split"
        self.id_owners: torch.Tensor
        # The post id trained in each id bucket (-1: none). A post whose id does not own its bucket (never
        # trained on, or a collision) is read by its content alone.
        self.register_buffer("id_owners", torch.full((config.id_buckets,), -1, dtype=torch.int64))
        if known_ids is not None:
            self.learn_ids(known_ids)

    @classmethod
    def load(cls, directory: Path) -> GenerativeRanker:
        """A saved ranker (`save`): ranker.json and ranker.pt, in eval mode."""
        model = cls(RankerConfig.load(Path(directory) / CONFIG_FILE))
        model.load_state_dict(torch.load(Path(directory) / WEIGHTS_FILE, weights_only=True))
        return model.eval()

    def save(self, directory: Path) -> None:
        """ranker.json (the configuration) and ranker.pt (the weights, id owners included), durably."""
        from feedserve.files import atomic_file, atomic_write

        Path(directory).mkdir(parents=True, exist_ok=True)
        atomic_write(Path(directory) / CONFIG_FILE, self.config.to_json())
        with atomic_file(Path(directory) / WEIGHTS_FILE) as f:
            torch.save(self.state_dict(), f)

    def learn_ids(self, ids: torch.Tensor) -> int:
        """Let these post ids' embeddings count (the training set's); the first id of a bucket owns it.
        Returns how many of them lost their bucket to another id: read by content alone, in training
        and when served, as a new post is (logged: a catalog outgrowing `id_buckets` shows here)."""
        ids = torch.unique(ids.flatten())
        buckets = hash_ids(ids, self.config.id_buckets)
        first = torch.full_like(self.id_owners, -1)
        first.scatter_reduce_(0, buckets, ids, reduce="amin", include_self=False)
        self.id_owners.copy_(torch.where(self.id_owners >= 0, self.id_owners, first))
        lost = int((~self.trained(ids)).sum())
        logger.info(
            "%d of %d post ids own an id bucket; %d share one with another id and are read by content alone "
            "(id_buckets %d)",
            len(ids) - lost,
            len(ids),
            lost,
            self.config.id_buckets,
        )
        return lost

    def trained(self, ids: torch.Tensor) -> torch.Tensor:
        """Whether each post id's embedding was trained (it owns its bucket): False for a post created
        since the training cutoff, and for a colliding id."""
        return owns(self.id_owners, ids)

    def _post_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each post's id embedding and whether the gate may mix it in (1.0/0.0): in training
        `id_dropout` drops some; with the learned stand-in every id has one."""
        buckets = hash_ids(ids, self.config.id_buckets)  # once: the id lookup and the owner check share it
        by_id = self.ids(buckets)
        known = owns(self.id_owners, ids, buckets).unsqueeze(-1).to(by_id.dtype)
        # The id arm trains every id it has (its ablation reads a new post as nothing).
        if self.training and self.config.id_dropout > 0 and self.config.post_tokens != "id":
            known = known * (torch.rand(known.shape, device=known.device) >= self.config.id_dropout).to(known.dtype)
        if self.new_post_id is not None:
            return known * by_id + (1 - known) * self.new_post_id, torch.ones_like(known)
        return by_id, known

    def post_gate(self, ids: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        """[..., 1]: the share of each gated post token that is its id (0 where it has none)."""
        by_id, known = self._post_ids(ids)
        return self._gate(self.content(content), by_id, known)

    def _gate(self, by_content: torch.Tensor, by_id: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate(torch.cat([by_content, by_id], dim=-1))) * known

    def post_tokens(self, ids: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        """Content and id mixed by a learned gate; ids never trained on get the content alone, or with
        `new_post_id` "learned" the stand-in id, mixed as a known one is."""
        by_content = self.content(content)
        if self.config.post_tokens == "content":
            return by_content
        by_id, known = self._post_ids(ids)
        if self.config.post_tokens == "id":
            return by_id * known
        gate = self._gate(by_content, by_id, known)
        if self.config.post_tokens == "residual":
            return by_content + gate * by_id
        return gate * by_id + (1 - gate) * by_content

    def encode(
        self,
        history_ids: torch.Tensor,
        history_actions: torch.Tensor,
        history_content: torch.Tensor,
        history_mask: torch.Tensor,
        candidate_ids: torch.Tensor,
        candidate_content: torch.Tensor,
        history_out: bool = True,
    ) -> torch.Tensor:
        """Hidden states [B, 2H + C, d]: the history's tokens, then the candidates'; the candidates'
        [B, C, d] alone without `history_out` (what scoring reads: the last block then computes no
        history output)."""
        b, h = history_ids.shape
        posts = self.post_tokens(history_ids, history_content)
        acts = self.actions(history_actions)
        history = torch.stack([posts, acts], dim=2).reshape(b, 2 * h, posts.shape[-1])  # p1 a1 p2 a2 ...
        candidates = self.post_tokens(candidate_ids, candidate_content) + self.candidate_token
        real_tokens = _twice(history_mask).long()
        history_pos = (real_tokens.cumsum(1) - 1).clamp(min=0)
        next_pos = real_tokens.sum(1, keepdim=True).expand(-1, candidate_ids.shape[1])  # all at one position
        x = torch.cat([history, candidates], dim=1) + self.positions(torch.cat([history_pos, next_pos], dim=1))
        tokens = _twice(history_mask)
        # PyTorch's fused attention kernels serve training and the GPU; the exported graph takes the
        # path written for ONNX Runtime (`_graph_split_attention`).
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        graph = self.attention == "split" and torch.onnx.is_in_onnx_export()
        bias = key_bias(tokens, x.dtype) if graph else None
        block_mask = shared_context_block_mask(tokens, candidate_ids.shape[1]) if self.attention == "flex" else None
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, tokens, self.attention, bias, history_out or i < last, block_mask)
        return self.norm(x)

    def forward(
        self,
        history_ids: torch.Tensor,
        history_actions: torch.Tensor,
        history_content: torch.Tensor,
        history_mask: torch.Tensor,
        candidate_ids: torch.Tensor,
        candidate_content: torch.Tensor,
        candidate_features: torch.Tensor,
        member: torch.Tensor,
    ) -> torch.Tensor:
        at_candidates = self.encode(
            history_ids,
            history_actions,
            history_content,
            history_mask,
            candidate_ids,
            candidate_content,
            history_out=False,
        )
        profile = self.member(member).unsqueeze(1).expand(-1, at_candidates.shape[1], -1)
        fused = torch.cat([at_candidates, profile, candidate_features], dim=-1)  # late fusion
        experts = torch.stack([expert(fused) for expert in self.experts], dim=-2)  # [B, C, n_experts, d]
        logits = []
        for gate, tower in zip(self.gates, self.towers, strict=True):
            weights = torch.softmax(gate(fused), dim=-1).unsqueeze(-1)
            logits.append(tower((weights * experts).sum(dim=-2)))
        out = torch.cat(logits, dim=-1)
        return out if self.wide is None else out + self.wide(candidate_features)
