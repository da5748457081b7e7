"""Annotated pictures: detections drawn as labelled boxes, segmentation masks blended over the image.

People would rather look than read: the CLI writes these next to its JSON output.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cnncore.postprocess import UNSEEN, palette
from protos import vision_pb2 as vpb

_COLOURS = np.asarray(palette(256), dtype=np.uint8).reshape(256, 3)


def _colour(class_index: int) -> tuple[int, int, int]:
    # The mask's colours, so a box and a mask of one class look alike; class 0 (black in the VOC map)
    # and out-of-palette indices fold onto the visible colours 1..254.
    k = class_index if 0 < class_index < UNSEEN else (class_index % 254) + 1
    r, g, b = _COLOURS[k]
    return int(r), int(g), int(b)


def draw_detections(image: Image.Image, detections: list[vpb.Detection]) -> Image.Image:
    """A copy of `image` (upright, as the server saw it) with each detection's box, label and score."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    line = max(2, round(min(out.size) / 200))
    for det in detections:
        colour = _colour(det.class_index)
        box = (det.box.x1, det.box.y1, det.box.x2, det.box.y2)
        draw.rectangle(box, outline=colour, width=line)
        text = f"{det.label} {det.score:.2f}"
        left, top, right, bottom = draw.textbbox((box[0], box[1]), text, font=font)
        # Label above the box when there is room, inside it otherwise.
        shift = bottom - top + 2 if box[1] - (bottom - top + 2) >= 0 else 0
        draw.rectangle((left, top - shift, right + 2, bottom - shift), fill=colour)
        draw.text((box[0] + 1, box[1] - shift), text, fill=(255, 255, 255), font=font)
    return out


def overlay_mask(image: Image.Image, mask: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """`image` with each pixel's class colour blended in; background (class 0) and unseen pixels stay as is."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    if base.shape[:2] != mask.shape:
        raise ValueError(f"mask {mask.shape[::-1]} does not match the image size {image.size}")
    colours = _COLOURS[mask].astype(np.float32)
    painted = (mask != 0) & (mask != UNSEEN)
    base[painted] = (1.0 - alpha) * base[painted] + alpha * colours[painted]
    return Image.fromarray(base.clip(0, 255).astype(np.uint8), "RGB")
