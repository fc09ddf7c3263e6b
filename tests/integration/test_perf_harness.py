"""The perf_analyzer harness against a real server: every cell of the matrix measured, the raw CSV
and the report written."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from feedserve.clients.perf import main

pytestmark = pytest.mark.integration


def test_matrix_over_both_protocols(triton_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = triton_server.grpc_url
    assert (
        main(
            [
                "--grpc-url",
                url,
                "--http-url",
                triton_server.http_url,
                "--models",
                "embed_post",
                "--concurrency",
                "1",
                "2",
                "--batch",
                "1",
                "2",
                "--window-ms",
                "1500",
                "--records",
                "8",
                "--stability-pct",
                "500",
                "--max-trials",
                "10",  # short windows on a shared CI machine
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    with open(tmp_path / "perf.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["protocol"], r["batch"], r["concurrency"]) for r in rows} == {
        (p, b, c) for p in ("grpc", "http") for b in ("1", "2") for c in ("1", "2")
    }
    assert all(float(r["infer_per_s"]) > 0 and float(r["p99_ms"]) >= float(r["p50_ms"]) > 0 for r in rows)
    report = (tmp_path / "perf.md").read_text()
    assert "Machine:" in report and "| embed_post | http | 2 | 2 |" in report


def test_the_feed_is_measured_too(triton_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    args = ["--grpc-url", triton_server.grpc_url, "--protocols", "grpc", "--models", "feed", "--concurrency", "1"]
    args += [
        "--window-ms",
        "1500",
        "--records",
        "4",
        "--stability-pct",
        "500",
        "--max-trials",
        "10",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    with open(tmp_path / "perf.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["model"] == "feed" and float(row["infer_per_s"]) > 0
