from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feedserve.prompt.records import (
    MAX_RECORD_BYTES,
    RecordError,
    json_schema,
    parse_member,
    parse_post,
    read_posts_jsonl,
    write_posts_jsonl,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "ensemble" / "prompt" / "examples"


def test_examples_parse() -> None:
    post = parse_post((EXAMPLES / "post.json").read_bytes())
    member = parse_member((EXAMPLES / "member.json").read_text())
    assert post.counts["views"] == 12345
    assert [h.post_id for h in member.history] == [7301940001, 7301940555]
    assert set(json_schema("post")["properties"]) >= {"id", "author", "counts", "text"}


@pytest.mark.parametrize(
    "raw,words",
    [
        (b'{"format": "text"}', "post.id: Field required"),
        (b'{"id": "42"}', "post.id: Input should be a valid integer"),
        (b'{"id": 1, "text": 5}', "post.text: Input should be a valid string"),
        (b'{"id": 1, "colour": "red"}', "post.colour: Extra inputs are not permitted"),
        (b'{"id": 1, "counts": {"views": -3}}', "post.counts.views: Input should be greater than or equal to 0"),
        (b'{"id": 1, "counts": {"views": true}}', "post.counts.views: Input should be a valid number"),
        (b'{"id": 1, "counts": {"views": NaN}}', "finite"),
        (b'{"id": 1, "counts": {"views": Infinity}}', "finite"),
        (b'{"id": -1}', "post.id: Input should be greater than or equal to 0"),
        (b'{"id": 1, "author": {"name": 3}}', "post.author.name"),
        (b"{not json", "post: invalid JSON"),
        (b"[1, 2]", "post: expected a JSON object, got list"),
        (b'{"id": 1, "text": "\xff\xfe"}', "post: not valid UTF-8 at byte"),
        (json.dumps({"id": 1, "text": "x" * 40000}).encode(), "post.text: String should have at most"),
        (b"x" * (MAX_RECORD_BYTES + 1), "exceeds the limit"),
        # Integers longer than an int64 are refused by field, before Python builds them (over 4,300
        # digits int() itself raises, which once failed the whole batch as INTERNAL).
        (b'{"id": ' + b"9" * 5000 + b"}", "post.id: an integer of 5000 digits is out of range"),
        (b'{"id": 1, "year": ' + b"9" * 4301 + b"}", "post.year: an integer of 4301 digits"),
        (b'{"id": 1, "created_at": -' + b"9" * 25 + b"}", "post.created_at: an integer of 25 digits"),
        (b'{"id": 1, "counts": {"views": ' + b"9" * 4400 + b"}}", "post.counts.views: an integer of 4400 digits"),
        (b'{"id": 1, "year": 99999999999999999999}', "post.year: Input should be less than or equal to"),
        (b'{"id": 1, "counts": {"views": 1e999}}', "finite"),
        # A key twice is ambiguous (parsers differ on which wins): refused, whichever is nested.
        (b'{"id": 1, "id": 2}', "post: invalid JSON: duplicate key 'id'"),
        (b'{"id": 1, "author": {"name": "a", "name": "b"}}', "duplicate key 'name'"),
    ],
)
def test_bad_posts_name_the_field(raw: bytes, words: str) -> None:
    with pytest.raises(RecordError) as err:
        parse_post(raw)
    assert words in str(err.value)


@pytest.mark.parametrize(
    "raw,words",
    [
        ({"id": 5, "history": [{"engaged_at": 1}]}, "member.history[0].post_id: Field required"),
        ({"id": 5, "skills": "python"}, "member.skills: Input should be a valid list"),
        (
            {"id": 5, "history": [{"post_id": 1, "post": {"id": 1, "counts": {"likes": -1}}}]},
            "member.history[0].post.counts",
        ),
        ({"id": 5, "positions": [{"title": "x", "start_year": "2020"}]}, "member.positions[0].start_year"),
        ({"id": 5, "history": [{"post_id": 1, "engaged_at": 2**70}]}, "member.history[0].engaged_at: an integer"),
        ({"id": 5, "positions": [{"end_year": -(2**64)}]}, "member.positions[0].end_year: an integer of 20 digits"),
    ],
)
def test_bad_members_name_the_field(raw: dict[str, object], words: str) -> None:
    with pytest.raises(RecordError) as err:
        parse_member(json.dumps(raw))
    assert words in str(err.value)


def test_empty_history_is_fine() -> None:
    assert parse_member('{"id": 1}').history == []


def test_jsonl_round_trip(tmp_path: Path) -> None:
    post = parse_post((EXAMPLES / "post.json").read_bytes())
    write_posts_jsonl([post, post.model_copy(update={"id": 2})], tmp_path / "p.jsonl")
    assert [p.id for p in read_posts_jsonl(tmp_path / "p.jsonl")] == [post.id, 2]
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n{"id": "x"}\n')
    with pytest.raises(RecordError, match=r"bad.jsonl:2: post.id"):
        read_posts_jsonl(tmp_path / "bad.jsonl")


@pytest.mark.parametrize(
    "lines,words",
    [
        # A post twice failed only at the index write, after the whole corpus was embedded.
        ([b'{"id": 1}', b'{"id": 2}', b'{"id": 1, "text": "again"}'], "bad.jsonl:3: id 1 again (first at line 1)"),
        # Undecodable bytes were a UnicodeDecodeError naming neither the file nor the line.
        ([b'{"id": 1}', b'{"id": 2, "text": "caf\xe9"}'], "bad.jsonl:2: post: not valid UTF-8 at byte"),
        # A line of any length was read whole before it was refused.
        ([b'{"id": 1}', b'{"id": 2, "text": "' + b"x" * MAX_RECORD_BYTES + b'"}'], "bad.jsonl:2: a line over"),
    ],
)
def test_a_corpus_file_names_the_line_that_is_wrong(tmp_path: Path, lines: list[bytes], words: str) -> None:
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(RecordError) as err:
        read_posts_jsonl(tmp_path / "bad.jsonl")
    assert words in str(err.value)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)
_fields = st.sampled_from(["id", "text", "counts", "tags", "author", "format", "history", "skills", "headline", "year"])


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_fields, _json, max_size=6) | _json)
def test_any_json_is_a_record_or_a_named_error(value: object) -> None:
    """Whatever JSON arrives, the parsers return a record or raise RecordError naming what is wrong:
    never another exception (which would fail the requests batched with it)."""
    raw = json.dumps(value, allow_nan=True).encode()
    for parse, kind in ((parse_post, "post"), (parse_member, "member")):
        try:
            parse(raw)
        except RecordError as err:
            assert str(err).startswith(kind)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_a_record_or_a_named_error(raw: bytes) -> None:
    for parse in (parse_post, parse_member):
        try:
            parse(raw)
        except RecordError:
            pass
