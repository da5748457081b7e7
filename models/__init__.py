"""Classic CNNs written in plain PyTorch, with torchvision-compatible state-dict keys.

Importing the package registers every family; `list_models()` / `get_model()` are the entry points.
"""

# Each family registers its builders on import (timm-style), so importing them is the registration.
from models import alexnet, autoencoder, cifar_resnet, detection, mobilenetv2, resnet, segmentation, vgg  # noqa: F401
from models.registry import ModelEntry, get_entry, get_model, list_models, register

__all__ = ["ModelEntry", "get_entry", "get_model", "list_models", "register"]
