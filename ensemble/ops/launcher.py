"""Start and stop the bundled `tritonserver` (from the nvidia-pytriton wheel) on loopback.

The wheel is used for its server binary and python backend only; the project talks plain Triton
(model repository, config.pbtxt, KServe v2). What makes the bundled binary work here:
- its shared libraries live in `nvidia_pytriton.libs/`, which must be on LD_LIBRARY_PATH;
- the python backend needs the stub built for *this* interpreter's minor version copied next to
  `libtriton_python.so`, in a backend directory of our own (`--backend-directory`);
- the stub finds this virtual environment's packages only when its `bin/` is first on PATH.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

from feedserve.artifacts import ARTIFACTS_ENV, REPO_ROOT, ArtifactLayout, default_artifacts_dir
from feedserve.errors import ServerError
from feedserve.index.milvus import MILVUS_URI_ENV, connect
from feedserve.ops.keys import ADMIN_APIS, ADMIN_HEADER, ADMIN_KEY_ENV, WRITE_HEADER, WRITE_KEY_ENV, write_key
from feedserve.ops.manifest import MANIFEST, ManifestError
from feedserve.ops.watchdog import StubWatchdog, deployment_fingerprint, server_ready
from feedserve.schema import ModelName

logger = logging.getLogger(__name__)

DEFAULT_REPOSITORY = REPO_ROOT / "model_repository"
LOOPBACK = "127.0.0.1"
BACKEND_CACHE = REPO_ROOT / "build" / "triton-backends"


def _pytriton_dir() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("nvidia-pytriton is not installed: run scripts/setup.sh")
    return Path(next(iter(spec.submodule_search_locations)))


def tritonserver_binary() -> Path:
    return _pytriton_dir() / "tritonserver" / "bin" / "tritonserver"


def _library_dir() -> Path:
    return _pytriton_dir().parent / "nvidia_pytriton.libs"


def prepare_backend_dir(dest: Path) -> Path:
    """A `--backend-directory` whose python backend carries the stub for this interpreter."""
    triton = _pytriton_dir() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = triton / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"no python backend stub for Python {version} in {stub.parent.parent}")
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for src in (stub, *(triton / "backends" / "python").glob("*.*")):
        target = python_dir / src.name
        if not target.exists() or target.stat().st_mtime < src.stat().st_mtime:
            shutil.copy2(src, target)
    return dest


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port free now, and not handed out before by this process (the kernel may offer a
    port again as soon as its probe socket closes: two servers' ports would then collide)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((LOOPBACK, 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


@dataclass
class ServerOptions:
    repository: Path = DEFAULT_REPOSITORY
    artifacts: Path = field(default_factory=default_artifacts_dir)
    host: str = LOOPBACK
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    log_file: Path | None = None
    log_verbose: int = 0
    startup_timeout_s: float = 300.0
    exit_timeout_s: int = 5
    watch_stubs: bool = True  # reload a python model whose stub process died (feedserve.ops.watchdog)
    # Triton's admin APIs (repository index and control, shared-memory registration, trace and log
    # settings) answer only requests that carry this key in the ADMIN_HEADER header (over gRPC, the
    # metadata key GRPC_ADMIN_HEADER); unset, a random key nobody knows turns them off. Health,
    # metadata, statistics and inference stay open (perf_analyzer reads model config and statistics).
    admin_key: str = field(default_factory=lambda: os.environ.get(ADMIN_KEY_ENV) or secrets.token_hex(16))
    # The live index's write key (feedserve.ops.keys): None takes $FEEDSERVE_WRITE_KEY, else the
    # artifact directory's write.key (created on first start).
    write_key: str | None = None
    # tritonserver itself can die (the python backend aborts when a stub dies holding a lock in the
    # memory they share, an upstream crash): it is restarted, with a wait doubling from
    # restart_backoff_s, up to max_restarts times within restart_window_s; past that the launcher
    # gives up (`gave_up`), and `feedserve serve` exits non-zero for its own supervisor.
    supervise: bool = True  # False: no restarts (an outer supervisor, such as a container's, restarts)
    max_restarts: int = 5
    restart_window_s: float = 600.0
    restart_backoff_s: float = 1.0
    extra_args: tuple[str, ...] = ()
    # The Milvus the models read and write when the repository was rendered with `--index milvus`
    # ($FEEDSERVE_MILVUS_URI of the server): a server URI, or a local file, which the launcher serves
    # with Milvus Lite for as long as it runs (feedserve.index.milvus.shared_lite).
    milvus_uri: str | None = None


def on_free_ports(**options: object) -> ServerOptions:
    """ServerOptions on three loopback ports free now (tests, benchmarks, the demo: a server of their own)."""
    return ServerOptions(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), **options)  # type: ignore[arg-type]


class OutputTail:
    """The last lines a child wrote to its pipe, read on a thread: what tritonserver said when it
    failed to start, without a log file (bounded in memory; nothing on disk)."""

    def __init__(self, pipe: IO[bytes], lines: int = 400) -> None:
        self.lines: deque[str] = deque(maxlen=lines)
        self._thread = threading.Thread(target=self._read, args=(pipe,), name="tritonserver-output", daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[bytes]) -> None:
        with pipe:
            for line in pipe:
                self.lines.append(line.decode(errors="replace").rstrip())

    def text(self, wait_s: float = 2.0) -> list[str]:
        """The lines kept, once the child's end of the pipe closed (or after `wait_s`)."""
        self._thread.join(wait_s)
        return list(self.lines)


def startup_errors(lines: Sequence[str], most: int = 4) -> str:
    """What to quote of a failed start: the last error lines of Triton's log (`E1204 12:00:00 ...`:
    a model that failed to load and why), else its last lines."""
    errors = [line for line in lines if re.match(r"E\d{4} ", line)] or list(lines)
    picked = list(dict.fromkeys(line[:600] for line in errors[-most:]))
    return "\n  ".join(picked)


def _servable_path(path: Path, what: str, spaces: bool = False) -> None:
    """Triton's python backend starts each stub with the model repository's path on a command line it
    splits at spaces, and the stubs read paths in an ASCII locale: such a path started a server with
    no model, waiting out its start-up timeout. Refused here, by name."""
    text = str(path.resolve())
    if (" " in text and not spaces) or not text.isascii():
        kind = "non-ASCII characters" if spaces else "spaces or non-ASCII characters"
        raise ServerError(
            f"{what} {text!r}: Triton's python backend cannot serve from a path with {kind}; "
            "move it (or link it) under a plain path"
        )


def guard_process_group(group: int, grace_s: float = 30.0, interval_s: float = 0.5) -> int:
    """Fork a guardian that ends process group `group` (a tritonserver and its stubs) once this
    process is gone; returns the guardian's pid (kill it when the group is ended here).

    tritonserver runs in its own session, so that it and its stubs end together; killed with
    SIGKILL (or by the OOM killer), the launcher left them running unsupervised, holding the ports
    and the index's writer lock. The guardian only sleeps, reads its parent and signals (no locks,
    nothing of the launcher's state): SIGTERM, which Triton takes as a shutdown, then SIGKILL after
    `grace_s`."""
    launcher = os.getpid()
    guardian = os.fork()
    if guardian:
        return guardian
    try:  # the child
        # Out of the launcher's terminal and signals: a hangup or a Ctrl-C to the launcher's group
        # (and the CLI's SIGTERM handler, inherited) must not end the guardian first. Nothing of the
        # launcher's files kept: tritonserver's output pipe among them.
        os.setsid()
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        os.closerange(3, 1 << 16)
        while os.getppid() == launcher:
            time.sleep(interval_s)
        os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            time.sleep(interval_s)
            os.killpg(group, 0)  # ProcessLookupError once every process of it is gone
        os.killpg(group, signal.SIGKILL)
    except BaseException:
        pass
    finally:
        os._exit(0)


class TritonServer:
    """A tritonserver child process, restarted when it dies; use as a context manager or call
    start()/stop(). `process` is the current one."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None
        self.watchdog: StubWatchdog | None = None
        self.write_key = options.write_key  # resolved at start, once the artifacts are checked
        self.restarts = 0  # how many times tritonserver was started again after it died
        self.gave_up: str | None = None  # why the server is down for good
        self._log_handle: IO[bytes] | None = None
        self._tail: OutputTail | None = None  # its output, without a log file
        self._guardian: int | None = None  # ends the server's group if this process dies
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None

    @property
    def http_url(self) -> str:
        return f"{self.options.host}:{self.options.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.options.host}:{self.options.grpc_port}"

    def command(self, backend_dir: Path) -> list[str]:
        o = self.options
        return [
            str(tritonserver_binary()),
            f"--model-repository={o.repository}",
            f"--backend-directory={backend_dir}",
            f"--http-address={o.host}",
            f"--http-port={o.http_port}",
            f"--grpc-address={o.host}",
            f"--grpc-port={o.grpc_port}",
            f"--metrics-address={o.host}",
            f"--metrics-port={o.metrics_port}",
            # Every model loads at start. Loading and unloading go through the repository API, which
            # is restricted to the admin key: the stub watchdog (feedserve.ops.watchdog) uses it to
            # reload a model whose stub process died; nobody else on the network can. (Triton takes
            # one --load-model=*: extra_args must not add another.) Without a ranker in the artifacts,
            # every model but the ranking ones (retrieval only).
            "--model-control-mode=explicit",
            *self.load_models(),
            f"--http-restricted-api={ADMIN_APIS}:{ADMIN_HEADER}={o.admin_key}",
            f"--grpc-restricted-protocol={ADMIN_APIS}:{ADMIN_HEADER}={o.admin_key}",
            # The write key travels as a header; Triton hands it to index_write in the parameters.
            # HTTP header names are case-insensitive (urllib sends Feedserve-write-key): so is the match.
            f"--http-header-forward-pattern=(?i)^{WRITE_HEADER}$",
            f"--grpc-header-forward-pattern=^{WRITE_HEADER}$",
            "--strict-readiness=true",
            "--exit-on-error=true",
            # Idle keep-alive client connections would otherwise hold shutdown for 30 s.
            f"--exit-timeout-secs={o.exit_timeout_s}",
            f"--log-verbose={o.log_verbose}",
            *o.extra_args,
        ]

    def load_models(self) -> list[str]:
        if ArtifactLayout(self.options.artifacts).has_ranker():
            return ["--load-model=*"]
        ranking = {str(ModelName.RANK), str(ModelName.FEED), str(ModelName.ENGAGE_WRITE)}
        names = sorted(p.parent.name for p in self.options.repository.glob("*/config.pbtxt"))
        return [f"--load-model={name}" for name in names if name not in ranking]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(_library_dir()), env.get("LD_LIBRARY_PATH", "")) if p)
        env[ARTIFACTS_ENV] = str(self.options.artifacts)
        if self.write_key:
            env[WRITE_KEY_ENV] = self.write_key
        if self.options.milvus_uri:
            env[MILVUS_URI_ENV] = connect(self.options.milvus_uri)
        return env

    def check_artifacts(self) -> None:
        o = self.options
        if len({o.http_port, o.grpc_port, o.metrics_port}) < 3:
            raise ServerError(
                f"the HTTP, gRPC and metrics ports must differ, got {o.http_port}, {o.grpc_port}, {o.metrics_port}"
            )
        _servable_path(o.repository, "the model repository")
        _servable_path(o.artifacts, "the artifacts", spaces=True)
        layout = ArtifactLayout(self.options.artifacts)
        missing = layout.missing()
        if missing:
            names = ", ".join(str(p) for p in missing)
            raise ServerError(
                f"missing artifacts: {names}. Build them first: `feedserve build` "
                "(imports the model, exports ONNX, fits buckets)."
            )
        try:
            checked = layout.verify()
        except ManifestError as err:
            raise ServerError(f"refusing to serve {layout.root}: {err}") from err
        logger.info("%d artifact files match %s", checked, MANIFEST)
        if not layout.has_ranker():
            logger.warning(
                "no ranker in %s: serving retrieval only (rank and feed are not loaded); "
                "`feedserve build` ships one for the default model, `--ranker DIR` for others",
                layout.root,
            )
        if not (self.options.repository / "knn" / "config.pbtxt").exists():
            raise ServerError(f"{self.options.repository} is not a rendered model repository: `feedserve render`")
        if layout.has_ranker():
            self._check_ranker_settings(layout)

    def _check_ranker_settings(self, layout: ArtifactLayout) -> None:
        """What `rank` would refuse at load, said before: all `serve` could say then was that
        tritonserver exited. The rendered weights must weigh this ranker's tasks, and a new-post boost
        needs the ranker's PyTorch weights (which posts it trained on)."""
        from feedserve.rank.model import RankerConfig
        from feedserve.rank.train import finite_boost
        from feedserve.triton.rank import task_weights
        from feedserve.triton.repository import rendered_rank_params

        params = rendered_rank_params(self.options.repository)
        if params is None:
            return
        config = RankerConfig.load(layout.ranker_config)
        try:  # as `rank` reads them at load
            task_weights(config, params.get("task_weights"))
            boost = finite_boost(params.get("new_post_boost", "0"))
        except ValueError as err:
            raise ServerError(
                f"{self.options.repository / str(ModelName.RANK) / 'config.pbtxt'} does not suit the ranker in "
                f"{layout.root}: {err}. Render it with `feedserve render` (--task-weights, --new-post-boost)"
            ) from err
        if boost and not layout.ranker_weights.exists():
            raise ServerError(
                f"{self.options.repository} boosts new posts, which needs {layout.ranker_weights} (which posts the "
                "ranker trained on): `feedserve build` writes it, or render without --new-post-boost"
            )

    def start(self) -> TritonServer:
        self.check_artifacts()
        self.write_key = self.write_key or write_key(self.options.artifacts, create=True)
        try:
            self._launch()
        except BaseException:
            self.stop()  # closes the log
            raise
        self._stopping.clear()
        if self.options.supervise:
            self._monitor = threading.Thread(target=self._supervise, name="feedserve-server-monitor", daemon=True)
            self._monitor.start()
        return self

    def _launch(self) -> None:
        """Start tritonserver and wait until it is ready (ServerError if it is not)."""
        o = self.options
        for port in (o.http_port, o.grpc_port, o.metrics_port):
            if _port_open(o.host, port):
                raise ServerError(f"port {o.host}:{port} is already in use (another server?)")
        backend_dir = prepare_backend_dir(BACKEND_CACHE)
        cmd = self.command(backend_dir)
        logger.info("starting %s", " ".join(cmd).replace(o.admin_key, "<admin key>"))
        stdout: int | IO[bytes] = subprocess.DEVNULL
        if o.log_file is not None and self._log_handle is None:
            o.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_handle = open(o.log_file, "ab")  # noqa: SIM115 (closed in stop)
        if self._log_handle is not None:
            stdout = self._log_handle
        else:
            stdout = subprocess.PIPE  # read by OutputTail: a failed start is told by its own words
        # Its own session: the server and its python stubs are one process group, ended together.
        self.process = subprocess.Popen(
            cmd, env=self.environment(), stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._tail = OutputTail(self.process.stdout) if self.process.stdout is not None else None
        self._guardian = guard_process_group(self.process.pid)
        try:
            self.wait_ready(o.startup_timeout_s)
        except BaseException:
            self._end_process(timeout_s=30.0)
            raise
        if o.watch_stubs:
            self.watchdog = StubWatchdog(
                self.process.pid,
                self.http_url,
                o.admin_key,
                lambda: deployment_fingerprint(o.artifacts, o.repository),
            )
            self.watchdog.start()
        logger.info("tritonserver ready: http %s, grpc %s", self.http_url, self.grpc_url)

    def _supervise(self) -> None:
        """Restart tritonserver when it exits on its own, within the restart budget."""
        o = self.options
        recent: list[float] = []
        while not self._stopping.is_set():
            process = self.process
            if process is not None and process.poll() is None:
                if self.watchdog is not None and self.watchdog.gave_up:
                    self.gave_up = self.watchdog.gave_up  # a model that can only fail: stop for good
                    return
                self._stopping.wait(0.2)
                continue
            if process is not None:  # None: the last restart failed, and the next one is due
                logger.error("tritonserver exited with code %s", process.returncode)
                self._end_process(timeout_s=0.0)  # what is left of it: orphaned stubs hold its files
            now = time.monotonic()
            recent = [t for t in recent if now - t < o.restart_window_s]
            if len(recent) >= o.max_restarts:
                self.gave_up = f"tritonserver exited {len(recent) + 1} times within {o.restart_window_s:.0f} s"
                logger.error("not restarting: %s", self.gave_up)
                return
            wait = o.restart_backoff_s * 2 ** len(recent)
            recent.append(now)
            logger.warning("restarting tritonserver in %.0f s (restart %d)", wait, self.restarts + 1)
            if self._stopping.wait(wait):
                return
            try:
                # The files may have changed since the start (a build, damage): never serve what a
                # start would refuse. A check that fails will fail at every restart: down for good.
                self.check_artifacts()
            except Exception as err:  # a ServerError, or a file that no longer parses
                self.gave_up = f"not restarting: {err}"
                logger.error("%s", self.gave_up)
                return
            try:
                self._launch()
                self.restarts += 1
            except ServerError as err:  # counted against the budget like an exit
                logger.error("tritonserver restart failed: %s", err)

    @property
    def running(self) -> bool:
        """Whether the server is up or coming back: False once it is down for good."""
        if self._monitor is not None:
            return self.gave_up is None and self._monitor.is_alive()
        alive = self.process is not None and self.process.poll() is None
        return alive and not (self.watchdog is not None and self.watchdog.gave_up)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            code = self.process.poll()
            if code is not None:
                said = startup_errors(self._output())
                hint = f"; see {self.options.log_file}" if self.options.log_file else ""
                raise ServerError(
                    f"tritonserver exited with code {code} during start-up{hint}" + (f":\n  {said}" if said else "")
                )
            if server_ready(self.http_url, timeout_s=1.0):
                return
            time.sleep(0.25)
        raise ServerError(f"tritonserver not ready after {timeout_s:.0f} s")

    def _output(self) -> list[str]:
        """tritonserver's last lines: from its pipe, or the end of the log file."""
        if self._tail is not None:
            return self._tail.text()
        log = self.options.log_file
        if log is None or not log.exists():
            return []
        with open(log, "rb") as f:
            start = max(0, log.stat().st_size - (64 << 10))
            f.seek(start)
            lines = f.read().decode(errors="replace").splitlines()
        return lines[1:] if start else lines  # (a line cut by the seek is no line)

    def _end_process(self, timeout_s: float) -> None:
        """Stop the current tritonserver (SIGINT, then SIGKILL after `timeout_s`) and every process
        left in its group: the watchdog first, since stubs exiting with the server are no deaths."""
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        proc, self.process = self.process, None
        if proc is not None:
            if proc.poll() is None:
                # SIGINT lets Triton unload models and stop the python stubs cleanly.
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    logger.warning("tritonserver did not stop in %.0f s; killing it", timeout_s)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # the group is empty: everything exited
            proc.wait()
        # Only now: a launcher killed while it waited above still has its guardian to end the group.
        if self._guardian is not None:
            os.kill(self._guardian, signal.SIGKILL)
            os.waitpid(self._guardian, 0)
            self._guardian = None

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stopping.set()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join()
        self._monitor = None
        self._end_process(timeout_s)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
