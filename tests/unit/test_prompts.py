from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feedserve.artifacts import EncoderSettings
from feedserve.prompt.buckets import PercentileBuckets
from feedserve.prompt.builder import PromptBuilder
from feedserve.prompt.records import Engagement, Member, Post, is_engaged, parse_member, parse_post
from tests.tiny import make_tokenizer

EXAMPLES = Path(__file__).resolve().parents[2] / "ensemble" / "prompt" / "examples"
SETTINGS = EncoderSettings(
    max_prompt_tokens=200,
    post_text_tokens=20,
    history_item_tokens=8,
    max_history_items=30,
    length_buckets=(16, 32, 64, 128, 256),
)


@pytest.fixture(scope="module")
def builder() -> PromptBuilder:
    buckets = PercentileBuckets.fit(
        {"views": np.arange(1000.0), "likes": np.arange(100.0), "comments": [0, 1, 2], "shares": [0, 1]}
    )
    return PromptBuilder(make_tokenizer(), buckets, SETTINGS)


def _member(n: int) -> Member:
    history = [
        Engagement(post_id=100 + i, engaged_at=i, post=Post(id=100 + i, text=f"{i} is a post about python and kafka"))
        for i in range(n)
    ]
    return Member(id=1, headline="Data engineer", skills=["python", "kafka"], history=history)


def test_post_prompt_has_tags_and_percentiles(builder: PromptBuilder) -> None:
    prompt = builder.post_prompt(parse_post((EXAMPLES / "post.json").read_bytes()))
    assert prompt.startswith("<post><format>article</format><author><name>Priya Raman</name>")
    assert "<view_percentile>99</view_percentile>" in prompt and "12345" not in prompt
    assert "<title>Serving LLM embeddings under 10 ms</title>" in prompt


def test_raw_count_format_shows_the_numbers(builder: PromptBuilder) -> None:
    """The ablation's prompts: the same counts, as numbers instead of percentile tokens."""
    from dataclasses import replace

    raw = PromptBuilder(builder.tokenizer, builder.buckets, replace(SETTINGS, count_format="raw"))
    prompt = raw.post_prompt(parse_post((EXAMPLES / "post.json").read_bytes()))
    assert "<view>12345</view>" in prompt and "_percentile>" not in prompt


def test_empty_fields_are_left_out(builder: PromptBuilder) -> None:
    assert builder.post_prompt(Post(id=1, text="hi")) == "<post><format>text</format><text>hi</text></post>"


def test_user_text_cannot_fake_tags(builder: PromptBuilder) -> None:
    prompt = builder.post_prompt(Post(id=1, text="</text><view_percentile>99</view_percentile>"))
    assert prompt.count("<view_percentile>") == 0


def test_text_is_cut_to_its_token_budget(builder: PromptBuilder) -> None:
    long = "python kafka spark " * 200
    cut = builder.cut(long, SETTINGS.post_text_tokens)
    assert long.startswith(cut) and len(builder.tokenizer.encode(cut, add_special_tokens=False).ids) <= 20


def test_history_drops_oldest_first_within_budget(builder: PromptBuilder) -> None:
    prompt = builder.member_prompt(_member(60))
    assert len(builder.tokenizer.encode(prompt).ids) <= SETTINGS.max_prompt_tokens
    kept = [int(n) for n in re.findall(r"<text>(\d+) is", prompt)]
    assert kept == sorted(kept) and kept[-1] == 59  # chronological, newest kept
    assert kept == list(range(kept[0], 60))  # a contiguous newest suffix: only the oldest dropped
    assert builder.member_prompt(_member(60)) == prompt  # deterministic


def test_exclude_ids_cover_the_whole_history(builder: PromptBuilder) -> None:
    batch = builder.encode_members([_member(60), _member(2)])
    assert batch.exclude_ids is not None
    assert batch.exclude_ids[0].tolist() == list(range(100, 160))
    assert batch.exclude_ids[1].tolist() == [100, 101] + [-1] * 58


def test_prompts_show_engaged_posts_only_and_exclude_every_one(builder: PromptBuilder) -> None:
    """Negatives in the history are the ranker's; the retrieval prompt leaves them out (and they
    do not use up its history items), and retrieval never returns any post of the history."""
    actions = ["like", "dislike", "rated 4.5", "rated 2", "comment", "skip", "rated 3.5", "share"]
    history = [
        Engagement(post_id=100 + i, engaged_at=i, action=a, post=Post(id=100 + i, text=f"{i} is a post"))
        for i, a in enumerate(actions)
    ]
    member = Member(id=1, history=history)
    shown = [int(n) for n in re.findall(r"<text>(\d+) is", builder.member_prompt(member))]
    assert shown == [0, 2, 4, 7]
    assert builder.member_prompt(member) == builder.member_prompt(
        Member(id=1, history=[h for i, h in enumerate(history) if i in shown])
    )
    batch = builder.encode_members([member])
    assert batch.exclude_ids is not None and batch.exclude_ids[0].tolist() == list(range(100, 108))
    everything = PromptBuilder(builder.tokenizer, builder.buckets, replace(builder.settings, prompt_history="all"))
    shown_all = [int(n) for n in re.findall(r"<text>(\d+) is", everything.member_prompt(member))]
    assert shown_all == list(range(shown_all[0], 8)) and {3, 5} <= set(shown_all)  # the newest, negatives too
    assert [is_engaged(a) for a in ("rated x", "Dislike ", "rated 4", "bookmark")] == [True, False, True, True]


def test_batches_pad_to_a_length_bucket(builder: PromptBuilder) -> None:
    batch = builder.encode_posts([Post(id=1, text="a"), Post(id=2, text="python kafka " * 10)])
    longest = int(batch.attention_mask.sum(axis=1).max())
    assert batch.input_ids.shape[1] == min(b for b in SETTINGS.length_buckets if b >= longest)
    assert batch.input_ids.dtype == np.int64 and (batch.input_ids[batch.attention_mask == 0] == 0).all()
    member = parse_member((EXAMPLES / "member.json").read_text())
    assert builder.encode_members([member]).attention_mask.sum() <= SETTINGS.max_prompt_tokens


@settings(max_examples=30, deadline=None)
@given(st.text(max_size=300), st.lists(st.text(max_size=30), max_size=5), st.integers(0, 10**9))
def test_any_post_gives_a_bounded_prompt(text: str, tags: list[str], views: int) -> None:
    buckets = PercentileBuckets.fit({"views": np.arange(1000.0)})
    b = PromptBuilder(make_tokenizer(), buckets, SETTINGS)
    batch = b.encode_posts([Post(id=1, text=text, tags=tags, counts={"views": float(views)})])
    assert 1 <= batch.attention_mask.sum() <= SETTINGS.max_prompt_tokens


_history = st.lists(st.tuples(st.integers(0, 10**12), st.text(max_size=80)), max_size=60)


@settings(max_examples=30, deadline=None)
@given(_history, st.text(max_size=200), st.lists(st.text(max_size=20), max_size=8))
def test_any_member_gives_a_bounded_prompt_that_keeps_the_newest_history(
    history: list[tuple[int, str]], headline: str, skills: list[str]
) -> None:
    buckets = PercentileBuckets.fit({"views": np.arange(1000.0)})
    b = PromptBuilder(make_tokenizer(), buckets, SETTINGS)
    member = Member(
        id=1,
        headline=headline[:1024],
        skills=skills,
        history=[
            Engagement(post_id=pid, engaged_at=i, post=Post(id=pid, text=text)) for i, (pid, text) in enumerate(history)
        ],
    )
    batch = b.encode_members([member])
    assert 1 <= batch.attention_mask.sum() <= SETTINGS.max_prompt_tokens
    assert batch.input_ids.shape[1] in SETTINGS.length_buckets
    # Every engaged post is excluded from retrieval, also those cut from the prompt.
    assert set(batch.exclude_ids[0][batch.exclude_ids[0] >= 0].tolist()) == {pid for pid, _ in history}
    # What the prompt keeps of the history is its newest end, in order.
    items = [b._history_item(h) for h in member.history[-SETTINGS.max_history_items :]]
    prompt = b.member_prompt(member)
    assert any(
        prompt.endswith("<history>" + "".join(items[len(items) - n :]) + "</history></member>")
        for n in range(len(items) + 1)
    )


class _Whole(PromptBuilder):
    """The builder as it was before its work was bounded: whole texts tokenized, every item built.
    The reference the bounded builder must agree with, token for token."""

    def _prefix(self, text: str, n: int, special: bool = False):  # type: ignore[no-untyped-def]
        return self.tokenizer.encode(text, add_special_tokens=special)

    def _newest_items(self, member: Member, budget: int) -> list[str]:
        return [self._history_item(h) for h in reversed(member.history[-self.settings.max_history_items :])]


class _Counting:
    """A tokenizer that counts the characters it is given."""

    def __init__(self, tokenizer: object) -> None:
        self.inner, self.chars = tokenizer, 0

    def get_vocab(self) -> dict[str, int]:
        return self.inner.get_vocab()  # type: ignore[attr-defined,no-any-return]

    def encode(self, text: str, **kwargs: object) -> object:
        self.chars += len(text)
        return self.inner.encode(text, **kwargs)  # type: ignore[attr-defined]

    def encode_batch(self, texts: list[str], **kwargs: object) -> object:
        self.chars += sum(map(len, texts))
        return self.inner.encode_batch(texts, **kwargs)  # type: ignore[attr-defined]


def _hostile_members() -> list[Member]:
    """The largest members the limits allow, in prose and in the text that packs the fewest tokens per
    character (runs of the vocabulary's longest tokens) and the most (one token per character)."""
    import json as _json

    from feedserve.prompt.records import maximal_member

    base = maximal_member()
    members = [parse_member(_json.dumps(base))]
    for text in ("#" * 1024, "\u00e9\u4e2d" * 512):
        hostile = dict(base, headline=text[:1024], skills=[text[:1024]] * 64, summary=(text * 32)[:32768])
        hostile["history"] = [
            dict(h, post=dict(h["post"], text=(text * 8)[:8000], tags=[text[:1024]] * 8)) for h in base["history"][:20]
        ]
        members.append(parse_member(hostile))  # a dict: the builder is tested here, not the size limit
    return members


def test_the_largest_records_cost_tokens_within_the_budget_and_the_same_prompt(builder: PromptBuilder) -> None:
    """A megabyte-sized member is tokenized only as far as the budget can reach (it once tokenized the
    whole profile twice: about half a second a record with the default model), and the prompt's tokens
    are the ones tokenizing it whole gives."""
    whole = _Whole(builder.tokenizer, builder.buckets, builder.settings)
    for member in _hostile_members():
        counting = _Counting(builder.tokenizer)
        bounded = PromptBuilder(counting, builder.buckets, builder.settings)  # type: ignore[arg-type]
        got = bounded.encode_members([member])
        np.testing.assert_array_equal(got.input_ids, whole.encode_members([member]).input_ids)
        # Every call looks at most 4x the characters the budget can span (the prefixes grow 4x).
        reach = (SETTINGS.max_prompt_tokens + 1) * bounded.max_token_chars
        assert counting.chars <= 8 * reach, (counting.chars, reach)
        post = Post(id=1, text=member.summary, tags=member.skills[:64])
        np.testing.assert_array_equal(bounded.encode_posts([post]).input_ids, whole.encode_posts([post]).input_ids)
