from __future__ import annotations

from pathlib import Path

from feedserve.repository import drift, render_configs, write_repository
from feedserve.schema import IO, ModelName
from feedserve.server import DEFAULT_REPOSITORY


def test_committed_repository_matches_the_code() -> None:
    stale = drift(DEFAULT_REPOSITORY)
    assert not stale, f"model_repository/ drifted from feedserve.repository: {stale}; run `feedserve render`"


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
