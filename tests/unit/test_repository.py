from __future__ import annotations

from pathlib import Path

import pytest

from feedserve.ops.launcher import DEFAULT_REPOSITORY
from feedserve.schema import IO, ModelName
from feedserve.triton.repository import RepositorySettings, drift, render_configs, write_repository


def test_committed_repository_matches_the_code() -> None:
    stale = drift(DEFAULT_REPOSITORY)
    assert not stale, f"model_repository/ drifted from feedserve.triton.repository: {stale}; run `feedserve render`"


def test_every_model_is_rendered_with_schema_tensors(tmp_path: Path) -> None:
    write_repository(tmp_path)
    configs = render_configs()
    assert set(configs) == set(ModelName)
    for name, config in configs.items():
        assert [i.name for i in config.input] == [s.name for s in IO[name].inputs]
        assert [o.name for o in config.output] == [s.name for s in IO[name].outputs]
        assert (tmp_path / name / "config.pbtxt").exists()


def test_ensemble_steps_only_use_produced_tensors() -> None:
    for config in render_configs().values():
        if config.platform != "ensemble":
            continue
        available = {i.name for i in config.input}
        for step in config.ensemble_scheduling.step:
            assert set(step.input_map.values()) <= available, (config.name, step.model_name)
            available |= set(step.output_map.values())
        assert {o.name for o in config.output} <= available


def test_gpu_variants_change_only_where_models_run() -> None:
    import pytest
    from tritonclient.grpc import model_config_pb2 as mc

    from feedserve.triton.repository import VARIANTS, RepositorySettings

    cpu = render_configs(RepositorySettings())
    for variant in VARIANTS[1:]:
        gpu = render_configs(RepositorySettings(variant=variant))
        assert set(gpu) == set(cpu)
        for name in (ModelName.EMBED_POST, ModelName.EMBED_MEMBER, ModelName.RETRIEVE, ModelName.FEED):
            assert gpu[name] == cpu[name]  # the same ensembles, tensor for tensor
        for name in (ModelName.PREPROCESS_POST, ModelName.PREPROCESS_MEMBER):
            assert gpu[name] == cpu[name]  # tokenising stays on CPU instances
        for name in (ModelName.ENCODER, ModelName.KNN, ModelName.RANK):
            assert [g.kind for g in gpu[name].instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
        assert gpu[ModelName.KNN].parameters["engine"].string_value == "torch"
        rank = {k: v.string_value for k, v in gpu[ModelName.RANK].parameters.items()}
        assert (rank["runtime"], rank["dtype"], rank["attention"]) == ("torch", "fp32", "split")
        assert "runtime" not in cpu[ModelName.RANK].parameters  # ONNX Runtime, the backend's default
    trt = render_configs(RepositorySettings(variant="gpu-trt"))[ModelName.ENCODER]
    assert trt.platform == "tensorrt_plan" and not trt.backend
    assert not trt.input and not trt.output  # read from the plan, whose names the exporter sets
    torch_encoder = render_configs(RepositorySettings(variant="gpu-torch"))[ModelName.ENCODER]
    assert torch_encoder.parameters["runtime"].string_value == "torch"
    with pytest.raises(ValueError, match="unknown repository variant"):
        RepositorySettings(variant="tpu")
    with pytest.raises(ValueError, match="unknown ranker dtype"):
        RepositorySettings(variant="gpu-torch", rank_dtype="fp8")
    with pytest.raises(ValueError, match="unknown ranker attention"):
        RepositorySettings(variant="gpu-torch", rank_attention="sparse")
    # Settings of one runtime are refused where the other runs, not rendered and ignored.
    with pytest.raises(ValueError, match="apply to the GPU variants"):
        RepositorySettings(rank_dtype="bf16")
    with pytest.raises(ValueError, match="apply to the GPU variants"):
        RepositorySettings(rank_attention="dense")
    with pytest.raises(ValueError, match="rank_threads are ONNX Runtime's"):
        RepositorySettings(variant="gpu-torch", rank_threads=2)


def test_a_follower_server_has_no_writer() -> None:
    from feedserve.triton.repository import RepositorySettings

    follower = render_configs(RepositorySettings(index_writer=False))
    assert ModelName.INDEX_WRITE not in follower and ModelName.KNN in follower
    assert render_configs()[ModelName.INDEX_WRITE].instance_group[0].count == 1  # one writer, always


def test_the_encoder_precision_is_a_cpu_choice() -> None:
    assert render_configs()[ModelName.ENCODER].parameters["precision"].string_value == "auto"
    int8 = render_configs(RepositorySettings(encoder_precision="int8"))[ModelName.ENCODER]
    assert int8.parameters["precision"].string_value == "int8"
    assert "precision" not in render_configs(RepositorySettings(variant="gpu-torch"))[ModelName.ENCODER].parameters
    with pytest.raises(ValueError, match="int8 encoder is an ONNX Runtime CPU graph"):
        render_configs(RepositorySettings(variant="gpu-torch", encoder_precision="int8"))
    with pytest.raises(ValueError, match="unknown encoder precision"):
        RepositorySettings(encoder_precision="int4")


def test_task_weights_are_a_preset_or_a_json_object_of_finite_numbers(tmp_path: Path) -> None:
    import argparse
    import json

    from feedserve.rank.train import DEFAULT_TASK_WEIGHTS, FEED_TASK_WEIGHTS
    from feedserve.triton.repository import main, task_weights_arg

    assert task_weights_arg("feed") == FEED_TASK_WEIGHTS and task_weights_arg("movielens") == DEFAULT_TASK_WEIGHTS
    assert task_weights_arg('{"like": 1, "skip": -0.5}') == {"like": 1.0, "skip": -0.5}
    huge = '{"like": 1' + "0" * 400 + "}"
    bad_values = ('{"like": "1"}', '{"like": true}', '{"like": NaN}', '{"like": 1e999}', '{"like": null}', huge)
    for bad in ("fed", "[1, 2]", "{}", *bad_values):
        with pytest.raises(argparse.ArgumentTypeError):
            task_weights_arg(bad)
    # Rendered into the rank model's parameters, which its backend checks against its ranker.
    assert main(["--out", str(tmp_path), "--task-weights", "feed"]) == 0
    params = render_configs(RepositorySettings(task_weights=tuple(FEED_TASK_WEIGHTS.items())))[
        ModelName.RANK
    ].parameters
    assert json.loads(params["task_weights"].string_value) == FEED_TASK_WEIGHTS
    assert params["tasks"].string_value == ",".join(FEED_TASK_WEIGHTS)
    feed = RepositorySettings(task_weights=tuple(FEED_TASK_WEIGHTS.items()))
    assert drift(tmp_path, feed) == [] and drift(tmp_path, RepositorySettings()) == ["rank/config.pbtxt"]


def test_a_new_post_boost_is_a_finite_number_rendered_into_rank_alone(tmp_path: Path) -> None:
    import argparse

    from feedserve.triton.repository import main, new_post_boost_arg, rendered_rank_params

    assert new_post_boost_arg("0.01") == 0.01 and new_post_boost_arg("-2") == -2.0
    for bad in ("nan", "-inf", "1e39", "", "0x", "true"):
        with pytest.raises(argparse.ArgumentTypeError, match="finite number"):
            new_post_boost_arg(bad)
    with pytest.raises(ValueError, match="finite number"):
        RepositorySettings(new_post_boost=float("nan"))
    assert main(["--out", str(tmp_path), "--new-post-boost", "0.01"]) == 0
    params = rendered_rank_params(tmp_path)
    assert params is not None and float(params["new_post_boost"]) == 0.01
    assert drift(tmp_path, RepositorySettings(new_post_boost=0.01)) == []
    assert drift(tmp_path, RepositorySettings()) == ["rank/config.pbtxt"]  # no boost: no parameter at all
    assert "new_post_boost" not in render_configs()[ModelName.RANK].parameters


def test_an_engagement_retention_reaches_the_engagement_writer_and_with_milvus_every_rank(tmp_path: Path) -> None:
    """The local log's followers read the retention from its snapshot; Milvus's, sharing none, are
    told it."""
    from feedserve.triton.engage_write import EngageWriteModel

    configs = render_configs(RepositorySettings(engagement_retention_days=90))
    assert configs[ModelName.ENGAGE_WRITE].parameters["retention_days"].string_value == "90"
    assert "retention_days" not in configs[ModelName.INDEX_WRITE].parameters
    assert "retention_days" not in configs[ModelName.RANK].parameters
    assert "retention_days" not in render_configs()[ModelName.ENGAGE_WRITE].parameters  # kept forever
    with pytest.raises(ValueError, match=">= 0 days"):
        RepositorySettings(engagement_retention_days=-1)
    milvus = render_configs(RepositorySettings(engagement_retention_days=90, index="milvus"))
    for name in (ModelName.ENGAGE_WRITE, ModelName.RANK):
        assert milvus[name].parameters["retention_days"].string_value == "90"
    assert "retention_days" not in render_configs(RepositorySettings(index="milvus"))[ModelName.RANK].parameters
    from feedserve.artifacts import ArtifactLayout

    model = EngageWriteModel()
    model.setup(ArtifactLayout(tmp_path), {"retention_days": "90"})
    assert model.writer.retention_s == 90 * 86400
    model.finalize()
    with pytest.raises(ValueError, match="retention_days"):
        EngageWriteModel().setup(ArtifactLayout(tmp_path), {"retention_days": "-1"})


def test_a_render_removes_the_models_it_no_longer_renders_and_check_names_them(tmp_path: Path) -> None:
    """`render --no-writer` over a writer's repository kept `index_write` and `engage_write` (a second
    writer once served), and `--check` passed; a model added by hand stays."""
    write_repository(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.pbtxt").write_text('name: "mine"\n')
    follower = RepositorySettings(index_writer=False)
    write_repository(tmp_path, RepositorySettings())
    assert drift(tmp_path, follower) == ["engage_write/ (no longer rendered)", "index_write/ (no longer rendered)"]
    write_repository(tmp_path, follower)
    assert not (tmp_path / "index_write").exists() and not (tmp_path / "engage_write").exists()
    assert (tmp_path / "mine" / "config.pbtxt").exists() and drift(tmp_path, follower) == []
