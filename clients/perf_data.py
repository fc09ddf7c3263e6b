"""perf_analyzer input data from real records: MovieLens members for `retrieve`, `feed` and
`embed_member`, MovieLens movies for `embed_post`, one JSON record per request.

    python -m feedserve.clients.perf_data --model retrieve --out perf/retrieve.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from feedserve.prompt.records import Member, Post
from feedserve.schema import ATTENTION_MASK, CANDIDATES, INPUT_IDS, RECORDS, K


def perf_input(
    records: Sequence[Member | Post], k: int | None = None, candidates: int | None = None
) -> dict[str, object]:
    """perf_analyzer's --input-data document: one request per record (batch 1), K and CANDIDATES
    (`feed`'s posts retrieved and ranked) when given."""
    rows = []
    for record in records:
        row: dict[str, object] = {RECORDS.name: {"content": [record.model_dump_json(exclude_none=True)], "shape": [1]}}
        if k is not None:
            row[K.name] = {"content": [k], "shape": [1]}
        if candidates is not None:
            row[CANDIDATES.name] = {"content": [candidates], "shape": [1]}
        rows.append(row)
    return {"data": rows}


def token_input(input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, object]:
    """perf_analyzer's --input-data document for `encoder`: one pre-tokenised prompt per request,
    trimmed to its own length (what a client that tokenises itself would send)."""
    rows = []
    for ids, mask in zip(input_ids, attention_mask, strict=True):
        n = int(mask.sum())
        rows.append(
            {
                INPUT_IDS.name: {"content": ids[:n].tolist(), "shape": [n]},
                ATTENTION_MASK.name: {"content": mask[:n].tolist(), "shape": [n]},
            }
        )
    return {"data": rows}


def movielens_input(model: str, count: int = 32, k: int = 10, candidates: int = 500) -> dict[str, object]:
    from feedserve.ops.builder import SAMPLE_CORPUS
    from feedserve.prompt.movielens import load_movielens

    ml = load_movielens(SAMPLE_CORPUS)
    if model == "embed_post":
        return perf_input(ml.posts()[:count])
    # Members with a realistic history: long enough to say something, short enough to be typical.
    members = [m for m in ml.members() if 5 <= len(m.history) <= 60][:count]
    if model == "feed":
        return perf_input(members, k, candidates)
    return perf_input(members, k if model == "retrieve" else None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("retrieve", "feed", "embed_member", "embed_post"), default="retrieve")
    p.add_argument("--count", type=int, default=32)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(movielens_input(args.model, args.count, args.k)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
