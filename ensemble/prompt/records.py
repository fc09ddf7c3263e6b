"""Post and member records: the JSON that clients send, validated strictly.

Every request's records are checked before any work is done; a problem raises RecordError with the
field path (`member.history[3].post_id: Field required`), which the Triton backend returns to that
request's client as INVALID_ARG. Unknown fields are errors, not silently ignored: a typo in a field
name would otherwise change what the model sees without anyone noticing.

A post:    {"id": 42, "format": "article", "author": {"name": ..., "headline": ..., "company": ...,
            "industry": ...}, "article": {"title": ..., "source": ...}, "text": ..., "tags": [...],
            "created_at": 1700000000, "counts": {"views": 12345, "likes": 210, ...}}
A member:  {"id": 7, "headline": ..., "summary": ..., "industry": ..., "skills": [...],
            "positions": [{"title", "company", "start_year", "end_year"}], "education": [{"school",
            "degree", "field"}], "history": [{"post_id": 42, "engaged_at": ..., "action": "like",
            "post": {...a post...}}, ...]}   history: oldest first; it may hold negatives too
            ("dislike", "skip", "rated 1"): the ranker reads them, retrieval prompts show
            engaged posts only (`is_engaged`), and every one is excluded from retrieval
See ensemble/prompt/examples/ for complete examples and `json_schema()` for the JSON Schema.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from feedserve.errors import RecordError

# Limits: a record is one feed item or one profile, never a document dump.
MAX_RECORD_BYTES = 1024 * 1024
MAX_TEXT_CHARS = 32 * 1024
MAX_HISTORY = 2000
INT64_MAX = 2**63 - 1

INT64_MIN = -(2**63)
# No integer in a record needs more digits than an int64 has (and a sign): longer literals are
# refused by the parser before Python builds a huge int (quadratic in its digits, and over 4,300
# digits a ValueError of its own).
MAX_INT_CHARS = 20

PostId = Annotated[int, Field(ge=0, le=INT64_MAX)]
# Times and years: any int64, so a client's clock is its own business, but never a bignum.
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
ShortText = Annotated[str, Field(max_length=1024)]
LongText = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


# A count: finite and >= 0.
Count = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _Record(BaseModel):
    # strict: "42" is not an int, 1 is not a string; forbid: unknown fields are errors.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Author(_Record):
    name: ShortText = ""
    headline: ShortText = ""
    company: ShortText = ""
    industry: ShortText = ""


class Article(_Record):
    title: ShortText = ""
    source: ShortText = ""


class Post(_Record):
    id: PostId
    format: ShortText = "text"
    author: Author | None = None
    article: Article | None = None
    text: LongText = ""
    tags: Annotated[list[ShortText], Field(max_length=64)] = []
    year: Int64 | None = None
    created_at: Int64 | None = None
    # Engagement counts by name (views, likes, comments, shares; ratings, mean_rating on MovieLens).
    # The prompt shows them as percentile buckets fitted on a corpus, never as raw numbers. Checked
    # by pydantic's own constraints (a JSON integer is a float even when strict), not by a Python
    # validator per post: a member's history may carry 2,000 posts, and `rank` and `retrieve` parse
    # every one on every request.
    counts: Annotated[dict[Annotated[str, Field(max_length=64)], Count], Field(max_length=32)] = {}


class Position(_Record):
    title: ShortText = ""
    company: ShortText = ""
    start_year: Int64 | None = None
    end_year: Int64 | None = None


class Education(_Record):
    school: ShortText = ""
    degree: ShortText = ""
    field: ShortText = ""


class Engagement(_Record):
    post_id: PostId
    engaged_at: Int64 | None = None
    action: ShortText = ""
    # The engaged post itself, for the prompt; without it the item is known only by id.
    post: Post | None = None


# Actions that say the member did not want a post. The history may carry every interaction (the
# ranker reads them all, negatives included); retrieval prompts show engaged posts only. On MovieLens
# an action is `rated X`, and a rating below ENGAGED_RATING is not an engagement.
NEGATIVE_ACTIONS = frozenset({"dislike", "neutral", "skip", "hide", "dismiss", "report", "unfollow"})
ENGAGED_RATING = 4.0


def rating_of(action: str) -> float | None:
    """The rating of a MovieLens action (`rated 4.5` -> 4.5); None for any other action."""
    name = action.strip().lower()
    if not name.startswith("rated "):
        return None
    try:
        value = float(name.removeprefix("rated "))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def is_engaged(action: str) -> bool:
    rating = rating_of(action)
    if rating is not None:
        return rating >= ENGAGED_RATING
    return action.strip().lower() not in NEGATIVE_ACTIONS


class Member(_Record):
    id: PostId
    headline: ShortText = ""
    summary: LongText = ""
    industry: ShortText = ""
    skills: Annotated[list[ShortText], Field(max_length=256)] = []
    positions: Annotated[list[Position], Field(max_length=64)] = []
    education: Annotated[list[Education], Field(max_length=32)] = []
    history: Annotated[list[Engagement], Field(max_length=MAX_HISTORY)] = []


def _path(kind: str, loc: tuple[int | str, ...]) -> str:
    out = kind
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


class _Overlong:
    """What the parser makes of an integer literal too long for an int64: a value no field accepts,
    reported by its field's path like any other wrong value."""

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"an integer of {self.digits} digits"


def _parse_int(literal: str) -> int | _Overlong:
    return int(literal) if len(literal) <= MAX_INT_CHARS else _Overlong(len(literal.lstrip("-")))


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused when a key appears twice: parsers disagree on which one wins (Python
    keeps the last, others the first), so a record that means two things is not read as either."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise RecordError(f"duplicate key {key!r} in one JSON object")
        out[key] = value
    return out


def parse_json(raw: bytes | str, kind: str) -> Any:
    """JSON read strictly, as every record and event is: UTF-8, no key twice in one object, no integer
    literal longer than an int64's, nesting within the parser's depth; RecordError naming `kind`
    and what is wrong otherwise (the caller bounds the size)."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise RecordError(f"{kind}: not valid UTF-8 at byte {err.start}") from err
    try:
        return json.loads(raw, parse_int=_parse_int, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise RecordError(f"{kind}: invalid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except RecordError as err:
        raise RecordError(f"{kind}: invalid JSON: {err}") from None
    except RecursionError:  # thousands of nested brackets: within the size limit, beyond the parser's
        raise RecordError(f"{kind}: invalid JSON: nested too deeply") from None
    except ValueError as err:  # any other refusal of the parser (a number it cannot convert)
        raise RecordError(f"{kind}: invalid JSON: {err}") from None


def _parse(model: type[_Record], kind: str, raw: bytes | str | dict[str, Any]) -> Any:
    if isinstance(raw, dict):
        data: Any = raw
    else:
        size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
        if size > MAX_RECORD_BYTES:
            raise RecordError(f"{kind}: record of {size} bytes exceeds the limit of {MAX_RECORD_BYTES}")
        data = parse_json(raw, kind)
    if not isinstance(data, dict):
        raise RecordError(f"{kind}: expected a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        message = first["msg"]
        if isinstance(first.get("input"), _Overlong) and first["type"] != "extra_forbidden":
            message = f"{first['input']!r} is out of range (at most {MAX_INT_CHARS} characters)"
        raise RecordError(f"{_path(kind, first['loc'])}: {message}{more}") from None


def parse_post(raw: bytes | str | dict[str, Any]) -> Post:
    return _parse(Post, "post", raw)


def parse_member(raw: bytes | str | dict[str, Any]) -> Member:
    return _parse(Member, "member", raw)


def json_schema(kind: str) -> dict[str, Any]:
    models: dict[str, type[BaseModel]] = {"post": Post, "member": Member}
    return models[kind].model_json_schema()


R = TypeVar("R")


def read_jsonl(path: Path, parse: Callable[[bytes], R], key: Callable[[R], int] | None = None) -> list[R]:
    """One record a line (blank lines skipped); a bad one is named by file and line number: a line
    over MAX_RECORD_BYTES (refused after reading that much of it, never the whole), and with `key`,
    a record whose key an earlier line holds (a corpus with a post twice means two posts in one id,
    refused before anything is embedded rather than at the index write after all of it)."""
    records: list[R] = []
    seen: dict[int, int] = {}  # key -> the line that first held it
    with open(path, "rb") as f:
        n = 0
        while line := f.readline(MAX_RECORD_BYTES + 1):
            n += 1
            try:
                if len(line) > MAX_RECORD_BYTES and not line.endswith(b"\n"):  # (the newline is not the record's)
                    raise RecordError(f"a line over the record limit of {MAX_RECORD_BYTES} bytes")
                if not line.strip():
                    continue
                record = parse(line)
                if key is not None and (first := seen.setdefault(key(record), n)) != n:
                    raise RecordError(f"id {key(record)} again (first at line {first})")
                records.append(record)
            except RecordError as err:
                raise RecordError(f"{path}:{n}: {err}") from err
    return records


def read_posts_jsonl(path: Path) -> list[Post]:
    return read_jsonl(path, parse_post, key=lambda post: post.id)


def write_posts_jsonl(posts: Iterable[Post], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for post in posts:
            f.write(post.model_dump_json(exclude_defaults=True) + "\n")


def maximal_member(member_id: int = 1, budget: int = MAX_RECORD_BYTES) -> dict[str, Any]:
    """The largest valid member within `budget` bytes of JSON, as a client at the limits would send it:
    every list at its cap, every string at its cap, a history of posts with long texts filling what
    is left. The worst case the prompt builder has to bound (benchmarks and bad-input tests use it)."""
    word = "feed retrieval "
    short = (word * 69)[:1024]
    member: dict[str, Any] = {
        "id": member_id,
        "headline": short,
        "industry": short,
        "summary": (word * 2200)[:MAX_TEXT_CHARS],
        "skills": [short] * 256,
        "positions": [{"title": short, "company": short, "start_year": 2000, "end_year": 2020}] * 64,
        "education": [{"school": short, "degree": short, "field": short}] * 32,
        "history": [],
    }
    size = len(json.dumps(member))
    item_text = (word * 600)[:8000]
    post_id = 0
    while size + len(item_text) + 200 < budget and post_id < MAX_HISTORY:
        post_id += 1
        item = {
            "post_id": post_id,
            "engaged_at": 1_700_000_000 + post_id,
            "action": "like",
            "post": {"id": post_id, "text": item_text, "tags": ["ml", "feeds"]},
        }
        member["history"].append(item)
        size += len(json.dumps(item)) + 2
    return member
