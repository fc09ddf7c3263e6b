"""The Kubernetes manifests (docker/k8s), checked offline: every object is valid against the
published schemas of a pinned Kubernetes version, and what the manifests name agrees with the code
and the images (image, ports, probe paths, environment variables, secrets, the HPA's metric)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from feedserve.artifacts import ARTIFACTS_ENV, REPO_ROOT
from feedserve.index.milvus import MILVUS_URI_ENV
from feedserve.ops.keys import ADMIN_KEY_ENV, WRITE_KEY_ENV
from feedserve.ops.launcher import ServerOptions
from feedserve.ops.watchdog import LIVE_PATH, READY_PATH

K8S = REPO_ROOT / "docker" / "k8s"
KUBERNETES = "1.34.0"  # the API version the manifests are validated against
VALUES = ("milvus-values.yaml", "prometheus-adapter-values.yaml")


def _objects() -> list[tuple[str, dict[str, Any]]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [
        (name, doc)
        for name in kustomization["resources"]
        for doc in yaml.safe_load_all((K8S / name).read_text())
        if doc is not None
    ]


def _by_kind(kind: str, name: str) -> dict[str, Any]:
    return next(doc for _, doc in _objects() if doc["kind"] == kind and doc["metadata"]["name"] == name)


def _container(deployment: str) -> dict[str, Any]:
    (container,) = _by_kind("Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return container


def test_every_file_is_in_the_kustomization_and_every_object_is_valid() -> None:
    import kubernetes_validate

    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"]) | {"kustomization.yaml", *VALUES}
    assert {p.name for p in K8S.glob("*.yaml")} == listed
    for name, doc in _objects():
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)  # raises on an invalid object
        assert doc["metadata"]["name"], name
    # The check can fail: a misspelt field and a wrong type are refused.
    deployment = _by_kind("Deployment", "feedserve-triton")
    for broken in (
        {**deployment, "spec": {**deployment["spec"], "replica": 2}},
        {**deployment, "spec": {**deployment["spec"], "replicas": "two"}},
    ):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_triton_runs_the_image_ports_and_probes_the_code_has() -> None:
    compose = yaml.safe_load((REPO_ROOT / "docker" / "compose.yaml").read_text())
    triton = _container("feedserve-triton")
    assert triton["image"] == compose["services"]["triton"]["image"]
    options = ServerOptions()
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"http": options.http_port, "grpc": options.grpc_port, "metrics": options.metrics_port}
    assert triton["startupProbe"]["httpGet"]["path"] == triton["readinessProbe"]["httpGet"]["path"] == READY_PATH
    assert triton["livenessProbe"]["httpGet"]["path"] == LIVE_PATH
    # The TensorRT build at first start fits in the startup probe's window (the compose file allows 300 s).
    startup = triton["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == "1"
    pod = _by_kind("Deployment", "feedserve-triton")["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(options.metrics_port)
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["spec"]["tolerations"])
    service = _by_kind("Service", "feedserve-triton")
    assert {p["port"] for p in service["spec"]["ports"]} == set(ports.values())


def test_the_network_policy_opens_the_inference_ports_alone_to_everyone() -> None:
    options = ServerOptions()
    rules = _by_kind("NetworkPolicy", "feedserve-triton")["spec"]["ingress"]
    open_to_all = {p["port"] for r in rules if "from" not in r for p in r["ports"]}
    assert open_to_all == {options.http_port, options.grpc_port}
    assert all("from" in r for r in rules if options.metrics_port in {p["port"] for p in r["ports"]})


def test_environment_variables_and_secrets_are_the_ones_the_code_reads() -> None:
    entrypoint = (REPO_ROOT / "docker" / "entrypoint.sh").read_text()
    read = {ARTIFACTS_ENV, MILVUS_URI_ENV, WRITE_KEY_ENV, ADMIN_KEY_ENV} | set(
        re.findall(r"\$\{(FEEDSERVE_[A-Z_]+)", entrypoint)
    )
    secret = yaml.safe_load((K8S / "kustomization.yaml").read_text())["secretGenerator"][0]["name"]
    keys = {line.split("=")[0] for line in (K8S / "keys.env.example").read_text().splitlines() if "=" in line}
    for deployment in ("feedserve-triton", "feedserve-ingester"):
        for var in _container(deployment).get("env", []):
            assert var["name"] in read, f"{deployment}: nothing reads {var['name']}"
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == secret and ref["key"] in keys
    triton_env = {v["name"]: v for v in _container("feedserve-triton")["env"]}
    assert triton_env["FEEDSERVE_INDEX"]["value"] == "milvus" and MILVUS_URI_ENV in triton_env
    assert "docker/k8s/keys.env" in (REPO_ROOT / ".gitignore").read_text().splitlines()  # never committed


def test_the_ingester_speaks_to_the_triton_service_with_arguments_it_takes() -> None:
    from feedserve.clients import ingest

    ingester = _container("feedserve-ingester")
    assert ingester["command"][-1] == ingest.__name__
    args = ingester["args"]
    options = ServerOptions()
    assert args[args.index("--url") + 1] == f"feedserve-triton:{options.grpc_port}"
    with pytest.raises(SystemExit) as exit_:  # the arguments parse (then the source is unreachable here)
        ingest.main([*args, "--help"])
    assert exit_.value.code == 0


def test_the_counter_writes_the_stream_the_ingester_reads_with_arguments_it_takes() -> None:
    from feedserve.clients import counter, ingest

    container = _container("feedserve-counter")
    assert container["command"][-1] == counter.__name__
    args = container["args"]
    ingester = _container("feedserve-ingester")["args"]
    read = ingester[ingester.index("--stream") + 1] if "--stream" in ingester else ingest.POST_EVENTS
    assert args[args.index("--out-stream") + 1] == read
    assert args[args.index("--redis") + 1] == ingester[ingester.index("--redis") + 1]
    assert args[args.index("--seed") + 1].startswith(container["volumeMounts"][0]["mountPath"] + "/")
    assert _by_kind("Deployment", "feedserve-counter")["spec"]["replicas"] == 1  # one store per stream
    with pytest.raises(SystemExit) as exit_:
        counter.main([*args, "--help"])
    assert exit_.value.code == 0


def test_the_autoscaler_reads_the_metric_the_adapter_serves() -> None:
    hpa = _by_kind("HorizontalPodAutoscaler", "feedserve-triton")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "feedserve-triton"
    (metric,) = hpa["spec"]["metrics"]
    (rule,) = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    # The series it reads are Triton's (tests/integration/test_k8s_metrics.py reads them off a real server).
    assert set(re.findall(r"nv_[a-z_]+", rule["metricsQuery"])) == set(TRITON_SERIES)
    assert _by_kind("PodDisruptionBudget", "feedserve-triton")["spec"]["minAvailable"] == 1


def test_milvus_is_the_official_chart_not_a_copy() -> None:
    (chart,) = yaml.safe_load((K8S / "kustomization.yaml").read_text())["helmCharts"]
    assert chart["repo"] == "https://zilliztech.github.io/milvus-helm" and re.fullmatch(
        r"\d+\.\d+\.\d+", chart["version"]
    )
    values = yaml.safe_load((K8S / chart["valuesFile"]).read_text())
    assert values["queryNode"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert not list(K8S.glob("**/Chart.yaml"))  # not vendored
    triton_env = {v["name"]: v.get("value") for v in _container("feedserve-triton")["env"]}
    assert triton_env[MILVUS_URI_ENV].startswith(f"http://{chart['releaseName']}:")


TRITON_SERIES = ("nv_inference_queue_duration_us", "nv_inference_request_success")


def test_docs_name_the_files() -> None:
    readme = (K8S / "README.md").read_text()
    for name in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]:
        assert name in readme
