from __future__ import annotations

from pathlib import Path

import pytest

from feedserve.ops.launcher import LOOPBACK, ServerError, ServerOptions, TritonServer, prepare_backend_dir


def test_missing_artifacts_are_named(tmp_path: Path) -> None:
    server = TritonServer(ServerOptions(artifacts=tmp_path / "nothing-here"))
    with pytest.raises(ServerError, match=r"missing artifacts: .*encoder\.onnx.*feedserve build"):
        server.start()
    assert server.process is None


def test_command_binds_loopback_and_keys_model_control(tmp_path: Path) -> None:
    server = TritonServer(ServerOptions(artifacts=tmp_path))
    cmd = server.command(tmp_path)
    for flag in ("--http-address", "--grpc-address", "--metrics-address"):
        assert f"{flag}={LOOPBACK}" in cmd
    assert "--model-control-mode=explicit" in cmd  # loads behind the admin key (tests/unit/test_security.py)


def test_backend_dir_has_the_stub_for_this_python(tmp_path: Path) -> None:
    backend = prepare_backend_dir(tmp_path)
    assert (backend / "python" / "libtriton_python.so").exists()
    assert (backend / "python" / "triton_python_backend_stub").exists()


def test_the_stub_watchdog_reloads_a_model_whose_stub_died(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With real processes: a fake server starts a fake stub (named like the python backend's, its
    first argument the model's model.py, as Triton starts them). Alive, nothing happens; killed (a
    zombie until reaped), its model is reloaded once; with the server dead, nothing is reloaded."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from feedserve.ops import watchdog as supervisor
    from feedserve.ops.watchdog import StubWatchdog, stub_processes

    model_py = tmp_path / "repo" / "encoder" / "1" / "model.py"
    model_py.parent.mkdir(parents=True)
    model_py.write_text("import time\ntime.sleep(60)\n")
    stub_name = str(tmp_path / "triton_python_backend_stub")
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import subprocess, sys, time\n"
                f"subprocess.Popen([{stub_name!r}, {str(model_py)!r}], executable=sys.executable)\n"
                "time.sleep(60)\n"
            ),
        ]
    )
    try:
        deadline = time.monotonic() + 20
        while not stub_processes(server.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        [(stub_pid, model)] = stub_processes(server.pid).items()
        assert model == "encoder"
        fingerprint = ["v1"]
        watchdog = StubWatchdog(server.pid, "127.0.0.1:1", "key", lambda: fingerprint[0], retry_s=0.01)
        loads: list[str] = []
        monkeypatch.setattr(supervisor, "server_ready", lambda url: True)
        monkeypatch.setattr(watchdog, "_post_load", lambda m: loads.append(m) or True)
        assert watchdog.expected == {"encoder": 1} and watchdog.check() == [] and not loads
        os.kill(stub_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while stub_processes(server.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        monkeypatch.setattr(supervisor, "server_ready", lambda url: False)
        assert watchdog.check() == [] and not loads  # not ready: shutting down, nothing to repair
        monkeypatch.setattr(supervisor, "server_ready", lambda url: True)
        assert watchdog.check() == ["encoder"] and watchdog.reloads == {"encoder": 1} and loads == ["encoder"]
        fingerprint[0] = "v2"  # `feedserve build` ran since: a reload would mix old and new
        for _ in range(3):
            time.sleep(0.05)
            assert watchdog.check() == []
        assert loads == ["encoder"] and watchdog.gave_up and "encoder" in watchdog.gave_up
        server.kill()
        server.wait()
        assert watchdog.check() == []  # the server is gone: nothing to reload into
    finally:
        server.kill()
        server.wait()


def test_the_standalone_watchdog_needs_the_key_and_gives_up_on_a_server_that_never_came(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`python -m feedserve.ops.watchdog`, as the GPU entrypoint starts it beside tritonserver."""
    import subprocess
    import sys

    from feedserve.ops.keys import ADMIN_KEY_ENV
    from feedserve.ops.watchdog import main

    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    assert main(["--server-pid", "1", "--http-url", "127.0.0.1:1"]) == 2
    monkeypatch.setenv(ADMIN_KEY_ENV, "k")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert main(["--server-pid", str(gone.pid), "--http-url", "127.0.0.1:1", "--ready-timeout-s", "30"]) == 1
