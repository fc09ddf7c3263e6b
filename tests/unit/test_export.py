"""Import and ONNX export with parity, on tiny models built at test time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from feedserve.artifacts import ArtifactLayout, EncoderSettings
from feedserve.encode.ort import OnnxEncoder
from feedserve.export.import_model import import_checkpoint
from feedserve.export.onnx import ParityError, check_parity, export_onnx


def test_export_parity_and_report(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "encoder.onnx"
    report = export_onnx(tiny_checkpoint, EncoderSettings(dim=24), out)
    assert report.parity is not None and report.parity.worst_cosine >= 0.9999
    assert not report.external_data and not (tmp_path / "encoder.onnx.data").exists()
    saved = json.loads((tmp_path / "export_report.json").read_text())
    assert saved["sha256"] == report.sha256 and saved["settings"]["dim"] == 24
    enc = OnnxEncoder(out)
    assert enc.dim == 24
    # Dynamic axes: a batch and length never seen at export time.
    assert enc.encode(np.ones((5, 77), np.int64), np.ones((5, 77), np.int64)).shape == (5, 24)


def test_external_data_path(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "encoder.onnx"
    report = export_onnx(tiny_checkpoint, EncoderSettings(), out, external_data_threshold=0)
    assert report.external_data and (tmp_path / "encoder.onnx.data").exists()
    assert out.stat().st_size < (tmp_path / "encoder.onnx.data").stat().st_size
    assert OnnxEncoder(out).dim == 64


def test_parity_error_reports_the_worst_difference(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "encoder.onnx"
    export_onnx(tiny_checkpoint, EncoderSettings(pooling="last"), out)
    with pytest.raises(ParityError, match=r"worst cosine .* < 0.9999 \(batch \[.*\]\), max abs difference") as err:
        check_parity(tiny_checkpoint, EncoderSettings(pooling="mean"), out)
    assert err.value.worst_cosine < 0.9999 and err.value.max_abs_diff > 0


def test_failed_export_keeps_the_previous_model(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import feedserve.export.onnx as onnx_export

    out = tmp_path / "encoder.onnx"
    export_onnx(tiny_checkpoint, EncoderSettings(), out)
    before = out.read_bytes()

    def broken(*args: object, **kwargs: object) -> None:
        raise ParityError("forced", 0.5, 1.0)

    monkeypatch.setattr(onnx_export, "check_parity", broken)
    with pytest.raises(ParityError):
        export_onnx(tiny_checkpoint, EncoderSettings(dim=8), out)
    assert out.read_bytes() == before


def test_missing_onnx_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        OnnxEncoder(tmp_path / "nope.onnx")


def test_import_causal_lm_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModel, LlamaForCausalLM

    lm_dir = tmp_path / "lm"
    lm = LlamaForCausalLM.from_pretrained(tiny_checkpoint)  # a causal-LM checkpoint, as fine-tuning saves
    lm.save_pretrained(lm_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_checkpoint / name, lm_dir / name)
    out = tmp_path / "hf"
    assert import_checkpoint(lm_dir, out)
    base = AutoModel.from_pretrained(out)
    assert type(base).__name__ == "LlamaModel"
    assert torch.equal(base.embed_tokens.weight, lm.model.embed_tokens.weight)
    record = json.loads((out / "import.json").read_text())
    assert record["architecture"] == "LlamaModel"
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert not import_checkpoint(lm_dir, out)  # same source: skipped
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_import_refuses_what_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        import_checkpoint(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a .gguf file nor a Hugging Face checkpoint"):
        import_checkpoint(tmp_path / "empty", tmp_path / "out")


@pytest.mark.slow
def test_real_smollm2_imports_and_exports_with_parity(tmp_path: Path) -> None:
    from feedserve.export.import_model import default_gguf_path

    hf = tmp_path / "hf"
    import_checkpoint(default_gguf_path(), hf)
    report = export_onnx(hf, EncoderSettings(), tmp_path / "encoder.onnx")
    assert report.parity is not None and report.parity.worst_cosine >= 0.9999
    assert report.parameters > 100_000_000


def test_adapter_packages_are_checked_before_merging(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from feedserve.artifacts import ADAPTER_META
    from feedserve.export.import_model import AdapterMismatch

    with pytest.raises(FileNotFoundError, match="adapter not found"):
        import_checkpoint(tiny_checkpoint, tmp_path / "a", adapter=tmp_path / "missing")
    package = tmp_path / "package"
    package.mkdir()
    with pytest.raises(FileNotFoundError, match=ADAPTER_META):
        import_checkpoint(tiny_checkpoint, tmp_path / "b", adapter=package)
    (package / ADAPTER_META).write_text(json.dumps({"keep_layers": 1, "base_sha256": "0" * 64}))
    with pytest.raises(AdapterMismatch, match="was trained on base 000000000000"):
        import_checkpoint(tiny_checkpoint, tmp_path / "c", adapter=package)


def test_the_default_build_merges_the_bundled_fine_tune_only_into_the_bundled_base() -> None:
    from feedserve.artifacts import DEFAULT_ADAPTER
    from feedserve.ops.builder import resolve_adapter

    assert resolve_adapter(None, None) == DEFAULT_ADAPTER
    assert resolve_adapter(None, None, untuned=True) is None
    assert resolve_adapter(Path("my.gguf"), None) is None
    assert resolve_adapter(Path("my.gguf"), Path("pkg")) == Path("pkg")


def test_the_bundled_fine_tune_is_complete_and_matches_the_bundled_base() -> None:
    from feedserve.artifacts import ADAPTER_META, DEFAULT_ADAPTER, EncoderSettings
    from feedserve.export.import_model import default_gguf_path, source_checksum
    from feedserve.prompt.buckets import PercentileBuckets

    meta = json.loads((DEFAULT_ADAPTER / ADAPTER_META).read_text())
    assert meta["base_sha256"] == source_checksum(default_gguf_path())
    assert meta["keep_layers"] and (DEFAULT_ADAPTER / "adapter_model.safetensors").stat().st_size < 10 * 2**20
    PercentileBuckets.load(DEFAULT_ADAPTER / "buckets.json")  # verifies its checksum
    assert EncoderSettings.load(DEFAULT_ADAPTER / "serving.json").count_format == "percentile"


def test_dim_and_pooling_change_the_adapters_settings_without_replacing_them(tmp_path: Path) -> None:
    from feedserve.artifacts import DEFAULT_ADAPTER, ArtifactLayout, EncoderSettings
    from feedserve.ops.builder import BuildOptions, resolve_settings

    trained = EncoderSettings.load(DEFAULT_ADAPTER / "serving.json")
    layout = ArtifactLayout(tmp_path)
    got = resolve_settings(BuildOptions(tmp_path, adapter=DEFAULT_ADAPTER, dim=256), layout)
    assert got.dim == 256 and got.max_prompt_tokens == trained.max_prompt_tokens == 256
    assert resolve_settings(BuildOptions(tmp_path, adapter=DEFAULT_ADAPTER), layout) == trained
    with pytest.raises(ValueError, match="trained with mean pooling"):
        resolve_settings(BuildOptions(tmp_path, adapter=DEFAULT_ADAPTER, pooling="last"), layout)
    assert resolve_settings(BuildOptions(tmp_path, pooling="last"), layout).pooling == "last"  # no adapter: free


def test_an_export_that_failed_is_redone_by_the_next_build(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import feedserve.export.onnx as onnx_export
    from feedserve.ops.builder import BuildOptions, build_artifacts

    layout = build_artifacts(BuildOptions(tmp_path, source=tiny_checkpoint, dim=32))
    real = onnx_export.export_onnx

    def failing(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed mid-export")

    monkeypatch.setattr(onnx_export, "export_onnx", failing)
    with pytest.raises(RuntimeError):
        build_artifacts(BuildOptions(tmp_path, source=tiny_checkpoint, dim=16))  # serving.json now says 16
    monkeypatch.setattr(onnx_export, "export_onnx", real)
    build_artifacts(BuildOptions(tmp_path, source=tiny_checkpoint, dim=16))
    assert json.loads((layout.root / "export_report.json").read_text())["settings"]["dim"] == 16


def test_settings_saved_before_a_field_was_added_are_the_same_model(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Upgrading feedserve must not re-export the model, nor drop its index, for a settings field
    added with a default (prompt_history was)."""
    from feedserve.ops.builder import BuildOptions, build_artifacts

    layout = build_artifacts(BuildOptions(tmp_path, source=tiny_checkpoint, dim=32))
    for path in (layout.root / "export_report.json", layout.settings):
        data = json.loads(path.read_text())
        settings = data.get("settings", data)
        del settings["prompt_history"]
        path.write_text(json.dumps(data))
    layout.write_manifest()  # as the earlier version wrote them
    layout.index_dir.root.mkdir(exist_ok=True)
    layout.index_dir.snapshot.write_bytes(b"an index built with this model")
    exported = layout.onnx.stat().st_mtime_ns
    build_artifacts(BuildOptions(tmp_path, source=tiny_checkpoint, dim=32))
    assert layout.onnx.stat().st_mtime_ns == exported and layout.index_dir.snapshot.exists()


def test_int8_graph_quantizes_the_projections_except_down_proj(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import onnx

    from feedserve.export.onnx import quantize_int8

    fp32, int8 = tmp_path / "encoder.onnx", tmp_path / "encoder.int8.onnx"
    export_onnx(tiny_checkpoint, EncoderSettings(), fp32)
    vocab = int(json.loads((tiny_checkpoint / "config.json").read_text())["vocab_size"])
    with pytest.raises(ParityError):  # no int8 graph is that close: nothing is written
        quantize_int8(fp32, int8, vocab, min_cosine=1.01)
    assert not int8.exists()
    report = quantize_int8(fp32, int8, vocab, min_cosine=0.9)
    assert 0.9 <= report.worst_cosine < 1.0
    nodes = onnx.load(str(int8)).graph.node
    float_matmuls = [n.name for n in nodes if n.op_type == "MatMul" and n.name.endswith("proj/MatMul")]
    assert float_matmuls and all("down_proj" in n for n in float_matmuls)  # q/k/v/o/gate/up went int8
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in nodes)
    assert OnnxEncoder(int8).encode(np.ones((2, 9), np.int64), np.ones((2, 9), np.int64)).shape == (2, 64)


def test_the_ranker_is_built_once_checked_against_the_encoder_and_removed_without_one(
    tiny_artifacts: ArtifactLayout, tiny_ranker: Path, tmp_path: Path
) -> None:

    from feedserve.ops.builder import SAMPLE_CORPUS, build_ranker
    from feedserve.rank.model import GenerativeRanker, RankerConfig

    layout = ArtifactLayout(tmp_path / "a")
    shutil.copytree(
        tiny_artifacts.root,
        layout.root,
        ignore=shutil.ignore_patterns("index", "ranker*", "post_features*", "coengagement*"),
    )
    build_ranker(layout, tiny_ranker, SAMPLE_CORPUS)
    assert layout.has_ranker()
    # Co-engagement of the training period alone: every like before the cutoff, when it was given,
    # none after it; and the count features of the same period.
    from feedserve.prompt.movielens import load_movielens
    from feedserve.rank.coengagement import CoEngagement
    from feedserve.rank.features import PostFeatures

    ml = load_movielens(SAMPLE_CORPUS)
    cutoff = ml.cutoff()
    table = CoEngagement.load(layout.coengagement)
    entries = np.repeat(table.posts, np.diff(table.indptr))
    stored = {(int(m), int(p), int(t)) for p, m, t in zip(entries, table.members, table.times, strict=True)}
    liked = {(r.user, r.movie, r.timestamp) for r in ml.ratings if r.rating >= 4 and r.movie in ml.movies}
    assert stored == {(u, m, t) for u, m, t in liked if t < cutoff}
    features = PostFeatures.load(layout.post_features)
    rated_before = {r.movie for r in ml.ratings if r.timestamp < cutoff}
    later_only = sorted({r.movie for r in ml.ratings if r.movie in ml.movies} - rated_before)
    assert later_only and not features.percentiles(later_only).any()  # known only to the test period
    assert features.percentiles(sorted(rated_before & ml.movies.keys()))[:, 0].any()
    built = layout.ranker_onnx.stat().st_mtime_ns
    build_ranker(layout, tiny_ranker, SAMPLE_CORPUS)  # up to date: not exported again
    assert layout.ranker_onnx.stat().st_mtime_ns == built
    # Artifacts built before the GPU variants had no ranker.pt: they still rank (on the CPU), and
    # the next build writes it.
    layout.ranker_weights.unlink()
    assert layout.has_ranker()
    build_ranker(layout, tiny_ranker, SAMPLE_CORPUS)
    assert (
        GenerativeRanker.load(layout.root).state_dict().keys() == GenerativeRanker.load(tiny_ranker).state_dict().keys()
    )
    assert layout.ranker_weights.read_bytes() and layout.ranker_onnx.stat().st_mtime_ns != built
    wide = tmp_path / "wide"
    GenerativeRanker(RankerConfig(content_dim=48, d_model=8, n_heads=2, n_layers=1, id_buckets=64)).save(wide)
    with pytest.raises(ValueError, match="reads 48-wide embeddings; this encoder serves 32"):
        build_ranker(layout, wide, SAMPLE_CORPUS)
    build_ranker(layout, None, SAMPLE_CORPUS)  # another encoder, no ranker for it: nothing stale stays
    assert not any(p.exists() for p in (*layout.ranker_files(), layout.ranker_weights))


def test_a_build_that_cannot_succeed_changes_nothing_and_a_server_writing_the_index_stops_it(
    tiny_checkpoint: Path, tiny_ranker: Path, tmp_path: Path
) -> None:
    """A ranker of another width or a Matryoshka width past the model's failed after the export had
    replaced the encoder, rewritten serving.json and deleted the index; a build beside a running
    writer deleted the index under it (which served and logged the old model's vectors on)."""
    from feedserve.index.live import IndexWriter
    from feedserve.ops.builder import BuildOptions, build_artifacts
    from feedserve.rank.model import GenerativeRanker, RankerConfig

    layout = build_artifacts(BuildOptions(tmp_path, source=tiny_checkpoint, dim=32))
    writer = IndexWriter.open(layout.index_dir.root, 32)
    with pytest.raises(ValueError, match="a server is writing"):
        build_artifacts(BuildOptions(tmp_path, source=tiny_checkpoint, dim=16))
    writer.close()
    before = {p: p.read_bytes() for p in (layout.settings, layout.onnx, layout.index_dir.snapshot)}
    wide = tmp_path / "wide"
    GenerativeRanker(RankerConfig(content_dim=48, d_model=8, n_heads=2, n_layers=1, id_buckets=64)).save(wide)
    with pytest.raises(ValueError, match="reads 48-wide embeddings; this encoder would serve 16"):
        build_artifacts(BuildOptions(tmp_path, source=tiny_checkpoint, dim=16, ranker=wide))
    with pytest.raises(ValueError, match="Matryoshka dim must be in"):
        build_artifacts(BuildOptions(tmp_path, source=tiny_checkpoint, dim=10**6))
    assert {p: p.read_bytes() for p in before} == before


def test_build_records_that_do_not_read_are_redone_or_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A truncated serving.json blocked every build, `--force` included, with a bare JSON error; a
    truncated export record the same."""
    from feedserve.ops.builder import BuildOptions, build_artifacts

    layout = build_artifacts(BuildOptions(tmp_path, source=tiny_checkpoint, dim=32))
    layout.settings.write_text('{"dim": 32, ')
    build_artifacts(BuildOptions(tmp_path, source=tiny_checkpoint))  # the last export's settings
    assert EncoderSettings.load(layout.settings).dim == 32
    (layout.root / "export_report.json").write_text("")
    build_artifacts(BuildOptions(tmp_path, source=tiny_checkpoint, dim=32))  # redone, not a JSON error
    assert json.loads((layout.root / "export_report.json").read_text())["settings"]["dim"] == 32
    # Neither reads, and no manifest to say they changed: named, and --force starts from the defaults.
    layout.settings.write_text('{"dim": 32, ')
    (layout.root / "export_report.json").write_text("")
    (layout.root / "manifest.json").unlink()
    with pytest.raises(ValueError, match="serving.json: not serving settings.*--force"):
        build_artifacts(BuildOptions(tmp_path, source=tiny_checkpoint))
    build_artifacts(BuildOptions(tmp_path, source=tiny_checkpoint, force=True))
    assert EncoderSettings.load(layout.settings).dim is None
    # A build killed mid-export left its scratch directory (a graph's worth) beside the artifacts.
    stale = layout.root / ".export-k1lled"
    stale.mkdir()
    (stale / "raw.onnx").write_bytes(b"\0" * 1024)
    build_artifacts(BuildOptions(tmp_path, source=tiny_checkpoint))
    assert not stale.exists() and not list(layout.root.glob("tmp*"))
    layout.settings.write_text(json.dumps({"dim": 32, "from_the_future": 1}))
    with pytest.raises(ValueError, match="unknown settings \\['from_the_future'\\]"):
        EncoderSettings.load(layout.settings)
