"""The GR ranker's invariants (feedserve.rank.model): shared-context scoring equals scoring each
candidate alone, the history is read causally, padding and batching change nothing, and a post id
never trained on is read by its content alone."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from feedserve.export.rank import sample_inputs
from feedserve.rank.model import ATTENTIONS, INPUTS, GenerativeRanker, RankerConfig, hash_ids, shared_context_mask

E = 16
CONFIG = RankerConfig(content_dim=E, d_model=32, n_heads=4, n_layers=2, max_history=12, id_buckets=4096, dropout=0.0)


def _model(seed: int = 0, known: range = range(1000, 1100)) -> GenerativeRanker:
    torch.manual_seed(seed)
    model = GenerativeRanker(CONFIG, known_ids=torch.tensor(list(known)))
    torch.nn.init.normal_(model.ids.weight)  # as if trained: known ids carry their own embedding
    return model.eval()


def _inputs(h: int, c: int, seed: int = 1, lengths: list[int] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = len(lengths) if lengths else 1
    history_mask = torch.ones(b, h, dtype=torch.bool)
    for i, n in enumerate(lengths or []):
        history_mask[i, n:] = False
    return {
        "history_ids": torch.randint(1000, 1200, (b, h), generator=g),
        "history_actions": torch.randint(0, len(CONFIG.actions), (b, h), generator=g),
        "history_content": torch.randn(b, h, E, generator=g),
        "history_mask": history_mask,
        "candidate_ids": torch.randint(1000, 1200, (b, c), generator=g),
        "candidate_content": torch.randn(b, c, E, generator=g),
        "candidate_features": torch.rand(b, c, len(CONFIG.features), generator=g),
        "member": torch.randn(b, E, generator=g),
    }


def _take(inputs: dict[str, torch.Tensor], rows: slice, candidates: slice) -> dict[str, torch.Tensor]:
    return {k: v[rows][:, candidates] if k.startswith("candidate") else v[rows] for k, v in inputs.items()}


@torch.no_grad()
def test_shared_context_scores_equal_each_candidate_alone() -> None:
    model, inputs = _model(), _inputs(h=10, c=25)
    together = model(**inputs)
    assert together.shape == (1, 25, len(CONFIG.tasks))
    for i in range(25):
        alone = model(**_take(inputs, slice(0, 1), slice(i, i + 1)))
        assert (alone[0, 0] - together[0, i]).abs().max() < 1e-4


@pytest.mark.parametrize("attention", ["dense", "flex"])
@torch.no_grad()
def test_split_attention_equals_the_dense_shared_context_mask(attention: str) -> None:
    """The served path skips the candidate x candidate block; it must compute the same attention as
    the dense mask that spells the shared context out, and as FlexAttention's block mask (padding,
    an empty history, batching)."""
    model = _model()
    for h, lengths in ((12, [12, 5, 0]), (0, [0])):
        inputs = _inputs(h=h, c=9, lengths=lengths)
        split = model(**inputs)
        model.attention = attention
        other = model(**inputs)
        model.attention = "split"
        assert split.shape == other.shape and (split - other).abs().max() < 1e-5


def test_an_unknown_attention_is_refused_by_name() -> None:
    model = _model()
    model.attention = "sparse"
    with pytest.raises(ValueError, match="attention must be one of"):
        model(**_inputs(h=3, c=2))


@pytest.mark.parametrize("attention", ATTENTIONS)
@torch.no_grad()
def test_the_history_is_read_causally(attention: str) -> None:
    model, inputs = _model(), _inputs(h=10, c=3)
    model.attention = attention
    keys = [k for k in inputs if k != "candidate_features" and k != "member"]
    before = model.encode(**{k: inputs[k] for k in keys})
    changed = dict(inputs)
    changed["history_content"] = inputs["history_content"].clone()
    changed["history_content"][0, 6] += 5.0  # the 7th post: tokens 12 (post) and 13 (action)
    after = model.encode(**{k: changed[k] for k in keys})
    assert torch.allclose(before[0, :12], after[0, :12], atol=1e-6)  # nothing earlier moves
    assert not torch.allclose(before[0, 12:20], after[0, 12:20], atol=1e-4)  # later history does
    assert not torch.allclose(before[0, 20:], after[0, 20:], atol=1e-4)  # and so do the candidates


@torch.no_grad()
def test_scoring_skips_the_last_blocks_history_outputs_and_nothing_else() -> None:
    model, inputs = _model(), _inputs(h=12, c=7, lengths=[12, 3])
    keys = [k for k in inputs if k != "candidate_features" and k != "member"]
    every = model.encode(**{k: inputs[k] for k in keys})
    for attention in ATTENTIONS:
        model.attention = attention
        scored = model.encode(**{k: inputs[k] for k in keys}, history_out=False)
        assert scored.shape == (2, 7, CONFIG.d_model) and (scored - every[:, 24:]).abs().max() < 1e-5


@torch.no_grad()
def test_padding_and_batching_change_no_score() -> None:
    model = _model()
    inputs = _inputs(h=12, c=6, lengths=[12, 5, 0])  # the last member has no history at all
    batched = model(**inputs)
    for row, n in enumerate([12, 5, 0]):
        alone = {k: v[row : row + 1] for k, v in inputs.items()}
        for k in ("history_ids", "history_actions", "history_content", "history_mask"):
            alone[k] = alone[k][:, :n]
        assert (model(**alone)[0] - batched[row]).abs().max() < 1e-4


@torch.no_grad()
def test_a_post_never_trained_on_is_ranked_by_its_content_alone() -> None:
    model, inputs = _model(), _inputs(h=6, c=2)
    unseen = dict(inputs, candidate_ids=torch.tensor([[5_000_001, 5_000_002]]))
    other_unseen = dict(inputs, candidate_ids=torch.tensor([[7_777_777, 9_999_999]]))
    assert torch.allclose(model(**unseen), model(**other_unseen), atol=1e-6)
    known = dict(inputs, candidate_ids=torch.tensor([[1000, 1001]]))
    assert not torch.allclose(model(**unseen), model(**known), atol=1e-4)  # a trained id counts


def test_the_mask_lets_candidates_see_the_history_and_themselves_only() -> None:
    mask = shared_context_mask(torch.tensor([[True, True, False]]), torch.tensor([[True, True]]))[0, 0]
    history = [0, 1, 2, 3]  # two real posts and their actions; tokens 4 and 5 are padding
    for candidate in (6, 7):
        assert mask[candidate, history].all() and mask[candidate, candidate]
        assert not mask[candidate, [4, 5, 13 - candidate]].any()
    assert not mask[1, 2] and mask[2, 1]  # causal within the history


def _topics(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Members whose history is mostly one topic; candidates of every topic; a candidate is liked
    when it is of the member's topic, and disliked when it is of the opposite one."""
    centers = torch.randn(4, E, generator=torch.Generator().manual_seed(0)) * 2  # the same topics everywhere
    g = torch.Generator().manual_seed(seed)
    topic = torch.randint(0, 4, (n,), generator=g)
    inputs = _inputs(h=8, c=12, seed=seed, lengths=[8] * n)
    inputs["history_content"] = centers[topic][:, None] + 0.5 * torch.randn(n, 8, E, generator=g)
    cand_topic = torch.randint(0, 4, (n, 12), generator=g)
    inputs["candidate_content"] = centers[cand_topic] + 0.5 * torch.randn(n, 12, E, generator=g)
    inputs["candidate_ids"] = torch.randint(10**6, 2 * 10**6, (n, 12), generator=g)  # unseen: content only
    # As served: the member's embedding near their history, the retrieval score its cosine with a candidate.
    inputs["member"] = F.normalize(inputs["history_content"].mean(1), dim=-1)
    score = (inputs["member"][:, None] * F.normalize(inputs["candidate_content"], dim=-1)).sum(-1)
    inputs["candidate_features"] = torch.stack([score, torch.zeros_like(score), torch.ones_like(score)], dim=-1)
    liked = (cand_topic == topic[:, None]).float()
    disliked = (cand_topic == (topic[:, None] + 2) % 4).float()
    inputs["labels"] = torch.stack([liked, liked * 0.0, disliked], dim=-1)
    inputs["candidate_mask"] = torch.ones(n, 12, dtype=torch.bool)
    return inputs


def test_the_ranker_learns_from_the_history_what_a_member_likes() -> None:
    from feedserve.rank.train import final_score, multitask_loss

    torch.manual_seed(0)
    model = GenerativeRanker(CONFIG)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    train, test = _topics(1024, seed=1), _topics(128, seed=2)
    model.train()
    first = None
    for _ in range(150):
        rows = torch.randint(0, 1024, (32,))
        loss, _ = multitask_loss(model, {k: v[rows] for k, v in train.items()})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = first if first is not None else loss.item()
    model.eval()
    with torch.no_grad():
        loss, per_task = multitask_loss(model, test)
        _, final = final_score(model(**{k: test[k] for k in INPUTS}).numpy(), [1.0, 0.5, -1.0])
        scores = torch.from_numpy(final)
    assert loss.item() < 0.5 * first, (first, loss.item(), per_task)
    liked, disliked = test["labels"][..., 0].bool(), test["labels"][..., 2].bool()
    # Every member's liked candidates rank above their disliked ones, nearly always.
    pairs = (scores[:, :, None] > scores[:, None, :]) & liked[:, :, None] & disliked[:, None, :]
    assert pairs.sum() / (liked[:, :, None] & disliked[:, None, :]).sum() > 0.95


def test_the_listwise_loss_is_the_cross_entropy_of_each_members_likes_over_their_real_candidates() -> None:
    from feedserve.rank.train import listwise_loss

    logits = torch.tensor([[2.0, 0.0, 1.0, 9.0], [0.5, 0.1, -1.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    labels = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    real = torch.tensor([[True, True, True, False], [True, True, True, True], [True, True, True, True]])
    first = torch.log_softmax(logits[0, :3], -1)
    second = torch.log_softmax(logits[1], -1)
    # Padding (a like on it included) takes no part; a member with no like adds nothing to the mean.
    expected = (-(first[0] + first[2]) / 2 - second[1]) / 2
    assert torch.allclose(listwise_loss(logits, labels, real), expected)
    # It falls as the liked candidates rise above the others, whatever their absolute level.
    higher = logits.clone()
    higher[1, 1] += 3.0
    assert listwise_loss(higher, labels, real) < listwise_loss(logits, labels, real)
    assert torch.allclose(listwise_loss(logits + 5.0, labels, real), listwise_loss(logits, labels, real))
    none = torch.zeros_like(labels)
    assert listwise_loss(logits, none, real).item() == 0.0
    # A row of padding alone leaves the loss and every gradient finite.
    leaf = logits.clone().requires_grad_()
    loss = listwise_loss(leaf, labels, real & torch.tensor([[True], [True], [False]]))
    loss.backward()
    assert torch.allclose(loss, expected)
    assert leaf.grad is not None and bool(torch.isfinite(leaf.grad).all())


@torch.no_grad()
def test_learn_ids_gives_each_bucket_to_its_smallest_id_and_counts_the_others() -> None:
    """Ids whose bucket another owns are read by content alone: `learn_ids` says how many."""
    model = GenerativeRanker(replace(CONFIG, id_buckets=8))
    ids = torch.arange(100, 121)
    lost = model.learn_ids(torch.cat([ids, ids[:5]]))  # a repeated id counts once
    buckets = hash_ids(ids, 8)
    assert lost == len(ids) - len(torch.unique(buckets)) and lost > 0
    for bucket in torch.unique(buckets):
        assert model.id_owners[bucket] == ids[buckets == bucket].min()
    assert int(model.trained(ids).sum()) == len(ids) - lost
    assert model.learn_ids(ids) == lost  # learning them again changes nothing


def test_the_post_token_ablations_read_content_alone_or_ids_alone() -> None:
    inputs = _inputs(h=6, c=4)
    other_ids = dict(inputs, history_ids=inputs["history_ids"] + 1, candidate_ids=inputs["candidate_ids"] + 1)
    other_content = dict(
        inputs, history_content=-inputs["history_content"], candidate_content=-inputs["candidate_content"]
    )
    for mode, same, differs in (("content", other_ids, other_content), ("id", other_content, other_ids)):
        torch.manual_seed(0)
        model = GenerativeRanker(replace(CONFIG, post_tokens=mode), known_ids=torch.arange(1000, 1300)).eval()
        torch.nn.init.normal_(model.ids.weight)
        encode = {k: v for k, v in inputs.items() if k not in ("candidate_features", "member")}
        hidden = model.encode(**encode)
        assert torch.allclose(hidden, model.encode(**{k: same[k] for k in encode}), atol=1e-6), mode
        assert not torch.allclose(hidden, model.encode(**{k: differs[k] for k in encode}), atol=1e-4), mode


@torch.no_grad()
def test_residual_post_tokens_keep_the_content_whole_and_add_a_known_id_by_its_gate() -> None:
    """`residual`: a post token is its content's projection plus its id embedding times the gate;
    an id never trained on adds nothing, so a new post is its content, as with the gated mix."""
    torch.manual_seed(0)
    model = GenerativeRanker(replace(CONFIG, post_tokens="residual"), known_ids=torch.arange(1000, 1002)).eval()
    torch.nn.init.normal_(model.ids.weight)
    ids, content = torch.tensor([[1000, 1001, 5000]]), torch.randn(1, 3, CONFIG.content_dim)
    by_content, by_id = model.content(content), model.ids(hash_ids(ids, CONFIG.id_buckets))
    gate = torch.sigmoid(model.gate(torch.cat([by_content, by_id], dim=-1)))
    tokens = model.post_tokens(ids, content)
    assert torch.allclose(tokens[0, :2], (by_content + gate * by_id)[0, :2], atol=1e-6)
    assert torch.allclose(tokens[0, 2], by_content[0, 2], atol=1e-6)  # 5000: never trained on
    gated = GenerativeRanker(CONFIG, known_ids=torch.arange(1000, 1002)).eval()
    gated.load_state_dict(model.state_dict())
    assert torch.allclose(gated.post_tokens(ids, content)[0, 2], tokens[0, 2], atol=1e-6)


@torch.no_grad()
def test_id_dropout_reads_some_known_posts_by_content_alone_in_training_only() -> None:
    torch.manual_seed(0)
    config = replace(CONFIG, post_tokens="residual", id_dropout=0.5)
    model = GenerativeRanker(config, known_ids=torch.arange(1000, 1400))
    torch.nn.init.normal_(model.ids.weight)
    ids, content = torch.arange(1000, 1400).reshape(1, -1), torch.randn(1, 400, CONFIG.content_dim)
    by_content = model.content(content)
    model.train()
    alone = torch.isclose(model.post_tokens(ids, content), by_content, atol=1e-6).all(-1)
    assert 0.4 < alone.float().mean() < 0.6  # about half, each token drawn on its own
    model.eval()
    assert not torch.isclose(model.post_tokens(ids, content), by_content, atol=1e-6).all(-1).any()
    id_arm = GenerativeRanker(replace(config, post_tokens="id"), known_ids=torch.arange(1000, 1400)).train()
    id_arm.load_state_dict(model.state_dict())
    assert not id_arm.post_tokens(ids, content).eq(0).all(-1).any()  # the id arm drops none
    with pytest.raises(ValueError, match="id_dropout"):
        replace(CONFIG, id_dropout=1.0)


@torch.no_grad()
def test_a_learned_stand_in_is_the_id_of_every_new_post_and_of_the_ids_dropped_in_training() -> None:
    """`new_post_id` "learned": a post never trained on (or a dropped one, in training) is mixed by the
    gate with one learned embedding as a known post is with its own; known posts are unchanged."""
    torch.manual_seed(0)
    config = replace(CONFIG, id_dropout=0.5, new_post_id="learned")
    model = GenerativeRanker(config, known_ids=torch.arange(1000, 1400)).eval()
    torch.nn.init.normal_(model.ids.weight)
    torch.nn.init.normal_(model.new_post_id)  # as if trained
    ids, content = torch.tensor([[1000, 1001, 5000, 5001]]), torch.randn(1, 4, CONFIG.content_dim)
    by_content = model.content(content)
    by_id = torch.where(
        model.trained(ids).unsqueeze(-1), model.ids(hash_ids(ids, CONFIG.id_buckets)), model.new_post_id
    )
    gate = torch.sigmoid(model.gate(torch.cat([by_content, by_id], dim=-1)))
    assert model.trained(ids).tolist() == [[True, True, False, False]]
    assert torch.allclose(model.post_tokens(ids, content), gate * by_id + (1 - gate) * by_content, atol=1e-6)
    assert torch.allclose(model.post_gate(ids, content), gate, atol=1e-6)
    assert (model.post_gate(ids, content) > 0).all()  # a new post's token mixes in the stand-in
    without = GenerativeRanker(CONFIG, known_ids=torch.arange(1000, 1400)).eval()
    assert without.post_gate(ids, content)[0, 2:].eq(0).all()  # "none": nothing stands in
    known = torch.arange(1000, 1400).reshape(1, -1)
    content = torch.randn(1, 400, CONFIG.content_dim)
    stand_in = model.new_post_id.expand(1, 400, -1)
    model.train()
    gate = torch.sigmoid(model.gate(torch.cat([model.content(content), stand_in], dim=-1)))
    standing = torch.isclose(model.post_tokens(known, content), gate * stand_in + (1 - gate) * model.content(content))
    assert 0.4 < standing.all(-1).float().mean() < 0.6  # about half the known ids dropped
    with pytest.raises(ValueError, match="id_dropout"):
        replace(CONFIG, new_post_id="learned")  # nothing would train it
    for arm in ("id", "content"):  # nothing would mix it
        with pytest.raises(ValueError, match="gated or residual"):
            replace(CONFIG, post_tokens=arm, id_dropout=0.1, new_post_id="learned")
    with pytest.raises(ValueError, match="new_post_id"):
        replace(CONFIG, id_dropout=0.1, new_post_id="mean")


@torch.no_grad()
def test_the_wide_term_adds_the_features_linearly_to_every_logit() -> None:
    torch.manual_seed(0)
    model = GenerativeRanker(replace(CONFIG, wide=True)).eval()
    assert model.wide is not None and GenerativeRanker(CONFIG).wide is None
    for tower in model.towers:
        torch.nn.init.zeros_(tower.weight)  # the MMoE's part: its towers' biases alone
    inputs = _inputs(h=5, c=7)
    want = model.wide(inputs["candidate_features"]) + torch.cat([t.bias for t in model.towers])
    assert torch.allclose(model(**inputs), want, atol=1e-6)


@pytest.mark.gpu
@torch.no_grad()
def test_on_the_gpu_every_attention_path_scores_as_the_cpu() -> None:
    """The GPU variants' ranker: split, dense and compiled FlexAttention on CUDA give the CPU's
    scores (fp32, padding and an empty history in the batch), heads 16 wide as the shipped ranker's."""
    config = RankerConfig(content_dim=24, d_model=64, n_heads=4, n_layers=2, max_history=40, id_buckets=64, dropout=0.0)
    torch.manual_seed(0)
    model = GenerativeRanker(config).eval()
    inputs = {k: torch.from_numpy(v) for k, v in sample_inputs(config, 3, 30, 200, (30, 7, 0)).items()}
    want = model(**inputs)
    gpu = model.to("cuda")
    for attention in ATTENTIONS:
        gpu.attention = attention
        got = gpu(**{k: v.to("cuda") for k, v in inputs.items()}).cpu()
        assert (got - want).abs().max() < 1e-4, attention
