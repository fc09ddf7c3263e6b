"""The command line refuses what an operator mistyped by the option's name, before any work: a count
of 0 hung the embedding client while it held the rebuild lock, a negative --limit dropped posts, a
port past 65535 and a huge -n overflowed, an empty corpus or a missing one failed deep inside."""

from __future__ import annotations

from pathlib import Path

import pytest

from feedserve.ops.cli import main


@pytest.mark.parametrize(
    "argv,words",
    [
        (["index", "--concurrency", "0"], "argument --concurrency: expected an integer in [1,"),
        (["index", "--limit", "-2"], "argument --limit: expected an integer in [0,"),
        (["index", "--batch-size", "x"], "argument --batch-size: expected an integer, got 'x'"),
        (["serve", "--http-port", "70000"], "argument --http-port: expected an integer in [1, 65535]"),
        (["feed", "m.json", "-n", "99999999999999999999"], "argument -n: expected an integer in [1,"),
        (["feed", "m.json", "--candidates", "0"], "argument --candidates"),
        (["build", "--dim", "-5"], "argument --dim"),
    ],
)
def test_an_option_out_of_range_is_refused_by_its_name(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and words in capsys.readouterr().err


def test_an_empty_or_missing_corpus_is_named_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    artifacts = ["--artifacts", str(tmp_path / "artifacts")]
    assert main([*artifacts, "index", "--corpus", str(tmp_path / "empty.jsonl"), "--url", "127.0.0.1:9"]) == 2
    assert f"--corpus {tmp_path / 'empty.jsonl'}: no posts to index" in capsys.readouterr().err
    assert main([*artifacts, "build", "--corpus", str(tmp_path / "nowhere")]) == 2
    assert f"--corpus {tmp_path / 'nowhere'}: no such file or directory" in capsys.readouterr().err
    assert not (tmp_path / "artifacts").exists()  # nothing half written


def test_vectors_of_another_width_are_refused_before_the_rebuild_replaces_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A --url naming another encoder's server: the index was saved 64 wide for artifacts serving 32,
    and every later write and search failed."""
    import numpy as np

    from feedserve.clients import batch
    from feedserve.errors import IndexStoreError
    from feedserve.index.live import IndexWriter

    IndexWriter.open(tmp_path / "index", 32).close()
    before = (tmp_path / "index" / "posts.npz").read_bytes()
    monkeypatch.setattr(batch, "embed_records", lambda posts, **_: np.eye(len(posts), 64, dtype=np.float32))
    with pytest.raises(IndexStoreError, match="the server embedded 64 dims; these artifacts serve 32"):
        batch.index_corpus([{"id": 1}], [1], tmp_path / "index" / "posts.npz", dim=32)
    assert (tmp_path / "index" / "posts.npz").read_bytes() == before
