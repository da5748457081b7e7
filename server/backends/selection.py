"""Which backend a model's config.pbtxt asks for, with Triton's spelling of the choice.

    platform "tensorrt_plan" | backend "tensorrt"          -> native TensorRT engine (trt_engine.py)
    platform "onnxruntime_onnx" | backend "onnxruntime"    -> ONNX Runtime (ort_backend.py), and its
        execution providers from optimization { execution_accelerators { gpu_execution_accelerator
        [{ name: "tensorrt" }] | [{ name: "cuda" }] } } or an instance_group of KIND_GPU
    platform "pytorch_libtorch" | backend "pytorch"        -> the torch.export program (torch_program.py)

The choice is made from the config alone, before anything heavy is imported; what the machine lacks
(an ONNX Runtime build without the CUDA provider, no TensorRT, no GPU) is reported as BackendUnavailable
for that model, with the fix, so the loader fails it and keeps serving the others.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from server.backends.base import BackendOptions, BackendUnavailable

# Triton's instance_group kinds (protos/model_config.proto ModelInstanceGroup.Kind), by value so this
# module does not need the generated code.
KIND_AUTO, KIND_GPU, KIND_CPU, KIND_MODEL = 0, 1, 2, 3

_PLATFORMS = {
    "tensorrt_plan": "tensorrt",
    "onnxruntime_onnx": "onnxruntime",
    "pytorch_libtorch": "pytorch",
}
_DEFAULT_FILES = {"onnxruntime": "model.onnx", "pytorch": "model.pt2", "tensorrt": ""}
# ONNX Runtime provider names for Triton's accelerator names.
_ORT_GPU_ACCELERATORS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass(frozen=True)
class BackendChoice:
    kind: str  # a name registered in server.backends.base
    model_file: Path  # for tensorrt without default_model_filename: the version directory (engines.json picks)
    options: BackendOptions

    def option(self, key: str, default: str | None = None) -> str | None:
        return dict(self.options.extra).get(key, default)


def backend_kind(config) -> str:
    """The backend name the config asks for; the ONNX Runtime default when it names none."""
    platform, backend = config.platform.strip(), config.backend.strip()
    if backend:
        if backend not in _DEFAULT_FILES:
            raise BackendUnavailable(f"model {config.name!r}: unknown backend {backend!r} "
                                     f"(this server has: {', '.join(sorted(_DEFAULT_FILES))})")
        if platform and _PLATFORMS.get(platform) not in (None, backend):
            raise BackendUnavailable(f"model {config.name!r}: platform {platform!r} contradicts backend {backend!r}")
        return backend
    if platform:
        if platform not in _PLATFORMS:
            raise BackendUnavailable(f"model {config.name!r}: unsupported platform {platform!r} "
                                     f"(this server has: {', '.join(sorted(_PLATFORMS))})")
        return _PLATFORMS[platform]
    return "onnxruntime"


def _instance_kind_and_gpu(config, default_device: int) -> tuple[int, int]:
    if not config.instance_group:
        return KIND_AUTO, default_device
    group = config.instance_group[0]
    return int(group.kind), (int(group.gpus[0]) if group.gpus else default_device)


def ort_execution_providers(config, device_id: int = 0) -> list[tuple[str, dict[str, str]]]:
    """ONNX Runtime providers (name, options) in priority order, CPU always last as the fallback for
    operators a GPU provider does not take. Triton's TensorRT accelerator parameters are translated
    to the provider's option names."""
    providers: list[tuple[str, dict[str, str]]] = []
    accelerators = list(config.optimization.execution_accelerators.gpu_execution_accelerator)
    kind, _ = _instance_kind_and_gpu(config, device_id)
    for acc in accelerators:
        name = acc.name.strip().lower()
        if name not in _ORT_GPU_ACCELERATORS:
            raise BackendUnavailable(f"model {config.name!r}: unknown gpu_execution_accelerator {acc.name!r} "
                                     f"(supported: {', '.join(_ORT_GPU_ACCELERATORS)})")
        params = dict(acc.parameters)
        opts: dict[str, str] = {"device_id": str(device_id)}
        if name == "tensorrt":
            if params.get("precision_mode", "FP32").upper() == "FP16":
                opts["trt_fp16_enable"] = "True"
            if "max_workspace_size_bytes" in params:
                opts["trt_max_workspace_size"] = params["max_workspace_size_bytes"]
            if params.get("trt_engine_cache_enable", "").lower() == "true":
                opts["trt_engine_cache_enable"] = "True"
                opts["trt_engine_cache_path"] = params.get("trt_engine_cache_path", "/tmp/ort_trt_cache")
        providers.append((_ORT_GPU_ACCELERATORS[name], opts))
    if accelerators and all(p != "CUDAExecutionProvider" for p, _ in providers):
        # The TensorRT provider hands unsupported subgraphs to CUDA before CPU.
        providers.append(("CUDAExecutionProvider", {"device_id": str(device_id)}))
    if not accelerators and kind == KIND_GPU:
        providers.append(("CUDAExecutionProvider", {"device_id": str(device_id)}))
    providers.append(("CPUExecutionProvider", {}))
    return providers


def check_ort_providers(providers: list[tuple[str, dict[str, str]]], model: str,
                        available: list[str] | None = None) -> None:
    """BackendUnavailable naming what is missing, instead of ONNX Runtime's silent CPU fallback (which
    would serve a 'GPU' model at a fraction of the expected speed without anyone noticing)."""
    if available is None:
        import onnxruntime

        available = onnxruntime.get_available_providers()
    missing = [name for name, _ in providers if name not in available]
    if missing:
        raise BackendUnavailable(f"model {model!r} asks for ONNX Runtime's {', '.join(missing)}, but this "
                                 f"onnxruntime build offers only {', '.join(available)}: install onnxruntime-gpu "
                                 "(with CUDA/TensorRT libraries) or remove the GPU accelerator from config.pbtxt")


def select_backend(config, version_dir: Path, base: BackendOptions = BackendOptions(),
                   available_ort_providers: list[str] | None = None) -> BackendChoice:
    """The backend, model file and options for one model version, or BackendUnavailable."""
    kind = backend_kind(config)
    version_dir = Path(version_dir)
    filename = config.default_model_filename.strip() or _DEFAULT_FILES[kind]
    model_file = version_dir / filename if filename else version_dir
    instance_kind, device_id = _instance_kind_and_gpu(config, base.device_id)
    extra = dict(base.extra)
    if kind == "onnxruntime":
        providers = ort_execution_providers(config, device_id)
        check_ort_providers(providers, config.name, available_ort_providers)
        extra["providers"] = json.dumps(providers)
    elif kind == "pytorch":
        if instance_kind == KIND_CPU:
            extra["device"] = "cpu"
        elif instance_kind == KIND_GPU:
            extra["device"] = "cuda"
        else:  # KIND_AUTO, Triton's meaning: a GPU when there is one
            extra["device"] = "cuda" if _torch_has_cuda() else "cpu"
    elif kind == "tensorrt" and instance_kind == KIND_CPU:
        raise BackendUnavailable(f"model {config.name!r}: a TensorRT engine cannot run on instance kind KIND_CPU")
    return BackendChoice(kind, model_file, replace(base, device_id=device_id, extra=tuple(sorted(extra.items()))))


def _torch_has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()
