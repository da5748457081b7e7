"""TLS, mutual TLS and access keys per API group, end to end: the real server process, unmodified
tritonclient and the project's own client and CLI, certificates from a CA made in the test."""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from conftest import AFFINE_CONFIG, ROOT, ServerProcess, affine_model, write_model
from pki import Pki, make_pki

pytestmark = pytest.mark.timeout(180)

INFER_KEY = "s3cret-infer"
ADMIN_KEY = "s3cret-admin"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    write_model(repo, "affine", affine_model(), AFFINE_CONFIG)
    return repo


def _affine_inputs(module=tc) -> tuple[list, np.ndarray]:
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.ones((2, 2), np.int64)
    ia = module.InferInput("a", [2, 4], "FP32")
    ia.set_data_from_numpy(a)
    ib = module.InferInput("b", [2, 2], "INT64")
    ib.set_data_from_numpy(b)
    return [ia, ib], 2 * a + 1


def _status(exc: InferenceServerException) -> str:
    return str(exc.status())


# -- TLS ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_server(repo: Path, pki: Pki, server_factory) -> ServerProcess:
    return server_factory(
        repo,
        "--grpc-use-ssl",
        "true",
        "--grpc-server-cert",
        str(pki.server_cert),
        "--grpc-server-key",
        str(pki.server_key),
        "--http-use-ssl",
        "--http-server-cert",
        str(pki.server_cert),
        "--http-server-key",
        str(pki.server_key),
    )


def test_tritonclient_over_tls(tls_server: ServerProcess, pki: Pki) -> None:
    client = tc.InferenceServerClient(tls_server.grpc_url, ssl=True, root_certificates=str(pki.ca_cert))
    assert client.is_server_ready()
    inputs, expected = _affine_inputs()
    np.testing.assert_allclose(client.infer("affine", inputs).as_numpy("y"), expected)


def test_tritonclient_http_over_tls(tls_server: ServerProcess, pki: Pki) -> None:
    client = th.InferenceServerClient(tls_server.http_url, ssl=True, ssl_options={"ca_certs": str(pki.ca_cert)})
    assert client.is_server_ready()
    inputs, expected = _affine_inputs(th)
    np.testing.assert_allclose(client.infer("affine", inputs).as_numpy("y"), expected)
    with pytest.raises(Exception):  # noqa: B017 - plaintext HTTP to the HTTPS port: reset, timeout or a protocol error
        th.InferenceServerClient(tls_server.http_url, network_timeout=5).is_server_live()
    assert client.is_server_live()


def test_renewed_certificates_are_served_without_a_restart(repo: Path, tmp_path: Path, server_factory) -> None:
    import ssl

    first, second = make_pki(tmp_path / "first"), make_pki(tmp_path / "second")
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "server.pem", live / "server.key"
    shutil.copy(first.server_cert, cert)
    shutil.copy(first.server_key, key)
    srv = server_factory(
        repo,
        "--grpc-use-ssl",
        "--grpc-server-cert",
        str(cert),
        "--grpc-server-key",
        str(key),
        "--http-use-ssl",
        "--http-server-cert",
        str(cert),
        "--http-server-key",
        str(key),
    )

    def grpc_trusted_by(ca: Path) -> bool:
        # a channel of its own (no shared subchannel): every call here is a new connection, a new handshake
        client = tc.InferenceServerClient(
            srv.grpc_url, ssl=True, root_certificates=str(ca), channel_args=[("grpc.use_local_subchannel_pool", 1)]
        )
        try:
            return client.is_server_live(client_timeout=10)
        except InferenceServerException:
            return False
        finally:
            client.close()

    def http_trusted_by(ca: Path) -> bool:
        conn = http.client.HTTPSConnection(
            "127.0.0.1", srv.http_port, timeout=10, context=ssl.create_default_context(cafile=str(ca))
        )
        try:
            conn.request("GET", "/v2/health/live")
            return conn.getresponse().status == 200
        except ssl.SSLError:
            return False
        finally:
            conn.close()

    assert grpc_trusted_by(first.ca_cert) and http_trusted_by(first.ca_cert)
    assert not grpc_trusted_by(second.ca_cert) and not http_trusted_by(second.ca_cert)
    # renewed as a Secret volume is: new files replace the old ones
    for src, dst in ((second.server_cert, cert), (second.server_key, key)):
        tmp = dst.with_suffix(".new")
        shutil.copy(src, tmp)
        os.replace(tmp, dst)
    assert grpc_trusted_by(second.ca_cert) and http_trusted_by(second.ca_cert)
    assert not grpc_trusted_by(first.ca_cert) and not http_trusted_by(first.ca_cert)
    # a broken renewal (a key that does not match) keeps the last good certificate, and says so
    shutil.copy(first.server_key, key)
    assert grpc_trusted_by(second.ca_cert) and http_trusted_by(second.ca_cert)
    assert "cannot be used; serving the previous ones" in srv.log()


def test_plaintext_client_cannot_talk_to_a_tls_server(tls_server: ServerProcess) -> None:
    client = tc.InferenceServerClient(tls_server.grpc_url)
    with pytest.raises(InferenceServerException) as info:
        client.is_server_live(client_timeout=5)
    assert "UNAVAILABLE" in _status(info.value) or "DEADLINE" in _status(info.value)


def test_client_that_does_not_trust_the_ca_is_refused(tls_server: ServerProcess, pki: Pki) -> None:
    # the stranger's CA did not sign the server certificate: the client must not accept it
    client = tc.InferenceServerClient(tls_server.grpc_url, ssl=True, root_certificates=str(pki.stranger_cert))
    with pytest.raises(InferenceServerException):
        client.is_server_live(client_timeout=5)


def test_project_client_and_cli_over_tls(tls_server: ServerProcess, pki: Pki) -> None:
    from client import ClientTLS, InferenceClient

    with InferenceClient(tls_server.grpc_url, tls=ClientTLS(root_certificates=pki.ca_cert)) as c:
        out = c.infer("affine", {"a": np.ones((1, 4), np.float32), "b": np.zeros((1, 2), np.int64)})
    np.testing.assert_allclose(out["y"], np.full((1, 4), 3.0))
    res = subprocess.run(
        [sys.executable, "-m", "client", "--url", tls_server.grpc_url, "--root-cert", str(pki.ca_cert), "health"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"live": True, "ready": True, "health": "SERVING"}


# -- mutual TLS ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mtls_server(repo: Path, pki: Pki, server_factory) -> ServerProcess:
    return server_factory(
        repo,
        "--grpc-use-ssl-mutual",
        "--grpc-server-cert",
        str(pki.server_cert),
        "--grpc-server-key",
        str(pki.server_key),
        "--grpc-root-cert",
        str(pki.ca_cert),
        "--http-use-ssl-mutual",
        "--http-server-cert",
        str(pki.server_cert),
        "--http-server-key",
        str(pki.server_key),
        "--http-root-cert",
        str(pki.ca_cert),
    )


def test_mutual_tls_admits_a_client_with_a_certificate(mtls_server: ServerProcess, pki: Pki) -> None:
    client = tc.InferenceServerClient(
        mtls_server.grpc_url,
        ssl=True,
        root_certificates=str(pki.ca_cert),
        private_key=str(pki.client_key),
        certificate_chain=str(pki.client_cert),
    )
    inputs, expected = _affine_inputs()
    np.testing.assert_allclose(client.infer("affine", inputs).as_numpy("y"), expected)


@pytest.mark.parametrize("who", ["no certificate", "certificate from another CA"])
def test_mutual_tls_refuses_other_clients(mtls_server: ServerProcess, pki: Pki, who: str) -> None:
    cert = (
        {}
        if who == "no certificate"
        else {"private_key": str(pki.stranger_key), "certificate_chain": str(pki.stranger_cert)}
    )
    client = tc.InferenceServerClient(mtls_server.grpc_url, ssl=True, root_certificates=str(pki.ca_cert), **cert)
    with pytest.raises(InferenceServerException) as info:
        client.is_server_live(client_timeout=10)
    assert "UNAVAILABLE" in _status(info.value)
    # and the server keeps serving clients that have one
    from client import ClientTLS, InferenceClient

    tls = ClientTLS(pki.ca_cert, private_key=pki.client_key, certificate_chain=pki.client_cert)
    with InferenceClient(mtls_server.grpc_url, tls=tls) as c:
        assert c.is_server_live(timeout=10)


def test_mutual_tls_over_http(mtls_server: ServerProcess, pki: Pki) -> None:
    ok = th.InferenceServerClient(
        mtls_server.http_url,
        ssl=True,
        ssl_options={"ca_certs": str(pki.ca_cert), "certfile": str(pki.client_cert), "keyfile": str(pki.client_key)},
    )
    inputs, expected = _affine_inputs(th)
    np.testing.assert_allclose(ok.infer("affine", inputs).as_numpy("y"), expected)
    for extra in ({}, {"certfile": str(pki.stranger_cert), "keyfile": str(pki.stranger_key)}):
        other = th.InferenceServerClient(
            mtls_server.http_url, ssl=True, network_timeout=10, ssl_options={"ca_certs": str(pki.ca_cert), **extra}
        )
        with pytest.raises(Exception) as info:
            other.is_server_live()
        assert not isinstance(info.value, AssertionError)
    assert ok.is_server_live()


def test_container_healthcheck_speaks_mutual_tls(mtls_server: ServerProcess, pki: Pki, tmp_path: Path) -> None:
    # installed as the image does (/usr/local/bin/grpc-health): run beside itself as grpc_health.py, the
    # script would shadow the grpc_health package it imports
    script = tmp_path / "grpc-health"
    shutil.copy(ROOT / "deploy" / "scripts" / "grpc_health.py", script)
    base = [sys.executable, str(script), "--port", str(mtls_server.grpc_port), "--root-cert", str(pki.ca_cert)]
    ok = subprocess.run(
        base + ["--client-cert", str(pki.client_cert), "--client-key", str(pki.client_key)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0 and ok.stdout.strip() == "SERVING", ok.stderr
    refused = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "unhealthy: UNAVAILABLE" in refused.stderr


# -- access keys per API group -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def restricted(
    repo: Path, tmp_path_factory: pytest.TempPathFactory, server_factory, monkeypatch_module
) -> ServerProcess:
    key_file = tmp_path_factory.mktemp("keys") / "admin.key"
    key_file.write_text(ADMIN_KEY + "\n")  # a trailing newline, as editors write it
    monkeypatch_module.setenv("TEST_INFER_KEY", INFER_KEY)  # the server subprocess inherits it
    return server_factory(
        repo,
        "--grpc-restricted-protocol",
        f"model-repository,model-config:Admin-Key=@{key_file}",
        "--grpc-restricted-protocol",
        "inference,statistics:infer-key=env:TEST_INFER_KEY",
        "--http-restricted-api",
        f"model-repository,model-config:Admin-Key=@{key_file}",
        "--http-restricted-api",
        "inference,statistics:infer-key=env:TEST_INFER_KEY",
    )


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _denied(srv: ServerProcess, group: str, reason: str, protocol: str = "grpc") -> float:
    labels = (("group", group), ("protocol", protocol), ("reason", reason))
    return srv.scrape().get(("cnnserve_access_denied_total", labels), 0.0)


def test_right_key_passes(restricted: ServerProcess) -> None:
    client = tc.InferenceServerClient(restricted.grpc_url)
    inputs, expected = _affine_inputs()
    out = client.infer("affine", inputs, headers={"infer-key": INFER_KEY})
    np.testing.assert_allclose(out.as_numpy("y"), expected)
    assert client.get_model_config("affine", headers={"admin-key": ADMIN_KEY}).config.name == "affine"
    assert client.get_inference_statistics("affine", headers={"infer-key": INFER_KEY}).model_stats
    # Triton's gRPC server reads the key from `triton-grpc-protocol-<header>`: clients written for it work
    out = client.infer("affine", inputs, headers={"triton-grpc-protocol-infer-key": INFER_KEY})
    np.testing.assert_allclose(out.as_numpy("y"), expected)


def test_missing_key_is_unauthenticated_and_counted(restricted: ServerProcess) -> None:
    before = _denied(restricted, "inference", "missing")
    client = tc.InferenceServerClient(restricted.grpc_url)
    inputs, _ = _affine_inputs()
    with pytest.raises(InferenceServerException) as info:
        client.infer("affine", inputs)
    assert "UNAUTHENTICATED" in _status(info.value)
    assert "expecting header 'infer-key'" in info.value.message()
    assert INFER_KEY not in info.value.message()
    assert _denied(restricted, "inference", "missing") == before + 1


def test_wrong_key_is_permission_denied_and_counted(restricted: ServerProcess) -> None:
    before = _denied(restricted, "model-repository", "wrong")
    client = tc.InferenceServerClient(restricted.grpc_url)
    with pytest.raises(InferenceServerException) as info:
        client.unload_model("affine", headers={"admin-key": INFER_KEY})  # another group's key
    assert "PERMISSION_DENIED" in _status(info.value)
    assert _denied(restricted, "model-repository", "wrong") == before + 1
    assert client.is_model_ready("affine")  # nothing was unloaded


def test_mode_none_refuses_load_and_unload(restricted: ServerProcess) -> None:
    client = tc.InferenceServerClient(restricted.grpc_url)
    for call in (client.unload_model, client.load_model):
        with pytest.raises(InferenceServerException) as info:
            call("affine", headers={"admin-key": ADMIN_KEY})  # past the key check: the server refuses
        assert "UNAVAILABLE" in _status(info.value)
        assert "explicit model load / unload is not allowed" in info.value.message()
    assert client.is_model_ready("affine")


def test_unrestricted_groups_stay_open(restricted: ServerProcess) -> None:
    client = tc.InferenceServerClient(restricted.grpc_url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("affine")
    assert client.get_model_metadata("affine").name == "affine"
    from client import InferenceClient

    with InferenceClient(restricted.grpc_url) as c:
        assert c.health() == "SERVING"  # grpc.health.v1 is the health group


def test_stream_and_vision_api_count_as_inference(restricted: ServerProcess) -> None:
    from client import InferenceClient, InferenceServerError, VisionClient
    from client.inference import build_infer_request

    x = build_infer_request("affine", {"a": np.ones((1, 4), np.float32), "b": np.zeros((1, 2), np.int64)})
    with InferenceClient(restricted.grpc_url) as c:
        with pytest.raises(InferenceServerError) as info:
            list(c.stream_infer([x]))
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    with InferenceClient(restricted.grpc_url, headers={"infer-key": INFER_KEY}) as c:
        [(_, out)] = list(c.stream_infer([x]))
        np.testing.assert_allclose(out["y"], np.full((1, 4), 3.0))
    with VisionClient(restricted.grpc_url, headers={"infer-key": "nope"}) as v:
        with pytest.raises(InferenceServerError) as info:
            v.classify("affine", b"not a picture")
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    with VisionClient(restricted.grpc_url, headers={"infer-key": INFER_KEY}) as v:
        with pytest.raises(InferenceServerError) as info:
            v.classify("affine", b"not a picture")
        # past the key: the vision API itself answers (affine is no image model)
        assert info.value.code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def test_http_restricted_api(restricted: ServerProcess) -> None:
    client = th.InferenceServerClient(restricted.http_url)
    inputs, expected = _affine_inputs(th)
    np.testing.assert_allclose(client.infer("affine", inputs, headers={"infer-key": INFER_KEY}).as_numpy("y"), expected)
    assert client.get_model_config("affine", headers={"ADMIN-KEY": ADMIN_KEY})["name"] == "affine"
    before = (_denied(restricted, "inference", "missing", "http"), _denied(restricted, "model-config", "wrong", "http"))
    with pytest.raises(InferenceServerException) as info:
        client.infer("affine", inputs)
    assert info.value.status() == "401" and "expecting header 'infer-key'" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.get_model_config("affine", headers={"admin-key": "guess"})
    assert info.value.status() == "403"
    # Triton's gRPC header name is a gRPC-only alias
    with pytest.raises(InferenceServerException) as info:
        client.infer("affine", inputs, headers={"triton-grpc-protocol-infer-key": INFER_KEY})
    assert info.value.status() == "401"
    assert (
        _denied(restricted, "inference", "missing", "http"),
        _denied(restricted, "model-config", "wrong", "http"),
    ) == (before[0] + 2, before[1] + 1)
    # open groups stay open, and the vision API is inference
    assert client.is_server_ready() and client.is_model_ready("affine") and client.get_model_metadata("affine")
    conn = http.client.HTTPConnection("127.0.0.1", restricted.http_port, timeout=30)
    conn.request("POST", "/v2/vision/models/affine/classify", body=b"x", headers={"Content-Type": "image/png"})
    assert conn.getresponse().status == 401
    conn.close()
    # mode none: the right key passes, the server refuses the unload as Triton does
    with pytest.raises(InferenceServerException) as info:
        client.unload_model("affine", headers={"admin-key": ADMIN_KEY})
    assert info.value.status() == "503" and "explicit model load / unload is not allowed" in info.value.message()
    assert client.is_model_ready("affine")


def test_cli_sends_a_key_from_the_environment(restricted: ServerProcess) -> None:
    env = {**os.environ, "CLI_ADMIN_KEY": ADMIN_KEY}
    cmd = [sys.executable, "-m", "client", "--url", restricted.grpc_url, "models"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "UNAUTHENTICATED" in res.stderr
    res = subprocess.run(
        cmd[:-1] + ["-H", "admin-key=env:CLI_ADMIN_KEY", "models"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert [m["name"] for m in json.loads(res.stdout)["models"]] == ["affine"]


# -- configuration errors, in-process ------------------------------------------------------------------
def test_restriction_flag_errors_name_the_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.access import AccessConfigError, AccessPolicy, Restriction

    flag = "--grpc-restricted-protocol"
    for spec, expected in [
        ("inference", "expected <group>"),
        ("inferences:k=v", "unknown API group"),
        ("inference:k=", "empty"),
        ("inference:k=env:NOT_SET_ANYWHERE", "NOT_SET_ANYWHERE"),
        (f"inference:k=@{tmp_path / 'absent'}", "cannot read the key file"),
        ("inference:grpc-timeout=v", "not usable"),
    ]:
        with pytest.raises(AccessConfigError, match=expected):
            Restriction.parse(spec, flag)
    with pytest.raises(AccessConfigError, match="restricted twice"):
        AccessPolicy.from_flags(["inference:a=1", "health,inference:b=2"], "grpc", flag)
    monkeypatch.setenv("K", "v")
    r = Restriction.parse("health , metadata:X-Key=env:K", flag)
    assert r.groups == {"health", "metadata"} and r.header == "x-key" and r.value == "v"
    assert "v" not in repr(r).replace("value", "")  # the key never shows in a repr


def test_policy_checks_group_and_header_only() -> None:
    from server.access import AccessPolicy

    policy = AccessPolicy.from_flags(["inference:k=abc"], "http", "--http-restricted-api")
    assert policy.check("health", lambda name: []) is None
    assert policy.check("inference", lambda name: ["abc"] if name == "k" else []) is None
    missing = policy.check("inference", lambda name: [])
    assert missing is not None and missing.error.http_status == 401
    wrong = policy.check("inference", lambda name: ["abd"] if name == "k" else [])
    assert wrong is not None and wrong.error.http_status == 403
    # Triton's gRPC prefix is a gRPC-only alias
    assert policy.check("inference", lambda n: ["abc"] if n == "triton-grpc-protocol-k" else []) is not None


def test_every_served_grpc_method_has_a_group() -> None:
    from grpc_health.v1 import health_pb2

    from protos import grpc_service_pb2, vision_pb2
    from server.access import grpc_group

    for desc in (
        grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        vision_pb2.DESCRIPTOR.services_by_name["VisionService"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
    ):
        for m in desc.methods:
            assert grpc_group(f"/{desc.full_name}/{m.name}") is not None, m.full_name
    assert grpc_group("/inference.GRPCInferenceService/RepositoryModelUnload") == "model-repository"
    assert grpc_group("/cnnserve.vision.VisionService/Detect") == "inference"


def test_tls_flag_errors_name_the_problem(pki: Pki, tmp_path: Path) -> None:
    from server.tls import TlsConfigError, TlsFiles

    with pytest.raises(TlsConfigError, match="needs --grpc-server-cert"):
        TlsFiles.from_flags("grpc", True, False, None, pki.server_key, None)
    with pytest.raises(TlsConfigError, match="needs --grpc-root-cert"):
        TlsFiles.from_flags("grpc", False, True, pki.server_cert, pki.server_key, None)
    with pytest.raises(TlsConfigError, match="without --grpc-use-ssl"):
        TlsFiles.from_flags("grpc", False, False, pki.server_cert, pki.server_key, None)
    with pytest.raises(TlsConfigError, match="does not match"):  # the client's key with the server's cert
        TlsFiles.from_flags("grpc", True, False, pki.server_cert, pki.client_key, None)
    with pytest.raises(TlsConfigError, match="cannot read"):
        TlsFiles.from_flags("grpc", True, False, tmp_path / "nope.pem", pki.server_key, None)
    assert TlsFiles.from_flags("grpc", False, False, None, None, None) is None


def test_server_refuses_to_start_with_a_bad_key_reference(repo: Path, tmp_path: Path) -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "server",
            "--model-repository",
            str(repo),
            "--grpc-port",
            "0",
            "--allow-metrics",
            "false",
            "--grpc-restricted-protocol",
            "inference:k=env:UNSET_FOR_TEST",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "UNSET_FOR_TEST"},
    )
    assert res.returncode != 0
    assert "UNSET_FOR_TEST" in res.stderr and "Traceback" not in res.stderr


def test_plaintext_beyond_loopback_is_warned_about(caplog: pytest.LogCaptureFixture, pki: Pki) -> None:
    from server.tls import TlsFiles, is_loopback, warn_if_exposed

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("[::1]") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("myhost")
    with caplog.at_level(logging.WARNING, logger="cnnserve.tls"):
        assert warn_if_exposed("grpc", "0.0.0.0", None)
        assert not warn_if_exposed("grpc", "127.0.0.1", None)
        assert not warn_if_exposed("grpc", "0.0.0.0", TlsFiles(pki.server_cert, pki.server_key))
    assert len(caplog.records) == 1 and "--grpc-use-ssl" in caplog.records[0].getMessage()
