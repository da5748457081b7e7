"""Encoder-decoder semantic segmentation: an ImageNet-pretrained MobileNetV2 encoder, a light decoder.

Design.
- Encoder: the zoo's MobileNetV2 `features` (torchvision layout), trained on ImageNet, reused as the
  feature extractor (the shipped recipe fine-tunes its stride-32 stage). Its stride-32 output knows
  *what* is in the picture (a star, not a cross) but has lost *where* the boundaries are: every stride-2
  stage throws away three quarters of the positions, and no decoder can invent them back from 1/32
  resolution.
- Skip connections (U-Net style, optional): the decoder upsamples one stage at a time and concatenates
  the encoder's feature map of the same resolution (strides 16, 8, 4, 2), which still carries precise
  edges; a 3x3 conv then fuses "what" (from below) with "where" (from the skip). Without skips the
  decoder upsamples the coarse map alone and boundaries come out blurred to the 32-pixel grid.
- Upsampling, selectable:
  * "bilinear": fixed interpolation, no parameters, cannot produce artefacts; all learning happens in
    the convolutions after it.
  * "transposed": a learned 4x4, stride-2 transposed convolution per stage. When the kernel size is not
    divisible by the stride (k=3, s=2), neighbouring outputs receive unequal numbers of kernel taps and
    the output shows checkerboard artefacts (Odena et al., 2016); k=4, s=2 overlaps evenly. The kernels
    start as bilinear interpolation (per channel, as in FCN), so training begins from the bilinear
    decoder's behaviour instead of from noise.
- Cost: the decoder fuses and classifies at stride 2 (the finest skip) and the last 2x upsampling acts
  on the few class-logit channels, so nothing wide runs at full resolution.
- Any input size works: each upsampled map is cropped to its skip's size (a stride-2 conv rounds up,
  so 2x upsampling can overshoot by one pixel), and the last stage to the input size. With the
  spatial size fixed at export and only the batch dynamic, those sizes are constants in the ONNX graph
  (Resize with constant scales, static Slice), which TensorRT builds without shape arithmetic.

Output: per-pixel class logits [N, num_classes, H, W] at the input resolution.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

Upsampling = Literal["bilinear", "transposed"]

# MobileNetV2 `features` indices whose outputs feed the decoder: the last block at each stride.
# (index, stride, channels): 1 -> s2/16ch, 3 -> s4/24ch, 6 -> s8/32ch, 13 -> s16/96ch, 17 -> s32/320ch.
# features[18] (the 1x1 expansion to 1280 channels for the ImageNet classifier) is dropped: it costs
# 410k parameters and adds no spatial information.
MOBILENET_V2_TAPS: tuple[tuple[int, int, int], ...] = ((1, 2, 16), (3, 4, 24), (6, 8, 32), (13, 16, 96), (17, 32, 320))


def transposed_conv_output_size(
    size: int, kernel_size: int, stride: int = 1, padding: int = 0, output_padding: int = 0, dilation: int = 1
) -> int:
    """Output length of a transposed convolution along one axis (PyTorch / ONNX ConvTranspose)."""
    return (size - 1) * stride - 2 * padding + dilation * (kernel_size - 1) + output_padding + 1


def bilinear_kernel(channels: int, kernel_size: int) -> torch.Tensor:
    """[channels, 1, k, k] weights that make a depthwise-style transposed conv bilinear upsampling."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = torch.arange(kernel_size, dtype=torch.float32)
    filt = 1 - (og - center).abs() / factor
    return (filt[:, None] * filt[None, :]).expand(channels, 1, kernel_size, kernel_size).clone()


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Upsample2x(nn.Module):
    """Doubles H and W, then crops (or, for bilinear, resizes) to `size` when the caller needs it."""

    def __init__(self, channels: int, mode: Upsampling) -> None:
        super().__init__()
        if mode not in ("bilinear", "transposed"):
            raise ValueError(f"upsampling must be 'bilinear' or 'transposed', got {mode!r}")
        self.mode = mode
        if mode == "transposed":
            # 4x4 / stride 2 / pad 1: out = (in - 1) * 2 - 2 + 4 = 2 * in, even overlap (4 % 2 == 0).
            self.up = nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1, bias=False)
            with torch.no_grad():
                # Start as per-channel bilinear interpolation (identity across channels).
                self.up.weight.zero_()
                kernel = bilinear_kernel(channels, 4)[:, 0]
                idx = torch.arange(channels)
                self.up.weight[idx, idx] = kernel

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.mode == "bilinear":
            if (2 * h, 2 * w) == tuple(size):
                # Constant scale factors export as a static ONNX Resize (TensorRT-friendly).
                return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        y = self.up(x)
        if y.shape[-2] < size[0] or y.shape[-1] < size[1]:
            raise ValueError(f"cannot upsample {tuple(x.shape[-2:])} to {tuple(size)} with one 2x stage")
        return y[:, :, : size[0], : size[1]]


class EncoderDecoderSegmenter(nn.Module):
    """MobileNetV2 encoder + U-Net-style decoder (optional skips, selectable upsampling).

    The decoder works up to stride 2 (the finest encoder skip) and classifies there; the last 2x
    upsampling acts on the class logits, which are few channels, so full-resolution work stays cheap.
    """

    def __init__(
        self,
        num_classes: int,
        upsampling: Upsampling = "bilinear",
        skips: bool = True,
        pretrained_encoder: bool = False,
        decoder_channels: tuple[int, ...] = (64, 48, 32, 24, 16),
    ) -> None:
        super().__init__()
        # Imported here: the zoo package imports this family module while it registers models.
        import models

        if len(decoder_channels) != len(MOBILENET_V2_TAPS):
            raise ValueError(f"decoder_channels needs {len(MOBILENET_V2_TAPS)} entries (stride 32 down to 2)")
        backbone = models.get_model("mobilenet_v2", weights="default" if pretrained_encoder else None)
        self.tap_indices = tuple(i for i, _, _ in MOBILENET_V2_TAPS)
        self.encoder = nn.Sequential(*list(backbone.get_submodule("features").children())[: self.tap_indices[-1] + 1])
        self.upsampling = upsampling
        self.skips = skips
        # 1x1 projection of the 320-channel stride-32 map: keeps the upsamplers and 3x3 fusions small.
        self.project = nn.Sequential(
            nn.Conv2d(MOBILENET_V2_TAPS[-1][2], decoder_channels[0], 1, bias=False),
            nn.BatchNorm2d(decoder_channels[0]),
            nn.ReLU(inplace=True),
        )
        # Stage k upsamples stride 2^(5-k) to 2^(4-k) and fuses the encoder tap at that stride.
        skip_channels = [c for _, _, c in reversed(MOBILENET_V2_TAPS[:-1])]
        self.ups = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for cin, cout, cskip in zip(decoder_channels[:-1], decoder_channels[1:], skip_channels, strict=True):
            self.ups.append(Upsample2x(cin, upsampling))
            self.fuse.append(_conv_bn_relu(cin + (cskip if skips else 0), cout))
        self.classifier = nn.Conv2d(decoder_channels[-1], num_classes, 1)
        self.final_up = Upsample2x(num_classes, upsampling)

    def encode(
        self, x: torch.Tensor, start: int = 0, taps: list[torch.Tensor] | None = None, stop: int | None = None
    ) -> list[torch.Tensor]:
        """Run encoder layers start..stop (inclusive) on `x` (the output of layer start-1, or the image).

        Returns `taps` extended with the outputs of the tap layers it ran. Split so that training can
        cache the frozen early layers' taps and resume from there.
        """
        taps = list(taps or [])
        stop = len(self.encoder) - 1 if stop is None else stop
        for i in range(start, stop + 1):
            x = self.encoder[i](x)
            if i in self.tap_indices:
                taps.append(x)
        return taps

    def decode(self, taps: list[torch.Tensor], output_size: tuple[int, int]) -> torch.Tensor:
        """Encoder taps (strides 2..32, in that order) -> logits [N, C, *output_size]."""
        x = self.project(taps[-1])
        for up, fuse, skip in zip(self.ups, self.fuse, reversed(taps[:-1]), strict=True):
            x = up(x, (skip.shape[-2], skip.shape[-1]))
            if self.skips:
                x = torch.cat([x, skip], dim=1)
            x = fuse(x)
        return self.final_up(self.classifier(x), output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), (x.shape[-2], x.shape[-1]))
