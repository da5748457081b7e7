"""Export-friendly NMS and RoIAlign: torch.library custom ops with eager reference implementations.

Why custom ops: a plain-PyTorch NMS is a data-dependent loop and RoIAlign decomposes into hundreds of
gathers, neither of which exports to anything TensorRT accelerates. Each op here is opaque to the
exporter and is translated (see `onnx_translation_table`) to ONNX's native `NonMaxSuppression` /
`RoiAlign`, which ONNX Runtime and TensorRT both implement.

Both ops have static output shapes, so nothing downstream of them is data dependent:
- `nms_mask` returns a keep *mask* [B, S] rather than a list of indices (the ONNX translation scatters
  NonMaxSuppression's selected indices into zeros);
- `roi_align` takes a fixed number of boxes per image, [B, R, 4], and returns [B, R, C, ph, pw].
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

_NS = "cnnserve"


# ----------------------------------------------------------------------------------------------- NMS
def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU of (x1, y1, x2, y2) boxes [N,4] x [M,4] -> [N,M]; 0 where the union is empty."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def _nms_one(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, score_threshold: float) -> np.ndarray:
    """Greedy NMS for one image, as ONNX NonMaxSuppression: candidates need score > score_threshold,
    a box is suppressed by a higher-scoring kept box when IoU > iou_threshold."""
    keep = np.zeros(len(scores), dtype=bool)
    cand = np.nonzero(scores > score_threshold)[0]
    if len(cand) == 0:
        return keep
    order = cand[np.argsort(-scores[cand], kind="stable")]
    b = torch.from_numpy(boxes[order])
    # ONNX treats a box as any two opposite corners: normalise before measuring overlap.
    b = torch.cat([torch.min(b[:, :2], b[:, 2:]), torch.max(b[:, :2], b[:, 2:])], dim=1)
    iou = box_iou(b, b).numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep[order[i]] = True
        suppressed |= iou[i] > iou_threshold
    return keep


@torch.library.custom_op(f"{_NS}::nms_mask", mutates_args=())
def nms_mask(boxes: Tensor, scores: Tensor, iou_threshold: float, score_threshold: float) -> Tensor:
    """Per-image greedy NMS. boxes [B,S,4] (x1,y1,x2,y2), scores [B,S] -> keep mask [B,S] bool.

    Class-aware NMS is obtained by the caller offsetting each class's boxes into a disjoint region.
    """
    b = boxes.detach().float().cpu().numpy()
    s = scores.detach().float().cpu().numpy()
    out = (
        np.stack([_nms_one(b[i], s[i], iou_threshold, score_threshold) for i in range(b.shape[0])])
        if b.shape[0]
        else np.zeros(s.shape, bool)
    )
    return torch.from_numpy(out.reshape(s.shape)).to(scores.device)


@nms_mask.register_fake
def _(boxes: Tensor, scores: Tensor, iou_threshold: float, score_threshold: float) -> Tensor:
    return torch.empty_like(scores, dtype=torch.bool)


# ------------------------------------------------------------------------------------------ RoIAlign
def roi_align_reference(
    features: Tensor,
    rois: Tensor,
    spatial_scale: float,
    pooled_h: int,
    pooled_w: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """RoIAlign (torchvision / ONNX semantics, average mode, fixed sampling ratio), differentiable.

    features [B,C,H,W], rois [B,R,4] in image coordinates -> [B,R,C,pooled_h,pooled_w].
    Bilinear samples are taken with grid_sample on coordinates clamped the way torchvision's kernel
    clamps them (a sample in (-1, 0] reads the edge pixel; one beyond -1 or the size contributes 0),
    which is exact and keeps the reference fast and autograd-friendly for training.
    """
    bsz, chans, height, width = features.shape
    n_rois = rois.shape[1]
    offset = 0.5 if aligned else 0.0
    x1 = rois[..., 0] * spatial_scale - offset
    y1 = rois[..., 1] * spatial_scale - offset
    roi_w = rois[..., 2] * spatial_scale - offset - x1
    roi_h = rois[..., 3] * spatial_scale - offset - y1
    if not aligned:  # legacy behaviour: rois are at least 1x1 feature pixels
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    sr = sampling_ratio
    # Sample positions inside each bin: (bin index + (k + 0.5) / sr) * bin size, as in the kernel.
    iy = (
        torch.arange(pooled_h, dtype=features.dtype, device=features.device)[:, None]
        + (torch.arange(sr, dtype=features.dtype, device=features.device)[None, :] + 0.5) / sr
    ).reshape(-1)
    ix = (
        torch.arange(pooled_w, dtype=features.dtype, device=features.device)[:, None]
        + (torch.arange(sr, dtype=features.dtype, device=features.device)[None, :] + 0.5) / sr
    ).reshape(-1)
    ys = y1[..., None] + iy * (roi_h / pooled_h)[..., None]  # [B,R,ph*sr]
    xs = x1[..., None] + ix * (roi_w / pooled_w)[..., None]  # [B,R,pw*sr]
    valid_y = (ys >= -1.0) & (ys <= height)
    valid_x = (xs >= -1.0) & (xs <= width)
    ys = ys.clamp(0, height - 1)
    xs = xs.clamp(0, width - 1)
    # align_corners=True: normalised -1/+1 are the centres of the first/last pixels.
    gy = ys / max(height - 1, 1) * 2 - 1
    gx = xs / max(width - 1, 1) * 2 - 1
    ny, nx = gy.shape[-1], gx.shape[-1]
    grid = torch.stack(
        [gx[:, :, None, :].expand(-1, -1, ny, -1), gy[:, :, :, None].expand(-1, -1, -1, nx)], dim=-1
    )  # [B,R,ny,nx,2]
    grid = grid.reshape(bsz, n_rois * ny, nx, 2)
    sampled = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=True)
    weight = (valid_y[:, :, :, None] & valid_x[:, :, None, :]).to(features.dtype)  # [B,R,ny,nx]
    sampled = sampled.reshape(bsz, chans, n_rois, ny, nx) * weight[:, None]
    # Averaging each bin's sr x sr samples is a strided pooling (much faster than a strided mean).
    pooled = F.avg_pool2d(sampled.reshape(bsz, chans * n_rois, ny, nx), kernel_size=sr, stride=sr)
    return pooled.reshape(bsz, chans, n_rois, pooled_h, pooled_w).permute(0, 2, 1, 3, 4).contiguous()


@torch.library.custom_op(f"{_NS}::roi_align", mutates_args=())
def _roi_align_op(
    features: Tensor,
    rois: Tensor,
    spatial_scale: float,
    pooled_h: int,
    pooled_w: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    return roi_align_reference(features, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned)


@_roi_align_op.register_fake
def _(features, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned):
    return features.new_empty((features.shape[0], rois.shape[1], features.shape[1], pooled_h, pooled_w))


def roi_align(
    features: Tensor,
    rois: Tensor,
    spatial_scale: float,
    output_size: tuple[int, int],
    sampling_ratio: int = 2,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign over a fixed number of rois per image: [B,C,H,W], [B,R,4] -> [B,R,C,oh,ow].

    Training needs gradients through the features, which the opaque op does not provide, so the
    differentiable reference runs directly there; inference and export go through the custom op.
    """
    needs_grad = torch.is_grad_enabled() and (features.requires_grad or rois.requires_grad)
    if needs_grad and not torch.compiler.is_exporting():
        return roi_align_reference(
            features, rois, spatial_scale, output_size[0], output_size[1], sampling_ratio, aligned
        )
    return _roi_align_op(
        features,
        rois,
        float(spatial_scale),
        int(output_size[0]),
        int(output_size[1]),
        int(sampling_ratio),
        bool(aligned),
    )


# ------------------------------------------------------------------------------- ONNX translations
def onnx_translation_table() -> dict:
    """custom_translation_table for torch.onnx.export(dynamo=True): our ops -> native ONNX ops."""
    from onnxscript import opset18

    # Any: onnxscript types every op's output as the union of all tensor types, which no input accepts.
    op: Any = opset18

    def nms_mask_onnx(boxes, scores, iou_threshold: float, score_threshold: float):
        num_boxes = op.Shape(scores, start=1, end=2)
        selected = op.NonMaxSuppression(
            boxes,
            op.Unsqueeze(scores, op.Constant(value_ints=[1])),
            num_boxes,
            op.Constant(value_float=float(iou_threshold)),
            op.Constant(value_float=float(score_threshold)),
            center_point_box=0,
        )  # [K, 3] = (batch, class, box)
        index = op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)
        first = op.Gather(selected, op.Constant(value_int=0), axis=1)
        ones = op.Cast(op.Add(op.Mul(first, op.Constant(value_int=0)), op.Constant(value_int=1)), to=1)
        zeros = op.ConstantOfShape(op.Shape(scores))
        return op.Cast(op.ScatterND(zeros, index, ones), to=9)  # 9 = BOOL

    def roi_align_onnx(
        features, rois, spatial_scale: float, pooled_h: int, pooled_w: int, sampling_ratio: int, aligned: bool
    ):
        bsz = op.Shape(rois, start=0, end=1)
        n_rois = op.Shape(rois, start=1, end=2)
        flat = op.Reshape(rois, op.Constant(value_ints=[-1, 4]))
        batch_index = op.Range(op.Constant(value_int=0), op.Squeeze(bsz), op.Constant(value_int=1))
        batch_index = op.Reshape(
            op.Expand(op.Unsqueeze(batch_index, op.Constant(value_ints=[1])), op.Concat(bsz, n_rois, axis=0)),
            op.Constant(value_ints=[-1]),
        )
        pooled = op.RoiAlign(
            features,
            flat,
            batch_index,
            coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel",
            mode="avg",
            output_height=int(pooled_h),
            output_width=int(pooled_w),
            sampling_ratio=int(sampling_ratio),
            spatial_scale=float(spatial_scale),
        )  # [B*R, C, ph, pw]
        out_shape = op.Concat(bsz, n_rois, op.Shape(pooled, start=1), axis=0)
        return op.Reshape(pooled, out_shape)

    return {
        torch.ops.cnnserve.nms_mask.default: nms_mask_onnx,
        torch.ops.cnnserve.roi_align.default: roi_align_onnx,
    }
