"""PyTorch backend: runs the model's `torch.export` program (`model.pt2`), on CUDA where there is a GPU.

It is the GPU path for machines or models without TensorRT, and with device cpu the same code runs in
CI for parity against ONNX Runtime. torch is imported only when a model asks for this backend
(`backend: "pytorch"`), keeping the serving image torch-free otherwise (docs/architecture.md).

The device comes from the model's instance group: KIND_GPU -> cuda:<gpu> (BackendOptions.device_kind
and device_id, set by the loader), otherwise cpu. `optimization { cuda { graphs: true } }` in the config
captures a CUDA graph per batch size at load (CudaGraphs below).
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from cnncore.artifacts import PROGRAM_NAMES_FILE
from server.backends.base import Backend, BackendOptions, BackendUnavailable, TensorSpec, register_backend

log = logging.getLogger("cnnserve.backends.pytorch")

# Up to this max_batch_size every batch size gets its own graph; above it, powers of two and the max
# (a batch runs in the smallest graph that holds it, its spare rows computed and dropped).
MAX_GRAPHS = 64


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes CudaGraphs captures, ascending."""
    if max_batch_size <= MAX_GRAPHS:
        return list(range(1, max_batch_size + 1))
    return sorted({1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size} | {max_batch_size})


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailable(f"the pytorch backend needs torch, which is not installed here ({exc})") from None
    return torch


def resolve_device(options: BackendOptions) -> str:
    """'cpu' or 'cuda:N'; BackendUnavailable when CUDA is asked for and torch has none.

    The instance group decides (KIND_GPU -> cuda, else cpu); a config parameter `device` (cpu|cuda)
    overrides it, e.g. to check a GPU repository's numbers on a CPU machine.
    """
    kind = getattr(options, "device_kind", "cpu")
    requested = dict(options.extra).get("device") or ("cuda" if kind == "gpu" else "cpu")
    if requested == "cpu":
        return "cpu"
    torch = _torch()
    if not torch.cuda.is_available():
        raise BackendUnavailable(
            f"the pytorch backend was asked for a GPU but torch {torch.__version__} sees no "
            "CUDA device; use instance_group kind KIND_CPU or another backend"
        )
    if options.device_id >= torch.cuda.device_count():
        raise BackendUnavailable(f"GPU {options.device_id} requested, torch sees {torch.cuda.device_count()}")
    return f"cuda:{options.device_id}"


class CudaGraphs:
    """The program captured as one CUDA graph per batch size, at load; `run` replays one.

    Why: the eager program launches each op's kernels from Python, one after another. A small CNN at
    small batches then spends its time launching, not computing: MobileNetV2 (about 150 ops) served
    from the eager program kept an H200 6-13% busy and ran slower than ONNX Runtime on 16 CPU cores. A
    replayed graph is one launch for the whole forward pass. The cost is memory (static buffers per
    size, intermediates shared through one pool) and a capture per size at load, where a live request
    never waits for it.
    Valid for programs without data-dependent shapes or host synchronisation (classifiers, segmenters,
    autoencoders); capture fails on the others (detection's NMS) and the backend stays eager.
    """

    def __init__(self, torch, module, inputs: list[TensorSpec], max_batch_size: int, device: str) -> None:
        if any(d < 0 for spec in inputs for d in spec.shape):
            raise ValueError("CUDA graphs need fixed input shapes besides the batch dimension")
        self._torch = torch
        self.sizes = graph_batch_sizes(max_batch_size)
        self._graphs: dict[int, tuple] = {}
        dtypes = [torch.from_numpy(np.zeros((), spec.dtype)).dtype for spec in inputs]
        pool = torch.cuda.graph_pool_handle()
        current, side = torch.cuda.current_stream(device), torch.cuda.Stream(device=device)
        with torch.inference_mode():
            # Largest first: the smaller captures then fit in blocks the pool already holds. Graphs share
            # intermediates safely because an instance replays one at a time and copies outputs out.
            for b in reversed(self.sizes):
                static = [
                    torch.zeros((b, *spec.shape), dtype=dt, device=device)
                    for spec, dt in zip(inputs, dtypes, strict=True)
                ]
                side.wait_stream(current)
                with torch.cuda.stream(side):  # warm-up off the capture: lazy init, workspace allocation
                    for _ in range(2):
                        module(*static)
                current.wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = module(*static)
                self._graphs[b] = (graph, static, (out,) if isinstance(out, torch.Tensor) else tuple(out))
        torch.cuda.synchronize(device)

    def run(self, arrays: list[np.ndarray]) -> tuple:
        n = arrays[0].shape[0]
        b = next((s for s in self.sizes if s >= n), None)
        if b is None:
            raise ValueError(f"batch of {n} exceeds the largest captured graph ({self.sizes[-1]})")
        graph, static, outs = self._graphs[b]
        torch = self._torch
        with torch.inference_mode():  # the static buffers are inference tensors: written only in this mode
            for buf, a in zip(static, arrays, strict=True):
                # Rows n..b keep an earlier batch's inputs: computed, never returned (rows are independent).
                buf[:n].copy_(torch.from_numpy(a).pin_memory(), non_blocking=True)
            graph.replay()
            # .cpu() waits for the replay and copies before the next replay can overwrite the outputs.
            return tuple(o[:n].cpu() for o in outs)


# torch.export.load keeps its deserializer in a module global and asserts it is unset: two models loaded
# at once (the repository loads them in threads) fail with "_CURRENT_DESERIALIZER is already set".
_LOAD_LOCK = threading.Lock()


def load_program(path: Path) -> tuple[Any, list[str], list[str]]:
    """A torch.export program written by export.torch_program, with its inputs' and outputs' names."""
    extra = {PROGRAM_NAMES_FILE: ""}
    with _LOAD_LOCK:
        program = _torch().export.load(str(path), extra_files=extra)
    names = json.loads(extra[PROGRAM_NAMES_FILE]) if extra[PROGRAM_NAMES_FILE] else {}
    n_out = len(program.graph_signature.user_outputs)
    inputs = names.get("inputs") or list(program.graph_signature.user_inputs)
    outputs = names.get("outputs") or [f"output{i}" for i in range(n_out)]
    return program, list(inputs), list(outputs)


class TorchProgramBackend(Backend):
    kind = "pytorch"

    def __init__(self, model_file: Path, options: BackendOptions) -> None:
        super().__init__(model_file, options)
        self.device = resolve_device(options)
        torch = self._torch = _torch()
        if not self.model_file.is_file():
            raise BackendUnavailable(
                f"{self.model_file}: no exported program; write it with python -m export.torch_program --repository DIR"
            )
        program, input_names, output_names = load_program(self.model_file)
        if self.device != "cpu":
            # The documented way to relocate an ExportedProgram (constants included), then unlift it.
            from torch.export.passes import move_to_device_pass

            # cudnn.benchmark stays off: the batcher sends every batch size from 1 to max, and autotuning
            # each new shape on a live request would show up as p99 spikes.
            program = move_to_device_pass(program, self.device)
        elif options.intra_op_threads > 0:
            torch.set_num_threads(options.intra_op_threads)
        self._module = program.module()
        self._batched = getattr(options, "batched", True)
        self._inputs = [
            self._spec(name, node) for name, node in zip(input_names, self._placeholders(program), strict=False)
        ]
        self._output_names = output_names
        self._outputs = self._output_specs(program, output_names)
        self._graphs: CudaGraphs | None = None
        if options.cuda_graphs:
            self._graphs = self._capture(options)

    def _capture(self, options: BackendOptions) -> CudaGraphs | None:
        why = (
            "it runs on the CPU"
            if self.device == "cpu"
            else "the model is unbatched (max_batch_size 0)"
            if not (self._batched and options.max_batch_size > 0)
            else None
        )
        if why is None:
            try:
                graphs = CudaGraphs(self._torch, self._module, self._inputs, options.max_batch_size, self.device)
                log.info("%s: CUDA graphs captured for batch sizes %s", self.model_file, graphs.sizes)
                return graphs
            except Exception as exc:  # data-dependent programs cannot be captured: stay eager
                why = f"capture failed ({type(exc).__name__}: {exc})"
                self._torch.cuda.synchronize(self.device)
        log.warning("%s: optimization.cuda.graphs ignored, running eagerly: %s", self.model_file, why)
        return None

    @property
    def cuda_graph_sizes(self) -> list[int]:
        """Batch sizes served from captured CUDA graphs (empty when eager)."""
        return list(self._graphs.sizes) if self._graphs else []

    @staticmethod
    def _placeholders(program) -> list:
        user = set(program.graph_signature.user_inputs)
        return [n for n in program.graph.nodes if n.op == "placeholder" and n.name in user]

    def _spec(self, name: str, node) -> TensorSpec:
        val = node.meta["val"]
        shape = tuple(d if isinstance(d, int) else -1 for d in val.shape)
        return TensorSpec(name, self._np_dtype(val.dtype), shape[1:] if self._batched else shape)

    def _np_dtype(self, dtype) -> np.dtype:
        return np.dtype(self._torch.empty((), dtype=dtype).numpy().dtype)

    def _output_specs(self, program, names: list[str]) -> list[TensorSpec]:
        out_node = next(n for n in program.graph.nodes if n.op == "output")
        vals = [a.meta.get("val") for a in out_node.args[0]][: len(names)]
        specs = []
        for name, val in zip(names, vals, strict=False):
            shape = tuple(d if isinstance(d, int) else -1 for d in val.shape)
            specs.append(TensorSpec(name, self._np_dtype(val.dtype), shape[1:] if self._batched else shape))
        return specs

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        if self._graphs is not None:
            arrays = [np.ascontiguousarray(inputs[spec.name]) for spec in self._inputs]
            return {name: t.numpy() for name, t in zip(self._output_names, self._graphs.run(arrays), strict=False)}
        cuda = self.device != "cpu"
        args = []
        for spec in self._inputs:
            t = torch.from_numpy(np.ascontiguousarray(inputs[spec.name]))
            # Pinned staging makes the host->device copy asynchronous DMA rather than a pageable copy.
            args.append(t.pin_memory().to(self.device, non_blocking=True) if cuda else t)
        with torch.inference_mode():
            result = self._module(*args)
        if isinstance(result, torch.Tensor):
            result = (result,)
        # .cpu() synchronises the stream, so the numpy arrays are complete.
        return {name: t.detach().cpu().numpy() for name, t in zip(self._output_names, result, strict=False)}

    def close(self) -> None:
        self._module = self._graphs = None
        if self.device != "cpu":
            self._torch.cuda.empty_cache()


register_backend("pytorch", TorchProgramBackend)
