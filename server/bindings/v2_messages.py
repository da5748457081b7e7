"""The Open Inference Protocol's answers built from the data plane's results, for both bindings.

The gRPC binding sends these messages; the REST binding sends the same messages as JSON
(cnncore.protojson), which is what KServe v2's REST schema is. Requests are never built here: each
binding reads its own wire form straight into data-plane calls.
"""

from __future__ import annotations

from collections.abc import Iterable

from protos import grpc_service_pb2 as pb
from server.dataplane.model import ServedModel
from server.dataplane.plane import EXTENSIONS, SERVER_NAME, SERVER_VERSION, IndexEntry
from server.shared_memory import RegionStatus


def server_metadata() -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)


def model_metadata(model: ServedModel, versions: Iterable[int]) -> pb.ModelMetadataResponse:
    batched = model.max_batch_size > 0
    return pb.ModelMetadataResponse(
        name=model.name,
        versions=[str(v) for v in versions],
        platform=model.platform,
        inputs=[
            pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.metadata_shape(batched))
            for s in model.inputs
        ],
        outputs=[
            pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.metadata_shape(batched))
            for s in model.outputs
        ],
    )


def model_statistics(models: Iterable[ServedModel]) -> pb.ModelStatisticsResponse:
    out = pb.ModelStatisticsResponse()
    for m in models:
        s = m.stats
        ms = out.model_stats.add(
            name=m.name,
            version=str(m.version),
            last_inference=s.last_inference_ms,
            inference_count=s.inference_count,
            execution_count=s.execution_count,
        )
        st = ms.inference_stats
        for field in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
            d = getattr(s, field)
            getattr(st, field).count, getattr(st, field).ns = d.count, d.ns
        for size in sorted(s.batch):
            b = s.batch[size]
            bs = ms.batch_stats.add(batch_size=size)
            for field in ("compute_input", "compute_infer", "compute_output"):
                d = getattr(b, field)
                getattr(bs, field).count, getattr(bs, field).ns = d.count, d.ns
    return out


def repository_index(entries: Iterable[IndexEntry]) -> pb.RepositoryIndexResponse:
    out = pb.RepositoryIndexResponse()
    for e in entries:
        out.models.add(name=e.name, version=e.version, state=e.state, reason=e.reason)
    return out


def region_status(regions: Iterable[RegionStatus]) -> pb.SystemSharedMemoryStatusResponse:
    out = pb.SystemSharedMemoryStatusResponse()
    for r in regions:
        out.regions[r.name].CopyFrom(
            pb.SystemSharedMemoryStatusResponse.RegionStatus(
                name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size
            )
        )
    return out
