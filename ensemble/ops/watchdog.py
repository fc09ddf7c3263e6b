"""Bring a python backend model back when its stub process dies.

Triton runs each python backend instance in a stub process. When one dies (killed, out of memory),
this Triton answers that model's requests with "Stub process ... is not healthy" from then on, and
still reports the model and the server ready: nothing recovers by itself. The launcher therefore
watches the stubs of the server it started, and reloads a model whose stub count fell, through the
repository API (model control `explicit`, that API restricted to the admin key): about 2 s for the
default encoder, without restarting the server or touching the other models.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from feedserve.ops.keys import ADMIN_HEADER, ADMIN_KEY_ENV

logger = logging.getLogger(__name__)

STUB_BINARY = b"triton_python_backend_stub"
# Triton's health endpoints (HTTP): ready once every model is loaded, live while the server runs;
# the Kubernetes probes (docker/k8s) and the container health check use the same paths.
READY_PATH, LIVE_PATH = "/v2/health/ready", "/v2/health/live"


def parent_of(pid: int) -> int | None:
    """The parent pid of process `pid`, or None when it is gone or dead (a zombie). Reads /proc
    alone: the stubs' guardians (feedserve.triton.base) call it from a forked child."""
    try:
        state, ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
    except (OSError, IndexError, ValueError):
        return None
    return None if state in ("Z", "X") else int(ppid)


def _running(pid: int) -> bool:
    return parent_of(pid) is not None


def stub_processes(server_pid: int) -> dict[int, str]:
    """pid -> model of the live python backend stubs of the tritonserver `server_pid` (a stub's first
    argument is `<repository>/<model>/<version>/model.py`); dead ones (zombies) are left out."""
    stubs = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or parent_of(int(entry.name)) != server_pid:
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if len(args) > 1 and STUB_BINARY in args[0]:
            stubs[int(entry.name)] = Path(os.fsdecode(args[1])).parent.parent.name
    return stubs


def stub_models(server_pid: int) -> Counter[str]:
    return Counter(stub_processes(server_pid).values())


def deployment_fingerprint(artifacts: Path, repository: Path) -> str:
    """What a reload would load: the artifact manifest and the rendered configs. A reload happens
    only while it is what the server started with; a `feedserve build` or `render` since would
    otherwise bring one model up from new files beside the others running on the old ones."""
    h = hashlib.sha256()
    for path in [artifacts / "manifest.json", *sorted(repository.glob("*/config.pbtxt"))]:
        h.update(str(path.relative_to(path.parent.parent)).encode())
        h.update(path.read_bytes() if path.exists() else b"<missing>")
    return h.hexdigest()


class StubWatchdog(threading.Thread):
    """Reloads a model whose stub count fell. A reload is tried only while the server reports ready
    (not while it shuts down) and the deployment on disk is the one it started with; a failed one is
    retried with a doubling wait. After `give_up_after` failures in a row, `gave_up` says why: the
    launcher then stops the server, so that its supervisor restarts it and the start-time checks
    name the fault, instead of serving a model that can only fail."""

    def __init__(
        self,
        server_pid: int,
        http_url: str,
        admin_key: str,
        fingerprint: Callable[[], str] | None = None,
        interval_s: float = 1.0,
        retry_s: float = 10.0,
        max_retry_s: float = 300.0,
        give_up_after: int = 3,
    ) -> None:
        super().__init__(name="feedserve-stub-watchdog", daemon=True)
        self.server_pid, self.http_url = server_pid, http_url
        self.admin_key = admin_key
        self.fingerprint = fingerprint
        self.started_with = fingerprint() if fingerprint else None
        self.interval_s, self.retry_s, self.max_retry_s, self.give_up_after = (
            interval_s,
            retry_s,
            max_retry_s,
            give_up_after,
        )
        self.expected = stub_models(server_pid)  # taken once the server is ready: every instance is up
        self.reloads: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()  # in a row
        self.gave_up: str | None = None
        self._next_try: dict[str, float] = {}
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.wait(self.interval_s) and self.gave_up is None:
            try:
                self.check()
            except Exception:  # the watchdog must outlive any one bad check
                logger.exception("stub watchdog: check failed")

    def check(self) -> list[str]:
        """Reload the models missing a stub; returns the ones reloaded."""
        if not _running(self.server_pid):
            return []  # the server itself is gone: its launcher sees that, there is nothing to reload into
        live = stub_models(self.server_pid)
        missing = [
            m for m, n in self.expected.items() if live[m] < n and time.monotonic() >= self._next_try.get(m, 0.0)
        ]
        if not missing or not server_ready(self.http_url):
            return []  # not ready: starting a shutdown (stubs exit with it), nothing to repair
        reloaded = []
        for model in missing:
            if self._stopping.is_set():
                break
            logger.warning(
                "%s: %d of its %d stub processes died; reloading it",
                model,
                self.expected[model] - live[model],
                self.expected[model],
            )
            if self._reload(model):
                self.reloads[model] += 1
                self.failures[model] = 0
                reloaded.append(model)
                logger.warning("%s: reloaded", model)
                continue
            self.failures[model] += 1
            wait = min(self.retry_s * 2 ** (self.failures[model] - 1), self.max_retry_s)
            self._next_try[model] = time.monotonic() + wait
            if self.failures[model] >= self.give_up_after:
                self.gave_up = f"{model} could not be reloaded {self.failures[model]} times in a row"
                logger.error("stub watchdog: %s; giving up", self.gave_up)
            else:
                logger.error("%s: not reloaded; next try in %.0f s", model, wait)
        return reloaded

    def _reload(self, model: str) -> bool:
        if self.fingerprint is not None and self.fingerprint() != self.started_with:
            logger.error(
                "%s: the artifacts or the rendered repository changed since the server started; a reload "
                "would mix them with the running models, so it is not done (restart the server)",
                model,
            )
            return False
        return self._post_load(model)

    def _post_load(self, model: str) -> bool:
        req = urllib.request.Request(
            f"http://{self.http_url}/v2/repository/models/{model}/load",
            data=b"{}",
            method="POST",
            headers={ADMIN_HEADER: self.admin_key, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError) as err:
            detail = err.read().decode(errors="replace") if isinstance(err, urllib.error.HTTPError) else str(err)
            logger.error("%s: reload failed (%s)", model, detail)
            return False

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join(timeout=5)


def server_ready(http_url: str, timeout_s: float = 2.0) -> bool:
    """Whether the Triton server at `http_url` answers its readiness probe with 200."""
    try:
        with urllib.request.urlopen(f"http://{http_url}{READY_PATH}", timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main(argv: list[str] | None = None) -> int:
    """Watch a tritonserver this process did not start (the GPU container's entrypoint runs it in
    the background, then execs tritonserver in its own pid): wait until the server is ready, then
    reload any python model whose stub dies, until the server exits. The admin key comes from
    $FEEDSERVE_ADMIN_KEY, as the server's restricted APIs expect it."""
    import argparse
    import signal

    p = argparse.ArgumentParser(prog="python -m feedserve.ops.watchdog", description=main.__doc__)
    p.add_argument("--server-pid", type=int, required=True)
    p.add_argument("--http-url", default="127.0.0.1:8000")
    p.add_argument("--ready-timeout-s", type=float, default=1800.0, help="a TensorRT plan may be built first")
    p.add_argument("--interval-s", type=float, default=1.0)
    p.add_argument(
        "--artifacts", type=Path, help="with --repository: reload only while these are what the server started with"
    )
    p.add_argument("--repository", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    key = os.environ.get(ADMIN_KEY_ENV)
    if not key:
        logger.error("%s is not set: the watchdog could not reload anything", ADMIN_KEY_ENV)
        return 2
    deadline = time.monotonic() + args.ready_timeout_s
    while not server_ready(args.http_url):
        if not _running(args.server_pid) or time.monotonic() > deadline:
            logger.error("tritonserver %d never became ready at %s; not watching it", args.server_pid, args.http_url)
            return 1
        time.sleep(1.0)
    fingerprint = (
        (lambda: deployment_fingerprint(args.artifacts, args.repository))
        if args.artifacts and args.repository
        else None
    )
    watchdog = StubWatchdog(args.server_pid, args.http_url, key, fingerprint, interval_s=args.interval_s)
    logger.info("watching the stubs of tritonserver %d: %s", args.server_pid, dict(watchdog.expected))
    watchdog.start()
    while _running(args.server_pid):
        if watchdog.gave_up:
            # Stop the server: its supervisor (the container runtime) restarts it, and the start-time
            # checks name what is wrong, instead of a model that answers nothing but errors.
            logger.error("stopping tritonserver %d: %s", args.server_pid, watchdog.gave_up)
            os.kill(args.server_pid, signal.SIGTERM)
            return 1
        time.sleep(args.interval_s)
    watchdog.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
