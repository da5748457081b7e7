"""The gRPC binding of the vision API (protos/vision.proto): each RPC is one data-plane vision call.

Pictures in, the data plane's answer out as the RPC's response (server/bindings/vision_messages.py);
admission counts the request by its received size, and failures go to the same error boundary as
ModelInfer's (server/bindings/grpc_boundary.py).
"""

from __future__ import annotations

import grpc

from protos import vision_pb2 as vpb
from protos import vision_pb2_grpc as vpb_grpc
from server.bindings.grpc_boundary import Context, guard_servicer
from server.bindings.vision_messages import to_message
from server.dataplane.plane import DataPlane


class VisionServicer(vpb_grpc.VisionServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def Classify(self, request: vpb.ClassifyRequest, context: Context) -> vpb.ClassifyResponse:
        with self.plane.admitted(request.ByteSize()):
            return to_message(
                await self.plane.vision.classify(
                    request.model_name,
                    request.model_version,
                    list(request.images),
                    top_k=request.top_k,
                    transport_remaining_s=context.time_remaining(),
                ),
                vpb.ClassifyResponse,
            )

    async def Detect(self, request: vpb.DetectRequest, context: Context) -> vpb.DetectResponse:
        with self.plane.admitted(request.ByteSize()):
            return to_message(
                await self.plane.vision.detect(
                    request.model_name,
                    request.model_version,
                    list(request.images),
                    score_threshold=request.score_threshold,
                    max_detections=request.max_detections,
                    transport_remaining_s=context.time_remaining(),
                ),
                vpb.DetectResponse,
            )

    async def Segment(self, request: vpb.SegmentRequest, context: Context) -> vpb.SegmentResponse:
        with self.plane.admitted(request.ByteSize()):
            return to_message(
                await self.plane.vision.segment(
                    request.model_name,
                    request.model_version,
                    list(request.images),
                    transport_remaining_s=context.time_remaining(),
                ),
                vpb.SegmentResponse,
            )

    async def Encode(self, request: vpb.EncodeRequest, context: Context) -> vpb.EncodeResponse:
        with self.plane.admitted(request.ByteSize()):
            return to_message(
                await self.plane.vision.encode(
                    request.model_name,
                    request.model_version,
                    list(request.images),
                    transport_remaining_s=context.time_remaining(),
                ),
                vpb.EncodeResponse,
            )

    async def Reconstruct(self, request: vpb.ReconstructRequest, context: Context) -> vpb.ReconstructResponse:
        with self.plane.admitted(request.ByteSize()):
            return to_message(
                await self.plane.vision.reconstruct(
                    request.model_name,
                    request.model_version,
                    list(request.images),
                    transport_remaining_s=context.time_remaining(),
                ),
                vpb.ReconstructResponse,
            )


def add_vision_service(server: grpc.aio.Server, plane: DataPlane) -> str:
    """The vision binding's registration (server.app.GRPC_BINDINGS): the same data plane, batchers
    and error boundary as the inference protocol."""
    return guard_servicer(server, vpb_grpc.add_VisionServiceServicer_to_server, VisionServicer(plane))
