from __future__ import annotations

from pathlib import Path

import pytest

from feedserve.server import LOOPBACK, ServerError, ServerOptions, TritonServer, prepare_backend_dir


def test_missing_artifacts_are_named(tmp_path: Path) -> None:
    server = TritonServer(ServerOptions(artifacts=tmp_path / "nothing-here"))
    with pytest.raises(ServerError, match=r"missing artifacts: .*encoder\.onnx.*feedserve build"):
        server.start()
    assert server.process is None


def test_command_binds_loopback_and_disables_model_control(tmp_path: Path) -> None:
    server = TritonServer(ServerOptions(artifacts=tmp_path))
    cmd = server.command(tmp_path)
    for flag in ("--http-address", "--grpc-address", "--metrics-address"):
        assert f"{flag}={LOOPBACK}" in cmd
    assert "--model-control-mode=explicit" in cmd  # loads behind the admin key (tests/unit/test_security.py)


def test_backend_dir_has_the_stub_for_this_python(tmp_path: Path) -> None:
    backend = prepare_backend_dir(tmp_path)
    assert (backend / "python" / "libtriton_python.so").exists()
    assert (backend / "python" / "triton_python_backend_stub").exists()
