from __future__ import annotations

from pathlib import Path

import pytest

from feedserve.artifacts import ArtifactLayout
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


def test_without_a_ranker_every_model_but_the_ranking_ones_loads(tmp_path: Path) -> None:
    from feedserve.triton.repository import write_repository

    repo, artifacts = tmp_path / "repo", tmp_path / "artifacts"
    write_repository(repo)
    artifacts.mkdir()
    server = TritonServer(ServerOptions(repository=repo, artifacts=artifacts))
    loaded = {a.removeprefix("--load-model=") for a in server.load_models()}
    assert "rank" not in loaded and "feed" not in loaded and {"retrieve", "knn", "encoder"} <= loaded
    for path in ArtifactLayout(artifacts).ranker_files():
        path.write_text("{}")
    assert server.load_models() == ["--load-model=*"]


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


class _Flaky(TritonServer):
    """The launcher's supervision over real short-lived processes instead of tritonserver: each
    launch runs `sleep`, or fails as a start-up that never became ready would."""

    def __init__(self, options: ServerOptions, outcomes: list[str]) -> None:
        super().__init__(options)
        self.outcomes, self.launches = outcomes, 0

    def _launch(self) -> None:
        import subprocess

        self.launches += 1
        outcome = self.outcomes.pop(0) if self.outcomes else "runs"
        if outcome == "fails":
            raise ServerError("tritonserver exited with code 1 during start-up")
        seconds = "0.2" if outcome == "dies" else "30"
        self.process = subprocess.Popen(["sleep", seconds], start_new_session=True)


def _wait(condition, seconds: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(condition())


def test_the_launcher_restarts_a_dead_server_and_retries_a_failed_restart(tmp_path: Path) -> None:
    options = ServerOptions(artifacts=tmp_path, restart_backoff_s=0.01, watch_stubs=False)
    server = _Flaky(options, ["dies", "fails", "runs"])
    server.check_artifacts = lambda: None  # type: ignore[method-assign]
    server.start()
    try:
        # died -> a restart that failed -> another that runs: the failure did not stop supervision
        assert _wait(lambda: server.restarts == 1), (server.launches, server.gave_up)
        assert server.launches == 3 and server.running and server.gave_up is None
    finally:
        server.stop()
    assert not server.running and server.process is None


def test_the_launcher_gives_up_past_its_restart_budget(tmp_path: Path) -> None:
    options = ServerOptions(artifacts=tmp_path, restart_backoff_s=0.01, max_restarts=2, watch_stubs=False)
    server = _Flaky(options, ["dies", "dies", "dies", "dies"])
    server.check_artifacts = lambda: None  # type: ignore[method-assign]
    server.start()
    try:
        assert _wait(lambda: server.gave_up is not None)
        assert server.launches == 3 and "3 times" in str(server.gave_up) and not server.running
    finally:
        server.stop()


def test_ranker_settings_rank_would_refuse_are_named_before_the_server_starts(tmp_path: Path) -> None:
    """`rank` refuses them at load, and all `serve` said was that tritonserver exited (see its log):
    weights for other tasks than the ranker's, a new-post boost without the ranker's PyTorch weights."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from feedserve.rank.model import RankerConfig
    from feedserve.rank.train import FEED_TASK_WEIGHTS
    from feedserve.triton.repository import RepositorySettings, write_repository

    layout = ArtifactLayout(tmp_path / "artifacts")
    layout.root.mkdir()
    for path in layout.ranker_files():
        path.write_text("{}")
    layout.ranker_config.write_text(RankerConfig(content_dim=8, tasks=tuple(FEED_TASK_WEIGHTS)).to_json())
    write_repository(tmp_path / "repo")  # the MovieLens weights, the default
    server = TritonServer(ServerOptions(repository=tmp_path / "repo", artifacts=layout.root))
    with pytest.raises(ServerError, match=r"must weigh exactly the ranker's tasks \['click'.*'like': 1.0, 'love'"):
        server._check_ranker_settings(layout)
    feed = tuple(FEED_TASK_WEIGHTS.items())
    write_repository(tmp_path / "repo", RepositorySettings(task_weights=feed))
    server._check_ranker_settings(layout)
    write_repository(tmp_path / "repo", RepositorySettings(task_weights=feed, new_post_boost=0.01))
    assert not layout.ranker_weights.exists()
    with pytest.raises(ServerError, match=r"boosts new posts, which needs .*ranker.pt"):
        server._check_ranker_settings(layout)
    layout.ranker_weights.write_text("{}")
    server._check_ranker_settings(layout)
    # A config edited by hand: what `rank` would refuse, named; what it reads as the default, passed.
    config = tmp_path / "repo" / "rank" / "config.pbtxt"
    rendered = config.read_text()
    for bad in ('"nan"', '"1e39"', '"abc"'):
        config.write_text(rendered.replace('"0.01"', bad))
        with pytest.raises(ServerError, match=r"rank/config.pbtxt does not suit .*new_post_boost must be a finite"):
            server._check_ranker_settings(layout)
    movielens = RankerConfig(content_dim=8, tasks=("like", "love", "dislike"))
    layout.ranker_config.write_text(movielens.to_json())
    write_repository(tmp_path / "repo")
    parsed = text_format.Parse(config.read_text(), mc.ModelConfig())
    del parsed.parameters["task_weights"]
    config.write_text(text_format.MessageToString(parsed))
    server._check_ranker_settings(layout)  # `rank` weighs the ranker's tasks by the defaults


def test_a_restart_checks_the_artifacts_again_and_gives_up_on_what_a_start_would_refuse(tmp_path: Path) -> None:
    """A server that died was started again on files changed since (a config edited, a build): it
    answered every request with an error, where a fresh start refuses the directory."""
    options = ServerOptions(artifacts=tmp_path, restart_backoff_s=0.01, watch_stubs=False)
    server = _Flaky(options, ["dies"])
    checks: list[int] = []

    def check() -> None:
        checks.append(1)
        if len(checks) > 1:
            raise ServerError("refusing to serve: serving.json: checksum differs")

    server.check_artifacts = check  # type: ignore[method-assign]
    server.start()
    try:
        assert _wait(lambda: server.gave_up is not None)
        assert "checksum differs" in str(server.gave_up) and server.launches == 1 and not server.running
    finally:
        server.stop()


def test_ports_and_paths_triton_cannot_serve_are_refused_before_it_starts(tmp_path: Path) -> None:
    same = TritonServer(ServerOptions(artifacts=tmp_path, http_port=18123, grpc_port=18123))
    with pytest.raises(ServerError, match="ports must differ"):
        same.start()
    spaced = tmp_path / "my repo"
    spaced.mkdir()
    with pytest.raises(ServerError, match="my repo.*spaces or non-ASCII"):
        TritonServer(ServerOptions(repository=spaced, artifacts=tmp_path)).start()
    accented = tmp_path / "artéfacts"
    accented.mkdir()
    with pytest.raises(ServerError, match="artéfacts.*non-ASCII"):
        TritonServer(ServerOptions(artifacts=accented)).start()


class _Failing(TritonServer):
    """tritonserver's start-up failing as it does when a model cannot load: its error lines on its
    output, then exit 1 (a python script in its place)."""

    def command(self, backend_dir: Path) -> list[str]:
        import sys

        script = (
            "print('I1204 12:00:00.000 1 server.cc:1] starting');"
            "print(\"E1204 12:00:01.000 1 model_lifecycle.cc:1] failed to load 'knn' version 1: boom\");"
            "print('I1204 12:00:02.000 1 server.cc:2] exiting'); raise SystemExit(1)"
        )
        return [sys.executable, "-c", script]


def test_a_failed_start_quotes_tritonservers_error_not_only_its_exit_code(tmp_path: Path) -> None:
    """Without a log file its output went nowhere: all serve said was "exited with code 1"."""
    from feedserve.ops.launcher import on_free_ports

    server = _Failing(on_free_ports(artifacts=tmp_path, watch_stubs=False, supervise=False))
    server.check_artifacts = lambda: None  # type: ignore[method-assign]
    with pytest.raises(ServerError, match=r"exited with code 1 during start-up:\n  E1204 .*failed to load 'knn'"):
        server.start()
    log = tmp_path / "server.log"
    logged = _Failing(on_free_ports(artifacts=tmp_path, watch_stubs=False, supervise=False, log_file=log))
    logged.check_artifacts = lambda: None  # type: ignore[method-assign]
    with pytest.raises(ServerError, match=r"see .*server.log:\n  E1204 .*boom"):
        logged.start()


@pytest.mark.parametrize("end", ["sigkill", "hangup", "ctrl-c", "sigkill-while-stopping"])
def test_a_server_outlives_no_launcher(tmp_path: Path, end: str) -> None:
    """tritonserver runs in its own session: a launcher killed with SIGKILL (or by the OOM killer)
    left it serving unsupervised, holding the ports and the index's writer lock. Its guardian ends
    the group, also when the launcher's terminal hangs up or is interrupted (the guardian first
    shared the launcher's signals), and when the launcher is killed while it waits for the server
    to stop (the guardian was ended first). A python script that ignores SIGINT stands in for
    tritonserver."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    marker = tmp_path / "server.pid"
    stopping = end == "sigkill-while-stopping"
    script = textwrap.dedent(
        f"""
        import signal, sys, time
        from pathlib import Path
        from feedserve.ops.launcher import ServerOptions, TritonServer, on_free_ports

        # As on a terminal: a job started in the background (CI's) inherits SIGINT and SIGHUP ignored.
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        STAND_IN = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(120)"

        class Sleeping(TritonServer):
            def command(self, backend_dir):
                return [sys.executable, "-c", STAND_IN]

            def wait_ready(self, timeout_s):
                Path({str(marker)!r}).write_text(str(self.process.pid))

        server = Sleeping(on_free_ports(artifacts=Path({str(tmp_path)!r}), watch_stubs=False, supervise=False))
        server._launch()
        if {stopping!r}:
            time.sleep(1)
            server.stop(timeout_s=60)  # the stand-in ignores SIGINT: this waits
        time.sleep(120)
        """
    )
    launcher = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        server = int(marker.read_text())
        time.sleep(2 if stopping else 0.5)
        if end in ("sigkill", "sigkill-while-stopping"):
            os.kill(launcher.pid, signal.SIGKILL)
        else:
            os.killpg(launcher.pid, signal.SIGHUP if end == "hangup" else signal.SIGINT)
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            try:
                os.killpg(server, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.killpg(server, signal.SIGKILL)
            raise AssertionError("the server outlived its launcher")
    finally:
        launcher.kill()
