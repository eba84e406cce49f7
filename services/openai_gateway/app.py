"""The OpenAI-compatible HTTP API (aiohttp): routes, error mapping and the handlers.

Handlers are thin: parse the body into a `Job` (protocol.py), call InferenceService
(upstream.py), and write the answer (answer.py). Every failure, wherever it was raised, leaves
through one middleware that answers OpenAI's error shape (errors.py); anything unexpected is a
bug, logged with an error id and answered 500 with that id.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from services.common.errors import InvalidArgument, NotFound, ServiceError

from . import answer, metrics, render
from .errors import error_body, http_error
from .protocol import Job, parse_chat, parse_completion
from .upstream import Upstream, forwarded_metadata, request_id

log = logging.getLogger(__name__)

#: Largest request body (as Envoy's transcoder allows); the router limits the text itself.
MAX_BODY_BYTES = 8 * 1024 * 1024
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/models": "models"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: Whether the request asked for a stream (a metrics label, set once the body is read).
STREAM = web.RequestKey("stream", bool)


@dataclass
class GatewaySettings:
    #: Cancel a streamed answer whose client read nothing for this long (seconds).
    slow_consumer_s: float = 60.0


class Serving:
    """The gateway's readiness, shared by its gRPC health and GET /health (Envoy's check)."""

    def __init__(self) -> None:
        self.ready = False


def _endpoint(request: web.Request) -> str:
    path = request.path
    return ENDPOINTS.get(path) or ("models" if path.startswith("/v1/models/") else "other")


def _error_response(err: ServiceError) -> web.Response:
    out = http_error(err)
    return web.json_response(out.body, status=out.status, headers=out.headers)


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure as OpenAI's error body with its HTTP status, and one count per request."""
    endpoint = _endpoint(request)
    try:
        response = await handler(request)
    except ServiceError as err:
        response = _error_response(err)
    except web.HTTPException as exc:  # aiohttp's own 404 / 405 / 413
        allow = {"allow": exc.headers["allow"]} if "allow" in exc.headers else {}
        type_ = "invalid_request_error" if exc.status < 500 else "server_error"
        response = web.json_response(error_body(exc.reason, type_), status=exc.status, headers=allow)
    except Exception:
        error_id = uuid.uuid4().hex[:12]
        log.exception("bug answering %s %s (error id %s)", request.method, request.path, error_id)
        response = web.json_response(error_body(f"internal error (id {error_id}); the gateway logged it",
                                                "server_error", None, "internal_error"), status=500)
    stream = "true" if request.get(STREAM) else "false"
    metrics.REQUESTS.labels(endpoint, str(response.status), stream).inc()
    return response


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"the request body is not valid JSON: {exc}") from None


class Gateway:
    def __init__(self, upstream: Upstream, settings: GatewaySettings, serving: Serving) -> None:
        self._upstream = upstream
        self._settings = settings
        self._serving = serving

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[openai_errors])
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)
        app.router.add_get("/health", self.health)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_chat(await _json_body(request)), "chat", "chatcmpl-")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_completion(await _json_body(request)), "completions", "cmpl-")

    async def _generate(self, request: web.Request, job: Job, endpoint: str, prefix: str) -> web.StreamResponse:
        started = time.monotonic()
        request[STREAM] = job.stream
        headers = list(request.headers.items())
        rid = request_id(headers)
        head = render.Header(id=prefix + rid, model=job.model, service_tier=job.service_tier)
        chunks = self._upstream.choices(job, rid, forwarded_metadata(headers))
        metrics.IN_FLIGHT.labels(endpoint).inc()
        try:
            if job.stream:
                return await answer.streamed(request, job, head, rid, chunks, endpoint, started,
                                             self._settings.slow_consumer_s)
            return await answer.whole(job, head, rid, chunks, endpoint, started)
        finally:
            metrics.IN_FLIGHT.labels(endpoint).dec()
            metrics.DURATION.labels(endpoint).observe(time.monotonic() - started)

    async def _model_list(self, request: web.Request) -> list[dict[str, Any]]:
        served = await self._upstream.models(forwarded_metadata(request.headers.items()))
        return [{"id": m.name, "object": "model", "created": 0, "owned_by": "meshserve",
                 "meshserve": {"ready_replicas": m.ready_replicas, "regions": list(m.regions)}}
                for m in served.models]

    async def models(self, request: web.Request) -> web.Response:
        """OpenAI's model list: the models with a ready replica now (InferenceService.ListModels)."""
        return web.json_response({"object": "list", "data": await self._model_list(request)})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        for m in await self._model_list(request):
            if m["id"] == name:
                return web.json_response(m)
        raise NotFound(f"the model {name[:128]!r} is not served now (GET /v1/models lists the served models)")

    async def health(self, request: web.Request) -> web.Response:
        """Envoy's health check: 200 while the gateway serves, 503 once it is stopping."""
        if self._serving.ready:
            return web.json_response({"status": "SERVING"})
        return web.json_response({"status": "NOT_SERVING"}, status=503)
