"""--model-control-mode poll: models added, changed and removed on disk are loaded, reloaded and unloaded
while another model serves every request it is sent."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from tritonclient.utils import InferenceServerException

from conftest import AFFINE_CONFIG, affine_model, write_model

CONFIG = "max_batch_size: {mbs}\ndynamic_batching { }\n"


def _inputs(n: int = 2) -> list[tc.InferInput]:
    a = tc.InferInput("a", [n, 4], "FP32")
    a.set_data_from_numpy(np.ones((n, 4), np.float32))
    b = tc.InferInput("b", [n, 2], "INT64")
    b.set_data_from_numpy(np.zeros((n, 2), np.int64))
    return [a, b]


async def _until(what: str, check, timeout: float = 60.0) -> None:
    """Until `check()` (a blocking client call) holds: the server's observable state, polled, bounded."""
    t_end = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        if time.monotonic() > t_end:
            raise AssertionError(f"poll mode never reached: {what}")
        await asyncio.sleep(0.05)


def _stage(repo: Path, name: str, mbs: int) -> None:
    """A model directory written beside the repository, then renamed in: the poller sees it whole."""
    staging = repo.parent / f"{repo.name}-staging"
    write_model(staging, name, affine_model(), CONFIG.replace("{mbs}", str(mbs)))
    os.replace(staging / name, repo / name)


def test_poll_mode_follows_the_disk_while_another_model_serves(tmp_path: Path, server_factory) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "affine", affine_model(), AFFINE_CONFIG)
    srv = server_factory(repo, "--model-control-mode", "poll", "--repository-poll-secs", "0.2")
    client = tc.InferenceServerClient(srv.grpc_url)
    assert client.is_model_ready("affine") and not client.is_model_ready("added")

    def config_mbs() -> int:
        return client.get_model_config("added").config.max_batch_size

    def unloaded() -> bool:
        index = {m.name: m for m in client.get_model_repository_index().models}
        return index["added"].state == "UNAVAILABLE" and not client.is_model_ready("added")

    async def main() -> tuple[int, list[BaseException]]:
        stop = asyncio.Event()
        failures: list[BaseException] = []
        served = 0

        async def traffic() -> None:
            nonlocal served
            async with tca.InferenceServerClient(srv.grpc_url) as c:
                while not stop.is_set():
                    try:
                        await c.infer("affine", _inputs())
                        served += 1
                    except InferenceServerException as exc:
                        failures.append(exc)

        task = asyncio.create_task(traffic())
        try:
            _stage(repo, "added", 8)
            await _until("the added model ready", lambda: client.is_model_ready("added"))
            assert config_mbs() == 8
            (repo / "added" / "config.pbtxt").write_text(CONFIG.replace("{mbs}", "4"))
            await _until("the changed config served", lambda: config_mbs() == 4)
            assert client.is_model_ready("added")
            shutil.rmtree(repo / "added")
            await _until("the removed model unloaded", unloaded)
        finally:
            stop.set()
            await task
        return served, failures

    served, failures = asyncio.run(main())
    assert not failures, failures[:3]
    assert served > 0
    assert client.is_server_ready() and client.is_model_ready("affine")
    with pytest.raises(InferenceServerException) as err:  # poll mode takes no load requests, as Triton
        client.load_model("affine")
    assert err.value.status() == "StatusCode.UNAVAILABLE" and "poll" in err.value.message()
