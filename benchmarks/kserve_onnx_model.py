"""KServe 0.21's own model server running one ONNX file on ONNX Runtime: bench_server.py --kserve's baseline.

Runs in the KServe venv (benchmarks/kserve_venv.sh), never the project's:

    $(bash benchmarks/kserve_venv.sh) benchmarks/kserve_onnx_model.py --model-file F --model-name resnet18 \
        --grpc-port 8081 --http-port 8080 --intra-op-threads 2

A `kserve.Model` behind `kserve.ModelServer`, which serves the v2 (Open Inference) protocol over gRPC
(inference.GRPCInferenceService, what tritonclient.grpc speaks) and REST. The session is built with the
settings the server's ONNX Runtime backend uses (cnncore.runtime.OrtSettings: the given intra-op threads,
inter-op 1, spinning off, full graph optimisation, sequential execution); the runtime layer loads none of
the project's protos, so it lives beside KServe's `inference` protos. One session and one request per
run: KServe's model server has no batcher (KServe batches in a separate agent container). `predict` is
async and runs the session on one worker thread, so KServe's event loop keeps reading requests while one
computes (a plain `def predict` would run on the loop and block it) and runs never overlap (two runs of
one session on 2 cores doubled each run's time: README, the serving path at engine speed).
KServe 0.21 binds its ports on every interface (hard-coded "[::]" / "0.0.0.0"); clients use 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import kserve  # type: ignore[import-not-found]  # only in the KServe venv
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse  # type: ignore[import-not-found]
from kserve.utils.numpy_codec import from_np_dtype  # type: ignore[import-not-found]

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's runtime layer, not installed in this venv

from cnncore.runtime import OrtSettings, numpy_dtype, ort_session  # noqa: E402


class OnnxModel(kserve.Model):
    def __init__(self, name: str, model_file: Path, threads: int) -> None:
        super().__init__(name)
        self.model_file = model_file
        self.threads = threads
        self._run = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{name}")

    def load(self) -> bool:
        settings = OrtSettings(intra_op_threads=self.threads, inter_op_threads=1, allow_spinning=False)
        self.session = ort_session(self.model_file, settings)
        self.inputs = {i.name: numpy_dtype(i.type) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.ready = True
        return self.ready

    async def predict(
        self, payload: InferRequest, headers: dict[str, str] | None = None, response_headers: dict | None = None
    ) -> InferResponse:
        feed = {i.name: i.as_numpy().astype(self.inputs[i.name], copy=False) for i in payload.inputs}
        results = await asyncio.get_running_loop().run_in_executor(self._run, self.session.run, self.output_names, feed)
        outputs = []
        for name, arr in zip(self.output_names, results, strict=True):
            out = InferOutput(name=name, shape=list(arr.shape), datatype=from_np_dtype(arr.dtype))
            out.set_data_from_numpy(arr, binary_data=True)
            outputs.append(out)
        return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=outputs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-file", type=Path, required=True)
    ap.add_argument("--model-name", required=True)
    ap.add_argument("--grpc-port", type=int, required=True)
    ap.add_argument("--http-port", type=int, required=True)
    ap.add_argument("--intra-op-threads", type=int, default=2)
    args, _ = ap.parse_known_args()
    model = OnnxModel(args.model_name, args.model_file, args.intra_op_threads)
    model.load()
    kserve.ModelServer(
        http_port=args.http_port, grpc_port=args.grpc_port, workers=1, enable_grpc=True, enable_latency_logging=False
    ).start([model])


if __name__ == "__main__":
    main()
