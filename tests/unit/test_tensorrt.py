"""The TensorRT exporter: what runs without TensorRT here (renaming, profiles, staleness, the
clear refusal), and the engine build and parity where TensorRT and a GPU exist."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from feedserve.artifacts import ArtifactLayout, EncoderSettings
from feedserve.export.tensorrt import (
    UNAVAILABLE_EXIT,
    EngineOptions,
    Profile,
    ensure_engine,
    main,
    rename_io,
    stale_fields,
    unavailable_reason,
)
from feedserve.files import sha256_file
from feedserve.schema import ATTENTION_MASK, EMBEDDING, INPUT_IDS

REASON = unavailable_reason()


def test_renamed_graph_speaks_the_schema_names(tiny_artifacts: ArtifactLayout, tmp_path: Path) -> None:
    import onnxruntime as ort

    renamed = rename_io(tiny_artifacts.onnx, tmp_path / "encoder.onnx")
    session = ort.InferenceSession(str(renamed), providers=["CPUExecutionProvider"])
    assert sorted(i.name for i in session.get_inputs()) == sorted([INPUT_IDS.name, ATTENTION_MASK.name])
    assert [o.name for o in session.get_outputs()] == [EMBEDDING.name]
    original = ort.InferenceSession(str(tiny_artifacts.onnx), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(4, 200, (3, 9))
    mask = np.ones_like(ids)
    (a,) = session.run(None, {INPUT_IDS.name: ids, ATTENTION_MASK.name: mask})
    (b,) = original.run(None, {"input_ids": ids, "attention_mask": mask})
    np.testing.assert_array_equal(a, b)


def test_profile_follows_the_serving_settings() -> None:
    settings = EncoderSettings(max_prompt_tokens=256, length_buckets=(32, 64, 128, 256))
    profile = Profile.for_settings(settings, max_batch=64)
    assert profile.batch == (1, 32, 64) and profile.tokens == (1, 128, 256)
    assert profile.shapes() == ((1, 1), (32, 128), (64, 256))
    # A budget between buckets is padded up to the next bucket by preprocess: the profile covers it.
    assert Profile.for_settings(EncoderSettings(max_prompt_tokens=200, length_buckets=(64, 128, 256)), 8).tokens == (
        1,
        128,
        256,
    )
    with pytest.raises(ValueError, match="precision"):
        EngineOptions(precision="int4")


def test_a_plan_is_stale_when_anything_it_was_built_from_changed(tmp_path: Path) -> None:
    plan, meta = tmp_path / "model.plan", tmp_path / "model.plan.json"
    expected = {
        "tensorrt": "10.5.0",
        "gpu": {"name": "NVIDIA H100", "capability": [9, 0]},
        "precision": "fp16",
        "profile": {"batch": [1, 32, 64], "tokens": [1, 128, 256]},
        "source_sha256": "ab",
    }
    assert stale_fields(meta, expected) == ["plan"]
    plan.write_bytes(b"engine")
    meta.write_text(json.dumps({**expected, "build_s": 12.0}))
    assert stale_fields(meta, expected) == ["parity"]  # built, never checked: not to be served
    checked = {**expected, "build_s": 12.0, "parity": {"worst_cosine": 0.9995}, "plan_sha256": sha256_file(plan)}
    meta.write_text(json.dumps(checked))
    assert stale_fields(meta, expected) == []
    plan.write_bytes(b"engin")  # truncated after it passed its check
    assert stale_fields(meta, expected) == ["plan_sha256"]
    plan.write_bytes(b"engine")
    moved = {**expected, "gpu": {"name": "NVIDIA L40S", "capability": [8, 9]}, "source_sha256": "cd"}
    assert stale_fields(meta, moved) == ["gpu", "source_sha256"]
    meta.write_text("{not json")
    assert stale_fields(meta, expected) == ["metadata"]


@pytest.mark.skipif(REASON is None, reason="TensorRT and a GPU are present: the refusal cannot be seen")
def test_without_tensorrt_the_command_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check"]) == UNAVAILABLE_EXIT
    assert REASON is not None and REASON in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(REASON is not None, reason=REASON or "")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_engine_builds_and_matches_pytorch(tiny_artifacts: ArtifactLayout, tmp_path: Path, precision: str) -> None:
    from tests.conftest import TINY_SETTINGS

    options = EngineOptions(precision, Profile.for_settings(TINY_SETTINGS, max_batch=8))
    plan = tmp_path / "model.plan"
    assert ensure_engine(tiny_artifacts, plan, options)
    meta = json.loads((tmp_path / "model.plan.json").read_text())
    assert meta["parity"]["worst_cosine"] >= 0.999 and meta["precision"] == precision
    assert not ensure_engine(tiny_artifacts, plan, options)  # up to date: not rebuilt
