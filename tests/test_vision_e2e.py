"""The vision API end to end: the real server subprocess, our client, real pictures.

Two repositories: tiny ONNX models with known answers (tests/vision_synthetic.py: every code path, the
bad-input matrix, batching, metrics; seconds), and the real trained models (cat photo, shapes,
segmentation quality), exported on demand or taken from CNNSERVE_TEST_REPOSITORY.
"""
from __future__ import annotations

import asyncio
import io
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from client import AsyncVisionClient, InferenceClient, InferenceServerError, VisionClient, failures, mask_array, png_image
from modelrepo.preprocess import preprocess
from modelrepo.spec import ModelMeta
from protos import vision_pb2 as vpb
from server.postprocess import softmax
from test_imaging import bomb_png, encode, gradient_rgb
from vision_synthetic import build_synthetic_repository

ROOT = Path(__file__).resolve().parents[1]
Reason = vpb.ImageError.Reason


@pytest.fixture(scope="module")
def synthetic_repo(tmp_path_factory) -> Path:
    return build_synthetic_repository(tmp_path_factory.mktemp("vision_repo"))


@pytest.fixture(scope="module")
def synthetic_server(synthetic_repo, server_factory):
    return server_factory(synthetic_repo)


@pytest.fixture(scope="module")
def vision(synthetic_server):
    with VisionClient(synthetic_server.grpc_url) as client:
        yield client


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.new("RGB", size, colour)


def bad_inputs() -> dict[str, tuple[bytes, int]]:
    noise = encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)), "PNG")
    return {
        "empty": (b"", Reason.EMPTY),
        "truncated": (noise[: len(noise) // 2], Reason.TRUNCATED),
        "corrupt": (b"definitely not a picture" * 8, Reason.CORRUPT),
        "unsupported": (encode(gradient_rgb(), "GIF"), Reason.UNSUPPORTED_FORMAT),
        "bomb": (bomb_png(60000, 60000), Reason.TOO_LARGE),
    }


# -- synthetic models: every path --------------------------------------------------------------------------


def test_classify_batch_with_a_bad_image_in_the_middle(vision: VisionClient) -> None:
    response = vision.classify("colour_classifier", [solid((220, 20, 20)), b"garbage", solid((10, 10, 230))], top_k=2)
    assert [r.image.index for r in response.results] == [0, 1, 2]
    assert response.results[0].classes[0].label == "red"
    assert response.results[2].classes[0].label == "blue"
    assert len(response.results[0].classes) == 2
    assert response.results[0].classes[0].score > response.results[0].classes[1].score
    bad = response.results[1]
    assert bad.image.error.reason == Reason.CORRUPT and not bad.classes
    assert failures(response.results) == [bad.image.error.message]
    assert bad.image.error.message.startswith("image 1: CORRUPT")
    assert (response.results[0].image.width, response.results[0].image.height) == (40, 30)


@pytest.mark.parametrize("case", list(bad_inputs()))
def test_bad_input_alone_is_invalid_argument_naming_index_and_reason(vision: VisionClient, case: str) -> None:
    data, reason = bad_inputs()[case]
    with pytest.raises(InferenceServerError) as info:
        vision.classify("colour_classifier", [data])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"image 0: {Reason.Name(reason)}" in info.value.message


def test_bad_inputs_beside_good_ones_keep_their_reasons(vision: VisionClient) -> None:
    cases = list(bad_inputs().values())
    images = [solid((0, 200, 0))] + [data for data, _ in cases]
    response = vision.classify("colour_classifier", images)
    assert response.results[0].classes[0].label == "green"
    for i, (_, reason) in enumerate(cases, start=1):
        assert response.results[i].image.error.reason == reason
        assert response.results[i].image.error.message.startswith(f"image {i}: ")


def test_awkward_but_valid_images_are_answered(vision: VisionClient) -> None:
    grey = Image.fromarray(np.full((20, 30), 200, np.uint8), "L")
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 2] = 255
    rgba[..., 3] = 255
    sixteen = Image.fromarray(np.full((20, 30), 60000, np.uint16))
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[..., 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 60x40, displayed 40x60
    rotated = encode(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=95)
    response = vision.classify("colour_classifier", [grey, encode(Image.fromarray(rgba, "RGBA")), sixteen, rotated])
    assert not failures(response.results)
    assert response.results[1].classes[0].label == "blue"
    assert response.results[3].classes[0].label == "red"
    assert (response.results[3].image.width, response.results[3].image.height) == (40, 60)


def test_request_level_errors(vision: VisionClient, synthetic_server) -> None:
    with pytest.raises(InferenceServerError) as info:
        vision.classify("bright_segmenter", [solid((1, 2, 3))])
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "segmentation" in info.value.message and "Classify" in info.value.message
    with pytest.raises(InferenceServerError) as info:
        vision.reconstruct("grey_encoder", [solid((1, 2, 3))])
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "encoder" in info.value.message
    with pytest.raises(InferenceServerError) as info:
        vision.classify("no_such_model", [solid((1, 2, 3))])
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(InferenceServerError) as info:
        vision.classify("colour_classifier", [])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "no images" in info.value.message
    with pytest.raises(InferenceServerError) as info:
        vision.detect("box_detector", [solid((1, 2, 3))], score_threshold=2.0)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "score_threshold" in info.value.message
    # ... and the server keeps serving.
    with InferenceClient(synthetic_server.grpc_url) as client:
        assert client.is_server_ready() and client.health() == "SERVING"
    assert vision.classify("colour_classifier", [solid((250, 0, 0))]).results[0].classes[0].label == "red"


def test_detect_maps_boxes_to_original_pixels(vision: VisionClient) -> None:
    # 128x64 letterboxed into 64x64: scale 0.5, 16 px of padding above and below. The model's fixed box
    # (16, 16)-(48, 48) in its input is (32, 0)-(96, 64) in the picture.
    response = vision.detect("box_detector", [solid((9, 9, 9), (128, 64)), solid((9, 9, 9), (50, 100))])
    first, second = response.results
    assert len(first.detections) == 1  # the padding row is not a detection
    det = first.detections[0]
    assert (det.box.x1, det.box.y1, det.box.x2, det.box.y2) == pytest.approx((32, 0, 96, 64))
    assert det.label == "thing" and det.score == pytest.approx(0.9)
    # 50x100 -> scale 0.64, 32x64 content with 16 px padding left and right.
    d2 = second.detections[0].box
    assert (d2.x1, d2.y1, d2.x2, d2.y2) == pytest.approx((0, 25, 50, 75))
    assert not vision.detect("box_detector", [solid((9, 9, 9))], score_threshold=0.95).results[0].detections


def test_segment_mask_at_original_size(vision: VisionClient) -> None:
    truth = np.zeros((90, 150), bool)
    truth[20:70, 40:110] = True
    picture = Image.fromarray((truth * 255).astype(np.uint8)).convert("RGB")
    response = vision.segment("bright_segmenter", [picture])
    assert list(response.labels) == ["background", "bright"]
    result = response.results[0]
    mask = mask_array(result)
    assert mask.shape == (90, 150)
    iou = np.logical_and(mask == 1, truth).sum() / np.logical_or(mask == 1, truth).sum()
    assert iou > 0.9
    assert [f.label for f in result.fractions] == ["background", "bright"]
    assert result.fractions[1].fraction == pytest.approx(truth.mean(), abs=0.03)


def test_encode_and_reconstruct(vision: VisionClient) -> None:
    grey = Image.fromarray(np.tile(np.linspace(0, 255, 8, dtype=np.uint8), (8, 1)), "L")
    latent = vision.encode("grey_encoder", [grey]).results[0].latent
    # mean brightness 0.5 -> (0.5 - 0.5) / 0.5 = 0 after the model's normalisation
    assert list(latent) == pytest.approx([0.0], abs=0.01)
    result = vision.reconstruct("grey_autoencoder", [grey]).results[0]
    image = png_image(result.image_png)
    assert image.mode == "L" and image.size == (8, 8)
    # The identity "autoencoder" hands back the input: the normalisation must be undone exactly.
    assert np.abs(np.asarray(image, np.int16) - np.asarray(grey, np.int16)).max() <= 1
    assert vision.encode("grey_autoencoder", [grey]).results[0].latent[0] == pytest.approx(latent[0])


def test_classify_equals_model_infer_on_the_same_pixels(synthetic_repo, synthetic_server, vision: VisionClient) -> None:
    picture = gradient_rgb(33, 17)
    tensor, _ = preprocess(picture, ModelMeta.read(synthetic_repo / "colour_classifier").preprocess)
    with InferenceClient(synthetic_server.grpc_url) as client:
        logits = client.infer("colour_classifier", {"input": tensor[None]})["logits"][0]
    expected = softmax(logits)
    result = vision.classify("colour_classifier", [encode(picture)], top_k=3).results[0]
    got = {c.class_index: c.score for c in result.classes}
    np.testing.assert_allclose([got[i] for i in range(3)], expected, rtol=1e-5)


def test_concurrent_image_requests_are_batched(synthetic_server) -> None:
    async def run() -> None:
        async with AsyncVisionClient(synthetic_server.grpc_url) as client:
            answers = await asyncio.gather(
                *(client.classify("colour_classifier", [solid((200, 0, 0)), solid((0, 0, 200))]) for _ in range(12))
            )
        assert all(a.results[0].classes[0].label == "red" and a.results[1].classes[0].label == "blue" for a in answers)

    with InferenceClient(synthetic_server.grpc_url) as client:
        before = client.get_inference_statistics("colour_classifier").model_stats[0]
        asyncio.run(run())
        after = client.get_inference_statistics("colour_classifier").model_stats[0]
    images = after.inference_count - before.inference_count
    executions = after.execution_count - before.execution_count
    assert images == 24
    assert executions < images  # images from different requests shared executions


def test_vision_metrics_exported(synthetic_server, vision: VisionClient) -> None:
    vision.classify("colour_classifier", [solid((1, 200, 1)), b""])
    text = urllib.request.urlopen(synthetic_server.metrics_url, timeout=10).read().decode()
    assert 'cnnserve_vision_preprocess_seconds_count{model="colour_classifier"}' in text
    assert 'cnnserve_vision_images_per_request_bucket{le="2.0",model="colour_classifier",rpc="Classify"}' in text
    assert 'cnnserve_vision_image_errors_total{model="colour_classifier",reason="EMPTY"}' in text
