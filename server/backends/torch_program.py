"""PyTorch backend: runs the model's `torch.export` program (`model.pt2`), on CUDA where there is a GPU.

It is the GPU path for machines or models without TensorRT, and with device cpu the same code runs in
CI for parity against ONNX Runtime. torch is imported only when a model asks for this backend
(`backend: "pytorch"`), keeping the serving image torch-free otherwise (docs/architecture.md).

The device comes from the model's instance group: KIND_GPU -> cuda:<gpu> (BackendOptions.device_kind
and device_id, set by the loader), otherwise cpu.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from server.backends.base import Backend, BackendOptions, BackendUnavailable, TensorSpec, register_backend


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
        raise BackendUnavailable(f"the pytorch backend was asked for a GPU but torch {torch.__version__} sees no "
                                 "CUDA device; use instance_group kind KIND_CPU or another backend")
    if options.device_id >= torch.cuda.device_count():
        raise BackendUnavailable(f"GPU {options.device_id} requested, torch sees {torch.cuda.device_count()}")
    return f"cuda:{options.device_id}"


class TorchProgramBackend(Backend):
    kind = "pytorch"

    def __init__(self, model_file: Path, options: BackendOptions) -> None:
        super().__init__(model_file, options)
        self.device = resolve_device(options)
        torch = self._torch = _torch()
        from export.torch_program import load_program

        if not self.model_file.is_file():
            raise BackendUnavailable(f"{self.model_file}: no exported program; write it with "
                                     "python -m export.torch_program --repository DIR")
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
        self._inputs = [self._spec(name, node) for name, node in zip(input_names, self._placeholders(program))]
        self._output_names = output_names
        self._outputs = self._output_specs(program, output_names)

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
        for name, val in zip(names, vals):
            shape = tuple(d if isinstance(d, int) else -1 for d in val.shape)
            specs.append(TensorSpec(name, self._np_dtype(val.dtype), shape[1:] if self._batched else shape))
        return specs

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self._outputs)

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
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
        return {name: t.detach().cpu().numpy() for name, t in zip(self._output_names, result)}

    def close(self) -> None:
        self._module = None
        if self.device != "cpu":
            self._torch.cuda.empty_cache()


register_backend("pytorch", TorchProgramBackend)
