"""Optimization-profile shapes for an engine, derived from the model's config.pbtxt (CPU-testable)."""

from __future__ import annotations

from collections.abc import Sequence

from cnncore.engine_manifest import ProfileShapes
from export.tensorrt.errors import BuildError


def derive_profile(
    dims: Sequence[int], max_batch_size: int, preferred_batch_sizes: Sequence[int] = ()
) -> ProfileShapes:
    """Optimization-profile shapes for one input from its config.pbtxt entry.

    dims: the per-request dims from config.pbtxt (no batch dimension when max_batch_size > 0).
    The batch range is [1, max_batch_size]; TensorRT tunes kernels for `opt`, so opt is the batch the
    dynamic batcher aims for: the largest preferred batch size within range, else max_batch_size
    (a saturated batcher executes full batches).
    """
    dims = tuple(int(d) for d in dims)
    if any(d <= 0 for d in dims):
        raise BuildError(
            f"input dims {list(dims)} have a variable (-1) or empty dimension besides the batch: "
            "a TensorRT profile needs fixed sizes; export the model at a fixed input size"
        )
    if max_batch_size < 0:
        raise BuildError(f"max_batch_size must be >= 0, got {max_batch_size}")
    if max_batch_size == 0:  # Triton: no batching, dims are the full shape
        return ProfileShapes(min=dims, opt=dims, max=dims)
    preferred = [int(b) for b in preferred_batch_sizes if 1 <= int(b) <= max_batch_size]
    opt = max(preferred) if preferred else max_batch_size
    return ProfileShapes(min=(1, *dims), opt=(opt, *dims), max=(max_batch_size, *dims))


def profiles_from_config(config) -> dict[str, ProfileShapes]:  # config: protos.model_config_pb2.ModelConfig
    preferred = list(config.dynamic_batching.preferred_batch_size) if config.HasField("dynamic_batching") else []
    return {inp.name: derive_profile(inp.dims, config.max_batch_size, preferred) for inp in config.input}
