"""Triton's admin APIs on a real server: refused without the admin key over HTTP and gRPC, while
health, metadata, statistics and inference stay open."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from feedserve.ops.keys import ADMIN_HEADER, GRPC_ADMIN_HEADER

pytestmark = pytest.mark.integration


def _http(server, method: str, path: str, body: bytes | None = None, key: str | None = None) -> int:  # type: ignore[no-untyped-def]
    headers = {"Content-Type": "application/json", **({ADMIN_HEADER: key} if key else {})}
    req = urllib.request.Request(f"http://{server.http_url}{path}", data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


@pytest.mark.parametrize(
    "method,path,body",
    [
        ("POST", "/v2/repository/index", b"{}"),
        ("POST", "/v2/repository/models/knn/unload", b"{}"),
        ("GET", "/v2/logging", None),
        ("POST", "/v2/logging", json.dumps({"log_verbose_level": 2}).encode()),
        ("GET", "/v2/trace/setting", None),
        ("GET", "/v2/systemsharedmemory/status", None),
    ],
)
def test_admin_apis_need_the_key_over_http(triton_server, method: str, path: str, body: bytes | None) -> None:  # type: ignore[no-untyped-def]
    assert _http(triton_server, method, path, body) == 403
    assert _http(triton_server, method, path, body, key="wrong") == 403


def test_the_key_opens_them_and_the_rest_stays_open(triton_server) -> None:  # type: ignore[no-untyped-def]
    key = triton_server.options.admin_key
    assert _http(triton_server, "GET", "/v2/logging", key=key) == 200
    assert _http(triton_server, "POST", "/v2/repository/index", b"{}", key=key) == 200
    for path in ("/v2/health/ready", "/v2/models/retrieve", "/v2/models/retrieve/config", "/v2/models/retrieve/stats"):
        assert _http(triton_server, "GET", path) == 200, path


def test_admin_apis_need_the_key_over_grpc(triton_server) -> None:  # type: ignore[no-untyped-def]
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    with grpcclient.InferenceServerClient(triton_server.grpc_url) as client:
        with pytest.raises(InferenceServerException, match="(?i)restricted|permission|denied"):
            client.get_model_repository_index()
        with pytest.raises(InferenceServerException, match="(?i)restricted|permission|denied"):
            client.update_log_settings({"log_verbose_level": 2})
        assert (
            client.get_model_repository_index(headers={GRPC_ADMIN_HEADER: triton_server.options.admin_key}) is not None
        )
        assert client.is_server_ready() and client.get_inference_statistics("retrieve") is not None
