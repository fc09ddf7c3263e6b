"""Bring a python backend model back when its stub process dies.

Triton runs each python backend instance in a stub process. When one dies (killed, out of memory),
this Triton answers that model's requests with "Stub process ... is not healthy" from then on, and
still reports the model and the server ready: nothing recovers by itself. The launcher therefore
watches the stubs of the server it started, and reloads a model whose stub count fell, through the
repository API (model control `explicit`, that API restricted to the admin key): about 2 s for the
default encoder, without restarting the server or touching the other models.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

logger = logging.getLogger(__name__)

STUB_BINARY = b"triton_python_backend_stub"
# Triton's admin APIs answer only requests carrying ADMIN_HEADER = the key (feedserve.server passes
# the restriction; over gRPC Triton expects the header with its prefix).
ADMIN_APIS = "model-repository,shared-memory,trace,logging"
ADMIN_HEADER = "feedserve-admin-key"
GRPC_ADMIN_HEADER = "triton-grpc-protocol-" + ADMIN_HEADER
ADMIN_KEY_ENV = "FEEDSERVE_ADMIN_KEY"


def stub_processes(server_pid: int) -> dict[int, str]:
    """pid -> model of the live python backend stubs of the tritonserver `server_pid` (a stub's first
    argument is `<repository>/<model>/<version>/model.py`); dead ones (zombies) are left out."""
    stubs = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue  # gone meanwhile
        state, ppid = stat[0], int(stat[1])
        if ppid == server_pid and state not in ("Z", "X") and len(args) > 1 and STUB_BINARY in args[0]:
            stubs[int(entry.name)] = Path(args[1].decode()).parent.parent.name
    return stubs


def _running(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def stub_models(server_pid: int) -> Counter[str]:
    return Counter(stub_processes(server_pid).values())


class StubWatchdog(threading.Thread):
    def __init__(self, server_pid: int, http_url: str, admin_header: str, admin_key: str,
                 interval_s: float = 1.0, retry_s: float = 10.0) -> None:
        super().__init__(name="feedserve-stub-watchdog", daemon=True)
        self.server_pid, self.http_url = server_pid, http_url
        self.admin_header, self.admin_key = admin_header, admin_key
        self.interval_s, self.retry_s = interval_s, retry_s
        self.expected = stub_models(server_pid)  # taken once the server is ready: every instance is up
        self.reloads: Counter[str] = Counter()
        self._last_try: dict[str, float] = {}
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # the watchdog must outlive any one bad check
                logger.exception("stub watchdog: check failed")

    def check(self) -> list[str]:
        """Reload the models missing a stub; returns the ones reloaded."""
        if not _running(self.server_pid):
            return []  # the server itself is gone: its launcher sees that, there is nothing to reload into
        live = stub_models(self.server_pid)
        reloaded = []
        for model, expected in self.expected.items():
            if live[model] >= expected or time.monotonic() - self._last_try.get(model, -1e9) < self.retry_s:
                continue
            self._last_try[model] = time.monotonic()
            logger.warning("%s: %d of its %d stub processes died; reloading it", model, expected - live[model], expected)
            if self._load(model):
                self.reloads[model] += 1
                reloaded.append(model)
                logger.warning("%s: reloaded", model)
        return reloaded

    def _load(self, model: str) -> bool:
        req = urllib.request.Request(f"http://{self.http_url}/v2/repository/models/{model}/load", data=b"{}", method="POST",
                                     headers={self.admin_header: self.admin_key, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError) as err:
            detail = err.read().decode(errors="replace") if isinstance(err, urllib.error.HTTPError) else str(err)
            logger.error("%s: reload failed (%s); retrying in %.0f s", model, detail, self.retry_s)
            return False

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join(timeout=5)


def _ready(http_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{http_url}/v2/health/ready", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main(argv: list[str] | None = None) -> int:
    """Watch a tritonserver this process did not start (the GPU container's entrypoint runs it in
    the background, then execs tritonserver in its own pid): wait until the server is ready, then
    reload any python model whose stub dies, until the server exits. The admin key comes from
    $FEEDSERVE_ADMIN_KEY, as the server's restricted APIs expect it."""
    import argparse
    import os

    p = argparse.ArgumentParser(prog="python -m feedserve.supervisor", description=main.__doc__)
    p.add_argument("--server-pid", type=int, required=True)
    p.add_argument("--http-url", default="127.0.0.1:8000")
    p.add_argument("--ready-timeout-s", type=float, default=1800.0, help="a TensorRT plan may be built first")
    p.add_argument("--interval-s", type=float, default=1.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    key = os.environ.get(ADMIN_KEY_ENV)
    if not key:
        logger.error("%s is not set: the watchdog could not reload anything", ADMIN_KEY_ENV)
        return 2
    deadline = time.monotonic() + args.ready_timeout_s
    while not _ready(args.http_url):
        if not _running(args.server_pid) or time.monotonic() > deadline:
            logger.error("tritonserver %d never became ready at %s; not watching it", args.server_pid, args.http_url)
            return 1
        time.sleep(1.0)
    watchdog = StubWatchdog(args.server_pid, args.http_url, ADMIN_HEADER, key, interval_s=args.interval_s)
    logger.info("watching the stubs of tritonserver %d: %s", args.server_pid, dict(watchdog.expected))
    watchdog.start()
    while _running(args.server_pid):
        time.sleep(args.interval_s)
    watchdog.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
