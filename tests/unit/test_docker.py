"""The container files, checked without a Docker engine: they parse, every path they copy exists,
versions agree with the project's, they run as non-root on loopback-published ports, and the
entrypoint does the right things in the right order (run as a script against stub commands)."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from feedserve.artifacts import REPO_ROOT

DOCKER = REPO_ROOT / "docker"
# Each Triton container release pins a TensorRT; a plan only loads in the TensorRT that built it.
TRITON_TENSORRT = {"24.12": "10.7"}


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")),
    )
    out = []
    for line in joined.splitlines():
        if line.strip():
            op, _, rest = line.strip().partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s#]+)", line.strip()):
            found[m.group(1).lower()] = m.group(3)
    return found


def project_version() -> str:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.cpu"])
def test_dockerfile_is_pinned_non_root_and_copies_what_exists(name: str) -> None:
    ops = instructions(DOCKER / name)
    known = {
        "FROM",
        "LABEL",
        "ENV",
        "WORKDIR",
        "COPY",
        "RUN",
        "USER",
        "VOLUME",
        "EXPOSE",
        "HEALTHCHECK",
        "ENTRYPOINT",
        "ARG",
        "CMD",
    }
    assert {op for op, _ in ops} <= known
    base = next(args for op, args in ops if op == "FROM")
    assert ":" in base and not base.endswith(":latest"), f"{name}: unpinned base image {base}"
    for op, args in ops:
        if op == "COPY":
            *sources, _ = args.split()
            for src in sources:
                assert (REPO_ROOT / src).exists(), f"{name} copies {src}, which is not in the repository"
    users = [args for op, args in ops if op == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{name} must end as a non-root user"
    labels = " ".join(args for op, args in ops if op == "LABEL")
    assert f'org.opencontainers.image.version="{project_version()}"' in labels
    assert any(op == "HEALTHCHECK" and "/v2/health/ready" in args for op, args in ops)
    assert ("ENTRYPOINT", '["feedserve-entrypoint"]') in ops


def test_gpu_image_is_the_triton_container_with_its_tensorrt() -> None:
    base = next(args for op, args in instructions(DOCKER / "Dockerfile.gpu") if op == "FROM")
    m = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d\.\d\d)-py3", base)
    assert m, base
    gpu = pins(DOCKER / "requirements-gpu.txt")
    assert gpu["tensorrt-cu12"].startswith(TRITON_TENSORRT[m.group(1)] + ".")
    cpu = pins(REPO_ROOT / "requirements.txt")
    for package, version in gpu.items():
        if package in cpu and package != "torch":  # torch: CPU wheel here, CUDA wheel there
            assert cpu[package] == version, f"{package}: {version} in the GPU image, {cpu[package]} in requirements.txt"


def test_compose_publishes_on_loopback_with_health_checks() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    triton, perf = services["triton"], services["perf"]
    assert (REPO_ROOT / triton["build"]["dockerfile"]).exists()
    assert triton["image"].endswith(":" + project_version())
    assert all(str(p).startswith("127.0.0.1:") for p in triton["ports"])
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
    assert triton["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    base = next(args for op, args in instructions(DOCKER / "Dockerfile.gpu") if op == "FROM")
    assert perf["image"] == base + "-sdk"  # perf_analyzer from the SDK image of the same release
    assert perf["depends_on"]["triton"]["condition"] == "service_healthy"
    assert "perf_analyzer" in perf["command"] and "-u triton:8001" in perf["command"]
    named = set(compose["volumes"])
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in named or source.startswith(("${", ".", "/")), volume


def _run_entrypoint(
    tmp_path: Path, env: dict[str, str], failing: str | None = None
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run the entrypoint with stub commands that log their arguments; `failing` exits 1."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir(exist_ok=True)
    for command in ("feedserve", "python3", "tritonserver"):
        stub = bin_dir / command
        fail = '\necho "stub failed" >&2\nexit 1' if command == failing else ""
        # Each call's words, and how many arguments they were (a JSON value must arrive as one).
        stub.write_text(f'#!/bin/sh\necho "{command} $*" >> "{log}"\necho "$#" >> "{log}.argc"{fail}\n')
        stub.chmod(0o755)
    result = subprocess.run(
        ["bash", str(DOCKER / "entrypoint.sh"), "--log-verbose=1"],
        capture_output=True,
        text=True,
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}", **env},
        timeout=30,
    )
    return result, log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "serving.json").write_text("{}")
    return tmp_path / "artifacts"


def test_entrypoint_builds_the_plan_then_starts_triton(tmp_path: Path, artifacts: Path) -> None:
    env = {
        "FEEDSERVE_ARTIFACTS": str(artifacts),
        "FEEDSERVE_REPOSITORY": str(tmp_path / "models"),
        "FEEDSERVE_TRT_PRECISION": "bf16",
    }
    result, calls = _run_entrypoint(tmp_path, env)
    assert result.returncode == 0, result.stderr
    # The stub watchdog starts in the background just before the exec: its place among the last calls varies.
    watchdog = [c for c in calls if c.startswith("python3 -m feedserve.ops.watchdog")]
    calls = [c for c in calls if c not in watchdog]
    assert len(watchdog) == 1 and "--http-url 127.0.0.1:8000" in watchdog[0]
    assert f"--artifacts {artifacts} --repository {tmp_path / 'models'}" in watchdog[0]
    assert calls[0] == f"python3 -m feedserve.ops.manifest verify {artifacts}"
    assert calls[1] == f"feedserve render --variant gpu-trt --index local --out {tmp_path / 'models'}"
    assert calls[2].startswith("python3 -m feedserve.export.tensorrt ensure")
    assert f"--plan {tmp_path / 'models'}/encoder/1/model.plan" in calls[2] and "--precision bf16" in calls[2]
    assert calls[3].startswith(
        f"tritonserver --model-repository={tmp_path / 'models'} --model-control-mode=explicit --load-model=*"
    )
    assert "--http-restricted-api=model-repository,shared-memory,trace,logging:feedserve-admin-key=" in calls[3]
    # The write key's header reaches index_write, under the name the launcher forwards too.
    assert "--http-header-forward-pattern=(?i)^feedserve-write-key$" in calls[3]
    assert "--grpc-header-forward-pattern=^feedserve-write-key$" in calls[3]
    assert calls[3].endswith("--log-verbose=1")  # extra arguments reach the server


def test_entrypoint_gpu_torch_builds_no_plan_and_cpu_uses_the_launcher(tmp_path: Path, artifacts: Path) -> None:
    result, calls = _run_entrypoint(
        tmp_path,
        {
            "FEEDSERVE_ARTIFACTS": str(artifacts),
            "FEEDSERVE_VARIANT": "gpu-torch",
            "FEEDSERVE_REPOSITORY": str(tmp_path / "models"),
        },
    )
    assert result.returncode == 0 and len(calls) == 4 and any(c.startswith("tritonserver ") for c in calls)
    (tmp_path / "calls.log").unlink()
    result, calls = _run_entrypoint(tmp_path, {"FEEDSERVE_ARTIFACTS": str(artifacts), "FEEDSERVE_VARIANT": "cpu"})
    assert result.returncode == 0
    assert calls == [f"feedserve --artifacts {artifacts} serve --host 0.0.0.0 --expose --log-verbose=1"]


def test_entrypoint_serves_from_milvus_on_both_paths(tmp_path: Path, artifacts: Path) -> None:
    milvus = {
        "FEEDSERVE_INDEX": "milvus",
        "FEEDSERVE_MILVUS_URI": "http://milvus:19530",
        "FEEDSERVE_ARTIFACTS": str(artifacts),
    }
    models = tmp_path / "models"
    result, calls = _run_entrypoint(
        tmp_path, {**milvus, "FEEDSERVE_VARIANT": "gpu-torch", "FEEDSERVE_REPOSITORY": str(models)}
    )
    assert result.returncode == 0 and f"feedserve render --variant gpu-torch --index milvus --out {models}" in calls
    (tmp_path / "calls.log").unlink()
    result, calls = _run_entrypoint(
        tmp_path, {**milvus, "FEEDSERVE_VARIANT": "cpu", "FEEDSERVE_REPOSITORY": str(models)}
    )
    assert result.returncode == 0
    assert calls == [
        f"feedserve render --variant cpu --index milvus --out {models}",
        f"feedserve --artifacts {artifacts} serve --host 0.0.0.0 --expose --repository {models} "
        "--milvus-uri http://milvus:19530 --log-verbose=1",
    ]


def test_entrypoint_renders_the_rankers_settings_each_as_one_argument_on_both_paths(
    tmp_path: Path, artifacts: Path
) -> None:
    """A feed ranker's weights, a new-post boost and a retention reach `feedserve render` (a JSON
    object with spaces whole, a negative boost in exponent form as a value, not an option); the CPU
    image then serves the repository it rendered, not its own."""
    models = tmp_path / "models"
    weights = '{"click": 0.2, "long dwell": 0.5, "like": 1, "comment": 1.5, "share": 2, "skip": -1}'
    ranker = {
        "FEEDSERVE_ARTIFACTS": str(artifacts),
        "FEEDSERVE_REPOSITORY": str(models),
        "FEEDSERVE_TASK_WEIGHTS": weights,
        "FEEDSERVE_NEW_POST_BOOST": "-1e-3",
        "FEEDSERVE_ENGAGEMENT_RETENTION_DAYS": "90",
    }
    settings = [f"--task-weights={weights}", "--new-post-boost=-1e-3", "--engagement-retention-days=90"]
    for variant in ("gpu-torch", "cpu"):
        for log in tmp_path.glob("calls.log*"):
            log.unlink()
        result, calls = _run_entrypoint(tmp_path, {**ranker, "FEEDSERVE_VARIANT": variant})
        assert result.returncode == 0, result.stderr
        render = next(i for i, c in enumerate(calls) if c.startswith("feedserve render"))
        assert (
            calls[render] == f"feedserve render --variant {variant} --index local {' '.join(settings)} --out {models}"
        )
        # Each setting one argument: the words above, counted as the stub received them.
        assert (tmp_path / "calls.log.argc").read_text().split()[render] == "10"
        # What render makes of them (the real one): each value as given.
        args = add_arguments_parsed(["--variant", variant, *settings, "--out", str(models)])
        assert args.task_weights["long dwell"] == 0.5 and args.new_post_boost == -1e-3
        assert args.engagement_retention_days == 90
    assert calls[render + 1] == (
        f"feedserve --artifacts {artifacts} serve --host 0.0.0.0 --expose --repository {models} --log-verbose=1"
    )
    # A value render refuses stops the container before anything serves.
    for log in tmp_path.glob("calls.log*"):
        log.unlink()
    result, calls = _run_entrypoint(tmp_path, {**ranker, "FEEDSERVE_VARIANT": "cpu"}, failing="feedserve")
    assert result.returncode == 1 and len(calls) == 1 and calls[0].startswith("feedserve render")


def add_arguments_parsed(argv: list[str]) -> argparse.Namespace:
    """`feedserve render`'s parser over `argv`."""
    from feedserve.triton.repository import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_entrypoint_stops_when_the_artifacts_fail_their_manifest(tmp_path: Path, artifacts: Path) -> None:
    result, calls = _run_entrypoint(
        tmp_path, {"FEEDSERVE_ARTIFACTS": str(artifacts), "FEEDSERVE_VARIANT": "gpu-torch"}, failing="python3"
    )
    assert result.returncode == 1 and "stub failed" in result.stderr
    assert calls == [f"python3 -m feedserve.ops.manifest verify {artifacts}"]  # nothing rendered or started


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"FEEDSERVE_VARIANT": "tpu"}, "unknown FEEDSERVE_VARIANT"),
        ({"FEEDSERVE_ARTIFACTS": "/nonexistent"}, "no built artifacts"),
        ({"FEEDSERVE_INDEX": "redis"}, "unknown FEEDSERVE_INDEX"),
        ({"FEEDSERVE_INDEX": "milvus"}, "needs FEEDSERVE_MILVUS_URI"),
    ],
)
def test_entrypoint_refuses_bad_settings(tmp_path: Path, artifacts: Path, env: dict[str, str], words: str) -> None:
    result, calls = _run_entrypoint(tmp_path, {"FEEDSERVE_ARTIFACTS": str(artifacts), **env})
    assert result.returncode == 2 and words in result.stderr and not calls
