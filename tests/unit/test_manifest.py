"""Damaged artifacts are refused at load, by name: the manifest (checkpoint, ONNX, buckets,
settings), the index's own checksum, and the server's check before tritonserver starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from feedserve.artifacts import ArtifactLayout
from feedserve.errors import IndexStoreError
from feedserve.index.snapshot import save_arrays
from feedserve.index.store import PostIndex
from feedserve.ops.launcher import ServerError, ServerOptions, TritonServer
from feedserve.ops.manifest import MANIFEST, ManifestError
from feedserve.triton.encoder import EncoderModel
from feedserve.triton.preprocess import PreprocessModel


@pytest.fixture
def layout(tiny_artifacts: ArtifactLayout, tmp_path: Path) -> ArtifactLayout:
    copy = ArtifactLayout(tmp_path / "artifacts")
    shutil.copytree(tiny_artifacts.root, copy.root, ignore=shutil.ignore_patterns("index", "emb"))
    return copy


def _flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_an_intact_build_verifies(layout: ArtifactLayout) -> None:
    listed = json.loads((layout.root / MANIFEST).read_text())["files"]
    assert {"encoder.onnx", "buckets.json", "serving.json", "hf/tokenizer.json", "hf/config.json"} <= set(listed)
    assert layout.verify() == len(listed)


@pytest.mark.parametrize(
    "damage,words",
    [
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "truncated"),
        (_flip_byte, "checksum differs"),
        (lambda p: p.unlink(), "missing"),
    ],
)
def test_a_damaged_onnx_graph_is_refused_by_the_encoder(layout: ArtifactLayout, damage, words: str) -> None:  # type: ignore[no-untyped-def]
    damage(layout.onnx)
    with pytest.raises(ManifestError, match=words) as err:
        EncoderModel().setup(layout, {})
    assert "encoder.onnx" in str(err.value)


def test_damaged_buckets_or_tokenizer_are_refused_by_preprocess(layout: ArtifactLayout) -> None:
    for path in (layout.buckets, layout.tokenizer):
        original = path.read_bytes()
        path.write_bytes(original.replace(b"1", b"2", 1))
        with pytest.raises(ManifestError, match=path.name):
            PreprocessModel().setup(layout, {"record_kind": "post"})
        path.write_bytes(original)
    PreprocessModel().setup(layout, {"record_kind": "post"})


def test_artifacts_without_a_manifest_are_refused(layout: ArtifactLayout) -> None:
    (layout.root / MANIFEST).unlink()
    with pytest.raises(ManifestError, match="feedserve build"):
        layout.verify(layout.onnx)


def test_a_file_the_manifest_does_not_list_is_refused(layout: ArtifactLayout) -> None:
    stray = layout.root / "encoder.int8.onnx"
    shutil.copy(layout.onnx, stray)
    with pytest.raises(ManifestError, match="not listed"):
        EncoderModel().setup(layout, {"precision": "int8"})


def test_the_server_refuses_damaged_artifacts_before_starting(layout: ArtifactLayout, tmp_path: Path) -> None:
    from feedserve.triton.repository import write_repository

    write_repository(tmp_path / "repo")
    server = TritonServer(ServerOptions(repository=tmp_path / "repo", artifacts=layout.root))
    server.check_artifacts()  # intact
    _flip_byte(layout.hf_dir / "config.json", offset=5)
    with pytest.raises(ServerError, match=r"refusing to serve .*config\.json"):
        server.check_artifacts()
    assert server.process is None


def test_an_index_whose_vectors_changed_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ids, vectors = np.arange(20), rng.normal(size=(20, 8)).astype(np.float32)
    path = tmp_path / "posts.npz"
    save_arrays(path, ids, vectors, {})
    assert len(PostIndex.load(path)) == 20
    # A well-formed file whose vectors are not the ones saved (zip CRCs intact): only the checksum sees it.
    with np.load(path, allow_pickle=False) as data:
        meta = str(data["meta"])
    vectors[3, 0] += 1.0
    with open(path, "wb") as f:
        np.savez(f, ids=ids, vectors=vectors, meta=np.array(meta))
    with pytest.raises(IndexStoreError, match="checksum"):
        PostIndex.load(path)


def test_a_disk_full_snapshot_leaves_the_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    path = tmp_path / "posts.npz"
    save_arrays(path, np.arange(5), rng.normal(size=(5, 8)).astype(np.float32), {"lsn": 5})
    before = path.read_bytes()

    def no_space(f, **arrays):  # type: ignore[no-untyped-def]
        f.write(b"PK\x03\x04partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", no_space)
    with pytest.raises(OSError, match="No space"):
        save_arrays(path, np.arange(9), rng.normal(size=(9, 8)).astype(np.float32), {"lsn": 9})
    monkeypatch.undo()
    assert path.read_bytes() == before and len(PostIndex.load(path)) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["posts.npz"]  # no half-written temporary left


def test_an_index_saved_before_checksums_loads_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "posts.npz"
    vectors = np.random.default_rng(2).normal(size=(4, 8)).astype(np.float32)
    with open(path, "wb") as f:  # as feedserve wrote it before checksums
        np.savez(
            f,
            ids=np.arange(4),
            vectors=vectors,
            meta=np.array(json.dumps({"format": "feedserve.index/1", "dim": 8, "count": 4})),
        )
    with caplog.at_level("WARNING"):
        assert len(PostIndex.load(path)) == 4
    assert "no checksum" in caplog.text


def test_a_build_repairs_damaged_files_and_keeps_the_index(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A damaged artifact is rebuilt by the next `feedserve build` (its up-to-date checks look at
    what a file was built from, not its bytes); the same model keeps its index and live writes."""
    from feedserve.ops.builder import BuildOptions, build_artifacts

    layout = build_artifacts(BuildOptions(tmp_path / "a", source=tiny_checkpoint))
    save_arrays(layout.index, np.arange(3), np.eye(3, layout.serving_dim(), dtype=np.float32), {"lsn": 3})
    layout.onnx.write_bytes(layout.onnx.read_bytes()[:500])
    with pytest.raises(ManifestError, match="truncated"):
        layout.verify()
    build_artifacts(BuildOptions(tmp_path / "a", source=tiny_checkpoint))
    assert layout.verify() >= 4
    assert len(PostIndex.load(layout.index)) == 3


def test_the_verify_command_says_what_differs_in_one_line(layout: ArtifactLayout) -> None:
    """Run as `python -m` (the GPU container's entrypoint does), a mismatch was a traceback: the
    script's copy of the module caught its own ManifestError, not the one the layout raised."""
    import subprocess
    import sys

    layout.settings.write_text(layout.settings.read_text() + " ")
    run = subprocess.run(
        [sys.executable, "-m", "feedserve.ops.manifest", "verify", str(layout.root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.startswith("feedserve.ops.manifest: ") and "serving.json" in run.stderr


def test_an_empty_write_key_is_made_again_and_a_key_is_never_seen_half_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty write.key (a start killed between creating the file and writing it) refused every
    write, silently, forever."""
    from feedserve.ops.keys import WRITE_KEY_ENV, WRITE_KEY_FILE, write_key

    monkeypatch.delenv(WRITE_KEY_ENV, raising=False)

    (tmp_path / WRITE_KEY_FILE).write_text("")
    key = write_key(tmp_path, create=True)
    assert key and len(key) == 32 and (tmp_path / WRITE_KEY_FILE).read_text().strip() == key
    assert write_key(tmp_path, create=True) == key  # kept once made
    assert [p.name for p in tmp_path.iterdir()] == [WRITE_KEY_FILE]  # no temporary left


def test_a_built_file_the_manifest_leaves_out_is_refused_before_the_server_starts(layout: ArtifactLayout) -> None:
    """A graph missing from the manifest (the helper's: the int8 one): the start check said every
    listed file matched, and the encoder refused it after tritonserver had started."""
    from feedserve.ops.manifest import read_manifest, write_manifest

    listed = read_manifest(layout.root)
    write_manifest(layout.root, [layout.root / rel for rel in listed if rel != "ranker.onnx"])
    with pytest.raises(ManifestError, match="ranker.onnx is not listed"):
        layout.verify()


def test_the_settings_and_model_config_a_backend_reads_are_checked_as_its_graph_is(layout: ArtifactLayout) -> None:
    """The encoder and index_write read serving.json and hf/config.json unchecked: a stub reloaded
    after they changed served the graph with another width or vocabulary."""
    from feedserve.triton.index_write import IndexWriteModel

    config = layout.hf_dir / "config.json"
    original = config.read_text()
    config.write_text(original.replace('"vocab_size"', '"vocab_size" ', 1))
    for model in (EncoderModel(), IndexWriteModel()):
        with pytest.raises(ManifestError, match="config.json"):
            model.setup(layout, {})
    config.write_text(original)
    layout.settings.write_text(layout.settings.read_text().replace('"dim"', '"dim" ', 1))
    with pytest.raises(ManifestError, match="serving.json"):
        EncoderModel().setup(layout, {})
