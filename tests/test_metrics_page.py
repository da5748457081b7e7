"""The metrics page as scrapers read it, on a live server: promtool, prometheus_client's OpenMetrics
parser and a real Prometheus (Debian's `prometheus` package ships both binaries; scripts/setup.sh
installs it as root). Tests that need a binary skip, saying so, only where it is absent.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc

from conftest import AFFINE_CONFIG, ServerProcess, affine_model, parse_metrics, write_model
from server.latency_summary import DEFAULT_QUANTILES
from server.metrics import SUMMARIES, TRITON_COUNTERS

pytestmark = pytest.mark.timeout(300)

OM_ACCEPT = "application/openmetrics-text;version=1.0.0"
# What Prometheus 2.x/3.x sends by default: OpenMetrics first, the classic text after it.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
REQUESTS = 5
# promtool's naming lints, which Triton's own names trip (nv_inference_request_duration_us: an abbreviated
# unit; nv_inference_count: a counter without _total, "_count" outside a histogram; *_summary_us: a type
# in the name). The names stay Triton's. Anything else promtool says (no help text, a parse error,
# duplicate or mistyped samples) is a defect of the page.
NAMING_LINTS = (
    'counter metrics should have "_total" suffix',
    "metric names should not contain abbreviated units",
    'non-histogram and non-summary metrics should not have "_count" suffix',
    "metric name should not include type 'summary'",
)


def _fetch(url: str, accept: str | None = None) -> tuple[str, str]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read().decode(), resp.headers["Content-Type"]


def _send(server: ServerProcess, n: int) -> None:
    client = tc.InferenceServerClient(server.grpc_url)
    for i in range(n):
        ins = [tc.InferInput("a", [1, 4], "FP32"), tc.InferInput("b", [1, 2], "INT64")]
        ins[0].set_data_from_numpy(np.full((1, 4), i, np.float32))
        ins[1].set_data_from_numpy(np.full((1, 2), i, np.int64))
        client.infer("affine", ins)
    client.close()


@pytest.fixture(scope="module")
def server(server_factory, tmp_path_factory) -> ServerProcess:
    repo = tmp_path_factory.mktemp("metrics_repo")
    write_model(repo, "affine", affine_model(), AFFINE_CONFIG)
    srv = server_factory(repo, "--metrics-config", "summary_latencies=true")
    _send(srv, REQUESTS)
    return srv


def promtool_problems(text: str) -> list[str]:
    """What `promtool check metrics` reports on a page, less the naming lints on Triton's names."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`; scripts/setup.sh installs it)")
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    lines = [ln.strip() for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    return [ln for ln in lines if not any(lint in ln for lint in NAMING_LINTS)]


# -- the classic page ------------------------------------------------------------------------------------------
def test_classic_page_is_triton_shaped_and_promtool_clean(server: ServerProcess) -> None:
    text, ctype = _fetch(server.metrics_url, PROMETHEUS_ACCEPT)  # Prometheus' default Accept gets it too
    assert ctype.startswith("text/plain; version=0.0.4")
    for name in TRITON_COUNTERS:  # HELP and TYPE name the very samples below them, as Triton writes them
        assert f"# HELP {name} " in text and f"# TYPE {name} counter\n" in text
        assert f"{name}_total" not in text
    assert 'nv_inference_request_success{model="affine",version="1"} 5.0' in text
    assert promtool_problems(text) == []


def test_promtool_check_catches_a_page_without_help() -> None:
    # The check above can fail: a sample with no HELP (what issue 21 found) is reported.
    page = '# TYPE nv_inference_count counter\nnv_inference_count{model="m"} 1\n'
    assert any("no help text" in p for p in promtool_problems(page))


def test_summaries_are_tritons(server: ServerProcess) -> None:
    m = server.scrape()
    lab = (("model", "affine"), ("version", "1"))
    for name in SUMMARIES:
        count = m[(f"{name}_count", lab)]
        assert count == REQUESTS
        values = [m[(name, tuple(sorted({**dict(lab), "quantile": str(q)}.items())))] for q, _ in DEFAULT_QUANTILES]
        assert all(v >= 0 and not math.isnan(v) for v in values) and values == sorted(values)
        assert m[(f"{name}_sum", lab)] >= values[0]
    # Triton's invariant: a summary's _count and _sum match the counters.
    assert m[("nv_inference_request_summary_us_count", lab)] == m[("nv_inference_request_success", lab)]
    assert m[("nv_inference_queue_summary_us_sum", lab)] == pytest.approx(
        m[("nv_inference_queue_duration_us", lab)], abs=REQUESTS
    )


# -- OpenMetrics -----------------------------------------------------------------------------------------------
def test_openmetrics_page_parses(server: ServerProcess) -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    text, ctype = _fetch(server.metrics_url, OM_ACCEPT)
    assert ctype.startswith("application/openmetrics-text; version=1.0.0")
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in text_string_to_metric_families(text)}  # raises on any defect
    for name in TRITON_COUNTERS:
        assert families[name].type == "counter"
        assert families[name].samples and all(s.name == f"{name}_total" for s in families[name].samples)
    for name in SUMMARIES:
        quantiles = {s.labels["quantile"] for s in families[name].samples if "quantile" in s.labels}
        assert quantiles == {str(q) for q, _ in DEFAULT_QUANTILES}
    # The query parameter asks for it too (for scrapers that cannot choose a format).
    assert _fetch(server.metrics_url + "?format=openmetrics")[1] == ctype


@pytest.mark.parametrize(
    "accept, fmt, openmetrics",
    [
        (PROMETHEUS_ACCEPT, None, False),  # Prometheus' default: it takes the classic text, which keeps Triton's names
        (OM_ACCEPT, None, True),
        ("application/openmetrics-text;version=1.0.0,text/plain;q=0", None, True),  # q=0: not acceptable
        ("application/openmetrics-text;version=1.0.0,*/*;q=0.1", None, False),
        (None, None, False),
        ("text/plain", "openmetrics", True),
        (OM_ACCEPT, "prometheus", False),
    ],
)
def test_format_negotiation(accept: str | None, fmt: str | None, openmetrics: bool) -> None:
    from server.metrics import wants_openmetrics

    assert wants_openmetrics(accept, fmt) is openmetrics


def test_unknown_format_parameter_is_refused(server: ServerProcess) -> None:
    with pytest.raises(urllib.error.HTTPError) as err:
        _fetch(server.metrics_url + "?format=xml")
    assert err.value.code == 400 and "format must be one of" in err.value.read().decode()


# -- a real Prometheus -----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prometheus_version(binary: str) -> tuple[int, int]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    m = re.search(r"version (\d+)\.(\d+)", out.stdout + out.stderr)
    assert m, out.stdout + out.stderr
    return int(m.group(1)), int(m.group(2))


def _api(port: int, path: str, **query: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    doc = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert doc["status"] == "success", doc
    return doc["data"]


def test_prometheus_scrapes_both_formats(server: ServerProcess, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian package `prometheus`; scripts/setup.sh installs it)")
    target = f"127.0.0.1:{server.metrics_port}"
    version = _prometheus_version(binary)
    jobs = {"classic": "PrometheusText0.0.4", "openmetrics": "OpenMetricsText1.0.0"}
    config = ["global:", "  scrape_interval: 1s", "scrape_configs:"]
    for job, protocol in jobs.items():
        config += [f"  - job_name: {job}", "    static_configs:", f"      - targets: ['{target}']"]
        if version >= (2, 49):
            config += [f"    scrape_protocols: [{protocol}]"]
        else:  # no scrape_protocols before 2.49: the page's own format switch picks it
            config += ["    params:", f"      format: [{'openmetrics' if job == 'openmetrics' else 'prometheus'}]"]
    (tmp_path / "prometheus.yml").write_text("\n".join(config) + "\n")
    port = _free_port()
    with open(tmp_path / "prometheus.log", "w") as log:  # the child holds its own copy of the descriptor
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        # Both targets scraped once at least, healthy (bounded: a minute).
        t_end = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                targets = _api(port, "targets")["activeTargets"]
                health = {t["labels"]["job"]: (t["health"], t["lastError"]) for t in targets}
                query = _api(port, "query", query="nv_inference_request_success or nv_inference_request_success_total")
            except OSError:
                health, query = {}, {"result": []}
            if {h for h, _ in health.values()} == {"up"} and len(health) == 2 and len(query["result"]) == 2:
                break
            assert not any(h == "down" for h, _ in health.values()), health
            assert time.monotonic() < t_end, f"Prometheus never scraped both formats: {health}"
            time.sleep(0.2)
        metadata = _api(port, "metadata")
        for name in TRITON_COUNTERS:
            assert {m["type"] for m in metadata[name]} == {"counter"}, (name, metadata.get(name))
        for name in SUMMARIES:
            assert {m["type"] for m in metadata[name]} == {"summary"}
        # Each format's series: Triton's names from the classic page, `_total` ones from OpenMetrics.
        classic = _api(port, "query", query='nv_inference_request_success{job="classic",model="affine"}')["result"]
        om = _api(port, "query", query='nv_inference_request_success_total{job="openmetrics",model="affine"}')["result"]
        assert float(classic[0]["value"][1]) == float(om[0]["value"][1]) == REQUESTS
        quantile = _api(port, "query", query='nv_inference_request_summary_us{job="classic",quantile="0.99"}')["result"]
        assert quantile and float(quantile[0]["value"][1]) > 0
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# -- --workers: the supervisor's merged page -------------------------------------------------------------------
def test_workers_page_is_valid_and_merged(server_factory, tmp_path: Path) -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    write_model(tmp_path / "repo", "affine", affine_model(), AFFINE_CONFIG)
    srv = server_factory(tmp_path / "repo", "--workers", "2", "--metrics-config", "summary_latencies=true")
    n = 6
    _send(srv, n)
    text, _ = _fetch(srv.metrics_url)
    assert promtool_problems(text) == []
    m = parse_metrics(text)
    lab = (("model", "affine"), ("version", "1"))
    assert m[("nv_inference_request_success", lab)] == n
    assert m[("nv_inference_request_summary_us_count", lab)] == n
    om = {f.name: f for f in text_string_to_metric_families(_fetch(srv.metrics_url, OM_ACCEPT)[0])}
    assert om["nv_inference_request_success"].type == "counter"
    assert om["nv_inference_request_summary_us"].type == "summary"
