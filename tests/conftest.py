"""Shared test fixtures: small real ONNX models, test model repositories, and the real server process.

The repository root goes on sys.path so tests import the project's packages without an install.
`start_server(repo)` runs `python -m server` as a subprocess on 127.0.0.1 with ephemeral ports (the
server writes the ports it bound to --ready-file) and waits until it reports ready; it is how users run
it, and it keeps tritonclient's generated protos out of the server's process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _import_tritonclient_privately() -> None:
    """Load tritonclient's generated protos into their own descriptor pool.

    tritonclient ships generated `inference.*` messages; the project's protos define the same symbols,
    and both in protobuf's default pool fail with "duplicate symbol" (docs: known traps). The whole
    suite runs in one pytest process, where the end-to-end tests use tritonclient (the server itself
    runs as a subprocess) while other tests import the project's protos. Generated code asks
    `descriptor_pool.Default()` for its pool at import time, so importing tritonclient once, here,
    with that pointing at a private pool keeps the two sets apart; later `import tritonclient...`
    statements get these cached modules. Bytes on the wire are the same either way.
    """
    if "tritonclient.grpc" in sys.modules:
        return
    from google.protobuf import descriptor_pool

    private = descriptor_pool.DescriptorPool()
    default = descriptor_pool.Default
    descriptor_pool.Default = lambda: private
    try:
        import tritonclient.grpc
        import tritonclient.grpc.aio  # noqa: F401
    except ImportError:  # tritonclient is a dev dependency; tests that need it fail on their own import
        pass
    finally:
        descriptor_pool.Default = default


_import_tritonclient_privately()


# -- small ONNX models built with onnx.helper (milliseconds to build, real ONNX Runtime to run) ----------
def affine_model() -> bytes:
    """a FP32 [N,4] -> y = 2a + 1 (FP32); b INT64 [N,2] -> z = b + 3 (INT64): two inputs, two outputs."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Mul", ["a", "two"], ["a2"]),
        helper.make_node("Add", ["a2", "one"], ["y"]),
        helper.make_node("Add", ["b", "three"], ["z"]),
    ]
    inits = [
        helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("three", TensorProto.INT64, [], [3]),
    ]
    g = helper.make_graph(
        nodes,
        "affine",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("b", TensorProto.INT64, ["N", 2]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("z", TensorProto.INT64, ["N", 2]),
        ],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


AFFINE_CONFIG = """name: "affine"
max_batch_size: 8
input [{ name: "a" data_type: TYPE_FP32 dims: [4] }, { name: "b" data_type: TYPE_INT64 dims: [2] }]
output [{ name: "y" data_type: TYPE_FP32 dims: [4] }, { name: "z" data_type: TYPE_INT64 dims: [2] }]
dynamic_batching { }
"""


def cast_model() -> bytes:
    """x UINT8 [N,2,3] -> y FP16 = x / 2 (cast then scale); exercises UINT8 in and FP16 out."""
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT16), helper.make_node("Div", ["xf", "d"], ["y"])],
        "cast",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", 2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 2, 3])],
        [helper.make_tensor("d", TensorProto.FLOAT16, [], np.array([2.0], np.float16).view(np.uint16).tolist())],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


def strings_model() -> bytes:
    """BYTES in, BYTES out (Identity on strings), no batching: exercises the 4-byte length prefix path."""
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"])],
        "strings",
        [helper.make_tensor_value_info("s", TensorProto.STRING, [3])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, [3])],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


def pool_model() -> bytes:
    """x FP32 [N,3,224,224] -> y = global average pool [N,3,1,1]: an image-sized input that costs little."""
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["y"])],
        "pool",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 1, 1])],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


SLOW_WIDTH = 1024


def slow_model(iterations: int = 1500, width: int = SLOW_WIDTH) -> bytes:
    """x FP32 [N,width] -> y: `iterations` rounds of tanh(x W) in a Loop (one 4 MB weight).

    Its run time is what the deadline, queue and shutdown tests need: long enough (about 0.4 s for a
    batch of one on one thread, more on a loaded machine) to keep the only instance busy while other
    requests wait, with a wide margin over the tests' 20-30 ms deadlines. Matrix products, not loop
    overhead, dominate, so the time scales with the machine rather than with interpreter noise.
    """
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["h_in", "W"], ["hw"]),
            helper.make_node("Tanh", ["hw"], ["h_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["N", width]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["N", width]),
        ],
    )
    g = helper.make_graph(
        [helper.make_node("Loop", ["trips", "cond", "x"], ["y"], body=body)],
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        [
            helper.make_tensor("trips", TensorProto.INT64, [], [iterations]),
            helper.make_tensor("cond", TensorProto.BOOL, [], [True]),
            helper.make_tensor("W", TensorProto.FLOAT, [width, width], w.tobytes(), raw=True),
        ],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


def write_model(repo: Path, name: str, onnx_bytes: bytes, config: str, versions: tuple[int, ...] = (1,)) -> Path:
    d = repo / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.pbtxt").write_text(config)
    for v in versions:
        (d / str(v)).mkdir(exist_ok=True)
        (d / str(v) / "model.onnx").write_bytes(onnx_bytes)
    return d


@pytest.fixture
def affine_onnx(tmp_path: Path) -> Path:
    p = tmp_path / "affine.onnx"
    p.write_bytes(affine_model())
    return p


@pytest.fixture
def slow_onnx(tmp_path: Path) -> Path:
    p = tmp_path / "slow.onnx"
    p.write_bytes(slow_model())
    return p


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    """A classic-format metrics page as (sample name as written, sorted label items) -> value.

    prometheus_client's parser names a counter's samples `<family>_total`; Triton's counters are
    written without the suffix (server/metrics.py), and tests name them as the page does."""
    from prometheus_client.parser import text_string_to_metric_families

    from server.metrics import TRITON_COUNTERS

    return {
        (fam.name if fam.name in TRITON_COUNTERS else s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


# -- the real server as a subprocess -------------------------------------------------------------------
@dataclass
class ServerProcess:
    proc: subprocess.Popen
    grpc_port: int
    metrics_port: int
    log_path: Path
    ready: dict

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_port(self) -> int:
        return self.ready.get("http_port", 0)

    @property
    def http_url(self) -> str:
        """host:port of the REST binding, as tritonclient.http takes it."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def scrape(self) -> dict[tuple[str, tuple], float]:
        """The metrics endpoint parsed: (sample name, sorted label items) -> value."""
        import urllib.request

        return parse_metrics(urllib.request.urlopen(self.metrics_url, timeout=10).read().decode())

    async def wait_pending(self, model: str, n: int, timeout: float = 30.0) -> None:
        """Until the server holds `n` accepted, unanswered requests for `model` (its pending gauge), so
        a test orders events by what the server saw, not by sleeps that a loaded machine stretches."""
        import asyncio

        key = ("nv_inference_pending_request_count", (("model", model), ("version", "1")))
        t_end = time.monotonic() + timeout
        while (await asyncio.to_thread(self.scrape)).get(key) != n:
            if time.monotonic() > t_end:
                raise AssertionError(f"the server never held {n} pending requests for {model}")
            await asyncio.sleep(0.005)

    def rss_bytes(self) -> int:
        """The server process's resident memory now (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no VmRSS for pid {self.proc.pid}")

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start_server(
    repo: Path,
    workdir: Path,
    *extra: str,
    timeout: float = 120.0,
    python: str = sys.executable,
    source_root: Path = ROOT,
) -> ServerProcess:
    """`python -m server` from `source_root` with `python` (another interpreter and a copy of only the
    serving packages make the torch-free serving test)."""
    ready = workdir / "ready.json"
    log_path = workdir / "server.log"
    ready.unlink(missing_ok=True)
    # tests/ too: `--backend-module fault_backends` registers the test-only backends in the server.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source_root), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    cmd = [
        python,
        "-m",
        "server",
        "--model-repository",
        str(repo),
        "--grpc-address",
        "127.0.0.1",
        "--grpc-port",
        "0",
        "--http-address",
        "127.0.0.1",
        "--http-port",
        "0",
        "--metrics-address",
        "127.0.0.1",
        "--metrics-port",
        "0",
        "--ready-file",
        str(ready),
        "--intra-op-threads",
        "1",
        *extra,
    ]
    with open(log_path, "w") as logf:  # the server writes to its own copy of the descriptor
        proc = subprocess.Popen(cmd, cwd=source_root, env=env, stdout=logf, stderr=subprocess.STDOUT)
    t_end = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > t_end:
            proc.kill()
            raise RuntimeError(f"server not ready after {timeout}s:\n{log_path.read_text()}")
        time.sleep(0.05)
    info = json.loads(ready.read_text())
    return ServerProcess(proc, info["grpc_port"], info["metrics_port"], log_path, info)


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerProcess]]:
    """Start servers on repositories; every one still running is stopped at the end of the session."""
    started: list[ServerProcess] = []

    def factory(repo: Path, *extra: str) -> ServerProcess:
        srv = start_server(repo, tmp_path_factory.mktemp("server"), *extra)
        started.append(srv)
        return srv

    yield factory
    for srv in started:
        srv.terminate()


@pytest.fixture(scope="session")
def default_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model repository, built once per session by the real CLI (`python -m export
    repository`) and shared read-only by the tests that serve it (copy before changing anything);
    $CNNSERVE_MODEL_REPOSITORY when set. Skipped, with the reason, without the export half."""
    env_repo = os.environ.get("CNNSERVE_MODEL_REPOSITORY")
    if env_repo:
        return Path(env_repo)
    for mod in ("torch", "onnxscript"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"the default repository needs the export half ({mod} is not installed)")
    repo = tmp_path_factory.mktemp("default_repo")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    res = subprocess.run(
        [sys.executable, "-m", "export", "repository", "--repository", str(repo)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert res.returncode == 0, f"python -m export repository failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return repo


# -- lanes: `pytest -m fast` (scripts/test-fast.sh) is the quick signal; CI runs everything -------------
# Marked by what a test needs rather than by hand, so a new test lands in the right lane: anything that
# starts the real server is `e2e`; anything that builds the default repository, trains, exports or
# quantizes a real model is `slow`; the rest is `fast`.
E2E_FIXTURES = {"server_factory"}
# `exported`: the module-scoped fixture of the export tests (segmentation, autoencoder, detector) that runs
# torch.onnx.export, parity and TensorRT lint on the real models.
SLOW_FIXTURES = {"default_repository", "exported"}
# Modules that start `python -m server` themselves (not through server_factory).
E2E_MODULES = {
    "test_serving_without_torch",
    "test_warmup",
    "test_hardening",
    "test_transport_security",
    "test_server_repository",
}
# Modules whose tests export, quantize or train real models, or run the CLIs that do.
SLOW_MODULES = {
    "test_export",
    "test_export_entrypoints",
    "test_quantize",
    "test_uint8_input",
    "test_card",
    "test_trt_lint",
    "test_tensorrt_engine",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.stem
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & E2E_FIXTURES or module in E2E_MODULES:
            item.add_marker(pytest.mark.e2e)
        if fixtures & SLOW_FIXTURES or module in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("e2e") is None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.fast)
