"""Which of a model's gated variants to serve on this CPU.

`export` measures its candidates (FP32 / BF16 / INT8 on ONNX Runtime / OpenVINO) on the machine it runs
on, serves the fastest that passes the accuracy gate, and records in model.json the CPU it measured on
(serving.cpu) and every variant that passed, fastest first, with the CPU flags each needs to beat FP32
(serving.variants). A repository built on one machine may be served on another: BF16 without AMX runs
at 0.7x FP32, INT8 without VNNI loses its edge. When this CPU's flags (cnncore.cpu: /proc/cpuinfo less
what ONEDNN_MAX_CPU_ISA hides) differ from the recorded ones, the server serves the first recorded
variant whose needs this CPU meets (FP32 needs nothing, so there always is one; cnncore/variant_select.py)
and logs which and why. A choice pinned at export (--precision / --runtime) is kept as it is.
"""

from __future__ import annotations

import logging

from cnncore.cpu import CpuInfo
from cnncore.spec import ModelMeta
from cnncore.variant_select import reselect
from protos import model_config_pb2 as mc

log = logging.getLogger("cnnserve.variant_choice")

# config parameters a variant sets; cleared before the chosen variant's are applied
VARIANT_PARAMETERS = ("INFERENCE_PRECISION_HINT",)


def apply(cfg: mc.ModelConfig, meta: ModelMeta | None, model: str, cpu: CpuInfo | None = None) -> None:
    """Point `cfg` (a model's parsed config) at the variant this CPU should serve, logging the change."""
    choice = reselect(meta, cpu)
    if choice is None:
        return
    v = choice.variant
    cfg.backend = v.runtime
    cfg.platform = "onnxruntime_onnx" if v.runtime == "onnxruntime" else ""
    cfg.default_model_filename = v.file
    for key in VARIANT_PARAMETERS:
        if key in cfg.parameters:
            del cfg.parameters[key]
    for key, value in v.parameters.items():
        cfg.parameters[key].string_value = value
    cfg.parameters["precision"].string_value = v.precision.upper()
    log.info(
        "serving another gated variant for this CPU",
        extra={"model": model, "variant": f"{v.precision}/{v.runtime}", "file": v.file, "why": choice.reason},
    )
