"""Train the Fashion-MNIST convolutional autoencoder and write its committed checkpoint.

    .venv/bin/python -m models.training.train_autoencoder [--epochs 2] [--out PATH]

Reproduces models/weights/autoencoder_fashion_mnist.safetensors (seeded; CPU, ~5 min per epoch on one contended core).
The loss is the reported metric itself: per-pixel MSE on [0,1] pixels. Augmentation is limited to
horizontal flips: a mirrored garment is still a plausible garment (the same class, even), whereas
rotations or vertical flips would teach the decoder upside-down shoes the test set never shows.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.autoencoder import LATENT_DIM, WEIGHTS_FILE, ConvAutoencoder, mean_image_baseline
from models.data import fashion_mnist


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    # Same arithmetic as the served PreprocessSpec (x / 255, mean 0, std 1) without PIL in the hot loop.
    return torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)


@torch.no_grad()
def evaluate_mse(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    total = 0.0
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        total += float(((model(x)[1] - x) ** 2).sum())
    return total / images.numel()


def train(epochs: int, batch_size: int, lr: float, seed: int, threads: int) -> tuple[ConvAutoencoder, dict[str, float]]:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    train_u8, _ = fashion_mnist.load("train")
    test_u8, _ = fashion_mnist.load("test")
    train_x, test_x = _to_tensor(train_u8), _to_tensor(test_u8)
    model = ConvAutoencoder(LATENT_DIM)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = len(train_x) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(train_x), generator=gen)
        running = 0.0
        for step in range(steps_per_epoch):
            x = train_x[perm[step * batch_size : (step + 1) * batch_size]]
            flip = torch.rand(len(x), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = nn.functional.mse_loss(model(x)[1], x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
            if (step + 1) % 100 == 0:
                print(
                    f"  epoch {epoch + 1} step {step + 1}/{steps_per_epoch} train mse {running / (step + 1):.5f}",
                    flush=True,
                )
        test_mse = evaluate_mse(model, test_x)
        print(
            f"epoch {epoch + 1}/{epochs}: train mse {running / steps_per_epoch:.5f}  test mse {test_mse:.5f}  "
            f"({time.time() - t0:.0f}s)",
            flush=True,
        )
    metrics = {
        "test_mse": evaluate_mse(model, test_x),
        "mean_image_baseline_mse": mean_image_baseline(train_u8, test_u8),
        "train_seconds": time.time() - t0,
    }
    return model.eval(), metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=WEIGHTS_FILE)
    args = parser.parse_args()
    model, metrics = train(args.epochs, args.batch_size, args.lr, args.seed, args.threads)
    from safetensors.torch import save_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    # fp32 is small here (~0.3 MB); BatchNorm running stats are part of the state dict.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out), metadata={k: f"{v:.6f}" for k, v in metrics.items()})
    print(
        f"test MSE {metrics['test_mse']:.5f} vs mean-image baseline {metrics['mean_image_baseline_mse']:.5f} "
        f"-> wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)"
    )


if __name__ == "__main__":
    main()
