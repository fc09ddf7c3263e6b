"""The python backends' logic on numpy, without a server (tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feedserve.artifacts import ArtifactLayout
from feedserve.triton.base import RequestError
from feedserve.triton.encoder import EncoderModel
from feedserve.triton.preprocess import PreprocessModel


@pytest.fixture(scope="module")
def encoder(tiny_artifacts: ArtifactLayout) -> EncoderModel:
    model = EncoderModel()
    model.setup(tiny_artifacts, {"max_rows_per_run": "3"})
    return model


def _rows(rng: np.random.Generator, lengths: list[int], width: int) -> dict[str, np.ndarray]:
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(4, 200, n)
        mask[i, :n] = 1
    return {"INPUT_IDS": ids, "ATTENTION_MASK": mask}


def test_ragged_batch_equals_rows_alone(encoder: EncoderModel) -> None:
    rng = np.random.default_rng(0)
    requests = [_rows(rng, [5, 40], 40), _rows(rng, [100], 130), _rows(rng, [7, 7, 3, 60, 2], 64)]
    batched = encoder.run(requests)
    for req, out in zip(requests, batched, strict=True):
        assert not isinstance(out, RequestError)
        for i in range(len(req["INPUT_IDS"])):
            n = int(req["ATTENTION_MASK"][i].sum())
            alone = encoder.encoder.encode(req["INPUT_IDS"][i : i + 1, :n], req["ATTENTION_MASK"][i : i + 1, :n])
            np.testing.assert_allclose(out["EMBEDDING"][i], alone[0], atol=1e-5)


@pytest.mark.parametrize(
    "inputs,words",
    [
        ({"INPUT_IDS": np.ones((1, 4), np.int64)}, "ATTENTION_MASK is missing"),
        ({"INPUT_IDS": np.ones((1, 4), np.int32), "ATTENTION_MASK": np.ones((1, 4), np.int64)}, "expected dtype int64"),
        ({"INPUT_IDS": np.ones((1, 4), np.int64), "ATTENTION_MASK": np.zeros((1, 4), np.int64)}, "no tokens"),
        ({"INPUT_IDS": np.ones((1, 4), np.int64), "ATTENTION_MASK": np.array([[0, 1, 1, 1]])}, "right-padded"),
        ({"INPUT_IDS": np.ones((1, 4), np.int64), "ATTENTION_MASK": np.full((1, 4), 2)}, "0 or 1"),
        ({"INPUT_IDS": -np.ones((1, 4), np.int64), "ATTENTION_MASK": np.ones((1, 4), np.int64)}, "token ids"),
        ({"INPUT_IDS": np.ones((1, 999), np.int64), "ATTENTION_MASK": np.ones((1, 999), np.int64)}, "exceed the limit"),
    ],
)
def test_encoder_rejects_bad_tensors_alone(encoder: EncoderModel, inputs: dict[str, np.ndarray], words: str) -> None:
    good = _rows(np.random.default_rng(1), [6], 6)
    bad, ok = encoder.run([inputs, good])
    assert isinstance(bad, RequestError) and words in str(bad)
    assert ok["EMBEDDING"].shape == (1, 32)


def test_preprocess_names_the_bad_record(tiny_artifacts: ArtifactLayout) -> None:
    model = PreprocessModel()
    model.setup(tiny_artifacts, {"record_kind": "post"})
    good = json.dumps({"id": 1, "format": "text", "text": "hello world"}).encode()
    out = model.run(
        [
            {"RECORDS": np.array([[good], [b'{"id": 2, "text": 5}']], object)},
            {"RECORDS": np.array([[good]], object)},
            {"RECORDS": np.array([good], object)},
        ]
    )
    assert isinstance(out[0], RequestError) and "RECORDS[1]" in str(out[0]) and "text" in str(out[0])
    assert out[1]["INPUT_IDS"].shape == out[1]["ATTENTION_MASK"].shape
    assert isinstance(out[2], RequestError) and "shape [batch, 1]" in str(out[2])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_torch_runtime_serves_the_onnx_embeddings(
    tiny_artifacts: ArtifactLayout, encoder: EncoderModel, device: str
) -> None:
    # The gpu-torch variant's encoder: same backend, PyTorch instead of ONNX Runtime (bf16 on a GPU).
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch_encoder = EncoderModel()
    torch_encoder.setup(tiny_artifacts, {"runtime": "torch", "device": device, "max_rows_per_run": "3"})
    rng = np.random.default_rng(5)
    batch = [_rows(rng, [5, 40, 12], 40), _rows(rng, [90], 90), _rows(rng, [3, 3], 3)]
    for got, want in zip(torch_encoder.run(batch), encoder.run(batch), strict=True):
        assert not isinstance(got, RequestError) and not isinstance(want, RequestError)
        cosine = (got["EMBEDDING"] * want["EMBEDDING"]).sum(axis=1)
        assert cosine.min() >= (0.999 if device == "cuda" else 0.99999)


def test_unknown_runtime_is_refused(tiny_artifacts: ArtifactLayout) -> None:
    with pytest.raises(ValueError, match="unknown runtime"):
        EncoderModel().setup(tiny_artifacts, {"runtime": "tensorflow"})


def test_an_unchanged_prompt_is_not_encoded_again(tiny_artifacts: ArtifactLayout) -> None:
    # The member embedding cache: same tokens (unchanged profile and history) -> no encoder run.
    model = EncoderModel()
    model.setup(tiny_artifacts, {"max_rows_per_run": "3", "cache_rows": "4"})
    rng = np.random.default_rng(7)
    member = _rows(rng, [12], 12)
    first = model.run([member])[0]
    calls = []
    real = model.encoder.encode
    model.encoder.encode = lambda ids, mask: calls.append(ids.shape) or real(ids, mask)  # type: ignore[method-assign]
    again = model.run([member])[0]
    assert not calls and model.cache_hits == 1
    np.testing.assert_array_equal(again["EMBEDDING"], first["EMBEDDING"])
    changed = {k: v.copy() for k, v in member.items()}
    changed["INPUT_IDS"][0, -1] += 1  # one more engaged post, say: different tokens
    model.run([changed])
    assert calls == [(1, 12)]  # encoded once, at its own length
    for n in range(6):  # more distinct prompts than the cache holds: the oldest go first
        model.run([_rows(np.random.default_rng(100 + n), [5], 5)])
    assert len(model.cache) == 4 and member["INPUT_IDS"][0].tobytes() not in model.cache


def test_the_rendered_precision_picks_the_graph(
    tiny_artifacts: ArtifactLayout, encoder: EncoderModel, tmp_path: Path
) -> None:
    import shutil

    from feedserve.export.onnx import quantize_int8
    from feedserve.schema import ModelName
    from feedserve.triton.repository import RepositorySettings, render_configs

    def params(precision: str) -> dict[str, str]:
        config = render_configs(RepositorySettings(encoder_precision=precision))[ModelName.ENCODER]
        return {k: v.string_value for k, v in config.parameters.items()}

    def graph(model: EncoderModel) -> str:
        return Path(model.encoder.path).name  # type: ignore[attr-defined]

    layout = ArtifactLayout(tmp_path / "artifacts")
    shutil.copytree(tiny_artifacts.root, layout.root)
    auto = EncoderModel()
    auto.setup(layout, params("auto"))
    assert graph(auto) == "encoder.onnx"  # no int8 graph was built: auto serves fp32
    with pytest.raises(ValueError, match="no int8 graph"):
        EncoderModel().setup(layout, params("int8"))
    quantize_int8(layout.onnx, layout.onnx_int8, layout.vocab_size(), min_cosine=0.9)
    layout.write_manifest()
    int8 = EncoderModel()
    int8.setup(layout, params("auto"))
    assert graph(int8) == "encoder.int8.onnx"
    fp32 = EncoderModel()
    fp32.setup(layout, params("fp32"))
    assert graph(fp32) == "encoder.onnx"
    batch = [_rows(np.random.default_rng(6), [5, 40, 12], 40)]
    got, want = int8.run(batch)[0], encoder.run(batch)[0]
    assert not isinstance(got, RequestError) and not isinstance(want, RequestError)
    assert 0.9 <= float((got["EMBEDDING"] * want["EMBEDDING"]).sum(axis=1).min()) < 1.0


def _run_cost(runs: list[tuple[list[int], int]]) -> float:
    from feedserve.triton.encoder import ATTENTION_WIDTH, RUN_COST_TOKENS

    return sum(len(rows) * width * (1 + width / ATTENTION_WIDTH) + RUN_COST_TOKENS for rows, width in runs)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 512), max_size=80), st.integers(1, 40))
def test_every_grouping_runs_each_row_once_within_its_width(lengths: list[int], max_rows: int) -> None:
    from feedserve.prompt.builder import pad_length
    from feedserve.triton.encoder import GROUPINGS, group_rows

    buckets = (32, 64, 128, 256, 512)
    runs = {g: group_rows(lengths, max_rows, g, buckets) for g in GROUPINGS}
    for grouping, groups in runs.items():
        assert sorted(i for rows, _ in groups for i in rows) == list(range(len(lengths))), grouping
        for rows, width in groups:
            assert 1 <= len(rows) <= max_rows and all(lengths[i] <= width for i in rows)
            if grouping == "buckets":
                assert all(pad_length(lengths[i], buckets) == width for i in rows)
            elif grouping == "longest":
                assert width == max(lengths)
            else:
                assert width == max(lengths[i] for i in rows)  # padded to its own longest, no further
    # The cost grouping is optimal under its cost model, so never worse than the other two.
    assert _run_cost(runs["cost"]) <= min(_run_cost(runs["buckets"]), _run_cost(runs["longest"])) + 1e-6


def test_the_cost_grouping_splits_far_lengths_and_keeps_near_ones() -> None:
    from feedserve.triton.encoder import group_rows

    assert [len(rows) for rows, _ in group_rows([60, 70, 66, 64], 32)] == [4]  # one run of width 70
    runs = group_rows([20, 22, 500, 25], 32)
    assert [(sorted(rows), width) for rows, width in runs] == [([0, 1, 3], 25), ([2], 500)]


def test_a_refused_request_keeps_none_of_its_inputs(tiny_artifacts: ArtifactLayout) -> None:
    """The error a refused request gets back holds no traceback, so nothing of the batch's inputs
    outlives the call: without the cyclic garbage collector (which numpy's allocations never run),
    the refused request's 8 MB tensor is freed as soon as the caller drops it."""
    import gc
    import weakref

    model = PreprocessModel()
    model.setup(tiny_artifacts, {"record_kind": "post"})
    big = np.array([[b'{"id": 1, "text": "' + b"x" * (8 << 20) + b'"}']], dtype=np.object_)
    good = np.array([[json.dumps({"id": 2, "text": "hello"}).encode()]], dtype=np.object_)
    alive = weakref.ref(big)
    gc.disable()
    try:
        outputs = model.run([{"RECORDS": big}, {"RECORDS": good}])
        assert isinstance(outputs[0], RequestError) and "exceeds the limit" in str(outputs[0])
        assert outputs[0].__traceback__ is None and outputs[0].__cause__ is None and outputs[0].__context__ is None
        assert not isinstance(outputs[1], RequestError)
        del big
        assert alive() is None, "the refused request's input is still referenced"
    finally:
        gc.enable()
