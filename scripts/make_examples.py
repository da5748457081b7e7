"""Write the README's example pictures: a real photo (scikit-image's chelsea, a cat) and a generated
shapes picture with its ground truth, so the first requests need nothing from the internet."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("examples"))
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from skimage import data

    Image.fromarray(data.chelsea()).save(args.out / "chelsea.jpg", quality=92)

    from models.data.shapes import CLASSES, generate_sample

    sample = generate_sample(args.seed, size=(320, 320))
    Image.fromarray(sample.image).save(args.out / "shapes.png")
    truth = [
        {"label": CLASSES[int(label) - 1], "box": [round(float(v), 1) for v in box]}
        for box, label in zip(sample.boxes, sample.labels, strict=True)
    ]
    (args.out / "shapes.truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    print(f"wrote {args.out}/chelsea.jpg, {args.out}/shapes.png (+ shapes.truth.json)")


if __name__ == "__main__":
    main()
