"""The vision API's answers (protos/vision.proto) built from the data plane's `VisionAnswer`s.

The gRPC vision binding sends them; the REST vision binding sends the same messages as JSON, so both
APIs (and the CLI, which prints the gRPC answer as JSON) answer alike.
"""

from __future__ import annotations

from typing import Any, TypeVar, overload

from google.protobuf.message import Message

from protos import vision_pb2 as vpb
from server.dataplane.vision import ImageResult, VisionAnswer


def _info(r: ImageResult) -> vpb.ImageInfo:
    if r.error is not None:
        # the enum by its name (the data plane's reasons are named as in protos/vision.proto)
        error = vpb.ImageError(reason=r.error.reason.value, message=str(r.error))
        return vpb.ImageInfo(index=r.index, error=error)
    return vpb.ImageInfo(index=r.index, width=r.width, height=r.height)


def _fill(call: str, result: Any, r: ImageResult) -> None:
    if call == "Classify":
        for c in r.classes:
            result.classes.add(class_index=c.class_index, label=c.label, score=c.value)
    elif call == "Detect":
        for d in r.detections:
            x1, y1, x2, y2 = d.box
            result.detections.add(
                box=vpb.Box(x1=x1, y1=y1, x2=x2, y2=y2), class_index=d.class_index, label=d.label, score=d.score
            )
    elif call == "Segment":
        result.mask_png = r.mask_png
        for f in r.fractions:
            result.fractions.add(class_index=f.class_index, label=f.label, fraction=f.value)
    else:  # Encode, Reconstruct
        result.latent.extend(r.latent)
        if call == "Reconstruct":
            result.image_png = r.image_png


Response = TypeVar("Response", bound=Message)


@overload
def to_message(answer: VisionAnswer) -> Message: ...
@overload
def to_message(answer: VisionAnswer, kind: type[Response]) -> Response: ...


def to_message(answer: VisionAnswer, kind: type[Message] | None = None) -> Message:
    """The `<Call>Response` message of `answer`; `kind`, that class, where the caller knows the call."""
    # The five response messages share these fields; the stubs type each class on its own.
    make: Any = kind if kind is not None else getattr(vpb, f"{answer.call}Response")
    response = make(model_name=answer.model_name, model_version=answer.model_version)
    if answer.labels:
        response.labels.extend(answer.labels)
    for r in answer.results:
        result = response.results.add(image=_info(r))
        if r.error is None:
            _fill(answer.call, result, r)
    message: Message = response
    return message
