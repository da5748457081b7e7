"""The runtime layer: ONNX Runtime sessions and OpenVINO compiled models, set up in one place.

    ort.py      OrtSettings (threads, execution mode, graph optimisation, providers), ort_session,
                requested_providers / ort_providers (a config's CUDA / TensorRT / OpenVINO execution
                providers, their options, checked against this onnxruntime build)
    ov.py       OpenVinoSettings (NUM_STREAMS, INFERENCE_NUM_THREADS, PERFORMANCE_HINT,
                INFERENCE_PRECISION_HINT, ENABLE_CPU_PINNING, CACHE_DIR), compile_openvino (with a bounded
                dynamic batch), compiled_properties (what OpenVINO resolved them to)
    runner.py   a file on a runtime as a callable (numpy batch -> output dict) and its throughput

The server's backends, export (parity, the UINT8 input's check, TensorRT engine parity, and through
export/runtimes.py the accuracy gate and the variant choice), the ONNX evaluators (export/evaluate/),
training and the benchmarks all set runtimes up here. Torch-free and onnx-free;
onnxruntime and openvino are imported when a session or a compiled model is made, so importing this
package costs nothing, and it loads none of the project's protos (a benchmark process that also imports
tritonclient can use it).
"""

from cnncore.runtime.errors import RuntimeUnavailable
from cnncore.runtime.ort import (
    ACCELERATOR_PROVIDERS,
    CPU_PROVIDER,
    OrtSettings,
    Provider,
    numpy_dtype,
    ort_providers,
    ort_session,
    requested_providers,
)
from cnncore.runtime.ov import (
    OpenVinoSettings,
    compile_openvino,
    compiled_properties,
    import_openvino,
    openvino_available,
)
from cnncore.runtime.runner import (
    RUNTIMES,
    OpenVinoRunner,
    OrtRunner,
    Runner,
    available_runtimes,
    openvino_runner,
    ort_runner,
    runner,
    throughput,
    throughput_by_batch,
)

__all__ = [
    "ACCELERATOR_PROVIDERS",
    "CPU_PROVIDER",
    "RUNTIMES",
    "OpenVinoRunner",
    "OpenVinoSettings",
    "OrtRunner",
    "OrtSettings",
    "Provider",
    "Runner",
    "RuntimeUnavailable",
    "available_runtimes",
    "compile_openvino",
    "compiled_properties",
    "import_openvino",
    "numpy_dtype",
    "openvino_available",
    "openvino_runner",
    "ort_providers",
    "ort_runner",
    "ort_session",
    "requested_providers",
    "runner",
    "throughput",
    "throughput_by_batch",
]
