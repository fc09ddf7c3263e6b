"""The HPA's metric (docker/k8s/prometheus-adapter-values.yaml) is computed from Triton series; a
real server exports them, per model, on its metrics port, for the models the rule reads."""

from __future__ import annotations

import re
import urllib.request

import pytest
import yaml

from feedserve.artifacts import REPO_ROOT
from tests.unit.test_k8s import TRITON_SERIES

pytestmark = pytest.mark.integration


def test_triton_exports_the_series_the_autoscaler_reads(triton_server) -> None:  # type: ignore[no-untyped-def]
    port = triton_server.options.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    (rule,) = yaml.safe_load((REPO_ROOT / "docker" / "k8s" / "prometheus-adapter-values.yaml").read_text())["rules"][
        "custom"
    ]
    models = re.search(r'model=~"([^"]+)"', rule["metricsQuery"])
    assert models is not None
    for series in TRITON_SERIES:
        exported = set(re.findall(rf'^{series}{{[^}}]*model="([^"]+)"', text, re.MULTILINE))
        assert set(models.group(1).split("|")) <= exported, f"{series}: exported for {sorted(exported)}"
