"""CPU training recipe for the shipped detector (`shapes_detector`): Faster R-CNN on a MobileNetV2
backbone with ImageNet weights, fine-tuned on the synthetic shapes-on-textures data.

    python -m models.training.train_detector [--samples 2400] [--steps 1500] \
        [--out models/weights/detector_shapes.safetensors]

Why the recipe looks like this (2 shared CPU cores):
- The lower backbone (MobileNetV2 features 0-13, strides 2-16) keeps its ImageNet weights frozen and
  its features are computed once per training picture through ONNX Runtime (measured ~5x faster than
  eager PyTorch here) and cached in memory. The top of the backbone (features 14-17, stride 32), the
  FPN, the RPN and the box head are trained on them. Fine-tuning only the top of a pretrained CNN is
  the classic transfer-learning trade-off, and it turns hours of CPU into minutes.
- Augmentation happens when the pictures are made, so it is label-safe by construction: random
  picture sizes and aspect ratios letterboxed to the input size with the server's own preprocessing
  (scale + padding, boxes mapped exactly) and horizontal flips (boxes flipped). No rotation or colour
  change that could alter what a shape is (the generator already varies colour and orientation).
- BatchNorm statistics stay frozen (batches of 8 are too small to estimate them).
- One thread: on cores shared with other jobs, two-thread kernels were measured up to 15x slower
  than one (threads spin at barriers waiting for a descheduled sibling).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cnncore.preprocess import preprocess
from models.data.shapes import CLASSES, generate_sample

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "weights" / "detector_shapes.safetensors"
FROZEN_LAYERS = [str(i) for i in range(14)]  # MobileNetV2 features 0..13 (through stride 16)
TRAINED_BODY_LAYERS = ["14", "15", "16", "17"]


def training_picture(seed: int, spec, rng: np.random.Generator):
    """One augmented training example: (input [3,H,W] float32, boxes [n,4] in input pixels, labels)."""
    h = int(rng.integers(180, 400))
    w = int(h * rng.uniform(0.6, 1.6))
    sample = generate_sample(seed, (h, w))
    image = sample.image
    boxes = sample.boxes.copy()
    if rng.random() < 0.5:
        image = np.ascontiguousarray(image[:, ::-1])
        boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
    x, geom = preprocess(Image.fromarray(image), spec)
    boxes[:, 0::2] = boxes[:, 0::2] * geom.scale_x + geom.pad_x
    boxes[:, 1::2] = boxes[:, 1::2] * geom.scale_y + geom.pad_y
    return x, boxes.astype(np.float32), sample.labels


class _Stem(torch.nn.Module):
    """The frozen lower backbone, normalisation included; returns the stride-8 and stride-16 maps."""

    def __init__(self, model) -> None:
        super().__init__()
        self.transform = model.transform
        self.layers = torch.nn.ModuleList(model.backbone.body[k] for k in FROZEN_LAYERS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.transform(x)
        c3 = x
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == 6:
                c3 = x
        return c3, x


def stem_session(model, example: np.ndarray):
    """ONNX Runtime session for the frozen lower backbone: x -> (c3 stride 8, c4 stride 16)."""
    from cnncore.runtime import OrtSettings, ort_session

    stem = _Stem(model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stem.onnx"
        # The TorchScript exporter is enough for plain convolutions and exports in seconds.
        torch.onnx.export(
            stem,
            (torch.from_numpy(example),),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["c3", "c4"],
            dynamic_axes={"x": {0: "n"}},
        )
        return ort_session(path, OrtSettings(intra_op_threads=1, inter_op_threads=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1600, help="training pictures (cached features)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval", type=int, default=100, help="held-out pictures for the final PyTorch mAP")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    from models.detection import SHAPES_PREPROCESS, build_shapes_detector
    from models.detection.evaluate import evaluate_runner

    model = build_shapes_detector(pretrained_backbone=True)
    spec = SHAPES_PREPROCESS
    t0 = time.time()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as progress:
        # Training seeds: < 10**6, disjoint from the evaluation seeds.
        seeds = rng.choice(10**6, size=args.samples, replace=False)
        task = progress.add_task("pictures -> backbone features (frozen, ONNX Runtime)", total=args.samples, info="")
        session = None
        targets, c3s, c4s, chunk = [], [], [], []
        for n, s in enumerate(seeds):
            x, boxes, labels = training_picture(int(s), spec, rng)
            chunk.append(x)
            targets.append({"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels)})
            if len(chunk) == 16 or n == len(seeds) - 1:
                batch = np.stack(chunk)
                session = session or stem_session(model, batch[:2])
                c3, c4 = session.run(None, {"x": batch})
                c3s.append(c3.astype(np.float16))  # half the memory; well within fp16 range
                c4s.append(c4.astype(np.float16))
                progress.advance(task, len(chunk))
                chunk = []
        c3_all, c4_all = np.concatenate(c3s), np.concatenate(c4s)
        del c3s, c4s

        trained = [model.get_submodule(f"backbone.body.{k}") for k in TRAINED_BODY_LAYERS]
        for name, p in model.named_parameters():
            p.requires_grad_(not name.startswith("backbone.body.") or name.split(".")[2] in TRAINED_BODY_LAYERS)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
        warmup = min(100, args.steps // 10)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda i: (
                (i + 1) / warmup
                if i < warmup
                else 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, args.steps - warmup)))
            ),
        )
        model.train()
        for m in model.get_submodule("backbone.body").modules():  # frozen BatchNorm statistics (see module docstring)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
        task = progress.add_task("training", total=args.steps, info="")
        order = np.random.default_rng(args.seed + 1)
        running: dict[str, float] = {}
        for step in range(args.steps):
            idx = order.choice(args.samples, size=args.batch, replace=False)
            c3 = torch.from_numpy(c3_all[idx]).float()
            c4 = torch.from_numpy(c4_all[idx]).float()
            c5 = c4
            for layer in trained:
                c5 = layer(c5)
            features = model.get_submodule("backbone.fpn")(OrderedDict([("0", c3), ("1", c4), ("2", c5)]))
            losses = model.forward_features(features, [targets[i] for i in idx])
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            optimizer.step()
            schedule.step()
            for k, v in losses.items():
                running[k] = 0.95 * running.get(k, v.item()) + 0.05 * v.item()
            info = " ".join(f"{k[5:]}={v:.3f}" for k, v in running.items())
            progress.update(task, advance=1, info=info)
            if step % 25 == 0 or step == args.steps - 1:
                progress.console.log(f"step {step}/{args.steps} lr {schedule.get_last_lr()[0]:.2e} {info}")

    model.eval()
    train_minutes = (time.time() - t0) / 60

    def torch_runner(x: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = model(torch.from_numpy(x))
        return {n: o.numpy() for n, o in zip(("num_detections", "boxes", "scores", "labels"), out, strict=True)}

    metrics = evaluate_runner(torch_runner, spec, len(CLASSES), n=args.eval) if args.eval else {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    # fp16 halves the committed file; the loader casts back to fp32 (the difference is far below
    # what the detector's thresholds notice, and the export is checked against the loaded model).
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    save_file(
        state,
        str(args.out),
        metadata={
            "recipe": "models/training/train_detector.py",
            "args": str(vars(args)),
            "train_minutes": f"{train_minutes:.1f}",
            "mAP50_torch": str(metrics.get("mAP50")),
        },
    )
    print(
        f"trained in {train_minutes:.1f} min; PyTorch mAP@0.5 on {args.eval} held-out pictures: "
        f"{metrics.get('mAP50', float('nan')):.4f}; wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
