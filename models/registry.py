"""A timm-style registry: each family module registers builder functions with what serving needs.

An entry knows its task, input shape, preprocessing, labels and where its trained weights come from,
so `export` can turn any registered name into a served artifact without per-model code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cnncore.spec import PreprocessSpec, Task

# The weights loader: given the freshly built module, fill it with trained weights (strict) and return
# a short human description of the source (recorded in model.json).
WeightsLoader = Callable[[nn.Module], str]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    task: Task
    input_shape: tuple[int, int, int]  # (C, H, W) the model is exported at; batch is dynamic
    preprocess: PreprocessSpec
    labels: Callable[[], Sequence[str]] | None = None
    weights: WeightsLoader | None = None  # None: architecture only, random init (never served by default)
    served_by_default: bool = False
    description: str = ""
    output_names: tuple[str, ...] = ("logits",)
    builder_kwargs: dict = field(default_factory=dict)
    # Export hooks, for models whose graphs need more than the defaults (detection):
    # custom_translation_table for the dynamo exporter (torch op -> onnxscript function) ...
    onnx_translation_table: Callable[[], dict] | None = None
    # ... sample inputs for parity, batch n -> tensor (default: random normal at input_shape) ...
    example_inputs: Callable[[int], torch.Tensor] | None = None
    # ... and a comparison of eager vs ONNX Runtime outputs (default: elementwise tolerance).
    parity_check: Callable[[dict, dict], dict] | None = None
    max_batch_size: int = 32
    # Parity tolerance relative to the output's largest magnitude, where the default (export/defaults.py)
    # is too tight: fp32 rounding differences between eager and ONNX Runtime kernels grow with depth.
    parity_rtol: float | None = None

    @property
    def has_weights(self) -> bool:
        return self.weights is not None


_REGISTRY: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> ModelEntry:
    if entry.name in _REGISTRY:
        raise ValueError(f"model {entry.name!r} registered twice")
    _REGISTRY[entry.name] = entry
    return entry


def list_models(*, served_by_default: bool | None = None, task: Task | None = None) -> list[str]:
    names = sorted(_REGISTRY)
    if served_by_default is not None:
        names = [n for n in names if _REGISTRY[n].served_by_default == served_by_default]
    if task is not None:
        names = [n for n in names if _REGISTRY[n].task == task]
    return names


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def get_model(name: str, weights: str | Path | None = "default") -> nn.Module:
    """Build `name` in eval mode.

    weights: "default" loads the entry's trained weights (error if it has none), None leaves the
    random initialisation, a path loads a user's state dict (torchvision layout) with strict=True.
    """
    entry = get_entry(name)
    model = entry.builder(**entry.builder_kwargs)
    if weights == "default":
        if entry.weights is None:
            raise ValueError(f"model {name!r} has no trained weights; pass weights=None for random init")
        entry.weights(model)
    elif weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        model.load_state_dict(load_state_dict_file(path), strict=True)
    return model.eval()


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors or a torch .pth/.pt state dict (weights_only: never unpickle code)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


IMAGENET_PREPROCESS = PreprocessSpec(
    input_size=(224, 224),
    resize="shorter_side_then_center_crop",
    resize_shorter_side=256,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)
