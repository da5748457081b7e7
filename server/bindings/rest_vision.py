"""The vision API's REST binding: HTTP routes over the data plane's vision calls.

    POST /v2/vision/models/{m}[/versions/{v}]/{classify|detect|segment|encode|reconstruct}

One picture as the body (image/*, application/octet-stream) or several as multipart/form-data (each
file part a picture; its filename comes back as the result's `source`); options as query parameters
(top_k, score_threshold, max_detections). The answer is the JSON `python -m client` prints for the
gRPC vision API (the same messages, server/bindings/vision_messages.py), PNG fields (mask_png,
image_png) in base64. This file and its line in server.app.REST_BINDINGS are the whole binding.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cnncore.postprocess import DEFAULT_SCORE_THRESHOLD
from cnncore.protojson import message_to_dict
from server.bindings.http_body import FORM_ERRORS, refuse_encoded_form
from server.bindings.rest import RestBody, RestRoute
from server.bindings.vision_messages import to_message
from server.dataplane.plane import DataPlane
from server.errors import invalid

CALLS = ("classify", "detect", "segment", "encode", "reconstruct")


class VisionRoutes:
    def __init__(self, plane: DataPlane, body: RestBody) -> None:
        self.plane = plane
        self.body = body

    def routes(self) -> list[RestRoute]:
        return [
            RestRoute("POST", base + "/{call}", self.call, "inference")
            for base in ("/v2/vision/models/{model}", "/v2/vision/models/{model}/versions/{version}")
        ]

    async def call(self, request: web.Request) -> web.Response:
        call = request.match_info["call"]
        if call not in CALLS:
            raise web.HTTPNotFound(reason=f"no vision call '{call}'; calls are {', '.join(CALLS)}")
        name, version = request.match_info["model"], request.match_info.get("version", "")
        q = request.query
        options: dict[str, Any] = {}
        try:  # the options first: a bad one is refused before the pictures are read
            if call == "classify" and "top_k" in q:
                options["top_k"] = int(q["top_k"])
            if call == "detect":
                options["score_threshold"] = float(q.get("score_threshold", DEFAULT_SCORE_THRESHOLD))
                options["max_detections"] = int(q.get("max_detections", 0))
        except ValueError as exc:
            raise invalid(f"{call}: a query parameter is not a number: {exc}") from None
        images, sources = await self._images(request)
        with self.plane.admitted(sum(len(i) for i in images)):
            answer = await getattr(self.plane.vision, call)(name, version, images, **options)
        out = message_to_dict(to_message(answer), bytes_as="base64")
        for result, source in zip(out["results"], sources, strict=True):
            if source:
                result["source"] = source
        return web.json_response(out)

    async def _images(self, request: web.Request) -> tuple[list[bytes], list[str]]:
        """The pictures of a vision request: the body itself, or every file part of a multipart form."""
        ctype = request.content_type.lower()
        if ctype == "multipart/form-data":
            refuse_encoded_form(request)
            try:
                form = await self.body.read(request, request.post)
            except FORM_ERRORS as exc:
                raise invalid(f"unreadable multipart/form-data body: {exc}") from None
            files = [v for v in form.values() if isinstance(v, web.FileField)]
            if not files:
                raise invalid("the multipart form has no file parts; send each picture as a file")
            return [f.file.read() for f in files], [f.filename or "" for f in files]
        if ctype.startswith("image/") or ctype == "application/octet-stream":
            return [await self.body.content(request)], [""]
        raise invalid(
            f"vision calls take a picture (image/*, application/octet-stream) or "
            f"multipart/form-data, got Content-Type {request.content_type!r:.80}"
        )


def routes(plane: DataPlane, body: RestBody) -> list[RestRoute]:
    """The binding's registration (server.app.REST_BINDINGS)."""
    return VisionRoutes(plane, body).routes()
