"""Triton's system shared-memory extension end to end: unmodified tritonclient (grpc client and
tritonclient.utils.shared_memory) against the real server process.

Inference through regions must equal the bytes path, regions mix with raw contents in one request,
and every misuse (unknown region, window out of bounds, wrong size, a key outside /dev/shm, an object
shrunk after registering) is refused with INVALID_ARGUMENT naming what is wrong while the server keeps
serving. Whether the server still holds a region open is read from its /proc/<pid>/fd.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from conftest import ServerProcess, affine_model, pool_model, strings_model, write_model
from server.errors import InferError

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs POSIX shared memory (/dev/shm)"),
]

AFFINE_CFG = """name: "affine"
backend: "onnxruntime"
max_batch_size: 8
input [{ name: "a" data_type: TYPE_FP32 dims: [4] }, { name: "b" data_type: TYPE_INT64 dims: [2] }]
output [{ name: "y" data_type: TYPE_FP32 dims: [4] }, { name: "z" data_type: TYPE_INT64 dims: [2] }]
dynamic_batching { }
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, server_factory) -> ServerProcess:
    repo = tmp_path_factory.mktemp("shm_repo")
    write_model(repo, "affine", affine_model(), AFFINE_CFG)
    write_model(repo, "pool", pool_model(), "max_batch_size: 8\ndynamic_batching { }\n")
    write_model(repo, "strings", strings_model(), "max_batch_size: 0\n")
    return server_factory(repo)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> tc.InferenceServerClient:
    return tc.InferenceServerClient(server.grpc_url)


class Regions:
    """Creates shm objects with unique keys and registers them; everything is undone at teardown."""

    def __init__(self, client: tc.InferenceServerClient) -> None:
        self.client = client
        self.handles: list = []
        self.names: list[str] = []

    def create(self, byte_size: int) -> tuple[str, str, object]:
        tag = uuid.uuid4().hex[:12]
        name, key = f"r_{tag}", f"/cnnserve_test_{tag}"
        handle = shm.create_shared_memory_region(name, key, byte_size, create_only=True)
        self.handles.append(handle)
        return name, key, handle

    def register(self, byte_size: int, offset: int = 0, object_size: int | None = None) -> tuple[str, str, object]:
        name, key, handle = self.create(object_size or byte_size + offset)
        self.client.register_system_shared_memory(name, key, byte_size, offset=offset)
        self.names.append(name)
        return name, key, handle

    def close(self) -> None:
        for name in self.names:
            self.client.unregister_system_shared_memory(name)
        for h in self.handles:
            shm.destroy_shared_memory_region(h)


@pytest.fixture
def regions(client: tc.InferenceServerClient) -> Iterator[Regions]:
    r = Regions(client)
    yield r
    r.close()


def _affine_inputs(n: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    return rng.standard_normal((n, 4)).astype(np.float32), rng.integers(-100, 100, (n, 2), dtype=np.int64)


def _bytes_path(client: tc.InferenceServerClient, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ins = [tc.InferInput("a", list(a.shape), "FP32"), tc.InferInput("b", list(b.shape), "INT64")]
    ins[0].set_data_from_numpy(a)
    ins[1].set_data_from_numpy(b)
    res = client.infer("affine", ins)
    return res.as_numpy("y"), res.as_numpy("z")


def _refused(call, *needles: str, code: str = "StatusCode.INVALID_ARGUMENT") -> str:
    with pytest.raises(InferenceServerException) as ei:
        call()
    assert ei.value.status() == code, (ei.value.status(), ei.value.message())
    for n in needles:
        assert n in ei.value.message(), (n, ei.value.message())
    return ei.value.message()


def _held(server: ServerProcess) -> set[str]:
    """The files the server process holds open."""
    held = set()
    for fd in Path(f"/proc/{server.proc.pid}/fd").iterdir():
        try:
            held.add(os.readlink(fd))
        except FileNotFoundError:  # closed while listed
            continue
    return held


def test_extension_is_advertised(client: tc.InferenceServerClient) -> None:
    assert "system_shared_memory" in client.get_server_metadata().extensions


def test_inputs_and_outputs_in_one_region_equal_the_bytes_path(
    client: tc.InferenceServerClient, regions: Regions
) -> None:
    a, b = _affine_inputs()
    want_y, want_z = _bytes_path(client, a, b)
    # One region holds both inputs and both outputs at different offsets, as perf_analyzer lays them out.
    sizes = [a.nbytes, b.nbytes, want_y.nbytes, want_z.nbytes]
    offs = np.cumsum([0] + sizes[:-1]).tolist()
    name, _, handle = regions.register(sum(sizes))
    shm.set_shared_memory_region(handle, [a], offset=offs[0])
    shm.set_shared_memory_region(handle, [b], offset=offs[1])
    ins = [tc.InferInput("a", list(a.shape), "FP32"), tc.InferInput("b", list(b.shape), "INT64")]
    ins[0].set_shared_memory(name, a.nbytes, offset=offs[0])
    ins[1].set_shared_memory(name, b.nbytes, offset=offs[1])
    outs = [tc.InferRequestedOutput("y"), tc.InferRequestedOutput("z")]
    outs[0].set_shared_memory(name, want_y.nbytes, offset=offs[2])
    outs[1].set_shared_memory(name, want_z.nbytes, offset=offs[3])
    res = client.infer("affine", ins, outputs=outs)
    y = res.get_output("y")
    assert list(y.shape) == [3, 4] and y.datatype == "FP32"
    assert y.parameters["shared_memory_region"].string_param == name
    assert len(res.get_response().raw_output_contents[0]) == 0  # the bytes went into the region only
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, [3, 4], offset=offs[2]), want_y)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.int64, [3, 2], offset=offs[3]), want_z)


def test_shared_memory_mixes_with_raw_contents(client: tc.InferenceServerClient, regions: Regions) -> None:
    a, b = _affine_inputs(5)
    want_y, want_z = _bytes_path(client, a, b)
    in_name, _, in_handle = regions.register(b.nbytes)
    out_name, _, out_handle = regions.register(want_y.nbytes)
    shm.set_shared_memory_region(in_handle, [b])
    ins = [tc.InferInput("a", list(a.shape), "FP32"), tc.InferInput("b", list(b.shape), "INT64")]
    ins[0].set_data_from_numpy(a)  # raw_input_contents[0] belongs to 'a', the one input not in a region
    ins[1].set_shared_memory(in_name, b.nbytes)
    outs = [tc.InferRequestedOutput("y"), tc.InferRequestedOutput("z")]
    outs[0].set_shared_memory(out_name, want_y.nbytes)
    res = client.infer("affine", ins, outputs=outs)
    np.testing.assert_array_equal(res.as_numpy("z"), want_z)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out_handle, np.float32, [5, 4]), want_y)


def test_image_sized_tensor_and_bytes_output(client: tc.InferenceServerClient, regions: Regions) -> None:
    x = np.random.default_rng(0).random((2, 3, 224, 224), dtype=np.float32)
    name, _, handle = regions.register(x.nbytes + 64, offset=100)  # a window that starts mid-page
    shm.set_shared_memory_region(handle, [x], offset=100)
    inp = tc.InferInput("x", list(x.shape), "FP32")
    inp.set_shared_memory(name, x.nbytes)
    got = client.infer("pool", [inp]).as_numpy("y")
    np.testing.assert_allclose(got, x.mean(axis=(2, 3), keepdims=True), rtol=1e-5)

    s = np.array([b"alpha", b"", b"gamma\x00delta"], dtype=np.object_)
    out_name, _, out_handle = regions.register(64)
    inp = tc.InferInput("s", [3], "BYTES")
    inp.set_data_from_numpy(s)
    out = tc.InferRequestedOutput("t")
    out.set_shared_memory(out_name, 64)
    client.infer("strings", [inp], outputs=[out])
    assert shm.get_contents_as_numpy(out_handle, np.object_, [3]).tolist() == s.tolist()


def test_status_and_unregister_release_the_region(
    server: ServerProcess, client: tc.InferenceServerClient, regions: Regions
) -> None:
    name, key, _ = regions.create(256)
    client.register_system_shared_memory(name, key, 128, offset=64)
    status = client.get_system_shared_memory_status(name)
    region = status.regions[name]
    assert (region.name, region.key, region.offset, region.byte_size) == (name, key, 64, 128)
    assert name in client.get_system_shared_memory_status().regions
    assert f"/dev/shm{key}" in _held(server)
    _refused(lambda: client.register_system_shared_memory(name, key, 128), name, code="StatusCode.ALREADY_EXISTS")
    client.unregister_system_shared_memory(name)
    assert f"/dev/shm{key}" not in _held(server)
    assert name not in client.get_system_shared_memory_status().regions
    _refused(lambda: client.get_system_shared_memory_status(name), name, code="StatusCode.NOT_FOUND")
    client.unregister_system_shared_memory(name)  # unknown names are a no-op, as in Triton


def test_registration_misuse_is_refused(client: tc.InferenceServerClient, regions: Regions, tmp_path: Path) -> None:
    name, key, _ = regions.create(100)
    outside = tmp_path / "not_shm"
    outside.write_bytes(b"\0" * 100)
    for bad_key in ("/../../" + str(outside).lstrip("/"), str(outside), "/", "/a/b", "/.."):
        _refused(lambda k=bad_key: client.register_system_shared_memory("bad", k, 10), "POSIX shared-memory name")
    _refused(
        lambda: client.register_system_shared_memory("bad", "/cnnserve_no_such_object", 10),
        "cnnserve_no_such_object",
        "No such file",
    )
    _refused(lambda: client.register_system_shared_memory("bad", key, 101), "exceeds", "100 bytes")
    _refused(lambda: client.register_system_shared_memory("bad", key, 60, offset=50), "offset 50")
    _refused(lambda: client.register_system_shared_memory("bad", key, 0), "byte_size must be positive")
    link = Path("/dev/shm") / f"cnnserve_test_link_{uuid.uuid4().hex[:8]}"
    link.symlink_to(outside)
    try:
        _refused(lambda: client.register_system_shared_memory("bad", "/" + link.name, 10), link.name)
    finally:
        link.unlink()
    assert "bad" not in client.get_system_shared_memory_status().regions


def test_inference_misuse_is_refused_and_the_server_keeps_serving(
    client: tc.InferenceServerClient, regions: Regions
) -> None:
    a, b = _affine_inputs(2)
    name, _, handle = regions.register(a.nbytes + b.nbytes)
    shm.set_shared_memory_region(handle, [a, b])

    def infer(a_region=(name, a.nbytes, 0), y_region=None) -> None:
        ins = [tc.InferInput("a", list(a.shape), "FP32"), tc.InferInput("b", list(b.shape), "INT64")]
        ins[0].set_shared_memory(a_region[0], a_region[1], offset=a_region[2])
        ins[1].set_shared_memory(name, b.nbytes, offset=a.nbytes)
        outs = None
        if y_region is not None:
            outs = [tc.InferRequestedOutput("y")]
            outs[0].set_shared_memory(*y_region)
        client.infer("affine", ins, outputs=outs)

    infer()  # well-formed: serves
    _refused(lambda: infer(a_region=("no_such_region", a.nbytes, 0)), "input 'a'", "no_such_region", "not registered")
    _refused(lambda: infer(a_region=(name, a.nbytes, b.nbytes + 8)), "input 'a'", "exceeds", name)
    _refused(lambda: infer(a_region=(name, a.nbytes - 4, 0)), "input 'a'", f"expected {a.nbytes} bytes")
    _refused(lambda: infer(y_region=("no_such_region", 32)), "requested output 'y'", "not registered")
    _refused(lambda: infer(y_region=(name, 8)), "output 'y'", "does not fit", "8")
    _refused(lambda: infer(y_region=(name, 32, a.nbytes + b.nbytes)), "requested output 'y'", "exceeds")
    want_y, _ = _bytes_path(client, a, b)
    np.testing.assert_array_equal(_bytes_path(client, a, b)[0], want_y)
    infer()


def test_object_shrunk_after_registering_is_refused_not_a_crash(
    server: ServerProcess, client: tc.InferenceServerClient, regions: Regions
) -> None:
    a, b = _affine_inputs(2)
    name, key, handle = regions.register(a.nbytes + b.nbytes)
    shm.set_shared_memory_region(handle, [a, b])
    os.truncate(f"/dev/shm{key}", 8)  # a server touching a mapping of it past this would die of SIGBUS
    ins = [tc.InferInput("a", list(a.shape), "FP32"), tc.InferInput("b", list(b.shape), "INT64")]
    ins[0].set_shared_memory(name, a.nbytes)
    ins[1].set_shared_memory(name, b.nbytes, offset=a.nbytes)
    _refused(lambda: client.infer("affine", ins), "shrank to 8 bytes", name)
    assert server.proc.poll() is None
    _bytes_path(client, a, b)


STRESS_CLIENTS = 5
STRESS_REQUESTS = 120  # per client; with the flips below, well past the 16-55 flips that killed a mapping server


@pytest.mark.timeout(30)
def test_truncating_a_region_in_use_fails_requests_never_the_server(server: ServerProcess, regions: Regions) -> None:
    """Several gRPC clients use one region for their inputs and output while its owner truncates the
    object to 0 and restores it in a loop: every request is answered OK or INVALID_ARGUMENT and the
    server stays alive (a server reading through a mapping dies of SIGBUS here)."""
    a, b = _affine_inputs(2)
    y_off = a.nbytes + b.nbytes
    size = y_off + a.nbytes
    name, key, handle = regions.register(size)
    shm.set_shared_memory_region(handle, [a, b])
    path = f"/dev/shm{key}"
    done = threading.Event()
    flips = 0

    def flip() -> None:
        nonlocal flips
        fd = os.open(path, os.O_RDWR)
        try:
            while not done.is_set() and flips < 1_000_000:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, size)
                os.pwrite(fd, a.tobytes() + b.tobytes(), 0)
                flips += 1
        finally:
            os.close(fd)

    def use(i: int) -> dict[str, int]:
        codes: dict[str, int] = {}
        client = tc.InferenceServerClient(server.grpc_url)
        ins = [tc.InferInput("a", list(a.shape), "FP32"), tc.InferInput("b", list(b.shape), "INT64")]
        ins[0].set_shared_memory(name, a.nbytes)
        ins[1].set_shared_memory(name, b.nbytes, offset=a.nbytes)
        out = tc.InferRequestedOutput("y")
        out.set_shared_memory(name, a.nbytes, offset=y_off)
        try:
            for _ in range(STRESS_REQUESTS):
                try:
                    client.infer("affine", ins, outputs=[out] if i % 2 else None)
                    code = "StatusCode.OK"
                except InferenceServerException as exc:
                    code = exc.status()
                codes[code] = codes.get(code, 0) + 1
        finally:
            client.close()
        return codes

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        with ThreadPoolExecutor(STRESS_CLIENTS) as pool:
            results = list(pool.map(use, range(STRESS_CLIENTS)))
    finally:
        done.set()
        flipper.join()
    assert server.proc.poll() is None, f"the server died after {flips} flips:\n{server.log()[-3000:]}"
    totals: dict[str, int] = {}
    for r in results:
        for code, n in r.items():
            totals[code] = totals.get(code, 0) + n
    assert set(totals) <= {"StatusCode.OK", "StatusCode.INVALID_ARGUMENT"}, totals
    assert sum(totals.values()) == STRESS_CLIENTS * STRESS_REQUESTS and flips > 0, (totals, flips)
    np.testing.assert_array_equal(_bytes_path(tc.InferenceServerClient(server.grpc_url), a, b)[0], 2 * a + 1)


def test_registrations_in_a_shared_directory_follow_register_and_unregister_everywhere(tmp_path: Path) -> None:
    """Two registries on one directory, as two --workers processes: what one registers the other uses,
    what one unregisters or re-registers the other sees on its next use."""
    from server.shared_memory import SharedMemoryRegistry

    one, two = SharedMemoryRegistry(tmp_path), SharedMemoryRegistry(tmp_path)
    objs = [
        shm.create_shared_memory_region(f"o{i}", f"/cnnserve_test_dir_{uuid.uuid4().hex[:8]}", 16, create_only=True)
        for i in range(2)
    ]
    try:
        for i, o in enumerate(objs):
            shm.set_shared_memory_region(o, [np.full(4, i, np.int32)])
        one.register("r", objs[0]._shm_key, 0, 16)
        assert [s.name for s in two.status()] == ["r"]
        assert bytes(two.get("r", "t").read(0, 4, "t")) == np.int32(0).tobytes()
        with pytest.raises(InferError) as ei:
            two.register("r", objs[1]._shm_key, 0, 16)
        assert ei.value.code.name == "ALREADY_EXISTS"
        one.unregister("r")
        with pytest.raises(InferError, match="not registered"):
            two.get("r", "t")
        two.register("r", objs[1]._shm_key, 0, 16)
        assert bytes(one.get("r", "t").read(0, 4, "t")) == np.int32(1).tobytes()
        one.unregister("r")
        with pytest.raises(InferError, match="not registered"):
            two.get("r", "t")  # its own descriptor of the re-registered region is dropped too
    finally:
        one.close()
        two.close()
        for o in objs:
            shm.destroy_shared_memory_region(o)


def test_cuda_shared_memory_has_no_regions_here(client: tc.InferenceServerClient) -> None:
    """Declared for clients' cleanup (perf_analyzer unregisters both kinds on exit); none can be registered."""
    assert len(client.get_cuda_shared_memory_status().regions) == 0
    client.unregister_cuda_shared_memory()
    client.unregister_cuda_shared_memory("anything")
    _refused(lambda: client.get_cuda_shared_memory_status("gpu0"), "gpu0", code="StatusCode.NOT_FOUND")
    _refused(
        lambda: client.register_cuda_shared_memory("gpu0", b"\0" * 64, 0, 64),
        "system shared memory",
        code="StatusCode.UNIMPLEMENTED",
    )
    assert "cuda_shared_memory" not in client.get_server_metadata().extensions
