"""A loaded model version as the data plane sees it: config, metadata, backend instances, batcher, and
the checks of a request against the config.

The data plane's Normalize (server/dataplane/normalize.py) calls `check_declared` on each input before
decoding it and `validate` on the decoded set, then queues the request on `batcher`. Validation errors
are INVALID_ARGUMENT and name the input, what was expected and what came.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from cnncore.datatypes import PROTOCOL_DATATYPES, from_config, from_numpy, to_numpy
from cnncore.spec import ModelMeta
from protos import model_config_pb2 as mc
from server.backends.base import Backend
from server.errors import InferError, invalid
from server.scheduling.batcher import DynamicBatcher
from server.stats import ModelStats


@dataclass(frozen=True)
class IOSpec:
    """An input or output as the protocol describes it: dims exclude the batch dimension."""

    name: str
    datatype: str  # protocol name, e.g. "FP32"
    dims: tuple[int, ...]  # -1 = any size

    @property
    def dtype(self) -> np.dtype:
        return to_numpy(self.datatype)

    def metadata_shape(self, batched: bool) -> list[int]:
        return ([-1] if batched else []) + list(self.dims)


def io_specs(tensors: list[mc.ModelInput] | list[mc.ModelOutput]) -> list[IOSpec]:
    return [IOSpec(t.name, from_config(t.data_type), tuple(int(d) for d in t.dims)) for t in tensors]


class ServedModel:
    def __init__(
        self,
        name: str,
        version: int,
        config: mc.ModelConfig,
        meta: ModelMeta | None,
        instances: list[Backend],
        batcher: DynamicBatcher,
        platform: str,
    ) -> None:
        self.name = name
        self.version = version
        self.config = config
        self.meta = meta  # model.json, for the vision API (preprocessing, labels, task); None if absent
        self.instances = instances
        self.batcher = batcher
        self.platform = platform
        self.inputs = io_specs(list(config.input))
        self.outputs = io_specs(list(config.output))
        self._inputs_by_name = {s.name: s for s in self.inputs}
        # What check_declared compares every request's inputs with, and names them by, built once here.
        self._where = f"model '{name}' version {version}"
        self._expected_shapes = {s.name: s.metadata_shape(config.max_batch_size > 0) for s in self.inputs}
        self.output_names = [s.name for s in self.outputs]
        self.labels: dict[str, list[str]] = {}  # output -> label_filename's lines (server/dataplane/classification.py)

    @property
    def max_batch_size(self) -> int:
        return self.config.max_batch_size

    @property
    def default_timeout_us(self) -> int:
        """config default_queue_policy.default_timeout_microseconds (0 = none), read by Normalize."""
        return self.batcher.settings.default_timeout_us

    @property
    def stats(self) -> ModelStats:
        return self.batcher.stats

    def check_declared(self, name: str, datatype: str, shape: Sequence[int]) -> None:
        """One input's declaration against the config (name, datatype, shape, batch bounds), before any
        of its contents is decoded. INVALID_ARGUMENT naming the input, what was expected and what came."""
        where = self._where
        spec = self._inputs_by_name.get(name)
        if spec is None:
            raise invalid(f"{where}: unexpected input(s) {name!r}; expected inputs {sorted(self._inputs_by_name)}")
        if any(d < 0 for d in shape):
            raise invalid(f"input '{name}': shape {list(shape)} has a negative dimension")
        if datatype != spec.datatype:
            if datatype not in PROTOCOL_DATATYPES:
                raise invalid(
                    f"input '{name}': unsupported datatype {datatype!r}; supported: {', '.join(PROTOCOL_DATATYPES)}"
                )
            raise invalid(f"{where}: input '{name}': expected datatype {spec.datatype}, got {datatype}")
        expected = self._expected_shapes[name]
        if len(shape) != len(expected) or any(e != -1 and e != g for e, g in zip(expected, shape, strict=True)):
            raise invalid(f"{where}: input '{name}': expected shape {expected}, got {list(shape)}")
        if self.max_batch_size > 0:
            if shape[0] < 1:
                raise invalid(f"{where}: input '{name}': batch size must be at least 1, got {shape[0]}")
            if shape[0] > self.max_batch_size:
                raise invalid(
                    f"{where}: input '{name}': batch size {shape[0]} exceeds max_batch_size {self.max_batch_size}"
                )

    def validate(self, inputs: dict[str, np.ndarray], declarations_checked: bool = False) -> None:
        """INVALID_ARGUMENT unless `inputs` match the config exactly (names, dtypes, shapes, batch).
        `declarations_checked`: Normalize already ran `check_declared` on each input (the
        arrays it decoded have exactly the checked datatype and shape), so only the set is checked."""
        where = self._where
        missing = [n for n in self._inputs_by_name if n not in inputs]
        extra = [n for n in inputs if n not in self._inputs_by_name]
        if missing:
            raise invalid(
                f"{where}: missing input(s) {', '.join(repr(m) for m in missing)}; "
                f"expected inputs {sorted(self._inputs_by_name)}, got {sorted(inputs)}"
            )
        if extra:
            raise invalid(
                f"{where}: unexpected input(s) {', '.join(repr(e) for e in extra)}; "
                f"expected inputs {sorted(self._inputs_by_name)}"
            )
        batch: int | None = None
        for name, arr in inputs.items():
            if not declarations_checked:
                self.check_declared(name, from_numpy(arr.dtype), arr.shape)
            if self.max_batch_size > 0:
                if batch is not None and arr.shape[0] != batch:
                    raise invalid(
                        f"{where}: input '{name}': batch size {arr.shape[0]} differs from the other inputs' {batch}"
                    )
                batch = arr.shape[0]
        try:
            self.instances[0].check_inputs(inputs)
        except ValueError as exc:
            raise invalid(f"{where}: {exc}") from None

    @contextmanager
    def refusals_counted(self) -> Iterator[None]:
        """Every refusal of a request for this model counts once as its INVALID failure, whichever
        check refused it (Normalize's and validate's alike)."""
        try:
            yield
        except InferError:
            self.stats.record_failure("INVALID", 0)
            raise

    async def close(self) -> None:
        """Drain accepted requests, then release the backends."""
        await self.batcher.stop()
        for inst in self.instances:
            inst.close()
