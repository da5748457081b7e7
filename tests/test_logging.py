"""Triton's logging extension on a live server: GET/POST /v2/logging and the gRPC LogSettings RPC through
tritonclient, the changes taking effect in the server's log, refusals, and the --log-* flags."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from conftest import AFFINE_CONFIG, ServerProcess, affine_model, write_model

pytestmark = pytest.mark.timeout(240)

TRITON_DEFAULTS = {"log_file": "", "log_info": True, "log_warnings": True, "log_errors": True, "log_verbose_level": 0}


@pytest.fixture(scope="module")
def server(server_factory, tmp_path_factory) -> ServerProcess:
    repo = tmp_path_factory.mktemp("logging_repo")
    write_model(repo, "affine", affine_model(), AFFINE_CONFIG)
    return server_factory(repo)


def _infer(server: ServerProcess, request_id: str) -> None:
    client = th.InferenceServerClient(server.http_url)
    ins = [th.InferInput("a", [1, 4], "FP32"), th.InferInput("b", [1, 2], "INT64")]
    ins[0].set_data_from_numpy(np.zeros((1, 4), np.float32))
    ins[1].set_data_from_numpy(np.zeros((1, 2), np.int64))
    client.infer("affine", ins, request_id=request_id)
    client.close()


def _records(server: ServerProcess) -> list[dict]:
    return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]


def _wait_for(server: ServerProcess, predicate, what: str, timeout: float = 30.0) -> list[dict]:
    t_end = time.monotonic() + timeout
    while not predicate(records := _records(server)):
        assert time.monotonic() < t_end, f"never logged: {what}\n{server.log()[-3000:]}"
        time.sleep(0.02)
    return records


def _changes(records: list[dict]) -> int:
    return sum(r["msg"] == "log settings changed" for r in records)


def _post(server: ServerProcess, doc: object) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://{server.http_url}/v2/logging", data=json.dumps(doc).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_verbose_level_changed_at_run_time_takes_effect(server: ServerProcess) -> None:
    http = th.InferenceServerClient(server.http_url)
    assert http.get_log_settings() == {**TRITON_DEFAULTS, "log_format": "json"}
    before = _changes(_records(server))
    _infer(server, "quiet-1")

    assert http.update_log_settings({"log_verbose_level": 1})["log_verbose_level"] == 1
    _infer(server, "loud-1")
    records = _wait_for(server, lambda rs: any(r.get("id") == "loud-1" for r in rs), "a verbose line for loud-1")
    line = next(r for r in records if r.get("id") == "loud-1")
    assert line["level"] == "verbose1" and line["model"] == "affine"

    assert http.update_log_settings({"log_verbose_level": 0})["log_verbose_level"] == 0
    _infer(server, "quiet-2")
    # A marker logged after quiet-2 was answered: the server logs in order, so a line for quiet-2
    # would be above it.
    http.update_log_settings({"log_info": True})
    records = _wait_for(server, lambda rs: _changes(rs) >= before + 3, "the third settings change")
    ids = {r.get("id") for r in records}
    assert "loud-1" in ids and "quiet-1" not in ids and "quiet-2" not in ids
    http.close()


def test_grpc_log_settings_and_format(server: ServerProcess) -> None:
    client = tc.InferenceServerClient(server.grpc_url)
    got = client.get_log_settings(as_json=True)["settings"]
    assert set(got) == {*TRITON_DEFAULTS, "log_format"}
    try:
        answer = client.update_log_settings({"log_format": "ISO8601", "log_warnings": False}, as_json=True)
        assert answer["settings"]["log_format"] == {"string_param": "ISO8601"}
        assert answer["settings"]["log_warnings"] == {"bool_param": False}
        # Triton's ISO8601 line for the change itself.
        t_end = time.monotonic() + 30
        pattern = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ I \d+ cnnserve\.logs\] log settings changed", re.M)
        while not pattern.search(server.log()):
            assert time.monotonic() < t_end, server.log()[-2000:]
            time.sleep(0.02)
    finally:
        client.update_log_settings({"log_format": "json", "log_warnings": True})
    client.close()


@pytest.mark.parametrize(
    "doc, needle",
    [
        ({"log_verbose_level": -1}, "log_verbose_level"),
        ({"log_verbose_level": True}, "log_verbose_level"),
        ({"log_info": "yes"}, "log_info"),
        ({"log_format": "xml"}, "log_format"),
        ({"log_verbosity": 1}, "log_verbosity"),
    ],
)
def test_bad_settings_are_refused_and_change_nothing(server: ServerProcess, doc: dict, needle: str) -> None:
    before = th.InferenceServerClient(server.http_url).get_log_settings()
    status, body = _post(server, {"log_errors": False, **doc})  # the valid part is not applied either
    assert status == 400 and needle in body["error"]
    assert th.InferenceServerClient(server.http_url).get_log_settings() == before


def test_grpc_refusal_is_invalid_argument(server: ServerProcess) -> None:
    client = tc.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as err:
        client.update_log_settings({"log_format": "xml"})
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "log_format" in err.value.message()
    client.close()


def test_log_flags_and_access_key(server_factory, tmp_path) -> None:
    write_model(tmp_path / "repo", "affine", affine_model(), AFFINE_CONFIG)
    srv = server_factory(
        tmp_path / "repo",
        "--log-verbose",
        "1",
        "--log-format",
        "default",
        "--log-warning",
        "false",
        "--http-restricted-api",
        "logging:admin-key=s3cret",
        "--grpc-restricted-protocol",
        "logging:admin-key=s3cret",
    )
    http = th.InferenceServerClient(srv.http_url)
    with pytest.raises(InferenceServerException) as err:  # the logging group behind a key, as in Triton
        http.get_log_settings()
    assert err.value.status() == "401"
    with pytest.raises(InferenceServerException) as err:
        tc.InferenceServerClient(srv.grpc_url).update_log_settings({"log_verbose_level": 0})
    assert err.value.status() == "StatusCode.UNAUTHENTICATED"
    assert http.get_log_settings(headers={"admin-key": "s3cret"}) == {
        **TRITON_DEFAULTS,
        "log_verbose_level": 1,
        "log_warnings": False,
        "log_format": "default",
    }
    # Triton's default line: level letter, MMDD, time with microseconds, pid, source.
    assert re.search(r"^I\d{4} \d\d:\d\d:\d\d\.\d{6} \d+ cnnserve\.app\] server ready", srv.log(), re.M)
    _infer(srv, "from-the-start")
    t_end = time.monotonic() + 30
    while not re.search(r"^V\d{4} .*inference request .*id=from-the-start", srv.log(), re.M):
        assert time.monotonic() < t_end, srv.log()[-2000:]
        time.sleep(0.02)
