"""`preprocess_post` / `preprocess_member`: JSON records -> prompt tokens (+ history ids to exclude).

Both models run this class; the config parameter `record_kind` says which side it serves.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from feedserve.artifacts import ArtifactLayout, EncoderSettings
from feedserve.prompt.buckets import PercentileBuckets
from feedserve.prompt.builder import PromptBuilder
from feedserve.prompt.records import Member, Post, parse_member, parse_post
from feedserve.schema import ATTENTION_MASK, EXCLUDE_IDS, INPUT_IDS, ModelName, RecordKind
from feedserve.triton.base import Arrays, BatchModel, RequestError, read_records

logger = logging.getLogger(__name__)


@dataclass
class Records:
    posts: list[Post] | None = None
    members: list[Member] | None = None


class PreprocessModel(BatchModel[Records]):
    name = ModelName.PREPROCESS_POST

    def setup(self, layout: ArtifactLayout, params: dict[str, str]) -> None:
        self.kind = RecordKind(params.get("record_kind", RecordKind.POST))
        self.name = ModelName.PREPROCESS_MEMBER if self.kind is RecordKind.MEMBER else ModelName.PREPROCESS_POST
        layout.verify(layout.tokenizer, layout.buckets, layout.settings)
        self.builder = PromptBuilder(
            Tokenizer.from_file(str(layout.tokenizer)),
            PercentileBuckets.load(layout.buckets),
            EncoderSettings.load(layout.settings),
        )

    def parse(self, inputs: dict[str, np.ndarray | None]) -> Records:
        if self.kind is RecordKind.MEMBER:
            return Records(members=read_records(inputs, parse_member))
        return Records(posts=read_records(inputs, parse_post))

    def compute(self, items: Sequence[Records]) -> list[Arrays | RequestError]:
        outputs: list[Arrays | RequestError] = []
        for item in items:
            if item.members is not None:
                batch = self.builder.encode_members(item.members)
                out = {INPUT_IDS.name: batch.input_ids, ATTENTION_MASK.name: batch.attention_mask}
                assert batch.exclude_ids is not None  # members always carry their exclusions
                out[EXCLUDE_IDS.name] = batch.exclude_ids
            else:
                assert item.posts is not None
                batch = self.builder.encode_posts(item.posts)
                out = {INPUT_IDS.name: batch.input_ids, ATTENTION_MASK.name: batch.attention_mask}
            outputs.append(out)
        return outputs


TritonPythonModel = PreprocessModel
