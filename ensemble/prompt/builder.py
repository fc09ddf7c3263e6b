"""The prompt library: post and member records -> tagged text -> padded token batches.

Every field is wrapped in its own tag (`<author><name>...</name></author>`) and empty fields are left
out, so the model sees the record's structure rather than guessing it from prose; counts appear only
as percentile tokens. Both sides go through one tokenizer and one set of budgets
(`EncoderSettings`), which training and serving share.

A member's prompt shows engaged posts only (positives; `records.is_engaged`): the system we
reproduce found that cheaper and better than mixing in impressions. Negatives in the record's
history are for the ranker, which reads every interaction; they are still excluded from retrieval.
When the prompt is too long, the oldest items go first.

The work a record costs is bounded by the token budget, not by its size: a record may hold about a
megabyte of text (records.py's limits), but only the tokens that fit the prompt are ever looked for.
Text is tokenized a prefix at a time (`_prefix`), four characters a token first (what prose takes)
and longer prefixes only where the text packs fewer tokens, never past the longest token in the
vocabulary times the budget; history items older than the budget can reach are never built.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

import numpy as np
from tokenizers import Encoding, Tokenizer

from feedserve.artifacts import EncoderSettings
from feedserve.prompt.buckets import PercentileBuckets, tag_name
from feedserve.prompt.records import Engagement, Member, Post, is_engaged
from feedserve.schema import NO_ID

logger = logging.getLogger(__name__)

PAD_ID = 0  # any id works: padded positions are masked out of attention and pooling


@dataclass
class TokenBatch:
    input_ids: np.ndarray  # int64 [batch, length], right-padded
    attention_mask: np.ndarray  # int64 [batch, length]
    exclude_ids: np.ndarray | None = None  # int64 [batch, history], members only, NO_ID-padded


def _tag(name: str, value: object) -> str:
    # Escaping keeps user text from closing or faking our structure tags.
    text = escape(str(value), quote=False).strip() if value is not None else ""
    return f"<{name}>{text}</{name}>" if text else ""


def pad_length(longest: int, buckets: Sequence[int]) -> int:
    return next((b for b in buckets if b >= longest), longest)


# Characters a token spans in ordinary text, where a search for the first n tokens starts.
CHARS_PER_TOKEN = 4


class PromptBuilder:
    def __init__(self, tokenizer: Tokenizer, buckets: PercentileBuckets, settings: EncoderSettings) -> None:
        self.tokenizer = tokenizer
        self.buckets = buckets
        self.settings = settings
        # No token spans more characters than the longest token string in the vocabulary (byte-level
        # BPE: a byte each): a prefix of (n + 1) times that holds more than n tokens.
        self.max_token_chars = max(len(token) for token in tokenizer.get_vocab())

    def _prefix(self, text: str, n: int, special: bool = False) -> Encoding:
        """The encoding of the shortest prefix of `text` tried that holds more than `n` tokens, or of
        all of it: the first n tokens of the text (but where the cut splits a word, its last ones)."""
        size = min(len(text), CHARS_PER_TOKEN * (n + 1))
        bound = (n + 1) * self.max_token_chars
        while True:
            enc = self.tokenizer.encode(text[:size], add_special_tokens=special)
            if size >= len(text) or len(enc.ids) > n + int(special) or size >= bound:
                return enc
            size = min(len(text), bound, size * 4)

    # --- text ------------------------------------------------------------------------------
    def cut(self, text: str, max_tokens: int) -> str:
        """The longest prefix of `text` that is at most `max_tokens` tokens (token boundaries)."""
        if not text or max_tokens <= 0:
            return ""
        if len(text.encode("utf-8", "surrogatepass")) <= max_tokens:  # a token spans at least one byte
            return text
        enc = self._prefix(text, max_tokens)
        if len(enc.ids) <= max_tokens:
            return text
        return text[: enc.offsets[max_tokens - 1][1]]

    def _counts(self, post: Post) -> str:
        known = set(self.buckets.cut_points)
        # Counts the buckets were not fitted on have no percentile: they are left out of the prompt.
        counts = [(f, v) for f, v in sorted(post.counts.items()) if f in known]
        if self.settings.count_format == "raw":
            # Whole numbers in full (1234567, not 1.23457e+06): that is what a raw count looks like.
            return "".join(_tag(tag_name(f), str(int(v)) if float(v).is_integer() else f"{v:g}") for f, v in counts)
        return "".join(self.buckets.tag(f, v) for f, v in counts)

    def _post_body(self, post: Post, text_tokens: int) -> str:
        author = ""
        if post.author is not None:
            a = post.author
            inner = (
                _tag("name", a.name)
                + _tag("headline", a.headline)
                + _tag("company", a.company)
                + _tag("industry", a.industry)
            )
            author = f"<author>{inner}</author>" if inner else ""
        article = ""
        if post.article is not None:
            article = _tag("title", post.article.title) + _tag("source", post.article.source)
        return (
            _tag("format", post.format)
            + author
            + article
            + _tag("year", post.year)
            + _tag("tags", ", ".join(post.tags))
            + self._counts(post)
            + _tag("text", self.cut(post.text, text_tokens))
        )

    def post_prompt(self, post: Post) -> str:
        return f"<post>{self._post_body(post, self.settings.post_text_tokens)}</post>"

    def _history_item(self, item: Engagement) -> str:
        if item.post is None:
            return f"<item>{_tag('id', item.post_id)}</item>"
        p = item.post
        title = p.article.title if p.article is not None else ""
        author = p.author.name if p.author is not None else ""
        body = (
            _tag("title", title)
            + _tag("author", author)
            + _tag("year", p.year)
            + _tag("tags", ", ".join(p.tags[:8]))
            + _tag("text", self.cut(p.text, self.settings.history_item_tokens))
        )
        return f"<item>{_tag('action', item.action)}{body}</item>"

    def _member_header(self, member: Member) -> str:
        positions = "".join(
            "<position>"
            + _tag("title", p.title)
            + _tag("company", p.company)
            + _tag("years", "-".join(str(y) for y in (p.start_year, p.end_year) if y is not None))
            + "</position>"
            for p in member.positions
        )
        education = "".join(
            "<school>" + _tag("name", e.school) + _tag("degree", e.degree) + _tag("field", e.field) + "</school>"
            for e in member.education
        )
        return (
            _tag("headline", member.headline)
            + _tag("industry", member.industry)
            + _tag("summary", self.cut(member.summary, self.settings.post_text_tokens))
            + _tag("skills", ", ".join(member.skills))
            + (f"<positions>{positions}</positions>" if positions else "")
            + (f"<education>{education}</education>" if education else "")
        )

    def member_prompt(self, member: Member) -> str:
        """Profile, then engaged posts oldest to newest; the oldest are dropped to fit the budget."""
        head = f"<member>{self._member_header(member)}<history>"
        tail = "</history></member>"
        limit = self.settings.max_prompt_tokens
        budget = limit - len(self._prefix(head + tail, limit).ids) - 2  # 2: special tokens
        kept: list[str] = []
        if budget > 0:
            items = self._newest_items(member, budget)
            costs = [len(e.ids) for e in self.tokenizer.encode_batch(items, add_special_tokens=False)]
            for item, cost in zip(items, costs, strict=True):
                if cost > budget:
                    break
                kept.append(item)
                budget -= cost
        return head + "".join(reversed(kept)) + tail

    def _newest_items(self, member: Member, budget: int) -> list[str]:
        """History items, newest first, as far back as `budget` tokens could reach: past (budget + 1)
        times the longest token's characters, older items cannot fit and are not built."""
        room = (budget + 1) * self.max_token_chars
        items: list[str] = []
        everything = self.settings.prompt_history == "all"
        engaged = [e for e in member.history if everything or is_engaged(e.action)]
        for engagement in reversed(engaged[-self.settings.max_history_items :]):
            item = self._history_item(engagement)
            room -= len(item)
            items.append(item if room >= 0 else item[: len(item) + room + 1])  # a cut item never fits
            if room < 0:
                break
        return items

    # --- tokens ----------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> TokenBatch:
        limit = self.settings.max_prompt_tokens
        # Prompts that ordinary text would fill the budget with go through `_prefix`, alone; the rest
        # (nearly all) through one batch call.
        long = {i for i, p in enumerate(prompts) if len(p) > CHARS_PER_TOKEN * (limit + 1)}
        short = [p for i, p in enumerate(prompts) if i not in long]
        encoded = iter(self.tokenizer.encode_batch(short))
        rows = [
            (self._prefix(p, limit, special=True) if i in long else next(encoded)).ids[:limit]
            for i, p in enumerate(prompts)
        ]
        width = pad_length(max(len(r) for r in rows), self.settings.length_buckets)
        ids = np.full((len(rows), width), PAD_ID, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return TokenBatch(ids, mask)

    def encode_posts(self, posts: Sequence[Post]) -> TokenBatch:
        return self.tokenize([self.post_prompt(p) for p in posts])

    def encode_members(self, members: Sequence[Member]) -> TokenBatch:
        batch = self.tokenize([self.member_prompt(m) for m in members])
        # Every engaged post is excluded from retrieval, also those too old to fit in the prompt.
        width = max(1, max(len(m.history) for m in members))
        exclude = np.full((len(members), width), NO_ID, np.int64)
        for i, m in enumerate(members):
            exclude[i, : len(m.history)] = [h.post_id for h in m.history]
        batch.exclude_ids = exclude
        return batch
