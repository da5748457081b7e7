"""Classic CNNs written in plain PyTorch, with torchvision-compatible state-dict keys.

Importing the package registers every family; `list_models()` / `get_model()` are the entry points.
"""
from models.registry import ModelEntry, get_entry, get_model, list_models, register

# Each family registers its builders on import. A family that is not written yet is simply absent.
import importlib as _importlib

for _family in (
    "models.alexnet",
    "models.vgg",
    "models.resnet",
    "models.cifar_resnet",
    "models.mobilenetv2",
    "models.detection",
    "models.segmentation",
    "models.autoencoder",
):
    try:
        _importlib.import_module(_family)
    except ModuleNotFoundError as _exc:  # only tolerate the family module itself being absent
        if _exc.name != _family:
            raise

__all__ = ["ModelEntry", "get_entry", "get_model", "list_models", "register"]
