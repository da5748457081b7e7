"""The model repository loader: Triton's layout, one failure never takes the others down.

    <repo>/<model>/config.pbtxt          ModelConfig (text); name must match the directory (or be empty)
    <repo>/<model>/model.json            optional: task, labels, preprocessing (cnncore.spec.ModelMeta)
    <repo>/<model>/<version>/model.onnx  numbered versions; config.default_model_filename overrides the name

Version policy as Triton: latest (1 by default), all, or specific. Each served version gets its own
backend instances (instance_group counts) and its own batcher. Loading builds backends in a worker
thread (ONNX Runtime session creation takes seconds for big graphs) so the server keeps answering.
A model that fails to load is recorded UNAVAILABLE with the reason; RepositoryIndex shows it.
Its `model_warmup` samples (server/warmup.py) run on every instance inside that load, while the model
is still LOADING: a model turns READY, and the server ready at start, only warmed up.

Config parameter `execution_timeout_ms` (string, milliseconds; absent or 0: no limit) bounds one backend
execution: a model whose execution overruns it turns UNAVAILABLE with the reason (its batcher failed the
requests; server/batcher.py) while every other model keeps serving; RepositoryModelLoad loads it afresh.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from pydantic import ValidationError

from cnncore.artifacts import ONNX_FILENAME, PLAN_FILENAME, PROGRAM_FILENAME
from cnncore.config import CONFIG_FILENAME, ConfigError, load_config
from cnncore.datatypes import from_config, from_numpy, to_config
from cnncore.layout import version_numbers
from cnncore.spec import META_FILENAME, ModelMeta
from protos import model_config_pb2 as mc
from server import backends as _backends  # noqa: F401  (registers the backends)
from server import heap, variant_choice, warmup
from server.backends.base import (
    Backend,
    BackendOptions,
    BackendUnavailable,
    TensorSpec,
    available_backends,
    create_backend,
)
from server.dataplane.classification import read_labels
from server.dataplane.model import ServedModel
from server.dataplane.names import check_model_name, parse_version
from server.errors import InferError, echo, not_found, unavailable
from server.model_overrides import LoadOverride
from server.scheduling.batcher import BatchSettings, DynamicBatcher
from server.stats import ModelStats

log = logging.getLogger("cnnserve.repository")

# config `platform` -> backend name, and what each backend reports as platform / looks for on disk.
_PLATFORM_BACKEND = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt", "pytorch_libtorch": "pytorch"}
_BACKEND_PLATFORM = {v: k for k, v in _PLATFORM_BACKEND.items()}
_DEFAULT_FILENAME = {
    "onnxruntime": ONNX_FILENAME,
    "tensorrt": PLAN_FILENAME,
    "pytorch": PROGRAM_FILENAME,
    "openvino": ONNX_FILENAME,
}
# beside the models: compiled artifacts the backends keep between loads (never listed as a model)
CACHE_DIRNAME = ".cache"
# models loading at once at start: loading is mostly native code (graph conversion, compiling) that
# releases the GIL, so a few overlap well; more would only contend for the same cores
PARALLEL_LOADS = 4


class LoadError(RuntimeError):
    """Why one model could not be loaded; the message names the model and the file at fault."""


@dataclass
class ModelState:
    name: str
    state: str = "UNAVAILABLE"  # READY | UNAVAILABLE | LOADING | UNLOADING (RepositoryIndex strings)
    reason: str = ""
    versions: dict[int, ServedModel] = field(default_factory=dict)


@dataclass(frozen=True)
class RuntimeDefaults:
    """Server-wide defaults that a model's config.pbtxt parameters may override."""

    intra_op_threads: int = 0
    inter_op_threads: int = 0
    allow_spinning: bool = False  # ONNX Runtime intra-op spin-waiting (config intra_op_allow_spinning wins)


@dataclass
class _Built:
    version: int
    config: mc.ModelConfig
    meta: ModelMeta | None
    instances: list[Backend]
    settings: BatchSettings
    platform: str
    labels: dict[str, list[str]] = field(default_factory=dict)  # output -> class labels (label_filename)


def _backend_name(cfg: mc.ModelConfig, model_dir: Path) -> str:
    if cfg.backend:
        return cfg.backend
    if cfg.platform:
        if cfg.platform not in _PLATFORM_BACKEND:
            raise LoadError(
                f"{model_dir / CONFIG_FILENAME}: unknown platform {cfg.platform!r} "
                f"(known: {', '.join(_PLATFORM_BACKEND)})"
            )
        return _PLATFORM_BACKEND[cfg.platform]
    for backend, filename in _DEFAULT_FILENAME.items():  # Triton's auto-complete: guess from the files
        if any(model_dir.glob(f"*/{filename}")):
            return backend
    raise LoadError(f"{model_dir / CONFIG_FILENAME}: neither backend nor platform set, and no known model file found")


def _select_versions(cfg: mc.ModelConfig, model_dir: Path) -> list[int]:
    on_disk = version_numbers(model_dir)
    if not on_disk:
        raise LoadError(f"{model_dir}: no numbered version directories")
    policy = cfg.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return on_disk
    if choice == "specific":
        wanted = list(policy.specific.versions)
        absent = [v for v in wanted if v not in on_disk]
        if absent:
            raise LoadError(f"{model_dir}: version_policy asks for version(s) {absent}, not on disk (have {on_disk})")
        return sorted(wanted)
    n = policy.latest.num_versions if choice == "latest" and policy.latest.num_versions else 1
    return on_disk[-n:]


def _check_io(cfg_specs: Iterable, backend_specs: list[TensorSpec], kind: str, where: str) -> None:
    by_name = {s.name: s for s in backend_specs}
    cfg_names = set()
    for t in cfg_specs:
        cfg_names.add(t.name)
        if t.name not in by_name:
            raise LoadError(f"{where}: config {kind} '{t.name}' is not in the model (model has {sorted(by_name)})")
        b = by_name[t.name]
        want, have = from_config(t.data_type), from_numpy(b.dtype)
        if want != have:
            raise LoadError(f"{where}: {kind} '{t.name}': config says {want}, model has {have}")
        dims = list(t.dims)
        if len(dims) != len(b.shape) or any(c != -1 and m != -1 and c != m for c, m in zip(dims, b.shape, strict=True)):
            raise LoadError(f"{where}: {kind} '{t.name}': config dims {dims} do not match the model's {list(b.shape)}")
    if kind == "input" and cfg_names != set(by_name):
        raise LoadError(f"{where}: model inputs {sorted(by_name)} differ from config inputs {sorted(cfg_names)}")


def _complete(cfg: mc.ModelConfig, backend: Backend, where: str) -> None:
    """Fill inputs/outputs the config leaves out from the model (Triton's auto-complete), check the rest."""
    if not cfg.input:
        for s in backend.inputs:
            cfg.input.add(name=s.name, data_type=to_config(from_numpy(s.dtype)), dims=list(s.shape))
    if not cfg.output:
        for s in backend.outputs:
            cfg.output.add(name=s.name, data_type=to_config(from_numpy(s.dtype)), dims=list(s.shape))
    _check_io(cfg.input, backend.inputs, "input", where)
    _check_io(cfg.output, backend.outputs, "output", where)


def _options(cfg: mc.ModelConfig, defaults: RuntimeDefaults) -> tuple[BackendOptions, int]:
    params = {k: v.string_value for k, v in cfg.parameters.items()}

    def int_param(key: str, default: int) -> int:
        if key not in params:
            return default
        try:
            return int(params[key])
        except ValueError:
            raise LoadError(f"config parameter {key} must be an integer, got {params[key]!r}") from None

    groups = list(cfg.instance_group) or [mc.ModelInstanceGroup(count=1)]
    count = sum(g.count if g.count > 0 else 1 for g in groups)
    gpu = any(g.kind == mc.ModelInstanceGroup.KIND_GPU for g in groups)
    device_id = next((g.gpus[0] for g in groups if g.gpus), 0)
    accel = cfg.optimization.execution_accelerators
    accelerators = tuple(
        (a.name, tuple(sorted(a.parameters.items())))
        for a in list(accel.gpu_execution_accelerator) + list(accel.cpu_execution_accelerator)
    )
    options = BackendOptions(
        intra_op_threads=int_param("intra_op_thread_count", defaults.intra_op_threads),
        inter_op_threads=int_param("inter_op_thread_count", defaults.inter_op_threads),
        device_id=device_id,
        extra=tuple(sorted({"intra_op_allow_spinning": "1" if defaults.allow_spinning else "0", **params}.items())),
        batched=cfg.max_batch_size > 0,
        device_kind="gpu" if gpu else "cpu",
        accelerators=accelerators,
        cuda_graphs=cfg.optimization.cuda.graphs,
        max_batch_size=cfg.max_batch_size,
    )
    return options, count


EXECUTION_TIMEOUT_PARAM = "execution_timeout_ms"


def _settings(cfg: mc.ModelConfig) -> BatchSettings:
    db = cfg.dynamic_batching
    timeout = cfg.parameters[EXECUTION_TIMEOUT_PARAM].string_value if EXECUTION_TIMEOUT_PARAM in cfg.parameters else "0"
    if not (timeout.isascii() and timeout.isdigit()) or len(timeout) > 12:
        raise LoadError(
            f"config parameter {EXECUTION_TIMEOUT_PARAM} must be a whole number of milliseconds "
            f"(0 = no limit), got {timeout[:40]!r}"
        )
    return BatchSettings(
        max_batch_size=cfg.max_batch_size,
        dynamic=cfg.HasField("dynamic_batching") and cfg.max_batch_size > 0,
        preferred_batch_sizes=tuple(db.preferred_batch_size),
        max_queue_delay_us=db.max_queue_delay_microseconds,
        max_queue_size=db.default_queue_policy.max_queue_size,
        default_timeout_us=db.default_queue_policy.default_timeout_microseconds,
        execution_timeout_ms=int(timeout),
    )


def build_model(model_dir: Path, defaults: RuntimeDefaults, override: LoadOverride | None = None) -> list[_Built]:
    """Blocking: parse and check the config (or take the load's override), create every selected
    version's backend instances."""
    if override is not None and override.files:  # the override's files are the model directory
        with override.materialized(model_dir.name) as files_dir:
            try:
                return build_model(files_dir, defaults, LoadOverride(override.config))
            except LoadError as exc:  # name the request's files, not the server's temporary directory
                raise LoadError(str(exc).replace(str(files_dir), f"<{model_dir.name}: load request files>")) from None
    name = model_dir.name
    try:
        given = override.config_copy() if override is not None else None
        cfg = given if given is not None else load_config(model_dir)
    except ConfigError as exc:
        raise LoadError(str(exc)) from None
    if cfg.name and cfg.name != name:
        raise LoadError(f"{model_dir / CONFIG_FILENAME}: config name {cfg.name!r} differs from directory {name!r}")
    cfg.name = name
    if cfg.max_batch_size < 0:
        raise LoadError(f"{model_dir / CONFIG_FILENAME}: max_batch_size must be >= 0")
    meta = None
    if (model_dir / META_FILENAME).exists():
        try:
            meta = ModelMeta.read(model_dir)
        except (ValidationError, ValueError) as exc:
            raise LoadError(f"{model_dir / META_FILENAME}: invalid model metadata: {exc}") from None
    variant_choice.apply(cfg, meta, name)  # another gated variant where this CPU's flags differ from export's
    backend = _backend_name(cfg, model_dir)
    if backend not in available_backends():
        raise LoadError(
            f"{model_dir / CONFIG_FILENAME}: unknown backend {backend!r}; available: {', '.join(available_backends())}"
        )
    if not cfg.backend and not cfg.platform:
        cfg.backend = backend
    platform = cfg.platform or _BACKEND_PLATFORM.get(backend, backend)
    filename = cfg.default_model_filename or _DEFAULT_FILENAME.get(backend, "model")
    try:
        options, count = _options(cfg, defaults)
        options = replace(options, cache_dir=model_dir.parent / CACHE_DIRNAME)
        settings = _settings(cfg)
    except LoadError as exc:
        raise LoadError(f"{model_dir / CONFIG_FILENAME}: {exc}") from None
    built: list[_Built] = []
    try:
        for version in _select_versions(cfg, model_dir):
            path = model_dir / str(version) / filename
            if backend == "tensorrt" and not cfg.default_model_filename:
                # The version directory: its engines.json picks the engine built for this GPU and
                # TensorRT, or refuses clearly (server/backends/trt_engine.py).
                path = path.parent
            if not path.exists():
                raise LoadError(f"{path}: model file not found")
            vcfg = mc.ModelConfig()
            vcfg.CopyFrom(cfg)
            instances: list[Backend] = []
            built.append(_Built(version, vcfg, meta, instances, settings, platform))
            for _ in range(count):
                try:
                    instances.append(create_backend(backend, path, options))
                except BackendUnavailable as exc:
                    raise LoadError(
                        f"model '{name}' version {version}: backend {backend!r} unavailable: {exc}"
                    ) from None
                except Exception as exc:  # a corrupt file or an unsupported graph fails this model only
                    raise LoadError(f"model '{name}' version {version}: {exc}") from None
            _complete(vcfg, instances[0], str(path))
            try:
                built[-1].labels = read_labels(vcfg, model_dir)
            except ValueError as exc:
                raise LoadError(f"model '{name}': {exc}") from None
            if vcfg.model_warmup:
                t0 = time.perf_counter()
                try:
                    runs = warmup.run(vcfg, instances, model_dir)
                except warmup.WarmupError as exc:
                    raise LoadError(f"model '{name}' version {version}: {exc}") from None
                log.info(
                    "model warmed up",
                    extra={
                        "model": name,
                        "version": version,
                        "executions": runs,
                        "ms": round((time.perf_counter() - t0) * 1000, 1),
                    },
                )
    except BaseException:
        for b in built:
            for inst in b.instances:
                inst.close()
        raise
    # the load's temporaries (parsed graphs, warm-up tensors) are free now; glibc would keep them resident
    heap.release_freed_memory()
    return built


class ModelRepository:
    def __init__(self, root: Path, defaults: RuntimeDefaults = RuntimeDefaults()) -> None:
        # before the loaders and execution threads exist, which would each take an arena (server/heap.py)
        heap.limit_arenas()
        self.root = Path(root)
        self.defaults = defaults
        self.models: dict[str, ModelState] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def names_on_disk(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    async def load_all(self, names: Iterable[str] | None = None) -> None:
        """Load models in parallel (as Triton does), PARALLEL_LOADS at a time; one failing leaves it
        UNAVAILABLE with its reason and the others load on."""
        slots = asyncio.Semaphore(PARALLEL_LOADS)

        async def one(name: str) -> None:
            async with slots:
                try:
                    await self.load(name)
                except InferError as exc:  # a --load-model naming no model: the others still load
                    log.error("model load failed", extra={"model": echo(name), "reason": exc.message})

        await asyncio.gather(*(one(n) for n in (self.names_on_disk() if names is None else names)))

    async def load(self, name: str, override: LoadOverride | None = None) -> ModelState:
        """(Re)load `name`; on failure the model is UNAVAILABLE with the reason (and the old copy, if any,
        keeps serving until a load succeeds, as Triton does). A malformed name is INVALID_ARGUMENT and
        a name neither on disk nor loaded NOT_FOUND, both leaving no trace: clients cannot grow the
        index (or the locks) with names that are not models. `override` (server/model_overrides.py)
        replaces the config, or the whole directory, for this load only."""
        check_model_name(name)
        from_files = override is not None and bool(override.files)
        if name not in self.models and not from_files and not (self.root / name).is_dir():
            raise not_found(f"model '{name}' not found in the model repository")
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            model_dir = self.root / name
            state = self.models.setdefault(name, ModelState(name))
            old = dict(state.versions)
            if not old:
                state.state = "LOADING"
            try:
                if not from_files and not model_dir.is_dir():  # removed from disk since: the old copy serves on
                    raise LoadError(f"model '{name}' is no longer in the model repository")
                built = await asyncio.to_thread(build_model, model_dir, self.defaults, override)
            except LoadError as exc:
                state.reason = str(exc)
                state.state = "READY" if old and not any(m.batcher.fault for m in old.values()) else "UNAVAILABLE"
                log.error("model load failed", extra={"model": name, "reason": str(exc)})
                return state
            versions: dict[int, ServedModel] = {}
            for b in built:
                stats = ModelStats(name, str(b.version))
                batcher = DynamicBatcher(
                    name, str(b.version), b.instances, b.settings, stats, on_fault=self._fault_handler(state, b.version)
                )
                batcher.start()
                versions[b.version] = ServedModel(name, b.version, b.config, b.meta, b.instances, batcher, b.platform)
                versions[b.version].labels = b.labels
            state.versions, state.state, state.reason = versions, "READY", ""
            log.info(
                "model loaded",
                extra={
                    "model": name,
                    "versions": sorted(versions),
                    "instances": len(built[0].instances) if built else 0,
                },
            )
            for m in old.values():
                await m.close()
            return state

    def _fault_handler(self, state: ModelState, version: int):
        def on_fault(reason: str) -> None:
            if version in state.versions and state.versions[version].batcher.fault is not None:
                state.state, state.reason = "UNAVAILABLE", f"version {version}: {reason}"
                log.error("model marked not ready", extra={"model": state.name, "version": version, "reason": reason})

        return on_fault

    async def unload(self, name: str) -> None:
        check_model_name(name)
        state = self.models.get(name)
        if state is None:
            raise not_found(f"model '{name}' is not loaded")
        async with self._locks.setdefault(name, asyncio.Lock()):
            old = dict(state.versions)
            state.versions, state.state, state.reason = {}, "UNAVAILABLE", "unloaded"
            for m in old.values():
                await m.close()
            log.info("model unloaded", extra={"model": name})

    def get(self, name: str, version: str = "") -> ServedModel:
        """The served version (latest when `version` is empty); NOT_FOUND / UNAVAILABLE otherwise."""
        state = self.models.get(name)
        if state is None:
            raise not_found(f"unknown model {echo(name)}; known: {', '.join(sorted(self.models)) or 'none'}")
        number = parse_version(version)
        if not state.versions:
            raise unavailable(f"model '{name}' is not ready: {state.reason or state.state}")
        if number is None:
            model = state.versions[max(state.versions)]
        elif number not in state.versions:
            raise not_found(
                f"model '{name}' has no version '{number}'; served versions: "
                f"{', '.join(str(v) for v in sorted(state.versions))}"
            )
        else:
            model = state.versions[number]
        if model.batcher.fault is not None:
            raise unavailable(f"model '{name}' version {model.version} is not ready: {model.batcher.fault}")
        return model

    def served(self) -> Iterable[ServedModel]:
        for state in list(self.models.values()):
            yield from list(state.versions.values())

    def all_stats(self) -> Iterable[ModelStats]:
        return [m.stats for m in self.served()]

    async def close(self) -> None:
        """Drain and release every model (graceful shutdown)."""
        await asyncio.gather(*(m.close() for m in list(self.served())))
        for state in self.models.values():
            state.versions = {}
            state.state = "UNAVAILABLE"
