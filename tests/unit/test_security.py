"""Security rules that hold for the whole tree: loopback by default, no model control, admin APIs
behind a key, nothing unpickled."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from feedserve.ops.cli import main as cli_main
from feedserve.ops.keys import ADMIN_APIS, ADMIN_HEADER, ADMIN_KEY_ENV
from feedserve.ops.launcher import LOOPBACK, ServerOptions, TritonServer

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [
    p
    for d in ("ensemble", "clients", "export", "training", "benchmarks", "scripts", "docker")
    for p in (ROOT / d).rglob("*")
    if p.suffix in (".py", ".sh")
]


def test_no_code_path_unpickles() -> None:
    offenders = []
    for path in SOURCES:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(
                r"\bimport (c?pickle|dill|joblib)\b|allow_pickle\s*=\s*True|trust_remote_code\s*=\s*True", line
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
            if "np.load(" in line and "allow_pickle=False" not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{n}: np.load without allow_pickle=False")
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{n}: torch.load without weights_only=True")
    assert not offenders, "\n".join(offenders)


def test_the_server_listens_on_loopback_with_model_control_off_and_admin_apis_keyed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from feedserve.triton.repository import write_repository

    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    write_repository(tmp_path)
    options = ServerOptions(repository=tmp_path)
    assert options.host == LOOPBACK == "127.0.0.1"
    cmd = TritonServer(options).command(tmp_path)
    # Models load at start; loading and unloading (the stub watchdog's reloads) need the admin key.
    assert "--model-control-mode=explicit" in cmd and any(a.startswith("--load-model=") for a in cmd)
    assert "model-repository" in ADMIN_APIS.split(",")
    assert (
        f"--http-address={LOOPBACK}" in cmd
        and f"--grpc-address={LOOPBACK}" in cmd
        and f"--metrics-address={LOOPBACK}" in cmd
    )
    for flag in ("--http-restricted-api", "--grpc-restricted-protocol"):
        assert f"{flag}={ADMIN_APIS}:{ADMIN_HEADER}={options.admin_key}" in cmd
    assert (
        len(options.admin_key) >= 32 and ServerOptions(repository=tmp_path).admin_key != options.admin_key
    )  # random per server
    monkeypatch.setenv(ADMIN_KEY_ENV, "operator-key")
    assert ServerOptions(repository=tmp_path).admin_key == "operator-key"


def test_serve_refuses_a_public_address_without_expose(tmp_path: Path) -> None:
    assert cli_main(["--artifacts", str(tmp_path), "serve", "--host", "0.0.0.0"]) == 2
