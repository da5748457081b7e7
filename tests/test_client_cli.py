"""The client's drawing and CLI plumbing; the CLI against the real server is in test_vision_e2e.py."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from client.cli import _output_path, build_parser
from client.draw import draw_detections, overlay_mask
from protos import vision_pb2 as vpb
from server.postprocess import UNSEEN


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
    names = {_output_path(str(tmp_path / "a.png"), i, 3).name for i in range(3)}
    assert names == {"a-0.png", "a-1.png", "a-2.png"}


def test_parser_commands() -> None:
    parser = build_parser()
    args = parser.parse_args(["--url", "h:1", "detect", "m", "x.png", "y.jpg", "--out-image", "o.png"])
    assert (args.command, args.model, args.images, args.out_image, args.url) == ("detect", "m", ["x.png", "y.jpg"], "o.png", "h:1")
    assert parser.parse_args(["classify", "m", "x.png"]).top_k == 5
    with pytest.raises(SystemExit):
        parser.parse_args(["classify", "m"])  # an image is required
