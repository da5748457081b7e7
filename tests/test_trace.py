"""Triton's trace extension on a live server: settings globally and per model over REST and gRPC
(tritonclient), Triton JSON trace files, and OpenTelemetry spans received by a local OTLP/HTTP
receiver that decodes the export with opentelemetry-proto's messages."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from conftest import AFFINE_CONFIG, ServerProcess, affine_model, write_model

pytestmark = pytest.mark.timeout(240)

ORDER = [
    "REQUEST_START",
    "QUEUE_START",
    "COMPUTE_START",
    "COMPUTE_INPUT_END",
    "COMPUTE_OUTPUT_START",
    "COMPUTE_END",
    "REQUEST_END",
]


def _infer(server: ServerProcess, request_id: str, model: str = "affine") -> None:
    client = th.InferenceServerClient(server.http_url)
    ins = [th.InferInput("a", [1, 4], "FP32"), th.InferInput("b", [1, 2], "INT64")]
    ins[0].set_data_from_numpy(np.zeros((1, 4), np.float32))
    ins[1].set_data_from_numpy(np.zeros((1, 2), np.int64))
    client.infer(model, ins, request_id=request_id)
    client.close()


def _traces(path: Path) -> dict[str, dict]:
    """Triton's trace file: request_id -> {"model_name", ..., "timestamps": {name: ns}}."""
    doc = json.loads(path.read_text())
    heads = {e["id"]: e for e in doc if "model_name" in e}
    out = {}
    for e in doc:
        if "timestamps" in e:
            head = heads[e["id"]]
            out[head["request_id"]] = {**head, "timestamps": {t["name"]: t["ns"] for t in e["timestamps"]}}
    return out


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("trace_repo")
    write_model(repo, "affine", affine_model(), AFFINE_CONFIG)
    write_model(repo, "other", affine_model(), AFFINE_CONFIG.replace('name: "affine"', 'name: "other"'))
    return repo


@pytest.fixture(scope="module")
def server(server_factory, repo) -> ServerProcess:
    return server_factory(repo)


def test_trace_file_at_rate_1_has_timestamps_in_order(server: ServerProcess, tmp_path: Path) -> None:
    http = th.InferenceServerClient(server.http_url)
    assert http.get_trace_settings() == {
        "trace_file": "",
        "trace_level": ["OFF"],
        "trace_rate": "1000",
        "trace_count": "-1",
        "log_frequency": "0",
        "trace_mode": "triton",
    }
    trace_file = tmp_path / "trace.json"
    try:
        answer = http.update_trace_settings(
            settings={
                "trace_file": str(trace_file),
                "trace_level": ["TIMESTAMPS"],
                "trace_rate": "1",
                "log_frequency": "1",
            }
        )
        assert answer["trace_level"] == ["TIMESTAMPS"] and answer["trace_rate"] == "1"
        _infer(server, "traced-1")
        # log_frequency 1: each trace is written, to <trace_file>.<i>, before its response goes out.
        traces = _traces(Path(f"{trace_file}.0"))
        t = traces["traced-1"]
        assert t["model_name"] == "affine" and t["model_version"] == 1
        ts = t["timestamps"]
        assert list(ts) == ORDER  # written in time order, which is Triton's order
        assert [ts[name] for name in ORDER] == sorted(ts[name] for name in ORDER)
        assert ts["REQUEST_END"] > ts["REQUEST_START"]
    finally:
        http.update_trace_settings(
            settings={"trace_level": ["OFF"], "trace_file": None, "trace_rate": None, "log_frequency": None}
        )
    http.close()


def test_per_model_settings_and_count(server: ServerProcess, tmp_path: Path) -> None:
    client = tc.InferenceServerClient(server.grpc_url)
    trace_file = tmp_path / "t.json"
    try:
        client.update_trace_settings(
            settings={
                "trace_file": str(trace_file),
                "trace_level": ["TIMESTAMPS"],
                "trace_rate": "1",
                "log_frequency": "1",
            }
        )
        # "other" is not traced; "affine" takes two traces and then stops (trace_count counts down).
        other = client.update_trace_settings("other", {"trace_level": ["OFF"]}, as_json=True)["settings"]
        assert other["trace_level"]["value"] == ["OFF"] and other["trace_rate"]["value"] == ["1"]
        client.update_trace_settings("affine", {"trace_count": "2"})
        assert client.get_trace_settings(as_json=True)["settings"]["trace_level"]["value"] == ["TIMESTAMPS"]
        for i in range(3):
            _infer(server, f"a-{i}")
            _infer(server, f"o-{i}", model="other")
        files = sorted(tmp_path.glob("t.json.*"))
        traced = {rid for f in files for rid in _traces(f)}
        assert traced == {"a-0", "a-1"}
        # trace_count answers what is left, as Triton's does; the global count was never set.
        assert client.get_trace_settings("affine", as_json=True)["settings"]["trace_count"]["value"] == ["0"]
        assert client.get_trace_settings(as_json=True)["settings"]["trace_count"]["value"] == ["-1"]
        _infer(server, "a-3")  # reading the settings did not restart the count
        assert {rid for f in sorted(tmp_path.glob("t.json.*")) for rid in _traces(f)} == traced
        # A cleared model setting falls back to the global value.
        back = client.update_trace_settings("other", {"trace_level": None}, as_json=True)["settings"]
        assert back["trace_level"]["value"] == ["TIMESTAMPS"]
    finally:
        for model in ("affine", "other"):
            client.update_trace_settings(model, {k: None for k in ("trace_level", "trace_count")})
        client.update_trace_settings(
            settings={"trace_level": ["OFF"], "trace_file": None, "trace_rate": None, "log_frequency": None}
        )
    client.close()


@pytest.mark.parametrize(
    "settings, needle",
    [
        ({"trace_rate": "0"}, "trace_rate"),
        ({"trace_rate": "often"}, "trace_rate"),
        ({"trace_count": "-2"}, "trace_count"),
        ({"trace_level": ["TENSORS"]}, "TENSORS"),
        ({"trace_level": ["TIMESTAMPS"]}, "trace_file"),  # triton mode with nowhere to write
        ({"trace_mode": "opentelemetry"}, "trace_mode"),
        ({"trace_sampling": "1"}, "trace_sampling"),
    ],
)
def test_bad_trace_settings_are_refused(server: ServerProcess, settings: dict, needle: str) -> None:
    http = th.InferenceServerClient(server.http_url)
    before = http.get_trace_settings()
    with pytest.raises(InferenceServerException) as err:
        http.update_trace_settings(settings=settings)
    assert err.value.status() == "400" and needle in err.value.message()
    assert http.get_trace_settings() == before
    grpc_client = tc.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as err:
        grpc_client.update_trace_settings(settings=settings)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_unknown_model_is_not_found(server: ServerProcess) -> None:
    with pytest.raises(InferenceServerException) as err:
        th.InferenceServerClient(server.http_url).get_trace_settings("no_such_model")
    assert err.value.status() == "404"
    with pytest.raises(InferenceServerException) as err:
        tc.InferenceServerClient(server.grpc_url).get_trace_settings("no_such_model")
    assert err.value.status() == "StatusCode.NOT_FOUND"


def test_trace_config_flags_and_shutdown_flush(server_factory, repo: Path, tmp_path: Path) -> None:
    # log_frequency 0 (the default): every trace goes to trace_file when the server stops, as in Triton.
    trace_file = tmp_path / "trace.json"
    srv = server_factory(
        repo,
        "--trace-config",
        f"triton,file={trace_file}",
        "--trace-config",
        "level=TIMESTAMPS",
        "--trace-config",
        "rate=2",
    )
    for i in range(4):
        _infer(srv, f"r-{i}")
    assert not trace_file.exists()
    assert srv.terminate() == 0
    assert set(_traces(trace_file)) == {"r-1", "r-3"}  # one in every 2


# -- OpenTelemetry ---------------------------------------------------------------------------------------------
class _OtlpReceiver:
    """An OTLP/HTTP traces endpoint: decodes each export (protobuf) and keeps its spans."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.spans: list = []
        self.changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                export = ExportTraceServiceRequest.FromString(body)
                with receiver.changed:
                    for rs in export.resource_spans:
                        for ss in rs.scope_spans:
                            receiver.spans.extend(ss.spans)
                    receiver.changed.notify_all()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1/traces"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def wait_for(self, names: set[str], timeout: float = 60.0) -> list:
        with self.changed:
            ok = self.changed.wait_for(lambda: names <= {s.name for s in self.spans}, timeout)
        assert ok, f"spans received: {[s.name for s in self.spans]}"
        return list(self.spans)

    def close(self) -> None:
        self.httpd.shutdown()


def test_opentelemetry_spans_reach_an_otlp_endpoint(server_factory, repo: Path) -> None:
    receiver = _OtlpReceiver()
    try:
        srv = server_factory(
            repo,
            "--trace-config",
            "mode=opentelemetry",
            "--trace-config",
            "level=TIMESTAMPS",
            "--trace-config",
            "rate=1",
            "--trace-config",
            f"opentelemetry,url={receiver.url}",
            "--trace-config",
            "opentelemetry,bsp_schedule_delay=50",
        )
        assert th.InferenceServerClient(srv.http_url).get_trace_settings()["trace_mode"] == "opentelemetry"
        _infer(srv, "otel-1")
        spans = {s.name: s for s in receiver.wait_for({"request", "queue", "compute", "response"})}
        root = spans["request"]
        attrs = {a.key: a.value.string_value or a.value.int_value for a in root.attributes}
        assert attrs["triton.model_name"] == "affine" and attrs["triton.request_id"] == "otel-1"
        for name in ("queue", "compute", "response"):
            assert spans[name].trace_id == root.trace_id and spans[name].parent_span_id == root.span_id
        q, c, r = spans["queue"], spans["compute"], spans["response"]
        assert root.start_time_unix_nano <= q.start_time_unix_nano <= q.end_time_unix_nano <= c.start_time_unix_nano
        assert c.start_time_unix_nano <= c.end_time_unix_nano <= r.start_time_unix_nano <= r.end_time_unix_nano
        assert r.end_time_unix_nano == root.end_time_unix_nano
        assert [e.name for e in c.events] == ["COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START"]
        # Wall-clock times: within a minute of now.
        assert abs(root.start_time_unix_nano - time.time_ns()) < 60e9
    finally:
        receiver.close()


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--trace-config", "rate=0"], "trace_rate"),
        (["--trace-config", "level=TIMESTAMPS"], "needs file=PATH"),
        (["--trace-config", "jaeger,url=x"], "unknown mode"),
        (["--workers", "2", "--trace-config", "opentelemetry,bsp_schedule_delay=soon"], "bsp_schedule_delay"),
        (["--metrics-config", "summary_quantiles=0.5"], "summary_quantiles"),
        (["--metrics-config", "histogram_latencies=true"], "histogram_latencies"),
    ],
)
def test_bad_config_flags_say_one_line(repo: Path, flags: list[str], needle: str) -> None:
    import subprocess
    import sys

    from conftest import ROOT

    res = subprocess.run(
        [sys.executable, "-m", "server", "--model-repository", str(repo), *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m server: error:") and needle in lines[0], res.stderr
