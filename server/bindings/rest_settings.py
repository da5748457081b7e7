"""Triton's logging and trace extensions over REST: the process's log and trace settings.

    GET|POST /v2/logging                                    log settings (server/logs.py)
    GET|POST /v2/trace/setting | /v2/models/{m}/trace/setting   trace settings, global or per model
                                                            (server/tracing.py)

GET answers the settings in force; POST changes the keys its JSON object names and answers the result
(a trace setting set to null goes back: a model's to the global value, a global one to its value at
start). The gRPC LogSettings
and TraceSetting RPCs (server/bindings/grpc_inference.py) change the same state. This file and its line
in server.app.REST_BINDINGS are the whole binding.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from server import logs, tracing
from server.bindings.rest import RestBody, RestRoute
from server.dataplane.plane import DataPlane


class SettingsRoutes:
    def __init__(self, plane: DataPlane, body: RestBody) -> None:
        self.plane = plane
        self.body = body

    def routes(self) -> list[RestRoute]:
        return [
            *(RestRoute(verb, "/v2/logging", self.log_settings, "logging") for verb in ("GET", "POST")),
            *(
                RestRoute(verb, path, self.trace_setting, "trace")
                for verb in ("GET", "POST")
                for path in ("/v2/trace/setting", "/v2/models/{model}/trace/setting")
            ),
        ]

    async def _updates(self, request: web.Request, what: str) -> dict[str, Any]:
        return await self.body.json_object(request, what) if request.method == "POST" else {}

    async def log_settings(self, request: web.Request) -> web.Response:
        return web.json_response(logs.update(await self._updates(request, "log settings request")))

    async def trace_setting(self, request: web.Request) -> web.Response:
        model = request.match_info.get("model")
        tracing.check_model(self.plane.repository, model or "")  # before the body: an unknown model is 404
        return web.json_response(tracing.TRACER.update(model, await self._updates(request, "trace setting request")))


def routes(plane: DataPlane, body: RestBody) -> list[RestRoute]:
    """The binding's registration (server.app.REST_BINDINGS)."""
    return SettingsRoutes(plane, body).routes()
