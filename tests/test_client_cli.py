"""The client's drawing and CLI plumbing; the CLI against the real server is in test_vision_e2e.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.cli import _output_path, build_parser
from client.draw import draw_detections, overlay_mask
from cnncore.postprocess import UNSEEN
from protos import vision_pb2 as vpb
from vision_synthetic import build_synthetic_repository

ROOT = Path(__file__).resolve().parents[1]


def test_draw_detections_marks_the_box_only() -> None:
    picture = Image.new("RGB", (200, 120), (128, 128, 128))
    det = vpb.Detection(box=vpb.Box(x1=50, y1=40, x2=150, y2=100), class_index=2, label="square", score=0.97)
    out = np.asarray(draw_detections(picture, [det]))
    grey = np.all(out == 128, axis=2)
    assert not grey[40, 100] and not grey[100, 100] and not grey[70, 50]  # outline drawn
    assert grey[70, 100]  # the inside is left visible
    assert not grey[30:40, 50:80].all()  # the label sits above the box
    assert np.asarray(picture).min() == 128  # the input is not modified


def test_overlay_mask_tints_classes_only() -> None:
    picture = Image.new("RGB", (6, 4), (100, 100, 100))
    mask = np.zeros((4, 6), np.uint8)
    mask[1:3, 1:3] = 1
    mask[0, 5] = UNSEEN
    out = np.asarray(overlay_mask(picture, mask))
    assert (out[0, 0] == 100).all() and (out[0, 5] == 100).all()
    assert not (out[1, 1] == 100).all()
    with pytest.raises(ValueError, match="does not match"):
        overlay_mask(picture, np.zeros((3, 3), np.uint8))


def test_output_paths_never_collide(tmp_path) -> None:
    assert _output_path(None, 0, 1) is None
    assert _output_path(str(tmp_path / "a.png"), 0, 1) == tmp_path / "a.png"
    paths = [_output_path(str(tmp_path / "a.png"), i, 3) for i in range(3)]
    assert None not in paths and {p.name for p in paths if p is not None} == {"a-0.png", "a-1.png", "a-2.png"}


def test_parser_commands() -> None:
    parser = build_parser()
    args = parser.parse_args(["--url", "h:1", "detect", "m", "x.png", "y.jpg", "--out-image", "o.png"])
    assert (args.command, args.model, args.images, args.out_image, args.url) == (
        "detect",
        "m",
        ["x.png", "y.jpg"],
        "o.png",
        "h:1",
    )
    assert parser.parse_args(["classify", "m", "x.png"]).top_k == 5
    with pytest.raises(SystemExit):
        parser.parse_args(["classify", "m"])  # an image is required


# -- the CLI as users run it, against the real server --------------------------------------------------------


@pytest.fixture(scope="module")
def url(tmp_path_factory, server_factory) -> str:
    repo = build_synthetic_repository(tmp_path_factory.mktemp("cli_repo"))
    # explicit mode: the client's load/unload calls are refused in mode none, as Triton does
    return server_factory(repo, "--model-control-mode", "explicit", "--load-model", "*").grpc_url


def cli(*args: str) -> tuple[int, dict, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "client", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    out = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return proc.returncode, out, proc.stderr


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    arr = np.zeros((64, 128, 3), np.uint8)
    arr[16:48, 32:96] = 255
    path = tmp_path / "rect.png"
    Image.fromarray(arr).save(path)
    return path


def test_cli_detect_writes_annotated_picture(url: str, picture: Path, tmp_path: Path) -> None:
    out_image = tmp_path / "boxes.png"
    code, out, _ = cli("--url", url, "detect", "box_detector", str(picture), "--out-image", str(out_image))
    assert code == 0
    det = out["results"][0]["detections"][0]
    assert det["label"] == "thing" and det["box"] == {"x1": 32.0, "y1": 0.0, "x2": 96.0, "y2": 64.0}
    assert out["results"][0]["files"]["annotated_image"] == str(out_image)
    drawn = np.asarray(Image.open(out_image).convert("RGB"))
    assert drawn.shape == (64, 128, 3)
    assert (drawn != np.asarray(Image.open(picture).convert("RGB"))).any()  # boxes really drawn


def test_cli_segment_writes_overlay_and_mask(url: str, picture: Path, tmp_path: Path) -> None:
    overlay, mask_path = tmp_path / "overlay.png", tmp_path / "mask.png"
    code, out, _ = cli(
        "--url",
        url,
        "segment",
        "bright_segmenter",
        str(picture),
        "--out-image",
        str(overlay),
        "--out-mask",
        str(mask_path),
    )
    assert code == 0
    result = out["results"][0]
    assert "mask_png" not in result  # binary goes to files, not into the JSON
    assert result["fractions"][1]["label"] == "bright"
    assert result["fractions"][1]["fraction"] == pytest.approx(0.25, abs=0.02)
    mask = np.asarray(Image.open(mask_path))
    assert mask.shape == (64, 128) and set(np.unique(mask)) == {0, 1}
    tinted = np.asarray(Image.open(overlay).convert("RGB"))
    assert tinted.shape == (64, 128, 3) and (tinted[32, 64] != 255).any()


def test_cli_classify_reconstruct_encode(url: str, picture: Path, tmp_path: Path) -> None:
    red = tmp_path / "red.jpg"
    Image.new("RGB", (20, 20), (230, 10, 10)).save(red)
    code, out, _ = cli("--url", url, "classify", "colour_classifier", str(red), "--top-k", "2")
    assert code == 0 and out["results"][0]["classes"][0]["label"] == "red"
    assert len(out["results"][0]["classes"]) == 2
    recon = tmp_path / "recon.png"
    code, out, _ = cli("--url", url, "reconstruct", "grey_autoencoder", str(picture), "--out-image", str(recon))
    assert code == 0 and Image.open(recon).size == (8, 8)
    code, out, _ = cli("--url", url, "encode", "grey_encoder", str(picture))
    assert code == 0 and out["results"][0]["latent"] == [pytest.approx(-0.5, abs=0.02)]


def test_cli_exit_codes_and_errors(url: str, picture: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    code, out, _ = cli("--url", url, "classify", "colour_classifier", str(picture), str(broken))
    assert code == 2  # some images failed: JSON still printed
    assert out["results"][1]["image"]["error"]["reason"] == "CORRUPT"
    assert out["results"][1]["source"] == str(broken)
    code, _, err = cli("--url", url, "classify", "bright_segmenter", str(picture))
    assert code == 1 and json.loads(err)["error"]["code"] == "FAILED_PRECONDITION"


def test_cli_health_and_models(url: str, tmp_path: Path) -> None:
    code, out, _ = cli("--url", url, "health")
    assert code == 0 and out == {"live": True, "ready": True, "health": "SERVING"}
    target = tmp_path / "models.json"
    code, _, _ = cli("--url", url, "--output", str(target), "models")
    models = {m["name"]: m for m in json.loads(target.read_text())["models"]}
    assert code == 0 and models["colour_classifier"]["state"] == "READY"
    assert models["colour_classifier"]["inputs"][0]["shape"] == [-1, 3, 8, 8]


# -- the client library over the inference protocol ----------------------------------------------------------


def test_inference_client_sync(url: str) -> None:
    from client import InferenceClient, InferenceServerError
    from client.inference import build_infer_request

    x = np.random.default_rng(0).random((3, 3, 8, 8), dtype=np.float32)
    expected = x.mean(axis=(2, 3)) * 10  # colour_classifier: 10 x channel means
    with InferenceClient(url) as c:
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("colour_classifier")
        assert c.get_server_metadata().name
        assert c.get_model_metadata("colour_classifier").inputs[0].name == "input"
        assert c.get_model_config("colour_classifier").config.max_batch_size == 8
        np.testing.assert_allclose(c.infer("colour_classifier", {"input": x})["logits"], expected, rtol=1e-5)
        requests = [
            build_infer_request("colour_classifier", {"input": x[i : i + 1]}, request_id=str(i)) for i in range(3)
        ]
        streamed = dict(c.stream_infer(requests))
        assert sorted(streamed) == ["0", "1", "2"]
        for i in range(3):
            np.testing.assert_allclose(streamed[str(i)]["logits"][0], expected[i], rtol=1e-5)
        with pytest.raises(InferenceServerError) as info:
            c.infer("colour_classifier", {"input": x[:, :2]})
        assert info.value.code.name == "INVALID_ARGUMENT" and "input" in info.value.message
        assert c.get_inference_statistics("colour_classifier").model_stats[0].inference_count >= 6
        assert "grey_encoder" in {m.name for m in c.get_model_repository_index().models}
        c.unload_model("grey_encoder")
        assert not c.is_model_ready("grey_encoder")
        c.load_model("grey_encoder")
        assert c.is_model_ready("grey_encoder")


def test_inference_client_async(url: str) -> None:
    import asyncio

    from client import AsyncInferenceClient
    from client.inference import build_infer_request

    x = np.random.default_rng(1).random((2, 3, 8, 8), dtype=np.float32)

    async def run() -> None:
        async with AsyncInferenceClient(url) as c:
            assert await c.is_server_ready() and await c.health() == "SERVING"
            assert (await c.get_model_metadata("colour_classifier")).outputs[0].name == "logits"
            outs = await asyncio.gather(*(c.infer("colour_classifier", {"input": x[i : i + 1]}) for i in range(2)))
            for i, out in enumerate(outs):
                np.testing.assert_allclose(out["logits"][0], x[i].mean(axis=(1, 2)) * 10, rtol=1e-5)
            streamed = [
                rid
                async for rid, _ in c.stream_infer(
                    [build_infer_request("colour_classifier", {"input": x[:1]}, request_id=f"r{i}") for i in range(2)]
                )
            ]
            assert sorted(streamed) == ["r0", "r1"]

    asyncio.run(run())
