"""The model repository format: the one thing the offline half (export) and the serving half share.

Torch-free on purpose: the server imports it, and a serving image carries no PyTorch.
"""

from cnncore.spec import ModelMeta, PreprocessSpec, Task

__all__ = ["ModelMeta", "PreprocessSpec", "Task"]
